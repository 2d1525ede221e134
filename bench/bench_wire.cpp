// Frame header encode/decode and the stream digest: the per-chunk protocol overhead.
#include <benchmark/benchmark.h>

#include <array>

#include "engine/wire.h"

namespace {

using namespace dstx::engine::wire;

const Header kData{.type = FrameType::data,
                   .codec = 1,
                   .seq = 42,
                   .offset = 42 << 20,
                   .raw_len = 1 << 20,
                   .payload_len = 400000,
                   .hash = 0x1234};

void BM_EncodeHeader(benchmark::State& state) {
  std::array<std::byte, kHeaderBytes> buf;
  Header h = kData;
  for (auto _ : state) {
    ++h.seq;
    encode_header(h, buf);
    benchmark::DoNotOptimize(buf);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EncodeHeader);

void BM_DecodeHeader(benchmark::State& state) {
  std::array<std::byte, kHeaderBytes> buf;
  encode_header(kData, buf);
  Header out;
  for (auto _ : state) {
    benchmark::DoNotOptimize(decode_header(buf, 1 << 20, &out));
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_DecodeHeader);

void BM_StreamDigestAdd(benchmark::State& state) {
  StreamDigest d;
  uint64_t seq = 0;
  for (auto _ : state) {
    ++seq;
    d.add(seq, 1 << 20, seq * 31);
  }
  benchmark::DoNotOptimize(d.value());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_StreamDigestAdd);

}  // namespace
