// dstx wire protocol, version 1. The byte-by-byte specification is docs/wire-format.md; golden vectors in
// tests/test_wire.cpp pin it. Only engine/ knows this layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "compress/codec.h"
#include "compress/hash.h"

namespace dstx::engine::wire {

inline constexpr uint32_t kFrameMagic = 0x46585344;  // bytes "DSXF"
inline constexpr uint32_t kHelloMagic = 0x58545344;  // bytes "DSTX"
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kHeaderBytes = 48;
inline constexpr size_t kHelloBytes = 56;
inline constexpr uint32_t kMinChunkBytes = 4096;
// The receiver sends a STREAM_ACK after this many bytes of non-zero chunks on a stream (at least one chunk):
// a sender that keeps frames until acknowledged needs room for this much at least.
inline constexpr uint32_t kStreamAckBytes = 256 << 10;
inline constexpr uint32_t kMaxChunkBytes = 16u << 20;  // protocol ceiling; a receiver may set a lower one
inline constexpr uint32_t kMaxTextBytes = 1024;        // ABORTED reason text
inline constexpr uint16_t kMaxStreams = 64;
inline constexpr uint64_t kUnknownSize = UINT64_MAX;

enum class FrameType : uint8_t {
  hello = 1,      // sender → receiver, first frame of every connection
  hello_ack = 2,  // receiver → sender: accepted
  data = 3,
  end = 4,         // sender → receiver, last frame of every stream
  ack = 5,         // receiver → sender on stream 0: watermark
  committed = 6,   // receiver → sender on stream 0: everything written, verified and made durable
  aborted = 7,     // either direction: the transfer failed (also the refusal of a HELLO)
  stream_ack = 8,  // receiver → sender on each stream: the last sequence number received on that stream
};

// DATA flags. Any other bit set is a protocol error.
inline constexpr uint16_t kFlagZero = 1u << 0;              // all-zero chunk; no payload
inline constexpr uint16_t kFlagEndOfTransaction = 1u << 1;  // the chunk ends a source transaction (VFIO v1)
// Paged (kCapPaged): the lz4 or zstd payload decodes to the chunk's sparse form (bitmap and present pages, as
// codec sparse), aux bytes long: its zero pages were never compressed.
inline constexpr uint16_t kFlagPaged = 1u << 2;
inline constexpr uint16_t kDataFlagsMask = kFlagZero | kFlagEndOfTransaction | kFlagPaged;

// HELLO capability bits.
inline constexpr uint64_t kCapLz4 = 1u << 0;
inline constexpr uint64_t kCapZstd = 1u << 1;
inline constexpr uint64_t kCapTransactions = 1u << 2;
inline constexpr uint64_t kCapResume = 1u << 3;
inline constexpr uint64_t kCapPaged = 1u << 4;     // decodes kFlagPaged
inline constexpr uint64_t kCapPageHash = 1u << 5;  // DATA hashes are compress::HashForm::pages
inline constexpr uint64_t kCapsKnown =
    kCapLz4 | kCapZstd | kCapTransactions | kCapResume | kCapPaged | kCapPageHash;
inline compress::HashForm hash_form(uint64_t caps) {
  return caps & kCapPageHash ? compress::HashForm::pages : compress::HashForm::raw;
}

// HELLO flags.
inline constexpr uint16_t kHelloResume = 1u << 0;  // reconnecting a broken stream of a running session

// Reason codes of ABORTED. Numbers are pinned: only ever append.
enum class Reason : uint32_t {
  unspecified = 0,
  version = 1,      // protocol version not supported
  session = 2,      // session id or stream count does not match the other connections
  stream = 3,       // bad stream index, duplicate stream, or too many streams
  chunk_size = 4,   // chunk size outside the receiver's limits
  protocol = 5,     // malformed frame (bad magic, header checksum, length, type, flags, sequence)
  checksum = 6,     // a chunk's hash did not match its bytes, or the payload did not decode
  digest = 7,       // END counts or whole-stream digest do not match what was received
  sink = 8,         // the destination could not write or commit
  source = 9,       // the source failed to read
  cancelled = 10,   // a user or the embedding program cancelled
  timeout = 11,     // a peer or a phase took longer than its time-out
  connection = 12,  // a connection broke
  internal = 13,
  capability = 14,  // a codec or feature the peer does not support
};
const char* reason_name(Reason reason);
// An ABORTED frame's aux as this side reports it: a reason this version does not know (a newer peer's), or
// none, is a protocol failure rather than an unknown value.
Reason reason_from_peer(uint32_t aux);

struct Header {
  FrameType type = FrameType::data;
  uint8_t codec = 0;
  uint16_t flags = 0;
  uint64_t seq = 0;
  uint64_t offset = 0;
  uint32_t raw_len = 0;
  uint32_t payload_len = 0;
  uint64_t hash = 0;
  uint32_t aux = 0;
  bool operator==(const Header&) const = default;
};

struct Hello {
  uint16_t version = kVersion;
  uint16_t stream_index = 0;
  uint16_t stream_count = 1;
  uint16_t flags = 0;            // kHelloResume
  uint32_t max_chunk_bytes = 0;  // sender: its chunk size; receiver: the largest it accepts
  uint64_t session_id = 0;
  uint64_t capabilities = 0;
  uint64_t total_bytes = kUnknownSize;
  uint64_t resume_seq = 0;  // HELLO_ACK of a resume: the last sequence number received on this stream
  bool operator==(const Hello&) const = default;
};

enum class Error : uint8_t {
  ok = 0,
  bad_magic,
  bad_header_checksum,
  unknown_type,
  bad_codec,
  bad_flags,
  bad_length,  // a length outside its bound for this frame type
  bad_field,   // a reserved or derived field that must hold a fixed value does not
  bad_version,
};
const char* error_text(Error err);

// Writes the 48-byte header, computing its checksum.
void encode_header(const Header& header, std::span<std::byte, kHeaderBytes> out);
// Checks magic, header checksum, type, and every length and flag against the bounds for its type, with
// `max_chunk_bytes` the negotiated chunk limit. Nothing in `out` is to be trusted unless ok is returned.
Error decode_header(std::span<const std::byte, kHeaderBytes> in, uint32_t max_chunk_bytes, Header* out);

void encode_hello(const Hello& hello, std::span<std::byte, kHelloBytes> out);
// Checks the hello magic, its checksum and reserved fields; the version is returned as is for the caller
// to judge.
Error decode_hello(std::span<const std::byte, kHelloBytes> in, Hello* out);

// Convenience constructors for control frames.
Header make_end(uint64_t chunk_count, uint64_t byte_count, uint64_t digest);
Header make_ack(uint64_t watermark);
Header make_stream_ack(uint64_t last_received);
Header make_committed(uint64_t chunk_count, uint64_t byte_count, uint64_t digest);
Header make_aborted(Reason reason, size_t text_len);

// Whole-stream digest: XXH3-64 over, for each chunk in sequence order, the 24 bytes
// le64(seq) le64(raw_len) le64(chunk hash). Both sides compute it from verified chunk metadata.
class StreamDigest {
 public:
  void add(uint64_t seq, uint32_t raw_len, uint64_t hash);
  uint64_t value() const { return hasher_.digest(); }

 private:
  compress::Hasher64 hasher_;
};

}  // namespace dstx::engine::wire
