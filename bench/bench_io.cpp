// Ring throughput: file reads (page-cache hot) in 1 MiB chunks at queue depth 1 and 4, and loopback TCP
// sends, for each backend and op variant. Loopback hides the NIC, so these numbers compare per-op overheads
// and copies, not link speed.
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "io/ring.h"
#include "io/socket.h"

namespace {

using dstx::io::Backend;
using dstx::io::Completion;
using dstx::io::Fd;
using dstx::io::Op;
using dstx::io::Ring;

constexpr size_t kChunkBytes = 1 << 20;
constexpr size_t kFileBytes = 64 << 20;
constexpr unsigned kRingEntries = 8;
constexpr int kDepthMax = 4;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, FreeDeleter>;

Buffer aligned_buffer(size_t bytes) {
  void* p = std::aligned_alloc(4096, bytes);
  if (p != nullptr) std::memset(p, 0x5a, bytes);  // fault the pages in outside the timed loop
  return Buffer(static_cast<char*>(p));
}

// The 64 MiB input, made once per process on tmpfs when there is one and unlinked at once, so nothing is
// left behind however the process ends. DSTX_BENCH_DIR picks another file system: tmpfs and disk file
// systems differ in whether io_uring can read inline or must hand the read to an io-wq worker.
int shared_file() {
  static const Fd fd = [] {
    const char* chosen = std::getenv("DSTX_BENCH_DIR");
    for (const char* dir : {chosen, "/dev/shm", "/tmp"}) {
      if (dir == nullptr || *dir == '\0') continue;
      std::string path = std::string(dir) + "/dstx_bench_io_XXXXXX";
      Fd f(::mkstemp(path.data()));
      if (!f) continue;
      ::unlink(path.c_str());
      std::vector<char> block(kChunkBytes);
      for (size_t i = 0; i < block.size(); ++i) block[i] = static_cast<char>(i * 131 + (i >> 12));
      bool ok = true;
      for (size_t at = 0; ok && at < kFileBytes; at += block.size()) {
        ok = ::pwrite(f.get(), block.data(), block.size(), static_cast<off_t>(at)) ==
             static_cast<ssize_t>(block.size());
      }
      if (ok) return f;
    }
    return Fd();
  }();
  return fd.get();
}

bool usable(benchmark::State& state, Backend backend, Op op) {
  const auto& probe = dstx::io::probe();
  if (backend == Backend::uring && !probe.uring_available) {
    state.SkipWithError(("io_uring unavailable: " + probe.uring_unavailable_reason).c_str());
    return false;
  }
  if (backend == Backend::uring && op == Op::read_fixed && !probe.read_fixed) {
    state.SkipWithError("kernel lacks IORING_OP_READ_FIXED");
    return false;
  }
  if (backend == Backend::uring && op == Op::send_zc && !probe.send_zc) {
    state.SkipWithError("kernel lacks IORING_OP_SEND_ZC");
    return false;
  }
  return true;
}

// Reads the whole file per iteration, keeping `depth` chunk reads in flight.
void BM_FileRead(benchmark::State& state, Backend backend, Op op) {
  if (!usable(state, backend, op)) return;
  const int fd = shared_file();
  if (fd < 0) {
    state.SkipWithError("cannot create the 64 MiB input file");
    return;
  }
  const int depth = static_cast<int>(state.range(0));
  auto ring = dstx::io::make_ring(backend, {kRingEntries});
  Buffer buffers = aligned_buffer(depth * kChunkBytes);
  if (op == Op::read_fixed) {
    std::vector<iovec> iov;
    for (int i = 0; i < depth; ++i) iov.push_back({buffers.get() + i * kChunkBytes, kChunkBytes});
    if (const int rc = ring->register_buffers(iov); rc < 0) {
      state.SkipWithError(("register_buffers: " + std::string(std::strerror(-rc))).c_str());
      return;
    }
  }
  Completion slots[kDepthMax];
  for (int i = 0; i < depth; ++i) {
    slots[i].op = op;
    slots[i].fd = fd;
    slots[i].buf = buffers.get() + i * kChunkBytes;
    slots[i].len = kChunkBytes;
    slots[i].buf_index = op == Op::read_fixed ? i : -1;
  }
  for (auto _ : state) {
    size_t next = 0;
    for (int i = 0; i < depth; ++i, next += kChunkBytes) {
      slots[i].offset = static_cast<int64_t>(next);
      ring->queue(&slots[i]);
    }
    bool failed = false;
    while (ring->in_flight() > 0) {
      if (ring->submit(1) < 0) failed = true;
      Completion* done[kDepthMax];
      const size_t n = ring->reap(done);
      for (size_t i = 0; i < n; ++i) {
        if (done[i]->result != static_cast<int32_t>(kChunkBytes)) failed = true;
        benchmark::DoNotOptimize(static_cast<char*>(done[i]->buf)[0]);
        if (!failed && next < kFileBytes) {
          done[i]->offset = static_cast<int64_t>(next);
          next += kChunkBytes;
          ring->queue(done[i]);
        }
      }
      if (failed && ring->in_flight() == 0) break;
    }
    if (failed) {
      state.SkipWithError("short or failed read");
      break;
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(kFileBytes));
}

// A connected loopback pair whose far end is drained by a thread until the near end shuts down.
class LoopbackSink {
 public:
  LoopbackSink() {
    Fd listener = dstx::io::tcp_listen({"127.0.0.1", 0});
    sender_ = dstx::io::tcp_connect({"127.0.0.1", dstx::io::bound_port(listener.get())}, {});
    receiver_ = dstx::io::tcp_accept(listener.get(), 5000, {});
    drain_ = std::thread([fd = receiver_.get()] {
      std::vector<char> sink(kChunkBytes);
      while (::recv(fd, sink.data(), sink.size(), 0) > 0) {
      }
    });
  }
  ~LoopbackSink() {
    ::shutdown(sender_.get(), SHUT_WR);
    drain_.join();
  }
  int fd() const { return sender_.get(); }

 private:
  Fd sender_;
  Fd receiver_;
  std::thread drain_;
};

// Sends one message of range(0) bytes per iteration, one operation in flight, looping over short sends.
void BM_Send(benchmark::State& state, Backend backend, Op op, bool registered) {
  if (!usable(state, backend, op)) return;
  const size_t message_bytes = static_cast<size_t>(state.range(0));
  auto ring = dstx::io::make_ring(backend, {kRingEntries});
  Buffer buffer = aligned_buffer(message_bytes);
  if (registered) {
    const iovec iov[1] = {{buffer.get(), message_bytes}};
    if (const int rc = ring->register_buffers(iov); rc < 0) {
      state.SkipWithError(("register_buffers: " + std::string(std::strerror(-rc))).c_str());
      return;
    }
  }
  LoopbackSink sink;
  Completion c;
  c.op = op;
  c.fd = sink.fd();
  c.buf_index = registered ? 0 : -1;
  for (auto _ : state) {
    size_t sent = 0;
    while (sent < message_bytes) {
      c.buf = buffer.get() + sent;
      c.len = static_cast<uint32_t>(message_bytes - sent);
      ring->queue(&c);
      Completion* done = nullptr;
      while (ring->reap({&done, 1}) == 0) ring->submit(1);
      if (c.result <= 0) break;
      sent += static_cast<size_t>(c.result);
    }
    if (sent < message_bytes) {
      state.SkipWithError(("send failed: " + std::string(std::strerror(-c.result))).c_str());
      break;
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(message_bytes));
}

void read_args(benchmark::internal::Benchmark* b) {
  b->ArgName("depth")->Arg(1)->Arg(4)->UseRealTime();
}
void send_args(benchmark::internal::Benchmark* b) {
  b->ArgName("bytes")->Arg(64 << 10)->Arg(256 << 10)->Arg(1 << 20)->UseRealTime();
}

BENCHMARK_CAPTURE(BM_FileRead, uring_read, Backend::uring, Op::read)->Apply(read_args);
BENCHMARK_CAPTURE(BM_FileRead, uring_read_fixed, Backend::uring, Op::read_fixed)->Apply(read_args);
BENCHMARK_CAPTURE(BM_FileRead, syscall_pread, Backend::syscall, Op::read)->Apply(read_args);

BENCHMARK_CAPTURE(BM_Send, uring_send, Backend::uring, Op::send, false)->Apply(send_args);
BENCHMARK_CAPTURE(BM_Send, uring_send_zc, Backend::uring, Op::send_zc, false)->Apply(send_args);
BENCHMARK_CAPTURE(BM_Send, uring_send_zc_fixed, Backend::uring, Op::send_zc, true)->Apply(send_args);
BENCHMARK_CAPTURE(BM_Send, syscall_send, Backend::syscall, Op::send, false)->Apply(send_args);

}  // namespace
