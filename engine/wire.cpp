#include "engine/wire.h"

#include <cstring>

#include "compress/codec.h"

namespace dstx::engine::wire {
namespace {

// Little-endian field access; the protocol is little-endian on every host.
void put16(std::byte* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = std::byte(v >> (8 * i));
}
void put32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = std::byte(v >> (8 * i));
}
void put64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = std::byte(v >> (8 * i));
}
uint16_t get16(const std::byte* p) {
  return uint16_t(uint16_t(p[0]) | uint16_t(p[1]) << 8);
}
uint32_t get32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | uint32_t(p[i]);
  return v;
}
uint64_t get64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | uint64_t(p[i]);
  return v;
}

constexpr size_t kCheckedBytes = 44;       // the header checksum covers bytes [0, 44)
constexpr size_t kHelloCheckedBytes = 48;  // the HELLO checksum covers bytes [0, 48)

uint32_t header_check(const std::byte* p) {
  return uint32_t(compress::hash64(p, kCheckedBytes));
}

Error check_data(const Header& h, uint32_t max_chunk_bytes) {
  if (!compress::codec_valid(h.codec)) return Error::bad_codec;
  if (h.flags & ~kDataFlagsMask) return Error::bad_flags;
  if (h.raw_len == 0 || h.raw_len > max_chunk_bytes) return Error::bad_length;
  if (h.seq == 0) return Error::bad_field;
  if (h.flags & kFlagZero) {
    if (h.payload_len != 0 || h.codec != uint8_t(compress::Codec::none) || h.hash != 0 || h.aux != 0 ||
        (h.flags & kFlagPaged))
      return Error::bad_field;
    return Error::ok;
  }
  // Paged: aux is the sparse form's length, shorter than the chunk (else it is not sent so).
  const bool paged = h.flags & kFlagPaged;
  if (paged && h.codec != uint8_t(compress::Codec::lz4) && h.codec != uint8_t(compress::Codec::zstd))
    return Error::bad_field;
  if (paged ? h.aux <= compress::sparse_bitmap_bytes(h.raw_len) || h.aux >= h.raw_len : h.aux != 0)
    return Error::bad_field;
  const size_t bound = compress::encode_bound(compress::Codec(h.codec), paged ? h.aux : h.raw_len);
  if (h.payload_len == 0 || h.payload_len > bound) return Error::bad_length;
  if (h.codec == uint8_t(compress::Codec::none) && h.payload_len != h.raw_len) return Error::bad_length;
  return Error::ok;
}

}  // namespace

const char* reason_name(Reason reason) {
  switch (reason) {
    case Reason::unspecified:
      return "unspecified";
    case Reason::version:
      return "version";
    case Reason::session:
      return "session";
    case Reason::stream:
      return "stream";
    case Reason::chunk_size:
      return "chunk-size";
    case Reason::protocol:
      return "protocol";
    case Reason::checksum:
      return "checksum";
    case Reason::digest:
      return "digest";
    case Reason::sink:
      return "sink";
    case Reason::source:
      return "source";
    case Reason::cancelled:
      return "cancelled";
    case Reason::timeout:
      return "timeout";
    case Reason::connection:
      return "connection";
    case Reason::internal:
      return "internal";
    case Reason::capability:
      return "capability";
  }
  return "unknown";
}

Reason reason_from_peer(uint32_t aux) {
  if (aux == uint32_t(Reason::unspecified) || aux > uint32_t(Reason::capability)) return Reason::protocol;
  return Reason(aux);
}

const char* error_text(Error err) {
  switch (err) {
    case Error::ok:
      return "ok";
    case Error::bad_magic:
      return "bad frame magic";
    case Error::bad_header_checksum:
      return "frame header checksum mismatch";
    case Error::unknown_type:
      return "unknown frame type";
    case Error::bad_codec:
      return "unknown codec";
    case Error::bad_flags:
      return "unknown frame flags";
    case Error::bad_length:
      return "frame length out of bounds";
    case Error::bad_field:
      return "frame field has an impossible value";
    case Error::bad_version:
      return "unsupported protocol version";
  }
  return "unknown wire error";
}

void encode_header(const Header& h, std::span<std::byte, kHeaderBytes> out) {
  std::byte* p = out.data();
  put32(p + 0, kFrameMagic);
  p[4] = std::byte(h.type);
  p[5] = std::byte(h.codec);
  put16(p + 6, h.flags);
  put64(p + 8, h.seq);
  put64(p + 16, h.offset);
  put32(p + 24, h.raw_len);
  put32(p + 28, h.payload_len);
  put64(p + 32, h.hash);
  put32(p + 40, h.aux);
  put32(p + 44, header_check(p));
}

