// Fuzz target: the frame decoder, wire::decode_header, under varying negotiated chunk sizes.
//
// Input: flags (1 byte), chunk-size choice (1 byte), a raw u32 chunk size (4 bytes), then the 48 header bytes
// (zero-padded when short). Flag bit 0 repairs the header check so the per-type rules are reached.
//
// Checked against an oracle written from docs/wire-format.md (not from engine/wire.cpp):
//  - the decoder accepts exactly the headers the specification accepts, and reports magic, check and type
//    errors as such;
//  - an accepted header re-encodes to the same 48 bytes (every byte is a field or the check);
//  - an accepted header never announces a payload larger than the codec bound of the negotiated chunk size,
//    1024 bytes of ABORTED text or a HELLO payload: what a receiver reads next is bounded before it reads it;
//  - accepting under one chunk limit implies accepting under any larger one.
#include <lz4.h>
#include <zstd.h>

#include <algorithm>

#include "engine/wire.h"
#include "fuzz_support.h"

namespace {

using namespace dstx;
using engine::wire::Error;
using engine::wire::FrameType;

uint64_t spec_payload_bound(uint8_t codec, uint32_t raw_len) {
  switch (codec) {
    case 0:
      return raw_len;
    case 1:
      return LZ4_COMPRESSBOUND(raw_len);  // 0 past LZ4_MAX_INPUT_SIZE: nothing fits
    case 2: {
      const size_t b = ZSTD_compressBound(raw_len);
      return ZSTD_isError(b) ? 0 : b;
    }
    case 3: {  // bitmap of ceil(raw_len / 4096) pages, then the pages
      const uint64_t pages = (uint64_t(raw_len) + 4095) / 4096;
      return (pages + 7) / 8 + raw_len;
    }
  }
  return 0;
}

struct Fields {
  uint8_t type, codec;
  uint16_t flags;
  uint64_t seq, offset;
  uint32_t raw_len, payload_len;
  uint64_t hash;
  uint32_t aux;
};

Fields fields_of(const std::byte* p) {
  return Fields{uint8_t(p[4]),       uint8_t(p[5]),       uint16_t(uint16_t(p[6]) | uint16_t(p[7]) << 8),
                fuzz::get64(p + 8),  fuzz::get64(p + 16), fuzz::get32(p + 24),
                fuzz::get32(p + 28), fuzz::get64(p + 32), fuzz::get32(p + 40)};
}

// The per-type rules of docs/wire-format.md. Magic and check are judged by the caller.
bool spec_accepts(const Fields& f, uint32_t max_chunk) {
  switch (f.type) {
    case 1:  // HELLO
    case 2:  // HELLO_ACK
      return f.payload_len == engine::wire::kHelloBytes && !f.codec && !f.flags && !f.seq && !f.offset &&
             !f.raw_len && !f.hash && !f.aux;
    case 3: {  // DATA
      if (f.codec > 3 || (f.flags & ~7u) || f.raw_len < 1 || f.raw_len > max_chunk || f.seq < 1) return false;
      if (f.flags & 1u) return f.codec == 0 && f.hash == 0 && f.payload_len == 0 && !f.aux && !(f.flags & 4u);
      if (f.flags & 4u) {  // PAGED: lz4 or zstd over a sparse form of aux bytes, bitmap < aux < raw_len
        const uint64_t bitmap = ((uint64_t(f.raw_len) + 4095) / 4096 + 7) / 8;
        if ((f.codec != 1 && f.codec != 2) || f.aux <= bitmap || f.aux >= f.raw_len) return false;
        return f.payload_len >= 1 && f.payload_len <= spec_payload_bound(f.codec, f.aux);
      }
      if (f.aux) return false;
      if (f.codec == 0) return f.payload_len == f.raw_len;
      return f.payload_len >= 1 && f.payload_len <= spec_payload_bound(f.codec, f.raw_len);
    }
    case 4:  // END
    case 6:  // COMMITTED
      return f.payload_len == 0 && !f.codec && !f.flags && !f.raw_len && !f.aux;
    case 5:  // ACK
    case 8:  // STREAM_ACK
      return f.payload_len == 0 && !f.codec && !f.flags && !f.offset && !f.raw_len && !f.hash && !f.aux;
    case 7:  // ABORTED
      return f.payload_len <= 1024 && !f.codec && !f.flags && !f.seq && !f.offset && !f.raw_len && !f.hash;
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Reader in(data, size);
  const uint8_t flags = in.u8();
  const uint8_t choice = in.u8();
  const uint32_t raw_max = in.u32();
  static constexpr uint32_t kChoices[] = {4096, 65536, 1u << 20, engine::wire::kMaxChunkBytes, 0, 4097};
  const uint32_t max_chunk = choice < 6 ? kChoices[choice] : raw_max;

  std::byte h[engine::wire::kHeaderBytes] = {};
  const auto body = in.bytes(sizeof h);
  if (!body.empty()) std::memcpy(h, body.data(), body.size());
  if (flags & 1) fuzz::fix_header_check(h);

  engine::wire::Header out;
  const std::span<const std::byte, engine::wire::kHeaderBytes> view(h);
  const Error err = engine::wire::decode_header(view, max_chunk, &out);

  engine::wire::Header again;
  FUZZ_CHECK(engine::wire::decode_header(view, max_chunk, &again) == err, "decode is not deterministic");

  const bool magic_ok = fuzz::get32(h) == engine::wire::kFrameMagic;
  const bool check_ok = fuzz::get32(h + 44) == uint32_t(compress::hash64(h, 44));
  const Fields f = fields_of(h);
  if (!magic_ok) {
    FUZZ_CHECK(err == Error::bad_magic, "bad magic reported as %s", engine::wire::error_text(err));
    return 0;
  }
  if (!check_ok) {
    FUZZ_CHECK(err == Error::bad_header_checksum, "bad check reported as %s", engine::wire::error_text(err));
    return 0;
  }
  if (f.type < 1 || f.type > 8) {
    FUZZ_CHECK(err == Error::unknown_type, "type %u reported as %s", f.type, engine::wire::error_text(err));
    return 0;
  }
  const bool accepted = spec_accepts(f, max_chunk);
  FUZZ_CHECK(accepted == (err == Error::ok),
             "type %u codec %u flags %#x raw %u payload %u max %u: spec %s, decoder %s", f.type, f.codec,
             f.flags, f.raw_len, f.payload_len, max_chunk, accepted ? "accepts" : "rejects",
             engine::wire::error_text(err));
  if (err != Error::ok) return 0;

  std::byte re[engine::wire::kHeaderBytes];
  engine::wire::encode_header(out, std::span<std::byte, engine::wire::kHeaderBytes>(re));
  FUZZ_CHECK(std::memcmp(re, h, sizeof h) == 0, "an accepted header does not re-encode to its own bytes");
  FUZZ_CHECK(out == again, "decode is not deterministic");

  // What the receiver will read after this header is bounded by the negotiated chunk size alone.
  const uint64_t data_bound =
      std::max<uint64_t>({uint64_t(max_chunk), spec_payload_bound(1, max_chunk),
                          spec_payload_bound(2, max_chunk), spec_payload_bound(3, max_chunk)});
  const uint64_t bound = out.type == FrameType::data ? data_bound
                         : out.type == FrameType::aborted
                             ? engine::wire::kMaxTextBytes
                             : uint64_t(out.type == FrameType::hello || out.type == FrameType::hello_ack
                                            ? engine::wire::kHelloBytes
                                            : 0);
  FUZZ_CHECK(out.payload_len <= bound, "payload %u above its bound %llu", out.payload_len,
             static_cast<unsigned long long>(bound));
  if (out.type == FrameType::data) {
    FUZZ_CHECK(out.raw_len <= max_chunk, "raw_len %u above the negotiated %u", out.raw_len, max_chunk);
    for (uint32_t larger : {max_chunk, max_chunk + 1, UINT32_MAX}) {
      if (larger < max_chunk) continue;
      engine::wire::Header wider;
      FUZZ_CHECK(engine::wire::decode_header(view, larger, &wider) == Error::ok && wider == out,
                 "accepted under %u but not under %u", max_chunk, larger);
    }
  }
  return 0;
}
