// Every behaviour of the Ring contract, run against both backends: the syscall fallback must be
// indistinguishable from io_uring to the engine above it.
#include <fcntl.h>
#include <poll.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "io/ring.h"
#include "io/socket.h"

namespace dstx::io {
namespace {

constexpr unsigned kEntries = 8;

std::vector<char> pattern(size_t len, unsigned seed) {
  std::vector<char> bytes(len);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : bytes) {
    x = x * 1103515245u + 12345u;
    b = static_cast<char>(x >> 24);
  }
  return bytes;
}

// An unlinked temporary file: nothing to clean up even if the test dies.
Fd temp_file() {
  char path[] = "/tmp/dstx_test_ring_XXXXXX";
  Fd fd(::mkstemp(path));
  if (fd) ::unlink(path);
  return fd;
}

struct Pair {
  Fd a, b;
};
Pair socket_pair() {
  int fds[2] = {-1, -1};
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return {};
  return {Fd(fds[0]), Fd(fds[1])};
}

Pair tcp_pair() {
  Fd listener = tcp_listen({"127.0.0.1", 0});
  const uint16_t port = bound_port(listener.get());
  Fd client = tcp_connect({"127.0.0.1", port}, {});
  Fd server = tcp_accept(listener.get(), 5000, {});
  return {std::move(client), std::move(server)};
}

// Waits until `count` completions have been reaped (the ring may hand them back in any order).
std::vector<Completion*> reap_all(Ring& ring, size_t count) {
  std::vector<Completion*> got;
  for (int round = 0; round < 10000 && got.size() < count; ++round) {
    EXPECT_EQ(ring.submit(1), 0);
    Completion* batch[kEntries];
    const size_t n = ring.reap(batch);
    got.insert(got.end(), batch, batch + n);
  }
  return got;
}

Completion make_op(Op op, int fd, void* buf, size_t len, int64_t offset, uint64_t user = 0) {
  Completion c;
  c.op = op;
  c.fd = fd;
  c.buf = buf;
  c.len = static_cast<uint32_t>(len);
  c.offset = offset;
  c.user = user;
  return c;
}

// Runs one op to completion and returns its result.
int32_t run(Ring& ring, Completion c) {
  EXPECT_TRUE(ring.queue(&c));
  const auto got = reap_all(ring, 1);
  EXPECT_EQ(got.size(), 1u);
  EXPECT_EQ(got.empty() ? nullptr : got[0], &c);
  EXPECT_TRUE(c.done);
  return c.result;
}

class RingTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    if (GetParam() == Backend::uring && !probe().uring_available) {
      GTEST_SKIP() << "io_uring unavailable: " << probe().uring_unavailable_reason;
    }
    ring_ = make_ring(GetParam(), RingOptions{kEntries});
  }
  void TearDown() override {
    if (ring_) {
      EXPECT_EQ(ring_->in_flight(), 0u);
    }
  }
  std::unique_ptr<Ring> ring_;
};

TEST_P(RingTest, ReportsItsBackend) {
  EXPECT_EQ(ring_->backend(), GetParam());
}

// The kernel will not take a submission (short of memory): the operation comes back with an error and
// leaves nothing in the ring, so no later submission runs it on a buffer its caller has given up.
TEST_P(RingTest, AFailedSubmissionLeavesNothingQueued) {
  if (GetParam() != Backend::uring) GTEST_SKIP() << "io_uring only: the syscall backend submits nothing";
  Pair p = socket_pair();
  ASSERT_TRUE(p.a);
  const std::string first = "first", second = "second";
  test_failing_submissions = 1 << 20;
  const int64_t rc = send_full(*ring_, p.a.get(), first.data(), first.size());
  test_failing_submissions = 0;
  EXPECT_EQ(rc, -ENOMEM);
  EXPECT_EQ(ring_->in_flight(), 0u);
  ASSERT_EQ(send_full(*ring_, p.a.get(), second.data(), second.size()), int64_t(second.size()));
  char got[64] = {};
  const ssize_t n = ::recv(p.b.get(), got, sizeof got, MSG_DONTWAIT);
  EXPECT_EQ(std::string(got, size_t(std::max<ssize_t>(n, 0))), second) << "the withdrawn send ran after all";
}

