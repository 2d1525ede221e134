// TCP (and loopback) sockets: listen, accept with a time-out, connect with a time-out, liveness options.
// Errors throw std::system_error whose text names the call and the address.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dstx::io {

struct HostPort {
  std::string host;  // name, IPv4, or IPv6 in brackets on input ("[::1]:7000")
  uint16_t port = 0;
};
// Parses "HOST:PORT" / "[V6]:PORT". Throws std::invalid_argument naming the bad part.
HostPort parse_host_port(std::string_view text);
std::string to_string(const HostPort& hp);

// Owns a file descriptor; closes it on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd();
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release();
  void reset(int fd = -1);
  explicit operator bool() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

struct SocketOptions {
  int connect_timeout_ms = 10000;
  int user_timeout_ms = 30000;  // TCP_USER_TIMEOUT: unacknowledged data older than this kills the connection
  int keepalive_idle_s = 10;    // TCP keepalive: idle before probes, then 3 probes 5 s apart
  int buffer_bytes = 0;         // SO_SNDBUF/SO_RCVBUF when > 0
};

// Binds and listens (SO_REUSEADDR). Port 0 picks a free port; bound_port() tells which.
Fd tcp_listen(const HostPort& where, int backlog = 64);
uint16_t bound_port(int listen_fd);
// Accepts one connection; returns an invalid Fd after timeout_ms (-1 = wait forever). Applies options.
Fd tcp_accept(int listen_fd, int timeout_ms, const SocketOptions& options);
// Connects (tries each resolved address); applies TCP_NODELAY, keepalive, user timeout, buffers.
Fd tcp_connect(const HostPort& where, const SocketOptions& options);
// Applies the liveness options to an already-connected socket (used for fds handed in by a caller too).
void apply_socket_options(int fd, const SocketOptions& options);
// Whether fd is a TCP socket with no upper-layer protocol on it (TCP_ULP: kTLS is one), whose sends may carry
// MSG_WAITALL (Completion::wait_all); false for anything else, a UNIX socket or a kTLS one.
bool socket_sends_may_wait_all(int fd);

// Receives exactly len bytes before `deadline`, for handshakes, where a peer that sends part of a frame and
// falls silent must not hold us for ever (the data path has its idle time-outs instead). Returns len, 0 on
// EOF before the first byte, -EPIPE on EOF mid-way, -ETIMEDOUT, or -errno.
int64_t recv_exact(int fd, void* buf, size_t len, std::chrono::steady_clock::time_point deadline);
// The deadline timeout_ms from now; a negative timeout_ms means none.
std::chrono::steady_clock::time_point deadline_in(int timeout_ms);

// TCP's latest delivery rate sample of a connection (TCP_INFO, Linux 4.9+): bytes/s, and app_limited when the
// sender had too little data in flight for it to show the path's rate. ok is false for anything but a TCP
// socket on such a kernel.
struct TcpSendState {
  bool ok = false;
  uint64_t delivery_rate = 0;
  bool app_limited = false;
};
TcpSendState tcp_send_state(int fd);

}  // namespace dstx::io
