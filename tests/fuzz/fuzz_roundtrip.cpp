// Fuzz target: encode_chunk then decode_chunk must give back the input bytes, and encoding is deterministic.
//
// Input: codec (1 byte, mod 4), zstd level (1 byte, -5..12), option bits (1 byte), page bitmap (1 byte), tail
// length (1 byte), then content bytes.
//   option bit 0: detect_zero   bit 1: probe_incompressible   bit 2: sparse_fallback   bit 4: paged (with
//          the scratch it needs)   bit 5: hash in compress::HashForm::pages
//   bit 3: build the chunk from pages: 8 pages of 4096 bytes, page i present when bitmap bit i is set (filled
//          by cycling the content bytes), absent pages zero, then `tail * 17` more content bytes; otherwise
//          the chunk is the content bytes as they are.
//
// Checks, for every chunk: decode(encode(x)) == x with the hash encode reported; encoding twice gives the
// same result and the same payload bytes; the payload never grows past the raw size nor past the bound the
// decoder (and the wire) accept; a compressed payload is strictly smaller than the chunk; the codec used is
// one the options allow; the DATA header describing the chunk passes the receiver's wire checks.
#include <vector>

#include "compress/codec.h"
#include "engine/wire.h"
#include "fuzz_support.h"

namespace {

using namespace dstx;

std::vector<std::byte> build_chunk(uint8_t bitmap, uint8_t tail, std::span<const uint8_t> content) {
  constexpr size_t kPage = 4096;
  std::vector<std::byte> raw(8 * kPage + size_t(tail) * 17, std::byte{0});
  size_t k = 0;
  auto next = [&] {
    // Empty content still gives non-zero pages: a fixed ramp.
    const uint8_t b = content.empty() ? uint8_t(k * 7 + 1) : content[k % content.size()];
    ++k;
    return std::byte{b};
  };
  for (size_t page = 0; page < 8; ++page) {
    if (!(bitmap >> page & 1)) continue;
    for (size_t i = 0; i < kPage; ++i) raw[page * kPage + i] = next();
  }
  for (size_t i = 8 * kPage; i < raw.size(); ++i) raw[i] = next();
  return raw;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Reader in(data, size);
  compress::EncodeOptions opts;
  opts.codec = compress::Codec(in.u8() % compress::kCodecCount);
  opts.level = int(in.u8() % 18) - 5;
  const uint8_t bits = in.u8();
  opts.detect_zero = bits & 1;
  opts.probe_incompressible = bits & 2;
  opts.sparse_fallback = bits & 4;
  opts.paged = bits & 16;
  opts.hash = (bits & 32) ? compress::HashForm::pages : compress::HashForm::raw;
  const uint8_t bitmap = in.u8();
  const uint8_t tail = in.u8();
  const auto content = in.rest();

  std::vector<std::byte> raw;
  if (bits & 8) {
    raw = build_chunk(bitmap, tail, content);
  } else {
    raw.assign(reinterpret_cast<const std::byte*>(content.data()),
               reinterpret_cast<const std::byte*>(content.data()) + content.size());
  }

  // The sender sizes its buffer from the preferred codec; sparse_fallback may also write sparse into it.
  const size_t cap =
      std::max(compress::encode_bound(opts.codec, raw.size()), opts.sparse_fallback ? raw.size() : size_t(0));
  std::vector<std::byte> out1(cap), out2(cap);
  std::vector<std::byte> scratch(opts.paged ? compress::paged_scratch_bytes(raw.size()) : 0);
  const compress::EncodeResult r1 = compress::encode_chunk(opts, raw, out1, scratch);
  const compress::EncodeResult r2 = compress::encode_chunk(opts, raw, out2, scratch);

  FUZZ_CHECK(
      r1.codec == r2.codec && r1.zero == r2.zero && r1.encoded_len == r2.encoded_len && r1.hash == r2.hash &&
          r1.paged_len == r2.paged_len,
      "two encodings of one chunk differ (codec %u/%u, len %u/%u)", unsigned(r1.codec), unsigned(r2.codec),
      r1.encoded_len, r2.encoded_len);
  if (r1.codec != compress::Codec::none && !r1.zero) {
    FUZZ_CHECK(std::memcmp(out1.data(), out2.data(), r1.encoded_len) == 0,
               "two encodings differ in their bytes");
  }

  if (r1.zero) {
    FUZZ_CHECK(opts.detect_zero, "a zero chunk reported without detect_zero");
    FUZZ_CHECK(r1.encoded_len == 0 && r1.hash == 0 && r1.codec == compress::Codec::none,
               "zero chunk with payload");
  } else {
    // A paged chunk that does not shrink goes out as its sparse form, fallback or not.
    const bool paged_codec =
        opts.paged && (opts.codec == compress::Codec::lz4 || opts.codec == compress::Codec::zstd);
    FUZZ_CHECK(r1.codec == compress::Codec::none || r1.codec == opts.codec ||
                   ((opts.sparse_fallback || paged_codec) && r1.codec == compress::Codec::sparse),
               "codec %u used, options allow %u (sparse fallback %d, paged %d)", unsigned(r1.codec),
               unsigned(opts.codec), opts.sparse_fallback, opts.paged);
    FUZZ_CHECK(r1.hash == compress::chunk_hash(opts.hash, raw), "reported hash is not the chunk's (form %u)",
               unsigned(opts.hash));
    FUZZ_CHECK(r1.paged_len == 0 || (opts.paged && (r1.codec == compress::Codec::lz4 ||
                                                     r1.codec == compress::Codec::zstd) &&
                                     r1.paged_len > compress::sparse_bitmap_bytes(raw.size()) &&
                                     r1.paged_len < raw.size() && r1.encoded_len < r1.paged_len),
               "paged payload of %u bytes (sparse form %u) for codec %u, chunk %zu", r1.encoded_len,
               r1.paged_len, unsigned(r1.codec), raw.size());
    if (r1.codec == compress::Codec::none) {
      FUZZ_CHECK(r1.encoded_len == raw.size(), "raw chunk of %zu with encoded_len %u", raw.size(),
                 r1.encoded_len);
    } else {
      FUZZ_CHECK(r1.encoded_len < raw.size(), "codec %u grew a %zu-byte chunk to %u", unsigned(r1.codec),
                 raw.size(), r1.encoded_len);
      FUZZ_CHECK(r1.encoded_len > 0 && r1.encoded_len <= compress::encode_bound(r1.codec, raw.size()),
                 "payload %u outside 1..bound", r1.encoded_len);
    }
  }

  // Decode as the receiver does: into a buffer of exactly raw_len bytes.
  const std::span<const std::byte> enc = r1.zero ? std::span<const std::byte>()
                                         : r1.codec == compress::Codec::none
                                             ? std::span<const std::byte>(raw)
                                             : std::span<const std::byte>(out1.data(), r1.encoded_len);
  std::vector<std::byte> back(raw.size(), std::byte{0x5a});
  const compress::DecodeError err =
      compress::decode_chunk(r1.codec, r1.zero, enc, back, r1.hash, r1.paged_len, opts.hash);
  FUZZ_CHECK(err == compress::DecodeError::ok, "decoding our own codec %u payload of %u bytes (raw %zu): %s",
             unsigned(r1.codec), r1.encoded_len, raw.size(), compress::decode_error_text(err));
  FUZZ_CHECK(back == raw, "round trip changed the bytes (codec %u)", unsigned(r1.codec));

  // The receiver's wire checks accept the DATA header the sender would build, at the tightest chunk limit.
  if (!raw.empty()) {
    const engine::wire::Header h{.type = engine::wire::FrameType::data,
                                 .codec = uint8_t(r1.codec),
                                 .flags = uint16_t(r1.zero ? engine::wire::kFlagZero
                                                   : r1.paged_len ? engine::wire::kFlagPaged
                                                                  : 0),
                                 .seq = 1,
                                 .raw_len = uint32_t(raw.size()),
                                 .payload_len = r1.encoded_len,
                                 .hash = r1.hash,
                                 .aux = r1.paged_len};
    std::byte frame[engine::wire::kHeaderBytes];
    engine::wire::encode_header(h, std::span<std::byte, engine::wire::kHeaderBytes>(frame));
    engine::wire::Header decoded;
    const auto werr = engine::wire::decode_header(
        std::span<const std::byte, engine::wire::kHeaderBytes>(frame), uint32_t(raw.size()), &decoded);
    FUZZ_CHECK(werr == engine::wire::Error::ok, "the wire rejects an encoder result: %s",
               engine::wire::error_text(werr));
  }
  return 0;
}
