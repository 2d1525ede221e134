// Codec, zero-detection, hashing and content-generation throughput. Inputs come from io::ContentGenerator so
// the numbers line up with the end-to-end runs (same profiles, same ratios).
#include <benchmark/benchmark.h>

#include <array>
#include <cstring>
#include <string>
#include <vector>

#include "compress/codec.h"
#include "compress/hash.h"
#include "io/content.h"

namespace {

using dstx::compress::Codec;
using Bytes = std::vector<std::byte>;

constexpr size_t kMaxChunkBytes = 4 << 20;
constexpr int kProfileCount = 6;

// Generated once per profile, on first use; every chunk size is a prefix, so setup stays cheap under the
// smoke test's tiny time budget.
const Bytes& content(int profile) {
  static std::array<Bytes, kProfileCount> cache;
  Bytes& data = cache[static_cast<size_t>(profile)];
  if (data.empty()) {
    data.resize(kMaxChunkBytes);
    dstx::io::ContentGenerator(static_cast<dstx::io::Profile>(profile), 1).fill(0, data);
  }
  return data;
}

std::span<const std::byte> chunk(int profile, int64_t size) {
  return std::span(content(profile)).first(static_cast<size_t>(size));
}

void set_label(benchmark::State& state, int profile) {
  state.SetLabel(std::string(dstx::io::profile_name(static_cast<dstx::io::Profile>(profile))));
}

dstx::compress::EncodeOptions options(Codec codec) {
  dstx::compress::EncodeOptions opts;
  opts.codec = codec;
  opts.level = 1;
  opts.hash = dstx::compress::HashForm::pages;  // as transfers between current builds hash
  return opts;
}

void BM_IsZero(benchmark::State& state) {
  // All-zero input is the worst case: every byte must be read.
  const Bytes data(static_cast<size_t>(state.range(0)));
  for (auto _ : state) benchmark::DoNotOptimize(dstx::compress::is_zero(data.data(), data.size()));
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_IsZero)->Arg(4 << 10)->Arg(64 << 10)->Arg(1 << 20)->Arg(4 << 20);

void BM_Hash64(benchmark::State& state) {
  const auto data = chunk(/*random*/ 4, state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(dstx::compress::hash64(data.data(), data.size()));
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_Hash64)->Arg(4 << 10)->Arg(64 << 10)->Arg(1 << 20)->Arg(4 << 20);

// A chunk's hash as the receiver checks a raw chunk: XXH3-64 of its bytes, or of its non-zero pages, bitmap
// and length (the page scan included).
template <dstx::compress::HashForm kForm>
void BM_ChunkHash(benchmark::State& state) {
  const int profile = static_cast<int>(state.range(0));
  const auto raw = chunk(profile, state.range(1));
  for (auto _ : state) benchmark::DoNotOptimize(dstx::compress::chunk_hash(kForm, raw));
  state.SetBytesProcessed(state.iterations() * state.range(1));
  set_label(state, profile);
}
BENCHMARK_TEMPLATE(BM_ChunkHash, dstx::compress::HashForm::raw)
    ->ArgNames({"profile", "bytes"})
    ->ArgsProduct({benchmark::CreateDenseRange(0, kProfileCount - 1, 1), {1 << 20}});
BENCHMARK_TEMPLATE(BM_ChunkHash, dstx::compress::HashForm::pages)
    ->ArgNames({"profile", "bytes"})
    ->ArgsProduct({benchmark::CreateDenseRange(0, kProfileCount - 1, 1), {1 << 20}});

template <Codec kCodec>
void BM_Encode(benchmark::State& state) {
  const int profile = static_cast<int>(state.range(0));
  const auto raw = chunk(profile, state.range(1));
  Bytes out(dstx::compress::encode_bound(kCodec, raw.size()));
  const auto opts = options(kCodec);
  dstx::compress::EncodeResult result;
  for (auto _ : state) {
    result = dstx::compress::encode_chunk(opts, raw, out);
    benchmark::DoNotOptimize(result);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * state.range(1));
  state.counters["ratio"] = static_cast<double>(result.encoded_len) / static_cast<double>(raw.size());
  set_label(state, profile);
}

template <Codec kCodec>
void BM_Decode(benchmark::State& state) {
  const int profile = static_cast<int>(state.range(0));
  const auto raw = chunk(profile, state.range(1));
  Bytes out(dstx::compress::encode_bound(kCodec, raw.size()));
  const auto result = dstx::compress::encode_chunk(options(kCodec), raw, out);
  // Codec none sends the raw bytes themselves; a zero chunk sends nothing.
  std::span<const std::byte> payload = raw;
  if (result.zero) payload = {};
  if (!result.zero && result.codec != Codec::none) payload = std::span(out).first(result.encoded_len);
  Bytes back(raw.size());
  for (auto _ : state) {
    const auto err = dstx::compress::decode_chunk(result.codec, result.zero, payload, back, result.hash, 0,
                                                  dstx::compress::HashForm::pages);
    if (err != dstx::compress::DecodeError::ok) {
      state.SkipWithError(dstx::compress::decode_error_text(err));
      break;
    }
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * state.range(1));
  state.counters["ratio"] = static_cast<double>(result.encoded_len) / static_cast<double>(raw.size());
  set_label(state, profile);
}

void codec_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"profile", "bytes"});
  b->ArgsProduct(
      {benchmark::CreateDenseRange(0, kProfileCount - 1, 1), {64 << 10, 256 << 10, 1 << 20, 4 << 20}});
}
BENCHMARK_TEMPLATE(BM_Encode, Codec::lz4)->Apply(codec_args);
BENCHMARK_TEMPLATE(BM_Encode, Codec::zstd)->Apply(codec_args);
BENCHMARK_TEMPLATE(BM_Decode, Codec::lz4)->Apply(codec_args);
BENCHMARK_TEMPLATE(BM_Decode, Codec::zstd)->Apply(codec_args);

void BM_Generate(benchmark::State& state) {
  const int profile = static_cast<int>(state.range(0));
  const dstx::io::ContentGenerator gen(static_cast<dstx::io::Profile>(profile), 1);
  Bytes out(1 << 20);
  uint64_t offset = 0;
  for (auto _ : state) {
    // A new range each time: content is per page, and generating the same pages again would be the same work
    // anyway, but this also keeps mixed cycling through its runs.
    gen.fill(offset, out);
    offset += out.size();
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(out.size()));
  set_label(state, profile);
}
BENCHMARK(BM_Generate)->ArgName("profile")->DenseRange(0, kProfileCount - 1, 1);

}  // namespace
