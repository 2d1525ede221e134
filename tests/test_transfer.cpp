// Integration: a real sender and a real receiver in one process over loopback TCP, both I/O backends.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <functional>
#include <random>
#include <set>
#include <mutex>
#include <optional>
#include <future>
#include <thread>

#include "compress/codec.h"
#include "compress/hash.h"
#include "engine/session.h"
#include "engine/spec.h"
#include "engine/transfer.h"
#include "cancel_soon.h"
#include "fault_proxy.h"
#include "scratch_dir.h"
#include "io/ring.h"

namespace dstx::engine {
namespace {

namespace fs = std::filesystem;

struct Outcome {
  Result send;
  Result recv;
};

// Runs one transfer: receiver on an ephemeral loopback port, sender connecting to `port_override` when set
// (a proxy), else straight to the receiver.
Outcome transfer(io::Source& src, io::Sink& sink, SendOptions so, RecvOptions ro = {},
                 std::function<uint16_t(uint16_t)> interpose = nullptr, const Cancel* cancel = nullptr,
                 Stats* recv_stats = nullptr, Stats* send_stats = nullptr) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  ro.accept_timeout_ms = 10000;
  Outcome out;
  std::thread receiver([&] { out.recv = receive(sink, listener.get(), ro, recv_stats, cancel); });
  const uint16_t target = interpose ? interpose(port) : port;
  out.send = send_to(src, io::HostPort{"127.0.0.1", target}, so, send_stats, cancel);
  receiver.join();
  return out;
}

class BackendTest : public ::testing::TestWithParam<io::Backend> {
 protected:
  void SetUp() override {
    if (GetParam() == io::Backend::uring && !io::probe().uring_available) {
      GTEST_SKIP() << "io_uring unavailable: " << io::probe().uring_unavailable_reason;
    }
    setenv("DSTX_IO", GetParam() == io::Backend::uring ? "uring" : "syscall", 1);
  }
  void TearDown() override { unsetenv("DSTX_IO"); }
  const test::ScratchDir scratch_{"dstx-transfer"};
  const fs::path& dir_ = scratch_.path();
};

std::string backend_label(const ::testing::TestParamInfo<io::Backend>& info) {
  return info.param == io::Backend::uring ? "uring" : "syscall";
}

void write_emu_file(const fs::path& path, const EmuSpec& spec) {
  const io::ContentGenerator gen(spec.profile, spec.seed);
  std::vector<std::byte> buf(1 << 20);
  std::ofstream f(path, std::ios::binary);
  for (uint64_t off = 0; off < spec.size; off += buf.size()) {
    const size_t n = size_t(std::min<uint64_t>(buf.size(), spec.size - off));
    gen.fill(off, std::span(buf.data(), n));
    f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(n));
  }
}

bool same_file(const fs::path& a, const fs::path& b) {
  std::ifstream fa(a, std::ios::binary), fb(b, std::ios::binary);
  std::vector<char> x(1 << 20), y(1 << 20);
  for (;;) {
    fa.read(x.data(), std::streamsize(x.size()));
    fb.read(y.data(), std::streamsize(y.size()));
    if (fa.gcount() != fb.gcount()) return false;
    if (fa.gcount() == 0) return true;
    if (!std::equal(x.begin(), x.begin() + fa.gcount(), y.begin())) return false;
  }
}

TEST_P(BackendTest, MixedStateByteExactOverOneAndFourStreams) {
  for (unsigned streams : {1u, 4u}) {
    const io::ContentGenerator gen(io::Profile::mixed, 42);
    auto src = io::open_emu_source(gen, 256ull << 20);
    auto sink = io::open_emu_sink(gen, 256ull << 20);  // checks every byte against the generator
    SendOptions so;
    so.streams = streams;
    const Outcome o = transfer(*src, *sink, so);
    ASSERT_TRUE(o.send.committed) << o.send.error;
    ASSERT_TRUE(o.recv.committed) << o.recv.error;
    EXPECT_EQ(o.send.bytes, 256ull << 20);
    EXPECT_EQ(o.recv.bytes, 256ull << 20);
    EXPECT_EQ(o.send.digest, o.recv.digest);
    EXPECT_EQ(o.recv.streams, streams);
    EXPECT_LT(o.send.wire_bytes, o.send.bytes);  // mixed state compresses
  }
}

// Reads into plain buffers (the default), into buffers registered with io_uring (READ_FIXED), and from a
// source file in memory (tmpfs: read on the worker's thread).
TEST_P(BackendTest, FileToFileEveryProfileAndOddSizes) {
  struct Case {
    io::Profile profile;
    uint64_t size;
  };
  struct Variant {
    bool registered;
    fs::path in_dir;
    const char* label;
    bool in_memory = false;  // the source must take the pread path
  };
  std::vector<Variant> variants = {{false, dir_, "plain buffers"}, {true, dir_, "registered buffers"}};
  struct statfs shm_fs {};
  std::optional<test::ScratchDir> shm;
  if (::statfs("/dev/shm", &shm_fs) == 0 && shm_fs.f_type == TMPFS_MAGIC) {
    shm.emplace("dstx-transfer", "/dev/shm");
    variants.push_back({false, shm->path(), "source on /dev/shm", true});
  }
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.label);
    const bool registered = v.registered;
    for (const Case c : {Case{io::Profile::zero, 8 << 20}, Case{io::Profile::zero_heavy, (8 << 20) + 1},
                         Case{io::Profile::binary, 5 << 20}, Case{io::Profile::text, 3 << 20},
                         Case{io::Profile::random, (4 << 20) - 17}, Case{io::Profile::mixed, 1},
                         Case{io::Profile::mixed, 0}}) {
      const fs::path in = v.in_dir / "in.bin", out = dir_ / "out.bin";
      write_emu_file(in, EmuSpec{c.size, c.profile, 9});
      fs::remove(out);
      auto src = open_source("file:" + in.string());
      if (v.in_memory) {
        ASSERT_TRUE(src->reads_from_memory());
      }
      auto sink = open_sink("file:" + out.string());
      SendOptions so;
      so.streams = 2;
      so.chunk_bytes = 256 << 10;
      so.register_buffers = registered;
      const Outcome o = transfer(*src, *sink, so);
      ASSERT_TRUE(o.send.committed) << io::profile_name(c.profile) << ": " << o.send.error;
      ASSERT_TRUE(o.recv.committed) << o.recv.error;
      EXPECT_TRUE(same_file(in, out)) << io::profile_name(c.profile) << " size " << c.size;
      EXPECT_EQ(fs::file_size(out), c.size);
      EXPECT_FALSE(fs::exists(out.string() + ".partial"));
      // io_uring: every stream's ring sends (and reads the file) and receives through fixed files.
      EXPECT_EQ(o.send.fixed_file_streams, GetParam() == io::Backend::uring ? 2u : 0u);
      EXPECT_EQ(o.recv.fixed_file_streams, GetParam() == io::Backend::uring ? 2u : 0u);
    }
  }
}

TEST_P(BackendTest, EveryCodecModeDeliversTheSameBytes) {
  for (CodecMode mode : {CodecMode::none, CodecMode::lz4, CodecMode::zstd, CodecMode::auto_select}) {
    const io::ContentGenerator gen(io::Profile::mixed, 3);
    auto src = io::open_emu_source(gen, 32ull << 20);
    auto sink = io::open_emu_sink(gen, 32ull << 20);
    SendOptions so;
    so.codec = mode;
    so.streams = 3;
    const Outcome o = transfer(*src, *sink, so);
    ASSERT_TRUE(o.send.committed) << codec_mode_name(mode) << ": " << o.send.error;
    ASSERT_TRUE(o.recv.committed) << o.recv.error;
  }
}

TEST_P(BackendTest, ZeroCopySendsDeliverTheSameBytes) {
  if (GetParam() == io::Backend::uring && !io::probe().send_zc) GTEST_SKIP() << "the kernel has no SEND_ZC";
  const io::ContentGenerator gen(io::Profile::random, 17);  // raw frames: the ones sent zero-copy
  auto src = io::open_emu_source(gen, 32 << 20);
  auto sink = io::open_emu_sink(gen, 32 << 20);
  SendOptions so{.streams = 2};
  so.zero_copy_min_bytes = 64 << 10;
  const Outcome o = transfer(*src, *sink, so);
  ASSERT_TRUE(o.send.committed) << o.send.error;
  ASSERT_TRUE(o.recv.committed) << o.recv.error;
}

TEST_P(BackendTest, SequentialSourceFromAPipe) {
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  const io::ContentGenerator gen(io::Profile::binary, 11);
  constexpr uint64_t size = (20 << 20) + 12345;
  std::thread writer([&] {
    std::vector<std::byte> buf(100000);  // odd-sized writes: the source must still fill whole chunks
    for (uint64_t off = 0; off < size; off += buf.size()) {
      const size_t n = size_t(std::min<uint64_t>(buf.size(), size - off));
      gen.fill(off, std::span(buf.data(), n));
      ASSERT_EQ(write(p[1], buf.data(), n), ssize_t(n));
    }
    close(p[1]);
  });
  auto src = io::open_fd_source(p[0], true, "fd:pipe");
  auto sink = io::open_emu_sink(gen, size);
  SendOptions so;
  so.streams = 2;
  const Outcome o = transfer(*src, *sink, so);
  writer.join();
  ASSERT_TRUE(o.send.committed) << o.send.error;
  ASSERT_TRUE(o.recv.committed) << o.recv.error;
  EXPECT_EQ(o.recv.bytes, size);
}

// A sequential source in transactions of varying size, handing out zero-copy views of its own "data
// section" (as a VFIO v1 region read through its mapping does), refusing to move on while a view is out.
class TransactionSource final : public io::Source {
 public:
  TransactionSource(std::vector<uint32_t> sizes, const io::ContentGenerator& gen)
      : sizes_(std::move(sizes)), gen_(gen) {}
  std::string describe() const override { return "test:transactions"; }
  std::optional<uint64_t> size() const override { return std::nullopt; }
  bool random_access() const override { return false; }
  size_t read_next(io::Ring&, std::span<std::byte> out, io::ReadInfo* info) override {
    if (txn_ == sizes_.size()) return 0;
    if (pos_in_txn_ == 0) {
      // A new transaction refills the section: not while the engine still holds views of it.
      if (views_out_ != 0) {
        ++again_;
        return io::kReadAgain;
      }
      section_.resize(sizes_[txn_]);
      gen_.fill(offset_, section_);
    }
    const size_t n = std::min<size_t>(out.size(), sizes_[txn_] - pos_in_txn_);
    info->view = section_.data() + pos_in_txn_;
    info->view_token = ++tokens_;
    ++views_out_;
    pos_in_txn_ += n;
    offset_ += n;
    if (pos_in_txn_ == sizes_[txn_]) {
      info->end_of_transaction = true;
      ++txn_;
      pos_in_txn_ = 0;
    }
    return n;
  }
  void release_view(uint64_t) override { --views_out_; }
  std::atomic<int> views_out_{0};
  uint64_t tokens_ = 0;
  uint64_t again_ = 0;

 private:
  std::vector<uint32_t> sizes_;
  io::ContentGenerator gen_;
  size_t txn_ = 0;
  uint32_t pos_in_txn_ = 0;
  uint64_t offset_ = 0;
  std::vector<std::byte> section_;
};

class TransactionSink final : public io::Sink {
 public:
  explicit TransactionSink(const io::ContentGenerator& gen) : gen_(gen) {}
  std::string describe() const override { return "test:transactions"; }
  void write(io::Ring&, uint64_t offset, std::span<const std::byte> data) override {
    EXPECT_EQ(gen_.first_mismatch(offset, data), -1) << "at offset " << offset;
    bytes_ += data.size();
    txn_bytes_ += data.size();
  }
  void write_zero(io::Ring&, uint64_t, uint64_t len) override {
    bytes_ += len;
    txn_bytes_ += len;
  }
  void end_transaction(io::Ring&) override {
    boundaries_.push_back(txn_bytes_);
    txn_bytes_ = 0;
  }
  void commit(io::Ring&, uint64_t total) override { committed_ = total == bytes_; }
  void abort() noexcept override {}
  std::vector<uint32_t> boundaries_;
  bool committed_ = false;

 private:
  io::ContentGenerator gen_;
  uint64_t bytes_ = 0;
  uint64_t txn_bytes_ = 0;
};

// Keeps what it is given in memory. With `pieces` it says it takes chunks in pieces, and the receiver hands
// it a sparse chunk's present pages and zero runs as they are; without, the receiver expands such chunks in
// the reorder window first.
class MemorySink final : public io::Sink {
 public:
  explicit MemorySink(bool pieces) : pieces_(pieces) {}
  std::string describe() const override { return "test:memory"; }
  void write(io::Ring&, uint64_t offset, std::span<const std::byte> data) override {
    EXPECT_EQ(offset, bytes_.size());
    bytes_.insert(bytes_.end(), data.begin(), data.end());
    ++writes_;
  }
  void write_zero(io::Ring&, uint64_t offset, uint64_t len) override {
    EXPECT_EQ(offset, bytes_.size());
    bytes_.resize(bytes_.size() + len, std::byte{0});
    ++zero_writes_;
  }
  bool takes_pieces() const override { return pieces_; }
  void commit(io::Ring&, uint64_t total) override { committed_ = total == bytes_.size(); }
  void abort() noexcept override {}
  std::vector<std::byte> bytes_;
  uint64_t writes_ = 0;
  uint64_t zero_writes_ = 0;
  bool committed_ = false;

 private:
  bool pieces_;
};

// A sink that passes everything on to another and runs hooks: before each write (a slow sink), and once the
// inner sink committed (a slow commit: a large file's fdatasync, a device checking the state it was given;
// or something happening meanwhile).
class HookSink final : public io::Sink {
 public:
  struct Hooks {
    std::function<void()> before_write;
    std::function<void()> after_commit;
  };
  HookSink(io::Sink& inner, Hooks hooks) : in_(inner), hooks_(std::move(hooks)) {}
  std::string describe() const override { return in_.describe(); }
  void write(io::Ring& ring, uint64_t offset, std::span<const std::byte> data) override {
    if (hooks_.before_write) hooks_.before_write();
    in_.write(ring, offset, data);
  }
  void write_zero(io::Ring& ring, uint64_t offset, uint64_t len) override {
    if (hooks_.before_write) hooks_.before_write();
    in_.write_zero(ring, offset, len);
  }
  void commit(io::Ring& ring, uint64_t total) override {
    in_.commit(ring, total);
    if (hooks_.after_commit) hooks_.after_commit();
  }
  void abort() noexcept override { in_.abort(); }

