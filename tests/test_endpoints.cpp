#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "io/content.h"
#include "io/endpoints.h"
#include "io/ring.h"
#include "scratch_dir.h"

namespace dstx::io {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;

Bytes generate(const ContentGenerator& gen, uint64_t offset, size_t len) {
  Bytes out(len);
  gen.fill(offset, out);
  return out;
}

void write_file(const std::string& path, const Bytes& data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::write(fd, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  ::close(fd);
}

Bytes read_file(const std::string& path) {
  Bytes out(fs::file_size(path));
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  EXPECT_EQ(::read(fd, out.data(), out.size()), static_cast<ssize_t>(out.size()));
  ::close(fd);
  return out;
}

Bytes as_bytes(const std::string& text) {
  Bytes out(text.size());
  std::transform(text.begin(), text.end(), out.begin(), [](char c) { return static_cast<std::byte>(c); });
  return out;
}

// Reads a pipe or socket until EOF, on its own thread so that writers in the test can block.
class Drain {
 public:
  explicit Drain(int fd)
      : thread_([this, fd] {
          std::byte buf[8192];
          for (;;) {
            ssize_t n = ::read(fd, buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            data_.insert(data_.end(), buf, buf + n);
          }
        }) {}
  Bytes join() {
    thread_.join();
    return data_;
  }

 private:
  Bytes data_;
  std::thread thread_;
};

// Expects `fn` to throw E whose text contains every one of `parts`.
template <typename E, typename Fn>
void expect_throw_with(Fn&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << *parts.begin();
  } catch (const E& e) {
    std::string what = e.what();
    for (const std::string& part : parts) EXPECT_NE(what.find(part), std::string::npos) << what;
  }
}

class Endpoints : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (GetParam() == Backend::uring && !probe().uring_available) {
      GTEST_SKIP() << probe().uring_unavailable_reason;
    }
    // A closed pipe must surface as EPIPE rather than kill the test process.
    ::signal(SIGPIPE, SIG_IGN);
    ring_ = make_ring(GetParam());
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  Ring& ring() { return *ring_; }
  ReadInfo info_;

  std::unique_ptr<Ring> ring_;
  const dstx::test::ScratchDir scratch_{"dstx-endpoints"};
  const std::string dir_ = scratch_.path().string();
};

// --- sources -----------------------------------------------------------------------------------------------

TEST_P(Endpoints, FileSourceReadsAnyRange) {
  ContentGenerator gen(Profile::mixed, 11);
  const size_t size = (1 << 20) + 333;
  Bytes content = generate(gen, 0, size);
  write_file(path("src"), content);

  auto src = open_file_source(path("src"));
  EXPECT_EQ(src->describe(), "file:" + path("src"));
  EXPECT_EQ(src->size(), std::optional<uint64_t>(size));
  EXPECT_TRUE(src->random_access());
  EXPECT_GE(src->read_fd(), 0);

  struct Range {
    uint64_t offset;
    size_t len;
  };
  for (Range r :
       {Range{0, size}, Range{4095, 10000}, Range{size - 1, 1}, Range{size, 0}, Range{65536, 65536}}) {
    Bytes out(r.len);
    src->read_at(ring(), r.offset, out);
    EXPECT_TRUE(std::equal(out.begin(), out.end(), content.begin() + static_cast<ptrdiff_t>(r.offset)))
        << "range at " << r.offset;
  }
  Bytes past(10);
  EXPECT_THROW(src->read_at(ring(), size - 5, past), std::out_of_range);
  EXPECT_THROW(src->read_next(ring(), past, &info_), std::logic_error);
}

TEST_P(Endpoints, FileSourceShortReadNamesTheOffset) {
  ContentGenerator gen(Profile::binary, 3);
  write_file(path("src"), generate(gen, 0, 100000));
  auto src = open_file_source(path("src"));
  ASSERT_EQ(::truncate(path("src").c_str(), 60000), 0);
  Bytes out(200);
  expect_throw_with<std::runtime_error>(
      [&] { src->read_at(ring(), 59900, out); },
      {"file:" + path("src"), "short read at offset 60000", "file changed"});
}

bool on_tmpfs(const std::string& path) {
  struct statfs fs {};
  return ::statfs(path.c_str(), &fs) == 0 && fs.f_type == TMPFS_MAGIC;
}

// A file in memory is read with pread on the caller's thread, not through the ring: same bytes, same errors.
TEST_P(Endpoints, FileSourceInMemoryReadsTheSameWithoutTheRing) {
  if (!on_tmpfs("/dev/shm")) GTEST_SKIP() << "/dev/shm is not tmpfs here";
  const dstx::test::ScratchDir shm("dstx-endpoints", "/dev/shm");
  const std::string file = (shm.path() / "src").string();
  ContentGenerator gen(Profile::binary, 5);
  const size_t size = (3 << 20) + 77;
  const Bytes content = generate(gen, 0, size);
  write_file(file, content);

  auto src = open_file_source(file);
  EXPECT_TRUE(src->reads_from_memory());
  if (!on_tmpfs(dir_)) {  // the same bytes on a disk file system go through the ring
    write_file(path("disk"), content);
    EXPECT_FALSE(open_file_source(path("disk"))->reads_from_memory());
  }
  for (uint64_t offset : {uint64_t(0), uint64_t(4097), uint64_t(size - (1 << 20))}) {
    Bytes out(1 << 20);
    src->read_at(ring(), offset, out);
    EXPECT_TRUE(std::equal(out.begin(), out.end(), content.begin() + static_cast<ptrdiff_t>(offset))) << offset;
  }
  ASSERT_EQ(::truncate(file.c_str(), 1 << 20), 0);
  Bytes out(200);
  expect_throw_with<std::runtime_error>([&] { src->read_at(ring(), (1 << 20) - 100, out); },
                                        {"file:" + file, "short read at offset 1048576", "file changed"});
}

TEST_P(Endpoints, FileSourceOpenErrorsNameThePath) {
  expect_throw_with<std::system_error>([&] { open_file_source(path("missing")); },
                                       {path("missing"), "No such file or directory"});
  expect_throw_with<std::runtime_error>([&] { open_file_source(dir_); }, {dir_, "is a directory"});
  // A FIFO must be refused at once, not block waiting for a writer.
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0600), 0);
  expect_throw_with<std::runtime_error>([&] { open_file_source(path("fifo")); },
                                        {path("fifo"), "not a regular file"});
}

