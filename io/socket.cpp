#include "io/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <charconv>
#include <chrono>
#include <stdexcept>
#include <string>
#include <system_error>

namespace dstx::io {

namespace {

// Keepalive probes after the idle time: with TCP_USER_TIMEOUT they bound how long a dead peer goes unnoticed.
constexpr int kKeepaliveIntervalS = 5;
constexpr int kKeepaliveProbes = 3;

class GaiCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "getaddrinfo"; }
  std::string message(int code) const override { return ::gai_strerror(code); }
};

const std::error_category& gai_category() {
  static const GaiCategory category;
  return category;
}

[[noreturn]] void throw_errno(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), what);
}

struct AddrInfoList {
  struct addrinfo* head = nullptr;
  ~AddrInfoList() {
    if (head != nullptr) ::freeaddrinfo(head);
  }
};

void resolve(const HostPort& where, bool passive, AddrInfoList& out) {
  struct addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  const std::string port = std::to_string(where.port);
  const int rc = ::getaddrinfo(where.host.c_str(), port.c_str(), &hints, &out.head);
  if (rc == EAI_SYSTEM) throw_errno(errno, "resolve " + to_string(where));
  if (rc != 0) throw std::system_error(rc, gai_category(), "resolve " + to_string(where));
}

std::string sockaddr_text(const struct sockaddr_storage& ss) {
  char host[INET6_ADDRSTRLEN] = {};
  HostPort hp;
  if (ss.ss_family == AF_INET) {
    const auto& sin = reinterpret_cast<const struct sockaddr_in&>(ss);
    ::inet_ntop(AF_INET, &sin.sin_addr, host, sizeof host);
    hp.port = ntohs(sin.sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto& sin6 = reinterpret_cast<const struct sockaddr_in6&>(ss);
    ::inet_ntop(AF_INET6, &sin6.sin6_addr, host, sizeof host);
    hp.port = ntohs(sin6.sin6_port);
  } else {
    return "a non-IP socket";
  }
  hp.host = host;
  return to_string(hp);
}

std::string local_address_text(int fd) {
  struct sockaddr_storage ss = {};
  socklen_t len = sizeof ss;
  if (::getsockname(fd, reinterpret_cast<struct sockaddr*>(&ss), &len) != 0)
    return "fd " + std::to_string(fd);
  return sockaddr_text(ss);
}

// poll() that survives signals and keeps the caller's overall deadline. Returns poll's result (0 = timed
// out).
int poll_one(int fd, short events, int timeout_ms) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  for (;;) {
    int wait_ms = -1;
    if (timeout_ms >= 0) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
      wait_ms = left > 0 ? static_cast<int>(left) : 0;
    }
    struct pollfd pfd = {fd, events, 0};
    const int rc = ::poll(&pfd, 1, wait_ms);
    if (rc >= 0 || errno != EINTR) return rc;
  }
}

void set_nonblocking(int fd, bool on) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) throw_errno(errno, "fcntl(F_GETFL) on fd " + std::to_string(fd));
  const int wanted = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (wanted != flags && ::fcntl(fd, F_SETFL, wanted) != 0) {
    throw_errno(errno, "fcntl(F_SETFL) on fd " + std::to_string(fd));
  }
}

void set_int_option(int fd, int level, int name, int value, const char* label) {
  if (::setsockopt(fd, level, name, &value, sizeof value) != 0) {
    throw_errno(errno, std::string("setsockopt(") + label + ") on " + local_address_text(fd));
  }
}

// One non-blocking connect bounded by the remaining time. Returns 0 or an errno value.
int connect_one(int fd, const struct addrinfo& ai, int timeout_ms) {
  if (::connect(fd, ai.ai_addr, ai.ai_addrlen) == 0) return 0;
  // EINTR on a non-blocking connect leaves the attempt running, exactly like EINPROGRESS.
  if (errno != EINPROGRESS && errno != EINTR) return errno;
  const int rc = poll_one(fd, POLLOUT, timeout_ms);
  if (rc < 0) return errno;
  if (rc == 0) return ETIMEDOUT;
  int err = 0;
  socklen_t len = sizeof err;
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
  return err;
}

}  // namespace