TEST_P(RingTest, FileWritesAndReadsAtOffsetsWithSeveralInFlight) {
  Fd file = temp_file();
  ASSERT_TRUE(file);
  constexpr size_t kBlock = 4096;
  constexpr int kOps = 4;
  const int64_t offsets[kOps] = {0, 2 * kBlock, kBlock, 3 * kBlock};  // out of order on purpose
  std::vector<std::vector<char>> data;
  Completion writes[kOps];
  for (int i = 0; i < kOps; ++i) {
    data.push_back(pattern(kBlock, i + 1));
    writes[i] = make_op(Op::write, file.get(), data[i].data(), kBlock, offsets[i], 100 + i);
    ASSERT_TRUE(ring_->queue(&writes[i]));
  }
  EXPECT_EQ(ring_->in_flight(), static_cast<unsigned>(kOps));
  auto got = reap_all(*ring_, kOps);
  ASSERT_EQ(got.size(), static_cast<size_t>(kOps));
  for (int i = 0; i < kOps; ++i) {
    EXPECT_TRUE(writes[i].done);
    EXPECT_TRUE(writes[i].notified);
    EXPECT_EQ(writes[i].result, static_cast<int32_t>(kBlock));
    EXPECT_EQ(writes[i].user, 100u + i);
  }

  std::vector<std::vector<char>> back(kOps, std::vector<char>(kBlock));
  Completion reads[kOps];
  for (int i = 0; i < kOps; ++i) {
    reads[i] = make_op(Op::read, file.get(), back[i].data(), kBlock, offsets[i], 200 + i);
    ASSERT_TRUE(ring_->queue(&reads[i]));
  }
  got = reap_all(*ring_, kOps);
  ASSERT_EQ(got.size(), static_cast<size_t>(kOps));
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(reads[i].result, static_cast<int32_t>(kBlock));
    EXPECT_EQ(reads[i].user, 200u + i);
    EXPECT_EQ(back[i], data[i]) << "block " << i;
  }
}

TEST_P(RingTest, ReadFullAndWriteFullRoundTrip) {
  Fd file = temp_file();
  ASSERT_TRUE(file);
  const auto data = pattern((1 << 20) + 123, 7);
  EXPECT_EQ(write_full(*ring_, file.get(), data.data(), data.size(), 100), static_cast<int64_t>(data.size()));
  std::vector<char> back(data.size());
  EXPECT_EQ(read_full(*ring_, file.get(), back.data(), back.size(), 100), static_cast<int64_t>(data.size()));
  EXPECT_EQ(back, data);
}

TEST_P(RingTest, ReadFullStopsShortAtEof) {
  Fd file = temp_file();
  ASSERT_TRUE(file);
  const auto data = pattern(1000, 3);
  ASSERT_EQ(write_full(*ring_, file.get(), data.data(), data.size(), 0), 1000);
  std::vector<char> back(4096);
  EXPECT_EQ(read_full(*ring_, file.get(), back.data(), back.size(), 0), 1000);
  EXPECT_EQ(std::memcmp(back.data(), data.data(), 1000), 0);
  EXPECT_EQ(read_full(*ring_, file.get(), back.data(), back.size(), 5000), 0);
}

TEST_P(RingTest, OffsetMinusOneUsesAndAdvancesTheFilePosition) {
  Fd file = temp_file();
  ASSERT_TRUE(file);
  ASSERT_EQ(::write(file.get(), "0123456789", 10), 10);
  ASSERT_EQ(::lseek(file.get(), 2, SEEK_SET), 2);
  char a[4] = {}, b[4] = {};
  EXPECT_EQ(run(*ring_, make_op(Op::read, file.get(), a, 4, -1)), 4);
  EXPECT_EQ(run(*ring_, make_op(Op::read, file.get(), b, 4, -1)), 4);
  EXPECT_EQ(std::string(a, 4), "2345");
  EXPECT_EQ(std::string(b, 4), "6789");
}