TEST_P(Endpoints, FdSourceFillsEveryChunkUntilEof) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  ContentGenerator gen(Profile::text, 5);
  const size_t size = (3 << 20) + 4321;
  Bytes content = generate(gen, 0, size);
  // Odd-sized pieces make the reader see many short pipe reads inside one chunk.
  std::thread writer([&] {
    size_t done = 0;
    size_t piece = 1;
    while (done < size) {
      size_t n = std::min(piece, size - done);
      ssize_t w = ::write(fds[1], content.data() + done, n);
      if (w < 0) break;
      done += static_cast<size_t>(w);
      piece = piece * 7 % 100003 + 1;
    }
    ::close(fds[1]);
  });

  auto src = open_fd_source(fds[0], /*owned=*/true, "fd:" + std::to_string(fds[0]));
  EXPECT_EQ(src->size(), std::nullopt);
  EXPECT_FALSE(src->random_access());
  EXPECT_EQ(src->read_fd(), -1);
  Bytes received;
  Bytes chunk(256 * 1024);
  for (;;) {
    size_t n = src->read_next(ring(), chunk, &info_);
    if (n == 0) break;
    received.insert(received.end(), chunk.begin(), chunk.begin() + static_cast<ptrdiff_t>(n));
    if (received.size() < size) {
      EXPECT_EQ(n, chunk.size()) << "chunk ending at " << received.size();
    }
  }
  writer.join();
  EXPECT_EQ(received.size(), size);
  EXPECT_TRUE(received == content);
  EXPECT_EQ(src->read_next(ring(), chunk, &info_), 0u);
  EXPECT_THROW(src->read_at(ring(), 0, chunk), std::logic_error);
}

