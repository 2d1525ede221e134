// The sending side: handshake every stream, run one worker per stream (own ring, own buffers, several chunks
// in flight), fold finished chunks into the digest in order, send END, and wait for COMMITTED.
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cassert>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <mutex>
#include <new>
#include <stdexcept>
#include <optional>
#include <thread>

#include "compress/codec.h"
#include "engine/effort.h"
#include "engine/session.h"
#include "engine/spec.h"
#include "engine/transfer.h"
#include "engine/window.h"
#include "io/memory.h"

namespace dstx::engine {
namespace {

using Clock = std::chrono::steady_clock;

// CPU time the calling thread has used: what encoding costs, whatever else runs on the core.
Clock::duration thread_cpu_time() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
}
using wire::Reason;

// After a failure, how long stream 0 is read on for a COMMITTED already on its way.
constexpr auto kVerdictLinger = std::chrono::milliseconds(500);

// A worker's own failure (its ring), not the source's: reported as internal.
struct InternalError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Whose failure a worker's exception is: ours (the ring, memory, a broken invariant), nobody's (a cancel
// that the source noticed before the supervisor did: a device's wait ends with an error), or the source's.
Reason worker_failure_reason(const std::exception& e, const Cancel* cancel) {
  if (cancel && cancel->requested()) return Reason::cancelled;
  if (dynamic_cast<const InternalError*>(&e) || dynamic_cast<const std::logic_error*>(&e) ||
      dynamic_cast<const std::bad_alloc*>(&e)) {
    return Reason::internal;
  }
  return Reason::source;
}

// Keeps little unsent data queued in the kernel: the throughput the codec controller measures is then close
// to what the link carries, not what the socket buffers swallow, and on a fast path each byte is sent soon
// after it was copied in (the receiver's CPU per byte fell by a quarter: both ends copy the bytes while they
// are still in the cache, presumably). At 128 KiB instead of 1 MiB (a chunk), unlimited veth, 7-9 runs:
// binary state --codec none 208.6 -> 160.6 ms (3.3 GB/s, more than iperf3 carried with 2 streams), auto
// 225.5 -> 173.0, auto on random 212.8 -> 166.8, mixed 154.8 -> 141.0; 25 Gbit/s binary 220.9 -> 205.7;
// 10 Gbit/s unchanged; 1 Gbit/s binary 0.7 % slower (1611.5 -> 1623.6, auto and --codec zstd alike). 256 and
// 64 KiB fell between. Not a TCP socket (UNIX): nothing to do.
void limit_unsent(int fd) {
  constexpr int kNotSentLowat = 128 << 10;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &kNotSentLowat, sizeof kNotSentLowat);
}

// --bandwidth: a token bucket shared by all streams, on wire bytes. A frame waits until the bucket allows it;
// up to kBurst of credit builds up while idle.
class Pacer {
 public:
  explicit Pacer(uint64_t bytes_per_second) : rate_(double(bytes_per_second)) {}
  // Waits for `bytes`' turn, which may be far off at a low rate (a frame per ten seconds at 100 KB/s);
  // returns false as soon as `stop()` says so (asked every 20 ms).
  template <typename Stop>
  bool wait(size_t bytes, Stop&& stop) {
    Clock::time_point start;
    {
      std::lock_guard lock(mu_);
      const auto now = Clock::now();
      if (next_ < now - kBurst) next_ = now - kBurst;
      start = next_;
      next_ +=
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(double(bytes) / rate_));
    }
    for (auto now = Clock::now(); now < start; now = Clock::now()) {
      if (stop()) return false;
      std::this_thread::sleep_until(std::min(start, now + kSlice));
      slices_.fetch_add(1, std::memory_order_relaxed);
    }
    return true;
  }
  // Grows while frames wait for their turn: progress for the idle time-out, since nothing moves on the wire
  // meanwhile (a frame of a megabyte at 32 KB/s waits longer than the time-out) and no peer is at fault.
  uint64_t slices() const { return slices_.load(std::memory_order_relaxed); }

 private:
  static constexpr auto kBurst = std::chrono::milliseconds(5);
  static constexpr auto kSlice = std::chrono::milliseconds(20);
  const double rate_;
  std::mutex mu_;
  Clock::time_point next_{};
  std::atomic<uint64_t> slices_{0};
};

// Handshake, first half: HELLO on one connection. The receiver answers only when every stream is in, so all
// HELLOs go out before any answer is awaited.
std::string send_hello(io::Ring& ring, int fd, const wire::Hello& hello) {
  std::byte payload[wire::kHelloBytes];
  wire::encode_hello(hello, std::span<std::byte, wire::kHelloBytes>(payload));
  const int rc = send_frame(
      ring, fd, wire::Header{.type = wire::FrameType::hello, .payload_len = wire::kHelloBytes}, payload);
  return rc < 0 ? "send HELLO: " + errno_text(rc) : std::string();
}

// Handshake, second half: the receiver's HELLO_ACK, or its refusal.
HandshakeError await_hello_ack(int fd, const wire::Hello& hello, int timeout_ms, wire::Hello* reply_out,
                               const Cancel* cancel = nullptr) {
  const auto deadline = io::deadline_in(timeout_ms);
  const HandshakeError late{Reason::timeout,
                            "no complete answer to HELLO within " + std::to_string(timeout_ms) + " ms"};
  const int rc = wait_readable(fd, timeout_ms, cancel);
  if (rc == -ECANCELED) return {Reason::cancelled, "cancelled during the handshake"};
  if (rc == 0) return {Reason::timeout, "no answer to HELLO within " + std::to_string(timeout_ms) + " ms"};
  if (rc < 0) return {Reason::connection, "poll: " + errno_text(rc)};
  const HeaderRead hr = recv_header_by(fd, wire::kMaxChunkBytes, deadline);
  if (hr.kind == HeaderRead::eof) return {Reason::connection, "receiver closed the connection during the handshake"};
  if (hr.kind == HeaderRead::io_error && hr.err == -ETIMEDOUT) return late;
  if (hr.kind == HeaderRead::io_error) return {Reason::connection, "handshake: " + errno_text(hr.err)};
  if (hr.kind == HeaderRead::bad)
    return {Reason::protocol, std::string("handshake: ") + wire::error_text(hr.wire_error)};
  if (hr.header.type == wire::FrameType::aborted) {
    const Reason reason = wire::reason_from_peer(hr.header.aux);
    return {reason, refusal_text(reason, recv_abort_text_by(fd, hr.header, deadline)), true};
  }
  if (hr.header.type != wire::FrameType::hello_ack) return {Reason::protocol, "handshake: unexpected frame type"};
  std::byte ack[wire::kHelloBytes];
  const int64_t got = io::recv_exact(fd, ack, sizeof ack, deadline);
  if (got == -ETIMEDOUT) return late;
  if (got != int64_t(sizeof ack)) return {Reason::protocol, "handshake: truncated HELLO_ACK"};
  wire::Hello reply;
  const wire::Error err = wire::decode_hello(std::span<const std::byte, wire::kHelloBytes>(ack), &reply);
  if (err != wire::Error::ok) return {Reason::protocol, std::string("handshake: HELLO_ACK: ") + wire::error_text(err)};
  if (reply.session_id != hello.session_id || reply.stream_index != hello.stream_index) {
    return {Reason::protocol, "handshake: HELLO_ACK does not match our HELLO"};
  }
  if (reply.version != wire::kVersion)
    return {Reason::version, "handshake: receiver speaks protocol " + std::to_string(reply.version)};
  *reply_out = reply;
  return {};
}

uint64_t our_capabilities() {
  return wire::kCapLz4 | wire::kCapZstd | wire::kCapTransactions | wire::kCapResume | wire::kCapPaged |
         wire::kCapPageHash;
}

// Chooses the codec from the mode and what the receiver accepts.
std::string pick_codec(const SendOptions& o, uint64_t caps, compress::EncodeOptions* enc,
                       bool* zstd_in_auto) {
  enc->level = o.zstd_level;
  enc->paged = (caps & wire::kCapPaged) != 0;  // used by lz4 and zstd only
  enc->hash = wire::hash_form(caps);
  switch (o.codec) {
    case CodecMode::none:
      enc->codec = compress::Codec::none;
      enc->probe_incompressible = false;
      return {};
    case CodecMode::sparse:  // every receiver decodes sparse payloads (no capability bit)
      enc->codec = compress::Codec::none;
      enc->probe_incompressible = false;
      enc->sparse_fallback = true;
      return {};
    case CodecMode::auto_select:
      enc->codec = (caps & wire::kCapLz4) ? compress::Codec::lz4 : compress::Codec::none;
      enc->probe_incompressible = true;
      enc->sparse_fallback = true;
      *zstd_in_auto = (caps & wire::kCapLz4) && (caps & wire::kCapZstd);
      return {};
    case CodecMode::lz4:
      if (!(caps & wire::kCapLz4)) return "the receiver does not accept lz4";
      enc->codec = compress::Codec::lz4;
      enc->probe_incompressible = false;
      return {};
    case CodecMode::zstd:
      if (!(caps & wire::kCapZstd)) return "the receiver does not accept zstd";
      enc->codec = compress::Codec::zstd;
      enc->probe_incompressible = false;
      return {};
  }
  return "unknown codec mode";
}

// One stream's connection. The fd changes when a broken stream is reconnected; -1 while it is being replaced,
// so the control thread never reads a handshake meant for the worker.
struct Link {
  std::atomic<int> fd{-1};
  io::Fd owner;                        // touched only by the stream's worker (and at setup/teardown)
  // Held by the control thread while it reads a frame from fd, and by the worker while it closes the
  // connection: a reconnection reuses the closed descriptor's number, and a read begun on the old
  // connection must not take bytes of the new one's handshake (the worker's HELLO_ACK).
  std::mutex read_mu;
  // Held by the worker while it closes the connection, and by any other thread around its shutdown of fd:
  // a shutdown must not hit the number once it is closed and reused (by the reconnection, or by anything
  // else in the process).
  std::mutex swap_mu;
  std::atomic<uint64_t> acked_seq{0};  // STREAM_ACK: the receiver holds every chunk of this stream up to here
  std::atomic<bool> broken{false};     // the control thread saw the return path fail

