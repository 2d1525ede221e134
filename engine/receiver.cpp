// The receiving side: accept and check every stream's HELLO, one worker per stream decoding and verifying
// chunks into the reorder window, one writer applying them to the sink in order, acknowledging, and after
// END checking counts and digest before committing.
#include <sys/socket.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include "compress/codec.h"
#include "engine/session.h"
#include "engine/transfer.h"
#include "engine/window.h"

namespace dstx::engine {
namespace {

using Clock = std::chrono::steady_clock;
using wire::Reason;

inline constexpr uint64_t kAckEveryChunks = 16;
inline constexpr auto kAckEvery = std::chrono::milliseconds(100);

uint64_t our_capabilities() {
  return wire::kCapLz4 | wire::kCapZstd | wire::kCapTransactions;
}

struct Shared {
  io::Sink& sink;
  const RecvOptions& options;
  std::vector<io::Fd>& conns;
  Stats& stats;
  io::Backend backend;
  uint32_t chunk_bytes;
  ReorderWindow window;
  Failure failure;
  std::mutex control_mu;  // sends on stream 0 (ACK, COMMITTED, ABORTED) come from more than one thread
  // END bookkeeping.
  std::mutex end_mu;
  unsigned streams_ended = 0;
  bool end_seen = false;
  wire::Header end;
  bool committed = false;
  std::atomic<unsigned> running{0};
  std::mutex done_mu;
  std::condition_variable done_cv;

  Shared(io::Sink& s, const RecvOptions& o, std::vector<io::Fd>& c, Stats& st, io::Backend b, uint32_t chunk,
         uint32_t slots)
      : sink(s), options(o), conns(c), stats(st), backend(b), chunk_bytes(chunk), window(slots, chunk) {}

  void fail(Reason reason, std::string text, bool from_peer = false) {
    if (failure.set(reason, std::move(text), from_peer)) window.close();
  }

  // Each caller passes its own ring: a ring belongs to the thread that made it.
  int control_send(io::Ring& ring, const wire::Header& h, std::span<const std::byte> payload = {}) {
    std::lock_guard lock(control_mu);
    return send_frame(ring, conns[0].get(), h, payload);
  }