TEST_P(Endpoints, EmuSourceGeneratesContent) {
  ContentGenerator gen(Profile::zero_heavy, 9);
  auto src = open_emu_source(gen, 1 << 20);
  EXPECT_EQ(src->size(), std::optional<uint64_t>(1 << 20));
  EXPECT_TRUE(src->random_access());
  Bytes out(12345);
  src->read_at(ring(), 77777, out);
  EXPECT_TRUE(out == generate(gen, 77777, out.size()));
  EXPECT_THROW(src->read_at(ring(), (1 << 20) - 100, out), std::out_of_range);
  EXPECT_THROW(src->read_next(ring(), out, &info_), std::logic_error);
}

// --- file sink ---------------------------------------------------------------------------------------------

TEST_P(Endpoints, FileSinkAppearsOnlyAtCommitWithHoles) {
  ContentGenerator gen(Profile::random, 21);
  const uint64_t mib = 1 << 20;
  Bytes head = generate(gen, 0, mib);
  Bytes mid = generate(gen, 5 * mib, mib);
  const uint64_t total = 8 * mib;  // head, 4 MiB of zeros, mid, 2 MiB of trailing zeros
  std::string dst = path("dst");

  auto sink = open_file_sink(dst);
  EXPECT_EQ(sink->describe(), "file:" + dst);
  EXPECT_TRUE(fs::exists(dst + ".partial"));
  EXPECT_FALSE(fs::exists(dst));
  sink->write(ring(), 0, head);
  sink->write_zero(ring(), mib, 4 * mib);
  sink->write(ring(), 5 * mib, mid);
  sink->write_zero(ring(), 6 * mib, 2 * mib);
  EXPECT_FALSE(fs::exists(dst));
  sink->commit(ring(), total);
  EXPECT_FALSE(fs::exists(dst + ".partial"));
  ASSERT_TRUE(fs::exists(dst));

  Bytes got = read_file(dst);
  ASSERT_EQ(got.size(), total);
  Bytes want(total);
  std::copy(head.begin(), head.end(), want.begin());
  std::copy(mid.begin(), mid.end(), want.begin() + static_cast<ptrdiff_t>(5 * mib));
  EXPECT_TRUE(got == want);
  struct stat st {};
  ASSERT_EQ(::stat(dst.c_str(), &st), 0);
  EXPECT_EQ(
      st.st_mode & 0777, 0644u & ~[] {
        mode_t mask = ::umask(0);
        ::umask(mask);
        return mask;
      }());
  // Zero runs were skipped: only about 2 MiB of the 8 are allocated (some slack for filesystem metadata).
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, 3 * mib)
      << "zero runs were written, not left as holes";
  sink.reset();  // destroyed after the commit: the file stays
  EXPECT_TRUE(fs::exists(dst));
}

// An abort after the commit (the transfer failed before the sender learnt of the commit) removes the file:
// nothing may look complete. Idempotent; nothing else in the directory is touched.
TEST_P(Endpoints, FileSinkAbortAfterCommitRemovesTheFile) {
  const std::string dst = path("dst");
  const std::string other = path("other");
  write_file(other, Bytes(10, std::byte{1}));
  auto sink = open_file_sink(dst);
  const Bytes data(4096, std::byte{7});
  sink->write(ring(), 0, data);
  sink->commit(ring(), data.size());
  ASSERT_TRUE(fs::exists(dst));
  sink->abort();
  EXPECT_FALSE(fs::exists(dst));
  EXPECT_FALSE(fs::exists(dst + ".partial"));
  sink->abort();
  sink.reset();
  EXPECT_FALSE(fs::exists(dst));
  EXPECT_TRUE(fs::exists(other));
}

