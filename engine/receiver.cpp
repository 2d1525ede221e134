// The receiving side: accept and check every stream's HELLO, one worker per stream decoding and verifying
// chunks into the reorder window, one writer applying them to the sink in order, acknowledging, and after
// END checking counts and digest before committing.
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "compress/codec.h"
#include "compress/hash.h"
#include "engine/session.h"
#include "engine/transfer.h"
#include "engine/window.h"
#include "io/memory.h"

namespace dstx::engine {
namespace {

using Clock = std::chrono::steady_clock;
using wire::Reason;

inline constexpr uint64_t kAckEveryChunks = 16;
inline constexpr auto kAckEvery = std::chrono::milliseconds(100);
// STREAM_ACK frees the sender's replay buffers: one after wire::kStreamAckBytes of chunks that hold a buffer
// there (at least one such chunk), and one every kStreamAckZeroChunks zero chunks, whose frames (a header) the
// sender keeps without a buffer: all-zero state does not wake the sender for every chunk.
inline constexpr uint32_t kStreamAckZeroChunks = 64;

uint64_t our_capabilities() {
  return wire::kCapLz4 | wire::kCapZstd | wire::kCapTransactions | wire::kCapResume | wire::kCapPaged |
         wire::kCapPageHash;
}

// A stream's buffer for an encoded payload: the largest any codec may send for one chunk.
size_t decode_buffer_bytes(uint32_t chunk) {
  return std::max({compress::encode_bound(compress::Codec::lz4, chunk),
                   compress::encode_bound(compress::Codec::zstd, chunk),
                   compress::encode_bound(compress::Codec::sparse, chunk)});
}

// What a session needs at the least: a decode buffer per stream and a reorder window of two chunks.
uint64_t minimum_memory_bytes(unsigned streams, uint32_t chunk) {
  return uint64_t(streams) * decode_buffer_bytes(chunk) + 2ull * chunk;
}

// One stream's connection. Its worker owns it; with resume the acceptor hands a reconnection over through
// `pending` and shuts the old connection so the worker notices.
struct Link {
  std::mutex mu;  // guards owner, pending, and every send on this stream
  std::condition_variable cv;
  io::Fd owner;
  io::Fd pending;
  std::atomic<int> fd{-1};
  std::atomic<bool> broken{false};  // its worker saw the connection break and waits for a resume
  bool silenced = false;            // under mu: ABORTED went out, and nothing may follow it
  // Held from reading `fd` to shutting it, and while a resume stores the new connection's number (it closes
  // the old one afterwards): a shutdown never finds a number that was closed meanwhile and reused. Never held
  // while sending (a send blocked on a stalled peer is what a shutdown ends).
  std::mutex swap_mu;
  void shut(int how) {
    std::lock_guard lock(swap_mu);
    ::shutdown(fd.load(), how);
  }
};

struct Shared {
  io::Sink& sink;
  const bool sink_takes_pieces;  // sink.takes_pieces(), asked once
  const RecvOptions& options;
  std::vector<Link>& links;
  Stats& stats;
  io::Backend backend;
  EventLog events;  // options.log's lines, passed on by the supervisor
  uint32_t chunk_bytes;
  ReorderWindow window;
  Failure failure;
  bool resume = false;  // broken streams may come back (a listener is there to accept them)
  wire::Hello hello_ack;
  TlsSession* tls = nullptr;  // the streams' TLS: reconnections are secured like the first connections
  const Cancel* cancel = nullptr;
  // END bookkeeping.
  std::mutex end_mu;
  unsigned streams_ended = 0;
  bool end_seen = false;
  wire::Header end;
  std::atomic<bool> in_sink{false};     // the writer is handing a chunk to the sink (which may block)
  std::atomic<bool> committing{false};  // the writer is in the sink's commit, or past it
  std::atomic<bool> committed{false};   // and COMMITTED goes (went) to the sender: the transfer succeeded
  std::atomic<bool> done{false};  // the writer is out: committed or failed
  std::atomic<unsigned> running{0};
  std::atomic<unsigned> fixed_file_streams{0};
  std::mutex done_mu;
  std::condition_variable done_cv;
  // The connection whose handshake the acceptor is reading (-1: none), under accepting_mu.
  std::mutex accepting_mu;
  int accepting_fd = -1;
  // Readable once the transfer is over (done or failed): the acceptor's wait for reconnections ends at once.
  io::Fd over_event{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};

  Shared(io::Sink& s, const RecvOptions& o, std::vector<Link>& l, Stats& st, io::Backend b, uint32_t chunk,
         uint32_t slots)
      : sink(s),
        sink_takes_pieces(s.takes_pieces()),
        options(o),
        links(l),
        stats(st),
        backend(b),
        events(o.log),
        chunk_bytes(chunk),
        window(slots, chunk) {}

  // The caller's cancel, if requested, as a failure (the supervisor checks it too, every 20 ms).
  void check_cancel() {
    if (cancel && cancel->requested()) fail(Reason::cancelled, "cancelled");
  }
  void fail(Reason reason, std::string text, bool from_peer = false) {
    if (failure.set(reason, std::move(text), from_peer)) {
      window.close();
      wake_links();
    }
  }
  void wake_links() {
    for (Link& l : links) l.cv.notify_all();
    const uint64_t one = 1;
    if (over_event) (void)!::write(over_event.get(), &one, sizeof one);
    // A connection the acceptor is still reading a handshake from (a silent stray could hold it for the
    // handshake time-out, and the receive's end with it): its wait ends now.
    std::lock_guard lock(accepting_mu);
    if (accepting_fd >= 0) ::shutdown(accepting_fd, SHUT_RDWR);
  }

