// The fault matrix: every transfer through a faulty path ends byte-exact and committed on both sides, or
// failed on both sides with nothing at the destination. Never half of each. Reproducible: the matrix is drawn
// from a seed (DSTX_FAULT_SEED, default fixed), printed with every failure.
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "engine/spec.h"
#include "engine/transfer.h"
#include "fault_proxy.h"
#include "scratch_dir.h"

namespace dstx::engine {
namespace {

namespace fs = std::filesystem;
using test::Fault;
using test::FaultProxy;

const char* kind_name(Fault::Kind k) {
  switch (k) {
    case Fault::none:
      return "none";
    case Fault::flip:
      return "flip";
    case Fault::cut:
      return "cut";
    case Fault::truncate:
      return "truncate";
    case Fault::duplicate:
      return "duplicate";
    case Fault::delay:
      return "delay";
  }
  return "?";
}

uint64_t seed_from_env() {
  const char* s = std::getenv("DSTX_FAULT_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 20261124;
}

struct Outcome {
  Result send;
  Result recv;
  bool fired = false;
};

Outcome run_through(const Fault& fault, unsigned streams, const fs::path& out,
                    const io::ContentGenerator& gen, uint64_t size) {
  auto src = io::open_emu_source(gen, size);
  auto sink = open_sink("file:" + out.string());
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  RecvOptions ro;
  ro.resume_timeout_ms = 3000;
  ro.idle_timeout_ms = 5000;
  Outcome run;
  std::thread receiver([&] { run.recv = receive(*sink, listener.get(), ro, nullptr, nullptr); });
  FaultProxy proxy(port, fault);
  SendOptions so{.streams = streams, .chunk_bytes = 128 << 10};
  so.reconnect_backoff_ms = 20;
  so.reconnect_attempts = 4;
  so.commit_timeout_ms = 10000;
  so.idle_timeout_ms = 5000;
  run.send = send_to(*src, io::HostPort{"127.0.0.1", proxy.port()}, so, nullptr, nullptr);
  receiver.join();
  run.fired = proxy.fired();
  return run;
}

bool file_equals_generator(const fs::path& p, const io::ContentGenerator& gen, uint64_t size) {
  std::ifstream f(p, std::ios::binary);
  std::vector<std::byte> buf(1 << 20);
  uint64_t off = 0;
  while (off < size) {
    const size_t n = size_t(std::min<uint64_t>(buf.size(), size - off));
    f.read(reinterpret_cast<char*>(buf.data()), std::streamsize(n));
    if (size_t(f.gcount()) != n || gen.first_mismatch(off, std::span(buf.data(), n)) != -1) return false;
    off += n;
  }
  return fs::file_size(p) == size;
}

TEST(FaultMatrix, EveryRunEndsCommittedAndExactOrFailedAndClean) {
  const uint64_t seed = seed_from_env();
  std::mt19937_64 rng(seed);
  const test::ScratchDir scratch("dstx-faults");
  const fs::path& dir = scratch.path();
  constexpr uint64_t size = 12 << 20;
  const Fault::Kind kinds[] = {Fault::flip, Fault::cut, Fault::truncate, Fault::duplicate, Fault::delay};
  for (int i = 0; i < 20; ++i) {
    Fault f;
    f.kind = kinds[i % 5];
    const unsigned streams = 1 + unsigned(rng() % 3);
    f.connection = int(rng() % streams);
    // Positions past the handshake (120 bytes), within what a stream carries of a 12 MiB mixed state.
    f.at = 120 + int64_t(rng() % (size / streams / 3));
    f.length = 1 + int64_t(rng() % 4096);
    f.delay_ms = 1;
    const io::ContentGenerator gen(io::Profile::mixed, rng());
    const fs::path out = dir / "out.bin";
    const Outcome r = run_through(f, streams, out, gen, size);
    const std::string what = "seed " + std::to_string(seed) + " run " + std::to_string(i) + ": " +
                             kind_name(f.kind) + " on connection " + std::to_string(f.connection) + " of " +
                             std::to_string(streams) + " at byte " + std::to_string(f.at) +
                             (r.fired ? "" : " (did not fire)") +
                             "; send: " + (r.send.committed ? "committed" : r.send.error) +
                             "; recv: " + (r.recv.committed ? "committed" : r.recv.error);
    // Both sides agree.
    EXPECT_EQ(r.send.committed, r.recv.committed) << what;
    if (r.send.committed && r.recv.committed) {
      EXPECT_EQ(r.send.digest, r.recv.digest) << what;
      EXPECT_TRUE(file_equals_generator(out, gen, size)) << what;
    } else {
      EXPECT_FALSE(fs::exists(out)) << what;
    }
    EXPECT_FALSE(fs::exists(out.string() + ".partial")) << what;
    // What each fault must lead to, once it fired.
    if (r.fired && (f.kind == Fault::flip || f.kind == Fault::duplicate)) {
      EXPECT_FALSE(r.recv.committed) << "corruption went unnoticed: " << what;
    }
    if (f.kind == Fault::delay || (r.fired && f.kind == Fault::cut) || !r.fired) {
      EXPECT_TRUE(r.recv.committed) << "a recoverable fault failed the transfer: " << what;
    }
    fs::remove(out);
  }
}

}  // namespace
}  // namespace dstx::engine
