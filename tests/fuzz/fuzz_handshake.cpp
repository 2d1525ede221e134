// Fuzz target: the handshake. Every HELLO goes through wire::decode_hello directly, and the whole set through
// the real receiver (engine::receive_accepted), whose HELLO acceptance checks are compared with the rules of
// docs/wire-format.md ("Handshake").
//
// Input: flags (1 byte), receiver stream limit (1 byte: 1 + b % 8), receiver limits (1 byte: chunk limit
// 4 KiB, 64 KiB, 1 MiB or 16 MiB by b % 4; memory budget 64 MiB, 1 MiB, 16 MiB or 256 MiB by b / 4 % 4), then
// up to 8 records of frame header + HELLO payload, one per connection; the last may be short. Connection i
// carries record i and is then half-closed.
//   flag bit 0: repair each record's header check   bit 1: repair each HELLO checksum
//   bit 2: fold each HELLO's stream count into 1..(number of records), so that complete sessions are common
//
// Checks:
//  - decode_hello accepts a payload only when re-encoding gives back the same bytes;
//  - the receiver refuses exactly when the rules say so (including the memory refusal and the refusal of a
//    RESUME HELLO when no session runs), with the reason code of the first rule broken, in an ABORTED frame
//    on the refused connection (and nothing else on those accepted before it);
//  - when it accepts, it answers HELLO_ACK on every stream, echoing index and session, with the capability
//    intersection; it never commits (no END was sent).
#include <algorithm>
#include <cstdlib>
#include <optional>
#include <set>

#include "compress/codec.h"
#include "engine/transfer.h"
#include "fuzz_peer.h"
#include "io/endpoints.h"