  // Each caller passes its own ring: a ring belongs to the thread that made it.
  // `last`: the stream's last frame (ABORTED); later sends on it are dropped (-ECANCELED).
  int send_on(io::Ring& ring, unsigned stream, const wire::Header& h, std::span<const std::byte> payload = {},
              bool last = false) {
    Link& l = links[stream];
    std::lock_guard lock(l.mu);
    if (l.silenced) return -ECANCELED;
    l.silenced = last;
    return send_frame(ring, l.fd.load(), h, payload);
  }

  void thread_done() {
    std::lock_guard lock(done_mu);
    --running;
    done_cv.notify_all();
  }
};

void linger_until_closed(std::vector<Link>& links, std::chrono::milliseconds limit) {
  const auto until = Clock::now() + limit;
  std::vector<char> sink(64 << 10);
  std::vector<pollfd> pfds;
  for (Link& l : links) pfds.push_back(pollfd{.fd = l.fd.load(), .events = POLLIN, .revents = 0});
  size_t open = pfds.size();
  while (open > 0 && Clock::now() < until) {
    if (::poll(pfds.data(), pfds.size(), 20) <= 0) continue;
    for (pollfd& p : pfds) {
      if (p.fd < 0 || !p.revents) continue;
      const ssize_t n = ::recv(p.fd, sink.data(), sink.size(), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        p.fd = -1;
        --open;
      }
    }
  }
}

int send_hello_ack(io::Ring& ring, int fd, wire::Hello ack) {
  std::byte payload[wire::kHelloBytes];
  wire::encode_hello(ack, std::span<std::byte, wire::kHelloBytes>(payload));
  return send_frame(
      ring, fd, wire::Header{.type = wire::FrameType::hello_ack, .payload_len = wire::kHelloBytes}, payload);
}

class StreamWorker {
 public:
  StreamWorker(Shared& sh, unsigned index)
      : sh_(sh), index_(index), link_(sh.links[index]), name_("stream " + std::to_string(index)) {}

  void run() {
    try {
      ring_ = io::make_ring(sh_.backend, io::RingOptions{.entries = 4});
      // The stream's socket as a fixed file: io_uring neither looks it up nor references it per receive.
      const int fd = link_.fd.load();
      if (sh_.backend == io::Backend::uring && ring_->register_files(std::span(&fd, 1)) == 0) {
        socket_file_ = 0;
        sh_.fixed_file_streams.fetch_add(1, std::memory_order_relaxed);
      }
      scratch_ = io::IoMemory(decode_buffer_bytes(sh_.chunk_bytes));
    } catch (const std::exception& e) {
      sh_.fail(Reason::internal, name_ + ": " + e.what());
      return;
    }
    ack_every_ = std::max<uint32_t>(1, wire::kStreamAckBytes / sh_.chunk_bytes);
    while (!sh_.failure.failed() && !(sh_.done && ended_)) {
      if (!next_frame()) break;
    }
  }

 private:
  // Reads and handles one frame. False: this worker is done (END with nothing more to come, or failure).
  bool next_frame() {
    const HeaderRead hr = recv_header(*ring_, link_.fd.load(), sh_.chunk_bytes, socket_file_);
    if (sh_.failure.failed()) return false;
    if (hr.kind == HeaderRead::eof || hr.kind == HeaderRead::io_error) {
      if (ended_ && sh_.done) return false;  // the sender closed after COMMITTED
      return lost(hr.kind == HeaderRead::eof ? "connection closed by the sender before the transfer ended"
                                             : "receive: " + errno_text(hr.err));
    }
    if (hr.kind == HeaderRead::bad) {
      sh_.fail(Reason::protocol, name_ + ": " + wire::error_text(hr.wire_error) + " (after chunk " +
                                     std::to_string(last_seq_) + ")");
      return false;
    }
    const wire::Header& h = hr.header;
    switch (h.type) {
      case wire::FrameType::data:
        return data(h);
      case wire::FrameType::end:
        return end(h);
      case wire::FrameType::aborted: {
        const std::string text = recv_abort_text(*ring_, link_.fd.load(), h);
        const Reason reason = wire::reason_from_peer(h.aux);
        sh_.fail(reason, std::string("sender aborted (") + wire::reason_name(reason) + "): " + text, true);
        return false;
      }
      default:
        sh_.fail(Reason::protocol, name_ + ": unexpected frame type " + std::to_string(int(h.type)));
        return false;
    }
  }