TEST_P(Endpoints, FileSinkAbortLeavesNothing) {
  std::string dst = path("dst");
  Bytes data = as_bytes("some bytes that will never be committed");
  {
    auto sink = open_file_sink(dst);
    sink->write(ring(), 0, data);
    sink->abort();
    EXPECT_FALSE(fs::exists(dst));
    EXPECT_FALSE(fs::exists(dst + ".partial"));
    sink->abort();  // idempotent
    EXPECT_THROW(sink->write(ring(), data.size(), data), std::logic_error);
  }
  {
    auto sink = open_file_sink(dst);  // the aborted run left nothing that blocks a retry
    sink->write(ring(), 0, data);
  }  // destroyed without commit
  EXPECT_FALSE(fs::exists(dst));
  EXPECT_FALSE(fs::exists(dst + ".partial"));
}

TEST_P(Endpoints, FileSinkCommitWithWrongTotalThrows) {
  std::string dst = path("dst");
  auto sink = open_file_sink(dst);
  sink->write(ring(), 0, as_bytes("0123456789"));
  sink->write_zero(ring(), 10, 90);
  expect_throw_with<std::runtime_error>([&] { sink->commit(ring(), 200); }, {"commit of 200 bytes", "100"});
  EXPECT_FALSE(fs::exists(dst));
  sink->abort();
  EXPECT_FALSE(fs::exists(dst));
  EXPECT_FALSE(fs::exists(dst + ".partial"));
}

TEST_P(Endpoints, FileSinkRefusesAnExistingPartial) {
  std::string dst = path("dst");
  write_file(dst + ".partial", as_bytes("left by a dead run"));
  expect_throw_with<std::runtime_error>([&] { open_file_sink(dst); }, {dst + ".partial", "remove it"});
  EXPECT_TRUE(read_file(dst + ".partial") == as_bytes("left by a dead run"));
  EXPECT_FALSE(fs::exists(dst));
}

TEST_P(Endpoints, FileSinkReplacesAnExistingFileOnlyAtCommit) {
  std::string dst = path("dst");
  write_file(dst, as_bytes("old content"));
  auto sink = open_file_sink(dst);
  sink->write(ring(), 0, as_bytes("new"));
  EXPECT_TRUE(read_file(dst) == as_bytes("old content"));
  sink->commit(ring(), 3);
  EXPECT_TRUE(read_file(dst) == as_bytes("new"));
}

TEST_P(Endpoints, FileSinkRefusesDirectoriesAndOutOfOrderWrites) {
  expect_throw_with<std::runtime_error>([&] { open_file_sink(dir_); }, {dir_, "is a directory"});
  auto sink = open_file_sink(path("dst"));
  sink->write(ring(), 0, as_bytes("abc"));
  EXPECT_THROW(sink->write(ring(), 4, as_bytes("d")), std::logic_error);
  EXPECT_THROW(sink->write_zero(ring(), 2, 5), std::logic_error);
}

// --- fd sink -----------------------------------------------------------------------------------------------

TEST_P(Endpoints, FdSinkWritesInOrderIncludingZeros) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  Drain drain(fds[0]);
  ContentGenerator gen(Profile::binary, 4);
  Bytes head = generate(gen, 0, 300000);
  auto sink = open_fd_sink(fds[1], /*owned=*/true, "fd:" + std::to_string(fds[1]));
  sink->write(ring(), 0, head);
  sink->write_zero(ring(), head.size(), 200001);  // longer than the 64 KiB zero buffer
  sink->write(ring(), head.size() + 200001, as_bytes("end"));
  EXPECT_THROW(sink->commit(ring(), 1), std::runtime_error);
  sink->commit(ring(), head.size() + 200001 + 3);
  sink.reset();  // owned: closes the pipe
  Bytes got = drain.join();
  Bytes want = head;
  want.resize(head.size() + 200001);
  Bytes tail = as_bytes("end");
  want.insert(want.end(), tail.begin(), tail.end());
  EXPECT_TRUE(got == want);
  ::close(fds[0]);
}

