// Hostile input: a sender cannot make the receiver use more memory than its budget (RecvOptions::
// memory_budget_bytes; docs/wire-format.md "Bounds"), whatever stream count, chunk size and frame sizes it
// claims.
//
// Each attack runs in a forked child (a fresh peak-RSS high-water mark, and an address-space limit so a
// broken bound cannot take the machine down); the parent reads the child's peak RSS from wait4() and compares
// its growth over the RSS at fork time with the budget plus a generous margin for thread stacks, allocator
// slack and the attacker's own buffer. Nothing here depends on timing except a settle pause before the
// connections close.
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <thread>
#include <vector>

#include "compress/codec.h"
#include "compress/hash.h"
#include "engine/transfer.h"
#include "engine/wire.h"
#include "io/endpoints.h"

namespace dstx::engine {
namespace {

constexpr uint64_t kMiB = 1 << 20;
// Thread stacks (a receiver worker and an attacker per stream), allocator arenas, the program itself.
constexpr uint64_t kMarginBytes = 16 * kMiB;

uint64_t current_rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size_pages = 0, resident_pages = 0;
  statm >> size_pages >> resident_pages;
  return resident_pages * uint64_t(sysconf(_SC_PAGESIZE));
}

std::vector<std::byte> frame(const wire::Header& h, std::span<const std::byte> payload = {}) {
  std::vector<std::byte> b(wire::kHeaderBytes);
  wire::encode_header(h, std::span<std::byte, wire::kHeaderBytes>(b.data(), b.size()));
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

std::vector<std::byte> hello_frame(const wire::Hello& hello) {
  std::vector<std::byte> p(wire::kHelloBytes);
  wire::encode_hello(hello, std::span<std::byte, wire::kHelloBytes>(p.data(), p.size()));
  return frame(wire::Header{.type = wire::FrameType::hello, .payload_len = wire::kHelloBytes}, p);
}

bool send_all(int fd, const std::byte* p, size_t n) {
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k <= 0) return false;
    p += k;
    n -= size_t(k);
  }
  return true;
}

struct Attack {
  unsigned streams = 1;
  uint32_t chunk_bytes = 4096;
  // A full window with a gap in front is flow control, not a failure: only the idle time-out ends it.
  RecvOptions options{.idle_timeout_ms = 2000};
};

// Child: opens `streams` connections claiming `chunk_bytes` chunks and makes the receiver fill every buffer
// it is willing to fill (stream 0: raw chunks into window slots; the others: lz4 payloads of the largest size
// the wire allows into decode buffers); then waits, closes, and exits 0 if nothing committed.
[[noreturn]] void run_attack(const Attack& a, int report_fd) {
  const uint64_t start_rss = current_rss_bytes();
  if (::write(report_fd, &start_rss, sizeof start_rss) != sizeof start_rss) ::_exit(12);
  ::close(report_fd);
  struct rlimit as {
    .rlim_cur = 2048 * kMiB, .rlim_max = 2048 * kMiB
  };
  ::setrlimit(RLIMIT_AS, &as);
  std::vector<io::Fd> theirs, ours;
  for (unsigned i = 0; i < a.streams; ++i) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) ::_exit(10);
    theirs.emplace_back(sv[0]);
    ours.emplace_back(sv[1]);
  }
  const size_t lz4_payload = compress::encode_bound(compress::Codec::lz4, a.chunk_bytes);
  // One small buffer, sent over and over: the attacker's own memory must not count as the receiver's.
  const std::vector<std::byte> junk(64 << 10, std::byte{0x6b});
  // The XXH3-64 of a whole chunk of junk, so that raw chunks pass their check and stay in the window.
  compress::Hasher64 hasher;
  for (size_t done = 0; done < a.chunk_bytes; done += junk.size()) {
    hasher.update(junk.data(), std::min<size_t>(junk.size(), a.chunk_bytes - done));
  }
  const uint64_t raw_hash = hasher.digest();
  auto sink = io::open_null_sink();
  Result r;
  std::thread receiver([&] { r = receive_accepted(*sink, std::move(theirs), a.options, nullptr, nullptr); });
  std::vector<std::thread> attackers;
  for (unsigned i = 0; i < a.streams; ++i) {
    attackers.emplace_back([&, i] {
      const int fd = ours[i].get();
      const auto hello = hello_frame(wire::Hello{.stream_index = uint16_t(i),
                                                 .stream_count = uint16_t(a.streams),
                                                 .max_chunk_bytes = a.chunk_bytes,
                                                 .session_id = 0xbad,
                                                 .capabilities = wire::kCapLz4});
      if (!send_all(fd, hello.data(), hello.size())) return;
      auto send_chunk = [&](uint64_t seq, bool raw, bool whole) {
        const uint32_t payload = raw ? a.chunk_bytes : uint32_t(lz4_payload);
        const auto data =
            frame(wire::Header{.type = wire::FrameType::data,
                               .codec = uint8_t(raw ? compress::Codec::none : compress::Codec::lz4),
                               .seq = seq,
                               .offset = (seq - 1) * a.chunk_bytes,
                               .raw_len = a.chunk_bytes,
                               .payload_len = payload,
                               .hash = raw ? raw_hash : 1});
        if (!send_all(fd, data.data(), data.size())) return false;
        // Blocks while the receiver is not reading this stream.
        for (size_t left = payload - (whole ? 0 : 1); left > 0;) {
          const size_t n = std::min(left, junk.size());
          if (!send_all(fd, junk.data(), n)) return false;
          left -= n;
        }
        return true;
      };
      if (i == 0) {
        // Whole raw chunks after a gap (seq 1 never comes): each lands in a window slot and stays there,
        // until the window is full and the receiver stops reading this stream.
        for (uint64_t seq = a.streams + 1; send_chunk(seq, true, true); ++seq) {
        }
      } else {
        // One lz4 chunk but its last byte: the decode buffer fills and the worker waits inside the frame.
        send_chunk(i + 1, false, false);
      }
    });
  }
  // Settle: let every stream worker take what it will, then hang up on it.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  for (io::Fd& fd : ours) ::shutdown(fd.get(), SHUT_RDWR);
  for (auto& t : attackers) t.join();
  receiver.join();
  std::fprintf(stderr, "child: receiver ended: %s (%s)\n", wire::reason_name(r.reason), r.error.c_str());
  ::_exit(r.committed ? 11 : 0);
}