HostPort parse_host_port(std::string_view text) {
  const std::string quoted = "'" + std::string(text) + "'";
  HostPort hp;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) throw std::invalid_argument("missing ']' in " + quoted);
    hp.host = std::string(text.substr(1, close - 1));
    if (close + 1 >= text.size() || text[close + 1] != ':') {
      throw std::invalid_argument("expected ':PORT' after ']' in " + quoted);
    }
    port_text = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) throw std::invalid_argument("missing ':PORT' in " + quoted);
    hp.host = std::string(text.substr(0, colon));
    if (hp.host.find(':') != std::string::npos) {
      throw std::invalid_argument("IPv6 address must be in brackets ([ADDR]:PORT) in " + quoted);
    }
    port_text = text.substr(colon + 1);
  }
  if (hp.host.empty()) throw std::invalid_argument("empty host in " + quoted);
  unsigned value = 0;
  const char* first = port_text.data();
  const char* last = first + port_text.size();
  const auto [end, ec] = std::from_chars(first, last, value);
  if (port_text.empty() || ec != std::errc() || end != last || value > 65535) {
    throw std::invalid_argument("bad port '" + std::string(port_text) + "' in " + quoted);
  }
  hp.port = static_cast<uint16_t>(value);
  return hp;
}

std::string to_string(const HostPort& hp) {
  const bool v6 = hp.host.find(':') != std::string::npos;
  return (v6 ? "[" + hp.host + "]" : hp.host) + ":" + std::to_string(hp.port);
}

Fd::~Fd() {
  reset();
}

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

int Fd::release() {
  const int fd = fd_;
  fd_ = -1;
  return fd;
}

void Fd::reset(int fd) {
  // close() is not retried on EINTR: Linux releases the descriptor regardless, and a retry could close a
  // descriptor another thread has just been given.
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Fd tcp_listen(const HostPort& where, int backlog) {
  AddrInfoList list;
  resolve(where, /*passive=*/true, list);
  int last_err = EADDRNOTAVAIL;
  const char* last_call = "bind to ";
  for (const struct addrinfo* ai = list.head; ai != nullptr; ai = ai->ai_next) {
    // Non-blocking so that a connection reset between poll() and accept() cannot block tcp_accept.
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (!fd) {
      last_err = errno;
      last_call = "socket for ";
      continue;
    }
    const int one = 1;
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) {
      throw_errno(errno, "setsockopt(SO_REUSEADDR) for " + to_string(where));
    }
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      last_err = errno;
      last_call = "bind to ";
      continue;
    }
    if (::listen(fd.get(), backlog) != 0) {
      last_err = errno;
      last_call = "listen on ";
      continue;
    }
    return fd;
  }
  throw_errno(last_err, last_call + to_string(where));
}

uint16_t bound_port(int listen_fd) {
  struct sockaddr_storage ss = {};
  socklen_t len = sizeof ss;
  if (::getsockname(listen_fd, reinterpret_cast<struct sockaddr*>(&ss), &len) != 0) {
    throw_errno(errno, "getsockname on fd " + std::to_string(listen_fd));
  }
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<const struct sockaddr_in&>(ss).sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<const struct sockaddr_in6&>(ss).sin6_port);
  throw_errno(EAFNOSUPPORT, "bound_port on fd " + std::to_string(listen_fd));
}

