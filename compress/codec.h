// Chunk codecs (none, lz4, zstd), zero-chunk detection and the chunk encode/decode with strict bounds.
// Knows nothing of the wire protocol or of I/O.
#pragma once

#include <algorithm>
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

class Hasher64;

// What a chunk's hash covers (the wire protocol says which one a transfer uses).
//   raw:   XXH3-64 of the chunk's bytes.
//   pages: XXH3-64 of its present pages (4 KiB pages not all zero; the last may be short) in order, then of
//          its page bitmap (sparse_bitmap_bytes; bit i set = page i present), then of its length (8 bytes,
//          little-endian): its sparse form with the bitmap moved to the end, and the length. Still a function
//          of the chunk's bytes, but zero pages are never hashed: a receiver verifies a sparse payload
//          without touching them, and on state with 85 % zero pages both ends hash 7x fewer bytes.
enum class HashForm : uint8_t { raw, pages };

std::string_view codec_name(Codec codec);
// Accepts "none", "lz4", "zstd", "sparse". Returns false for anything else.
bool codec_from_name(std::string_view name, Codec* out);
bool codec_valid(uint8_t value);

// Largest encoded size `codec` may produce for `raw_len` bytes (what the decoder accepts at most).
// For none it is raw_len. 0 for an unknown codec.
size_t encode_bound(Codec codec, size_t raw_len);

// True when every byte of [data, data+len) is zero. Fast path: word-wise, vectorisable.
bool is_zero(const void* data, size_t len);

// Cheap guess (samples a few KiB with lz4) whether `raw` would shrink by less than ~3%. skip_zero: leaves
// all-zero samples out (what a paged chunk's compression never sees).
bool looks_incompressible(std::span<const std::byte> raw, bool skip_zero = false);

// lz4's compressed/raw size on a sample of `raw`: 32 pieces of 256 bytes spread evenly over it, compressed
// in one call (8 KiB; about 1 % of compressing a 1 MiB chunk). Small pieces compress worse than the whole
// chunk, so the number is coarse, but it ranks chunks by compressibility well: on binary state, compressing
// the 40 % of chunks it rates best saves 1.4x the wire bytes per CPU second of compressing 40 % at random.
// Inputs up to 8 KiB are compressed whole. 0 for an empty input.
double estimate_ratio(std::span<const std::byte> raw, bool skip_zero = false);
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
  // A sparse result writes only its bitmap into `out`; its present pages stay where they are in `raw`, for a
  // caller that sends them from there in pieces (for_each_sparse_page_run). encoded_len counts them all.
  bool sparse_gather = false;
  // lz4 and zstd: a chunk with zero pages has its sparse form (bitmap and present pages, gathered into the
  // caller's scratch) compressed instead of the whole chunk, so that its zero pages cost no compression time
  // (on state with 85 % zero pages lz4 runs 2.3x, zstd 1.7x faster per chunk). Needs a scratch of
  // paged_scratch_bytes(raw.size()).
  bool paged = false;
  HashForm hash = HashForm::raw;  // what EncodeResult::hash covers
};
inline size_t paged_scratch_bytes(size_t raw_len);

struct EncodeResult {
  Codec codec = Codec::none;  // codec actually used: none when the chunk did not shrink
  bool zero = false;          // all-zero chunk: nothing to send but the header
  uint32_t encoded_len = 0;   // bytes of payload (0 if zero, raw.size() if codec none)
  uint64_t hash = 0;          // the chunk's hash in EncodeOptions::hash's form (0 for a zero chunk)
  double estimate = -1;       // estimate_ratio() when max_estimate asked for it, else < 0
  bool over_limit = false;    // the estimate was above max_estimate (or kIncompressibleRatio): sent raw
  uint32_t paged_len = 0;     // > 0: codec lz4 or zstd compressed the chunk's sparse form, this many bytes
};

// Encodes `raw` into `out` (out.size() >= encode_bound(opts.codec, raw.size())).
// When the result's codec is none the payload is `raw` itself: nothing is copied into `out`.
EncodeResult encode_chunk(const EncodeOptions& opts, std::span<const std::byte> raw,
                          std::span<std::byte> out, std::span<std::byte> scratch = {});

enum class DecodeError : uint8_t {
  ok = 0,
  unknown_codec,
  bad_length,    // encoded length impossible for this codec and raw length
  corrupt,       // the decompressor rejected the payload or produced the wrong size, or a sparse form is
                 // malformed (a page past the end; in HashForm::pages, an all-zero page marked present)
  hash_mismatch  // the decoded chunk does not hash to the expected hash
};
const char* decode_error_text(DecodeError err);