TEST_P(RingTest, ReadAndWriteAtCurrentPositionOnAPipe) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  Fd rd(fds[0]), wr(fds[1]);
  const std::string text = "hello through a pipe";
  EXPECT_EQ(write_full(*ring_, wr.get(), text.data(), text.size(), -1), static_cast<int64_t>(text.size()));
  std::string back(text.size(), '\0');
  EXPECT_EQ(run(*ring_, make_op(Op::read, rd.get(), back.data(), back.size(), -1)),
            static_cast<int32_t>(text.size()));
  EXPECT_EQ(back, text);
  // With the writer gone the pipe reads as EOF, which read_full reports as a short (zero) count.
  wr.reset();
  EXPECT_EQ(read_full(*ring_, rd.get(), back.data(), back.size(), -1), 0);
}

TEST_P(RingTest, SendFullAndRecvFullOverASocketPair) {
  Pair p = socket_pair();
  ASSERT_TRUE(p.a && p.b);
  const auto data = pattern(1 << 20, 11);  // far more than the socket buffer: forces short sends and recvs

  std::vector<char> peer_got(data.size());
  std::thread peer([&] {
    size_t at = 0;
    while (at < peer_got.size()) {
      const ssize_t n = ::recv(p.b.get(), peer_got.data() + at, peer_got.size() - at, 0);
      if (n <= 0) break;
      at += static_cast<size_t>(n);
    }
  });
  EXPECT_EQ(send_full(*ring_, p.a.get(), data.data(), data.size()), static_cast<int64_t>(data.size()));
  peer.join();
  EXPECT_EQ(peer_got, data);

  std::thread writer([&] {
    size_t at = 0;
    while (at < data.size()) {
      const size_t piece = std::min<size_t>(data.size() - at, 70000);
      const ssize_t n = ::send(p.b.get(), data.data() + at, piece, MSG_NOSIGNAL);
      if (n <= 0) break;
      at += static_cast<size_t>(n);
    }
  });
  std::vector<char> got(data.size());
  EXPECT_EQ(recv_full(*ring_, p.a.get(), got.data(), got.size()), static_cast<int64_t>(data.size()));
  writer.join();
  EXPECT_EQ(got, data);
}

TEST_P(RingTest, RecvFullReportsEofMidwayAsEpipe) {
  Pair p = socket_pair();
  ASSERT_TRUE(p.a && p.b);
  ASSERT_EQ(::send(p.b.get(), "0123456789", 10, 0), 10);
  ASSERT_EQ(::shutdown(p.b.get(), SHUT_WR), 0);
  char buf[20];
  EXPECT_EQ(recv_full(*ring_, p.a.get(), buf, sizeof buf), -EPIPE);
}

TEST_P(RingTest, RecvFullReportsEofAtStartAsZero) {
  Pair p = socket_pair();
  ASSERT_TRUE(p.a && p.b);
  p.b.reset();
  char buf[20];
  EXPECT_EQ(recv_full(*ring_, p.a.get(), buf, sizeof buf), 0);
}

TEST_P(RingTest, QueueReturnsFalseWhenFull) {
  Fd file = temp_file();
  ASSERT_TRUE(file);
  ASSERT_EQ(::ftruncate(file.get(), 4096), 0);
  std::vector<char> buf(kEntries * 512);
  Completion ops[kEntries + 1];
  for (unsigned i = 0; i < kEntries; ++i) {
    ops[i] = make_op(Op::read, file.get(), buf.data() + i * 512, 512, i * 512);
    ASSERT_TRUE(ring_->queue(&ops[i])) << i;
  }
  ops[kEntries] = make_op(Op::read, file.get(), buf.data(), 512, 0);
  EXPECT_FALSE(ring_->queue(&ops[kEntries]));
  EXPECT_EQ(ring_->in_flight(), kEntries);
  EXPECT_EQ(ring_->submit(kEntries), 0);
  // Submitted operations no longer occupy the submission queue.
  EXPECT_TRUE(ring_->queue(&ops[kEntries]));
  const auto got = reap_all(*ring_, kEntries + 1);
  EXPECT_EQ(got.size(), kEntries + 1u);
  for (const auto& op : ops) EXPECT_EQ(op.result, 512);
}