  // From a thread other than the worker's: both directions, or `how`.
  void shut(int how = SHUT_RDWR) {
    std::lock_guard lock(swap_mu);
    if (const int f = fd.load(); f >= 0) ::shutdown(f, how);
  }
};

struct Shared {
  io::Source& source;
  const SendOptions& options;
  std::vector<Link>& links;
  Stats& stats;
  const Cancel* cancel;
  io::Backend backend;
  compress::EncodeOptions encode;
  bool zstd_in_auto = false;                 // the auto ladder may climb to zstd (the receiver accepts it)
  bool resume = false;                       // broken streams are reconnected (both sides can)
  wire::Hello hello;                         // the session's HELLO, for reconnections
  TlsSession* tls = nullptr;                 // the streams' TLS, for reconnections
  std::unique_ptr<EffortController> effort;  // --codec auto only
  std::atomic<uint64_t> coded_bytes{0};      // logical bytes of the non-zero chunks handed to the kernel
  std::atomic<unsigned> fixed_file_streams{0};
  std::unique_ptr<Pacer> pacer;              // --bandwidth only
  EventLog events;                           // options.log's lines, passed on by the supervisor
  uint32_t chunk_bytes;
  SendSequencer sequencer;
  Failure failure;
  std::mutex source_mu;      // sequential sources: claim and read under one lock keep bytes in order
  uint64_t next_offset = 0;  // sequential sources: offset of the next chunk (under source_mu)
  // Filled by the control thread; workers and the supervisor wait on it.
  std::mutex control_mu;
  std::condition_variable control_cv;
  // Workers waiting in wait_for_ack: a STREAM_ACK (one per chunk of 256 KiB and more) wakes the waiters of
  // control_cv only when there are some, not the supervisor every time (a wake-up costs this VM ~2 context
  // switches; one stream, unlimited veth: 470 of them per 512 MiB).
  std::atomic<int> ack_waiters{0};
  bool committed = false;
  bool control_done = false;  // the control thread returned (under control_mu)
  wire::Header committed_header;
  Clock::time_point committed_at;  // when the control thread read COMMITTED

  Shared(io::Source& s, const SendOptions& o, std::vector<Link>& l, Stats& st, const Cancel* ca,
         io::Backend b, uint32_t chunk, uint32_t window)
      : source(s),
        options(o),
        links(l),
        stats(st),
        cancel(ca),
        backend(b),
        events(o.log),
        chunk_bytes(chunk),
        sequencer(window) {}

  // For --codec auto at the end of a period: the logical bytes of non-zero chunks still in the streams'
  // kernel send queues (unsent or unacknowledged by the peer's TCP; from wire bytes at the transfer's ratio
  // so far), and the path rate
  // from TCP's delivery rate samples: the streams share the path, so the fastest sample not limited by the
  // sender times the stream count (-1 when every sample was limited by the sender).
  EffortController::Sockets probe_sockets() const {
    uint64_t wire_queued = 0;
    double fastest = -1;
    for (const Link& l : links) {
      int n = 0;
      const int fd = l.fd.load(std::memory_order_acquire);
      if (fd < 0) continue;
      if (::ioctl(fd, SIOCOUTQ, &n) == 0 && n > 0) wire_queued += uint64_t(n);
      const io::TcpSendState t = io::tcp_send_state(fd);
      if (t.ok && !t.app_limited && t.delivery_rate > 0) fastest = std::max(fastest, double(t.delivery_rate));
    }
    const double wire = double(stats.wire_bytes.load(std::memory_order_relaxed));
    const double logical = double(coded_bytes.load(std::memory_order_relaxed));
    return {.queued = wire > 0 ? uint64_t(double(wire_queued) * logical / wire) : 0,
            .path_rate = fastest < 0 ? -1 : fastest * double(links.size())};
  }

  bool finished() {
    std::lock_guard lock(control_mu);
    return committed || failure.failed();
  }
  void wake() { control_cv.notify_all(); }
};

// One worker: one stream, one ring, `depth` slots drawing on a pool of frame buffers. A slot goes free →
// reading → read → encoded → sending → free; sends leave in claim order, so each stream carries increasing
// sequence numbers. With resume, a sent frame moves to the replay list until the receiver acknowledges it
// (its buffer with it, unless the source can be read again), and after a reconnection the list is sent again
// from the receiver's resume point. After
// its last chunk the worker sends END (kept for replay too) and stays until the receiver commits.
class Worker {
 public:
  Worker(Shared& shared, unsigned index)
      : sh_(shared),
        index_(index),
        link_(shared.links[index]),
        wait_all_(io::socket_sends_may_wait_all(fd())) {}

  // go: 0 while the handshake lasts, then 1 to send, or -1 when the handshake failed. The rings and fixed
  // files are set up meanwhile, during the HELLO round trip.
  void run(const std::atomic<int>& go) {
    try {
      prepare();
      go.wait(0);
      if (go.load() > 0) {
        setup();
        loop();
        if (!stopping()) finish_stream();
      }
    } catch (const std::exception& e) {
      const Reason reason = worker_failure_reason(e, sh_.cancel);
      sh_.failure.set(reason, reason == Reason::cancelled ? "cancelled" : e.what());
    }
    sh_.wake();
    drain();
    finish_partial_frame();
  }

 private:
  enum class State : uint8_t { free, reading, read, encoded, sending };
  struct Slot {
    State state = State::free;
    uint64_t seq = 0;
    uint64_t offset = 0;
    uint32_t len = 0;
    int in = -1;   // pool buffer: header room + raw bytes
    int out = -1;  // pool buffer: header room + encoded bytes
    io::Completion io;
    bool end_of_transaction = false;
    const std::byte* view = nullptr;  // zero-copy source bytes (a mapped data section)
    uint64_t view_token = 0;
    // What goes on the wire, in pieces (build_iov): the frame in one piece where it is contiguous; the header
    // and then the payload where the payload stays in a source's mapping; the header with a sparse chunk's
    // bitmap and then each run of its present pages, which stay where they were read.
    std::vector<iovec> iov;
    size_t iov_at = 0;      // the first piece not wholly sent; the pieces before it are consumed
    size_t sent = 0;        // bytes of the frame sent so far
    std::byte* frame = nullptr;  // where the frame starts (its header): in frame_buf, or `header`
    size_t frame_len = 0;
    int frame_buf = -1;     // the buffer holding the frame (for replay); -1: a zero chunk's, in `header`
    bool gathered = false;  // sparse, its present pages left in the read buffer
    std::array<std::byte, wire::kHeaderBytes> header{};  // a zero chunk's frame, which holds no buffer
    compress::EncodeResult enc;
  };
  // A frame kept for resuming: in a pool buffer, or (a zero chunk's frame: the header alone) inline, so that
  // zero chunks, common in device state, hold no 1 MiB buffer each until acknowledged.
  // A gathered sparse frame keeps its read buffer: the header and bitmap in front of the chunk's bytes, whose
  // present pages it sends again in pieces.
  // A chunk of a random-access source keeps no buffer either: it is read from the source again (`reread`) and
  // goes out raw under its original header's sequence number, offset and hash. Sent frames then free their
  // buffers at once, so the next chunk is read into memory still in the cache (with every frame kept until
  // acknowledged, the pool cycles through the replay size: at 2 GB/s, raw, 9 % more sender CPU per byte).
  struct Replay {
    uint64_t seq;
    int buf;  // -1: the frame is `header` (and, when reread, the chunk's bytes from the source)
    size_t len;
    size_t at = 0;             // where the frame starts in buf
    uint32_t gathered_raw = 0;  // > 0: a gathered sparse frame of a chunk of this many bytes
    std::array<std::byte, wire::kHeaderBytes> header{};
    const std::byte* data(const Worker& w) const { return buf >= 0 ? w.buf(buf) + at : header.data(); }
    bool reread() const { return buf < 0 && len > wire::kHeaderBytes; }  // a data frame kept as its header
  };
  // Frames kept inline cost no buffer; this bounds their number per stream (~80 bytes each).
  static constexpr size_t kMaxInlineReplays = 4096;