// Runs the attack in a child; returns its peak RSS growth over the RSS it had before the attack began.
uint64_t peak_rss_growth(const Attack& a) {
  std::fflush(nullptr);
  int report[2];
  EXPECT_EQ(::pipe(report), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(report[0]);
    run_attack(a, report[1]);
  }
  ::close(report[1]);
  EXPECT_GT(pid, 0);
  uint64_t start_rss = 0;
  EXPECT_EQ(::read(report[0], &start_rss, sizeof start_rss), ssize_t(sizeof start_rss));
  ::close(report[0]);
  int status = 0;
  struct rusage ru {};
  EXPECT_EQ(::wait4(pid, &status, 0, &ru), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  const uint64_t peak = uint64_t(ru.ru_maxrss) * 1024;  // Linux reports KiB
  return peak > start_rss ? peak - start_rss : 0;
}

class ReceiverMemory : public ::testing::Test {
 protected:
  void SetUp() override {
#ifdef DSTX_SANITIZED
    GTEST_SKIP() << "peak RSS is meaningless under sanitizers (shadow memory, quarantine)";
#endif
    setenv("DSTX_IO", "syscall", 1);  // io_uring rings add locked memory that is not the receiver's budget
  }
  void TearDown() override {
    unsetenv("DSTX_IO");
  }
};

// The receiver's peak RSS growth under the attack stays within its memory budget (plus a margin).
void expect_within_budget(const Attack& a) {
  const uint64_t growth = peak_rss_growth(a);
  std::printf("peak RSS growth %.1f MiB, budget %.1f MiB\n", double(growth) / kMiB,
              double(a.options.memory_budget_bytes) / kMiB);
  EXPECT_LE(growth, a.options.memory_budget_bytes + kMarginBytes);
}

// The receiver's own bound on a single stream of the largest chunks: window plus one decode buffer.
TEST_F(ReceiverMemory, OneStreamOfTheLargestChunksStaysWithinTheBudget) {
  Attack a;
  a.streams = 1;
  a.chunk_bytes = wire::kMaxChunkBytes;
  a.options.memory_budget_bytes = 64 * kMiB;
  expect_within_budget(a);
}

// Several streams whose buffers the budget just holds: accepted, and every buffer filled, within the budget.
TEST_F(ReceiverMemory, SeveralStreamsFillingEveryBufferStayWithinTheBudget) {
  Attack a;
  a.streams = 4;
  a.chunk_bytes = 1 << 20;
  a.options.memory_budget_bytes = 16 * kMiB;
  expect_within_budget(a);
}

// Many streams, each claiming chunks that the budget can hold once but not once per stream: the receiver must
// refuse or fit the session into its budget, not allocate a decode buffer per stream on the sender's word.
TEST_F(ReceiverMemory, ManyStreamsOfLargeChunksStayWithinTheBudget) {
  Attack a;
  a.streams = 16;
  a.chunk_bytes = 4 * kMiB;
  a.options.memory_budget_bytes = 16 * kMiB;
  expect_within_budget(a);
}

}  // namespace
}  // namespace dstx::engine