// The hash of a chunk of bytes `raw` in `form`.
uint64_t chunk_hash(HashForm form, std::span<const std::byte> raw);

// Decodes one chunk into `raw_out` (exactly raw_len bytes). Checks every length before use, decodes only
// with the safe decoders, then verifies its hash in `form` against `expect_hash` (pages: a sparse or paged
// payload whose bitmap marks an all-zero page present is corrupt). `enc` may alias `raw_out` for codec
// none (then nothing is copied). A zero chunk requires enc.size()==0 and expect_hash==0 and fills zeros.
// paged_len > 0: `enc` is a paged payload (EncodeOptions::paged) whose sparse form is that long (decoded
// through a buffer of its own; the receiver decodes it in place with decode_paged instead).
DecodeError decode_chunk(Codec codec, bool zero, std::span<const std::byte> enc, std::span<std::byte> raw_out,
                         uint64_t expect_hash, size_t paged_len = 0, HashForm form = HashForm::raw);

// Sparse payloads taken as they are, without expanding them first (the receiver keeps a sparse chunk so until
// its sink takes it: zero pages are then never written, or written straight where they belong).
// A chunk's pages (the last may be short), its bitmap's size (one bit per page), and whether page i is present.
inline size_t sparse_page_count(size_t raw_len) {
  return (raw_len + kSparsePageBytes - 1) / kSparsePageBytes;
}
inline size_t sparse_bitmap_bytes(size_t raw_len) {
  return (sparse_page_count(raw_len) + 7) / 8;
}
inline bool sparse_page_present(std::span<const std::byte> bitmap, size_t i) {
  return (std::to_integer<unsigned>(bitmap[i / 8]) >> (i % 8)) & 1u;
}
// Checks the layout of a sparse payload for a chunk of raw_len bytes (what decode_chunk checks before it
// writes anything), then that the chunk it stands for hashes to expect_hash in `form` (raw: its zero pages
// hashed from a static zero page; pages: not at all, and an all-zero page marked present is corrupt).
// `hasher` is scratch state.
DecodeError verify_sparse(std::span<const std::byte> enc, size_t raw_len, uint64_t expect_hash,
                          Hasher64& hasher, HashForm form = HashForm::raw);
// Calls fn(offset, len, present) for each maximal run of present or of zero pages of a chunk of raw_len bytes,
// in order, as `bitmap` (sparse_bitmap_bytes(raw_len) bytes) has them.
template <class Fn>
void for_each_sparse_page_run(std::span<const std::byte> bitmap, size_t raw_len, Fn&& fn) {
  const size_t pages = sparse_page_count(raw_len);
  for (size_t i = 0; i < pages;) {
    const bool kind = sparse_page_present(bitmap, i);
    size_t j = i + 1;
    while (j < pages && sparse_page_present(bitmap, j) == kind) ++j;
    const size_t off = i * kSparsePageBytes;
    fn(off, std::min(j * kSparsePageBytes, raw_len) - off, kind);
    i = j;
  }
}
// Calls fn(offset, len, data) for each maximal run of present pages (data points into enc) and of zero pages
// (data is nullptr), in order. Only for a payload that passed verify_sparse.
template <class Fn>
void for_each_sparse_run(std::span<const std::byte> enc, size_t raw_len, Fn&& fn) {
  const size_t bitmap = sparse_bitmap_bytes(raw_len);
  const std::byte* at = enc.data() + bitmap;
  for_each_sparse_page_run(enc.first(bitmap), raw_len, [&](size_t off, size_t len, bool present) {
    fn(off, len, present ? at : nullptr);
    if (present) at += len;
  });
}
// A paged payload (EncodeOptions::paged): decompresses `enc` (lz4 or zstd) into exactly sparse_out.size()
// bytes, the sparse form of a chunk of raw_len bytes, and checks its layout as decode_chunk would (then
// verify_sparse checks its hash, and for_each_sparse_run or expand_sparse_at_end take it from there).
DecodeError decode_paged(Codec codec, std::span<const std::byte> enc, std::span<std::byte> sparse_out,
                         size_t raw_len);
inline size_t paged_scratch_bytes(size_t raw_len) { return sparse_bitmap_bytes(raw_len) + raw_len; }

// Expands a payload that passed verify_sparse and lies at the end of buf (its last enc_len bytes) into
// buf's first raw_len bytes, in place (buf.size() >= raw_len). Every page moves towards the start of buf or
// stays, so one pass from the first page to the last never overwrites bytes it has yet to move.
void expand_sparse_at_end(std::span<std::byte> buf, size_t enc_len, size_t raw_len);

}  // namespace dstx::compress