TEST_P(Endpoints, FdSinkAbortEndsANonOwnedPipe) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  Drain drain(fds[0]);
  auto sink = open_fd_sink(fds[1], /*owned=*/false, "stdout:");
  sink->write(ring(), 0, as_bytes("partial"));
  sink->abort();
  sink->abort();
  EXPECT_TRUE(drain.join() == as_bytes("partial"));  // returns only because the reader saw the end
  // The number stays taken (now /dev/null) so that nothing else is opened onto what the caller thinks is its
  // fd.
  EXPECT_NE(::fcntl(fds[1], F_GETFD), -1);
  EXPECT_THROW(sink->write(ring(), 7, as_bytes("x")), std::logic_error);
  sink.reset();
  EXPECT_NE(::fcntl(fds[1], F_GETFD), -1);  // not owned: not closed by the destructor
  ::close(fds[1]);
  ::close(fds[0]);
}

TEST_P(Endpoints, FdSinkAbortShutsDownANonOwnedSocket) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  int extra = ::dup(fds[0]);  // another holder: a close alone would not end the stream
  ASSERT_GE(extra, 0);
  Drain drain(fds[1]);
  auto sink = open_fd_sink(fds[0], /*owned=*/false, "fd:" + std::to_string(fds[0]));
  sink->write(ring(), 0, as_bytes("abc"));
  sink->abort();
  EXPECT_TRUE(drain.join() == as_bytes("abc"));
  ::close(extra);
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST_P(Endpoints, FdSinkAbortClosesAnOwnedFd) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  Drain drain(fds[0]);
  auto sink = open_fd_sink(fds[1], /*owned=*/true, "fd:" + std::to_string(fds[1]));
  sink->write(ring(), 0, as_bytes("xy"));
  sink->abort();
  EXPECT_TRUE(drain.join() == as_bytes("xy"));
  sink.reset();
  ::close(fds[0]);
}

TEST_P(Endpoints, FdSinkReportsAVanishedReader) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  ::close(fds[0]);
  auto sink = open_fd_sink(fds[1], /*owned=*/true, "stdout:");
  expect_throw_with<std::system_error>([&] { sink->write(ring(), 0, as_bytes("lost")); },
                                       {"stdout:", "reader went away"});
}

// --- null and emu sinks ------------------------------------------------------------------------------------

TEST_P(Endpoints, NullSinkDiscards) {
  auto sink = open_null_sink();
  EXPECT_EQ(sink->describe(), "null:");
  sink->write(ring(), 0, as_bytes("hello"));
  sink->write_zero(ring(), 5, 1 << 30);
  EXPECT_THROW(sink->commit(ring(), 5), std::runtime_error);
  sink->commit(ring(), 5 + (1 << 30));
  sink->abort();
}

TEST_P(Endpoints, EmuSinkAcceptsGeneratedContentWithZeroRuns) {
  ContentGenerator gen(Profile::zero_heavy, 13);
  const size_t size = 4 << 20;
  Bytes content = generate(gen, 0, size);
  auto sink = open_emu_sink(gen, size);
  // Zero pages go through write_zero the way the engine sends zero chunks; the rest as data.
  size_t zero_pages = 0;
  size_t at = 0;
  while (at < size) {
    auto page_is_zero = [&](size_t p) {
      return std::all_of(content.begin() + static_cast<ptrdiff_t>(p),
                         content.begin() + static_cast<ptrdiff_t>(p + kContentPageBytes),
                         [](std::byte b) { return b == std::byte{0}; });
    };
    size_t end = at;
    bool zero = page_is_zero(at);
    while (end < size && page_is_zero(end) == zero) end += kContentPageBytes;
    if (zero) {
      sink->write_zero(ring(), at, end - at);
      zero_pages += (end - at) / kContentPageBytes;
    } else {
      sink->write(ring(), at, std::span<const std::byte>(content.data() + at, end - at));
    }
    at = end;
  }
  EXPECT_GT(zero_pages, 0u);
  sink->commit(ring(), size);
}