Error decode_header(std::span<const std::byte, kHeaderBytes> in, uint32_t max_chunk_bytes, Header* out) {
  const std::byte* p = in.data();
  if (get32(p) != kFrameMagic) return Error::bad_magic;
  if (get32(p + 44) != header_check(p)) return Error::bad_header_checksum;
  Header h;
  h.type = FrameType(uint8_t(p[4]));
  h.codec = uint8_t(p[5]);
  h.flags = get16(p + 6);
  h.seq = get64(p + 8);
  h.offset = get64(p + 16);
  h.raw_len = get32(p + 24);
  h.payload_len = get32(p + 28);
  h.hash = get64(p + 32);
  h.aux = get32(p + 40);
  Error err = Error::ok;
  switch (h.type) {
    case FrameType::data:
      err = check_data(h, max_chunk_bytes);
      break;
    case FrameType::hello:
    case FrameType::hello_ack:
      if (h.payload_len != kHelloBytes)
        err = Error::bad_length;
      else if (h.codec || h.flags || h.seq || h.offset || h.raw_len || h.hash || h.aux)
        err = Error::bad_field;
      break;
    case FrameType::end:
    case FrameType::committed:
    case FrameType::ack:
    case FrameType::stream_ack:
      if (h.payload_len != 0)
        err = Error::bad_length;
      else if (h.codec || h.flags || h.raw_len || h.aux)
        err = Error::bad_field;
      else if ((h.type == FrameType::ack || h.type == FrameType::stream_ack) && (h.offset || h.hash))
        err = Error::bad_field;
      break;
    case FrameType::aborted:
      if (h.payload_len > kMaxTextBytes)
        err = Error::bad_length;
      else if (h.codec || h.flags || h.seq || h.offset || h.raw_len || h.hash)
        err = Error::bad_field;
      break;
    default:
      err = Error::unknown_type;
  }
  if (err == Error::ok) *out = h;
  return err;
}

void encode_hello(const Hello& hello, std::span<std::byte, kHelloBytes> out) {
  std::byte* p = out.data();
  std::memset(p, 0, kHelloBytes);
  put32(p + 0, kHelloMagic);
  put16(p + 4, hello.version);
  put16(p + 6, hello.stream_index);
  put16(p + 8, hello.stream_count);
  put16(p + 10, hello.flags);
  put32(p + 12, hello.max_chunk_bytes);
  put64(p + 16, hello.session_id);
  put64(p + 24, hello.capabilities);
  put64(p + 32, hello.total_bytes);
  put64(p + 40, hello.resume_seq);
  put64(p + 48, compress::hash64(p, kHelloCheckedBytes));
}

Error decode_hello(std::span<const std::byte, kHelloBytes> in, Hello* out) {
  const std::byte* p = in.data();
  if (get32(p) != kHelloMagic) return Error::bad_magic;
  if (get64(p + 48) != compress::hash64(p, kHelloCheckedBytes)) return Error::bad_header_checksum;
  if (get16(p + 10) & ~kHelloResume) return Error::bad_field;
  Hello h;
  h.version = get16(p + 4);
  h.stream_index = get16(p + 6);
  h.stream_count = get16(p + 8);
  h.flags = get16(p + 10);
  h.resume_seq = get64(p + 40);
  h.max_chunk_bytes = get32(p + 12);
  h.session_id = get64(p + 16);
  h.capabilities = get64(p + 24);
  h.total_bytes = get64(p + 32);
  *out = h;
  return Error::ok;
}

Header make_end(uint64_t chunk_count, uint64_t byte_count, uint64_t digest) {
  return Header{.type = FrameType::end, .seq = chunk_count, .offset = byte_count, .hash = digest};
}
Header make_ack(uint64_t watermark) {
  return Header{.type = FrameType::ack, .seq = watermark};
}
Header make_stream_ack(uint64_t last_received) {
  return Header{.type = FrameType::stream_ack, .seq = last_received};
}
Header make_committed(uint64_t chunk_count, uint64_t byte_count, uint64_t digest) {
  return Header{.type = FrameType::committed, .seq = chunk_count, .offset = byte_count, .hash = digest};
}
Header make_aborted(Reason reason, size_t text_len) {
  return Header{.type = FrameType::aborted,
                .payload_len = uint32_t(text_len > kMaxTextBytes ? kMaxTextBytes : text_len),
                .aux = uint32_t(reason)};
}

void StreamDigest::add(uint64_t seq, uint32_t raw_len, uint64_t hash) {
  std::byte record[24];
  put64(record, seq);
  put64(record + 8, raw_len);
  put64(record + 16, hash);
  hasher_.update(record, sizeof record);
}

}  // namespace dstx::engine::wire