Fd tcp_accept(int listen_fd, int timeout_ms, const SocketOptions& options) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  for (;;) {
    int wait_ms = -1;
    if (timeout_ms >= 0) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
      wait_ms = left > 0 ? static_cast<int>(left) : 0;
    }
    const int rc = poll_one(listen_fd, POLLIN, wait_ms);
    if (rc < 0) throw_errno(errno, "poll on listening socket " + local_address_text(listen_fd));
    if (rc == 0) return Fd();
    Fd fd(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd) {
      // The pending connection vanished (reset, or another acceptor took it): wait for the next one.
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED || errno == EINTR) continue;
      throw_errno(errno, "accept on " + local_address_text(listen_fd));
    }
    apply_socket_options(fd.get(), options);
    return fd;
  }
}

Fd tcp_connect(const HostPort& where, const SocketOptions& options) {
  AddrInfoList list;
  resolve(where, /*passive=*/false, list);
  using Clock = std::chrono::steady_clock;
  const int timeout_ms = options.connect_timeout_ms;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  int last_err = EADDRNOTAVAIL;
  for (const struct addrinfo* ai = list.head; ai != nullptr; ai = ai->ai_next) {
    int left_ms = -1;
    if (timeout_ms >= 0) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) {
        last_err = ETIMEDOUT;
        break;
      }
      left_ms = static_cast<int>(left);
    }
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (!fd) {
      last_err = errno;
      continue;
    }
    last_err = connect_one(fd.get(), *ai, left_ms);
    if (last_err != 0) continue;
    set_nonblocking(fd.get(), false);
    apply_socket_options(fd.get(), options);
    return fd;
  }
  throw_errno(last_err, "connect to " + to_string(where));
}

bool socket_sends_may_wait_all(int fd) {
  char ulp[16];
  socklen_t len = sizeof ulp;
  return ::getsockopt(fd, IPPROTO_TCP, TCP_ULP, ulp, &len) == 0 && len == 0;
}

void apply_socket_options(int fd, const SocketOptions& options) {
  int domain = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) {
    throw_errno(errno, "getsockopt(SO_DOMAIN) on fd " + std::to_string(fd));
  }
  // Handed-in fds may be UNIX stream sockets, where the TCP-level options do not exist.
  if (domain == AF_INET || domain == AF_INET6) {
    set_int_option(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
    if (options.keepalive_idle_s > 0) {
      set_int_option(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
      set_int_option(fd, IPPROTO_TCP, TCP_KEEPIDLE, options.keepalive_idle_s, "TCP_KEEPIDLE");
      set_int_option(fd, IPPROTO_TCP, TCP_KEEPINTVL, kKeepaliveIntervalS, "TCP_KEEPINTVL");
      set_int_option(fd, IPPROTO_TCP, TCP_KEEPCNT, kKeepaliveProbes, "TCP_KEEPCNT");
    }
    if (options.user_timeout_ms >= 0) {
      set_int_option(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, options.user_timeout_ms, "TCP_USER_TIMEOUT");
    }
  }
  if (options.buffer_bytes > 0) {
    set_int_option(fd, SOL_SOCKET, SO_SNDBUF, options.buffer_bytes, "SO_SNDBUF");
    set_int_option(fd, SOL_SOCKET, SO_RCVBUF, options.buffer_bytes, "SO_RCVBUF");
  }
}

int64_t recv_exact(int fd, void* buf, size_t len, std::chrono::steady_clock::time_point deadline) {
  auto* bytes = static_cast<char*>(buf);
  size_t got = 0;
  while (got < len) {
    const ssize_t n = ::recv(fd, bytes + got, len - got, MSG_DONTWAIT);
    if (n > 0) {
      got += size_t(n);
      continue;
    }
    if (n == 0) return got == 0 ? 0 : -EPIPE;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return -ETIMEDOUT;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    pollfd p{.fd = fd, .events = POLLIN, .revents = 0};
    if (::poll(&p, 1, int(std::min<int64_t>(left, INT32_MAX))) < 0 && errno != EINTR) return -errno;
  }
  return int64_t(got);
}

std::chrono::steady_clock::time_point deadline_in(int timeout_ms) {
  if (timeout_ms < 0) return std::chrono::steady_clock::time_point::max();
  return std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
}

}  // namespace dstx::io