TEST_P(RingTest, ErrorsAreNegativeErrno) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  ::close(fds[0]);
  ::close(fds[1]);
  char buf[16];
  // Before anything else is opened, so the closed numbers are not reused yet.
  EXPECT_EQ(run(*ring_, make_op(Op::read, fds[0], buf, sizeof buf, 0)), -EBADF);
  EXPECT_EQ(read_full(*ring_, fds[0], buf, sizeof buf, 0), -EBADF);

  Fd file = temp_file();
  ASSERT_TRUE(file);
  EXPECT_EQ(run(*ring_, make_op(Op::recv, file.get(), buf, sizeof buf, -1)), -ENOTSOCK);

  int rdonly = ::open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(rdonly, 0);
  Fd guard(rdonly);
  EXPECT_EQ(run(*ring_, make_op(Op::write, rdonly, buf, sizeof buf, 0)), -EBADF);
}

TEST_P(RingTest, HelpersRefuseABusyRing) {
  Fd file = temp_file();
  ASSERT_TRUE(file);
  char buf[16];
  Completion pending = make_op(Op::read, file.get(), buf, sizeof buf, 0);
  ASSERT_TRUE(ring_->queue(&pending));
  EXPECT_EQ(read_full(*ring_, file.get(), buf, sizeof buf, 0), -EBUSY);
  EXPECT_EQ(reap_all(*ring_, 1).size(), 1u);
}

TEST_P(RingTest, RegisteredBuffersWithFixedReadAndWrite) {
  constexpr size_t kSize = 64 * 1024;
  auto* raw = static_cast<char*>(std::aligned_alloc(4096, 3 * kSize));
  ASSERT_NE(raw, nullptr);
  std::unique_ptr<char, decltype(&std::free)> arena(raw, &std::free);
  char* const b0 = raw;
  char* const b1 = raw + kSize;
  char* const b2 = raw + 2 * kSize;
  const auto data = pattern(kSize, 5);
  std::memcpy(b0, data.data(), kSize);
  std::memset(b1, 0, kSize);

  const iovec first[2] = {{b0, kSize}, {b1, kSize}};
  ASSERT_EQ(ring_->register_buffers(first), 0);
  Fd file = temp_file();
  ASSERT_TRUE(file);
  Completion w = make_op(Op::write_fixed, file.get(), b0, kSize, 4096);
  w.buf_index = 0;
  EXPECT_EQ(run(*ring_, w), static_cast<int32_t>(kSize));
  // A pointer inside the registered buffer, not only its start.
  Completion r = make_op(Op::read_fixed, file.get(), b1 + 512, kSize - 512, 4096 + 512);
  r.buf_index = 1;
  EXPECT_EQ(run(*ring_, r), static_cast<int32_t>(kSize - 512));
  EXPECT_EQ(std::memcmp(b1 + 512, data.data() + 512, kSize - 512), 0);

  // A new registration replaces the old one: index 0 now names b2.
  const iovec second[1] = {{b2, kSize}};
  ASSERT_EQ(ring_->register_buffers(second), 0);
  Completion r2 = make_op(Op::read_fixed, file.get(), b2, kSize, 4096);
  r2.buf_index = 0;
  EXPECT_EQ(run(*ring_, r2), static_cast<int32_t>(kSize));
  EXPECT_EQ(std::memcmp(b2, data.data(), kSize), 0);
  EXPECT_EQ(ring_->register_buffers({}), 0);
}