 private:
  io::Sink& in_;
  Hooks hooks_;
};

// --codec sparse: raw chunks without their zero pages. The sender sends each chunk's present pages from where
// they were read, in pieces: in 16 MiB chunks with every other page zero, 2049 pieces a frame, more than one
// sendmsg takes. Both kinds of sink get the same bytes; the wire carries the present pages only.
TEST_P(BackendTest, SparseCodecSendsOnlyThePresentPages) {
  constexpr size_t kPage = 4096, kChunk = 16 << 20;
  const size_t size = 2 * kChunk + 3 * kPage + 100;
  std::vector<std::byte> state(size);
  std::mt19937_64 rng(5);
  for (auto& b : state) b = std::byte(rng());
  size_t zero_bytes = 0;
  for (size_t page = 1; page * kPage < size; page += 2) {
    const size_t n = std::min(kPage, size - page * kPage);
    std::memset(state.data() + page * kPage, 0, n);
    zero_bytes += n;
  }
  const fs::path in = dir_ / "alternate.bin";
  {
    std::ofstream f(in, std::ios::binary);
    f.write(reinterpret_cast<const char*>(state.data()), std::streamsize(state.size()));
  }
  for (const bool pieces : {true, false}) {
    SCOPED_TRACE(pieces ? "a sink that takes pieces" : "a sink that takes whole chunks");
    auto src = open_source("file:" + in.string());
    MemorySink sink(pieces);
    SendOptions so;
    so.streams = 2;
    so.chunk_bytes = kChunk;
    so.codec = CodecMode::sparse;
    RecvOptions ro;
    ro.memory_budget_bytes = 128ull << 20;
    Stats sent, received;
    const Outcome o = transfer(*src, sink, so, ro, nullptr, nullptr, &received, &sent);
    ASSERT_TRUE(o.send.committed) << o.send.error;
    ASSERT_TRUE(o.recv.committed) << o.recv.error;
    EXPECT_TRUE(sink.bytes_ == state);
    EXPECT_EQ(sent.codec_chunks[unsigned(compress::Codec::sparse)].load(), 3u);
    EXPECT_EQ(received.codec_chunks[unsigned(compress::Codec::sparse)].load(), 3u);
    // Frames: 3 headers and bitmaps and the present pages; END frames on top.
    const uint64_t frames = 3 * wire::kHeaderBytes + 2 * compress::sparse_bitmap_bytes(kChunk) +
                            compress::sparse_bitmap_bytes(3 * kPage + 100) + (size - zero_bytes);
    EXPECT_GE(o.send.wire_bytes, frames);
    EXPECT_LE(o.send.wire_bytes, frames + 4 * wire::kHeaderBytes);
  }
}

// Paged chunks (lz4 and zstd over a chunk's sparse form): text with every third page zero reaches both kinds
// of sink byte-exact, every compressed chunk went paged, and a sink that takes pieces gets zero runs, never
// zero pages. With auto as well (its lz4 rung).
TEST_P(BackendTest, PagedChunksCompressOnlyThePresentPages) {
  constexpr size_t kPage = 4096;
  const io::ContentGenerator gen(io::Profile::text, 6);
  const size_t size = (8 << 20) + 3 * kPage + 100;
  std::vector<std::byte> state(size);
  gen.fill(0, state);
  for (size_t page = 2; page * kPage < size; page += 3)
    std::memset(state.data() + page * kPage, 0, std::min(kPage, size - page * kPage));
  const fs::path in = dir_ / "paged.bin";
  {
    std::ofstream f(in, std::ios::binary);
    f.write(reinterpret_cast<const char*>(state.data()), std::streamsize(state.size()));
  }
  for (const CodecMode codec : {CodecMode::lz4, CodecMode::zstd, CodecMode::auto_select}) {
    for (const bool pieces : {true, false}) {
      SCOPED_TRACE(std::string(codec_mode_name(codec)) + (pieces ? ", pieces" : ", whole chunks"));
      auto src = open_source("file:" + in.string());
      MemorySink sink(pieces);
      SendOptions so{.streams = 2, .chunk_bytes = 1 << 20, .codec = codec};
      Stats sent, received;
      const Outcome o = transfer(*src, sink, so, RecvOptions{}, nullptr, nullptr, &received, &sent);
      ASSERT_TRUE(o.send.committed) << o.send.error;
      ASSERT_TRUE(o.recv.committed) << o.recv.error;
      EXPECT_TRUE(sink.bytes_ == state);
      EXPECT_GT(sent.paged_chunks.load(), 0u);
      if (codec != CodecMode::auto_select) {
        EXPECT_EQ(sent.paged_chunks.load(), sent.chunks.load());
      }
      EXPECT_EQ(received.compressed_chunks.load(), sent.compressed_chunks.load());
      EXPECT_EQ(received.paged_chunks.load(), sent.paged_chunks.load());
      if (pieces) {
        EXPECT_GT(sink.zero_writes_, 0u);
      } else {
        EXPECT_EQ(sink.zero_writes_, 0u);
      }
    }
  }
}

TEST_P(BackendTest, TransactionBoundariesAndZeroCopyViewsSurviveTheTrip) {
  std::vector<uint32_t> sizes;
  std::mt19937 rng(3);
  for (int i = 0; i < 200; ++i) sizes.push_back(1 + rng() % (300 << 10));  // smaller and larger than a chunk
  sizes.push_back(64 << 10);
  const io::ContentGenerator gen(io::Profile::mixed, 21);
  for (CodecMode mode : {CodecMode::none, CodecMode::auto_select}) {
    TransactionSource s(sizes, gen);
    TransactionSink k(gen);
    SendOptions so{.streams = 3, .chunk_bytes = 64 << 10, .codec = mode};
    const Outcome o = transfer(s, k, so);
    ASSERT_TRUE(o.send.committed) << o.send.error;
    ASSERT_TRUE(o.recv.committed) << o.recv.error;
    EXPECT_EQ(k.boundaries_, sizes) << codec_mode_name(mode);
    EXPECT_EQ(s.views_out_.load(), 0);
    EXPECT_TRUE(k.committed_);
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendTest, ::testing::Values(io::Backend::uring, io::Backend::syscall),
                         backend_label);

using test::Fault;
using test::FaultProxy;

// `n` connected UNIX socket pairs: the sender's ends and the receiver's.
bool socket_pairs(int n, std::vector<io::Fd>* send_side, std::vector<io::Fd>* recv_side) {
  for (int i = 0; i < n; ++i) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return false;
    send_side->emplace_back(sv[0]);
    recv_side->emplace_back(sv[1]);
  }
  return true;
}

// A VMM hands in connections it made itself: here UNIX socket pairs, two streams, handed in crossed over.
TEST(Transfer, OverConnectionsTheCallerOwns) {
  std::vector<io::Fd> send_side, recv_side;
  ASSERT_TRUE(socket_pairs(2, &send_side, &recv_side));
  std::swap(recv_side[0], recv_side[1]);  // the receiver learns each stream's index from its HELLO
  const io::ContentGenerator gen(io::Profile::mixed, 12);
  auto src = io::open_emu_source(gen, 24 << 20);
  auto sink = io::open_emu_sink(gen, 24 << 20);
  Result recv_result;
  std::thread receiver(
      [&] { recv_result = receive_accepted(*sink, std::move(recv_side), RecvOptions{}, nullptr, nullptr); });
  const Result send_result = send(*src, std::move(send_side), SendOptions{}, nullptr, nullptr);
  receiver.join();
  EXPECT_TRUE(send_result.committed) << send_result.error;
  EXPECT_TRUE(recv_result.committed) << recv_result.error;
  EXPECT_EQ(recv_result.streams, 2u);
}

// The sender fails (here a cancel) just as the receiver commits: the receiver sealed its success when it sent
// COMMITTED, and ignores the ABORTED that follows. The sender reads stream 0 on for a moment after its
// failure, sees the matching COMMITTED, and reports success too: both sides agree, and no caller rolls a
// source back while the destination runs the state. Over handed-in connections, whose receiver reads
// nothing after END, so that the ABORTED cannot overtake the commit.
TEST(Transfer, ACommittedThatCrossesTheSendersFailureStillCounts) {
  std::vector<io::Fd> send_side, recv_side;
  ASSERT_TRUE(socket_pairs(2, &send_side, &recv_side));
  const io::ContentGenerator gen(io::Profile::mixed, 14);
  auto src = io::open_emu_source(gen, 4 << 20);
  auto sink = io::open_emu_sink(gen, 4 << 20);
  Cancel cancel;
  HookSink hooked(*sink, {.after_commit = [&] {
    cancel.request();  // the sender fails now, before COMMITTED goes
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
  }});
  Result recv_result;
  std::thread receiver(
      [&] { recv_result = receive_accepted(hooked, std::move(recv_side), RecvOptions{}, nullptr, nullptr); });
  const Result send_result = send(*src, std::move(send_side), SendOptions{}, nullptr, &cancel);
  receiver.join();
  EXPECT_TRUE(cancel.requested());
  EXPECT_TRUE(recv_result.committed) << recv_result.error;
  EXPECT_TRUE(send_result.committed) << send_result.error;
  EXPECT_EQ(send_result.digest, recv_result.digest);
}

TEST(Transfer, ThroughAnHonestProxy) {
  const io::ContentGenerator gen(io::Profile::mixed, 8);
  auto src = io::open_emu_source(gen, 16 << 20);
  auto sink = io::open_emu_sink(gen, 16 << 20);
  std::unique_ptr<FaultProxy> proxy;
  const Outcome o = transfer(*src, *sink, SendOptions{.streams = 1}, {}, [&](uint16_t port) {
    proxy = std::make_unique<FaultProxy>(port, Fault{});
    return proxy->port();
  });
  EXPECT_TRUE(o.send.committed) << o.send.error;
  EXPECT_TRUE(o.recv.committed) << o.recv.error;
}

// The stream digest a transfer of `gen`'s first `size` bytes in chunks of `chunk` gives, its chunk hashes
// in `form` (an all-zero chunk's is 0).
uint64_t expected_digest(const io::ContentGenerator& gen, uint64_t size, uint32_t chunk, compress::HashForm form) {
  wire::StreamDigest digest;
  std::vector<std::byte> bytes(chunk);
  for (uint64_t seq = 1, at = 0; at < size; ++seq, at += chunk) {
    const std::span<std::byte> raw(bytes.data(), size_t(std::min<uint64_t>(chunk, size - at)));
    gen.fill(at, raw);
    const bool zero = compress::is_zero(raw.data(), raw.size());
    digest.add(seq, uint32_t(raw.size()), zero ? 0 : compress::chunk_hash(form, raw));
  }
  return digest.value();
}

// Chunk hashes cover the present pages when both ends can (capability bit 5), and the bytes when the
// receiver cannot (the bit cleared in the HELLO on its way, so that both ends agree): the stream digest,
// made of the chunk hashes, says which. Zero-heavy state, so that the two differ in every non-zero chunk.
TEST(Transfer, ChunkHashesCoverPagesOnlyWhereBothEndsAgree) {
  const io::ContentGenerator gen(io::Profile::zero_heavy, 8);
  constexpr uint64_t size = 8 << 20;
  constexpr uint32_t chunk = 256 << 10;
  for (const CodecMode codec : {CodecMode::none, CodecMode::sparse, CodecMode::lz4, CodecMode::auto_select}) {
    for (const bool old_receiver : {false, true}) {
      SCOPED_TRACE(std::to_string(int(codec)) + (old_receiver ? " old receiver" : ""));
      auto src = io::open_emu_source(gen, size);
      auto sink = io::open_emu_sink(gen, size);
      std::unique_ptr<FaultProxy> proxy;
      const Outcome o = transfer(*src, *sink, SendOptions{.streams = 2, .chunk_bytes = chunk, .codec = codec},
                                 {}, [&](uint16_t port) {
                                   proxy = std::make_unique<FaultProxy>(
                                       port, Fault{.clear_caps = old_receiver ? wire::kCapPageHash : 0});
                                   return proxy->port();
                                 });
      ASSERT_TRUE(o.send.committed) << o.send.error;
      ASSERT_TRUE(o.recv.committed) << o.recv.error;
      const auto form = old_receiver ? compress::HashForm::raw : compress::HashForm::pages;
      EXPECT_EQ(o.send.digest, expected_digest(gen, size, chunk, form));
      EXPECT_EQ(o.recv.digest, o.send.digest);
    }
  }
}

// Every flipped byte, wherever it lands (headers, hello, payloads of each kind), fails the transfer on both
// sides and leaves no file behind.
TEST(Transfer, AFlippedByteOnTheWireIsAlwaysCaught) {
  const test::ScratchDir scratch("dstx-flip");
  const fs::path& dir = scratch.path();
  constexpr uint64_t size = 4 << 20;
  const io::ContentGenerator gen(io::Profile::mixed, 77);
  // A fixed codec: --codec auto's choices depend on timing, so the wire size would differ from run to run.
  SendOptions so{.streams = 1, .chunk_bytes = 64 << 10, .codec = CodecMode::lz4};
  so.handshake_timeout_ms = 3000;
  so.commit_timeout_ms = 5000;
  RecvOptions ro;
  ro.handshake_timeout_ms = 3000;
  // An honest run tells how many bytes the sender puts on stream 0, so every flip lands inside the stream.
  uint64_t wire_bytes = 0;
  {
    auto src = io::open_emu_source(gen, size);
    auto sink = io::open_null_sink();
    const Outcome o = transfer(*src, *sink, so, ro);
    ASSERT_TRUE(o.send.committed) << o.send.error;
    wire_bytes = o.send.wire_bytes + wire::kHeaderBytes + wire::kHelloBytes;  // + HELLO
  }
  std::mt19937_64 rng(1234);
  std::vector<int64_t> positions = {0,
                                    5,
                                    47,
                                    50,
                                    95,
                                    96,
                                    100,
                                    143,
                                    150,
                                    1000,
                                    int64_t(wire_bytes) - 1,
                                    int64_t(wire_bytes) - 30};  // handshake, first frames, END
  for (int i = 0; i < 30; ++i) positions.push_back(int64_t(rng() % wire_bytes));
  for (const int64_t pos : positions) {
    auto src = io::open_emu_source(gen, size);
    const fs::path out = dir / "out.bin";
    auto sink = open_sink("file:" + out.string());
    std::unique_ptr<FaultProxy> proxy;
    const Outcome o = transfer(*src, *sink, so, ro, [&](uint16_t port) {
      proxy = std::make_unique<FaultProxy>(port, Fault{.kind = Fault::flip, .at = pos});
      return proxy->port();
    });
    EXPECT_FALSE(o.send.committed) << "flip at " << pos << " of " << wire_bytes
                                   << " went unnoticed by the sender";
    EXPECT_FALSE(o.recv.committed) << "flip at " << pos << " went unnoticed by the receiver";
    EXPECT_FALSE(o.send.error.empty());
    EXPECT_FALSE(fs::exists(out)) << "flip at " << pos;
    EXPECT_FALSE(fs::exists(out.string() + ".partial")) << "flip at " << pos;
    fs::remove(out);
  }
}

