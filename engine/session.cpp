#include "engine/session.h"

#include <poll.h>
#include <sys/random.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "io/socket.h"

namespace dstx::engine {

bool Failure::set(wire::Reason reason, std::string text, bool from_peer) {
  std::lock_guard lock(mu_);
  if (sealed_) return false;
  if (delivering_) {
    const bool peer_explains =
        held_ && from_peer && !held_->from_peer && held_->reason == wire::Reason::connection;
    if (!held_ || peer_explains) held_ = Held{reason, std::move(text), from_peer};
    return false;
  }
  // The peer's own reason beats a broken connection seen here first: that break was its abort closing up.
  const bool peer_explains = from_peer && !from_peer_ && reason_ == wire::Reason::connection;
  if (failed_.load(std::memory_order_relaxed) && !peer_explains) return false;
  record(reason, std::move(text), from_peer);
  return true;
}

void Failure::record(wire::Reason reason, std::string text, bool from_peer) {
  reason_ = reason;
  text_ = std::move(text);
  from_peer_ = from_peer;
  failed_.store(true, std::memory_order_release);
}

bool Failure::begin_delivery() {
  std::lock_guard lock(mu_);
  if (failed_.load(std::memory_order_relaxed) || sealed_) return false;
  delivering_ = true;
  return true;
}

bool Failure::end_delivery(bool delivered) {
  std::lock_guard lock(mu_);
  delivering_ = false;
  if (delivered) {
    sealed_ = true;
  } else if (held_) {
    record(held_->reason, std::move(held_->text), held_->from_peer);
  }
  held_.reset();
  return delivered;
}

wire::Reason Failure::reason() const {
  std::lock_guard lock(mu_);
  return reason_;
}

std::string Failure::text() const {
  std::lock_guard lock(mu_);
  return text_;
}

bool Failure::from_peer() const {
  std::lock_guard lock(mu_);
  return from_peer_;
}

int send_frame(io::Ring& ring, int fd, const wire::Header& header, std::span<const std::byte> payload) {
  std::vector<std::byte> frame(wire::kHeaderBytes + payload.size());
  wire::encode_header(header, std::span<std::byte, wire::kHeaderBytes>(frame.data(), wire::kHeaderBytes));
  if (!payload.empty()) std::memcpy(frame.data() + wire::kHeaderBytes, payload.data(), payload.size());
  const int64_t n = io::send_full(ring, fd, frame.data(), frame.size());
  return n < 0 ? int(n) : 0;
}

int wait_readable(int fd, int timeout_ms, const Cancel* cancel) {
  constexpr int64_t kSliceMs = 100;  // how soon a cancel is noticed
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (cancel && cancel->requested()) return -ECANCELED;
    pollfd p{.fd = fd, .events = POLLIN, .revents = 0};
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    const int64_t wait = timeout_ms < 0 ? -1 : std::max<int64_t>(0, left.count());
    const int slice = int(cancel ? (wait < 0 ? kSliceMs : std::min(wait, kSliceMs)) : wait);
    const int r = ::poll(&p, 1, slice);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -errno;
    if (r > 0) return 1;
    if (slice == wait) return 0;  // the whole time-out passed
  }
}

namespace {

HeaderRead header_read(int64_t n, const std::byte (&buf)[wire::kHeaderBytes], uint32_t max_chunk_bytes) {
  HeaderRead out;
  if (n == 0) {
    out.kind = HeaderRead::eof;
  } else if (n < 0) {
    out.kind = HeaderRead::io_error;
    out.err = int(n);
  } else {
    out.wire_error = wire::decode_header(std::span<const std::byte, wire::kHeaderBytes>(buf), max_chunk_bytes,
                                         &out.header);
    if (out.wire_error != wire::Error::ok) out.kind = HeaderRead::bad;
  }
  return out;
}

// An ABORTED frame's text as received (n bytes or -errno), made safe to print.
std::string abort_text(std::string text, int64_t n) {
  if (n != int64_t(text.size())) return "(reason text lost: connection closed)";
  for (char& c : text) {
    if (static_cast<unsigned char>(c) < 0x20 && c != '\n') c = '?';  // never print a peer's control bytes
  }
  return text;
}

}  // namespace

HeaderRead recv_header(io::Ring& ring, int fd, uint32_t max_chunk_bytes, int file_index) {
  std::byte buf[wire::kHeaderBytes];
  return header_read(io::recv_full(ring, fd, buf, sizeof buf, file_index), buf, max_chunk_bytes);
}

HeaderRead recv_header_by(int fd, uint32_t max_chunk_bytes, std::chrono::steady_clock::time_point deadline) {
  std::byte buf[wire::kHeaderBytes];
  return header_read(io::recv_exact(fd, buf, sizeof buf, deadline), buf, max_chunk_bytes);
}

std::string recv_abort_text(io::Ring& ring, int fd, const wire::Header& header) {
  std::string text(header.payload_len, '\0');
  if (text.empty()) return text;
  const int64_t n = io::recv_full(ring, fd, text.data(), text.size());
  return abort_text(std::move(text), n);
}

std::string recv_abort_text_by(int fd, const wire::Header& header,
                               std::chrono::steady_clock::time_point deadline) {
  std::string text(header.payload_len, '\0');
  if (text.empty()) return text;
  const int64_t n = io::recv_exact(fd, text.data(), text.size(), deadline);
  return abort_text(std::move(text), n);
}

void EventLog::add(LogLevel level, std::string text) {
  if (!fn_) return;
  std::lock_guard lock(mu_);
  if (lines_.size() < kMaxLines)
    lines_.emplace_back(level, std::move(text));
  else
    ++dropped_;
}

void EventLog::flush() {
  if (!fn_) return;
  std::vector<std::pair<LogLevel, std::string>> lines;
  uint64_t dropped = 0;
  {
    std::lock_guard lock(mu_);
    lines.swap(lines_);
    dropped = std::exchange(dropped_, 0);
  }
  // The transfer never throws: a function that does loses that line.
  auto pass = [this](LogLevel level, const std::string& text) {
    try {
      fn_(level, text);
    } catch (...) {
    }
  };
  for (const auto& [level, text] : lines) pass(level, text);
  if (dropped) pass(LogLevel::warn, std::to_string(dropped) + " more lines like these left out");
}

std::string refusal_text(wire::Reason reason, const std::string& text) {
  return std::string("receiver refused (") + wire::reason_name(reason) + "): " + text;
}

std::string errno_text(int err) {
  if (err < 0) err = -err;
  if (err == EPIPE) return "connection closed by peer";
  return std::strerror(err);
}

uint64_t random_session_id() {
  uint64_t id = 0;
  while (id == 0) {
    if (::getrandom(&id, sizeof id, 0) != sizeof id) {
      id = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()) * 0x9e3779b97f4a7c15ull;
    }
  }
  return id;
}

}  // namespace dstx::engine