  bool data(const wire::Header& h) {
    if (ended_) {
      sh_.fail(Reason::protocol, name_ + ": chunk " + std::to_string(h.seq) + " after END");
      return false;
    }
    if (h.seq <= last_seq_) {
      sh_.fail(Reason::protocol, name_ + ": chunk " + std::to_string(h.seq) + " after chunk " +
                                     std::to_string(last_seq_) + " (duplicate or out of order)");
      return false;
    }
    std::span<std::byte> slot;
    const auto admit = sh_.window.admit(h.seq, &slot);
    if (admit == ReorderWindow::Admit::closed) return false;
    if (admit == ReorderWindow::Admit::duplicate) {
      sh_.fail(Reason::protocol, name_ + ": duplicate chunk " + std::to_string(h.seq));
      return false;
    }
    const std::span<std::byte> raw = slot.first(h.raw_len);
    // A sparse payload that fits lands packed against the end of the slot and is verified as it is (its zero
    // pages not hashed, or with raw hashes from a static page). For a sink that takes pieces it stays so (the
    // writer hands on its runs: zero pages are never written at all); for any other it is expanded in place
    // here. A paged one (compressed sparse form, shorter than the chunk: decode_header checked aux) is
    // decompressed there.
    const bool paged = h.flags & wire::kFlagPaged;
    const uint32_t sparse_len = paged ? h.aux : h.payload_len;
    const bool sparse_in_slot =
        paged || (h.codec == uint8_t(compress::Codec::sparse) && !(h.flags & wire::kFlagZero) &&
                  h.payload_len <= slot.size());
    uint32_t packed_len = 0;
    if (!(h.flags & wire::kFlagZero)) {
      std::byte* into = h.codec == uint8_t(compress::Codec::none) ? raw.data()
                        : sparse_in_slot && !paged                ? slot.data() + slot.size() - h.payload_len
                                                                  : scratch_.data();
      const int64_t n = io::recv_full(*ring_, link_.fd.load(), into, h.payload_len, socket_file_);
      if (n != int64_t(h.payload_len)) {
        // The frame is lost with the connection; the sender sends it again after a resume.
        sh_.window.cancel(h.seq);
        return lost("connection lost inside chunk " + std::to_string(h.seq));
      }
      const std::span<const std::byte> enc(into, h.payload_len);
      const std::span<std::byte> sparse = sparse_in_slot ? slot.last(sparse_len) : std::span<std::byte>();
      compress::DecodeError de = compress::DecodeError::ok;
      if (paged) de = compress::decode_paged(compress::Codec(h.codec), enc, sparse, h.raw_len);
      if (de == compress::DecodeError::ok) {
        const compress::HashForm form = wire::hash_form(sh_.hello_ack.capabilities);
        de = sparse_in_slot
                 ? compress::verify_sparse(sparse, h.raw_len, h.hash, hasher_, form)
                 : compress::decode_chunk(compress::Codec(h.codec), false, enc, raw, h.hash, 0, form);
      }
      if (de != compress::DecodeError::ok) {
        sh_.fail(Reason::checksum, name_ + ": chunk " + std::to_string(h.seq) + " at offset " +
                                       std::to_string(h.offset) + ": " + compress::decode_error_text(de));
        return false;
      }
      if (sparse_in_slot && sh_.sink_takes_pieces)
        packed_len = sparse_len;
      else if (sparse_in_slot)
        compress::expand_sparse_at_end(slot, sparse_len, h.raw_len);
    }
    // Zero chunks are never materialised: the sink gets a zero run.
    last_seq_ = h.seq;
    sh_.stats.wire_bytes.fetch_add(wire::kHeaderBytes + h.payload_len, std::memory_order_relaxed);
    if (!(h.flags & wire::kFlagZero)) {
      (h.codec == uint8_t(compress::Codec::none) ? sh_.stats.raw_chunks : sh_.stats.compressed_chunks)
          .fetch_add(1, std::memory_order_relaxed);
      sh_.stats.codec_chunks[h.codec & 3].fetch_add(1, std::memory_order_relaxed);
      if (paged) sh_.stats.paged_chunks.fetch_add(1, std::memory_order_relaxed);
    }
    sh_.window.publish(ChunkMeta{.seq = h.seq,
                                 .offset = h.offset,
                                 .raw_len = h.raw_len,
                                 .hash = h.hash,
                                 .flags = h.flags,
                                 .packed_len = packed_len});
    if (h.flags & wire::kFlagZero ? ++since_ack_zero_ >= kStreamAckZeroChunks : ++since_ack_ >= ack_every_)
      stream_ack();
    return true;
  }

  bool end(const wire::Header& h) {
    // Held across the STREAM_ACK below too: the writer commits (and sends COMMITTED, after which nothing may
    // follow on the stream) only once it sees every END under this lock.
    std::lock_guard lock(sh_.end_mu);
    if (sh_.end_seen && (sh_.end.seq != h.seq || sh_.end.offset != h.offset || sh_.end.hash != h.hash)) {
      sh_.fail(Reason::protocol, name_ + ": END differs from another stream's END");
      return false;
    }
    if (last_seq_ > h.seq) {
      sh_.fail(Reason::protocol, name_ + ": chunk " + std::to_string(last_seq_) + " beyond END's count " +
                                     std::to_string(h.seq));
      return false;
    }
    sh_.stats.wire_bytes.fetch_add(wire::kHeaderBytes, std::memory_order_relaxed);
    if (!ended_) {  // after a resume the same END comes again
      sh_.end_seen = true;
      sh_.end = h;
      ++sh_.streams_ended;
      ended_ = true;
      sh_.window.wake();  // the writer may be waiting for a chunk that will not come: the last END ends it
    }
    stream_ack();
    // Without resume nothing more comes on this stream; with it the stream stays until the transfer ends, in
    // case the sender reconnects it.
    return sh_.resume;
  }

