// Sending and receiving one device-state transfer over N connected streams.
// The sender reports success only after the receiver said COMMITTED with the same digest.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/tls.h"
#include "engine/wire.h"
#include "io/endpoints.h"
#include "io/socket.h"

namespace dstx::engine {

// sparse: no compression, but a chunk's zero pages are left out (the least CPU that still skips zeros: what
// auto does on links faster than its compressors).
enum class CodecMode : uint8_t { auto_select, none, lz4, zstd, sparse };
const char* codec_mode_name(CodecMode mode);
bool codec_mode_from_name(std::string_view name, CodecMode* out);  // "auto", "none", "lz4", "zstd", "sparse"

// A running transfer's log lines: what happens to its streams (one lost, one resumed). Levels are the C ABI's
// dstx_log_level values. The function runs on the thread that called send or receive (their supervisor), never
// concurrently with itself, and only while that call runs.
enum class LogLevel : int { error = 1, warn = 2, info = 3, debug = 4 };
using LogFn = std::function<void(LogLevel level, const std::string& text)>;

inline constexpr uint32_t kDefaultChunkBytes = 1u << 20;
// The replay buffer (SendOptions::replay_bytes) is memory held on the sender: at most this much.
inline constexpr uint64_t kMaxReplayBytes = 1ull << 30;
// The largest tuned rate (SendOptions::tuned_*_bytes_per_second) taken: 1 TB/s; more is no measurement.
inline constexpr uint64_t kMaxTunedBytesPerSecond = 1'000'000'000'000;

// The chunk size for a state of known (or estimated: io::Source::size_estimate) size: chunk_bytes, or when
// the state holds fewer than kFitChunks of them, size / kFitChunks rounded up to a power of two and at least
// kMinFitChunkBytes. A small state cut into large chunks keeps one thread at a time busy (one 1 MiB chunk is
// read, encoded and sent by one worker, step after step) and faults in buffers it never fills: on this
// project's machine states of 1-128 MiB took 4-17 % less time in chunks of 64-256 KiB than of 1 MiB, while
// at 512 MiB 1 MiB was faster (docs/performance.md, session 8).
inline constexpr uint64_t kFitChunks = 512;
inline constexpr uint32_t kMinFitChunkBytes = 64u << 10;
uint32_t fit_chunk_bytes(uint32_t chunk_bytes, uint64_t size);

struct SendOptions {
  unsigned streams = 0;  // 0: one per core
  uint32_t chunk_bytes = kDefaultChunkBytes;  // the largest chunk; see fit_chunks
  // A state of known size gets fit_chunk_bytes(chunk_bytes, size); off: chunk_bytes exactly. The CLI turns it
  // on unless --chunk-size is given, the C ABI unless chunk_bytes is.
  bool fit_chunks = false;
  CodecMode codec = CodecMode::auto_select;
  int zstd_level = 1;
  unsigned depth = 4;          // chunks in flight per stream (reads, encodes, sends)
  uint32_t window_chunks = 0;  // 0: streams * depth * 2; bounds how far streams may run ahead
  io::SocketOptions socket;
  TlsOptions tls;  // enabled(): TLS 1.3 on every stream (engine/tls.h); a receiver without TLS is refused
  int handshake_timeout_ms = 10000;
  int commit_timeout_ms = 120000;  // after END, how long to wait for COMMITTED
  int idle_timeout_ms = 30000;     // fail when nothing moves (no byte sent, no ACK) for this long; 0: never
  uint64_t bandwidth_bytes_per_second = 0;  // cap on wire bytes per second, all streams together; 0: none
  // Resume: a broken stream is reconnected and carries on from the receiver's last chunk on it. Frames of a
  // sequential source stay in a replay buffer until the receiver acknowledges them (a VFIO data_fd cannot be
  // read twice); chunks of a random-access one (a file, a buffer) are read from it again.
  bool resume = true;
  int reconnect_attempts = 5;           // per break; past them the transfer fails
  int reconnect_backoff_ms = 200;       // before the 2nd attempt; doubles, at most 5 s
  uint64_t replay_bytes = 32ull << 20;  // all streams together (at least a STREAM_ACK's worth per stream);
                                        // a full buffer makes the sender wait
  std::function<io::Fd()> reconnect;    // opens a new connection; send_to sets it, empty: no resume
  // Register the frame buffers with io_uring (READ_FIXED). Off by default: pinning them costs ~10 ms of
  // set-up (24 MiB per stream faulted in before the first byte) and gained nothing measurable on tmpfs
  // sources here.
  bool register_buffers = false;
  size_t zero_copy_min_bytes = 0;  // SEND_ZC for sends at least this large (io_uring, when probed); 0: never
  // What dstx tune measured (bytes/s, 0: unknown): the rate --codec none reached on this link, and lz4's
  // fastest single-core encode speed. --codec auto opens on raw where the link outruns lz4 on every stream
  // (EffortPrior; --bandwidth caps the link's rate).
  uint64_t tuned_raw_bytes_per_second = 0;
  uint64_t tuned_lz4_bytes_per_second = 0;
  LogFn log;                       // optional: a stream lost, reconnected, resumed
};

struct RecvOptions {
  unsigned max_streams = wire::kMaxStreams;
  uint32_t max_chunk_bytes = wire::kMaxChunkBytes;
  uint64_t memory_budget_bytes = 64ull << 20;  // reorder window + per-stream decode buffers
  int accept_timeout_ms = 60000;  // for the first connection; later ones get handshake_timeout_ms
  int handshake_timeout_ms = 10000;
  int idle_timeout_ms = 30000;    // fail when nothing arrives and nothing is written for this long; 0: never
  int resume_timeout_ms = 30000;  // how long a broken stream may take to come back (listening receive only)
  io::SocketOptions socket;
  TlsOptions tls;  // enabled(): every stream must be TLS 1.3; otherwise a TLS sender is refused
  LogFn log;       // optional: a stream lost, resumed by the sender
};

// Live counters, readable from any thread while a transfer runs.
struct Stats {
  std::atomic<uint64_t> total_bytes{0};  // 0 when the source size is unknown
  std::atomic<uint64_t> bytes{0};        // sender: bytes handed to the network; receiver: bytes written
  std::atomic<uint64_t> wire_bytes{0};   // frame bytes including headers
  std::atomic<uint64_t> chunks{0};
  std::atomic<uint64_t> zero_chunks{0};
  std::atomic<uint64_t> raw_chunks{0};
  std::atomic<uint64_t> compressed_chunks{0};
  std::atomic<uint64_t> acked_chunks{0};    // sender: receiver's watermark
  std::atomic<uint64_t> resumes{0};         // broken streams reconnected and resumed
  std::atomic<uint64_t> replayed_chunks{0}; // sender: data frames sent again after a resume
  std::atomic<uint64_t> reread_chunks{0};   // sender: of those, read from the source again (not kept)
  std::atomic<uint64_t> codec_chunks[4]{};  // non-zero chunks per wire codec: none, lz4, zstd, sparse
  std::atomic<uint64_t> paged_chunks{0};    // of the lz4 and zstd ones, those whose zero pages were left out
                                            // (EncodeOptions::paged; wire flag PAGED)
};

struct Result {
  bool committed = false;
  wire::Reason reason = wire::Reason::unspecified;
  std::string error;  // empty when committed
  uint64_t bytes = 0;
  uint64_t wire_bytes = 0;
  uint64_t chunks = 0;
  uint32_t chunk_bytes = 0;  // the chunk size the sender used (SendOptions::fit_chunks) and announced
  uint64_t digest = 0;
  double seconds = 0;
  unsigned streams = 0;
  std::string io_backend;    // "io_uring" or "syscall", with the reason
  unsigned fixed_file_streams = 0;  // streams whose ring uses fixed files (registered fds)
  std::string tls = "none";  // "none", "kTLS (…)" or "user-space TLS (…)": TlsSession::describe()
  // Sending: when COMMITTED was read, before the threads and rings were torn down (a downtime ends there,
  // not when send() returns). Unset unless committed.
  std::optional<std::chrono::steady_clock::time_point> committed_at;
};

// Set from any thread (a signal handler may call request()): the transfer stops and fails with reason
// cancelled, both sides cleanly.
class Cancel {
 public:
  void request() { flag_.store(true, std::memory_order_relaxed); }
  bool requested() const { return flag_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> flag_{false};
};

// Connects `count` streams to `to`. Throws std::system_error naming the address.
std::vector<io::Fd> connect_streams(const io::HostPort& to, unsigned count, const io::SocketOptions& options);

// Sends `source` over already-connected sockets (one stream each). Never throws.
Result send(io::Source& source, std::vector<io::Fd> connections, const SendOptions& options, Stats* stats,
            const Cancel* cancel);
// Connects options.streams streams and sends. Never throws.
Result send_to(io::Source& source, const io::HostPort& to, const SendOptions& options, Stats* stats,
               const Cancel* cancel);

// Accepts the streams of one transfer on `listen_fd` and receives it into `sink`. Never throws.
Result receive(io::Sink& sink, int listen_fd, const RecvOptions& options, Stats* stats, const Cancel* cancel);

// Receives over connections the caller already accepted (a VMM that owns its sockets): one per stream, in any
// order; they are handshaken like accepted ones. Never throws.
Result receive_accepted(io::Sink& sink, std::vector<io::Fd> connections, const RecvOptions& options,
                        Stats* stats, const Cancel* cancel);

unsigned default_streams();  // one per core, at least 1, at most wire::kMaxStreams

}  // namespace dstx::engine
