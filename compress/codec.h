// Chunk codecs (none, lz4, zstd), zero-chunk detection and the chunk encode/decode with strict bounds.
// Knows nothing of the wire protocol or of I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace dstx::compress {

// Numbers are part of the wire format: never renumber.
// sparse: zero-page elision without compression, for chunks that go out uncompressed: a bitmap of the
// chunk's 4 KiB pages (bit set = page present), then the present pages in order.
enum class Codec : uint8_t { none = 0, lz4 = 1, zstd = 2, sparse = 3 };
inline constexpr unsigned kCodecCount = 4;
inline constexpr size_t kSparsePageBytes = 4096;

std::string_view codec_name(Codec codec);
// Accepts "none", "lz4", "zstd", "sparse". Returns false for anything else.
bool codec_from_name(std::string_view name, Codec* out);
bool codec_valid(uint8_t value);

// Largest encoded size `codec` may produce for `raw_len` bytes (what the decoder accepts at most).
// For none it is raw_len. 0 for an unknown codec.
size_t encode_bound(Codec codec, size_t raw_len);

// True when every byte of [data, data+len) is zero. Fast path: word-wise, vectorisable.
bool is_zero(const void* data, size_t len);

// Cheap guess (samples a few KiB with lz4) whether `raw` would shrink by less than ~3%.
bool looks_incompressible(std::span<const std::byte> raw);

// lz4's compressed/raw size on a sample of `raw`: 32 pieces of 256 bytes spread evenly over it, compressed
// in one call (8 KiB; about 1 % of compressing a 1 MiB chunk). Small pieces compress worse than the whole
// chunk, so the number is coarse, but it ranks chunks by compressibility well: on binary state, compressing
// the 40 % of chunks it rates best saves 1.4x the wire bytes per CPU second of compressing 40 % at random.
// Inputs up to 8 KiB are compressed whole. 0 for an empty input.
double estimate_ratio(std::span<const std::byte> raw);
inline constexpr double kIncompressibleRatio = 0.97;  // a chunk estimated above this would not shrink enough

struct EncodeOptions {
  Codec codec = Codec::lz4;  // preferred codec; none means "send raw"
  int level = 1;             // zstd level (lz4: acceleration is fixed at 1)
  bool detect_zero = true;
  bool probe_incompressible = true;  // use looks_incompressible() to skip hopeless compressions
  bool sparse_fallback = false;      // a chunk that would go raw goes sparse instead when it has zero pages
  // >= 0: compress only a chunk whose estimate_ratio() is at most this (and kIncompressibleRatio), send the
  // others raw (sparse with sparse_fallback), whatever the chunk's size; replaces probe_incompressible.
  double max_estimate = -1;
};

struct EncodeResult {
  Codec codec = Codec::none;  // codec actually used: none when the chunk did not shrink
  bool zero = false;          // all-zero chunk: nothing to send but the header
  uint32_t encoded_len = 0;   // bytes of payload (0 if zero, raw.size() if codec none)
  uint64_t hash = 0;          // XXH3-64 of the raw bytes (0 for a zero chunk)
  double estimate = -1;       // estimate_ratio() when max_estimate asked for it, else < 0
  bool over_limit = false;    // the estimate was above max_estimate (or kIncompressibleRatio): sent raw
};

// Encodes `raw` into `out` (out.size() >= encode_bound(opts.codec, raw.size())).
// When the result's codec is none the payload is `raw` itself: nothing is copied into `out`.
EncodeResult encode_chunk(const EncodeOptions& opts, std::span<const std::byte> raw,
                          std::span<std::byte> out);

enum class DecodeError : uint8_t {
  ok = 0,
  unknown_codec,
  bad_length,    // encoded length impossible for this codec and raw length
  corrupt,       // the decompressor rejected the payload or produced the wrong size
  hash_mismatch  // decoded bytes do not hash to the expected XXH3-64
};
const char* decode_error_text(DecodeError err);

// Decodes one chunk into `raw_out` (exactly raw_len bytes). Checks every length before use, decodes only
// with the safe decoders, then verifies XXH3-64 against `expect_hash`. `enc` may alias `raw_out` for codec
// none (then nothing is copied). A zero chunk requires enc.size()==0 and expect_hash==0 and fills zeros.
DecodeError decode_chunk(Codec codec, bool zero, std::span<const std::byte> enc, std::span<std::byte> raw_out,
                         uint64_t expect_hash);

}  // namespace dstx::compress