  // What does not depend on the handshake's outcome: the rings, the buffer size, SEND_ZC, fixed files.
  void prepare() {
    const unsigned depth = std::max(1u, sh_.options.depth);
    ring_ = io::make_ring(sh_.backend, io::RingOptions{.entries = std::bit_ceil(2 * depth + 4)});
    // Synchronous source reads (sequential sources, generated content, finishing a short read) and
    // replays get their own ring: the synchronous helpers need a ring with nothing else in flight.
    sync_ring_ = io::make_ring(sh_.backend, io::RingOptions{.entries = 4});
    // Room for any codec the auto ladder may pick (encode_chunk never writes past raw size - 1 anyway), and
    // in front of a chunk's bytes for a header and a sparse bitmap.
    front_ = (wire::kHeaderBytes + compress::sparse_bitmap_bytes(sh_.chunk_bytes) + 63) & ~size_t(63);
    buf_bytes_ = round_up(
        front_ +
        std::max({size_t(sh_.chunk_bytes), compress::encode_bound(compress::Codec::lz4, sh_.chunk_bytes),
                  compress::encode_bound(compress::Codec::zstd, sh_.chunk_bytes),
                  compress::encode_bound(compress::Codec::sparse, sh_.chunk_bytes)}));
    if (sh_.backend == io::Backend::uring && io::probe().send_zc)
      zero_copy_min_ = sh_.options.zero_copy_min_bytes;
    // Fixed files: the stream's socket and, when reads go through the ring, the source file. io_uring then
    // neither looks them up nor takes a reference on them per operation. Where the kernel refuses, plain
    // fds do the same job.
    if (sh_.backend == io::Backend::uring) {
      const bool ring_reads = reads_through_ring();
      const int files[2] = {fd(), ring_reads ? sh_.source.read_fd() : -1};
      if (ring_->register_files(std::span(files, ring_reads ? 2 : 1)) == 0) {
        socket_file_ = 0;
        source_file_ = ring_reads ? 1 : -1;
        sh_.fixed_file_streams.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }

  // After the handshake: the buffer pool, sized for resuming if the receiver agreed to it.
  void setup() {
    const unsigned depth = std::max(1u, sh_.options.depth);
    size_t replay_buffers = 0;
    if (sh_.resume && !rereads()) {
      const uint64_t replay = std::min(sh_.options.replay_bytes, kMaxReplayBytes);
      // At least what the receiver lets go unacknowledged, or the stream would wait for a STREAM_ACK that
      // never comes (16K chunks in a replay buffer of 128K did, until the idle time-out).
      const size_t unacked = (wire::kStreamAckBytes + sh_.chunk_bytes - 1) / sh_.chunk_bytes + 1;
      replay_buffers = std::max<size_t>({4, unacked, replay / sh_.links.size() / buf_bytes_});
    }
    const size_t count = 2 * depth + replay_buffers;
    memory_ = io::IoMemory(buf_bytes_ * count);
    for (size_t i = count; i-- > 0;) free_.push_back(int(i));
    slots_.resize(depth);
    // A sparse frame's pieces: the header with the bitmap, then at most one run per two pages.
    for (Slot& slot : slots_) slot.iov.reserve(2 + compress::sparse_bitmap_bytes(sh_.chunk_bytes) * 4);
    send_iov_.reserve(io::kMaxIov);
    // Registered once, the buffers spare the kernel a page walk on every read (READ_FIXED). Where the kernel
    // refuses (RLIMIT_MEMLOCK, an old kernel), plain reads do the same job.
    if (sh_.options.register_buffers && sh_.backend == io::Backend::uring && io::probe().read_fixed &&
        reads_through_ring()) {
      const iovec whole{memory_.data(), buf_bytes_ * count};
      fixed_buffers_ = ring_->register_buffers(std::span(&whole, 1)) == 0;
    }
    if (sh_.effort) {  // set-up is not the transfer's CPU
      cpu_reported_ = thread_cpu_time();
      wall_reported_ = Clock::now();
    }
  }

  // With resume, sent chunks are read again from the source for a replay instead of kept (see Replay).
  bool rereads() const { return sh_.source.random_access(); }

  // Chunks are read with reads queued on ring_ (a file not in memory), not on this thread or in order.
  bool reads_through_ring() const {
    const io::Source& src = sh_.source;
    return src.random_access() && src.read_fd() >= 0 && !src.reads_from_memory();
  }

  static size_t round_up(size_t n) { return (n + 4095) & ~size_t(4095); }
  std::byte* buf(int i) const { return memory_.data() + size_t(i) * buf_bytes_; }
  // Where a chunk is read into its input buffer: behind room for a header and a sparse bitmap.
  std::byte* chunk_data(int i) const { return buf(i) + front_; }
  // No room for another chunk until acknowledgements free some: a chunk takes two buffers, and the frames kept
  // inline for resuming are bounded.
  bool pool_short() const { return free_.size() < 2 || inline_replays_ >= kMaxInlineReplays; }
  int fd() const { return link_.fd.load(std::memory_order_acquire); }

  bool stopping() {
    if (sh_.cancel && sh_.cancel->requested()) sh_.failure.set(Reason::cancelled, "cancelled");
    return sh_.failure.failed();
  }

  void loop() {
    for (;;) {
      if (stopping()) return;
      if (link_.broken.load()) {
        reconnect("the receiver's side of the connection closed");
        continue;
      }
      release_acked();
      complete_ops();  // also picks up reads that finished while a reconnection drained the ring
      bool blocked = start_reads();
      encode_ready();
      start_send();
      // Read on this thread: the next chunk now, while the one just encoded is on its way.
      if (!reads_through_ring() && !has_state(State::read)) blocked = start_reads();
      if (exhausted_ && fifo_.empty()) return;  // all our chunks are on the wire
      if (ring_->in_flight() == 0) {
        // Nothing in the kernel: wait for other workers to move the window, or for acknowledgements to free
        // replay buffers, unless there is CPU work.
        if (blocked && !has_state(State::read)) {
          if (sh_.resume && pool_short())
            wait_for_ack();
          else
            sh_.sequencer.wait_for_progress(std::chrono::milliseconds(20));
        }
        continue;
      }
      // Waiting with a frame ready behind the one being sent (with one slot: on the send itself): the link,
      // not this worker, sets the pace.
      const bool wait = !has_state(State::read);
      const bool link_wait = wait && sh_.effort && sending_ &&
                             (slots_.size() == 1 || (fifo_.size() >= 2 && fifo_[1]->state == State::encoded));
      const auto wait_start = link_wait ? Clock::now() : Clock::time_point{};
      const int rc = ring_->submit(wait ? 1 : 0);
      if (rc < 0)
        throw InternalError("stream " + std::to_string(index_) + ": io ring: " + errno_text(rc));
      reap();
      if (link_wait) sh_.effort->add_link_wait(Clock::now() - wait_start);
      if (stopping()) return;
      complete_ops();
    }
  }

  // Waits (bounded) for a STREAM_ACK after the one release_acked() last saw, or any other wake-up. This
  // worker counts itself in and then reads acked_seq; the control thread stores acked_seq and then reads the
  // count (all four sequentially consistent: keep them so): either the check here sees the new
  // acknowledgement, or the control thread sees a waiter, takes the lock (held here from the check into the
  // wait) and notifies.
  void wait_for_ack() {
    std::unique_lock lock(sh_.control_mu);
    sh_.ack_waiters.fetch_add(1, std::memory_order_seq_cst);
    if (link_.acked_seq.load(std::memory_order_seq_cst) == acked_seen_)
      sh_.control_cv.wait_for(lock, std::chrono::milliseconds(10));
    sh_.ack_waiters.fetch_sub(1, std::memory_order_seq_cst);
  }

  bool has_state(State s) const {
    return std::any_of(slots_.begin(), slots_.end(), [&](const Slot& x) { return x.state == s; });
  }
  // Frames on their way that hold the buffer their chunk was read into (raw and gathered sparse ones; a raw
  // frame whose bytes stay in a source's mapping was read into none). A worker reading on its own thread
  // reads no further while kHeldReadsAhead of them wait: with `depth` of them, it cycled through that many
  // buffers, each read out of the cache by the time it came round again. With compressed chunks' read
  // buffers given back at encoding (encode_ready), unlimited veth, auto, 9 runs: zero-heavy state 167.8 ->
  // 160.8 ms, binary 328.4 -> 311.4, mixed 261.2 -> 240.4. Compressed frames do not count: at 1 Gbit/s the
  // worker encodes the next while the last drains, and needs them ahead (counted, they cost auto 4 % on
  // mixed state there).
  static constexpr size_t kHeldReadsAhead = 2;
  size_t holding_reads() const {
    return size_t(std::count_if(slots_.begin(), slots_.end(), [](const Slot& x) {
      return (x.state == State::encoded || x.state == State::sending) && x.in >= 0 && !x.view;
    }));
  }

  // Frees the replay buffers of every frame the receiver holds.
  void release_acked() {
    const uint64_t acked = link_.acked_seq.load(std::memory_order_acquire);
    acked_seen_ = acked;
    while (!replay_.empty() && replay_.front().seq <= acked) {
      if (replay_.front().buf >= 0)
        free_.push_back(replay_.front().buf);
      else
        --inline_replays_;
      replay_.pop_front();
    }
  }

  // Claims chunks into free slots and starts reading them. Returns true if the window or the buffer pool
  // stopped us.
  bool start_reads() {
    // A chunk read on this thread is encoded before the next is read, while its bytes are still in this
    // core's cache (reading `depth` chunks ahead pushed the first out before the encoder came to it).
    const bool one_ahead = !reads_through_ring();
    for (Slot& slot : slots_) {
      if (exhausted_) return false;
      if (slot.state != State::free) continue;
      if (one_ahead && (has_state(State::read) || holding_reads() >= kHeldReadsAhead)) return false;
      if (pool_short()) return true;
      const SendSequencer::Claim claim = claim_into(slot);
      if (claim == SendSequencer::Claim::window_full) return true;
      if (claim == SendSequencer::Claim::exhausted) {
        exhausted_ = true;
        return false;
      }
    }
    return false;
  }

  SendSequencer::Claim claim_into(Slot& slot) {
    io::Source& src = sh_.source;
    const int in = free_.back();
    std::byte* data = chunk_data(in);
    if (!src.random_access()) {
      // Sequential claims happen only here, under the source lock: check for room, read, then claim.
      std::lock_guard lock(sh_.source_mu);
      const auto room = sh_.sequencer.peek();
      if (room != SendSequencer::Claim::ok) return room;
      io::ReadInfo info;
      const size_t n = src.read_next(*sync_ring_, std::span<std::byte>(data, sh_.chunk_bytes), &info);
      if (n == io::kReadAgain) return SendSequencer::Claim::window_full;
      uint64_t seq = 0;
      const auto claim = sh_.sequencer.try_claim(&seq);
      if (claim != SendSequencer::Claim::ok)
        throw std::logic_error("sequencer changed under the source lock");
      if (n == 0) {
        sh_.sequencer.set_total(seq - 1);
        return SendSequencer::Claim::exhausted;
      }
      if (n > sh_.chunk_bytes)
        throw std::logic_error(src.describe() + ": read_next returned more than asked");
      take_buffers(slot);
      slot.end_of_transaction = info.end_of_transaction;
      slot.view = info.view;
      slot.view_token = info.view_token;
      slot.seq = seq;
      slot.offset = sh_.next_offset;
      slot.len = uint32_t(n);
      sh_.next_offset += n;
      slot.state = State::read;
      fifo_.push_back(&slot);
      return claim;
    }
    uint64_t seq = 0;
    const auto claim = sh_.sequencer.try_claim(&seq);
    if (claim != SendSequencer::Claim::ok) return claim;
    take_buffers(slot);
    const uint64_t size = *src.size();
    slot.seq = seq;
    slot.end_of_transaction = false;
    slot.view = nullptr;
    slot.offset = (seq - 1) * sh_.chunk_bytes;
    slot.len = uint32_t(std::min<uint64_t>(sh_.chunk_bytes, size - slot.offset));
    fifo_.push_back(&slot);
    if (reads_through_ring()) {
      slot.io = io::Completion{.op = fixed_buffers_ ? io::Op::read_fixed : io::Op::read,
                               .fd = src.read_fd(),
                               .buf = data,
                               .len = slot.len,
                               .offset = int64_t(slot.offset),
                               .buf_index = fixed_buffers_ ? 0 : -1,
                               .file_index = source_file_};
      slot.state = State::reading;
      if (!ring_->queue(&slot.io)) {
        ring_->submit(0);
        if (!ring_->queue(&slot.io)) throw InternalError("io ring full");
      }
    } else {
      src.read_at(*sync_ring_, slot.offset, std::span<std::byte>(data, slot.len));
      slot.state = State::read;
    }
    return claim;
  }

  // Both buffers of a slot back to the pool, `hot` on top: the next chunk is read into it. A chunk is always
  // read into its input buffer but its output buffer is written only when it is compressed, so the input
  // goes on top: the worker keeps reusing memory it has touched (a first touch is a page fault, and in a VM
  // whose host takes freed memory back a costly one) and all-zero or raw state never touches the rest.
  void give_back(int cold, int hot) {
    for (const int b : {cold, hot}) {
      if (b >= 0) free_.push_back(b);  // not given back already at encoding
    }
  }

  void take_buffers(Slot& slot) {
    slot.in = free_.back();
    free_.pop_back();
    slot.out = free_.back();
    free_.pop_back();
  }

  void encode_ready() {
    for (Slot* slot : fifo_) {
      if (slot->state != State::read) continue;
      std::byte* in = chunk_data(slot->in);
      std::byte* out = buf(slot->out);
      const std::span<const std::byte> raw(slot->view ? slot->view : in, slot->len);
      compress::EncodeOptions how = choose_encoding();
      // A sparse chunk read into our buffer goes out in pieces from there: its pages are not copied.
      how.sparse_gather = !slot->view;
      // Made at the first chunk that may be paged: raw and all-zero state never touch it.
      if (how.paged && how.codec != compress::Codec::none && paged_memory_.size() == 0)
        paged_memory_ = io::IoMemory(compress::paged_scratch_bytes(sh_.chunk_bytes));
      const Clock::duration cpu_before = sh_.effort ? thread_cpu_time() : Clock::duration{};
      slot->enc = compress::encode_chunk(
          how, raw, std::span<std::byte>(out + wire::kHeaderBytes, buf_bytes_ - wire::kHeaderBytes),
          std::span<std::byte>(paged_memory_.data(), paged_memory_.size()));
      if (sh_.effort && !slot->enc.zero) {  // what each rung costs: the controller weighs it against spare CPU
        chosen(slot->enc);
        // What raw would have sent: the sparse form when the chunk has zero pages (a chunk compressed whole
        // for a receiver without kCapPaged counts whole).
        const compress::EncodeResult& e = slot->enc;
        const uint64_t plain = e.paged_len ? e.paged_len : e.codec == compress::Codec::sparse ? e.encoded_len
                                                                                               : slot->len;
        sh_.effort->add_encode_cost(rung_, slot->len, plain, e.encoded_len, thread_cpu_time() - cpu_before);
      }
      const uint16_t flags = uint16_t((slot->enc.zero ? wire::kFlagZero : 0) |
                                      (slot->end_of_transaction ? wire::kFlagEndOfTransaction : 0) |
                                      (slot->enc.paged_len ? wire::kFlagPaged : 0));
      wire::Header h{.type = wire::FrameType::data,
                     .codec = uint8_t(slot->enc.codec),
                     .flags = flags,
                     .seq = slot->seq,
                     .offset = slot->offset,
                     .raw_len = slot->len,
                     .payload_len = slot->enc.encoded_len,
                     .hash = slot->enc.hash,
                     .aux = slot->enc.paged_len};
      // Raw chunks go out from the input buffer (header in front of the chunk), compressed ones from the
      // output buffer, zero ones (the header alone) from the slot; raw bytes still in a source's mapping go
      // out from there, after a separate header; a gathered sparse chunk's header and bitmap go in front of
      // the chunk, its present pages from it.
      const bool raw_chunk = slot->enc.codec == compress::Codec::none;
      slot->gathered = slot->enc.codec == compress::Codec::sparse && how.sparse_gather;
      slot->frame_buf = raw_chunk || slot->gathered ? slot->in : slot->out;
      // The read buffer goes back now where the frame does not need it (a zero chunk's frame is the header
      // alone, held in the slot; a compressed one is in the output buffer): the next chunk is read into it
      // while it is still in the cache. Held until the frame was sent, a worker cycled through `depth` of
      // them (all-zero state, unlimited veth, 11 runs: 125.1 -> 113.1 ms; --depth 1 before: 114.9).
      if (slot->enc.zero) {
        slot->frame = slot->header.data();
        give_back(slot->out, slot->in);
        slot->in = slot->out = slot->frame_buf = -1;
      } else if (slot->gathered) {
        const size_t bitmap = compress::sparse_bitmap_bytes(slot->len);
        std::memcpy(in - bitmap, out + wire::kHeaderBytes, bitmap);
        slot->frame = in - bitmap - wire::kHeaderBytes;
      } else if (raw_chunk) {
        slot->frame = in - wire::kHeaderBytes;
      } else {
        slot->frame = out;
        give_back(-1, slot->in);
        slot->in = -1;
      }
      wire::encode_header(h, std::span<std::byte, wire::kHeaderBytes>(slot->frame, wire::kHeaderBytes));
      slot->frame_len = wire::kHeaderBytes + slot->enc.encoded_len;
      if (!(raw_chunk && slot->view && !slot->enc.zero))
        release_view(*slot);  // encoded (or zero): the mapping is no longer needed
      build_iov(*slot);
      slot->state = State::encoded;
      // Encoding is the CPU-heavy step: do one, then let the ring make progress.
      return;
    }
  }

  // The frame's pieces, from the start (again, after a reconnection).
  void build_iov(Slot& slot) {
    slot.iov.clear();
    slot.iov_at = 0;
    slot.sent = 0;
    if (slot.gathered) {
      gathered_pieces(slot.frame, slot.in, slot.len, &slot.iov);
    } else if (slot.view && slot.enc.codec == compress::Codec::none && !slot.enc.zero) {
      slot.iov.push_back({slot.frame, wire::kHeaderBytes});
      slot.iov.push_back({const_cast<std::byte*>(slot.view), slot.enc.encoded_len});
    } else {
      slot.iov.push_back({slot.frame, slot.frame_len});
    }
  }

  // A gathered sparse frame's pieces: its header and bitmap at `head`, then each run of present pages of the
  // chunk of raw_len bytes in buffer `in`.
  void gathered_pieces(std::byte* head, int in, size_t raw_len, std::vector<iovec>* out) const {
    const size_t bitmap = compress::sparse_bitmap_bytes(raw_len);
    out->push_back({head, wire::kHeaderBytes + bitmap});
    std::byte* data = chunk_data(in);
    compress::for_each_sparse_page_run(std::span<const std::byte>(head + wire::kHeaderBytes, bitmap), raw_len,
                                       [&](size_t off, size_t len, bool present) {
                                         if (present) out->push_back({data + off, len});
                                       });
  }

  // `n` more bytes of the slot's frame went out.
  static void consume(Slot& slot, size_t n) {
    slot.sent += n;
    io::consume_pieces(slot.iov, &slot.iov_at, n);
  }

  // --codec auto: this stream's share of chunks on each rung follows the controller's effort (the rungs: raw,
  // lz4, zstd at the configured level, one and two levels higher, for links slower than zstd); selector_
  // picks which chunks go up, between raw and lz4 by their estimated compressibility (encode_chunk makes the
  // estimate and sends a chunk above the limit raw).
  compress::EncodeOptions choose_encoding() {
    compress::EncodeOptions opts = sh_.encode;
    if (!sh_.effort) return opts;
    const double effort = sh_.effort->effort();
    const int rung = std::min(int(effort), int(sh_.effort->top()) - 1);
    base_rung_ = rung;
    share_ = effort - rung;
    // Between raw and lz4 every chunk is estimated (encode_chunk sends those above the limit raw), so the
    // selector knows the data; above, the share is spread evenly.
    const bool by_estimate = rung == 0 && share_ > 0 && share_ < 1;
    double limit = by_estimate ? selector_.limit(share_) : selector_.evenly(share_) ? 1e9 : -1;
    static constexpr compress::Codec kLadder[] = {compress::Codec::none, compress::Codec::lz4,
                                                  compress::Codec::zstd, compress::Codec::zstd,
                                                  compress::Codec::zstd};
    const int pick = by_estimate || limit >= 0 ? rung + 1 : rung;
    rung_ = std::clamp(pick, 0, int(std::size(kLadder)) - 1);
    opts.codec = kLadder[rung_];
    if (rung_ > 2) opts.level = std::min(opts.level + rung_ - 2, 19);
    if (by_estimate) opts.max_estimate = std::clamp(limit, 0.0, 1e9);
    return opts;
  }

  // After encoding a non-zero chunk picked by choose_encoding(): its estimate for selector_, and which rung
  // it took (a chunk rated above the limit went raw: its cost is raw's).
  void chosen(const compress::EncodeResult& enc) {
    if (!sh_.effort) return;
    if (enc.over_limit) rung_ = base_rung_;
    selector_.record(share_, enc.estimate, rung_ > base_rung_);
  }

  void start_send() {
    if (sending_ || fifo_.empty() || fifo_.front()->state != State::encoded) return;
    Slot& slot = *fifo_.front();
    if (sh_.pacer) {  // the cap is this transfer's link: time spent here is link wait
      const auto start = Clock::now();
      if (!sh_.pacer->wait(slot.frame_len, [this] { return stopping(); })) return;
      if (sh_.effort) sh_.effort->add_link_wait(Clock::now() - start);
    }
    queue_send(slot);
    slot.state = State::sending;
  }

  void release_view(Slot& slot) {
    if (!slot.view) return;
    sh_.source.release_view(slot.view_token);
    slot.view = nullptr;
  }

  // Zero-copy send above the break-even size (dstx tune measures it; off by default, since on loopback and
  // veth the kernel copies anyway). The ring hands the completion back only after the kernel's notification,
  // so the buffer is never reused early.
  bool zero_copy(const iovec& piece) const { return zero_copy_min_ > 0 && piece.iov_len >= zero_copy_min_; }

  // One send moves at most this much; the rest of the frame follows at once (MSG_MORE). Sent whole, a 1 MiB
  // frame holds the socket through the copy of all of it. One stream to a peer on the same host (veth) then
  // cost the sender 60 % more CPU per byte, most of it working off the ACKs held back meanwhile (perf:
  // __release_sock), and the peer saw packets out of order (ss: 398 retransmissions, against 45). 512 MiB over
  // veth, one stream of 1 MiB raw frames: 438 ms sent whole, 302 ms in sends of at most 768 KiB (the plain
  // loop: 353); two streams and compressed frames: no change (docs/performance.md, session 10). A smaller cap
  // (512 KiB) cost where the rest of a frame waited behind the next chunk's compression. Zero-copy sends copy
  // nothing and go whole.
  static constexpr size_t kMaxSendBytes = 768 * 1024;

  void queue_send(Slot& slot) {
    // The pieces up to kMaxSendBytes (the one that crosses it in part), the kernel's limit on pieces, or a
    // piece that goes zero-copy on its own; a zero-copy piece alone, and whole (nothing is copied under the
    // socket's lock). The rest follows at once (MSG_MORE).
    const bool zc = zero_copy(slot.iov[slot.iov_at]);
    const size_t cap = zc ? io::kMaxIoBytes : kMaxSendBytes;
    send_iov_.clear();
    size_t bytes = 0;
    bool more = false;
    for (size_t i = slot.iov_at; i < slot.iov.size(); ++i) {
      const iovec& piece = slot.iov[i];
      if (bytes == cap || send_iov_.size() == io::kMaxIov || (i > slot.iov_at && (zc || zero_copy(piece)))) {
        more = true;
        break;
      }
      const size_t take = std::min(piece.iov_len, cap - bytes);
      send_iov_.push_back({piece.iov_base, take});
      bytes += take;
      if (take < piece.iov_len) {
        more = true;
        break;
      }
    }
    if (send_iov_.size() > 1) {
      send_io_ = io::Completion{.op = io::Op::sendmsg,
                                .fd = fd(),
                                .more = more,
                                .wait_all = wait_all_,
                                .file_index = socket_file_,
                                .iov = send_iov_.data(),
                                .iov_count = unsigned(send_iov_.size())};
    } else {
      send_io_ = io::Completion{.op = zc ? io::Op::send_zc : io::Op::send,
                                .fd = fd(),
                                .buf = send_iov_[0].iov_base,
                                .len = uint32_t(send_iov_[0].iov_len),
                                .more = more,
                                .wait_all = wait_all_,
                                .file_index = socket_file_};
    }
    if (!ring_->queue(&send_io_)) {
      ring_->submit(0);
      if (!ring_->queue(&send_io_)) throw InternalError("io ring full");
    }
    sending_ = true;
  }

  void reap() {
    io::Completion* done[32];
    while (ring_->reap(done) > 0) {
    }
  }

  // Completion state is read from each Completion's `done` flag rather than from what reap() returned.
  void complete_ops() {
    for (Slot& slot : slots_) {
      if (slot.state != State::reading || !slot.io.done) continue;
      if (slot.io.result < 0) {
        throw std::runtime_error(sh_.source.describe() + ": read at offset " + std::to_string(slot.offset) +
                                 ": " + errno_text(slot.io.result));
      }
      if (uint32_t(slot.io.result) != slot.len) {
        // A short read of a regular file: finish it synchronously.
        const int64_t more =
            io::read_full(*sync_ring_, slot.io.fd, chunk_data(slot.in) + slot.io.result,
                          slot.len - slot.io.result, int64_t(slot.offset) + slot.io.result);
        if (more != int64_t(slot.len - slot.io.result)) {
          throw std::runtime_error(sh_.source.describe() + ": short read at offset " +
                                   std::to_string(slot.offset) + " (file changed during transfer?)");
        }
      }
      slot.state = State::read;
    }
    // A zero-copy send is finished only once the kernel says it let go of the buffer (notified).
    if (sending_ && send_io_.done && send_io_.notified) {
      sending_ = false;
      Slot& slot = *fifo_.front();
      if (send_io_.result <= 0) {
        const int err = send_io_.result == 0 ? EPIPE : -send_io_.result;
        reconnect("send: " + errno_text(err));
        return;
      }
      consume(slot, size_t(send_io_.result));
      if (slot.iov_at < slot.iov.size()) {
        queue_send(slot);
        return;
      }
      finish(slot);
    }
  }

  void finish(Slot& slot) {
    Stats& st = sh_.stats;
    st.bytes.fetch_add(slot.len, std::memory_order_relaxed);
    st.wire_bytes.fetch_add(slot.frame_len, std::memory_order_relaxed);
    st.chunks.fetch_add(1, std::memory_order_relaxed);
    if (slot.enc.zero)
      st.zero_chunks.fetch_add(1, std::memory_order_relaxed);
    else if (slot.enc.codec == compress::Codec::none)
      st.raw_chunks.fetch_add(1, std::memory_order_relaxed);
    else
      st.compressed_chunks.fetch_add(1, std::memory_order_relaxed);
    if (!slot.enc.zero) st.codec_chunks[unsigned(slot.enc.codec) & 3].fetch_add(1, std::memory_order_relaxed);
    if (slot.enc.paged_len) st.paged_chunks.fetch_add(1, std::memory_order_relaxed);
    if (sh_.resume && (slot.frame_len == wire::kHeaderBytes || rereads())) {
      Replay r{.seq = slot.seq, .buf = -1, .len = slot.frame_len};
      std::memcpy(r.header.data(), slot.frame, wire::kHeaderBytes);
      replay_.push_back(r);
      ++inline_replays_;
      give_back(slot.out, slot.in);
    } else if (sh_.resume) {
      // Keep the frame until the receiver acknowledges it: contiguous (bytes sent from a mapping are copied
      // behind their header: only a raw chunk still holds its view here), or a gathered sparse frame as it is.
      if (slot.view) {
        assert(!slot.gathered && slot.frame == chunk_data(slot.in) - wire::kHeaderBytes);
        std::memcpy(slot.frame + wire::kHeaderBytes, slot.view, slot.enc.encoded_len);
      }
      replay_.push_back(Replay{.seq = slot.seq,
                               .buf = slot.frame_buf,
                               .len = slot.frame_len,
                               .at = size_t(slot.frame - buf(slot.frame_buf)),
                               .gathered_raw = slot.gathered ? slot.len : 0});
      give_back(slot.frame_buf == slot.in ? slot.out : slot.in, -1);
    } else {
      give_back(slot.out, slot.in);
    }
    slot.in = slot.out = slot.frame_buf = -1;
    slot.frame = nullptr;
    release_view(slot);
    if (sh_.effort) {
      // The worker's CPU, after every chunk: a run of zero chunks keeps it busy too.
      const Clock::duration cpu = thread_cpu_time();
      const Clock::time_point now = Clock::now();
      sh_.effort->add_worker_cpu(cpu - cpu_reported_, now - wall_reported_);
      cpu_reported_ = cpu;
      wall_reported_ = now;
      // Zero chunks cost the same on every rung and next to nothing: the controller only sees the others,
      // whose share varies along the state and would otherwise swamp the difference between rungs.
      if (!slot.enc.zero) {
        sh_.coded_bytes.fetch_add(slot.len, std::memory_order_relaxed);
        sh_.effort->observe(now, sh_.coded_bytes.load(std::memory_order_relaxed),
                            [&] { return sh_.probe_sockets(); });
      }
    }
    sh_.sequencer.complete(slot.seq, slot.len, slot.enc.hash);
    slot.state = State::free;
    fifo_.pop_front();
  }

  // After the last chunk: END once every stream's chunks are out (the digest is then final), then wait for
  // the receiver's verdict, reconnecting if the stream breaks meanwhile.
  void finish_stream() {
    while (sh_.sequencer.completed() != sh_.sequencer.total()) {
      if (stopping()) return;
      // Our last frames may be lost with the connection: the receiver's reorder window can then hold up the
      // other streams, whose chunks would never complete while we wait for them.
      if (link_.broken.load()) {
        reconnect("the receiver's side of the connection closed");
        continue;
      }
      sh_.sequencer.wait_for_progress(std::chrono::milliseconds(20));
    }
    const uint64_t chunks = sh_.sequencer.completed();
    end_ = wire::make_end(chunks, sh_.stats.bytes.load(), sh_.sequencer.digest());
    end_pending_ = true;
    while (!sh_.finished()) {
      if (stopping()) return;
      if (end_pending_) {
        const int rc = send_frame(*sync_ring_, fd(), end_);
        if (rc < 0) {
          reconnect("send END: " + errno_text(rc));
          continue;
        }
        end_pending_ = false;
        sh_.stats.wire_bytes.fetch_add(wire::kHeaderBytes, std::memory_order_relaxed);
      }
      if (link_.broken.load()) {
        reconnect("the receiver's side of the connection closed");
        continue;
      }
      release_acked();
      std::unique_lock lock(sh_.control_mu);
      sh_.control_cv.wait_for(lock, std::chrono::milliseconds(20));
    }
  }

  // The stream broke. With resume: reconnect (bounded attempts with back-off), learn from the receiver the
  // last chunk it holds on this stream, send the rest of the replay list again, and carry on. Without it, or
  // when every attempt fails, the transfer fails.
  void reconnect(const std::string& why) {
    const std::string name = "stream " + std::to_string(index_);
    if (sh_.finished()) return;
    if (!sh_.resume) {
      sh_.failure.set(Reason::connection, name + ": " + why);
      return;
    }
    // No operation may use the old connection any more: let the kernel finish what is in flight.
    ::shutdown(fd(), SHUT_RDWR);
    while (ring_->in_flight() > 0) {
      const int rc = ring_->submit(1);
      reap();  // also what a failed submit handed back
      if (rc < 0) break;
    }
    sending_ = false;
    {
      std::lock_guard read_lock(link_.read_mu);  // the shutdown above ends a read in progress
      std::lock_guard swap_lock(link_.swap_mu);
      link_.fd.store(-1, std::memory_order_release);
      link_.owner.reset();
    }
    const int attempts = std::max(1, sh_.options.reconnect_attempts);
    sh_.events.add(LogLevel::warn, name + ": connection lost (" + why + "); reconnecting (at most " +
                                       std::to_string(attempts) + " attempts)");
    std::string last_error = why;
    bool refused = false;
    int backoff_ms = std::max(1, sh_.options.reconnect_backoff_ms);
    for (int attempt = 0; attempt < attempts; ++attempt) {
      if (attempt > 0) {
        const auto until = Clock::now() + std::chrono::milliseconds(backoff_ms);
        while (Clock::now() < until && !stopping())
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        backoff_ms = std::min(backoff_ms * 2, 5000);
      }
      if (stopping() || sh_.finished()) return;
      io::Fd c;
      try {
        c = sh_.options.reconnect();
      } catch (const std::exception& e) {
        last_error = e.what();
        continue;
      }
      if (sh_.options.tls.enabled()) {
        std::vector<io::Fd> one;
        one.push_back(std::move(c));
        const HandshakeError e =
            sh_.tls->secure_client(one, sh_.options.tls, sh_.options.handshake_timeout_ms, nullptr, index_,
                                   [this] { return stopping(); });
        c = std::move(one[0]);
        if (e) {
          last_error = e.text;
          refused = e.refused;
          if (refused) break;  // the receiver will not take us back
          continue;
        }
      }
      wire::Hello hello = sh_.hello;
      hello.stream_index = uint16_t(index_);
      hello.flags = wire::kHelloResume;
      HandshakeError err{Reason::connection, send_hello(*sync_ring_, c.get(), hello)};
      wire::Hello reply;
      if (!err) err = await_hello_ack(c.get(), hello, sh_.options.handshake_timeout_ms, &reply, sh_.cancel);
      if (err) {
        last_error = err.text;
        refused = err.refused;
        if (refused) break;  // the receiver will not take us back
        continue;
      }
      bool resent = false;
      try {
        resent = resend_from(c.get(), reply.resume_seq, &last_error);
      } catch (const std::runtime_error& e) {
        // The source failed while chunks were read again (one changed since it was sent, or a read failed).
        // What went before went out whole, so the new connection becomes the stream's and carries the ABORTED
        // that tells the receiver why (without it the receiver would wait out its resume time-out).
        sh_.failure.set(Reason::source, e.what());
        // The frame that was on its way when the old connection broke has no byte on the new one: it starts
        // again from its first byte, if anything ever sent it (finish_partial_frame sends nothing of it).
        if (!fifo_.empty() && fifo_.front()->state == State::sending) {
          build_iov(*fifo_.front());
          fifo_.front()->state = State::encoded;
        }
        resent = true;
      }
      if (!resent) continue;
      limit_unsent(c.get());
      wait_all_ = io::socket_sends_may_wait_all(c.get());
      // The ring's fixed file still holds the old socket: point it at the new one, or drop the table.
      if (socket_file_ >= 0 && ring_->update_file(unsigned(socket_file_), c.get()) != 0) {
        (void)ring_->register_files({});
        socket_file_ = source_file_ = -1;
        sh_.fixed_file_streams.fetch_sub(1, std::memory_order_relaxed);
      }
      link_.owner = std::move(c);
      link_.broken.store(false);
      link_.fd.store(link_.owner.get(), std::memory_order_release);
      sh_.stats.resumes.fetch_add(1, std::memory_order_relaxed);
      sh_.events.add(LogLevel::warn, name + ": resumed on attempt " + std::to_string(attempt + 1) +
                                         ", after chunk " + std::to_string(reply.resume_seq) +
                                         " (the receiver's last)");
      sh_.wake();
      return;
    }
    sh_.failure.set(Reason::connection,
                    name + ": connection lost (" + why + ") and " +
                        (refused ? std::string("not taken back: ")
                                 : "not resumed after " + std::to_string(attempts) + " attempts: ") +
                        last_error);
  }

  // Sends, on a fresh connection, every frame of this stream after `resume_seq`: the replay list, the frame
  // that was on its way, and END if it had been sent.
  bool resend_from(int new_fd, uint64_t resume_seq, std::string* error) {
    uint64_t acked = link_.acked_seq.load();
    while (acked < resume_seq && !link_.acked_seq.compare_exchange_weak(acked, resume_seq)) {
    }
    release_acked();
    for (const Replay& r : replay_) {
      if (r.seq <= resume_seq) continue;
      if (const int64_t n = resend(new_fd, r); n < 0) {
        *error = "resend: " + errno_text(int(-n));
        return false;
      }
    }
    if (!fifo_.empty() && fifo_.front()->state == State::sending) {
      Slot& slot = *fifo_.front();
      if (slot.seq <= resume_seq) {
        finish(slot);  // it arrived whole before the break
      } else {
        build_iov(slot);
        slot.state = State::encoded;  // goes out again, first, from start_send
      }
    }
    if (end_.type == wire::FrameType::end) end_pending_ = true;
    return true;
  }

  // One kept frame, on a fresh connection: contiguous, or a gathered sparse frame's header and bitmap and
  // then its present pages, in as few sendmsg calls as the pieces allow. Returns 0 or -errno.
  int64_t resend(int fd, const Replay& r) {
    if (r.len > wire::kHeaderBytes) sh_.stats.replayed_chunks.fetch_add(1, std::memory_order_relaxed);
    if (r.reread()) return resend_reread(fd, r);
    if (r.gathered_raw == 0) {
      const int64_t n = io::send_full(*sync_ring_, fd, r.data(*this), r.len);
      return n < 0 ? n : 0;
    }
    resend_iov_.clear();
    gathered_pieces(buf(r.buf) + r.at, r.buf, r.gathered_raw, &resend_iov_);
    const int64_t n = io::sendmsg_full(*sync_ring_, fd, resend_iov_);
    return n < 0 ? n : 0;
  }

  // A chunk whose frame was not kept: read from the source again into a buffer of its own (made at the first
  // resume: most transfers never need it) and sent raw under its original sequence number and hash. Bytes that
  // changed since they were first sent fail the transfer here, naming the chunk, rather than at the receiver.
  int64_t resend_reread(int fd, const Replay& r) {
    wire::Header h;
    const auto kept = std::span<const std::byte, wire::kHeaderBytes>(r.header);
    if (wire::decode_header(kept, sh_.chunk_bytes, &h) != wire::Error::ok)
      throw std::logic_error("a kept frame header does not decode");
    if (reread_memory_.size() < wire::kHeaderBytes + h.raw_len)
      reread_memory_ = io::IoMemory(wire::kHeaderBytes + sh_.chunk_bytes);
    std::byte* raw = reread_memory_.data() + wire::kHeaderBytes;
    sh_.source.read_at(*sync_ring_, h.offset, std::span<std::byte>(raw, h.raw_len));
    if (compress::chunk_hash(sh_.encode.hash, std::span<const std::byte>(raw, h.raw_len)) != h.hash) {
      throw std::runtime_error(sh_.source.describe() + ": chunk " + std::to_string(h.seq) + " at offset " +
                               std::to_string(h.offset) +
                               " changed since it was sent (read again to resume a broken stream)");
    }
    h.codec = uint8_t(compress::Codec::none);
    h.payload_len = h.raw_len;
    h.flags &= uint16_t(~wire::kFlagPaged);
    h.aux = 0;
    wire::encode_header(h, std::span<std::byte, wire::kHeaderBytes>(reread_memory_.data(), wire::kHeaderBytes));
    const int64_t n = io::send_full(*sync_ring_, fd, reread_memory_.data(), wire::kHeaderBytes + h.raw_len);
    if (n >= 0) sh_.stats.reread_chunks.fetch_add(1, std::memory_order_relaxed);
    return n < 0 ? n : 0;
  }

  // No buffer may be freed while the kernel still uses it.
  void drain() {
    if (!ring_) return;
    while (ring_->in_flight() > 0) {
      const int rc = ring_->submit(1);
      reap();  // also what a failed submit handed back
      if (rc < 0) break;
    }
  }

  // Stopped in the middle of a frame: send its rest, so the ABORTED that follows is read as a frame rather
  // than as payload. A dead connection fails at once; a stalled one is cut by the supervisor.
  void finish_partial_frame() {
    if (!ring_) return;
    if (!fifo_.empty() && fifo_.front()->state == State::sending) {
      Slot& slot = *fifo_.front();
      if (sending_ && send_io_.done && send_io_.result > 0) consume(slot, size_t(send_io_.result));
      if (slot.sent > 0 && slot.iov_at < slot.iov.size())
        (void)io::sendmsg_full(*sync_ring_, fd(), std::span(slot.iov).subspan(slot.iov_at));
    }
    for (Slot& slot : slots_) release_view(slot);
    ring_.reset();
    memory_ = io::IoMemory();
  }

  Shared& sh_;
  const unsigned index_;
  Link& link_;
  bool wait_all_;  // the socket takes MSG_WAITALL (plain TCP, not kTLS): see io::Completion::wait_all
  std::unique_ptr<io::Ring> ring_;
  int socket_file_ = -1;  // ring_'s fixed-file slots (register_files), -1 when not registered
  int source_file_ = -1;
  std::unique_ptr<io::Ring> sync_ring_;
  io::IoMemory memory_;
  size_t buf_bytes_ = 0;
  size_t front_ = 0;  // a buffer's room before its chunk: a header and a sparse bitmap
  bool fixed_buffers_ = false;
  size_t zero_copy_min_ = 0;  // 0: never SEND_ZC
  Clock::duration cpu_reported_{};    // this thread's CPU time last reported to the controller
  Clock::time_point wall_reported_{};  // and when
  std::vector<iovec> send_iov_;     // the pieces of the send in flight (queue_send), up to kMaxIov
  std::vector<int> free_;
  std::deque<Replay> replay_;
  std::vector<iovec> resend_iov_;  // a gathered frame's pieces while it is sent again
  io::IoMemory reread_memory_;     // a header and a chunk read again from the source for a resume
  io::IoMemory paged_memory_;      // a chunk's sparse form, gathered to be compressed (EncodeOptions::paged)
  size_t inline_replays_ = 0;  // entries of replay_ without a buffer
  uint64_t acked_seen_ = 0;    // link_.acked_seq when release_acked() last ran
  std::vector<Slot> slots_;
  std::deque<Slot*> fifo_;
  io::Completion send_io_;
  bool sending_ = false;
  bool exhausted_ = false;
  wire::Header end_{};  // type data until END is built
  bool end_pending_ = false;
  ShareSelector selector_;
  double share_ = 0;   // of the last choose_encoding(): the share of chunks to go above base_rung_,
  int base_rung_ = 0;  // the effort's lower rung,
  int rung_ = 0;       // and the rung the chunk took
};

// Reads the return path of every stream: STREAM_ACKs, ACKs, then COMMITTED or ABORTED. A stream whose
// connection fails is marked broken for its worker to reconnect (with resume) instead of failing the
// transfer.
void control_loop_on(Shared& sh, const std::atomic<bool>& stop, std::unique_ptr<io::Ring> ring);

void control_loop(Shared& sh, const std::atomic<bool>& stop) {
  // Nothing may escape a thread (std::terminate): a failure here fails the transfer.
  try {
    control_loop_on(sh, stop, io::make_ring(sh.backend, io::RingOptions{.entries = 4}));
  } catch (const std::exception& e) {
    sh.failure.set(Reason::internal, std::string("reading the receiver's frames: ") + e.what());
  }
  std::lock_guard lock(sh.control_mu);
  sh.control_done = true;
  sh.wake();
}

void control_loop_on(Shared& sh, const std::atomic<bool>& stop, std::unique_ptr<io::Ring> ring) {
  std::vector<pollfd> pfds;
  std::vector<unsigned> which;
  // Streams other than 0 that the receiver closed cleanly, and when. The receiver closes its streams right
  // after COMMITTED, which comes on stream 0; over separate connections (TLS relays above all) a close may
  // overtake it. So a clean close counts as a break only if no verdict follows within a grace period.
  struct Closed {
    int fd = -1;  // the connection that closed; a reconnection replaces it and clears this
    Clock::time_point at;
  };
  std::vector<Closed> closed(sh.links.size());
  constexpr auto kCloseGrace = std::chrono::milliseconds(500);
  while (!stop.load()) {
    for (unsigned i = 0; i < sh.links.size(); ++i) {
      if (closed[i].fd >= 0 && closed[i].fd != sh.links[i].fd.load()) closed[i].fd = -1;
      if (closed[i].fd < 0 || Clock::now() - closed[i].at < kCloseGrace || sh.finished()) continue;
      closed[i].fd = -1;
      if (sh.resume) {
        sh.links[i].broken.store(true);
        sh.links[i].shut();
      } else {
        sh.failure.set(Reason::connection,
                       "connection to receiver lost (stream " + std::to_string(i) + "): closed by peer");
      }
      sh.wake();
    }
    pfds.clear();
    which.clear();
    for (unsigned i = 0; i < sh.links.size(); ++i) {
      const int fd = sh.links[i].fd.load(std::memory_order_acquire);
      if (fd < 0 || sh.links[i].broken.load() || closed[i].fd == fd) continue;
      pfds.push_back(pollfd{.fd = fd, .events = POLLIN, .revents = 0});
      which.push_back(i);
    }
    if (pfds.empty()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    const int r = ::poll(pfds.data(), pfds.size(), 50);
    if (r <= 0) continue;
    for (size_t k = 0; k < pfds.size() && !stop.load(); ++k) {
      if (!pfds[k].revents) continue;
      const unsigned i = which[k];
      Link& link = sh.links[i];
      const int fd = pfds[k].fd;
      std::unique_lock read_lock(link.read_mu);
      if (link.fd.load() != fd) continue;  // replaced meanwhile (possibly by a connection with the same number)
      const std::string name = "stream " + std::to_string(i);
      const HeaderRead hr = recv_header(*ring, fd, sh.chunk_bytes);
      if (stop.load()) return;
      if (hr.kind == HeaderRead::eof || hr.kind == HeaderRead::io_error) {
        if (link.fd.load() != fd) continue;
        if (i != 0 && (hr.kind == HeaderRead::eof || sh.finished())) {
          // A worker still sending on this stream learns of a real break from its own send; after a failure
          // only stream 0 matters still (a COMMITTED on its way, see send()). Not read any more.
          closed[i] = Closed{fd, Clock::now()};
          continue;
        }
        if (sh.resume && !sh.finished()) {
          link.broken.store(true);
          ::shutdown(fd, SHUT_RDWR);  // wakes the worker's send, if one is waiting
          sh.wake();
          continue;
        }
        if (!sh.finished()) {
          sh.failure.set(
              Reason::connection,
              "connection to receiver lost (" + name +
                  "): " + (hr.kind == HeaderRead::eof ? std::string("closed by peer") : errno_text(hr.err)));
          sh.wake();
        }
        return;
      }
      if (hr.kind == HeaderRead::bad) {
        sh.failure.set(Reason::protocol,
                       "receiver sent a bad frame on " + name + ": " + wire::error_text(hr.wire_error));
        sh.wake();
        return;
      }
      const wire::Header& h = hr.header;
      switch (h.type) {
        case wire::FrameType::stream_ack: {
          uint64_t cur = link.acked_seq.load();
          while (cur < h.seq && !link.acked_seq.compare_exchange_weak(cur, h.seq, std::memory_order_seq_cst)) {
          }
          if (sh.ack_waiters.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard lock(sh.control_mu);  // see Worker::wait_for_ack
            sh.wake();
          }
          break;
        }
        case wire::FrameType::ack:
          sh.stats.acked_chunks.store(h.seq, std::memory_order_relaxed);
          break;
        case wire::FrameType::committed: {
          std::lock_guard lock(sh.control_mu);
          sh.committed = true;
          sh.committed_header = h;
          sh.committed_at = Clock::now();
          sh.control_cv.notify_all();
          return;
        }
        case wire::FrameType::aborted: {
          const std::string text = recv_abort_text(*ring, fd, h);
          const Reason reason = wire::reason_from_peer(h.aux);
          sh.failure.set(reason, std::string("receiver aborted (") + wire::reason_name(reason) + "): " + text,
                         true);
          sh.wake();
          return;
        }
        default:
          sh.failure.set(Reason::protocol,
                         "receiver sent an unexpected frame type " + std::to_string(int(h.type)));
          sh.wake();
          return;
      }
    }
  }
}

}  // namespace

const char* codec_mode_name(CodecMode mode) {
  switch (mode) {
    case CodecMode::auto_select:
      return "auto";
    case CodecMode::none:
      return "none";
    case CodecMode::lz4:
      return "lz4";
    case CodecMode::zstd:
      return "zstd";
    case CodecMode::sparse:
      return "sparse";
  }
  return "?";
}

bool codec_mode_from_name(std::string_view name, CodecMode* out) {
  for (CodecMode m :
       {CodecMode::auto_select, CodecMode::none, CodecMode::lz4, CodecMode::zstd, CodecMode::sparse}) {
    if (name == codec_mode_name(m)) {
      *out = m;
      return true;
    }
  }
  return false;
}

uint32_t fit_chunk_bytes(uint32_t chunk_bytes, uint64_t size) {
  const uint64_t share = std::min<uint64_t>(size / kFitChunks, chunk_bytes);
  return uint32_t(std::min<uint64_t>(std::bit_ceil(std::max<uint64_t>(share, kMinFitChunkBytes)), chunk_bytes));
}

unsigned default_streams() {
  return std::clamp(std::thread::hardware_concurrency(), 1u, unsigned(wire::kMaxStreams));
}

std::vector<io::Fd> connect_streams(const io::HostPort& to, unsigned count,
                                    const io::SocketOptions& options) {
  std::vector<io::Fd> conns;
  for (unsigned i = 0; i < count; ++i) conns.push_back(io::tcp_connect(to, options));
  return conns;
}

Result send_to(io::Source& source, const io::HostPort& to, const SendOptions& options, Stats* stats,
               const Cancel* cancel) {
  const unsigned streams = options.streams ? options.streams : default_streams();
  std::vector<io::Fd> conns;
  try {
    conns = connect_streams(to, streams, options.socket);
  } catch (const std::exception& e) {
    Result r;
    r.reason = Reason::connection;
    r.error = e.what();
    return r;
  }
  SendOptions with_reconnect = options;
  if (!with_reconnect.reconnect) {
    with_reconnect.reconnect = [to, socket = options.socket] { return io::tcp_connect(to, socket); };
  }
  return send(source, std::move(conns), with_reconnect, stats, cancel);
}

Result send(io::Source& source, std::vector<io::Fd> conns, const SendOptions& options, Stats* stats_in,
            const Cancel* cancel) {
  const auto started = Clock::now();
  Stats local_stats;
  Stats& stats = stats_in ? *stats_in : local_stats;
  Result result;
  result.streams = unsigned(conns.size());
  TlsSession tls;  // declared before `fail`, which appends what the TLS relays saw to the error
  auto fail = [&](Reason reason, std::string text) {
    result.reason = reason;
    result.error = tls.annotate(std::move(text));
    result.seconds = std::chrono::duration<double>(Clock::now() - started).count();
    return result;
  };
  if (conns.empty() || conns.size() > wire::kMaxStreams) {
    return fail(Reason::stream, "stream count must be 1.." + std::to_string(wire::kMaxStreams));
  }
  if (options.chunk_bytes < wire::kMinChunkBytes || options.chunk_bytes > wire::kMaxChunkBytes) {
    return fail(Reason::chunk_size, "chunk size must be between 4 KiB and 16 MiB");
  }
  io::Backend backend;
  std::string why;
  std::unique_ptr<io::Ring> ring;
  try {
    backend = io::choose_backend(&why);
    ring = io::make_ring(backend, io::RingOptions{.entries = 8});
  } catch (const std::exception& e) {
    return fail(Reason::internal, e.what());
  }
  result.io_backend = why;
  const std::optional<uint64_t> size = source.size();
  stats.total_bytes.store(size.value_or(0));
  const std::optional<uint64_t> estimate = options.fit_chunks ? source.size_estimate() : std::nullopt;
  const uint32_t chunk_bytes = estimate ? fit_chunk_bytes(options.chunk_bytes, *estimate) : options.chunk_bytes;
  result.chunk_bytes = chunk_bytes;
  const unsigned depth = std::max(1u, options.depth);
  const uint32_t window = options.window_chunks ? options.window_chunks : uint32_t(conns.size() * depth * 2);
  std::vector<Link> links(conns.size());
  for (size_t i = 0; i < conns.size(); ++i) {
    links[i].owner = std::move(conns[i]);
    links[i].fd.store(links[i].owner.get());
  }
  Shared sh(source, options, links, stats, cancel, backend, chunk_bytes, window);
  // The source gives up a wait on its other end (a stalled pipe, a device that says "try again") once the
  // transfer fails, instead of holding it.
  struct StopGuard {
    io::Stoppable& endpoint;
    ~StopGuard() { endpoint.set_stop(nullptr); }
  } stop_guard{source};
  source.set_stop(&sh.failure.failed_flag());
  if (size) sh.sequencer.set_total((*size + chunk_bytes - 1) / chunk_bytes);

  // Handshake on every stream, then agree on a codec and on resuming.
  sh.hello = wire::Hello{.stream_count = uint16_t(links.size()),
                         .max_chunk_bytes = chunk_bytes,
                         .session_id = random_session_id(),
                         .capabilities = our_capabilities(),
                         .total_bytes = size.value_or(wire::kUnknownSize)};
  wire::Hello hello = sh.hello;
  uint64_t caps = our_capabilities();
  // TLS (engine/tls.h) sends each stream's HELLO right after that stream's handshake: the receiver reads a
  // stream's HELLO before it accepts the next connection.
  if (options.tls.enabled()) {
    sh.tls = &tls;
    std::vector<io::Fd> fds;
    for (Link& l : links) fds.push_back(std::move(l.owner));
    const HandshakeError e = tls.secure_client(fds, options.tls, options.handshake_timeout_ms, &hello, 0,
                                               [cancel] { return cancel && cancel->requested(); });
    for (size_t i = 0; i < links.size(); ++i) {
      links[i].owner = std::move(fds[i]);
      links[i].fd.store(links[i].owner.get());
    }
    if (cancel && cancel->requested()) return fail(Reason::cancelled, "cancelled during the handshake");
    if (e) return fail(e.reason, e.text);
    result.tls = tls.describe();
  }
  for (size_t i = 0; i < links.size() && !options.tls.enabled(); ++i) {
    hello.stream_index = uint16_t(i);
    const std::string err = send_hello(*ring, links[i].fd, hello);
    if (err.empty()) continue;
    // The receiver may have refused an earlier stream's HELLO and gone, its listener with it (which resets
    // this connection): its reason, already on that stream, says more than the reset.
    const auto deadline = Clock::now() + kRefusalGrace;
    for (size_t k = 0; k < i; ++k) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      hello.stream_index = uint16_t(k);
      wire::Hello reply;
      const HandshakeError answer =
          await_hello_ack(links[k].fd, hello, int(std::max<int64_t>(0, left.count())), &reply);
      if (answer.refused) return fail(answer.reason, "stream " + std::to_string(k) + ": " + answer.text);
    }
    return fail(Reason::connection, "stream " + std::to_string(i) + ": " + err);
  }
  // The workers set up their rings during the HELLO round trip and start sending once it has succeeded
  // (crew.go); if it fails, crew's destructor sends them home as send() returns.
  struct Crew {
    std::vector<std::thread> threads;
    std::atomic<int> go{0};
    std::atomic<unsigned> running{0};
    void release(int verdict) {
      go.store(verdict);
      go.notify_all();
    }
    ~Crew() {
      if (go.load() == 0) release(-1);
      for (std::thread& t : threads) t.join();
    }
  } crew;
  crew.running = unsigned(links.size());
  for (unsigned i = 0; i < links.size(); ++i) {
    crew.threads.emplace_back([&sh, &crew, i] {
      Worker(sh, i).run(crew.go);
      --crew.running;
      sh.wake();
    });
  }
  for (size_t i = 0; i < links.size(); ++i) {
    hello.stream_index = uint16_t(i);
    wire::Hello reply;
    const HandshakeError err =
        await_hello_ack(links[i].fd, hello, options.handshake_timeout_ms, &reply, cancel);
    if (err.reason == Reason::cancelled) return fail(err.reason, err.text);
    if (err) return fail(err.reason, "stream " + std::to_string(i) + ": " + err.text);
    caps &= reply.capabilities;
  }
  std::string codec_err = pick_codec(options, caps, &sh.encode, &sh.zstd_in_auto);
  if (codec_err.empty() && options.codec == CodecMode::auto_select &&
      sh.encode.codec != compress::Codec::none) {
    const EffortPrior prior = EffortPrior{.raw_rate = double(options.tuned_raw_bytes_per_second),
                                          .lz4_rate = double(options.tuned_lz4_bytes_per_second)}
                                  .capped(double(options.bandwidth_bytes_per_second));
    sh.effort = std::make_unique<EffortController>(sh.zstd_in_auto ? 4.0 : 1.0, sh.links.size(),
                                                   EffortController::IdleSeconds{}, prior);
    if (prior.opens_raw(sh.links.size())) {
      sh.events.add(LogLevel::debug, "codec auto opens on raw: the tuned link rate, " +
                                         format_bytes(prior.raw_rate) + "/s, outruns lz4 at " +
                                         format_bytes(prior.lz4_rate) + "/s on each of " +
                                         std::to_string(sh.links.size()) + " streams");
    }
  }
  if (std::string err = codec_err; !err.empty()) {
    send_frame(*ring, links[0].fd, wire::make_aborted(Reason::capability, err.size()),
               std::as_bytes(std::span(err)));
    return fail(Reason::capability, err);
  }
  sh.resume = options.resume && options.reconnect && (caps & wire::kCapResume);

  for (Link& l : links) limit_unsent(l.fd);
  if (options.bandwidth_bytes_per_second > 0)
    sh.pacer = std::make_unique<Pacer>(options.bandwidth_bytes_per_second);

  std::atomic<bool> control_stop{false};
  std::thread control([&] { control_loop(sh, control_stop); });
  // Joined on every way out: a std::thread destroyed while joinable ends the process.
  struct JoinControl {
    std::atomic<bool>& stop;
    std::thread& thread;
    ~JoinControl() {
      if (!thread.joinable()) return;
      stop = true;
      thread.join();
    }
  } join_control{control_stop, control};
  crew.release(1);
  std::atomic<unsigned>& running = crew.running;

  // Supervise until the receiver commits or the transfer fails: cancel, idle time-out, commit time-out.
  {
    IdleWatch idle(options.idle_timeout_ms);
    std::optional<Clock::time_point> commit_deadline;
    std::unique_lock lock(sh.control_mu);
    while (!sh.committed && !sh.failure.failed()) {
      if (cancel && cancel->requested()) sh.failure.set(Reason::cancelled, "cancelled");
      if (!commit_deadline && sh.sequencer.completed() == sh.sequencer.total()) {
        commit_deadline = Clock::now() + std::chrono::milliseconds(options.commit_timeout_ms);
      }
      // Once the receiver acknowledged every chunk (it does so as its sink starts to commit), nothing moves
      // while the sink commits: the commit time-out rules.
      const bool receiver_commits = commit_deadline && stats.acked_chunks.load() == sh.sequencer.total();
      if (!receiver_commits &&
          idle.expired(stats.bytes.load() + stats.acked_chunks.load() + stats.resumes.load() +
                       (sh.pacer ? sh.pacer->slices() : 0))) {
        sh.failure.set(Reason::timeout, "nothing moved for " + std::to_string(options.idle_timeout_ms) +
                                            " ms (stalled receiver or link?)");
      }
      if (commit_deadline && Clock::now() > *commit_deadline) {
        sh.failure.set(Reason::timeout, "no COMMITTED from the receiver within " +
                                            std::to_string(options.commit_timeout_ms) + " ms");
      }
      if (running == 0 && !sh.committed && !sh.failure.failed()) {
        sh.failure.set(Reason::internal, "every stream ended without a verdict from the receiver");
      }
      lock.unlock();  // the caller's log function may take its time
      sh.events.flush();
      lock.lock();
      if (sh.committed || sh.failure.failed()) break;
      sh.control_cv.wait_for(lock, std::chrono::milliseconds(20));
    }
  }
  sh.wake();
  sh.sequencer.wake_all();
  if (sh.failure.failed()) {
    // Give workers a moment to stop on their own; a send blocked on a stalled peer needs the socket shut.
    const auto until = Clock::now() + std::chrono::seconds(2);
    while (running > 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (running > 0) {
      for (Link& l : links) l.shut();
    }
  }
  for (std::thread& w : crew.threads) w.join();
  crew.threads.clear();
  sh.events.flush();

  result.fixed_file_streams = sh.fixed_file_streams.load();
  result.chunks = sh.sequencer.completed();
  result.bytes = stats.bytes.load();
  result.digest = sh.sequencer.digest();
  // A COMMITTED that matches what was sent decides the outcome, whatever failed here meanwhile (a stream that
  // broke during the receiver's commit and was not taken back, a cancel that came too late): the receiver
  // sealed its success as it sent it, so reporting failure would have the caller roll the source back while
  // the destination runs the state.
  auto committed_here = [&] {
    std::lock_guard lock(sh.control_mu);
    if (!sh.committed) return false;
    const wire::Header& c = sh.committed_header;
    if (c.seq == result.chunks && c.offset == result.bytes && c.hash == result.digest) return true;
    sh.failure.set(Reason::digest, "receiver committed a different stream (digest or counts differ)");
    return false;
  };
  if (!committed_here() && sh.failure.failed()) {
    if (!sh.failure.from_peer()) {
      // Tell the receiver why, on every stream, so whichever it reads first carries our reason rather than a
      // broken connection. Best effort: the workers are gone, so no frame is interleaved.
      const std::string text = sh.failure.text();
      for (Link& l : links) {
        send_frame(*ring, l.fd.load(), wire::make_aborted(sh.failure.reason(), text.size()),
                   std::as_bytes(std::span(text.data(), std::min<size_t>(text.size(), wire::kMaxTextBytes))));
      }
    }
    // The receiver may have sealed its commit just before our failure (its COMMITTED on the way, our ABORTED
    // then ignored): stream 0 is read on for a moment, until its verdict, its close, or the bound. Reporting
    // failure then would have the caller roll the source back while the destination runs the state.
    for (Link& l : links) l.shut(SHUT_WR);
    std::unique_lock lock(sh.control_mu);
    sh.control_cv.wait_for(lock, kVerdictLinger, [&] { return sh.committed || sh.control_done; });
  }
  control_stop = true;
  for (Link& l : links) l.shut();
  control.join();

  result.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  result.wire_bytes = stats.wire_bytes.load();
  // Checked again: COMMITTED may have come while stream 0 was read on. One later than the bound is not seen
  // (the two generals).
  if (!committed_here()) {
    result.reason = sh.failure.reason();
    result.error = tls.annotate(sh.failure.text());
    return result;
  }
  result.committed = true;
  result.committed_at = sh.committed_at;
  return result;
}

}  // namespace dstx::engine