  void stream_ack() {
    since_ack_ = since_ack_zero_ = 0;
    sh_.send_on(*ring_, index_, wire::make_stream_ack(last_seq_));  // a lost one is repeated by the next
  }

  // The connection broke. With resume: wait (bounded) for the sender to reconnect this stream, answer its
  // HELLO with the last chunk held here, and carry on. Otherwise the transfer fails.
  bool lost(const std::string& why) {
    if (!sh_.resume) {
      sh_.fail(Reason::connection, name_ + ": " + why);
      return false;
    }
    link_.broken = true;  // COMMITTED waits for the new connection
    // `done` and the failure change without link_.mu, so a notify can fall between a check of the predicate
    // and the wait: the wait is sliced, and such a wake-up is late by one slice at most.
    if (!sh_.committed && !sh_.done && !sh_.failure.failed()) {  // not the end of the transfer
      sh_.events.add(LogLevel::warn, name_ + ": " + why + "; waiting up to " +
                                         std::to_string(sh_.options.resume_timeout_ms) +
                                         " ms for the sender to resume it");
    }
    const auto until = Clock::now() + std::chrono::milliseconds(sh_.options.resume_timeout_ms);
    std::unique_lock lock(link_.mu);
    bool back = false;
    for (;;) {
      back = bool(link_.pending);
      if (back || sh_.failure.failed() || (sh_.done && ended_) || Clock::now() >= until) break;
      link_.cv.wait_until(lock, std::min(until, Clock::now() + std::chrono::milliseconds(20)));
    }
    if (sh_.failure.failed() || (sh_.done && ended_)) return false;
    if (!back) {
      lock.unlock();
      sh_.fail(Reason::connection, name_ + ": " + why + "; not resumed within " +
                                       std::to_string(sh_.options.resume_timeout_ms) + " ms");
      return false;
    }
    // The new connection goes in before the broken one is closed, so that no thread ever finds the old
    // number in link_.fd once it may be reused (Link::shut); the ring's fixed file is re-pointed (or the
    // table dropped).
    io::Fd broken = std::exchange(link_.owner, std::move(link_.pending));
    {
      std::lock_guard swap(link_.swap_mu);
      link_.fd.store(link_.owner.get());
    }
    link_.broken = false;
    if (socket_file_ >= 0 && ring_->update_file(unsigned(socket_file_), link_.owner.get()) != 0) {
      (void)ring_->register_files({});
      socket_file_ = -1;
      sh_.fixed_file_streams.fetch_sub(1, std::memory_order_relaxed);
    }
    broken.reset();
    wire::Hello ack = sh_.hello_ack;
    ack.stream_index = uint16_t(index_);
    ack.flags = wire::kHelloResume;
    ack.resume_seq = last_seq_;
    if (send_hello_ack(*ring_, link_.owner.get(), ack) < 0) {
      return true;  // broken again at once: the next read notices and waits for the next attempt
    }
    since_ack_ = since_ack_zero_ = 0;
    sh_.stats.resumes.fetch_add(1, std::memory_order_relaxed);
    sh_.events.add(LogLevel::warn, name_ + ": resumed by the sender after chunk " + std::to_string(last_seq_));
    return true;
  }

