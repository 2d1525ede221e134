// Fuzz target: the receiver's state machine fed a whole byte stream. The input is written into one end of a
// socket pair, which is then half-closed; engine::receive_accepted runs on the other end with short time-outs
// and a sink that checks how it is driven. It must return (bounded time), never crash, and commit only what a
// valid stream carries.
//
// Input: fix-up flags (1 byte), then the byte stream as a sender would write it (HELLO frame, DATA frames,
// END). The fix-ups let mutations get past the checksums and reach deep states:
//   bit 0: repair every header check          bit 1: make the first frame a HELLO header and payload for one
//                                                    stream (version 1, chunk size folded into 4 KiB..64 KiB,
//                                                    good checksum; session and capabilities left as they
//                                                    are)
//   bit 2: repair each DATA hash from what its payload decodes to (zero chunks: hash 0), in the form the
//          HELLO's capabilities ask for (compress::HashForm)
//   bit 3: renumber DATA seq 1, 2, 3... and offsets to the bytes before
//   bit 4: make END carry the right count, byte count and digest
//   bit 5: the sink takes pieces (io::Sink::takes_pieces): a sparse chunk reaches it as its runs of present
//          and zero pages, which it joins into chunks at the boundaries of the independent reading
// Frames are walked as the receiver walks them (payload_len after each header, none for a ZERO chunk).
//
// Checks, against an independent reading of the stream (docs/wire-format.md):
//  - committed exactly when the stream is valid: a HELLO the receiver accepts, DATA frames numbered 1,
//  2, 3...
//    each at the offset of the bytes before and decoding to its hash, then an END with that count, byte count
//    and digest (a valid stream may only fail by time-out, on a machine too slow for the short idle limit);
//  - the sink is written strictly in order, each write one chunk with the stream's bytes, and committed with
//  the
//    byte count END announced, only once, and never written after commit or abort;
//  - every frame the receiver sends back is well formed: HELLO_ACK first, ACK watermarks rising and never
//    beyond what the sink holds, STREAM_ACKs rising, COMMITTED (matching END) only when committed, ABORTED
//    otherwise, nothing after either.
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

#include "compress/codec.h"
#include "engine/transfer.h"
#include "fuzz_peer.h"
#include "io/endpoints.h"

namespace {

using namespace dstx;
using engine::wire::FrameType;
using engine::wire::Header;
using engine::wire::Reason;

constexpr uint32_t kFixedChunkMax = 64 << 10;
constexpr int kIdleTimeoutMs = 250;

struct Chunk {
  uint32_t raw_len = 0;
  bool zero = false;
  uint64_t hash = 0;  // the bytes' hash in the stream's form (0 for zero)
};

// Records how the receiver drives its sink, checking order as it goes. Whole chunks: each write is one chunk.
// Pieces: writes are joined into chunks at `bounds` (the chunk sizes of the independent reading); a chunk
// that came in zero runs only is recorded as zero with the hash of its bytes.
class CheckingSink : public io::Sink {
 public:
  CheckingSink(bool pieces, std::vector<uint32_t> bounds, compress::HashForm form)
      : pieces_(pieces), bounds_(std::move(bounds)), form_(form) {}
  std::string describe() const override { return "fuzz sink"; }
  bool takes_pieces() const override { return pieces_; }
  void write(io::Ring&, uint64_t offset, std::span<const std::byte> data) override {
    FUZZ_CHECK(!committed_ && !aborted_, "sink written after %s", committed_ ? "commit" : "abort");
    FUZZ_CHECK(offset == bytes_, "sink write at %llu, %llu bytes written before", (unsigned long long)offset,
               (unsigned long long)bytes_);
    FUZZ_CHECK(!data.empty() && data.size() <= engine::wire::kMaxChunkBytes, "sink write of %zu bytes",
               data.size());
    bytes_ += data.size();
    if (!pieces_) {
      chunks_.push_back(Chunk{uint32_t(data.size()), false, compress::chunk_hash(form_, data)});
      return;
    }
    piece_.insert(piece_.end(), data.begin(), data.end());
    piece_zero_only_ = false;
    close_piece();
  }
  void write_zero(io::Ring&, uint64_t offset, uint64_t len) override {
    FUZZ_CHECK(!committed_ && !aborted_, "sink written after %s", committed_ ? "commit" : "abort");
    FUZZ_CHECK(offset == bytes_, "sink zero run at %llu, %llu bytes written before",
               (unsigned long long)offset, (unsigned long long)bytes_);
    FUZZ_CHECK(len > 0 && len <= engine::wire::kMaxChunkBytes, "sink zero run of %llu bytes",
               (unsigned long long)len);
    bytes_ += len;
    if (!pieces_) {
      chunks_.push_back(Chunk{uint32_t(len), true, 0});
      return;
    }
    piece_.resize(piece_.size() + size_t(len), std::byte{0});
    close_piece();
  }
  void commit(io::Ring&, uint64_t total_bytes) override {
    FUZZ_CHECK(!committed_ && !aborted_, "commit after %s", committed_ ? "commit" : "abort");
    FUZZ_CHECK(total_bytes == bytes_, "commit(%llu) after %llu bytes", (unsigned long long)total_bytes,
               (unsigned long long)bytes_);
    committed_ = true;
  }
  void abort() noexcept override {  // after a commit too: it is undone
    aborted_ = true;
    committed_ = false;
  }