// Generated content as a random-access source that counts what it reads (a resume reads sent chunks again),
// or as a sequential one (the engine must keep its frames).
class CountingSource final : public io::Source {
 public:
  CountingSource(const io::ContentGenerator& gen, uint64_t size, bool sequential)
      : inner_(io::open_emu_source(gen, size)), size_(size), sequential_(sequential) {}
  std::string describe() const override { return "test:counting"; }
  std::optional<uint64_t> size() const override { return sequential_ ? std::nullopt : std::optional(size_); }
  bool random_access() const override { return !sequential_; }
  void read_at(io::Ring& ring, uint64_t offset, std::span<std::byte> out) override {
    inner_->read_at(ring, offset, out);
    bytes_read_ += out.size();
  }
  size_t read_next(io::Ring& ring, std::span<std::byte> out, io::ReadInfo*) override {
    const size_t n = size_t(std::min<uint64_t>(out.size(), size_ - next_));
    read_at(ring, next_, out.first(n));
    next_ += n;
    return n;
  }
  std::atomic<uint64_t> bytes_read_{0};

 private:
  std::unique_ptr<io::Source> inner_;
  uint64_t size_;
  bool sequential_;
  uint64_t next_ = 0;
};

// A connection that breaks mid-transfer is reconnected and resumed: the transfer commits byte-exact, with the
// frames kept by the sender (a sequential source) or read from the source again (a random-access one).
TEST(Resume, ABrokenStreamIsReconnectedAndTheTransferCompletes) {
  struct Case {
    unsigned streams;
    int cut_connection;
    int64_t cut_after;
    io::Profile profile = io::Profile::mixed;
    uint32_t chunk_bytes = 256 << 10;
    CodecMode codec = CodecMode::auto_select;
    bool sequential = false;
  };
  // Zero chunks' frames are kept for replay inline (no buffer each): all-zero state in 4 KiB chunks (6144
  // frames of 48 bytes per stream) cut after 2000 and 100000 bytes. (Their bound, 4096 per stream, is not
  // reached: the receiver acknowledges every 64 chunks of 4 KiB.)
  for (const Case c : {Case{1, 0, 3 << 20}, Case{3, 1, 5 << 20}, Case{3, 0, 200}, Case{2, 1, 300},
                       Case{1, 0, 3 << 20, io::Profile::mixed, 256 << 10, CodecMode::auto_select, true},
                       Case{2, 1, 2 << 20, io::Profile::mixed, 256 << 10, CodecMode::auto_select, true},
                       Case{2, 1, 2000, io::Profile::zero, 4096}, Case{2, 0, 100000, io::Profile::zero, 4096},
                       Case{2, 0, 100000, io::Profile::zero, 4096, CodecMode::auto_select, true},
                       Case{2, 0, 1 << 20, io::Profile::zero_heavy},
                       // Sparse frames sent gathered (their pages from the read buffer) are kept and sent again
                       // as pieces; read again, they go raw.
                       Case{2, 1, 1 << 20, io::Profile::zero_heavy, 256 << 10, CodecMode::sparse, true},
                       Case{1, 0, 700000, io::Profile::mixed, 1 << 20, CodecMode::sparse, true},
                       Case{2, 1, 1 << 20, io::Profile::zero_heavy, 256 << 10, CodecMode::sparse}}) {
    const io::ContentGenerator gen(c.profile, 31);
    CountingSource counting(gen, 48 << 20, c.sequential);
    io::Source* src = &counting;
    auto sink = io::open_emu_sink(gen, 48 << 20);
    std::unique_ptr<FaultProxy> proxy;
    Stats send_stats;
    io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
    const uint16_t port = io::bound_port(listener.get());
    Result recv_result;
    std::thread receiver(
        [&] { recv_result = receive(*sink, listener.get(), RecvOptions{}, nullptr, nullptr); });
    proxy = std::make_unique<FaultProxy>(
        port, Fault{.kind = Fault::cut, .connection = c.cut_connection, .at = c.cut_after});
    SendOptions so{.streams = c.streams, .chunk_bytes = c.chunk_bytes, .codec = c.codec};
    so.reconnect_backoff_ms = 20;
    const auto t0 = std::chrono::steady_clock::now();
    const Result send_result =
        send_to(*src, io::HostPort{"127.0.0.1", proxy->port()}, so, &send_stats, nullptr);
    receiver.join();
    EXPECT_TRUE(send_result.committed)
        << c.streams << " streams, cut " << c.cut_connection << ": " << send_result.error;
    EXPECT_TRUE(recv_result.committed) << recv_result.error;
    EXPECT_EQ(send_result.digest, recv_result.digest);
    EXPECT_GE(send_stats.resumes.load(), 1u)
        << "the cut did not happen? " << c.streams << " streams, cut " << c.cut_connection << " after " << c.cut_after;
    if (c.codec == CodecMode::sparse) {
      EXPECT_GT(send_stats.codec_chunks[unsigned(compress::Codec::sparse)].load(), 0u);
    }
    // A sequential source is read once: what went missing came from the frames kept (a random-access one is
    // read again for them: Resume.ARandomAccessSourceIsReadAgainInsteadOfKept).
    if (c.sequential) {
      EXPECT_EQ(counting.bytes_read_.load(), uint64_t(48) << 20);
      EXPECT_EQ(send_stats.reread_chunks.load(), 0u);
    }
    // io_uring: the resumed streams' fixed files were re-pointed at the new connections, not dropped.
    if (send_result.io_backend.rfind("io_uring", 0) == 0) {
      EXPECT_EQ(send_result.fixed_file_streams, c.streams);
      EXPECT_EQ(recv_result.fixed_file_streams, c.streams);
    }
    if (getenv("DSTX_TEST_TRACE"))
      fprintf(stderr, "case %u/%d/%lld: %.3f s\n", c.streams, c.cut_connection, (long long)c.cut_after,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
}

// Frames the sender handed over in full but the receiver never got (the path stalled, then broke) are read
// from a random-access source again, and the transfer commits byte-exact.
TEST(Resume, ARandomAccessSourceIsReadAgainInsteadOfKept) {
  for (const CodecMode codec : {CodecMode::none, CodecMode::lz4, CodecMode::sparse}) {
    const io::ContentGenerator gen(io::Profile::zero_heavy, 8);
    constexpr uint64_t size = 32 << 20;
    CountingSource src(gen, size, false);
    auto sink = io::open_emu_sink(gen, size);
    std::unique_ptr<FaultProxy> proxy;
    Stats send_stats;
    SendOptions so{.streams = 1, .chunk_bytes = 256 << 10, .codec = codec};
    so.reconnect_backoff_ms = 20;
    const Outcome o = transfer(
        src, *sink, so, RecvOptions{},
        [&](uint16_t port) {
          proxy = std::make_unique<FaultProxy>(port, Fault{.kind = Fault::cut, .at = 2 << 20, .stall_ms = 300});
          return proxy->port();
        },
        nullptr, nullptr, &send_stats);
    ASSERT_TRUE(o.send.committed) << o.send.error;
    ASSERT_TRUE(o.recv.committed) << o.recv.error;
    EXPECT_EQ(o.send.digest, o.recv.digest);
    EXPECT_EQ(send_stats.resumes.load(), 1u);
    EXPECT_GT(send_stats.reread_chunks.load(), 0u) << "nothing was read again";
    EXPECT_EQ(send_stats.reread_chunks.load(), send_stats.replayed_chunks.load());
    EXPECT_GT(src.bytes_read_.load(), size);
  }
}

// Paged frames (lz4 or zstd over a chunk's non-zero pages) that the receiver never got are sent again after
// a resume: kept ones as they were, PAGED flag and all, and those read from the source again raw. The
// transfer commits byte-exact either way.
TEST(Resume, PagedFramesInFlightAreSentAgain) {
  for (const bool sequential : {true, false}) {
    for (const CodecMode codec : {CodecMode::lz4, CodecMode::zstd}) {
      SCOPED_TRACE(std::string(sequential ? "kept" : "read again") +
                   (codec == CodecMode::lz4 ? ", lz4" : ", zstd"));
      const io::ContentGenerator gen(io::Profile::zero_heavy, 12);
      constexpr uint64_t size = 32 << 20;
      CountingSource src(gen, size, sequential);
      auto sink = io::open_emu_sink(gen, size);
      std::unique_ptr<FaultProxy> proxy;
      Stats send_stats, recv_stats;
      SendOptions so{.streams = 1, .chunk_bytes = 256 << 10, .codec = codec};
      so.reconnect_backoff_ms = 20;
      // The path stalls after 256 KiB (a few dozen paged frames), then breaks: what the sender handed over
      // meanwhile never arrived.
      const Outcome o = transfer(
          src, *sink, so, RecvOptions{},
          [&](uint16_t port) {
            proxy = std::make_unique<FaultProxy>(port,
                                                 Fault{.kind = Fault::cut, .at = 256 << 10, .stall_ms = 300});
            return proxy->port();
          },
          nullptr, &recv_stats, &send_stats);
      ASSERT_TRUE(o.send.committed) << o.send.error;
      ASSERT_TRUE(o.recv.committed) << o.recv.error;
      EXPECT_EQ(o.send.digest, o.recv.digest);
      EXPECT_EQ(send_stats.resumes.load(), 1u);
      EXPECT_GT(send_stats.replayed_chunks.load(), 0u) << "nothing was sent again";
      EXPECT_EQ(send_stats.reread_chunks.load(), sequential ? 0u : send_stats.replayed_chunks.load());
      // Every chunk of this state has zero pages among its data: all compressed ones were paged, on both
      // sides; a chunk read again goes raw (and then counts as such on the receiver).
      EXPECT_GT(send_stats.paged_chunks.load(), 0u);
      EXPECT_EQ(send_stats.paged_chunks.load(), send_stats.compressed_chunks.load());
      if (sequential) {
        EXPECT_EQ(recv_stats.paged_chunks.load(), recv_stats.compressed_chunks.load());
        EXPECT_GT(recv_stats.paged_chunks.load(), 0u);
      } else {
        EXPECT_GE(recv_stats.raw_chunks.load(), send_stats.raw_chunks.load() + send_stats.reread_chunks.load())
            << "a chunk read again did not arrive raw";
      }
    }
  }
}

// A stream lost and resumed is logged on both sides (SendOptions::log, RecvOptions::log: the C ABI's and the
// command's log lines), each line on the thread that called send or receive; a transfer without a break logs
// nothing.
TEST(Resume, ALostAndResumedStreamIsLoggedOnTheCallersThread) {
  struct Lines {
    std::mutex mu;
    std::vector<std::string> text;
    std::set<std::thread::id> threads;
    std::function<void(LogLevel, const std::string&)> fn() {
      return [this](LogLevel level, const std::string& line) {
        std::lock_guard lock(mu);
        text.push_back(std::to_string(int(level)) + " " + line);
        threads.insert(std::this_thread::get_id());
      };
    }
    bool has(const std::string& part) {
      std::lock_guard lock(mu);
      for (const std::string& t : text)
        if (t.find(part) != std::string::npos) return true;
      return false;
    }
    std::string all() {
      std::lock_guard lock(mu);
      std::string out;
      for (const std::string& t : text) out += t + " | ";
      return out;
    }
  };
  for (const bool cut : {false, true}) {
    SCOPED_TRACE(cut ? "a stream cut" : "no fault");
    const io::ContentGenerator gen(io::Profile::random, 9);  // stream 1 carries megabytes, uncompressed
    constexpr uint64_t size = 16 << 20;
    auto src = io::open_emu_source(gen, size);
    auto sink = io::open_emu_sink(gen, size);
    Lines sent, received;
    SendOptions so{.streams = 2, .chunk_bytes = 256 << 10};
    so.reconnect_backoff_ms = 20;
    so.log = sent.fn();
    RecvOptions ro;
    ro.log = received.fn();
    io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
    const uint16_t port = io::bound_port(listener.get());
    std::unique_ptr<FaultProxy> proxy;
    if (cut) proxy = std::make_unique<FaultProxy>(port, Fault{.kind = Fault::cut, .connection = 1, .at = 1 << 20});
    Result send_result, recv_result;
    std::thread::id receiving_thread;
    std::thread receiver([&] {
      receiving_thread = std::this_thread::get_id();
      recv_result = receive(*sink, listener.get(), ro, nullptr, nullptr);
    });
    send_result =
        send_to(*src, io::HostPort{"127.0.0.1", proxy ? proxy->port() : port}, so, nullptr, nullptr);
    receiver.join();
    ASSERT_TRUE(send_result.committed) << send_result.error;
    ASSERT_TRUE(recv_result.committed) << recv_result.error;
    if (proxy) {
      ASSERT_TRUE(proxy->fired());
    }
    if (!cut) {
      EXPECT_TRUE(sent.text.empty()) << sent.all();
      EXPECT_TRUE(received.text.empty()) << received.all();
      continue;
    }
    EXPECT_TRUE(sent.has(": connection lost (")) << sent.all();
    EXPECT_TRUE(sent.has("reconnecting (at most 5 attempts)")) << sent.all();
    EXPECT_TRUE(sent.has(": resumed on attempt ")) << sent.all();
    EXPECT_TRUE(received.has("2 stream ")) << received.all();
    EXPECT_TRUE(received.has("ms for the sender to resume it")) << received.all();
    EXPECT_TRUE(received.has(": resumed by the sender after chunk ")) << received.all();
    EXPECT_EQ(sent.threads, std::set<std::thread::id>{std::this_thread::get_id()});
    EXPECT_EQ(received.threads, std::set<std::thread::id>{receiving_thread});
  }
}

// A sequential source's frames stay until acknowledged, and a small replay buffer still commits byte-exact,
// reading the source once:
// - 256K chunks in 4 buffers (the least there is) and a slow sink (2 ms a chunk): the sockets take what the
//   buffers cannot hold, so the worker waits for STREAM_ACKs, woken by the control thread only while it waits
//   (a missed wake-up would cost time, which tests do not measure). One stream: with more, a stream that runs
//   ahead also waits for the others (the window).
// - 16K chunks in a replay buffer of 128K, less than the receiver leaves unacknowledged (a STREAM_ACK per
//   256 KiB: 16 chunks): the sender makes room for that many anyway instead of waiting for an
//   acknowledgement that cannot come (it used to stall until the idle time-out).
TEST(Resume, ASmallReplayBufferStillCommitsByteExact) {
  struct Case {
    uint64_t size;
    uint32_t chunk_bytes;
    uint64_t replay_bytes;
    bool slow_sink;
  };
  for (const Case c : {Case{12 << 20, 256 << 10, 1 << 20, true}, Case{4 << 20, 16 << 10, 128 << 10, false}}) {
    const io::ContentGenerator gen(io::Profile::random, 12);
    CountingSource src(gen, c.size, true);
    auto sink = io::open_emu_sink(gen, c.size);
    HookSink slow(*sink, {.before_write = [] { std::this_thread::sleep_for(std::chrono::milliseconds(2)); }});
    SendOptions so{.streams = 1, .chunk_bytes = c.chunk_bytes, .codec = CodecMode::none};
    so.replay_bytes = c.replay_bytes;
    so.idle_timeout_ms = 5000;
    const Outcome o = transfer(src, c.slow_sink ? static_cast<io::Sink&>(slow) : *sink, so, RecvOptions{});
    ASSERT_TRUE(o.send.committed) << c.chunk_bytes << "-byte chunks: " << o.send.error;
    ASSERT_TRUE(o.recv.committed) << o.recv.error;
    EXPECT_EQ(o.send.digest, o.recv.digest);
    EXPECT_EQ(o.recv.bytes, c.size);
    EXPECT_EQ(src.bytes_read_.load(), c.size);
  }
}

// An emulated source and a sink checking against the same generator, and a listener for the receiver: the
// ends most resume tests start from.
struct EmuEnds {
  EmuEnds(io::Profile profile, uint64_t seed, uint64_t size)
      : gen(profile, seed),
        src(io::open_emu_source(gen, size)),
        sink(io::open_emu_sink(gen, size)),
        listener(io::tcp_listen(io::HostPort{"127.0.0.1", 0})),
        port(io::bound_port(listener.get())) {}
  const io::ContentGenerator gen;
  std::unique_ptr<io::Source> src;
  std::unique_ptr<io::Sink> sink;
  io::Fd listener;
  const uint16_t port;
};

// Both streams break while the sink commits, and the path stays down a while: the receiver, whose stream 0
// is known broken, does not send COMMITTED into the dead connection (which would succeed locally and reach
// no one) but waits for the sender to resume it, and takes the reconnections though it is committing.
TEST(Resume, StreamsBrokenDuringTheCommitAreResumedForCommitted) {
  EmuEnds e(io::Profile::mixed, 13, 4 << 20);
  auto& [gen, src, sink, listener, port] = e;
  FaultProxy proxy(port, Fault{.kind = Fault::cut, .connection = -1, .down_ms = 300});
  std::atomic<bool> stream0_lost{false};
  RecvOptions ro;
  ro.log = [&](LogLevel, const std::string& line) {
    if (line.find("stream 0: ") == 0 && line.find("for the sender to resume it") != std::string::npos)
      stream0_lost = true;
  };
  size_t cut = 0;
  HookSink hooked(*sink, {.after_commit = [&] {
    cut = proxy.cut_all();
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!stream0_lost && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }});
  SendOptions so{.streams = 2};
  so.reconnect_backoff_ms = 20;
  Stats send_stats, recv_stats;
  Result recv;
  std::thread receiver([&] { recv = receive(hooked, listener.get(), ro, &recv_stats, nullptr); });
  const Result send = send_to(*src, io::HostPort{"127.0.0.1", proxy.port()}, so, &send_stats, nullptr);
  receiver.join();
  EXPECT_EQ(cut, 2u);
  EXPECT_TRUE(stream0_lost);
  EXPECT_TRUE(send.committed) << send.error;
  EXPECT_TRUE(recv.committed) << recv.error;
  EXPECT_EQ(send.digest, recv.digest);
  EXPECT_GE(recv_stats.resumes.load(), 1u);
}

// A connection that reaches the receiver's acceptor mid-transfer and says nothing: the transfer completes,
// and the receive returns then, not at that connection's handshake time-out.
TEST(Resume, ASilentConnectionAtTheAcceptorDoesNotHoldTheReceive) {
  EmuEnds e(io::Profile::mixed, 31, 4 << 20);
  auto& [gen, src, sink, listener, port] = e;
  io::Fd silent;
  HookSink hooked(*sink, {.before_write = [&] {
    if (!silent) silent = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
  }});
  RecvOptions ro;
  ro.handshake_timeout_ms = 60000;
  auto receiving =
      std::async(std::launch::async, [&] { return receive(hooked, listener.get(), ro, nullptr, nullptr); });
  const Result send =
      send_to(*src, io::HostPort{"127.0.0.1", port}, SendOptions{.streams = 2}, nullptr, nullptr);
  EXPECT_TRUE(send.committed) << send.error;
  const bool returned = receiving.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  EXPECT_TRUE(returned) << "the receive waits for the silent connection's handshake";
  if (!returned) silent = io::Fd();  // its close lets the receive end
  const Result recv = receiving.get();
  EXPECT_TRUE(recv.committed) << recv.error;
  EXPECT_TRUE(silent);
}

// A stream whose last frames are lost with its connection, after its worker sent its last chunk: the
// receiver's reorder window then waits for them and holds up the other stream, whose chunks never complete.
// The worker waiting for them must reconnect instead of waiting too (until the idle time-out failed both).
TEST(Resume, AStreamBrokenAfterItsLastChunkIsResumedWhileTheOthersWait) {
  const io::ContentGenerator gen(io::Profile::random, 23);
  // 12 chunks: fewer than the sender's window (2 streams x 4 x 2), so that one stream can claim all that
  // are left; small socket buffers all along, so that the other's wait in them.
  constexpr uint32_t chunk = 1 << 20;
  constexpr uint64_t size = 12 * uint64_t(chunk);
  auto src = io::open_emu_source(gen, size);
  auto sink = io::open_emu_sink(gen, size);
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  // Stream 1's bytes from its second chunk on are dropped for 1.5 s, then its connection is cut: meanwhile
  // its worker sends every chunk it can claim into the void, the last ones too.
  FaultProxy proxy(port, Fault{.kind = Fault::cut, .connection = 1, .at = chunk + 4096, .stall_ms = 1500,
                                .buffer_bytes = 64 << 10});
  SendOptions so{.streams = 2, .chunk_bytes = chunk, .codec = CodecMode::none};
  so.reconnect_backoff_ms = 20;
  so.idle_timeout_ms = 5000;
  so.socket.buffer_bytes = 64 << 10;
  RecvOptions ro;
  ro.memory_budget_bytes = 5 << 20;  // a reorder window of two chunks
  ro.socket.buffer_bytes = 64 << 10;
  ro.idle_timeout_ms = 5000;
  Stats send_stats, recv_stats;
  Result recv;
  std::thread receiver([&] { recv = receive(*sink, listener.get(), ro, &recv_stats, nullptr); });
  const Result send = send_to(*src, io::HostPort{"127.0.0.1", proxy.port()}, so, &send_stats, nullptr);
  receiver.join();
  EXPECT_TRUE(proxy.fired());
  EXPECT_TRUE(send.committed) << send.error;
  EXPECT_TRUE(recv.committed) << recv.error;
  EXPECT_EQ(send.digest, recv.digest);
  EXPECT_GE(recv_stats.resumes.load(), 1u);
}

// A stream that breaks during the receiver's commit and is not taken back gives up only after COMMITTED came
// on stream 0: the receiver committed the state, so the sender must report success too (a failure would have
// the caller roll the source back while the destination runs it).
TEST(Resume, AStreamLostAfterCommittedCameDoesNotFailTheSender) {
  EmuEnds e(io::Profile::mixed, 21, 4 << 20);
  auto& [gen, src, sink, listener, port] = e;
  FaultProxy proxy(port, Fault{});  // no fault of its own: the sink's hook cuts stream 1
  std::atomic<bool> cut{false};
  std::atomic<int> reconnects{0};
  HookSink hooked(*sink, {.after_commit = [&] {
    cut = proxy.cut(1);
    // COMMITTED goes once the sender's stream 1 is trying to reconnect.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (reconnects == 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }});
  SendOptions so{.streams = 2};
  so.reconnect_attempts = 1;
  so.reconnect = [&]() -> io::Fd {
    ++reconnects;
    // Long enough for COMMITTED to come on stream 0 meanwhile; then the only attempt fails.
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    throw std::runtime_error("test: no way back");
  };
  Result recv;
  std::thread receiver([&] { recv = receive(hooked, listener.get(), RecvOptions{}, nullptr, nullptr); });
  const Result send = send_to(*src, io::HostPort{"127.0.0.1", proxy.port()}, so, nullptr, nullptr);
  receiver.join();
  EXPECT_TRUE(cut);
  EXPECT_EQ(reconnects.load(), 1);
  EXPECT_TRUE(recv.committed) << recv.error;
  EXPECT_TRUE(send.committed) << send.error;
  EXPECT_EQ(send.digest, recv.digest);
}

// A chunk read again for a resume that no longer matches the hash it was sent with (a file written to during
// the transfer) fails the transfer on both sides, naming the chunk: its bytes are never sent as they are now.
TEST(Resume, AChunkThatChangedBeforeItIsReadAgainFailsTheTransfer) {
  const io::ContentGenerator gen(io::Profile::mixed, 5);
  constexpr uint64_t size = 48 << 20;
  auto src = io::open_emu_source(gen, size);
  // Every chunk from 2 MiB on reads differently the second time: whichever the resume reads again.
  struct Changing final : io::Source {
    io::Source& in;
    explicit Changing(io::Source& s) : in(s) {}
    std::string describe() const override { return "test:changing"; }
    std::optional<uint64_t> size() const override { return in.size(); }
    bool random_access() const override { return true; }
    void read_at(io::Ring& ring, uint64_t offset, std::span<std::byte> out) override {
      in.read_at(ring, offset, out);
      std::lock_guard lock(mu);
      if (offset >= (2 << 20) && !seen.insert(offset).second) out[0] ^= std::byte{0x80};
    }
    std::mutex mu;
    std::set<uint64_t> seen;
  } changing(*src);
  auto sink = io::open_emu_sink(gen, size);
  std::unique_ptr<FaultProxy> proxy;
  SendOptions so{.streams = 1, .chunk_bytes = 256 << 10, .codec = CodecMode::none};
  so.reconnect_backoff_ms = 20;
  const Outcome o = transfer(changing, *sink, so, RecvOptions{}, [&](uint16_t port) {
    proxy = std::make_unique<FaultProxy>(port, Fault{.kind = Fault::cut, .at = 3 << 20, .stall_ms = 300});
    return proxy->port();
  });
  EXPECT_FALSE(o.send.committed);
  EXPECT_FALSE(o.recv.committed);
  EXPECT_EQ(o.send.reason, wire::Reason::source) << o.send.error;
  EXPECT_NE(o.send.error.find("changed since it was sent"), std::string::npos) << o.send.error;
  EXPECT_NE(o.send.error.find("test:changing: chunk "), std::string::npos) << o.send.error;
  EXPECT_NE(o.recv.error.find("changed since it was sent"), std::string::npos) << o.recv.error;
}

// The path stays down: the sender gives up after its attempts, the receiver after its resume time-out, and
// nothing is left at the destination.
TEST(Resume, APathThatStaysDownFailsCleanlyOnBothSides) {
  const test::ScratchDir scratch("dstx-down");
  const fs::path& dir = scratch.path();
  const fs::path out = dir / "out.bin";
  const io::ContentGenerator gen(io::Profile::random, 2);
  auto src = io::open_emu_source(gen, 64 << 20);
  auto sink = open_sink("file:" + out.string());
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  RecvOptions ro;
  ro.resume_timeout_ms = 1500;
  Result recv_result;
  std::thread receiver([&] { recv_result = receive(*sink, listener.get(), ro, nullptr, nullptr); });
  FaultProxy proxy(port, Fault{.kind = Fault::cut, .at = 2 << 20, .down_ms = -1});
  SendOptions so{.streams = 2};
  so.reconnect_attempts = 3;
  so.reconnect_backoff_ms = 20;
  const Result send_result = send_to(*src, io::HostPort{"127.0.0.1", proxy.port()}, so, nullptr, nullptr);
  receiver.join();
  EXPECT_FALSE(send_result.committed);
  EXPECT_EQ(send_result.reason, wire::Reason::connection);
  EXPECT_NE(send_result.error.find("not resumed after 3 attempts"), std::string::npos) << send_result.error;
  EXPECT_FALSE(recv_result.committed);
  // The receiver either waits out its resume time-out, or hears the sender give up on a stream still alive.
  EXPECT_TRUE(recv_result.error.find("not resumed within 1500 ms") != std::string::npos ||
              recv_result.error.find("not resumed after 3 attempts") != std::string::npos)
      << recv_result.error;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out.string() + ".partial"));
}

// A broken stream whose reconnection the receiver refuses (here another receiver, which has no session to
// resume) fails at once with the refusal: one reconnection, not every attempt with its back-off.
TEST(Resume, ARefusedReconnectionFailsAtOnceWithTheRefusal) {
  const io::ContentGenerator gen(io::Profile::random, 3);
  auto src = io::open_emu_source(gen, 64 << 20);
  auto sink = io::open_null_sink();
  auto other_sink = io::open_null_sink();
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  io::Fd other = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t other_port = io::bound_port(other.get());
  RecvOptions ro;
  ro.resume_timeout_ms = 3000;
  RecvOptions other_ro = ro;
  std::mutex log_mu;
  std::string other_log;
  other_ro.log = [&](LogLevel, const std::string& line) {
    std::lock_guard lock(log_mu);
    other_log += line + "\n";
  };
  Result recv_result, other_result;
  std::thread receiver([&] { recv_result = receive(*sink, listener.get(), ro, nullptr, nullptr); });
  std::thread other_receiver(
      [&] { other_result = receive(*other_sink, other.get(), other_ro, nullptr, nullptr); });
  FaultProxy proxy(io::bound_port(listener.get()), Fault{.kind = Fault::cut, .at = 2 << 20, .down_ms = -1});
  SendOptions so{.streams = 2};
  so.reconnect_attempts = 5;
  so.reconnect_backoff_ms = 20;
  std::atomic<int> reconnects{0};
  so.reconnect = [&] {
    ++reconnects;
    return io::tcp_connect(io::HostPort{"127.0.0.1", other_port}, so.socket);
  };
  const Result send_result =
      send(*src, connect_streams(io::HostPort{"127.0.0.1", proxy.port()}, 2, so.socket), so, nullptr, nullptr);
  receiver.join();
  EXPECT_FALSE(send_result.committed);
  EXPECT_EQ(send_result.reason, wire::Reason::connection) << send_result.error;
  EXPECT_NE(send_result.error.find("not taken back: receiver refused (session): no session to resume"),
            std::string::npos)
      << send_result.error;
  EXPECT_EQ(send_result.error.find("attempts"), std::string::npos) << send_result.error;
  EXPECT_EQ(reconnects.load(), 1);
  EXPECT_FALSE(recv_result.committed);
  // The stale resume did not end the other receiver's wait: it takes the transfer it was started for.
  const io::ContentGenerator gen2(io::Profile::mixed, 4);
  auto src2 = io::open_emu_source(gen2, 2 << 20);
  const Result second =
      send_to(*src2, io::HostPort{"127.0.0.1", other_port}, SendOptions{.streams = 2}, nullptr, nullptr);
  other_receiver.join();
  EXPECT_TRUE(second.committed) << second.error;
  EXPECT_TRUE(other_result.committed) << other_result.error;
  EXPECT_EQ(second.digest, other_result.digest);
  std::lock_guard lock(log_mu);
  EXPECT_NE(other_log.find("refused a connection that is not this transfer's: no session to resume"),
            std::string::npos)
      << other_log;
}

TEST(Transfer, ReceiverRefusesAChunkSizeAboveItsLimitAndSaysWhy) {
  const io::ContentGenerator gen(io::Profile::text, 1);
  auto src = io::open_emu_source(gen, 1 << 20);
  auto sink = io::open_null_sink();
  RecvOptions ro;
  ro.max_chunk_bytes = 64 << 10;
  const Outcome o = transfer(*src, *sink, SendOptions{.streams = 2, .chunk_bytes = 1 << 20}, ro);
  EXPECT_FALSE(o.send.committed);
  EXPECT_NE(o.send.error.find("receiver refused"), std::string::npos) << o.send.error;
  EXPECT_NE(o.send.error.find("chunk size"), std::string::npos) << o.send.error;
  EXPECT_EQ(o.send.reason, wire::Reason::chunk_size) << o.send.error;  // the receiver's reason, not protocol
  EXPECT_EQ(o.recv.reason, wire::Reason::chunk_size);
}

TEST(Transfer, ReceiverRefusesASessionThatWouldExceedItsMemoryBudget) {
  auto src = io::open_emu_source(io::ContentGenerator(io::Profile::text, 1), 1 << 20);
  auto sink = io::open_null_sink();
  RecvOptions ro;
  ro.memory_budget_bytes = 16 << 20;
  const Outcome o = transfer(*src, *sink, SendOptions{.streams = 4, .chunk_bytes = 8 << 20}, ro);
  EXPECT_FALSE(o.send.committed);
  EXPECT_NE(o.send.error.find("above this receiver's 16 MiB budget"), std::string::npos) << o.send.error;
  EXPECT_EQ(o.recv.reason, wire::Reason::chunk_size);
}

TEST(Transfer, FitChunkBytesCutsOnlyStatesOfFewerThan512Chunks) {
  EXPECT_EQ(fit_chunk_bytes(1 << 20, 512ull << 20), 1u << 20);
  EXPECT_EQ(fit_chunk_bytes(1 << 20, 8ull << 30), 1u << 20);
  EXPECT_EQ(fit_chunk_bytes(1 << 20, (512ull << 20) - 1), 1u << 20);  // rounded up to a power of two
  EXPECT_EQ(fit_chunk_bytes(1 << 20, 256ull << 20), 512u << 10);
  EXPECT_EQ(fit_chunk_bytes(1 << 20, 100ull << 20), 256u << 10);
  EXPECT_EQ(fit_chunk_bytes(1 << 20, 1 << 20), kMinFitChunkBytes);
  EXPECT_EQ(fit_chunk_bytes(1 << 20, 0), kMinFitChunkBytes);
  EXPECT_EQ(fit_chunk_bytes(16 << 10, 1 << 20), 16u << 10);  // never above the chunk asked for
  EXPECT_EQ(fit_chunk_bytes(16 << 20, 4ull << 30), 8u << 20);
}

TEST(Transfer, SmallStateGoesInSmallerChunksAndTheHelloSaysSo) {
  // 2 MiB + 100 bytes: 64 KiB chunks, the last one short. A receiver that takes at most 64 KiB chunks
  // accepts the sender's default (1 MiB) fitted: the HELLO announces the size used.
  const uint64_t size = (2 << 20) + 100;
  const io::ContentGenerator gen(io::Profile::mixed, 3);
  auto src = io::open_emu_source(gen, size);
  auto sink = io::open_emu_sink(gen, size);
  RecvOptions ro;
  ro.max_chunk_bytes = 64 << 10;
  const Outcome o = transfer(*src, *sink, SendOptions{.streams = 2, .fit_chunks = true}, ro);
  ASSERT_TRUE(o.send.committed) << o.send.error;
  ASSERT_TRUE(o.recv.committed) << o.recv.error;
  EXPECT_EQ(o.send.chunk_bytes, 64u << 10);
  EXPECT_EQ(o.recv.chunk_bytes, 64u << 10);
  EXPECT_EQ(o.send.chunks, 33u);
  EXPECT_EQ(o.recv.bytes, size);
  // Not fitted (the engine's default): 1 MiB, which the receiver refuses.
  auto src2 = io::open_emu_source(gen, size);
  auto sink2 = io::open_null_sink();
  const Outcome refused = transfer(*src2, *sink2, SendOptions{.streams = 2}, ro);
  EXPECT_FALSE(refused.send.committed);
  EXPECT_EQ(refused.recv.reason, wire::Reason::chunk_size);
}

TEST(Transfer, SinkMismatchAbortsBothSidesWithTheSinksReason) {
  auto src = io::open_emu_source(io::ContentGenerator(io::Profile::binary, 1), 4 << 20);
  auto sink = io::open_emu_sink(io::ContentGenerator(io::Profile::binary, 2), 4 << 20);  // other seed
  const Outcome o = transfer(*src, *sink, SendOptions{.streams = 2});
  EXPECT_FALSE(o.send.committed);
  EXPECT_FALSE(o.recv.committed);
  EXPECT_EQ(o.recv.reason, wire::Reason::sink);
  EXPECT_NE(o.recv.error.find("mismatch"), std::string::npos) << o.recv.error;
  EXPECT_NE(o.send.error.find("receiver aborted (sink)"), std::string::npos) << o.send.error;
}

// A HELLO frame (header and payload) as a sender puts it on the wire.
using HelloFrame = std::array<std::byte, wire::kHeaderBytes + wire::kHelloBytes>;
HelloFrame hello_frame(const wire::Hello& h) {
  HelloFrame f;
  wire::encode_header(wire::Header{.type = wire::FrameType::hello, .payload_len = wire::kHelloBytes},
                      std::span<std::byte, wire::kHeaderBytes>(f.data(), wire::kHeaderBytes));
  wire::encode_hello(h,
                     std::span<std::byte, wire::kHelloBytes>(f.data() + wire::kHeaderBytes, wire::kHelloBytes));
  return f;
}

// Port scans and health checks (connect, then close or reset before a byte) while the receiver waits for its
// sender, before its first stream and between two: they are refused and logged, and the transfer goes on.
TEST(Transfer, ConnectionsClosedBeforeTheirFirstByteDoNotEndTheReceive) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  auto probe = [&](bool reset) {
    io::Fd c = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
    if (reset) {
      const linger l{.l_onoff = 1, .l_linger = 0};
      ASSERT_EQ(::setsockopt(c.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l), 0);
    }
  };
  probe(false);
  probe(true);
  std::mutex log_mu;
  std::string log;
  RecvOptions ro;
  ro.log = [&](LogLevel, const std::string& line) {
    std::lock_guard lock(log_mu);
    log += line + "\n";
  };
  const io::ContentGenerator gen(io::Profile::mixed, 9);
  auto src = io::open_emu_source(gen, 2 << 20);
  auto sink = io::open_emu_sink(gen, 2 << 20);
  Result recv;
  std::thread receiver([&] { recv = receive(*sink, listener.get(), ro, nullptr, nullptr); });
  // Stream 0 in, then a probe before stream 1.
  std::vector<io::Fd> conns;
  conns.push_back(io::tcp_connect(io::HostPort{"127.0.0.1", port}, {}));
  probe(false);
  conns.push_back(io::tcp_connect(io::HostPort{"127.0.0.1", port}, {}));
  const Result send = engine::send(*src, std::move(conns), SendOptions{.streams = 2}, nullptr, nullptr);
  receiver.join();
  EXPECT_TRUE(send.committed) << send.error;
  EXPECT_TRUE(recv.committed) << recv.error;
  std::lock_guard lock(log_mu);
  int refused = 0;  // a reset may read as a close, depending on when it came
  const std::string line = "refused a connection that is not this transfer's: peer ";
  for (size_t at = log.find(line); at != std::string::npos; at = log.find(line, at + 1)) {
    ++refused;
  }
  EXPECT_GE(refused, 2) << log;  // the kernel may drop a connection reset while in the backlog
}

// ... unless it is the session's own sender giving up (killed during the handshake): the streams it opened
// have closed too, and the receive ends at once, not at the handshake time-out.
TEST(Transfer, ASenderThatDiesDuringTheHandshakeEndsTheReceiveAtOnce) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  auto sink = io::open_null_sink();
  RecvOptions ro;
  ro.handshake_timeout_ms = 30000;
  auto receiving =
      std::async(std::launch::async, [&] { return receive(*sink, listener.get(), ro, nullptr, nullptr); });
  io::Fd stream0 = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
  const auto hello = hello_frame(wire::Hello{.stream_count = 2, .max_chunk_bytes = 1 << 20, .session_id = 5});
  ASSERT_EQ(send(stream0.get(), hello.data(), hello.size(), MSG_NOSIGNAL), ssize_t(hello.size()));
  io::Fd stream1 = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
  stream0 = io::Fd();  // the sender dies: its streams close, stream 1 before its HELLO
  stream1 = io::Fd();
  const bool ended = receiving.wait_for(std::chrono::seconds(15)) == std::future_status::ready;
  ASSERT_TRUE(ended) << "the receiver waits for the handshake time-out";
  const Result r = receiving.get();
  EXPECT_FALSE(r.committed);
  EXPECT_EQ(r.error, "refused sender: peer closed before HELLO");
}

// A cancel during the handshake is noticed at once on either side, not at the handshake time-out: a receiver
// that never answers the HELLO, a sender that never sends one.
TEST(Transfer, ACancelDuringTheHandshakeEndsItAtOnce) {
  {
    io::Fd silent = io::tcp_listen(io::HostPort{"127.0.0.1", 0});  // completes connections, never answers
    auto src = io::open_emu_source(io::ContentGenerator(io::Profile::mixed, 1), 1 << 20);
    SendOptions so{.streams = 1};
    so.handshake_timeout_ms = 60000;
    const auto r = test::ended_soon_after_cancel([&](const Cancel* cancel) {
      return send_to(*src, io::HostPort{"127.0.0.1", io::bound_port(silent.get())}, so, nullptr, cancel);
    });
    ASSERT_TRUE(r) << "the sender waits on";
    EXPECT_EQ(r->reason, wire::Reason::cancelled) << r->error;
  }
  {
    auto sink = io::open_null_sink();
    RecvOptions ro;
    ro.handshake_timeout_ms = 60000;
    const auto r = test::receive_cancelled_at_a_mute_connection(*sink, ro);
    ASSERT_TRUE(r) << "the receiver waits on";
    EXPECT_EQ(r->reason, wire::Reason::cancelled) << r->error;
    EXPECT_EQ(r->error, "cancelled while waiting for the sender");
  }
}

// ... but the wait stays bounded: its time-out says what it refused.
TEST(Transfer, TheAcceptTimeOutNamesTheConnectionsItRefused) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  { io::Fd c = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {}); }
  auto sink = io::open_null_sink();
  RecvOptions ro;
  ro.accept_timeout_ms = 300;
  const Result r = receive(*sink, listener.get(), ro, nullptr, nullptr);
  EXPECT_FALSE(r.committed);
  EXPECT_EQ(r.reason, wire::Reason::timeout);
  EXPECT_EQ(r.error, "no sender connected within 300 ms (refused 1 other connection, the last: peer closed "
                     "before HELLO)");
}