  void thread_done() {
    std::lock_guard lock(done_mu);
    --running;
    done_cv.notify_all();
  }
};

void stream_worker(Shared& sh, unsigned index) {
  const std::string name = "stream " + std::to_string(index);
  const int fd = sh.conns[index].get();
  std::unique_ptr<io::Ring> ring;
  std::vector<std::byte> scratch;
  try {
    ring = io::make_ring(sh.backend, io::RingOptions{.entries = 4});
    scratch.resize(compress::encode_bound(compress::Codec::zstd, sh.chunk_bytes) +
                   compress::encode_bound(compress::Codec::lz4, sh.chunk_bytes));
  } catch (const std::exception& e) {
    sh.fail(Reason::internal, name + ": " + e.what());
    return;
  }
  uint64_t last_seq = 0;
  while (!sh.failure.failed()) {
    const HeaderRead hr = recv_header(*ring, fd, sh.chunk_bytes);
    if (sh.failure.failed()) break;
    if (hr.kind == HeaderRead::eof) {
      sh.fail(Reason::connection, name + ": connection closed by the sender before END");
      break;
    }
    if (hr.kind == HeaderRead::io_error) {
      sh.fail(Reason::connection, name + ": receive: " + errno_text(hr.err));
      break;
    }
    if (hr.kind == HeaderRead::bad) {
      sh.fail(Reason::protocol, name + ": " + wire::error_text(hr.wire_error) + " (after chunk " +
                                    std::to_string(last_seq) + ")");
      break;
    }
    const wire::Header& h = hr.header;
    if (h.type == wire::FrameType::data) {
      if (h.seq <= last_seq) {
        sh.fail(Reason::protocol, name + ": chunk " + std::to_string(h.seq) + " after chunk " +
                                      std::to_string(last_seq) + " (duplicate or out of order)");
        break;
      }
      last_seq = h.seq;
      std::span<std::byte> slot;
      const auto admit = sh.window.admit(h.seq, &slot);
      if (admit == ReorderWindow::Admit::closed) break;
      if (admit == ReorderWindow::Admit::duplicate) {
        sh.fail(Reason::protocol, name + ": duplicate chunk " + std::to_string(h.seq));
        break;
      }
      const std::span<std::byte> raw = slot.first(h.raw_len);
      std::span<const std::byte> enc;
      if (h.flags & wire::kFlagZero) {
        // nothing on the wire
      } else if (h.codec == uint8_t(compress::Codec::none)) {
        if (io::recv_full(*ring, fd, raw.data(), raw.size()) != int64_t(raw.size())) {
          sh.fail(Reason::connection, name + ": connection lost inside chunk " + std::to_string(h.seq));
          break;
        }
        enc = raw;
      } else {
        if (io::recv_full(*ring, fd, scratch.data(), h.payload_len) != int64_t(h.payload_len)) {
          sh.fail(Reason::connection, name + ": connection lost inside chunk " + std::to_string(h.seq));
          break;
        }
        enc = std::span<const std::byte>(scratch.data(), h.payload_len);
      }
      // Zero chunks are never materialised: the sink gets a zero run.
      if (!(h.flags & wire::kFlagZero)) {
        const compress::DecodeError de =
            compress::decode_chunk(compress::Codec(h.codec), false, enc, raw, h.hash);
        if (de != compress::DecodeError::ok) {
          sh.fail(Reason::checksum, name + ": chunk " + std::to_string(h.seq) + " at offset " +
                                        std::to_string(h.offset) + ": " + compress::decode_error_text(de));
          break;
        }
      }
      sh.stats.wire_bytes.fetch_add(wire::kHeaderBytes + h.payload_len, std::memory_order_relaxed);
      if (!(h.flags & wire::kFlagZero)) {
        (h.codec == uint8_t(compress::Codec::none) ? sh.stats.raw_chunks : sh.stats.compressed_chunks)
            .fetch_add(1, std::memory_order_relaxed);
      }
      sh.window.publish(ChunkMeta{
          .seq = h.seq, .offset = h.offset, .raw_len = h.raw_len, .hash = h.hash, .flags = h.flags});
    } else if (h.type == wire::FrameType::end) {
      std::lock_guard lock(sh.end_mu);
      if (sh.end_seen && (sh.end.seq != h.seq || sh.end.offset != h.offset || sh.end.hash != h.hash)) {
        sh.fail(Reason::protocol, name + ": END differs from another stream's END");
        break;
      }
      if (last_seq > h.seq) {
        sh.fail(Reason::protocol, name + ": chunk " + std::to_string(last_seq) + " beyond END's count " +
                                      std::to_string(h.seq));
        break;
      }
      sh.end_seen = true;
      sh.end = h;
      ++sh.streams_ended;
      sh.stats.wire_bytes.fetch_add(wire::kHeaderBytes, std::memory_order_relaxed);
      break;
    } else if (h.type == wire::FrameType::aborted) {
      const std::string text = recv_abort_text(*ring, fd, h);
      sh.fail(Reason(h.aux),
              std::string("sender aborted (") + wire::reason_name(Reason(h.aux)) + "): " + text, true);
      break;
    } else {
      sh.fail(Reason::protocol, name + ": unexpected frame type " + std::to_string(int(h.type)));
      break;
    }
  }
}

// Applies chunks to the sink in order, acknowledges, and commits after END.
void writer(Shared& sh) {
  std::unique_ptr<io::Ring> ring;
  try {
    ring = io::make_ring(sh.backend, io::RingOptions{.entries = 4});
  } catch (const std::exception& e) {
    sh.fail(Reason::internal, e.what());
    return;
  }
  wire::StreamDigest digest;
  uint64_t bytes = 0;
  uint64_t applied = 0;
  uint64_t acked = 0;
  auto last_ack = Clock::now();
  try {
    for (;;) {
      bool all_ended;
      {
        std::lock_guard lock(sh.end_mu);
        all_ended = sh.streams_ended == sh.conns.size();
        if (all_ended && applied == sh.end.seq) break;
      }
      ChunkMeta meta;
      std::span<const std::byte> data;
      const auto w = sh.window.wait_next(std::chrono::milliseconds(20), &meta, &data);
      if (w == ReorderWindow::Wait::closed) return;
      if (w == ReorderWindow::Wait::timeout) {
        if (all_ended) {
          sh.fail(Reason::protocol, "chunk " + std::to_string(applied + 1) + " never arrived (sequence gap)");
          return;
        }
        continue;
      }
      if (meta.offset != bytes) {
        sh.fail(Reason::protocol, "chunk " + std::to_string(meta.seq) + " claims offset " +
                                      std::to_string(meta.offset) + ", expected " + std::to_string(bytes));
        return;
      }
      if (meta.flags & wire::kFlagZero)
        sh.sink.write_zero(*ring, bytes, meta.raw_len);
      else
        sh.sink.write(*ring, bytes, data);
      if (meta.flags & wire::kFlagEndOfTransaction) sh.sink.end_transaction(*ring);
      digest.add(meta.seq, meta.raw_len, meta.hash);
      bytes += meta.raw_len;
      applied = meta.seq;
      sh.window.release_next();
      sh.stats.bytes.fetch_add(meta.raw_len, std::memory_order_relaxed);
      sh.stats.chunks.fetch_add(1, std::memory_order_relaxed);
      if (meta.flags & wire::kFlagZero) sh.stats.zero_chunks.fetch_add(1, std::memory_order_relaxed);
      if (applied - acked >= kAckEveryChunks || Clock::now() - last_ack > kAckEvery) {
        sh.control_send(*ring,
                        wire::make_ack(applied));  // a lost ACK only delays the sender's progress display
        acked = applied;
        last_ack = Clock::now();
      }
    }
    const wire::Header end = [&] {
      std::lock_guard lock(sh.end_mu);
      return sh.end;
    }();
    if (end.offset != bytes) {
      sh.fail(Reason::digest,
              "END says " + std::to_string(end.offset) + " bytes, received " + std::to_string(bytes));
      return;
    }
    if (end.hash != digest.value()) {
      sh.fail(Reason::digest, "whole-stream digest mismatch: sender " + std::to_string(end.hash) +
                                  ", received " + std::to_string(digest.value()));
      return;
    }
    sh.sink.commit(*ring, bytes);
  } catch (const std::exception& e) {
    sh.fail(Reason::sink, sh.sink.describe() + ": " + e.what());
    return;
  }
  if (sh.failure.failed()) return;
  sh.committed = true;
  const int rc = sh.control_send(*ring, wire::make_committed(applied, bytes, digest.value()));
  if (rc < 0) {
    // The sink is committed but the sender cannot learn it: it will report failure, which is the safe side.
    sh.fail(Reason::connection, "send COMMITTED: " + errno_text(rc));
  }
}

struct Refusal {
  Reason reason;
  std::string text;
};

// Reads one HELLO. Returns the refusal, if any.
std::optional<Refusal> read_hello(io::Ring& ring, int fd, int timeout_ms, const RecvOptions& o,
                                  wire::Hello* out) {
  const int r = wait_readable(fd, timeout_ms);
  if (r == 0) return Refusal{Reason::timeout, "no HELLO within " + std::to_string(timeout_ms) + " ms"};
  if (r < 0) return Refusal{Reason::connection, "poll: " + errno_text(r)};
  const HeaderRead hr = recv_header(ring, fd, wire::kMaxChunkBytes);
  if (hr.kind == HeaderRead::eof) return Refusal{Reason::connection, "peer closed before HELLO"};
  if (hr.kind == HeaderRead::io_error)
    return Refusal{Reason::connection, "receive HELLO: " + errno_text(hr.err)};
  if (hr.kind == HeaderRead::bad) {
    return Refusal{Reason::protocol, std::string("not a dstx HELLO: ") + wire::error_text(hr.wire_error)};
  }
  if (hr.header.type != wire::FrameType::hello) return Refusal{Reason::protocol, "first frame is not HELLO"};
  std::byte payload[wire::kHelloBytes];
  if (io::recv_full(ring, fd, payload, sizeof payload) != int64_t(sizeof payload)) {
    return Refusal{Reason::protocol, "truncated HELLO"};
  }
  if (wire::decode_hello(std::span<const std::byte, wire::kHelloBytes>(payload), out) != wire::Error::ok) {
    return Refusal{Reason::protocol, "malformed HELLO"};
  }
  const wire::Hello& h = *out;
  if (h.version != wire::kVersion) {
    return Refusal{Reason::version, "protocol version " + std::to_string(h.version) +
                                        " not supported (this receiver speaks " +
                                        std::to_string(wire::kVersion) + ")"};
  }
  if (h.stream_count == 0 || h.stream_count > o.max_streams) {
    return Refusal{Reason::stream, "stream count " + std::to_string(h.stream_count) + " outside 1.." +
                                       std::to_string(o.max_streams)};
  }
  if (h.stream_index >= h.stream_count) {
    return Refusal{Reason::stream, "stream index " + std::to_string(h.stream_index) + " >= stream count " +
                                       std::to_string(h.stream_count)};
  }
  if (h.max_chunk_bytes < wire::kMinChunkBytes || h.max_chunk_bytes > o.max_chunk_bytes) {
    return Refusal{Reason::chunk_size, "chunk size " + std::to_string(h.max_chunk_bytes) + " outside " +
                                           std::to_string(wire::kMinChunkBytes) + ".." +
                                           std::to_string(o.max_chunk_bytes)};
  }
  return std::nullopt;
}

void refuse(io::Ring& ring, int fd, const Refusal& r) {
  send_frame(ring, fd, wire::make_aborted(r.reason, r.text.size()),
             std::as_bytes(std::span(r.text.data(), std::min<size_t>(r.text.size(), wire::kMaxTextBytes))));
}

}  // namespace

namespace {

// Where the streams' connections come from: accepted on a listener, or handed in already connected. Returns
// an invalid Fd when none comes within the time-out (or none is left); throws for a broken listener.
using NextConnection = std::function<io::Fd(int timeout_ms)>;

Result receive_impl(io::Sink& sink, const NextConnection& next_connection, const RecvOptions& options,
                    Stats* stats_in, const Cancel* cancel) {
  const auto started = Clock::now();
  Stats local_stats;
  Stats& stats = stats_in ? *stats_in : local_stats;
  Result result;
  auto fail = [&](Reason reason, std::string text) {
    sink.abort();
    result.reason = reason;
    result.error = std::move(text);
    result.seconds = std::chrono::duration<double>(Clock::now() - started).count();
    return result;
  };
  io::Backend backend;
  std::unique_ptr<io::Ring> ring;
  try {
    backend = io::choose_backend(&result.io_backend);
    ring = io::make_ring(backend, io::RingOptions{.entries = 8});
  } catch (const std::exception& e) {
    return fail(Reason::internal, e.what());
  }

  // Accept the streams of one session.
  std::vector<io::Fd> conns;
  wire::Hello first;
  for (unsigned accepted = 0; conns.empty() || accepted < first.stream_count; ++accepted) {
    io::Fd c;
    // Wait in short slices so a cancel is noticed.
    const int timeout_ms = conns.empty() ? options.accept_timeout_ms : options.handshake_timeout_ms;
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    try {
      while (!c) {
        if (cancel && cancel->requested())
          return fail(Reason::cancelled, "cancelled while waiting for the sender");
        if (timeout_ms >= 0 && Clock::now() > deadline) {
          const size_t have =
              size_t(std::count_if(conns.begin(), conns.end(), [](const io::Fd& f) { return bool(f); }));
          return fail(Reason::timeout,
                      conns.empty() ? "no sender connected within " + std::to_string(timeout_ms) + " ms"
                                    : "only " + std::to_string(have) + " of " +
                                          std::to_string(first.stream_count) + " streams connected");
        }
        c = next_connection(100);
      }
    } catch (const std::exception& e) {
      return fail(Reason::connection, e.what());
    }
    wire::Hello hello;
    std::optional<Refusal> refusal =
        read_hello(*ring, c.get(), options.handshake_timeout_ms, options, &hello);
    if (!refusal && !conns.empty()) {
      if (hello.session_id != first.session_id || hello.stream_count != first.stream_count ||
          hello.max_chunk_bytes != first.max_chunk_bytes) {
        refusal = Refusal{Reason::session, "HELLO belongs to another session or disagrees with stream 0's"};
      }
    }
    if (!refusal) {
      // Streams may connect in any order: keep them indexed.
      if (conns.empty()) {
        first = hello;
        conns.resize(hello.stream_count);
      }
      if (conns[hello.stream_index]) {
        refusal =
            Refusal{Reason::stream, "stream " + std::to_string(hello.stream_index) + " connected twice"};
      }
    }
    if (refusal) {
      refuse(*ring, c.get(), *refusal);
      // The first stream defines the session: a refusal there ends this transfer.
      for (io::Fd& other : conns) {
        if (other) refuse(*ring, other.get(), *refusal);
      }
      return fail(refusal->reason, "refused sender: " + refusal->text);
    }
    conns[hello.stream_index] = std::move(c);
  }

  const uint32_t chunk = first.max_chunk_bytes;
  const unsigned n = first.stream_count;
  const uint64_t scratch = uint64_t(n) * (compress::encode_bound(compress::Codec::zstd, chunk) +
                                          compress::encode_bound(compress::Codec::lz4, chunk));
  const uint64_t budget_slots =
      options.memory_budget_bytes > scratch ? (options.memory_budget_bytes - scratch) / chunk : 0;
  const uint32_t slots = uint32_t(std::clamp<uint64_t>(budget_slots, 2, std::max<uint64_t>(16, 8ull * n)));
  stats.total_bytes.store(first.total_bytes == wire::kUnknownSize ? 0 : first.total_bytes);
  result.streams = n;

  Shared sh(sink, options, conns, stats, backend, chunk, slots);
  wire::Hello ack = first;
  ack.capabilities = first.capabilities & our_capabilities();
  for (unsigned i = 0; i < n; ++i) {
    ack.stream_index = uint16_t(i);
    std::byte payload[wire::kHelloBytes];
    wire::encode_hello(ack, std::span<std::byte, wire::kHelloBytes>(payload));
    const int rc = send_frame(
        *ring, conns[i].get(),
        wire::Header{.type = wire::FrameType::hello_ack, .payload_len = wire::kHelloBytes}, payload);
    if (rc < 0)
      return fail(Reason::connection, "stream " + std::to_string(i) + ": send HELLO_ACK: " + errno_text(rc));
  }

  std::vector<std::thread> threads;
  sh.running = n + 1;
  for (unsigned i = 0; i < n; ++i) {
    threads.emplace_back([&sh, i] {
      stream_worker(sh, i);
      sh.thread_done();
    });
  }
  std::thread writer_thread([&sh] {
    writer(sh);
    sh.thread_done();
  });
  {
    IdleWatch idle(options.idle_timeout_ms);
    std::unique_lock lock(sh.done_mu);
    while (sh.running > 0) {
      if (cancel && cancel->requested()) sh.fail(Reason::cancelled, "cancelled");
      if (idle.expired(stats.wire_bytes.load() + stats.bytes.load())) {
        sh.fail(Reason::timeout, "nothing arrived from the sender for " +
                                     std::to_string(options.idle_timeout_ms) + " ms (stalled sender?)");
      }
      if (sh.failure.failed()) break;
      sh.done_cv.wait_for(lock, std::chrono::milliseconds(20));
    }
  }
  if (sh.failure.failed()) {
    sh.window.close();
    writer_thread.join();  // the sink is no longer written once the writer is out
    sink.abort();
    if (!sh.failure.from_peer()) {
      const std::string text = sh.failure.text();
      sh.control_send(
          *ring, wire::make_aborted(sh.failure.reason(), text.size()),
          std::as_bytes(std::span(text.data(), std::min<size_t>(text.size(), wire::kMaxTextBytes))));
    }
    for (io::Fd& c : conns) ::shutdown(c.get(), SHUT_RDWR);
  } else {
    writer_thread.join();
    // Let the sender read COMMITTED before the connection closes.
    for (io::Fd& c : conns) ::shutdown(c.get(), SHUT_WR);
  }
  for (auto& t : threads) t.join();

  result.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  result.bytes = stats.bytes.load();
  result.wire_bytes = stats.wire_bytes.load();
  result.chunks = stats.chunks.load();
  if (sh.failure.failed() || !sh.committed) {
    result.reason = sh.failure.failed() ? sh.failure.reason() : Reason::internal;
    result.error = sh.failure.failed() ? sh.failure.text() : "transfer ended without commit";
    return result;
  }
  result.digest = sh.end.hash;
  result.committed = true;
  return result;
}

}  // namespace

Result receive(io::Sink& sink, int listen_fd, const RecvOptions& options, Stats* stats,
               const Cancel* cancel) {
  return receive_impl(
      sink, [&](int timeout_ms) { return io::tcp_accept(listen_fd, timeout_ms, options.socket); }, options,
      stats, cancel);
}

Result receive_accepted(io::Sink& sink, std::vector<io::Fd> connections, const RecvOptions& options,
                        Stats* stats, const Cancel* cancel) {
  size_t next = 0;
  return receive_impl(
      sink,
      [&](int timeout_ms) {
        if (next < connections.size()) {
          io::apply_socket_options(connections[next].get(), options.socket);
          return std::move(connections[next++]);
        }
        // Nothing more was handed in: wait out the slice so the time-out reports the missing streams.
        std::this_thread::sleep_for(std::chrono::milliseconds(timeout_ms));
        return io::Fd();
      },
      options, stats, cancel);
}

}  // namespace dstx::engine