TEST_P(RingTest, SendZcOverTcpLoopbackIsNotifiedWhenReaped) {
  if (GetParam() == Backend::uring && !probe().send_zc) GTEST_SKIP() << "kernel lacks IORING_OP_SEND_ZC";
  Pair p = tcp_pair();
  ASSERT_TRUE(p.a && p.b);
  constexpr size_t kSize = 256 * 1024;
  auto* raw = static_cast<char*>(std::aligned_alloc(4096, kSize));
  ASSERT_NE(raw, nullptr);
  std::unique_ptr<char, decltype(&std::free)> buf(raw, &std::free);
  const auto data = pattern(kSize, 9);
  std::memcpy(raw, data.data(), kSize);

  std::vector<char> peer_got(2 * kSize);
  std::thread peer([&] {
    size_t at = 0;
    while (at < peer_got.size()) {
      const ssize_t n = ::recv(p.b.get(), peer_got.data() + at, peer_got.size() - at, 0);
      if (n <= 0) break;
      at += static_cast<size_t>(n);
    }
  });
  // Once from plain memory, once from a registered buffer.
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) {
      const iovec reg[1] = {{raw, kSize}};
      ASSERT_EQ(ring_->register_buffers(reg), 0);
    }
    size_t sent = 0;
    for (int round = 0; round < 1000 && sent < kSize; ++round) {
      Completion c = make_op(Op::send_zc, p.a.get(), raw + sent, kSize - sent, -1);
      c.buf_index = pass == 1 ? 0 : -1;
      EXPECT_TRUE(ring_->queue(&c));
      const auto got = reap_all(*ring_, 1);
      ASSERT_EQ(got.size(), 1u);
      EXPECT_TRUE(c.done);
      EXPECT_TRUE(c.notified) << "handed back before the kernel released the buffer";
      ASSERT_GT(c.result, 0) << "send_zc: " << std::strerror(-c.result);
      sent += static_cast<size_t>(c.result);
    }
    EXPECT_EQ(sent, kSize);
  }
  ASSERT_EQ(::shutdown(p.a.get(), SHUT_WR), 0);
  peer.join();
  EXPECT_EQ(std::vector<char>(peer_got.begin(), peer_got.begin() + kSize), data);
  EXPECT_EQ(std::vector<char>(peer_got.begin() + kSize, peer_got.end()), data);
}

// Registered files stand in for fds: an operation names the slot, and update_file re-points a slot (a
// reconnected socket) without re-registering the table. Empty slots fail the operation, not the ring.
TEST_P(RingTest, RegisteredFilesStandInForFdsAndCanBeRepointed) {
  int a[2], b[2];
  ASSERT_EQ(::pipe(a), 0);
  ASSERT_EQ(::pipe(b), 0);
  Fd ar(a[0]), aw(a[1]), br(b[0]), bw(b[1]);
  const int files[] = {aw.get(), ar.get(), -1};
  ASSERT_EQ(ring_->register_files(files), 0);

  char hello[] = "hello";
  Completion w = make_op(Op::write, -1, hello, 5, -1);
  w.file_index = 0;
  ASSERT_EQ(run(*ring_, w), 5);
  char got[8] = {};
  Completion r = make_op(Op::read, -1, got, sizeof got, -1);
  r.file_index = 1;
  ASSERT_EQ(run(*ring_, r), 5);
  EXPECT_EQ(std::string(got, 5), "hello");

  ASSERT_EQ(ring_->update_file(0, bw.get()), 0);
  char world[] = "world";
  Completion w2 = make_op(Op::write, -1, world, 5, -1);
  w2.file_index = 0;
  ASSERT_EQ(run(*ring_, w2), 5);
  char from_b[8] = {};
  ASSERT_EQ(::read(br.get(), from_b, sizeof from_b), 5);
  EXPECT_EQ(std::string(from_b, 5), "world");

  Completion empty = make_op(Op::write, -1, world, 5, -1);
  empty.file_index = 2;
  EXPECT_EQ(run(*ring_, empty), -EBADF);
  EXPECT_EQ(ring_->register_files({}), 0);
  EXPECT_LT(ring_->update_file(0, bw.get()), 0) << "nothing is registered any more";
}

