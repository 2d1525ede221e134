// Fuzz target: the handshake. Every HELLO goes through wire::decode_hello directly, and the whole set through
// the real receiver (engine::receive_accepted), whose HELLO acceptance checks are compared with the rules of
// docs/wire-format.md ("Handshake").
//
// Input: flags (1 byte), receiver stream limit (1 byte: 1 + b % 8), receiver chunk limit (1 byte: one of 4
// KiB, 64 KiB, 1 MiB, 16 MiB), then up to 8 records of 96 bytes (frame header + HELLO payload), one per
// connection; the last may be short. Connection i carries record i and is then half-closed.
//   flag bit 0: repair each record's header check   bit 1: repair each HELLO checksum
//   bit 2: fold each HELLO's stream count into 1..(number of records), so that complete sessions are common
//
// Checks:
//  - decode_hello accepts a payload only when re-encoding gives back the same bytes;
//  - the receiver refuses exactly when the rules say so, with the reason code of the first rule broken, and
//  says
//    so with an ABORTED frame on the refused connection and on those accepted before it;
//  - when it accepts, it answers HELLO_ACK on every stream, echoing index and session, with the capability
//    intersection; it never commits (no END was sent).
#include <cstdlib>
#include <optional>
#include <set>

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
  bool refusal_sent = false;  // an ABORTED goes to the offending connection
  // A HELLO with the resume flag among those read: what a receiver without a running session does with it is
  // not pinned down yet (docs/wire-format.md), so only the generic checks apply.
  bool resume_flag = false;
  engine::wire::Hello first;
};

// The receiver's decision, derived from the specification alone.
Expected judge(const std::vector<std::vector<std::byte>>& records, unsigned max_streams, uint32_t max_chunk) {
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
    e.resume_flag = e.resume_flag || (hello.flags & engine::wire::kHelloResume);
    if (hello.version != 1) return refuse(Reason::version);
    if (hello.stream_count < 1 || hello.stream_count > max_streams) return refuse(Reason::stream);
    if (hello.stream_index >= hello.stream_count) return refuse(Reason::stream);
    if (hello.max_chunk_bytes < 4096 || hello.max_chunk_bytes > max_chunk) return refuse(Reason::chunk_size);
    if (i > 0 && (hello.session_id != e.first.session_id || hello.stream_count != e.first.stream_count ||
                  hello.max_chunk_bytes != e.first.max_chunk_bytes)) {
      return refuse(Reason::session);
    }
    if (!seen.insert(hello.stream_index).second) return refuse(Reason::stream);
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
  const uint32_t max_chunk = kChunkLimits[in.u8() % 4];

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
  ro.max_streams = max_streams;
  ro.max_chunk_bytes = max_chunk;
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

  const Expected e = judge(records, max_streams, max_chunk);
  if (std::getenv("DSTX_FUZZ_VERBOSE")) {
    std::fprintf(stderr, "handshake: %zu connections, expected %s %s after %u, got %s: %s\n", records.size(),
                 e.accepted ? "accepted" : "refused", engine::wire::reason_name(e.reason), e.streams,
                 engine::wire::reason_name(res.reason), res.error.c_str());
  }
  FUZZ_CHECK(!res.committed, "committed without an END");
  if (e.resume_flag) return 0;  // see Expected::resume_flag
  FUZZ_CHECK(res.reason == e.reason, "receiver ended with reason %s (%s), the rules say %s",
             engine::wire::reason_name(res.reason), res.error.c_str(), engine::wire::reason_name(e.reason));
  for (size_t i = 0; i < answers.size(); ++i) {
    const auto& a = answers[i];
    const bool offending = !e.accepted && e.refusal_sent && i == e.streams;
    if (offending) {
      FUZZ_CHECK(!a.empty() && a[0].header.type == FrameType::aborted && Reason(a[0].header.aux) == e.reason,
                 "connection %zu: refused without ABORTED %s", i, engine::wire::reason_name(e.reason));
    } else if (i >= e.streams) {
      FUZZ_CHECK(a.empty(), "connection %zu got %zu frames but was never part of the session", i, a.size());
    } else if (!e.accepted) {
      // Accepted before the session failed: told why (or, at least, told nothing else).
      for (const auto& f : a) {
        FUZZ_CHECK(f.header.type == FrameType::aborted && Reason(f.header.aux) == e.reason,
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
                          (engine::wire::kCapLz4 | engine::wire::kCapZstd | engine::wire::kCapTransactions);
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