  Shared& sh_;
  const unsigned index_;
  Link& link_;
  const std::string name_;
  std::unique_ptr<io::Ring> ring_;
  int socket_file_ = -1;  // ring_'s fixed-file slot for the stream's socket, -1 when not registered
  io::IoMemory scratch_;  // compressed payloads land here before decoding
  compress::Hasher64 hasher_;  // verifies sparse payloads kept packed
  uint64_t last_seq_ = 0;
  uint32_t ack_every_ = 1;
  uint32_t since_ack_ = 0;       // chunks since the last STREAM_ACK, but zero chunks
  uint32_t since_ack_zero_ = 0;  // zero chunks since then
  bool ended_ = false;
};

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
        all_ended = sh.streams_ended == sh.links.size();
        if (all_ended && applied == sh.end.seq) break;
      }
      ChunkMeta meta;
      std::span<std::byte> slot;
      const auto w = sh.window.wait_next(std::chrono::milliseconds(20), &meta, &slot);
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
      sh.in_sink.store(true, std::memory_order_relaxed);
      if (meta.flags & wire::kFlagZero) {
        sh.sink.write_zero(*ring, bytes, meta.raw_len);
      } else if (meta.packed_len > 0) {  // only for a sink that takes pieces
        const auto enc = std::span<const std::byte>(slot).last(meta.packed_len);
        compress::for_each_sparse_run(enc, meta.raw_len, [&](size_t at, size_t len, const std::byte* run) {
          if (run)
            sh.sink.write(*ring, bytes + at, std::span<const std::byte>(run, len));
          else
            sh.sink.write_zero(*ring, bytes + at, len);
        });
      } else {
        sh.sink.write(*ring, bytes, slot.first(meta.raw_len));
      }
      if (meta.flags & wire::kFlagEndOfTransaction) sh.sink.end_transaction(*ring);
      sh.in_sink.store(false, std::memory_order_relaxed);
      digest.add(meta.seq, meta.raw_len, meta.hash);
      bytes += meta.raw_len;
      applied = meta.seq;
      sh.window.release_next();
      sh.stats.bytes.fetch_add(meta.raw_len, std::memory_order_relaxed);
      sh.stats.chunks.fetch_add(1, std::memory_order_relaxed);
      if (meta.flags & wire::kFlagZero) sh.stats.zero_chunks.fetch_add(1, std::memory_order_relaxed);
      if (applied - acked >= kAckEveryChunks || Clock::now() - last_ack > kAckEvery) {
        sh.send_on(*ring, 0,
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
    sh.check_cancel();
    if (sh.failure.failed()) return;  // a cancel that came with the last chunk: nothing to commit
    // A commit may take long (a file's fdatasync, a device checking the state it was given): the sender
    // bounds it with its commit time-out, and the idle watch is off meanwhile, here and at the sender once
    // it has this ACK of every chunk.
    sh.committing = true;
    sh.send_on(*ring, 0, wire::make_ack(applied));  // best effort, as every ACK
    sh.sink.commit(*ring, bytes);
  } catch (const std::exception& e) {
    sh.fail(Reason::sink, sh.sink.describe() + ": " + e.what());
    return;
  }
  // COMMITTED goes on stream 0 unless a failure came during the commit (the sender gave up, a cancel): then
  // the supervisor undoes the commit (Sink::abort). Once COMMITTED is sent the transfer has succeeded,
  // whatever breaks afterwards: the sender may have read it. If stream 0 is broken (its worker saw it, or
  // the send fails), wait (bounded) for the sender to resume it; the acceptor takes reconnections until
  // COMMITTED is on its way.
  const auto deadline =
      Clock::now() + std::chrono::milliseconds(sh.resume ? sh.options.resume_timeout_ms : 0);
  for (;;) {
    sh.check_cancel();
    int rc = -EPIPE;
    if (!sh.links[0].broken && sh.failure.seal_unless_failed([&] {
          sh.committed = true;  // before the send: the sender closes its streams once it has read COMMITTED
          rc = sh.send_on(*ring, 0, wire::make_committed(applied, bytes, digest.value()));
          if (rc != 0) sh.committed = false;
          return rc == 0;
        })) {
      return;
    }
    if (sh.failure.failed()) return;
    if (!sh.resume || Clock::now() > deadline) {
      // The sender cannot learn of the commit: it reports failure, and the commit is undone to match.
      sh.fail(Reason::connection, "send COMMITTED: " + errno_text(rc));
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

struct Refusal {
  Reason reason;
  std::string text;
  bool silent = false;  // the peer closed or reset the connection before its first byte
};

// Reads one HELLO. Returns the refusal, if any.
std::optional<Refusal> read_hello(int fd, int timeout_ms, const RecvOptions& o, wire::Hello* out,
                                  const Cancel* cancel) {
  const auto deadline = io::deadline_in(timeout_ms);
  const std::string late = "no complete HELLO within " + std::to_string(timeout_ms) + " ms";
  const int r = wait_readable(fd, timeout_ms, cancel);
  if (r == -ECANCELED) return Refusal{Reason::cancelled, "cancelled while waiting for the sender's HELLO"};
  if (r == 0) return Refusal{Reason::timeout, "no HELLO within " + std::to_string(timeout_ms) + " ms"};
  if (r < 0) return Refusal{Reason::connection, "poll: " + errno_text(r)};
  const HeaderRead hr = recv_header_by(fd, wire::kMaxChunkBytes, deadline);
  if (hr.kind == HeaderRead::eof) return Refusal{Reason::connection, "peer closed before HELLO", true};
  if (hr.kind == HeaderRead::io_error && hr.err == -ECONNRESET)
    return Refusal{Reason::connection, "peer reset the connection before HELLO", true};
  if (hr.kind == HeaderRead::io_error && hr.err == -ETIMEDOUT) return Refusal{Reason::timeout, late};
  if (hr.kind == HeaderRead::io_error)
    return Refusal{Reason::connection, "receive HELLO: " + errno_text(hr.err)};
  if (hr.kind == HeaderRead::bad) {
    return Refusal{Reason::protocol, std::string("not a dstx HELLO: ") + wire::error_text(hr.wire_error)};
  }
  if (hr.header.type != wire::FrameType::hello) return Refusal{Reason::protocol, "first frame is not HELLO"};
  std::byte payload[wire::kHelloBytes];
  const int64_t got = io::recv_exact(fd, payload, sizeof payload, deadline);
  if (got == -ETIMEDOUT) return Refusal{Reason::timeout, late};
  if (got != int64_t(sizeof payload)) return Refusal{Reason::protocol, "truncated HELLO"};
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
  if (const uint64_t need = minimum_memory_bytes(h.stream_count, h.max_chunk_bytes);
      need > o.memory_budget_bytes) {
    return Refusal{Reason::chunk_size, std::to_string(h.stream_count) + " streams of " +
                                           std::to_string(h.max_chunk_bytes) + "-byte chunks need " +
                                           std::to_string(need >> 20) +
                                           " MiB of buffers, above this receiver's " +
                                           std::to_string(o.memory_budget_bytes >> 20) +
                                           " MiB budget (fewer streams, smaller chunks, or --memory)"};
  }
  return std::nullopt;
}

void refuse(io::Ring& ring, int fd, const Refusal& r) {
  send_frame(ring, fd, wire::make_aborted(r.reason, r.text.size()),
             std::as_bytes(std::span(r.text.data(), std::min<size_t>(r.text.size(), wire::kMaxTextBytes))));
}

}  // namespace

namespace {

// With resume: takes reconnections of broken streams while the transfer runs and hands each to its stream's
// worker. Anything else that connects is refused.
// Stops taking connections once the transfer committed: a sender can connect again only after it read
// COMMITTED, which goes out after `committed` is set, so a connection seen after that belongs to the next
// transfer on this listener and is left for it.
void acceptor(Shared& sh, int listen_fd, const std::function<io::Fd(int)>& next_connection,
              uint64_t session_id) {
  std::unique_ptr<io::Ring> ring;
  try {
    ring = io::make_ring(sh.backend, io::RingOptions{.entries = 4});
  } catch (const std::exception& e) {
    sh.fail(Reason::internal, e.what());
    return;
  }
  while (!sh.done && !sh.failure.failed()) {
    pollfd p[2] = {{.fd = listen_fd, .events = POLLIN, .revents = 0},
                   {.fd = sh.over_event.get(), .events = POLLIN, .revents = 0}};
    // Without the event (eventfd failed) the loop still ends, at the next 50 ms tick.
    const int r = ::poll(p, sh.over_event ? 2 : 1, 50);
    if (r <= 0 || !(p[0].revents & POLLIN)) continue;
    if (sh.committed) {  // COMMITTED is on its way: a connection now belongs to the next transfer
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    io::Fd c;
    try {
      c = next_connection(0);
    } catch (const std::exception&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    if (!c) continue;
    // Registered for wake_links (which shuts it once the transfer is over), and unregistered before `c`
    // closes it. A transfer that ended before registration is seen by the check that follows.
    struct Accepting {
      Shared& sh;
      Accepting(Shared& s, int fd) : sh(s) { set(fd); }
      ~Accepting() { set(-1); }
      void set(int fd) {
        std::lock_guard lock(sh.accepting_mu);
        sh.accepting_fd = fd;
      }
    } accepting(sh, c.get());
    if (sh.done || sh.failure.failed()) break;
    if (sh.tls->secure_server(c, sh.options.tls, sh.options.handshake_timeout_ms,
                              [&sh] { return sh.done || sh.failure.failed(); })) {
      continue;
    }
    accepting.set(c.get());  // with user-space TLS, the relay's end now
    wire::Hello hello;
    std::optional<Refusal> refusal =
        read_hello(c.get(), sh.options.handshake_timeout_ms, sh.options, &hello, sh.cancel);
    if (!refusal && !(hello.flags & wire::kHelloResume)) {
      refusal = Refusal{Reason::session, "busy: this receiver is serving another transfer"};
    }
    if (!refusal && (hello.session_id != session_id || hello.stream_index >= sh.links.size())) {
      refusal = Refusal{Reason::session, "no such session or stream to resume"};
    }
    if (refusal) {
      refuse(*ring, c.get(), *refusal);
      continue;
    }
    Link& l = sh.links[hello.stream_index];
    std::lock_guard lock(l.mu);
    l.pending = std::move(c);
    l.shut(SHUT_RDWR);  // if the worker still waits on the old connection, it notices now
    l.cv.notify_all();
  }
}

// Where the streams' connections come from: accepted on a listener, or handed in already connected. Returns
// an invalid Fd when none comes within the time-out (or none is left); throws for a broken listener.
using NextConnection = std::function<io::Fd(int timeout_ms)>;

Result receive_impl(io::Sink& sink, const NextConnection& next_connection, int listen_fd,
                    const RecvOptions& options, Stats* stats_in, const Cancel* cancel) {
  const auto started = Clock::now();
  Stats local_stats;
  Stats& stats = stats_in ? *stats_in : local_stats;
  Result result;
  TlsSession tls;  // declared before `fail`, which appends what the TLS relays saw to the error
  auto fail = [&](Reason reason, std::string text) {
    sink.abort();
    result.reason = reason;
    result.error = tls.annotate(std::move(text));
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
  // The first stream defines the session: refusing a sender ends this transfer (but see `stray` below for
  // connections that never were one), and every stream already accepted is told why, so the sender reports
  // our reason rather than a closed connection.
  // The same for every other failure while streams are being accepted (time-out, cancel, listener error).
  auto abort_accepted = [&](Reason reason, const std::string& text, const char* prefix = "") {
    for (io::Fd& other : conns) {
      if (other) refuse(*ring, other.get(), Refusal{reason, text});
    }
    return fail(reason, prefix + text);
  };
  auto refuse_accepted = [&](const Refusal& r) {
    return abort_accepted(r.reason, r.text, "refused sender: ");
  };
  // On a listener anything may connect, and what never was a sender of this session does not end the
  // receive: a connection closed or reset before its first byte (a port scan, a health check), a resume
  // left over from an earlier transfer, another sender's stream while this session's come in (told "busy").
  // It is refused, logged, and named if the wait then times out. Connections handed in are the caller's own:
  // any refusal ends the receive.
  unsigned strays = 0;
  std::string last_stray;
  auto stray = [&](const std::string& text) {
    ++strays;
    last_stray = text;
    if (options.log) options.log(LogLevel::warn, "refused a connection that is not this transfer's: " + text);
  };
  const bool strays_allowed = listen_fd >= 0;
  // A connection closed before its first byte may also be the session's own sender giving up (killed during
  // the handshake): then the streams it already opened have closed too, and the receive ends at once.
  auto sender_gone = [&] {
    for (const io::Fd& f : conns) {
      pollfd p{.fd = f.get(), .events = POLLRDHUP, .revents = 0};
      if (f && ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) return true;
    }
    return false;
  };
  unsigned accepted = 0;
  auto deadline = Clock::now() + std::chrono::milliseconds(options.accept_timeout_ms);
  while (conns.empty() || accepted < first.stream_count) {
    io::Fd c;
    // Wait in short slices so a cancel is noticed.
    const int timeout_ms = conns.empty() ? options.accept_timeout_ms : options.handshake_timeout_ms;
    try {
      while (!c) {
        if (cancel && cancel->requested())
          return abort_accepted(Reason::cancelled, "cancelled while waiting for the sender");
        if (timeout_ms >= 0 && Clock::now() > deadline) {
          const size_t have =
              size_t(std::count_if(conns.begin(), conns.end(), [](const io::Fd& f) { return bool(f); }));
          std::string text = conns.empty()
                                 ? "no sender connected within " + std::to_string(timeout_ms) + " ms"
                                 : "only " + std::to_string(have) + " of " +
                                       std::to_string(first.stream_count) + " streams connected";
          if (strays > 0) {
            text += " (refused " + std::to_string(strays) + " other connection" + (strays > 1 ? "s" : "") +
                    ", the last: " + last_stray + ")";
          }
          return abort_accepted(Reason::timeout, text);
        }
        c = next_connection(100);
      }
    } catch (const std::exception& e) {
      return abort_accepted(Reason::connection, e.what());
    }
    // TLS before the HELLO (or, without TLS, the refusal of a TLS client). A connection TLS refused had its
    // answer from secure_server (an alert, or ABORTED to a peer of the other kind): no frame of ours on it.
    if (HandshakeError e = tls.secure_server(c, options.tls, options.handshake_timeout_ms,
                                             [cancel] { return cancel && cancel->requested(); })) {
      if (cancel && cancel->requested())
        return abort_accepted(Reason::cancelled, "cancelled while waiting for the sender");
      if (strays_allowed && e.silent && !sender_gone()) {
        stray(e.text);
        continue;
      }
      return refuse_accepted(Refusal{e.reason, e.text});
    }
    wire::Hello hello;
    std::optional<Refusal> refusal =
        read_hello(c.get(), options.handshake_timeout_ms, options, &hello, cancel);
    if (refusal && refusal->reason == Reason::cancelled)
      return abort_accepted(Reason::cancelled, "cancelled while waiting for the sender");
    // Over TLS a close here is the relay's, after a handshake: that peer was a sender (secure_server tells
    // a silent one).
    if (strays_allowed && refusal && refusal->silent && !options.tls.enabled() && !sender_gone()) {
      stray(refusal->text);
      continue;
    }
    std::optional<Refusal> not_ours;
    // A resume belongs to a running session; there is none yet.
    if (!refusal && (hello.flags & wire::kHelloResume))
      not_ours = Refusal{Reason::session, "no session to resume"};
    if (!refusal && !conns.empty() && hello.session_id != first.session_id)
      not_ours = Refusal{Reason::session, "busy: this receiver is serving another transfer"};
    if (not_ours) {
      refuse(*ring, c.get(), *not_ours);
      if (!strays_allowed) return refuse_accepted(*not_ours);
      stray(not_ours->text);
      continue;
    }
    if (!refusal && !conns.empty()) {
      if (hello.stream_count != first.stream_count || hello.max_chunk_bytes != first.max_chunk_bytes) {
        refusal = Refusal{Reason::session, "HELLO disagrees with stream 0's (stream count or chunk size)"};
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
      return refuse_accepted(*refusal);
    }
    conns[hello.stream_index] = std::move(c);
    ++accepted;
    deadline = Clock::now() + std::chrono::milliseconds(options.handshake_timeout_ms);
  }

  result.tls = tls.describe();
  const uint32_t chunk = first.max_chunk_bytes;
  const unsigned n = first.stream_count;
  const uint64_t scratch = uint64_t(n) * decode_buffer_bytes(chunk);
  const uint64_t budget_slots =
      options.memory_budget_bytes > scratch ? (options.memory_budget_bytes - scratch) / chunk : 0;
  const uint32_t slots = uint32_t(std::clamp<uint64_t>(budget_slots, 2, std::max<uint64_t>(16, 8ull * n)));
  stats.total_bytes.store(first.total_bytes == wire::kUnknownSize ? 0 : first.total_bytes);
  result.streams = n;
  result.chunk_bytes = chunk;

  std::vector<Link> links(n);
  for (unsigned i = 0; i < n; ++i) {
    links[i].owner = std::move(conns[i]);
    links[i].fd.store(links[i].owner.get());
  }
  Shared sh(sink, options, links, stats, backend, chunk, slots);
  // The sink gives up a wait on its other end (a stalled pipe, a device that says "try again") once the
  // transfer fails, instead of holding it.
  struct StopGuard {
    io::Stoppable& endpoint;
    ~StopGuard() { endpoint.set_stop(nullptr); }
  } stop_guard{sink};
  sink.set_stop(&sh.failure.failed_flag());
  sh.cancel = cancel;
  // Resuming needs a listener to take reconnections.
  sh.resume = listen_fd >= 0 && (first.capabilities & wire::kCapResume);
  sh.tls = &tls;
  sh.hello_ack = first;
  sh.hello_ack.capabilities =
      first.capabilities & our_capabilities() & (sh.resume ? ~0ull : ~wire::kCapResume);
  for (unsigned i = 0; i < n; ++i) {
    wire::Hello ack = sh.hello_ack;
    ack.stream_index = uint16_t(i);
    const int rc = send_hello_ack(*ring, links[i].fd.load(), ack);
    if (rc < 0)
      return fail(Reason::connection, "stream " + std::to_string(i) + ": send HELLO_ACK: " + errno_text(rc));
  }

  std::vector<std::thread> threads;
  sh.running = n + 1;
  for (unsigned i = 0; i < n; ++i) {
    threads.emplace_back([&sh, i] {
      StreamWorker(sh, i).run();
      sh.thread_done();
    });
  }
  std::thread writer_thread([&sh] {
    writer(sh);
    sh.done = true;
    sh.wake_links();
    if (sh.committed) {
      // Streams waiting in case of a reconnection can stop now: nothing more is needed from the sender.
      for (Link& l : sh.links) l.shut(SHUT_RD);
    }
    sh.thread_done();
  });
  std::thread acceptor_thread;
  if (sh.resume) {
    acceptor_thread = std::thread([&] { acceptor(sh, listen_fd, next_connection, first.session_id); });
  }
  {
    IdleWatch idle(options.idle_timeout_ms);
    std::unique_lock lock(sh.done_mu);
    while (sh.running > 0) {
      sh.check_cancel();
      if (!sh.committing &&
          idle.expired(stats.wire_bytes.load() + stats.bytes.load() + stats.resumes.load())) {
        // Nothing arrives either while the sink blocks: the reorder window fills, and TCP holds the sender.
        const std::string ms = std::to_string(options.idle_timeout_ms);
        sh.fail(Reason::timeout, sh.in_sink ? sink.describe() + " took no bytes for " + ms +
                                                  " ms (a reader that stopped reading?)"
                                            : "nothing arrived from the sender for " + ms + " ms (stalled sender?)");
      }
      if (sh.failure.failed()) break;
      lock.unlock();  // the caller's log function may take its time
      sh.events.flush();
      lock.lock();
      if (sh.running == 0) break;
      sh.done_cv.wait_for(lock, std::chrono::milliseconds(20));
    }
  }
  if (sh.failure.failed()) {
    sh.window.close();
    // The sender learns why before the writer is waited for: it may be blocked in the sink (a pipe whose
    // reader stopped) or in its commit, for as long as they take.
    if (!sh.failure.from_peer()) {
      const std::string text = sh.failure.text();
      sh.send_on(*ring, 0, wire::make_aborted(sh.failure.reason(), text.size()),
                 std::as_bytes(std::span(text.data(), std::min<size_t>(text.size(), wire::kMaxTextBytes))),
                 /*last=*/true);  // the writer and the streams may still be at work
    }
    for (Link& l : links) l.shut(SHUT_WR);
    writer_thread.join();  // the sink is no longer written once the writer is out
    sink.abort();
    // Workers leave at their next frame; one waiting on a silent sender is woken by shutting its socket.
    sh.done = true;
    sh.wake_links();
    const auto until = Clock::now() + std::chrono::milliseconds(300);
    while (sh.running > 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (sh.running > 0) {
      for (Link& l : links) l.shut(SHUT_RD);
    }
    for (auto& t : threads) t.join();
    threads.clear();
    // Closing a socket with unread data resets it, and a reset can destroy the ABORTED still queued at the
    // sender. So read what the sender still had in flight until it closes (it does on reading ABORTED), for
    // a bounded time.
    linger_until_closed(links, std::chrono::milliseconds(300));
  } else {
    writer_thread.join();
    // Let the sender read COMMITTED before the connection closes.
    for (Link& l : links) l.shut(SHUT_WR);
  }
  sh.done = true;
  sh.wake_links();
  for (auto& t : threads) t.join();
  if (acceptor_thread.joinable()) acceptor_thread.join();
  sh.events.flush();

  result.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  result.bytes = stats.bytes.load();
  result.wire_bytes = stats.wire_bytes.load();
  result.chunks = stats.chunks.load();
  result.fixed_file_streams = sh.fixed_file_streams.load();
  if (sh.failure.failed() || !sh.committed) {
    sink.abort();  // also when the failure came during or after the sink's commit
    result.reason = sh.failure.failed() ? sh.failure.reason() : Reason::internal;
    result.error = tls.annotate(sh.failure.failed() ? sh.failure.text() : "transfer ended without commit");
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
      sink, [&](int timeout_ms) { return io::tcp_accept(listen_fd, timeout_ms, options.socket); }, listen_fd,
      options, stats, cancel);
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
      /*listen_fd=*/-1, options, stats, cancel);
}

}  // namespace dstx::engine
