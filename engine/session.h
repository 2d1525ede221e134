// Pieces both ends of a transfer share: the first-failure record, frame I/O on a ring, and waiting with a
// time-out. Internal to engine/.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "engine/transfer.h"
#include "engine/wire.h"
#include "io/ring.h"

namespace dstx::engine {

// The first failure of a transfer wins; later ones are consequences and are dropped.
class Failure {
 public:
  // Returns true when this call recorded the failure. A reason from the peer replaces a connection failure
  // recorded before it (the connection broke because the peer aborted).
  bool set(wire::Reason reason, std::string text, bool from_peer = false);
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  // True once failed(): for endpoints, which must not know the engine (io::Stoppable).
  const std::atomic<bool>& failed_flag() const { return failed_; }
  // Runs `deliver` (true when it succeeded) unless a failure is recorded. A failure set while it runs is
  // held back: dropped if `deliver` succeeded, after which no failure is recorded any more (the outcome went
  // to the peer, which may already have acted on it); recorded once it returns otherwise. `deliver` runs
  // without the lock, so that it may block (a send) while other threads report failures. Returns whether
  // `deliver` ran and succeeded. One caller at a time.
  template <typename Deliver>
  bool seal_unless_failed(Deliver&& deliver) {
    if (!begin_delivery()) return false;
    return end_delivery(deliver());
  }
  wire::Reason reason() const;
  std::string text() const;
  bool from_peer() const;

 private:
  struct Held {
    wire::Reason reason;
    std::string text;
    bool from_peer;
  };
  bool begin_delivery();
  bool end_delivery(bool delivered);
  void record(wire::Reason reason, std::string text, bool from_peer);  // under mu_

  std::atomic<bool> failed_{false};
  mutable std::mutex mu_;
  wire::Reason reason_ = wire::Reason::unspecified;
  std::string text_;
  bool from_peer_ = false;
  bool delivering_ = false;
  std::optional<Held> held_;  // set while delivering
  bool sealed_ = false;
};

// Notices a transfer that stopped moving: the supervisor feeds it a progress counter; it expires once the
// counter has not changed for the idle time-out (a stalled peer whose kernel still acknowledges, which TCP
// keepalive cannot see).
class IdleWatch {
 public:
  explicit IdleWatch(int timeout_ms) : timeout_(timeout_ms) {}
  bool expired(uint64_t progress) {
    const auto now = std::chrono::steady_clock::now();
    if (progress != last_ || last_change_ == std::chrono::steady_clock::time_point{}) {
      last_ = progress;
      last_change_ = now;
      return false;
    }
    return timeout_.count() > 0 && now - last_change_ > timeout_;
  }

 private:
  std::chrono::milliseconds timeout_;
  uint64_t last_ = 0;
  std::chrono::steady_clock::time_point last_change_{};
};

// SendOptions::log / RecvOptions::log lines from any thread, passed on by the transfer's supervisor (flush),
// so that the caller's function runs on the caller's thread. At most kMaxLines wait between two flushes; more
// are counted and reported by the next one.
class EventLog {
 public:
  static constexpr size_t kMaxLines = 64;
  explicit EventLog(const LogFn& fn) : fn_(fn) {}
  void add(LogLevel level, std::string text);  // any thread; nothing without a function
  void flush();                                // the supervisor only

 private:
  const LogFn& fn_;
  std::mutex mu_;
  std::vector<std::pair<LogLevel, std::string>> lines_;
  uint64_t dropped_ = 0;
};

// Sends a header (and payload) with send_full. Returns 0 or -errno.
int send_frame(io::Ring& ring, int fd, const wire::Header& header, std::span<const std::byte> payload = {});

// Waits until fd is readable. Returns 1 readable (or hung up), 0 on time-out, -errno on error; -ECANCELED
// once *cancel is requested (checked every 100 ms).
int wait_readable(int fd, int timeout_ms, const Cancel* cancel = nullptr);

// Outcome of reading one frame header.
struct HeaderRead {
  enum Kind { ok, eof, io_error, bad } kind = ok;
  int err = 0;               // -errno for io_error
  wire::Error wire_error{};  // for bad
  wire::Header header;
};
HeaderRead recv_header(io::Ring& ring, int fd, uint32_t max_chunk_bytes, int file_index = -1);
// Handshake frames, read before a deadline (io::recv_exact): a peer that falls silent mid-frame is an
// io_error of -ETIMEDOUT rather than a wait for ever.
HeaderRead recv_header_by(int fd, uint32_t max_chunk_bytes, std::chrono::steady_clock::time_point deadline);

// Reads an ABORTED frame's text (payload_len is already bounded by decode_header).
std::string recv_abort_text(io::Ring& ring, int fd, const wire::Header& header);
std::string recv_abort_text_by(int fd, const wire::Header& header,
                               std::chrono::steady_clock::time_point deadline);
// How long a sender whose stream failed in the handshake looks for the receiver's refusal on its other
// streams: the refusal names the cause, the failure is often only its consequence (a reset, a close).
inline constexpr std::chrono::milliseconds kRefusalGrace{250};
// A receiver's refusal (an ABORTED frame's reason and text) as the sender reports it.
std::string refusal_text(wire::Reason reason, const std::string& text);

std::string errno_text(int err);  // "Connection reset by peer" for ECONNRESET, etc.
uint64_t random_session_id();

}  // namespace dstx::engine