TEST(Transfer, GarbageInsteadOfAHelloIsRefused) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  auto sink = io::open_null_sink();
  Result r;
  std::thread receiver([&] { r = receive(*sink, listener.get(), RecvOptions{}, nullptr, nullptr); });
  io::Fd c = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
  const std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789012345678901234567890123456789";
  ASSERT_EQ(send(c.get(), junk.data(), junk.size(), MSG_NOSIGNAL), ssize_t(junk.size()));
  receiver.join();
  EXPECT_FALSE(r.committed);
  EXPECT_NE(r.error.find("not a dstx HELLO"), std::string::npos) << r.error;
}

// A peer that starts a handshake frame and then goes silent, connection open: each side gives up at its
// handshake time-out with that reason instead of waiting for the rest for ever.
TEST(Transfer, APartialHandshakeFrameThenSilenceEndsAtTheHandshakeTimeOut) {
  // A silent sender: five bytes of a HELLO header.
  {
    io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
    const uint16_t port = io::bound_port(listener.get());
    auto sink = io::open_null_sink();
    RecvOptions ro;
    ro.handshake_timeout_ms = 300;
    std::promise<Result> done;
    std::thread receiver([&] { done.set_value(receive(*sink, listener.get(), ro, nullptr, nullptr)); });
    io::Fd c = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
    const char start[5] = {'D', 'S', 'T', 'X', 0};
    ASSERT_EQ(send(c.get(), start, sizeof start, MSG_NOSIGNAL), ssize_t(sizeof start));
    auto result = done.get_future();
    const bool ended = result.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    if (!ended) ::shutdown(c.get(), SHUT_RDWR);  // let the receiver go, then fail
    receiver.join();
    ASSERT_TRUE(ended) << "the receiver waited for the rest of the HELLO beyond its time-out";
    const Result r = result.get();
    EXPECT_FALSE(r.committed);
    EXPECT_EQ(r.reason, wire::Reason::timeout) << r.error;
  }
  // A silent receiver: it reads the HELLO, answers five bytes of a frame header and stops.
  {
    io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
    const uint16_t port = io::bound_port(listener.get());
    io::Fd peer;
    std::thread fake([&] {
      peer = io::tcp_accept(listener.get(), 10000, {});
      std::byte hello[wire::kHeaderBytes + wire::kHelloBytes];
      if (peer && recv(peer.get(), hello, sizeof hello, MSG_WAITALL) == ssize_t(sizeof hello)) {
        const char start[5] = {'D', 'S', 'T', 'X', 0};
        (void)send(peer.get(), start, sizeof start, MSG_NOSIGNAL);
      }
    });
    const io::ContentGenerator gen(io::Profile::mixed, 3);
    auto src = io::open_emu_source(gen, 1 << 20);
    SendOptions so;
    so.streams = 1;
    so.handshake_timeout_ms = 300;
    std::promise<Result> done;
    std::thread sender([&] {
      done.set_value(send_to(*src, io::HostPort{"127.0.0.1", port}, so, nullptr, nullptr));
    });
    fake.join();
    auto result = done.get_future();
    const bool ended = result.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    if (!ended && peer) ::shutdown(peer.get(), SHUT_RDWR);
    sender.join();
    ASSERT_TRUE(ended) << "the sender waited for the rest of the answer beyond its time-out";
    const Result r = result.get();
    EXPECT_FALSE(r.committed);
    EXPECT_NE(r.error.find("within 300 ms"), std::string::npos) << r.error;
    EXPECT_EQ(r.reason, wire::Reason::timeout) << r.error;
  }
}

