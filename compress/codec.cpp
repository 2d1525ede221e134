#include "compress/codec.h"

#include <lz4.h>
#include <zstd.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "compress/hash.h"

namespace dstx::compress {
namespace {

// The probe compresses a few samples of this size; below kProbeMinBytes compressing the whole chunk costs
// about as much as the probe, so it is skipped.
constexpr size_t kProbeSampleBytes = 2048;
constexpr size_t kProbeSamples = 8;
constexpr size_t kProbeMinBytes = 32 * 1024;

// Anything bigger than LZ4's own input limit is never lz4-compressed; the limit also keeps every size that
// crosses LZ4's int-based API representable.
constexpr size_t kLz4MaxRawBytes = LZ4_MAX_INPUT_SIZE;
static_assert(kLz4MaxRawBytes <= INT_MAX);

size_t lz4_bound(size_t raw_len) {
  // LZ4_COMPRESSBOUND casts to unsigned, which would wrap a size_t above 4 GiB: range-check first.
  if (raw_len > kLz4MaxRawBytes) return 0;
  return raw_len + raw_len / 255 + 16;
}

// One compression and one decompression context per thread: creating them per chunk costs more than
// compressing a small chunk, and a context is not safe to share between threads.
struct ZstdContexts {
  ZSTD_CCtx* cctx = nullptr;
  ZSTD_DCtx* dctx = nullptr;
  ZstdContexts() = default;
  ZstdContexts(const ZstdContexts&) = delete;
  ZstdContexts& operator=(const ZstdContexts&) = delete;
  ~ZstdContexts() {
    ZSTD_freeCCtx(cctx);
    ZSTD_freeDCtx(dctx);
  }
};
thread_local ZstdContexts tls_zstd;

ZSTD_CCtx* zstd_cctx() {
  if (tls_zstd.cctx == nullptr) tls_zstd.cctx = ZSTD_createCCtx();
  if (tls_zstd.cctx == nullptr) throw std::bad_alloc();
  return tls_zstd.cctx;
}

ZSTD_DCtx* zstd_dctx() {
  if (tls_zstd.dctx == nullptr) tls_zstd.dctx = ZSTD_createDCtx();
  if (tls_zstd.dctx == nullptr) throw std::bad_alloc();
  return tls_zstd.dctx;
}

// Returns the compressed size, or 0 when the output would not fit in `capacity` (the caller then sends raw).
size_t compress_lz4(std::span<const std::byte> raw, std::byte* out, size_t capacity) {
  if (raw.size() > kLz4MaxRawBytes) return 0;
  const int n = LZ4_compress_default(reinterpret_cast<const char*>(raw.data()), reinterpret_cast<char*>(out),
                                     static_cast<int>(raw.size()),
                                     static_cast<int>(std::min<size_t>(capacity, INT_MAX)));
  return n > 0 ? static_cast<size_t>(n) : 0;
}

size_t compress_zstd(std::span<const std::byte> raw, std::byte* out, size_t capacity, int level) {
  const size_t n = ZSTD_compressCCtx(zstd_cctx(), out, capacity, raw.data(), raw.size(), level);
  return ZSTD_isError(n) ? 0 : n;
}

DecodeError decode_lz4(std::span<const std::byte> enc, std::span<std::byte> raw_out) {
  const size_t raw_len = raw_out.size();
  if (raw_len == 0 || raw_len > kLz4MaxRawBytes) return DecodeError::bad_length;
  if (enc.empty() || enc.size() > lz4_bound(raw_len)) return DecodeError::bad_length;
  // Both sizes are now <= LZ4_MAX_INPUT_SIZE + bound slack < INT_MAX, so the int casts are exact.
  const int n =
      LZ4_decompress_safe(reinterpret_cast<const char*>(enc.data()), reinterpret_cast<char*>(raw_out.data()),
                          static_cast<int>(enc.size()), static_cast<int>(raw_len));
  if (n < 0 || static_cast<size_t>(n) != raw_len) return DecodeError::corrupt;
  return DecodeError::ok;
}

DecodeError decode_zstd(std::span<const std::byte> enc, std::span<std::byte> raw_out) {
  const size_t raw_len = raw_out.size();
  if (raw_len == 0) return DecodeError::bad_length;
  if (enc.empty() || enc.size() > encode_bound(Codec::zstd, raw_len)) return DecodeError::bad_length;
  // Our encoder always records the content size in the frame header: a different one is a length error
  // caught before any decompression work.
  const unsigned long long declared = ZSTD_getFrameContentSize(enc.data(), enc.size());
  if (declared == ZSTD_CONTENTSIZE_ERROR) return DecodeError::corrupt;
  if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != raw_len) return DecodeError::bad_length;
  const size_t n = ZSTD_decompressDCtx(zstd_dctx(), raw_out.data(), raw_len, enc.data(), enc.size());
  if (ZSTD_isError(n) || n != raw_len) return DecodeError::corrupt;
  return DecodeError::ok;
}

// A 16-byte GCC/Clang vector: one SSE2 register on the x86-64 baseline (a wider type would change the
// calling convention without -mavx and draws -Wpsabi), NEON on arm64.
typedef uint64_t Vec16 __attribute__((vector_size(16)));

// Sets bit i of `bits` (sparse_bitmap_bytes(raw.size()) bytes) when page i of raw is not all zero, clears it
// otherwise. Returns the present pages' bytes. A non-zero page usually shows it in its first bytes.
size_t page_bitmap(std::span<const std::byte> raw, std::byte* bits) {
  if (raw.empty()) return 0;  // no bitmap (and bits may be null)
  std::memset(bits, 0, sparse_bitmap_bytes(raw.size()));
  size_t present = 0;
  for (size_t i = 0; i < sparse_page_count(raw.size()); ++i) {
    const size_t off = i * kSparsePageBytes;
    const size_t len = std::min(kSparsePageBytes, raw.size() - off);
    if (is_zero(raw.data() + off, len)) continue;
    bits[i / 8] |= std::byte(1u << (i % 8));
    present += len;
  }
  return present;
}

// Per-thread scratch: a page bitmap of at least n bytes, and a streaming hasher.
std::byte* scratch_bitmap(size_t n) {
  thread_local std::vector<std::byte> bits;
  if (bits.size() < n) bits.resize(n);
  return bits.data();
}
Hasher64& scratch_hasher() {
  thread_local Hasher64 hasher;
  return hasher;
}

// HashForm::pages ends with the chunk's length.
uint64_t length_digest(Hasher64& hasher, size_t raw_len) {
  std::array<std::byte, 8> le;
  for (size_t i = 0; i < le.size(); ++i) le[i] = std::byte(uint64_t(raw_len) >> (8 * i));
  hasher.update(le.data(), le.size());
  return hasher.digest();
}

// HashForm::pages of the chunk `raw` whose page bitmap is `bits`.
uint64_t pages_hash(std::span<const std::byte> raw, std::span<const std::byte> bits, Hasher64& hasher) {
  hasher.reset();
  for_each_sparse_page_run(bits, raw.size(), [&](size_t off, size_t len, bool present) {
    if (present) hasher.update(raw.data() + off, len);
  });
  hasher.update(bits.data(), bits.size());
  return length_digest(hasher, raw.size());
}

// HashForm::pages of the chunk `raw`, its page bitmap written into `bits` (sparse_bitmap_bytes(raw.size())
// bytes) and its present pages' bytes into `present`.
uint64_t scan_and_hash_pages(std::span<const std::byte> raw, std::byte* bits, size_t* present) {
  *present = page_bitmap(raw, bits);
  return pages_hash(raw, std::span<const std::byte>(bits, sparse_bitmap_bytes(raw.size())), scratch_hasher());
}

// Whether the chunk of raw_len bytes whose sparse form (layout checked) is `sparse` hashes to `expect` in
// `form`. pages: a present page that is all zero makes the form corrupt, as page_bitmap never sets its bit
// (the hash is then a function of the chunk's bytes, one form per chunk).
DecodeError check_sparse_hash(HashForm form, std::span<const std::byte> sparse, size_t raw_len,
                              uint64_t expect, Hasher64& hasher) {
  const size_t bitmap = sparse_bitmap_bytes(raw_len);
  hasher.reset();
  if (form == HashForm::pages) {
    // The present pages lie packed in order; only the chunk's last page may be short, and it comes last.
    for (size_t at = bitmap; at < sparse.size(); at += kSparsePageBytes) {
      if (is_zero(sparse.data() + at, std::min(kSparsePageBytes, sparse.size() - at)))
        return DecodeError::corrupt;
    }
    hasher.update(sparse.data() + bitmap, sparse.size() - bitmap);
    hasher.update(sparse.data(), bitmap);
    return length_digest(hasher, raw_len) == expect ? DecodeError::ok : DecodeError::hash_mismatch;
  }
  // Zero runs are hashed from this buffer, which stays in the L1 cache: no page of the chunk is written.
  alignas(64) static constexpr std::byte kZeroRun[4 * kSparsePageBytes]{};
  for_each_sparse_run(sparse, raw_len, [&](size_t, size_t len, const std::byte* data) {
    if (data) {
      hasher.update(data, len);
      return;
    }
    for (size_t done = 0; done < len;) {
      const size_t n = std::min(len - done, sizeof kZeroRun);
      hasher.update(kZeroRun, n);
      done += n;
    }
  });
  return hasher.digest() == expect ? DecodeError::ok : DecodeError::hash_mismatch;
}

// Returns the payload size, or 0 when the chunk has no zero page or the payload does not fit. `gather`:
// writes the bitmap only (the caller sends the present pages from raw). `bits`: the chunk's page bitmap when
// the caller has it, `present` what page_bitmap returned with it.
size_t compress_sparse(std::span<const std::byte> raw, std::byte* out, size_t capacity, bool gather = false,
                       const std::byte* bits = nullptr, size_t present = 0) {
  const size_t bitmap = sparse_bitmap_bytes(raw.size());
  if (capacity < bitmap) return 0;
  // The zero pages first, and copies only when there is one: most raw chunks have none, and copying them for
  // nothing would double their cost.
  if (bits)
    std::memcpy(out, bits, bitmap);
  else
    present = page_bitmap(raw, out);
  const size_t n = bitmap + present;
  if (present == raw.size() || n > capacity) return 0;  // no zero page, or no room
  if (gather) return n;
  std::byte* at = out + bitmap;
  for_each_sparse_page_run(std::span<const std::byte>(out, bitmap), raw.size(),
                           [&](size_t off, size_t len, bool here) {
                             if (!here) return;
                             std::memcpy(at, raw.data() + off, len);
                             at += len;
                           });
  return n;
}

// The whole layout, before anything is written: bits past the last page must be clear and the present pages
// must account for the payload exactly.
DecodeError check_sparse(std::span<const std::byte> enc, size_t raw_len) {
  if (enc.size() > encode_bound(Codec::sparse, raw_len)) return DecodeError::bad_length;
  const size_t pages = sparse_page_count(raw_len);
  const size_t bitmap = sparse_bitmap_bytes(raw_len);
  if (enc.size() < bitmap) return DecodeError::bad_length;
  size_t expect = bitmap;
  for (size_t i = 0; i < bitmap * 8; ++i) {
    if (!sparse_page_present(enc, i)) continue;
    if (i >= pages) return DecodeError::corrupt;
    expect += std::min(kSparsePageBytes, raw_len - i * kSparsePageBytes);
  }
  return expect == enc.size() ? DecodeError::ok : DecodeError::bad_length;
}

DecodeError decode_sparse(std::span<const std::byte> enc, std::span<std::byte> raw_out) {
  if (const DecodeError err = check_sparse(enc, raw_out.size()); err != DecodeError::ok) return err;
  const size_t pages = sparse_page_count(raw_out.size());
  size_t n = sparse_bitmap_bytes(raw_out.size());
  for (size_t i = 0; i < pages; ++i) {
    const size_t off = i * kSparsePageBytes;
    const size_t len = std::min(kSparsePageBytes, raw_out.size() - off);
    if (sparse_page_present(enc, i)) {
      std::memcpy(raw_out.data() + off, enc.data() + n, len);
      n += len;
    } else {
      std::memset(raw_out.data() + off, 0, len);
    }
  }
  return DecodeError::ok;
}

inline Vec16 load16(const unsigned char* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline bool vec_zero(Vec16 v) {
  return (v[0] | v[1]) == 0;
}

}  // namespace

std::string_view codec_name(Codec codec) {
  switch (codec) {
    case Codec::none:
      return "none";
    case Codec::lz4:
      return "lz4";
    case Codec::zstd:
      return "zstd";
    case Codec::sparse:
      return "sparse";
  }
  return "unknown";
}

bool codec_from_name(std::string_view name, Codec* out) {
  for (uint8_t value = 0; value < kCodecCount; ++value) {
    const auto codec = static_cast<Codec>(value);
    if (name == codec_name(codec)) {
      *out = codec;
      return true;
    }
  }
  return false;
}

bool codec_valid(uint8_t value) {
  return value < kCodecCount;
}

size_t encode_bound(Codec codec, size_t raw_len) {
  switch (codec) {
    case Codec::none:
      return raw_len;
    case Codec::lz4:
      return lz4_bound(raw_len);  // 0 beyond LZ4's input limit: such a chunk can only go raw
    case Codec::zstd: {
      const size_t bound = ZSTD_compressBound(raw_len);
      return ZSTD_isError(bound) ? 0 : bound;
    }
    case Codec::sparse:
      return sparse_bitmap_bytes(raw_len) + raw_len;
  }
  return 0;
}

bool is_zero(const void* data, size_t len) {
  const auto* p = static_cast<const unsigned char*>(data);
  if (len < 16) {
    unsigned char acc = 0;
    for (size_t i = 0; i < len; ++i) acc |= p[i];
    return acc == 0;
  }
  // Most non-zero chunks show it in their first bytes: settle those before streaming through the bulk.
  if (!vec_zero(load16(p))) return false;
  size_t i = 16;
  // 256 bytes per early-exit test keeps many independent loads in flight per branch.
  for (; i + 256 <= len; i += 256) {
    const unsigned char* b = p + i;
    Vec16 acc = load16(b);
    for (size_t k = 16; k < 256; k += 16) acc |= load16(b + k);
    if (!vec_zero(acc)) return false;
  }
  for (; i + 16 <= len; i += 16) {
    if (!vec_zero(load16(p + i))) return false;
  }
  // The last 16 bytes overlap what was already checked; cheaper than a byte loop for the remainder.
  return vec_zero(load16(p + len - 16));
}

namespace {

// lz4's compressed size of `data` (at most 16 KiB): up to LZ4_COMPRESSBOUND(data.size()) when it does not
// shrink.
size_t lz4_size(std::span<const std::byte> data) {
  static constexpr size_t kMaxPiece = 16 * 1024;
  assert(data.size() <= kMaxPiece);
  char out[LZ4_COMPRESSBOUND(kMaxPiece)];
  const int n = LZ4_compress_default(reinterpret_cast<const char*>(data.data()), out,
                                     static_cast<int>(data.size()), static_cast<int>(sizeof out));
  return n > 0 ? static_cast<size_t>(n) : data.size();
}

// Calls visit(piece) for `pieces` pieces of `piece_bytes` spread evenly over `raw` (the first at its start,
// the last at its end, the others aligned to 4 KiB, or to the piece size when smaller), until it returns
// false. `skip_zero`: all-zero pieces are left out (what a paged chunk never compresses). raw must be larger
// than pieces * piece_bytes (callers compress a smaller input whole).
template <typename Visit>
void for_each_sample(std::span<const std::byte> raw, size_t pieces, size_t piece_bytes, bool skip_zero,
                     const Visit& visit) {
  const size_t align = std::min<size_t>(piece_bytes, 4096);
  for (size_t i = 0; i < pieces; ++i) {
    const size_t offset =
        std::min(pieces > 1 ? (raw.size() * i / (pieces - 1)) & ~(align - 1) : 0, raw.size() - piece_bytes);
    const std::span<const std::byte> piece = raw.subspan(offset, piece_bytes);
    if (skip_zero && is_zero(piece.data(), piece.size())) continue;
    if (!visit(piece)) return;
  }
}

}  // namespace

// The probe: kProbeSamples pieces, each compressed alone, and the chunk called incompressible when together
// they shrink by less than kIncompressibleRatio allows. It stops as soon as the pieces left could no longer
// make it so (5-6 µs per 1 MiB chunk, random or not: 0.5 % of a core at 1 GB/s). Eight pieces of 2 KiB, not
// three of 4 KiB: on mixed state (runs of 1 to 64 pages, a third of them random) start, middle and end were
// all random in 65 of 512 chunks, which zstd then shrank to 0.44 on average, and auto sent 5 % more bytes
// than zstd at the same level; eight pieces leave 12 such chunks (and 4 KiB pieces no fewer).
bool looks_incompressible(std::span<const std::byte> raw, bool skip_zero) {
  if (raw.empty()) return false;
  // No bigger than the sample (encode_chunk never asks below kProbeMinBytes): compressed whole.
  if (raw.size() <= kProbeSamples * kProbeSampleBytes)
    return double(lz4_size(raw)) > kIncompressibleRatio * double(raw.size());
  constexpr double kPieceBound = LZ4_COMPRESSBOUND(kProbeSampleBytes);
  size_t in_bytes = 0, out_bytes = 0, left = kProbeSamples;
  bool shrinks = false;
  for_each_sample(raw, kProbeSamples, kProbeSampleBytes, skip_zero, [&](std::span<const std::byte> piece) {
    out_bytes += lz4_size(piece);
    in_bytes += piece.size();
    --left;
    // Even if every piece left did not shrink at all, the sample as a whole would.
    shrinks = double(out_bytes) + double(left) * kPieceBound <=
              kIncompressibleRatio * double(in_bytes + left * kProbeSampleBytes);
    return !shrinks;
  });
  return !shrinks && in_bytes > 0 && double(out_bytes) > kIncompressibleRatio * double(in_bytes);
}

// 32 pieces of 256 bytes, gathered and compressed in one call: one state initialisation instead of one per
// piece, but a piece that repeats another counts as compressible. An input no bigger than the sample is
// compressed whole. When every piece is zero (skip_zero) the ratio is 0.
double estimate_ratio(std::span<const std::byte> raw, bool skip_zero) {
  static constexpr size_t kPieces = 32, kPieceBytes = 256, kSample = kPieces * kPieceBytes;
  if (raw.empty()) return 0;
  if (raw.size() <= kSample) return double(lz4_size(raw)) / double(raw.size());
  std::byte sample[kSample];
  size_t taken = 0;
  for_each_sample(raw, kPieces, kPieceBytes, skip_zero, [&](std::span<const std::byte> piece) {
    std::memcpy(sample + taken, piece.data(), piece.size());
    taken += piece.size();
    return true;
  });
  return taken ? double(lz4_size(std::span<const std::byte>(sample, taken))) / double(taken) : 0;
}

EncodeResult encode_chunk(const EncodeOptions& opts, std::span<const std::byte> raw,
                          std::span<std::byte> out, std::span<std::byte> scratch) {
  if (raw.size() > UINT32_MAX) throw std::length_error("dstx: chunk larger than 4 GiB");
  EncodeResult result;
  if (opts.detect_zero && is_zero(raw.data(), raw.size())) {
    result.zero = true;
    return result;
  }
  result.codec = Codec::none;
  result.encoded_len = static_cast<uint32_t>(raw.size());
  // Hashing pages needs the page bitmap, and then so does any sparse form made below.
  const std::byte* bits = nullptr;
  size_t present = 0;
  if (opts.hash == HashForm::pages) {
    std::byte* b = scratch_bitmap(sparse_bitmap_bytes(raw.size()));
    result.hash = scan_and_hash_pages(raw, b, &present);
    bits = b;
  } else {
    result.hash = hash64(raw.data(), raw.size());
  }
  // Raw after all: still worth dropping the zero pages when the caller allows it.
  auto raw_result = [&] {
    if (opts.sparse_fallback && raw.size() > kSparsePageBytes) {
      const size_t n = compress_sparse(raw, out.data(), std::min(out.size(), raw.size() - 1),
                                       opts.sparse_gather, bits, present);
      if (n > 0) {
        result.codec = Codec::sparse;
        result.encoded_len = static_cast<uint32_t>(n);
      }
    }
    return result;
  };
  if (opts.codec == Codec::none || raw.size() < 2) return raw_result();
  // Paged: the zero pages are never compressed, so they are left out of the estimate and the probe too.
  const bool pageable = opts.paged && (opts.codec == Codec::lz4 || opts.codec == Codec::zstd) &&
                        raw.size() > kSparsePageBytes && scratch.size() >= paged_scratch_bytes(raw.size());
  if (opts.max_estimate >= 0) {
    result.estimate = estimate_ratio(raw, pageable);
    result.over_limit = result.estimate > std::min(opts.max_estimate, kIncompressibleRatio);
    if (result.over_limit) return raw_result();
  } else if (opts.probe_incompressible && raw.size() >= kProbeMinBytes) {
    if (looks_incompressible(raw, pageable)) return raw_result();
  }

  // Capping the output below raw.size() lets the compressor give up as soon as the chunk cannot shrink,
  // and makes "does not fit" and "did not shrink" the same answer: send raw.
  const size_t capacity = std::min(out.size(), raw.size() - 1);
  if (capacity == 0) return result;
  // Paged: the sparse form, when it leaves out at least one page (and so is shorter than the chunk), is what
  // gets compressed. If that does not shrink it, the sparse form itself goes: every receiver decodes it, and
  // it is shorter than the chunk (whatever the options say about a sparse fallback).
  std::span<const std::byte> input = raw;
  if (pageable) {
    const size_t s = compress_sparse(raw, scratch.data(), raw.size() - 1, false, bits, present);
    if (s > sparse_bitmap_bytes(raw.size())) input = std::span<const std::byte>(scratch.data(), s);
  }
  auto sparse_result = [&] {
    const size_t copy = opts.sparse_gather ? sparse_bitmap_bytes(raw.size()) : input.size();
    if (out.size() < copy) return raw_result();
    std::memcpy(out.data(), input.data(), copy);
    result.codec = Codec::sparse;
    result.encoded_len = static_cast<uint32_t>(input.size());
    return result;
  };
  const size_t limit = input.size() == raw.size() ? capacity : std::min(capacity, input.size() - 1);
  size_t n = 0;
  switch (opts.codec) {
    case Codec::lz4:
      n = compress_lz4(input, out.data(), limit);
      break;
    case Codec::zstd:
      n = compress_zstd(input, out.data(), limit, opts.level);
      break;
    case Codec::sparse:
      n = compress_sparse(raw, out.data(), capacity, opts.sparse_gather, bits, present);
      break;
    case Codec::none:
      break;
  }
  if (n == 0 || n >= input.size()) return input.size() == raw.size() ? raw_result() : sparse_result();
  result.codec = opts.codec;
  result.encoded_len = static_cast<uint32_t>(n);
  if (input.size() != raw.size()) result.paged_len = static_cast<uint32_t>(input.size());
  return result;
}

const char* decode_error_text(DecodeError err) {
  switch (err) {
    case DecodeError::ok:
      return "ok";
    case DecodeError::unknown_codec:
      return "unknown codec";
    case DecodeError::bad_length:
      return "encoded length impossible for this codec and raw length";
    case DecodeError::corrupt:
      return "corrupt payload (it does not decompress, or its page bitmap is malformed)";
    case DecodeError::hash_mismatch:
      return "decoded bytes do not match their chunk hash";
  }
  return "unknown decode error";
}

uint64_t chunk_hash(HashForm form, std::span<const std::byte> raw) {
  if (form == HashForm::raw) return hash64(raw.data(), raw.size());
  size_t present = 0;
  return scan_and_hash_pages(raw, scratch_bitmap(sparse_bitmap_bytes(raw.size())), &present);
}

DecodeError decode_chunk(Codec codec, bool zero, std::span<const std::byte> enc, std::span<std::byte> raw_out,
                         uint64_t expect_hash, size_t paged_len, HashForm form) {
  if (!codec_valid(static_cast<uint8_t>(codec))) return DecodeError::unknown_codec;
  DecodeError err = DecodeError::ok;
  std::vector<std::byte> sparse;
  if (paged_len > 0) {
    if (zero || paged_len >= raw_out.size()) return DecodeError::bad_length;
    sparse.resize(paged_len);
    err = decode_paged(codec, enc, sparse, raw_out.size());
    if (err == DecodeError::ok) err = decode_sparse(sparse, raw_out);
  } else if (zero) {
    if (!enc.empty()) return DecodeError::bad_length;
    if (expect_hash != 0) return DecodeError::hash_mismatch;
    if (!raw_out.empty()) std::memset(raw_out.data(), 0, raw_out.size());  // an empty span may have no data
    return DecodeError::ok;
  } else {
    switch (codec) {
      case Codec::none:
        if (enc.size() != raw_out.size()) return DecodeError::bad_length;
        // memmove: the caller may hand in overlapping views of one buffer; identical views need no copy.
        if (enc.data() != raw_out.data() && !enc.empty())
          std::memmove(raw_out.data(), enc.data(), enc.size());
        break;
      case Codec::lz4:
        err = decode_lz4(enc, raw_out);
        break;
      case Codec::zstd:
        err = decode_zstd(enc, raw_out);
        break;
      case Codec::sparse:
        err = decode_sparse(enc, raw_out);
        break;
    }
  }
  if (err != DecodeError::ok) return err;
  // A sparse form (its layout checked by decode_sparse) hashes in the pages form as it is.
  const std::span<const std::byte> sparse_form = paged_len > 0 ? std::span<const std::byte>(sparse)
                                                 : codec == Codec::sparse ? enc
                                                                          : std::span<const std::byte>();
  if (form == HashForm::pages && sparse_form.data())
    return check_sparse_hash(form, sparse_form, raw_out.size(), expect_hash, scratch_hasher());
  return chunk_hash(form, raw_out) == expect_hash ? DecodeError::ok : DecodeError::hash_mismatch;
}

DecodeError decode_paged(Codec codec, std::span<const std::byte> enc, std::span<std::byte> sparse_out,
                         size_t raw_len) {
  DecodeError err = DecodeError::unknown_codec;
  if (codec == Codec::lz4)
    err = decode_lz4(enc, sparse_out);
  else if (codec == Codec::zstd)
    err = decode_zstd(enc, sparse_out);
  if (err != DecodeError::ok) return err;
  return check_sparse(sparse_out, raw_len);
}

DecodeError verify_sparse(std::span<const std::byte> enc, size_t raw_len, uint64_t expect_hash,
                          Hasher64& hasher, HashForm form) {
  if (const DecodeError err = check_sparse(enc, raw_len); err != DecodeError::ok) return err;
  return check_sparse_hash(form, enc, raw_len, expect_hash, hasher);
}

void expand_sparse_at_end(std::span<std::byte> buf, size_t enc_len, size_t raw_len) {
  if (raw_len > buf.size() || enc_len > buf.size()) throw std::length_error("dstx: sparse payload beyond its buffer");
  std::byte* base = buf.data();
  const std::byte* enc = base + buf.size() - enc_len;
  // The first pages may land on the bitmap: keep a copy (one bit per page; 512 bytes for 16 MiB).
  const size_t bitmap_len = sparse_bitmap_bytes(raw_len);
  std::array<std::byte, 512> small{};
  std::unique_ptr<std::byte[]> large;
  std::byte* bitmap = small.data();
  if (bitmap_len > small.size()) {
    large = std::make_unique<std::byte[]>(bitmap_len);
    bitmap = large.get();
  }
  std::memcpy(bitmap, enc, bitmap_len);
  const std::span<const std::byte> bits(bitmap, bitmap_len);
  // Page i's place starts at or before its bytes (the payload is packed against the end of a buffer at
  // least raw_len long), and ends before the next present page's bytes begin: moving the pages in order,
  // each with memmove, never overwrites one still to come.
  const std::byte* from = enc + bitmap_len;
  const size_t pages = sparse_page_count(raw_len);
  for (size_t i = 0; i < pages; ++i) {
    const size_t off = i * kSparsePageBytes;
    const size_t len = std::min(kSparsePageBytes, raw_len - off);
    if (sparse_page_present(bits, i)) {
      if (base + off != from) std::memmove(base + off, from, len);
      from += len;
    } else {
      std::memset(base + off, 0, len);
    }
  }
}

}  // namespace dstx::compress