namespace {

using namespace dstx;
using engine::wire::FrameType;
using engine::wire::Reason;

constexpr size_t kH = engine::wire::kHeaderBytes;
constexpr size_t kP = engine::wire::kHelloBytes;
constexpr size_t kRecordBytes = kH + kP;
constexpr size_t kMaxRecords = 8;

struct Expected {
  bool accepted = false;  // every stream of the session handshook
  unsigned streams = 0;   // connections the receiver consumed (the session's count when accepted)
  Reason reason = Reason::unspecified;
  // Also acceptable: a RESUME HELLO breaking another rule too may be refused for either (the specification
  // does not order the resume rule among the others).
  std::optional<Reason> alt_reason;
  bool refusal_sent = false;  // an ABORTED goes to the offending connection
  engine::wire::Hello first;
  bool allows(Reason r) const { return r == reason || (alt_reason && r == *alt_reason); }
};

struct Limits {
  unsigned max_streams;
  uint32_t max_chunk;
  uint64_t budget;
};

// docs/wire-format.md, Bounds: a decode buffer per stream (the largest codec bound of a chunk) plus two
// chunks.
uint64_t minimum_memory_bytes(unsigned streams, uint32_t chunk) {
  const size_t decode = std::max({compress::encode_bound(compress::Codec::lz4, chunk),
                                  compress::encode_bound(compress::Codec::zstd, chunk),
                                  compress::encode_bound(compress::Codec::sparse, chunk)});
  return uint64_t(streams) * decode + 2ull * chunk;
}

// The receiver's decision, derived from the specification alone (docs/wire-format.md, Handshake and
// Resuming).
Expected judge(const std::vector<std::vector<std::byte>>& records, const Limits& limits) {
  Expected e;
  std::set<uint16_t> seen;
  for (size_t i = 0;; ++i) {
    e.streams = unsigned(i);
    if (i == records.size()) {  // the receiver waits for a connection that never comes
      e.reason = Reason::timeout;
      return e;
    }
    const std::vector<std::byte>& r = records[i];
    auto refuse = [&](Reason reason) {
      e.reason = reason;
      e.refusal_sent = true;
      return e;
    };
    // A TLS ClientHello (first byte 22, a handshake record) at a receiver without TLS (engine/tls.cpp).
    if (std::to_integer<uint8_t>(r[0]) == 0x16) return refuse(Reason::protocol);
    if (r.size() < engine::wire::kHeaderBytes) return refuse(Reason::connection);  // closed mid-header
    engine::wire::Header h;
    if (engine::wire::decode_header(std::span<const std::byte, kH>(r.data(), kH),
                                    engine::wire::kMaxChunkBytes, &h) != engine::wire::Error::ok ||
        h.type != FrameType::hello || r.size() < kRecordBytes) {
      return refuse(Reason::protocol);
    }
    engine::wire::Hello hello;
    if (engine::wire::decode_hello(std::span<const std::byte, kP>(r.data() + kH, kP), &hello) !=
        engine::wire::Error::ok) {
      return refuse(Reason::protocol);
    }
    std::optional<Reason> broken;
    if (hello.version != 1) {
      broken = Reason::version;
    } else if (hello.stream_count < 1 || hello.stream_count > limits.max_streams ||
               hello.stream_index >= hello.stream_count) {
      broken = Reason::stream;
    } else if (hello.max_chunk_bytes < engine::wire::kMinChunkBytes ||
               hello.max_chunk_bytes > limits.max_chunk ||
               minimum_memory_bytes(hello.stream_count, hello.max_chunk_bytes) > limits.budget) {
      broken = Reason::chunk_size;
    } else if (i > 0 &&
               (hello.session_id != e.first.session_id || hello.stream_count != e.first.stream_count ||
                hello.max_chunk_bytes != e.first.max_chunk_bytes)) {
      broken = Reason::session;
    } else if (seen.count(hello.stream_index)) {
      broken = Reason::stream;
    }
    if (hello.flags & engine::wire::kHelloResume) {
      // No session runs yet, so there is nothing to resume.
      e.alt_reason = broken;
      return refuse(Reason::session);
    }
    if (broken) return refuse(*broken);
    seen.insert(hello.stream_index);
    if (i == 0) e.first = hello;
    if (seen.size() == e.first.stream_count) {
      e.accepted = true;
      e.streams = unsigned(i + 1);
      e.reason = Reason::connection;  // the streams then end without END
      return e;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // The plain-syscall backend: the handshake logic is the same on both, and a ring per exec is cheaper.
  setenv("DSTX_IO", "syscall", 0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Reader in(data, size);
  const uint8_t flags = in.u8();
  const unsigned max_streams = 1 + in.u8() % kMaxRecords;
  static constexpr uint32_t kChunkLimits[] = {4096, 65536, 1u << 20, 16u << 20};
  static constexpr uint64_t kBudgets[] = {64ull << 20, 1ull << 20, 16ull << 20, 256ull << 20};
  const uint8_t limit_byte = in.u8();
  const Limits limits{max_streams, kChunkLimits[limit_byte % 4], kBudgets[limit_byte / 4 % 4]};

  std::vector<std::vector<std::byte>> records;
  while (in.left() > 0 && records.size() < kMaxRecords) {
    const auto b = in.bytes(kRecordBytes);
    records.emplace_back(reinterpret_cast<const std::byte*>(b.data()),
                         reinterpret_cast<const std::byte*>(b.data()) + b.size());
  }
  for (auto& r : records) {
    if (r.size() >= kRecordBytes && (flags & 4)) {
      const uint16_t count = uint16_t(r[56]) | uint16_t(uint16_t(r[57]) << 8);
      fuzz::put16(&r[56], uint16_t(count % records.size() + 1));
    }
    if (r.size() >= kRecordBytes && (flags & 2)) fuzz::fix_hello_check(&r[kH], kP);
    if (r.size() >= engine::wire::kHeaderBytes && (flags & 1)) fuzz::fix_header_check(r.data());
    if (r.size() >= kRecordBytes) {
      // decode_hello on its own: accepted means canonical (every byte is a field, a zero bit or the
      // checksum).
      engine::wire::Hello h;
      if (engine::wire::decode_hello(std::span<const std::byte, kP>(&r[kH], kP), &h) ==
          engine::wire::Error::ok) {
        std::byte re[kP];
        engine::wire::encode_hello(h, std::span<std::byte, kP>(re));
        FUZZ_CHECK(std::memcmp(re, &r[kH], kP) == 0, "an accepted HELLO does not re-encode to its own bytes");
      }
    }
  }

  engine::RecvOptions ro;
  ro.max_streams = limits.max_streams;
  ro.max_chunk_bytes = limits.max_chunk;
  ro.memory_budget_bytes = limits.budget;
  ro.accept_timeout_ms = 50;
  ro.handshake_timeout_ms = 50;
  ro.idle_timeout_ms = 5000;  // nothing here can stall: every connection is half-closed after its record
  std::vector<io::Fd> theirs;
  std::vector<std::unique_ptr<fuzz::ScriptedPeer>> peers;
  for (auto& r : records) {
    auto [receiver_end, peer_end] = fuzz::socket_pair();
    theirs.push_back(std::move(receiver_end));
    peers.push_back(std::make_unique<fuzz::ScriptedPeer>(std::move(peer_end), r));
  }
  auto sink = io::open_null_sink();
  const engine::Result res = engine::receive_accepted(*sink, std::move(theirs), ro, nullptr, nullptr);
  std::vector<std::vector<fuzz::AnswerFrame>> answers;
  for (auto& p : peers) {
    const auto& answer = p->join();  // before capped(): the reader thread sets it
    answers.push_back(fuzz::parse_answer(answer, p->capped()));
  }

  const Expected e = judge(records, limits);
  if (std::getenv("DSTX_FUZZ_VERBOSE")) {
    std::fprintf(stderr, "handshake: %zu connections, expected %s %s after %u, got %s: %s\n", records.size(),
                 e.accepted ? "accepted" : "refused", engine::wire::reason_name(e.reason), e.streams,
                 engine::wire::reason_name(res.reason), res.error.c_str());
  }
  FUZZ_CHECK(!res.committed, "committed without an END");
  FUZZ_CHECK(e.allows(res.reason), "receiver ended with reason %s (%s), the rules say %s",
             engine::wire::reason_name(res.reason), res.error.c_str(), engine::wire::reason_name(e.reason));
  for (size_t i = 0; i < answers.size(); ++i) {
    const auto& a = answers[i];
    const bool offending = !e.accepted && e.refusal_sent && i == e.streams;
    if (offending) {
      FUZZ_CHECK(
          !a.empty() && a[0].header.type == FrameType::aborted && Reason(a[0].header.aux) == res.reason,
          "connection %zu: refused without ABORTED %s", i, engine::wire::reason_name(e.reason));
    } else if (i >= e.streams) {
      FUZZ_CHECK(a.empty(), "connection %zu got %zu frames but was never part of the session", i, a.size());
    } else if (!e.accepted) {
      // Accepted before the session failed: told why (or, at least, told nothing else).
      for (const auto& f : a) {
        FUZZ_CHECK(f.header.type == FrameType::aborted && Reason(f.header.aux) == res.reason,
                   "connection %zu: frame type %u reason %u after a refusal %s", i, unsigned(f.header.type),
                   f.header.aux, engine::wire::reason_name(e.reason));
      }
    } else {
      FUZZ_CHECK(!a.empty() && a[0].header.type == FrameType::hello_ack && a[0].payload.size() == kP,
                 "connection %zu: first answer is not a HELLO_ACK", i);
      engine::wire::Hello ack;
      FUZZ_CHECK(engine::wire::decode_hello(std::span<const std::byte, kP>(a[0].payload.data(), kP), &ack) ==
                     engine::wire::Error::ok,
                 "connection %zu: malformed HELLO_ACK", i);
      engine::wire::Hello mine;
      engine::wire::decode_hello(std::span<const std::byte, kP>(&records[i][kH], kP), &mine);
      engine::wire::Hello want = e.first;
      want.stream_index = mine.stream_index;
      // What this receiver offers over handed-in connections (resume needs a listener to come back to).
      want.capabilities = e.first.capabilities &
                          (engine::wire::kCapLz4 | engine::wire::kCapZstd | engine::wire::kCapTransactions |
                           engine::wire::kCapPaged | engine::wire::kCapPageHash);
      FUZZ_CHECK(
          ack == want, "connection %zu: HELLO_ACK index %u session %llx caps %llx, expected %u %llx %llx", i,
          ack.stream_index, (unsigned long long)ack.session_id, (unsigned long long)ack.capabilities,
          want.stream_index, (unsigned long long)want.session_id, (unsigned long long)want.capabilities);
      for (size_t k = 1; k < a.size(); ++k) {  // then the streams end without END
        FUZZ_CHECK(a[k].header.type == FrameType::aborted || a[k].header.type == FrameType::stream_ack,
                   "connection %zu: frame type %u after HELLO_ACK", i, unsigned(a[k].header.type));
      }
    }
  }
  return 0;
}