  bool pieces() const { return pieces_; }
  bool committed() const { return committed_; }
  uint64_t bytes() const { return bytes_; }
  const std::vector<Chunk>& chunks() const { return chunks_; }

 private:
  // Pieces: a chunk is complete when it reaches the next bound; it may not run past it.
  void close_piece() {
    const size_t k = chunks_.size();
    FUZZ_CHECK(k < bounds_.size() && piece_.size() <= bounds_[k],
               "sink pieces of chunk %zu run to %zu bytes, past the chunk's end", k + 1, piece_.size());
    if (piece_.size() < bounds_[k]) return;
    chunks_.push_back(Chunk{uint32_t(piece_.size()), piece_zero_only_, compress::chunk_hash(form_, piece_)});
    piece_.clear();
    piece_zero_only_ = true;
  }

  const bool pieces_;
  const std::vector<uint32_t> bounds_;
  const compress::HashForm form_;
  std::vector<std::byte> piece_;  // the chunk being joined
  bool piece_zero_only_ = true;
  uint64_t bytes_ = 0;
  bool committed_ = false;
  bool aborted_ = false;
  std::vector<Chunk> chunks_;
};

// A paged DATA frame's sparse form length (aux), else 0.
size_t paged_len(const Header& h) { return (h.flags & engine::wire::kFlagPaged) ? h.aux : 0; }

// The hash a DATA payload decodes to, when it decodes (raw_len bounded first: the fix-up must not allocate
// what the frame claims).
std::optional<uint64_t> decoded_hash(const Header& h, std::span<const std::byte> payload,
                                     compress::HashForm form) {
  if (h.raw_len == 0 || h.raw_len > engine::wire::kMaxChunkBytes || !compress::codec_valid(h.codec))
    return {};
  std::vector<std::byte> raw(h.raw_len);
  const auto err =
      compress::decode_chunk(compress::Codec(h.codec), false, payload, raw, 0, paged_len(h), form);
  if (err == compress::DecodeError::ok) return 0;
  if (err != compress::DecodeError::hash_mismatch) return {};
  return compress::chunk_hash(form, raw);
}

Header read_fields(const std::byte* p) {
  // Field layout of docs/wire-format.md, read without judging (the fix-ups run before any check).
  Header h;
  h.type = FrameType(uint8_t(p[4]));
  h.codec = uint8_t(p[5]);
  h.flags = uint16_t(uint16_t(p[6]) | uint16_t(p[7]) << 8);
  h.seq = fuzz::get64(p + 8);
  h.offset = fuzz::get64(p + 16);
  h.raw_len = fuzz::get32(p + 24);
  h.payload_len = fuzz::get32(p + 28);
  h.hash = fuzz::get64(p + 32);
  h.aux = fuzz::get32(p + 40);
  return h;
}

// How many payload bytes the receiver reads after this header.
uint64_t payload_after(const Header& h) {
  if (h.type == FrameType::data) return (h.flags & engine::wire::kFlagZero) ? 0 : h.payload_len;
  if (h.type == FrameType::hello || h.type == FrameType::aborted) return h.payload_len;
  return 0;
}

void apply_fixups(uint8_t flags, std::vector<std::byte>& s) {
  size_t pos = 0;
  uint64_t seq = 0, bytes = 0;
  engine::wire::StreamDigest digest;
  compress::HashForm form = compress::HashForm::raw;  // what the first frame's HELLO asks for
  for (bool first = true; s.size() - pos >= engine::wire::kHeaderBytes; first = false) {
    std::byte* p = s.data() + pos;
    if (first && (flags & 2)) {
      std::memset(p, 0, 44);
      fuzz::put32(p, engine::wire::kFrameMagic);
      p[4] = std::byte(FrameType::hello);
      fuzz::put32(p + 28, engine::wire::kHelloBytes);
      if (s.size() - pos >= engine::wire::kHeaderBytes + engine::wire::kHelloBytes) {
        std::byte* hello = p + engine::wire::kHeaderBytes;
        fuzz::put32(hello, engine::wire::kHelloMagic);
        fuzz::put16(hello + 4, 1);   // version
        fuzz::put16(hello + 6, 0);   // index
        fuzz::put16(hello + 8, 1);   // count
        fuzz::put16(hello + 10, 0);  // flags: a new session, not a resume
        fuzz::put32(hello + 12, 4096 + fuzz::get32(hello + 12) % (kFixedChunkMax - 4096 + 1));
        fuzz::fix_hello_check(hello, engine::wire::kHelloBytes);
      }
    }
    Header h = read_fields(p);
    const uint64_t avail = s.size() - pos - engine::wire::kHeaderBytes;
    if (first && h.type == FrameType::hello && avail >= engine::wire::kHelloBytes)
      form = engine::wire::hash_form(fuzz::get64(p + engine::wire::kHeaderBytes + 24));
    if (h.type == FrameType::data) {
      if (flags & 8) {
        h.seq = ++seq;
        h.offset = bytes;
      }
      const std::span<const std::byte> payload(p + engine::wire::kHeaderBytes,
                                               size_t(std::min<uint64_t>(payload_after(h), avail)));
      if (flags & 4) {
        if (h.flags & engine::wire::kFlagZero) {
          h.hash = 0;
        } else if (auto hash = decoded_hash(h, payload, form)) {
          h.hash = *hash;
        }
      }
      bytes += h.raw_len;
      digest.add(h.seq, h.raw_len, h.hash);
      fuzz::put64(p + 8, h.seq);
      fuzz::put64(p + 16, h.offset);
      fuzz::put64(p + 32, h.hash);
    } else if (h.type == FrameType::end && (flags & 16)) {
      h = engine::wire::make_end(seq, bytes, digest.value());
      std::memset(p + 4, 0, 40);
      p[4] = std::byte(FrameType::end);
      fuzz::put64(p + 8, h.seq);
      fuzz::put64(p + 16, h.offset);
      fuzz::put64(p + 32, h.hash);
    }
    if (flags & 1) fuzz::fix_header_check(p);
    const uint64_t skip = std::min<uint64_t>(payload_after(h), avail);
    pos += engine::wire::kHeaderBytes + size_t(skip);
  }
}

struct Verdict {
  bool valid = false;
  std::vector<Chunk> chunks;  // the valid stream's chunks, in order
  Header end;
  compress::HashForm form = compress::HashForm::raw;  // what its chunk hashes cover
};

// An independent reading of a one-stream transfer, per docs/wire-format.md.
Verdict judge(const std::vector<std::byte>& s, const engine::RecvOptions& ro) {
  Verdict v;
  size_t pos = 0;
  auto next_header = [&](uint32_t max_chunk, Header* h) {
    if (s.size() - pos < engine::wire::kHeaderBytes) return false;
    const auto err = engine::wire::decode_header(
        std::span<const std::byte, engine::wire::kHeaderBytes>(s.data() + pos, engine::wire::kHeaderBytes),
        max_chunk, h);
    pos += engine::wire::kHeaderBytes;
    return err == engine::wire::Error::ok;
  };
  Header h;
  if (!next_header(engine::wire::kMaxChunkBytes, &h) || h.type != FrameType::hello) return v;
  if (s.size() - pos < engine::wire::kHelloBytes) return v;
  engine::wire::Hello hello;
  if (engine::wire::decode_hello(
          std::span<const std::byte, engine::wire::kHelloBytes>(s.data() + pos, engine::wire::kHelloBytes),
          &hello) != engine::wire::Error::ok) {
    return v;
  }
  pos += engine::wire::kHelloBytes;
  // A RESUME HELLO when no session runs is refused (docs/wire-format.md, Resuming).
  if (hello.flags & engine::wire::kHelloResume) return v;
  if (hello.version != 1 || hello.stream_count != 1 || hello.stream_index != 0 ||
      hello.max_chunk_bytes < engine::wire::kMinChunkBytes || hello.max_chunk_bytes > ro.max_chunk_bytes) {
    return v;
  }
  uint64_t bytes = 0;
  engine::wire::StreamDigest digest;
  v.form = engine::wire::hash_form(hello.capabilities);
  while (next_header(hello.max_chunk_bytes, &h)) {
    if (h.type == FrameType::end) {
      v.valid = h.seq == v.chunks.size() && h.offset == bytes && h.hash == digest.value();
      v.end = h;
      return v;
    }
    if (h.type != FrameType::data || h.seq != v.chunks.size() + 1 || h.offset != bytes) return v;
    Chunk c{h.raw_len, bool(h.flags & engine::wire::kFlagZero), h.hash};
    if (!c.zero) {
      if (s.size() - pos < h.payload_len) return v;
      std::vector<std::byte> raw(h.raw_len);
      if (compress::decode_chunk(compress::Codec(h.codec), false,
                                 std::span<const std::byte>(s.data() + pos, h.payload_len), raw, h.hash,
                                 paged_len(h), v.form) != compress::DecodeError::ok) {
        return v;
      }
      pos += h.payload_len;
    }
    v.chunks.push_back(c);
    bytes += h.raw_len;
    digest.add(h.seq, h.raw_len, h.hash);
  }
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // The plain-syscall backend: the state machine is the same on both, and a ring per exec is cheaper.
  setenv("DSTX_IO", "syscall", 0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  std::vector<std::byte> stream(reinterpret_cast<const std::byte*>(data + 1),
                                reinterpret_cast<const std::byte*>(data + size));
  apply_fixups(flags, stream);

  engine::RecvOptions ro;
  ro.accept_timeout_ms = 100;
  ro.handshake_timeout_ms = 100;
  ro.idle_timeout_ms = kIdleTimeoutMs;
  const Verdict verdict = judge(stream, ro);

  auto [receiver_end, peer_end] = fuzz::socket_pair();
  fuzz::ScriptedPeer peer(std::move(peer_end), std::move(stream));
  std::vector<uint32_t> bounds;
  for (const Chunk& c : verdict.chunks) bounds.push_back(c.raw_len);
  CheckingSink sink((flags & 32) != 0, std::move(bounds), verdict.form);
  std::vector<io::Fd> conns;
  conns.push_back(std::move(receiver_end));
  const engine::Result res = engine::receive_accepted(sink, std::move(conns), ro, nullptr, nullptr);
  const auto& answer_bytes = peer.join();  // before capped(): the reader thread sets it
  const auto answer = fuzz::parse_answer(answer_bytes, peer.capped());

  if (std::getenv("DSTX_FUZZ_VERBOSE")) {
    std::fprintf(stderr, "receiver: valid %d, committed %d, %llu bytes, reason %s: %s\n", verdict.valid,
                 res.committed, (unsigned long long)sink.bytes(), engine::wire::reason_name(res.reason),
                 res.error.c_str());
  }
  FUZZ_CHECK(res.committed == sink.committed(), "Result.committed %d, sink committed %d", res.committed,
             sink.committed());
  if (res.committed) {
    FUZZ_CHECK(verdict.valid, "committed an invalid stream");
  } else if (verdict.valid) {
    FUZZ_CHECK(res.reason == Reason::timeout, "a valid stream failed: %s (%s)",
               engine::wire::reason_name(res.reason), res.error.c_str());
  }
  if (res.committed) {
    FUZZ_CHECK(sink.bytes() == verdict.end.offset && res.bytes == verdict.end.offset,
               "committed %llu bytes (result %llu), END said %llu", (unsigned long long)sink.bytes(),
               (unsigned long long)res.bytes, (unsigned long long)verdict.end.offset);
    FUZZ_CHECK(sink.chunks().size() == verdict.chunks.size(), "sink got %zu chunks, the stream has %zu",
               sink.chunks().size(), verdict.chunks.size());
    for (size_t i = 0; i < verdict.chunks.size(); ++i) {
      const Chunk& got = sink.chunks()[i];
      const Chunk& want = verdict.chunks[i];
      // Pieces: a ZERO frame arrives as zero runs only; any other chunk by its bytes' hash (one made of zero
      // pages arrives as zero runs too).
      const bool same = sink.pieces() ? got.raw_len == want.raw_len && (want.zero ? got.zero : got.hash == want.hash)
                                      : got.raw_len == want.raw_len && got.zero == want.zero && got.hash == want.hash;
      FUZZ_CHECK(same,
                 "chunk %zu reached the sink as %u bytes (zero %d), the stream has %u (zero %d)", i + 1,
                 got.raw_len, got.zero, want.raw_len, want.zero);
    }
    FUZZ_CHECK(res.digest == verdict.end.hash, "Result.digest differs from END's");
  }

  // The return path.
  uint64_t watermark = 0, stream_watermark = 0;
  bool committed_sent = false, aborted_sent = false;
  for (size_t i = 0; i < answer.size(); ++i) {
    const Header& h = answer[i].header;
    FUZZ_CHECK(!committed_sent && !aborted_sent, "frame type %u after COMMITTED/ABORTED", unsigned(h.type));
    if (i == 0 && h.type != FrameType::aborted) {
      FUZZ_CHECK(h.type == FrameType::hello_ack, "first answer frame is type %u", unsigned(h.type));
      continue;
    }
    switch (h.type) {
      case FrameType::ack:
        FUZZ_CHECK(h.seq >= watermark && h.seq <= sink.chunks().size(), "ACK %llu after %llu, sink holds %zu",
                   (unsigned long long)h.seq, (unsigned long long)watermark, sink.chunks().size());
        watermark = h.seq;
        break;
      case FrameType::stream_ack:  // the last sequence number received on this stream
        FUZZ_CHECK(h.seq >= stream_watermark, "STREAM_ACK %llu after %llu", (unsigned long long)h.seq,
                   (unsigned long long)stream_watermark);
        stream_watermark = h.seq;
        break;
      case FrameType::committed:
        FUZZ_CHECK(res.committed && h.seq == verdict.end.seq && h.offset == verdict.end.offset &&
                       h.hash == verdict.end.hash,
                   "COMMITTED (%llu chunks, %llu bytes) does not match the transfer",
                   (unsigned long long)h.seq, (unsigned long long)h.offset);
        committed_sent = true;
        break;
      case FrameType::aborted:
        FUZZ_CHECK(!res.committed, "ABORTED sent by a receiver that committed");
        aborted_sent = true;
        break;
      default:
        FUZZ_CHECK(false, "the receiver sent frame type %u", unsigned(h.type));
    }
  }
  if (res.committed) FUZZ_CHECK(committed_sent, "committed but sent no COMMITTED");
  return 0;
}