TEST(Transfer, CancelStopsBothSidesAndLeavesNoFile) {
  const test::ScratchDir scratch("dstx-cancel");
  const fs::path& dir = scratch.path();
  const fs::path out = dir / "out.bin";
  auto src =
      io::open_emu_source(io::ContentGenerator(io::Profile::random, 1), 64ull << 30);  // would take minutes
  auto sink = open_sink("file:" + out.string());
  Cancel cancel;
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    cancel.request();
  });
  const Outcome o = transfer(*src, *sink, SendOptions{.streams = 2}, {}, nullptr, &cancel);
  canceller.join();
  EXPECT_FALSE(o.send.committed);
  EXPECT_FALSE(o.recv.committed);
  EXPECT_EQ(o.send.reason, wire::Reason::cancelled);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out.string() + ".partial"));
}

// A commit that takes longer than either side's idle time-out is bounded by the sender's commit time-out
// only: nothing moves on the wire meanwhile, and that is not a stall.
TEST(Transfer, ASlowCommitIsBoundByTheCommitTimeOutNotTheIdleOne) {
  const test::ScratchDir scratch("dstx-slow-commit");
  const fs::path& dir = scratch.path();
  const fs::path out = dir / "out.bin";
  const io::ContentGenerator gen(io::Profile::mixed, 3);
  auto src = io::open_emu_source(gen, 4 << 20);
  auto file = open_sink("file:" + out.string());
  HookSink slow(*file, {.after_commit = [] { std::this_thread::sleep_for(std::chrono::milliseconds(800)); }});
  SendOptions so{.streams = 2};
  so.idle_timeout_ms = 200;
  so.commit_timeout_ms = 20000;
  RecvOptions ro;
  ro.idle_timeout_ms = 200;
  const Outcome o = transfer(*src, slow, so, ro);
  EXPECT_TRUE(o.send.committed) << o.send.error;
  EXPECT_TRUE(o.recv.committed) << o.recv.error;
  EXPECT_TRUE(fs::exists(out));
  // The commit time-out still bounds it.
  const fs::path out2 = dir / "out2.bin";
  auto file2 = open_sink("file:" + out2.string());
  HookSink slower(*file2,
                  {.after_commit = [] { std::this_thread::sleep_for(std::chrono::milliseconds(1500)); }});
  so.commit_timeout_ms = 300;
  const Outcome late = transfer(*src, slower, so, ro);
  EXPECT_FALSE(late.send.committed);
  EXPECT_EQ(late.send.reason, wire::Reason::timeout);
  EXPECT_NE(late.send.error.find("no COMMITTED"), std::string::npos) << late.send.error;
  EXPECT_FALSE(late.recv.committed);
  EXPECT_FALSE(fs::exists(out2));  // committed, then undone: the sender never learnt of it
  EXPECT_FALSE(fs::exists(out2.string() + ".partial"));
}