// `more` (MSG_MORE): a short piece followed at once by the rest of its message is held back rather than sent
// in a packet of its own (a frame header before a payload sent from elsewhere), even with TCP_NODELAY.
TEST_P(RingTest, SendWithMoreHoldsAShortPieceUntilTheRestFollows) {
  Pair p = tcp_pair();
  ASSERT_TRUE(p.a && p.b);
  const auto data = pattern(4096, 3);
  Completion head = make_op(Op::send, p.a.get(), const_cast<char*>(data.data()), 40, -1);
  head.more = true;
  ASSERT_EQ(run(*ring_, head), 40);
  pollfd pfd{p.b.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 20), 0) << "the 40-byte piece was sent on its own";
  Completion rest = make_op(Op::send, p.a.get(), const_cast<char*>(data.data()) + 40, data.size() - 40, -1);
  ASSERT_EQ(run(*ring_, rest), int32_t(data.size() - 40));
  std::vector<char> got(data.size());
  ASSERT_EQ(recv_full(*ring_, p.b.get(), got.data(), got.size()), int64_t(got.size()));
  EXPECT_EQ(got, data);
}

// With wait_all, a send the socket cannot take at once completes only when all of it is in (or the socket
// fails): the engine's workers encode between reaps, and a short completion left the rest waiting on them
// meanwhile. (A blocking send on the syscall backend completes whole anyway.)
TEST_P(RingTest, AWaitAllSendLargerThanTheSocketBufferCompletesWhole) {
  Pair p = tcp_pair();
  ASSERT_TRUE(p.a && p.b);
  ASSERT_TRUE(socket_sends_may_wait_all(p.a.get()));
  const int small = 64 * 1024;
  ASSERT_EQ(::setsockopt(p.a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  constexpr size_t kSize = 4 << 20;
  const auto data = pattern(kSize, 11);
  std::vector<char> got(2 * kSize);
  std::thread peer([&] {
    size_t at = 0;
    while (at < got.size()) {
      const ssize_t n = ::recv(p.b.get(), got.data() + at, std::min<size_t>(got.size() - at, 16384), 0);
      if (n <= 0) break;
      at += static_cast<size_t>(n);
    }
  });
  Completion whole = make_op(Op::send, p.a.get(), const_cast<char*>(data.data()), kSize, -1);
  whole.wait_all = true;
  EXPECT_EQ(run(*ring_, whole), int32_t(kSize));
  const iovec halves[2] = {{const_cast<char*>(data.data()), kSize / 2},
                           {const_cast<char*>(data.data()) + kSize / 2, kSize / 2}};
  Completion pieces = make_op(Op::sendmsg, p.a.get(), nullptr, 0, -1);
  pieces.iov = halves;
  pieces.iov_count = 2;
  pieces.wait_all = true;
  EXPECT_EQ(run(*ring_, pieces), int32_t(kSize));
  ASSERT_EQ(::shutdown(p.a.get(), SHUT_WR), 0);
  peer.join();
  EXPECT_EQ(std::vector<char>(got.begin(), got.begin() + kSize), data);
  EXPECT_EQ(std::vector<char>(got.begin() + kSize, got.end()), data);
}

// sendmsg: one operation sends pieces from anywhere (a frame's header and its data's runs), in order, through
// a registered file too; `more` holds a short tail back like send's.
TEST_P(RingTest, SendmsgSendsThePiecesInOrder) {
  Pair p = tcp_pair();
  ASSERT_TRUE(p.a && p.b);
  const auto data = pattern(3 * 4096, 5);
  // Pieces out of place in the buffer: bytes 8192..12287, then 0..99, then 4096..8191.
  const iovec pieces[] = {{const_cast<char*>(data.data()) + 8192, 4096},
                          {const_cast<char*>(data.data()), 100},
                          {const_cast<char*>(data.data()) + 4096, 4096}};
  const int files[] = {p.a.get()};
  ASSERT_EQ(ring_->register_files(files), 0);
  Completion c = make_op(Op::sendmsg, -1, nullptr, 0, -1);  // the registered file, not an fd
  c.iov = pieces;
  c.iov_count = 3;
  c.file_index = 0;
  ASSERT_EQ(run(*ring_, c), int32_t(4096 + 100 + 4096));
  std::vector<char> got(4096 + 100 + 4096);
  ASSERT_EQ(recv_full(*ring_, p.b.get(), got.data(), got.size()), int64_t(got.size()));
  std::vector<char> want(data.begin() + 8192, data.end());
  want.insert(want.end(), data.begin(), data.begin() + 100);
  want.insert(want.end(), data.begin() + 4096, data.begin() + 8192);
  EXPECT_EQ(got, want);
  EXPECT_EQ(ring_->register_files({}), 0);

  const iovec tail[] = {{const_cast<char*>(data.data()), 10}, {const_cast<char*>(data.data()) + 10, 30}};
  Completion held = make_op(Op::sendmsg, p.a.get(), nullptr, 0, -1);
  held.iov = tail;
  held.iov_count = 2;
  held.more = true;
  ASSERT_EQ(run(*ring_, held), 40);
  pollfd pfd{p.b.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 20), 0) << "the 40-byte message was sent on its own";
  Completion rest = make_op(Op::send, p.a.get(), const_cast<char*>(data.data()) + 40, 60, -1);
  ASSERT_EQ(run(*ring_, rest), 60);
  std::vector<char> got2(100);
  ASSERT_EQ(recv_full(*ring_, p.b.get(), got2.data(), got2.size()), 100);
  EXPECT_TRUE(std::equal(got2.begin(), got2.end(), data.begin()));
}

// sendmsg_full: more pieces than one sendmsg may carry, and more bytes than the socket buffer holds (a
// reader drains it meanwhile): every byte arrives in order, and the pieces are used up.
TEST_P(RingTest, SendmsgFullSendsMorePiecesThanOneCallTakes) {
  Pair p = socket_pair();
  ASSERT_TRUE(p.a && p.b);
  const size_t count = 2 * kMaxIov + 7, piece = 1000;
  const auto data = pattern(count * piece, 9);
  std::vector<iovec> pieces;
  for (size_t i = 0; i < count; ++i) {  // every other piece from the back half, to be out of place
    const size_t from = (i % 2 ? count - 1 - i / 2 : i / 2) * piece;
    pieces.push_back({const_cast<char*>(data.data()) + from, piece});
  }
  std::vector<char> want;
  for (const iovec& v : pieces)
    want.insert(want.end(), static_cast<char*>(v.iov_base), static_cast<char*>(v.iov_base) + v.iov_len);
  std::vector<char> got(want.size());
  std::thread reader([&] {
    size_t done = 0;
    while (done < got.size()) {
      const ssize_t n = ::recv(p.b.get(), got.data() + done, got.size() - done, 0);
      if (n <= 0) break;
      done += size_t(n);
    }
  });
  EXPECT_EQ(sendmsg_full(*ring_, p.a.get(), pieces), int64_t(want.size()));
  reader.join();
  EXPECT_EQ(got, want);
  for (const iovec& v : pieces) EXPECT_EQ(v.iov_len, 0u);
}

INSTANTIATE_TEST_SUITE_P(Backends, RingTest, ::testing::Values(Backend::uring, Backend::syscall),
                         [](const ::testing::TestParamInfo<Backend>& param_info) {
                           return std::string(backend_name(param_info.param));
                         });

// Rings made and closed one after another on threads with nothing else between them: the queues of a new
// ring often land where a closed ring's were. ThreadSanitizer (the sanitizer stage runs this test) must not
// take the new owner's writes for a race with the old owner's, since liburing's raw mmap/munmap are invisible
// to it. The hand-over is a relaxed flag, which orders nothing for ThreadSanitizer.
TEST_P(RingTest, RingsMadeOneAfterAnotherOnDifferentThreadsShareNothing) {
  std::atomic<int> turn{0};
  auto use_a_ring = [&](int mine) {
    while (turn.load(std::memory_order_relaxed) != mine) std::this_thread::yield();
    {
      auto ring = make_ring(GetParam(), RingOptions{kEntries});
      Pair p = socket_pair();
      EXPECT_TRUE(p.a);
      const std::vector<char> out = pattern(4096, unsigned(mine));
      std::vector<char> in(out.size());
      if (p.a) {  // (no ASSERT here: the threads after this one wait for its turn to pass)
        EXPECT_EQ(send_full(*ring, p.a.get(), out.data(), out.size()), int64_t(out.size()));
        EXPECT_EQ(recv_full(*ring, p.b.get(), in.data(), in.size()), int64_t(in.size()));
      }
      EXPECT_EQ(in, out);
    }
    turn.store(mine + 1, std::memory_order_relaxed);
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) threads.emplace_back(use_a_ring, i);
  for (auto& t : threads) t.join();
  EXPECT_EQ(turn.load(), 6);
}

TEST(Ring, BackendNames) {
  EXPECT_STREQ(backend_name(Backend::uring), "io_uring");
  EXPECT_STREQ(backend_name(Backend::syscall), "syscall");
}

TEST(Ring, ProbeIsCachedAndExplainsItself) {
  const ProbeResult& a = probe();
  EXPECT_EQ(&a, &probe());
  if (a.uring_available) {
    EXPECT_TRUE(a.uring_unavailable_reason.empty());
  } else {
    EXPECT_NE(a.uring_unavailable_reason.find("io_uring_setup"), std::string::npos)
        << a.uring_unavailable_reason;
    EXPECT_FALSE(a.send_zc);
  }
}

TEST(Ring, MakeRingRejectsBadEntries) {
  EXPECT_THROW(make_ring(Backend::syscall, RingOptions{0}), std::invalid_argument);
  EXPECT_THROW(make_ring(Backend::syscall, RingOptions{12}), std::invalid_argument);
  EXPECT_THROW(make_ring(Backend::syscall, RingOptions{8192}), std::invalid_argument);
  EXPECT_NO_THROW(make_ring(Backend::syscall, RingOptions{1}));
}

// Saves DSTX_IO and puts it back, so the tests can set it freely.
class EnvGuard {
 public:
  EnvGuard() {
    if (const char* v = std::getenv("DSTX_IO")) saved_ = v;
  }
  ~EnvGuard() {
    if (saved_) {
      ::setenv("DSTX_IO", saved_->c_str(), 1);
    } else {
      ::unsetenv("DSTX_IO");
    }
  }

 private:
  std::optional<std::string> saved_;
};

TEST(ChooseBackend, ForcedSyscall) {
  EnvGuard guard;
  ::setenv("DSTX_IO", "syscall", 1);
  std::string why;
  EXPECT_EQ(choose_backend(&why), Backend::syscall);
  EXPECT_EQ(why, "syscall (forced by DSTX_IO=syscall)");
  EXPECT_EQ(choose_backend(nullptr), Backend::syscall);
}

TEST(ChooseBackend, UnsetOrEmptyFollowsTheProbe) {
  EnvGuard guard;
  for (const char* value : {static_cast<const char*>(nullptr), ""}) {
    if (value == nullptr) {
      ::unsetenv("DSTX_IO");
    } else {
      ::setenv("DSTX_IO", value, 1);
    }
    std::string why;
    const Backend b = choose_backend(&why);
    if (probe().uring_available) {
      EXPECT_EQ(b, Backend::uring);
      EXPECT_EQ(why, "io_uring (probe ok)");
    } else {
      EXPECT_EQ(b, Backend::syscall);
      EXPECT_NE(why.find(probe().uring_unavailable_reason), std::string::npos) << why;
    }
  }
}

TEST(ChooseBackend, ForcedUring) {
  EnvGuard guard;
  ::setenv("DSTX_IO", "uring", 1);
  std::string why;
  if (probe().uring_available) {
    EXPECT_EQ(choose_backend(&why), Backend::uring);
    EXPECT_NE(why.find("DSTX_IO=uring"), std::string::npos) << why;
  } else {
    try {
      choose_backend(&why);
      ADD_FAILURE() << "forced uring without io_uring must throw";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(probe().uring_unavailable_reason), std::string::npos) << e.what();
    }
  }
}

TEST(ChooseBackend, BadValueThrowsNamingIt) {
  EnvGuard guard;
  ::setenv("DSTX_IO", "epoll", 1);
  std::string why = "untouched";
  try {
    choose_backend(&why);
    ADD_FAILURE() << "DSTX_IO=epoll must throw";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "DSTX_IO=epoll: expected uring or syscall");
  }
  EXPECT_EQ(why, "untouched");
}

}  // namespace
}  // namespace dstx::io