TEST_P(Endpoints, EmuSinkNamesAFlippedByte) {
  ContentGenerator gen(Profile::binary, 17);
  const size_t size = 1 << 20;
  Bytes content = generate(gen, 0, size);
  auto sink = open_emu_sink(gen, size);
  sink->write(ring(), 0, std::span<const std::byte>(content.data(), 262144));
  const size_t flip = 300001;
  std::byte want = content[flip];
  content[flip] ^= std::byte{0x5a};
  char expect_text[64];
  std::snprintf(expect_text, sizeof expect_text, "(expected 0x%02x, got 0x%02x)", static_cast<unsigned>(want),
                static_cast<unsigned>(content[flip]));
  expect_throw_with<std::runtime_error>(
      [&] { sink->write(ring(), 262144, std::span<const std::byte>(content.data() + 262144, 262144)); },
      {"emu sink: byte mismatch at offset 300001 ", expect_text});
}

TEST_P(Endpoints, EmuSinkNamesNonZeroContentInAZeroRun) {
  ContentGenerator gen(Profile::zero_heavy, 13);
  const size_t size = 4 << 20;
  Bytes content = generate(gen, 0, size);
  auto is_zero = [&](size_t i) { return content[i] == std::byte{0}; };
  // The longest zero run, claimed to go on to the end: the first non-zero byte after it must be named, even
  // when it lies beyond the first 64 KiB compared.
  size_t best = 0, best_len = 0;
  for (size_t i = 0; i < size;) {
    size_t j = i;
    while (j < size && is_zero(j)) ++j;
    if (j - i > best_len) best = i, best_len = j - i;
    i = j + 1;
  }
  ASSERT_LT(best + best_len, size) << "content ends with zeros; pick another seed";
  ASSERT_GT(best_len, 65536u) << "the run should outlast one 64 KiB comparison; pick another seed";
  auto sink = open_emu_sink(gen, size);
  if (best > 0) sink->write(ring(), 0, std::span<const std::byte>(content.data(), best));
  char expect_text[64];
  std::snprintf(expect_text, sizeof expect_text, "(expected 0x%02x, got 0x00)",
                static_cast<unsigned>(content[best + best_len]));
  expect_throw_with<std::runtime_error>(
      [&] { sink->write_zero(ring(), best, size - best); },
      {"emu sink: byte mismatch at offset " + std::to_string(best + best_len) + " ", expect_text});

  ContentGenerator random(Profile::random, 1);
  Bytes first = generate(random, 0, 4096 + 64);
  size_t nonzero = 4096;
  while (first[nonzero] == std::byte{0}) ++nonzero;
  auto sink2 = open_emu_sink(random, 1 << 20);
  sink2->write(ring(), 0, std::span<const std::byte>(first.data(), 4096));
  expect_throw_with<std::runtime_error>([&] { sink2->write_zero(ring(), 4096, 8192); },
                                        {"byte mismatch at offset " + std::to_string(nonzero) + " "});
}

TEST_P(Endpoints, EmuSinkChecksTheTotal) {
  ContentGenerator gen(Profile::text, 2);
  Bytes content = generate(gen, 0, 456);
  auto sink = open_emu_sink(gen, 456);
  sink->write(ring(), 0, std::span<const std::byte>(content.data(), 123));
  expect_throw_with<std::runtime_error>([&] { sink->commit(ring(), 123); },
                                        {"emu sink: received 123 bytes, expected 456"});
  EXPECT_THROW(sink->write(ring(), 124, std::span<const std::byte>(content.data() + 124, 10)),
               std::logic_error);
  Bytes more = generate(gen, 123, 400);
  expect_throw_with<std::runtime_error>([&] { sink->write(ring(), 123, more); },
                                        {"emu sink: received 523 bytes, expected 456"});
  sink->write(ring(), 123, std::span<const std::byte>(content.data() + 123, 333));
  sink->commit(ring(), 456);
}

INSTANTIATE_TEST_SUITE_P(Backends, Endpoints, ::testing::Values(Backend::uring, Backend::syscall),
                         [](const ::testing::TestParamInfo<Backend>& param) {
                           return std::string(backend_name(param.param));
                         });

}  // namespace
}  // namespace dstx::io