// A failure while the sink commits (here a cancel on the receiver) undoes the commit: the sender reports
// failure, so nothing at the destination may look complete.
TEST(Transfer, AFailureDuringTheCommitUndoesIt) {
  const test::ScratchDir scratch("dstx-undo-commit");
  const fs::path& dir = scratch.path();
  const fs::path out = dir / "out.bin";
  const io::ContentGenerator gen(io::Profile::mixed, 4);
  auto src = io::open_emu_source(gen, 4 << 20);
  auto file = open_sink("file:" + out.string());
  Cancel cancel;
  bool existed = false;
  HookSink hooked(*file, {.after_commit = [&] {
    existed = fs::exists(out);
    cancel.request();  // the writer checks it before COMMITTED goes
  }});
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  RecvOptions ro;
  ro.accept_timeout_ms = 10000;
  Result recv;
  std::thread receiver([&] { recv = receive(hooked, listener.get(), ro, nullptr, &cancel); });
  const Result send =
      send_to(*src, io::HostPort{"127.0.0.1", port}, SendOptions{.streams = 2}, nullptr, nullptr);
  receiver.join();
  EXPECT_TRUE(existed);  // the commit did happen
  EXPECT_FALSE(recv.committed);
  EXPECT_EQ(recv.reason, wire::Reason::cancelled);
  EXPECT_FALSE(send.committed);
  EXPECT_EQ(send.reason, wire::Reason::cancelled) << send.error;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out.string() + ".partial"));
}

// The cap is a lower bound on duration (a token bucket cannot send faster than its rate plus its burst), so
// this cannot fail on a slow machine.
TEST(Transfer, BandwidthCapHoldsTheRate) {
  const io::ContentGenerator gen(io::Profile::random, 5);
  auto src = io::open_emu_source(gen, 32 << 20);
  auto sink = io::open_emu_sink(gen, 32 << 20);
  SendOptions so{.streams = 2};
  so.bandwidth_bytes_per_second = 64 << 20;
  const auto start = std::chrono::steady_clock::now();
  const Outcome o = transfer(*src, *sink, so);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(o.send.committed) << o.send.error;
  EXPECT_GE(seconds, 0.45);  // 32 MiB at 64 MiB/s is 0.5 s, less the 5 ms burst
}

// A source that notices a cancel while it waits (a device's data_fd that says "try again") ends its read with
// an error: the transfer is reported cancelled, not failed by its source.
TEST(Transfer, ACancelNoticedByTheSourceIsReportedAsACancel) {
  struct Waiting final : io::Source {
    const Cancel& cancel;
    explicit Waiting(const Cancel& c) : cancel(c) {}
    std::string describe() const override { return "test:waiting"; }
    std::optional<uint64_t> size() const override { return 8 << 20; }
    bool random_access() const override { return true; }
    void read_at(io::Ring&, uint64_t, std::span<std::byte>) override {
      while (!cancel.requested()) std::this_thread::sleep_for(std::chrono::microseconds(200));
      throw std::runtime_error("test:waiting: gave up waiting for the device");
    }
  };
  for (int i = 0; i < 5; ++i) {
    Cancel cancel;
    Waiting src(cancel);
    auto sink = io::open_null_sink();
    std::thread canceller([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      cancel.request();
    });
    const Outcome o = transfer(src, *sink, SendOptions{.streams = 2}, {}, nullptr, &cancel);
    canceller.join();
    EXPECT_FALSE(o.send.committed);
    EXPECT_EQ(o.send.reason, wire::Reason::cancelled) << o.send.error;
    // Ours ("cancelled"), or the receiver's, cancelled too, if its ABORTED came first: never the source's.
    EXPECT_EQ(o.send.error.find("gave up waiting"), std::string::npos) << o.send.error;
  }
}

// A stream source whose writer stalls without closing (a pipe nobody writes): the idle time-out fails the
// transfer, and the read waiting on the pipe gives up, so that send() returns and the receiver learns why.
TEST(Transfer, AStalledStreamSourceEndsAtTheIdleTimeOut) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  io::Fd read_end(p[0]), write_end(p[1]);
  auto src = io::open_fd_source(read_end.get(), false, "test:pipe");
  auto sink = io::open_null_sink();
  SendOptions so{.streams = 2};
  so.idle_timeout_ms = 500;
  auto done = std::async(std::launch::async, [&] { return transfer(*src, *sink, so); });
  const bool ended = done.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  EXPECT_TRUE(ended) << "the sender still waits on the pipe";
  if (!ended) write_end = io::Fd();  // the end of stream lets it finish
  const Outcome o = done.get();
  EXPECT_FALSE(o.send.committed);
  EXPECT_EQ(o.send.reason, wire::Reason::timeout) << o.send.error;
  EXPECT_FALSE(o.recv.committed);
  EXPECT_EQ(o.recv.reason, wire::Reason::timeout) << o.recv.error;
  EXPECT_NE(o.recv.error.find("nothing moved for 500 ms"), std::string::npos) << o.recv.error;
}

// Under a cap, a frame may wait for its turn longer than the idle time-out: that wait is not a stall.
TEST(Transfer, AFrameWaitingForTheBandwidthCapIsNotAStall) {
  const io::ContentGenerator gen(io::Profile::random, 8);
  auto src = io::open_emu_source(gen, 4 << 20);
  auto sink = io::open_emu_sink(gen, 4 << 20);
  SendOptions so{.streams = 1, .chunk_bytes = 1 << 20, .codec = CodecMode::none};
  so.bandwidth_bytes_per_second = 2 << 20;  // a frame every 0.5 s
  so.idle_timeout_ms = 400;
  const Outcome o = transfer(*src, *sink, so);
  EXPECT_TRUE(o.send.committed) << o.send.error;
  EXPECT_TRUE(o.recv.committed) << o.recv.error;
}

// A stream source whose writer is slow but alive (4 KiB every 100 ms, far from a 1 MiB chunk within the idle
// time-out): its bytes go out as they come, in short chunks, and the transfer completes.
TEST(Transfer, ASlowStreamSourceIsNotAStall) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  io::Fd read_end(p[0]);
  auto src = io::open_fd_source(read_end.get(), false, "test:pipe");
  auto sink = io::open_null_sink();
  std::thread writer([w = io::Fd(p[1])] {
    const std::string piece(4096, 'd');
    for (int i = 0; i < 32; ++i) {
      ASSERT_EQ(::write(w.get(), piece.data(), piece.size()), ssize_t(piece.size()));
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  SendOptions so{.streams = 1, .chunk_bytes = 1 << 20};
  so.idle_timeout_ms = 1500;  // the whole 128 KiB takes 3.2 s: no chunk of 1 MiB would go out in time
  RecvOptions ro;
  ro.idle_timeout_ms = 1500;
  const Outcome o = transfer(*src, *sink, so, ro);
  writer.join();
  EXPECT_TRUE(o.send.committed) << o.send.error;
  EXPECT_TRUE(o.recv.committed) << o.recv.error;
  EXPECT_EQ(o.recv.bytes, 32u * 4096);
  EXPECT_EQ(o.send.digest, o.recv.digest);
}

// A cap so low that each frame waits its turn for many seconds: a cancel still ends the transfer at once,
// not after the frames already scheduled.
TEST(Transfer, ACancelEndsAWaitForALowBandwidthCap) {
  const io::ContentGenerator gen(io::Profile::random, 6);
  auto src = io::open_emu_source(gen, 16 << 20);
  auto sink = io::open_emu_sink(gen, 16 << 20);
  SendOptions so{.streams = 2};
  so.bandwidth_bytes_per_second = 16 << 10;  // 1 MiB chunks: a minute per frame
  Cancel cancel;
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    cancel.request();
  });
  auto done = std::async(std::launch::async, [&] { return transfer(*src, *sink, so, {}, nullptr, &cancel); });
  const bool ended = done.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  EXPECT_TRUE(ended) << "the sender still waits for its turn";
  const Outcome o = done.get();
  canceller.join();
  EXPECT_FALSE(o.send.committed);
  EXPECT_FALSE(o.recv.committed);
  EXPECT_EQ(o.send.reason, wire::Reason::cancelled) << o.send.error;
}

TEST(Transfer, ReceiverMemoryIsBoundedIndependentOfStateSize) {
  // The reorder window is sized from the budget, not from the transfer.
  const io::ContentGenerator gen(io::Profile::random, 5);
  auto src = io::open_emu_source(gen, 64 << 20);
  auto sink = io::open_emu_sink(gen, 64 << 20);
  RecvOptions ro;
  ro.memory_budget_bytes = 8 << 20;  // tiny: the transfer still completes, just with a small window
  const Outcome o = transfer(*src, *sink, SendOptions{.streams = 4}, ro);
  EXPECT_TRUE(o.send.committed) << o.send.error;
  EXPECT_TRUE(o.recv.committed) << o.recv.error;
}

}  // namespace
}  // namespace dstx::engine

namespace dstx::engine {
namespace {

// A peer that completes the handshake and then goes silent (a stopped process: its kernel still ACKs).
// The receiver's verdict: a failure reported while COMMITTED is being sent waits for the send. Sent, the
// transfer has succeeded and later failures are dropped; not sent, the held failure is the transfer's.
TEST(Failure, AFailureDuringADeliveryIsHeldUntilItsOutcome) {
  Failure sent;
  EXPECT_TRUE(sent.seal_unless_failed([&] {
    EXPECT_FALSE(sent.set(wire::Reason::cancelled, "cancelled"));  // does not wait for the delivery
    EXPECT_FALSE(sent.failed());
    return true;
  }));
  EXPECT_FALSE(sent.failed());
  EXPECT_FALSE(sent.set(wire::Reason::connection, "later"));
  EXPECT_FALSE(sent.failed());

  Failure lost;
  EXPECT_FALSE(lost.seal_unless_failed([&] {
    lost.set(wire::Reason::connection, "stream 1 broke");
    lost.set(wire::Reason::timeout, "a second one");
    lost.set(wire::Reason::cancelled, "the peer's reason", /*from_peer=*/true);  // explains the break
    return false;
  }));
  EXPECT_TRUE(lost.failed());
  EXPECT_EQ(lost.reason(), wire::Reason::cancelled);
  EXPECT_EQ(lost.text(), "the peer's reason");
  EXPECT_TRUE(lost.from_peer());

  Failure quiet;  // not delivered, nothing held: nothing recorded (the caller reports its own failure)
  EXPECT_FALSE(quiet.seal_unless_failed([] { return false; }));
  EXPECT_FALSE(quiet.failed());

  Failure before;
  before.set(wire::Reason::sink, "sink");
  bool ran = false;
  EXPECT_FALSE(before.seal_unless_failed([&] { return ran = true; }));
  EXPECT_FALSE(ran);
  EXPECT_EQ(before.reason(), wire::Reason::sink);
}

TEST(Transfer, AStalledSenderIsNoticedByTheIdleTimeOut) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  auto sink = io::open_null_sink();
  RecvOptions ro;
  ro.idle_timeout_ms = 300;
  Result r;
  std::thread receiver([&] { r = receive(*sink, listener.get(), ro, nullptr, nullptr); });
  io::Fd c = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
  const auto hello = hello_frame(wire::Hello{.max_chunk_bytes = 1 << 20, .session_id = 9});
  ASSERT_EQ(send(c.get(), hello.data(), hello.size(), MSG_NOSIGNAL), ssize_t(hello.size()));
  receiver.join();  // returns only because the idle time-out fired
  EXPECT_FALSE(r.committed);
  EXPECT_EQ(r.reason, wire::Reason::timeout);
  EXPECT_NE(r.error.find("stalled sender"), std::string::npos) << r.error;
}

// A sink that stops taking bytes (a pipe whose reader stopped reading) stalls the receiver: its idle
// time-out names the sink, and the sender learns that at once, though the receiver's writer stays blocked
// in the sink until the reader wakes.
TEST(Transfer, ABlockedSinkIsNamedAndTheSenderToldWhileTheWriterWaits) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  io::Fd read_end(fds[0]);
  auto sink = io::open_fd_sink(fds[1], /*owned=*/true, "fd:pipe");
  auto src = io::open_emu_source(io::ContentGenerator(io::Profile::random, 2), 64 << 20);
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  RecvOptions ro;
  ro.idle_timeout_ms = 300;
  Result recv;
  std::thread receiver([&] { recv = receive(*sink, listener.get(), ro, nullptr, nullptr); });
  SendOptions so{.streams = 2};
  so.idle_timeout_ms = 60000;  // only the receiver's verdict can end it soon
  const Result send = send_to(*src, io::HostPort{"127.0.0.1", port}, so, nullptr, nullptr);
  EXPECT_FALSE(send.committed);
  EXPECT_EQ(send.reason, wire::Reason::timeout);
  EXPECT_NE(send.error.find("fd:pipe took no bytes for 300 ms"), std::string::npos) << send.error;
  // The reader wakes: the writer gets out, and the receiver ends with the same reason.
  std::thread reader([&] {
    std::vector<char> buf(1 << 16);
    while (::read(read_end.get(), buf.data(), buf.size()) > 0) {
    }
  });
  receiver.join();
  sink.reset();  // the write end: the reader sees the end
  reader.join();
  EXPECT_FALSE(recv.committed);
  EXPECT_EQ(recv.reason, wire::Reason::timeout);
  EXPECT_NE(recv.error.find("fd:pipe took no bytes"), std::string::npos) << recv.error;
}

TEST(Transfer, AStalledReceiverIsNoticedByTheIdleTimeOut) {
  // 1 GiB does not fit in the socket buffers; 64 KiB does, and is all handed to the kernel at once: the idle
  // time-out still applies (only the receiver's ACK of every chunk turns it off, for its sink's commit).
  for (const uint64_t size : {1ull << 30, 64ull << 10}) {
    SCOPED_TRACE(size);
    io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
    const uint16_t port = io::bound_port(listener.get());
    std::atomic<bool> done{false};
    std::thread fake([&] {
      io::Fd c;
      while (!c) c = io::tcp_accept(listener.get(), 100, {});
      std::array<std::byte, wire::kHeaderBytes + wire::kHelloBytes> buf;
      ASSERT_EQ(recv(c.get(), buf.data(), buf.size(), MSG_WAITALL), ssize_t(buf.size()));
      wire::Hello h;
      ASSERT_EQ(wire::decode_hello(std::span<const std::byte, wire::kHelloBytes>(
                                       buf.data() + wire::kHeaderBytes, wire::kHelloBytes),
                                   &h),
                wire::Error::ok);
      h.capabilities &= wire::kCapLz4;
      wire::encode_header(wire::Header{.type = wire::FrameType::hello_ack, .payload_len = wire::kHelloBytes},
                          std::span<std::byte, wire::kHeaderBytes>(buf.data(), wire::kHeaderBytes));
      wire::encode_hello(
          h, std::span<std::byte, wire::kHelloBytes>(buf.data() + wire::kHeaderBytes, wire::kHelloBytes));
      ASSERT_EQ(send(c.get(), buf.data(), buf.size(), MSG_NOSIGNAL), ssize_t(buf.size()));
      while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(10));  // never reads again
    });
    auto src = io::open_emu_source(io::ContentGenerator(io::Profile::random, 1), size);
    SendOptions so{.streams = 1};
    so.idle_timeout_ms = 300;
    so.commit_timeout_ms = 60000;
    const Result r = send_to(*src, io::HostPort{"127.0.0.1", port}, so, nullptr, nullptr);
    done = true;
    fake.join();
    EXPECT_FALSE(r.committed);
    EXPECT_EQ(r.reason, wire::Reason::timeout);
    EXPECT_NE(r.error.find("stalled receiver"), std::string::npos) << r.error;
  }
}

}  // namespace
}  // namespace dstx::engine

namespace dstx::engine {
namespace {

// A hand-driven sender: handshake on one stream, then whatever frames a test crafts.
class RawSender {
 public:
  explicit RawSender(uint16_t port, uint32_t chunk = 4096, uint64_t caps = wire::kCapLz4) : chunk_(chunk) {
    fd_ = io::tcp_connect(io::HostPort{"127.0.0.1", port}, {});
    std::vector<std::byte> hello(wire::kHelloBytes);
    wire::encode_hello(wire::Hello{.max_chunk_bytes = chunk, .session_id = 77, .capabilities = caps},
                       std::span<std::byte, wire::kHelloBytes>(hello.data(), wire::kHelloBytes));
    frame(wire::Header{.type = wire::FrameType::hello, .payload_len = wire::kHelloBytes}, hello);
    std::array<std::byte, wire::kHeaderBytes + wire::kHelloBytes> ack;
    ok_ = recv(fd_.get(), ack.data(), ack.size(), MSG_WAITALL) == ssize_t(ack.size());
  }
  bool ok() const { return ok_; }
  void frame(const wire::Header& h, std::span<const std::byte> payload = {}) {
    std::vector<std::byte> buf(wire::kHeaderBytes);
    wire::encode_header(h, std::span<std::byte, wire::kHeaderBytes>(buf.data(), wire::kHeaderBytes));
    buf.insert(buf.end(), payload.begin(), payload.end());
    send(fd_.get(), buf.data(), buf.size(), MSG_NOSIGNAL);
  }
  // A raw DATA frame for `data`, with the right hash unless told otherwise.
  void data(uint64_t seq, uint64_t offset, std::span<const std::byte> bytes, bool send_payload = true) {
    const wire::Header h{.type = wire::FrameType::data,
                         .seq = seq,
                         .offset = offset,
                         .raw_len = uint32_t(bytes.size()),
                         .payload_len = uint32_t(bytes.size()),
                         .hash = compress::hash64(bytes.data(), bytes.size())};
    frame(h, send_payload ? bytes : std::span<const std::byte>());
  }
  // A DATA frame of `bytes` encoded with `codec` (compress::encode_chunk; zero detection off).
  void encoded(uint64_t seq, uint64_t offset, std::span<const std::byte> bytes, compress::Codec codec) {
    std::vector<std::byte> out(compress::encode_bound(compress::Codec::sparse, bytes.size()));
    const compress::EncodeResult e =
        compress::encode_chunk(compress::EncodeOptions{.codec = codec, .detect_zero = false, .probe_incompressible = false}, bytes, out);
    ASSERT_EQ(e.codec, codec);
    frame(wire::Header{.type = wire::FrameType::data,
                       .codec = uint8_t(e.codec),
                       .seq = seq,
                       .offset = offset,
                       .raw_len = uint32_t(bytes.size()),
                       .payload_len = e.encoded_len,
                       .hash = e.hash},
          std::span(out.data(), e.encoded_len));
  }
  void close() { fd_.reset(); }

 private:
  uint32_t chunk_;
  io::Fd fd_;
  bool ok_ = false;
};

// Runs a receiver into `into` (default: a null sink) and lets `script` drive a RawSender of `chunk`-byte
// chunks offering `caps`; returns the receiver's result.
Result against_receiver(const std::function<void(RawSender&)>& script, io::Sink* into = nullptr,
                        uint32_t chunk = 4096, Stats* stats = nullptr, uint64_t caps = wire::kCapLz4) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  auto null_sink = io::open_null_sink();
  io::Sink& sink = into ? *into : *null_sink;
  RecvOptions ro;
  ro.idle_timeout_ms = 5000;
  Result r;
  std::thread receiver([&] { r = receive(sink, listener.get(), ro, stats, nullptr); });
  {
    RawSender s(port, chunk, caps);
    EXPECT_TRUE(s.ok());
    script(s);
    receiver.join();
  }
  return r;
}

std::vector<std::byte> page(uint8_t fill) {
  return std::vector<std::byte>(4096, std::byte{fill});
}

TEST(ReceiverStateMachine, AcceptsAWellFormedHandDrivenStream) {
  const auto a = page(1), b = page(2);
  const Result r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a);
    s.data(2, 4096, b);
    wire::StreamDigest d;
    d.add(1, 4096, compress::hash64(a.data(), a.size()));
    d.add(2, 4096, compress::hash64(b.data(), b.size()));
    s.frame(wire::make_end(2, 8192, d.value()));
  });
  EXPECT_TRUE(r.committed) << r.error;
}

TEST(ReceiverStateMachine, RejectsADuplicateOrReorderedSequenceNumberOnAStream) {
  const auto a = page(1);
  const Result r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a);
    s.data(1, 0, a);
  });
  EXPECT_EQ(r.reason, wire::Reason::protocol);
  EXPECT_NE(r.error.find("duplicate or out of order"), std::string::npos) << r.error;
}

TEST(ReceiverStateMachine, NoticesASequenceGap) {
  const auto a = page(1);
  const Result r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a);
    s.data(3, 8192, a);
    s.frame(wire::make_end(3, 12288, 0));
  });
  EXPECT_EQ(r.reason, wire::Reason::protocol);
  EXPECT_NE(r.error.find("chunk 2 never arrived"), std::string::npos) << r.error;
}

TEST(ReceiverStateMachine, RejectsAChunkAtTheWrongOffset) {
  const auto a = page(1);
  const Result r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a);
    s.data(2, 5000, a);
  });
  EXPECT_EQ(r.reason, wire::Reason::protocol);
  EXPECT_NE(r.error.find("claims offset 5000, expected 4096"), std::string::npos) << r.error;
}

TEST(ReceiverStateMachine, RejectsAWrongDigestAndWrongCounts) {
  const auto a = page(1);
  Result r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a);
    s.frame(wire::make_end(1, 4096, 12345));
  });
  EXPECT_EQ(r.reason, wire::Reason::digest);
  EXPECT_NE(r.error.find("digest mismatch"), std::string::npos) << r.error;
  r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a);
    s.frame(wire::make_end(1, 9999, 0));
  });
  EXPECT_EQ(r.reason, wire::Reason::digest);
  EXPECT_NE(r.error.find("END says 9999 bytes"), std::string::npos) << r.error;
  r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a);
    s.data(2, 4096, a);
    s.frame(wire::make_end(1, 4096, 0));  // fewer chunks than were sent
  });
  EXPECT_EQ(r.reason, wire::Reason::protocol);
  EXPECT_NE(r.error.find("beyond END"), std::string::npos) << r.error;
}

TEST(ReceiverStateMachine, RejectsAChunkWhoseBytesDoNotMatchItsHash) {
  auto a = page(1);
  const Result r = against_receiver([&](RawSender& s) {
    const wire::Header h{.type = wire::FrameType::data,
                         .seq = 1,
                         .raw_len = 4096,
                         .payload_len = 4096,
                         .hash = compress::hash64(a.data(), a.size()) ^ 1};
    s.frame(h, a);
  });
  EXPECT_EQ(r.reason, wire::Reason::checksum);
  EXPECT_NE(r.error.find("do not match their chunk hash"), std::string::npos) << r.error;
}

TEST(ReceiverStateMachine, RejectsAChunkLargerThanNegotiated) {
  const std::vector<std::byte> big(8192, std::byte{3});  // negotiated 4096
  const Result r = against_receiver([&](RawSender& s) { s.data(1, 0, big); });
  EXPECT_EQ(r.reason, wire::Reason::protocol);
  EXPECT_NE(r.error.find("frame length out of bounds"), std::string::npos) << r.error;
}

TEST(ReceiverStateMachine, ATruncatedFrameIsAConnectionFailure) {
  const auto a = page(1);
  const Result r = against_receiver([&](RawSender& s) {
    s.data(1, 0, a, /*send_payload=*/false);
    s.close();
  });
  EXPECT_EQ(r.reason, wire::Reason::connection);
  EXPECT_NE(r.error.find("inside chunk 1"), std::string::npos) << r.error;
}

TEST(ReceiverStateMachine, ASenderAbortCarriesItsReason) {
  const std::string why = "source device fell over";
  const Result r = against_receiver([&](RawSender& s) {
    s.frame(wire::make_aborted(wire::Reason::source, why.size()), std::as_bytes(std::span(why)));
  });
  EXPECT_EQ(r.reason, wire::Reason::source);
  EXPECT_NE(r.error.find("sender aborted (source): source device fell over"), std::string::npos) << r.error;
}

// Sparse chunks (zero pages left out on the wire) are verified as they came and kept packed in the reorder
// window: a sink that takes pieces gets their present pages and zero runs, any other sink the expanded chunk,
// and both the same bytes. Zero pages single and in runs, at a chunk's start and end, a short last page, and
// a sparse payload larger than a chunk (every page present: valid, if pointless), which takes the decode
// buffer instead.
TEST(ReceiverStateMachine, SparseChunksReachEveryKindOfSinkExactly) {
  constexpr size_t kPage = 4096, kChunk = 16 * kPage;
  const size_t size = 6 * kChunk + kPage + 1000;  // 7 chunks, the last of a page and 1000 bytes
  std::vector<std::byte> state(size);
  std::mt19937_64 rng(11);
  for (auto& b : state) b = std::byte(rng());
  for (size_t page = 0; page * kPage < size; ++page) {
    const size_t in_chunk = page % 16;
    const bool zero = (page < 64 && (in_chunk == 0 || (in_chunk >= 5 && in_chunk <= 7) || in_chunk == 15)) ||
                      (page >= 80 && page % 2 == 0);
    if (zero) std::memset(state.data() + page * kPage, 0, std::min(kPage, size - page * kPage));
  }
  // Chunk 5 (pages 64..79) has no zero page: sent sparse with every page present.
  auto script = [&](RawSender& s) {
    wire::StreamDigest d;
    uint64_t seq = 0;
    for (size_t off = 0; off < size; off += kChunk) {
      const auto bytes = std::span<const std::byte>(state).subspan(off, std::min(kChunk, size - off));
      ++seq;
      if (off == 4 * kChunk) {
        std::vector<std::byte> payload(compress::sparse_bitmap_bytes(bytes.size()), std::byte{0xff});
        payload.insert(payload.end(), bytes.begin(), bytes.end());
        s.frame(wire::Header{.type = wire::FrameType::data,
                             .codec = uint8_t(compress::Codec::sparse),
                             .seq = seq,
                             .offset = off,
                             .raw_len = uint32_t(bytes.size()),
                             .payload_len = uint32_t(payload.size()),
                             .hash = compress::hash64(bytes.data(), bytes.size())},
                payload);
      } else {
        s.encoded(seq, off, bytes, compress::Codec::sparse);
      }
      d.add(seq, uint32_t(bytes.size()), compress::hash64(bytes.data(), bytes.size()));
    }
    s.frame(wire::make_end(seq, size, d.value()));
  };
  for (const bool pieces : {true, false}) {
    SCOPED_TRACE(pieces ? "a sink that takes pieces" : "a sink that takes whole chunks");
    MemorySink sink(pieces);
    Stats stats;
    const Result r = against_receiver(script, &sink, kChunk, &stats);
    ASSERT_TRUE(r.committed) << r.error;
    EXPECT_TRUE(sink.committed_);
    EXPECT_TRUE(sink.bytes_ == state);
    EXPECT_EQ(stats.codec_chunks[unsigned(compress::Codec::sparse)].load(), 7u);
    if (pieces) {
      // Zero runs: 3 in each of chunks 1-4, 8 in chunk 6 (pages 80, 82, ... 94), 1 in chunk 7 (page 96).
      EXPECT_EQ(sink.zero_writes_, 4u * 3 + 8 + 1);
    } else {
      EXPECT_EQ(sink.zero_writes_, 0u);
      EXPECT_EQ(sink.writes_, 7u);
    }
  }
  // A file sink.
  const test::ScratchDir scratch("dstx-sparse");
  const fs::path& dir = scratch.path();
  auto file = open_sink("file:" + (dir / "out").string());
  const Result r = against_receiver(script, file.get(), kChunk);
  ASSERT_TRUE(r.committed) << r.error;
  std::ifstream in(dir / "out", std::ios::binary);
  const std::vector<char> got((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(got.size(), size);
  EXPECT_TRUE(got.size() == size && std::memcmp(got.data(), state.data(), size) == 0);
}

// The header of a sparse DATA frame for chunk 1 (offset 0).
wire::Header first_sparse_chunk(size_t raw_len, uint32_t payload_len, uint64_t hash) {
  return wire::Header{.type = wire::FrameType::data,
                      .codec = uint8_t(compress::Codec::sparse),
                      .seq = 1,
                      .raw_len = uint32_t(raw_len),
                      .payload_len = payload_len,
                      .hash = hash};
}

// A packed sparse payload is checked like a decoded one: a bitmap that does not add up, and pages that do not
// hash to the header's XXH3, fail the transfer naming the chunk; nothing reaches the sink.
TEST(ReceiverStateMachine, RejectsMalformedSparseChunks) {
  constexpr size_t kChunk = 4 * 4096;
  std::vector<std::byte> bytes(kChunk, std::byte{7});
  std::memset(bytes.data() + 4096, 0, 4096);
  std::vector<std::byte> out(compress::encode_bound(compress::Codec::sparse, kChunk));
  const compress::EncodeResult e =
      compress::encode_chunk(compress::EncodeOptions{.codec = compress::Codec::sparse}, bytes, out);
  ASSERT_EQ(e.codec, compress::Codec::sparse);
  out.resize(e.encoded_len);
  auto header = [&](uint32_t payload_len, uint64_t hash) {
    return first_sparse_chunk(kChunk, payload_len, hash);
  };
  MemorySink sink(true);
  Result r = against_receiver([&](RawSender& s) { s.frame(header(e.encoded_len, e.hash ^ 1), out); }, &sink,
                              kChunk);
  EXPECT_EQ(r.reason, wire::Reason::checksum);
  EXPECT_NE(r.error.find("chunk 1 at offset 0: decoded bytes do not match their chunk hash"),
            std::string::npos)
      << r.error;
  auto bad = out;
  bad[0] |= std::byte{1u << 1};  // the zero page marked present: the pages no longer fill the payload
  r = against_receiver([&](RawSender& s) { s.frame(header(e.encoded_len, e.hash), bad); }, &sink, kChunk);
  EXPECT_EQ(r.reason, wire::Reason::checksum);
  EXPECT_NE(r.error.find("encoded length impossible"), std::string::npos) << r.error;
  EXPECT_TRUE(sink.bytes_.empty());
}

// With page hashes agreed (capability bit 5), a sparse chunk is verified against the hash of its pages,
// bitmap and length: the right one commits; the bytes' XXH3-64 does not; and a form that marks the zero page
// present is corrupt even when its hash is computed over that form (a sender could not make it honestly).
TEST(ReceiverStateMachine, WithPageHashesASparseChunkCountsInItsOwnFormOnly) {
  constexpr size_t kChunk = 4 * 4096;
  const uint64_t caps = wire::kCapLz4 | wire::kCapPageHash;
  std::vector<std::byte> bytes(kChunk, std::byte{7});
  std::memset(bytes.data() + 4096, 0, 4096);
  std::vector<std::byte> out(compress::encode_bound(compress::Codec::sparse, kChunk));
  const compress::EncodeOptions pages{.codec = compress::Codec::sparse, .hash = compress::HashForm::pages};
  const compress::EncodeResult e = compress::encode_chunk(pages, bytes, out);
  ASSERT_EQ(e.codec, compress::Codec::sparse);
  ASSERT_EQ(e.hash, compress::chunk_hash(compress::HashForm::pages, bytes));
  out.resize(e.encoded_len);
  auto header = [&](uint32_t payload_len, uint64_t hash) {
    return first_sparse_chunk(kChunk, payload_len, hash);
  };
  for (const bool pieces : {true, false}) {
    MemorySink sink(pieces);
    const Result r = against_receiver(
        [&](RawSender& s) {
          s.frame(header(e.encoded_len, e.hash), out);
          wire::StreamDigest d;
          d.add(1, kChunk, e.hash);
          s.frame(wire::make_end(1, kChunk, d.value()));
        },
        &sink, kChunk, nullptr, caps);
    ASSERT_TRUE(r.committed) << r.error;
    EXPECT_TRUE(sink.bytes_ == bytes);
  }
  MemorySink sink(true);
  const uint64_t raw_hash = compress::hash64(bytes.data(), bytes.size());
  Result r = against_receiver([&](RawSender& s) { s.frame(header(e.encoded_len, raw_hash), out); }, &sink,
                              kChunk, nullptr, caps);
  EXPECT_EQ(r.reason, wire::Reason::checksum);
  EXPECT_NE(r.error.find("do not match their chunk hash"), std::string::npos) << r.error;
  // Every page present, the zero one too, hashed as that form would be.
  std::vector<std::byte> marked(1 + kChunk, std::byte{0x0f});
  std::copy(bytes.begin(), bytes.end(), marked.begin() + 1);
  std::vector<std::byte> form(bytes.begin(), bytes.end());
  form.push_back(std::byte{0x0f});
  for (size_t i = 0; i < 8; ++i) form.push_back(std::byte(uint64_t(kChunk) >> (8 * i)));
  for (const uint64_t hash : {compress::hash64(form.data(), form.size()), e.hash}) {
    r = against_receiver([&](RawSender& s) { s.frame(header(uint32_t(marked.size()), hash), marked); }, &sink,
                         kChunk, nullptr, caps);
    EXPECT_EQ(r.reason, wire::Reason::checksum);
    EXPECT_NE(r.error.find("corrupt payload"), std::string::npos) << r.error;
  }
  EXPECT_TRUE(sink.bytes_.empty());
}

// A paged chunk is checked like a sparse one, and its sparse length must be what the payload decodes to: a
// wrong aux, a bitmap that does not add up, a wrong hash each fail the transfer naming the chunk.
TEST(ReceiverStateMachine, RejectsMalformedPagedChunks) {
  constexpr size_t kChunk = 8 * 4096;
  const io::ContentGenerator gen(io::Profile::text, 2);
  std::vector<std::byte> bytes(kChunk);
  gen.fill(0, bytes);
  std::memset(bytes.data() + 4096, 0, 4096);
  compress::EncodeOptions opts{.codec = compress::Codec::lz4, .probe_incompressible = false, .paged = true};
  std::vector<std::byte> out(compress::encode_bound(compress::Codec::lz4, kChunk));
  std::vector<std::byte> scratch(compress::paged_scratch_bytes(kChunk));
  const compress::EncodeResult e = compress::encode_chunk(opts, bytes, out, scratch);
  ASSERT_GT(e.paged_len, 0u);
  out.resize(e.encoded_len);
  auto header = [&](uint32_t aux, uint32_t payload_len, uint64_t hash) {
    return wire::Header{.type = wire::FrameType::data,
                        .codec = uint8_t(compress::Codec::lz4),
                        .flags = wire::kFlagPaged,
                        .seq = 1,
                        .raw_len = uint32_t(kChunk),
                        .payload_len = payload_len,
                        .hash = hash,
                        .aux = aux};
  };
  for (const bool pieces : {true, false}) {
    MemorySink sink(pieces);
    Result r = against_receiver(
        [&](RawSender& s) {
          s.frame(header(e.paged_len, e.encoded_len, e.hash), out);
          s.frame(wire::make_end(1, kChunk, [&] {
            wire::StreamDigest d;
            d.add(1, kChunk, e.hash);
            return d.value();
          }()));
        },
        &sink, kChunk);
    ASSERT_TRUE(r.committed) << r.error;  // the well-formed one commits
    EXPECT_TRUE(sink.bytes_ == bytes);
  }
  MemorySink sink(true);
  Result r = against_receiver(
      [&](RawSender& s) { s.frame(header(e.paged_len - 1, e.encoded_len, e.hash), out); }, &sink, kChunk);
  EXPECT_EQ(r.reason, wire::Reason::checksum);
  EXPECT_NE(r.error.find("chunk 1 at offset 0: corrupt payload"), std::string::npos) << r.error;
  r = against_receiver([&](RawSender& s) { s.frame(header(e.paged_len, e.encoded_len, e.hash ^ 1), out); },
                       &sink, kChunk);
  EXPECT_EQ(r.reason, wire::Reason::checksum);
  EXPECT_NE(r.error.find("decoded bytes do not match their chunk hash"), std::string::npos) << r.error;
  // A sparse form whose bitmap marks the zero page present, compressed and sent as paged.
  std::vector<std::byte> sparse(e.paged_len);
  ASSERT_EQ(compress::decode_paged(compress::Codec::lz4, out, sparse, kChunk), compress::DecodeError::ok);
  sparse[0] |= std::byte{1u << 1};
  std::vector<std::byte> bad(compress::encode_bound(compress::Codec::lz4, sparse.size()));
  const compress::EncodeResult b = compress::encode_chunk(
      compress::EncodeOptions{.codec = compress::Codec::lz4, .probe_incompressible = false}, sparse, bad);
  ASSERT_EQ(b.codec, compress::Codec::lz4);
  bad.resize(b.encoded_len);
  r = against_receiver([&](RawSender& s) { s.frame(header(e.paged_len, b.encoded_len, e.hash), bad); }, &sink,
                       kChunk);
  EXPECT_EQ(r.reason, wire::Reason::checksum);
  EXPECT_NE(r.error.find("encoded length impossible"), std::string::npos) << r.error;
  EXPECT_TRUE(sink.bytes_.empty());
}

}  // namespace
}  // namespace dstx::engine
