#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#include "io/socket.h"

namespace dstx::io {
namespace {

std::string parse_error(std::string_view text) {
  try {
    parse_host_port(text);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(no error)";
}

int int_option(int fd, int level, int name) {
  int value = -1;
  socklen_t len = sizeof value;
  EXPECT_EQ(::getsockopt(fd, level, name, &value, &len), 0) << std::strerror(errno);
  return value;
}

TEST(ParseHostPort, AcceptsNamesIpv4AndBracketedIpv6) {
  HostPort hp = parse_host_port("127.0.0.1:7000");
  EXPECT_EQ(hp.host, "127.0.0.1");
  EXPECT_EQ(hp.port, 7000);
  hp = parse_host_port("[::1]:0");
  EXPECT_EQ(hp.host, "::1");
  EXPECT_EQ(hp.port, 0);
  hp = parse_host_port("[fe80::1%eth0]:65535");
  EXPECT_EQ(hp.host, "fe80::1%eth0");
  EXPECT_EQ(hp.port, 65535);
  hp = parse_host_port("dst.example:1");
  EXPECT_EQ(hp.host, "dst.example");
  EXPECT_EQ(hp.port, 1);
}

TEST(ParseHostPort, RejectsWithMessagesNamingTheBadPart) {
  EXPECT_EQ(parse_error("127.0.0.1:99999"), "bad port '99999' in '127.0.0.1:99999'");
  EXPECT_EQ(parse_error("127.0.0.1:"), "bad port '' in '127.0.0.1:'");
  EXPECT_EQ(parse_error("host:-1"), "bad port '-1' in 'host:-1'");
  EXPECT_EQ(parse_error("host:7a"), "bad port '7a' in 'host:7a'");
  EXPECT_EQ(parse_error("host: 7"), "bad port ' 7' in 'host: 7'");
  EXPECT_EQ(parse_error("host:4294967297"), "bad port '4294967297' in 'host:4294967297'");
  EXPECT_EQ(parse_error("127.0.0.1"), "missing ':PORT' in '127.0.0.1'");
  EXPECT_EQ(parse_error(""), "missing ':PORT' in ''");
  EXPECT_EQ(parse_error(":7000"), "empty host in ':7000'");
  EXPECT_EQ(parse_error("[]:7000"), "empty host in '[]:7000'");
  EXPECT_EQ(parse_error("[::1:7000"), "missing ']' in '[::1:7000'");
  EXPECT_EQ(parse_error("[::1]7000"), "expected ':PORT' after ']' in '[::1]7000'");
  EXPECT_EQ(parse_error("[::1]"), "expected ':PORT' after ']' in '[::1]'");
  EXPECT_EQ(parse_error("::1:7000"), "IPv6 address must be in brackets ([ADDR]:PORT) in '::1:7000'");
}

TEST(ParseHostPort, ToStringRoundTrips) {
  for (const char* text : {"127.0.0.1:7000", "[::1]:80", "dst.example:65535"}) {
    EXPECT_EQ(to_string(parse_host_port(text)), text);
  }
}

TEST(Fd, ClosesOnDestructionAndMovesOwnership) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  {
    Fd a(fds[0]);
    Fd b(std::move(a));
    EXPECT_FALSE(a);
    EXPECT_EQ(b.get(), fds[0]);
    Fd c;
    c = std::move(b);
    EXPECT_EQ(c.get(), fds[0]);
    const int raw = c.release();
    EXPECT_FALSE(c);
    c.reset(raw);
  }
  EXPECT_EQ(::fcntl(fds[0], F_GETFD), -1);
  EXPECT_EQ(errno, EBADF);
  Fd w(fds[1]);
  w.reset();
  EXPECT_EQ(::fcntl(fds[1], F_GETFD), -1);
}

TEST(Tcp, ListenConnectAcceptExchange) {
  Fd listener = tcp_listen(parse_host_port("127.0.0.1:0"));
  ASSERT_TRUE(listener);
  const uint16_t port = bound_port(listener.get());
  EXPECT_NE(port, 0);
  Fd client = tcp_connect({"127.0.0.1", port}, {});
  Fd server = tcp_accept(listener.get(), 5000, {});
  ASSERT_TRUE(client);
  ASSERT_TRUE(server);
  // Both ends are blocking sockets whatever the listener is.
  EXPECT_EQ(::fcntl(client.get(), F_GETFL) & O_NONBLOCK, 0);
  EXPECT_EQ(::fcntl(server.get(), F_GETFL) & O_NONBLOCK, 0);
  EXPECT_NE(::fcntl(client.get(), F_GETFD) & FD_CLOEXEC, 0);
  EXPECT_NE(::fcntl(server.get(), F_GETFD) & FD_CLOEXEC, 0);

  ASSERT_EQ(::send(client.get(), "ping", 4, MSG_NOSIGNAL), 4);
  char buf[4];
  ASSERT_EQ(::recv(server.get(), buf, 4, MSG_WAITALL), 4);
  EXPECT_EQ(std::string(buf, 4), "ping");
  ASSERT_EQ(::send(server.get(), "pong", 4, MSG_NOSIGNAL), 4);
  ASSERT_EQ(::recv(client.get(), buf, 4, MSG_WAITALL), 4);
  EXPECT_EQ(std::string(buf, 4), "pong");
}

// MSG_WAITALL on sends only where the socket takes it: plain TCP. kTLS refuses the flag (EOPNOTSUPP), and a
// UNIX socket is not what the check knows.
TEST(Tcp, OnlyPlainTcpSocketsSendWithWaitAll) {
  Fd listener = tcp_listen(parse_host_port("127.0.0.1:0"));
  ASSERT_TRUE(listener);
  Fd client = tcp_connect({"127.0.0.1", bound_port(listener.get())}, {});
  Fd server = tcp_accept(listener.get(), 5000, {});
  ASSERT_TRUE(client && server);
  EXPECT_TRUE(socket_sends_may_wait_all(client.get()));
  EXPECT_TRUE(socket_sends_may_wait_all(server.get()));
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  Fd a(sv[0]), b(sv[1]);
  EXPECT_FALSE(socket_sends_may_wait_all(a.get()));
  EXPECT_FALSE(socket_sends_may_wait_all(-1));
  // With the kernel's TLS module, the upper-layer protocol alone (no keys yet) rules the flag out.
  if (::setsockopt(client.get(), IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls") == 0) {
    EXPECT_FALSE(socket_sends_may_wait_all(client.get()));
  }
}

TEST(Tcp, SendStateReportsTheDeliveryRateAfterDataWasAcknowledged) {
  Fd listener = tcp_listen(parse_host_port("127.0.0.1:0"));
  Fd client = tcp_connect({"127.0.0.1", bound_port(listener.get())}, {});
  Fd server = tcp_accept(listener.get(), 5000, {});
  ASSERT_TRUE(client);
  ASSERT_TRUE(server);
  const TcpSendState before = tcp_send_state(client.get());
  ASSERT_TRUE(before.ok) << "the kernel gives no delivery rate (before 4.9?)";
  EXPECT_EQ(before.delivery_rate, 0u);  // nothing sent yet
  const std::string data(4 << 20, 'x');
  const timeval limit{.tv_sec = 10, .tv_usec = 0};  // a failed send must not leave the reader waiting forever
  ASSERT_EQ(::setsockopt(server.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit), 0);
  std::thread reader([&] {
    std::string in(data.size(), 0);
    EXPECT_EQ(::recv(server.get(), in.data(), in.size(), MSG_WAITALL), ssize_t(in.size()));
  });
  EXPECT_EQ(::send(client.get(), data.data(), data.size(), MSG_NOSIGNAL), ssize_t(data.size()));
  reader.join();
  const TcpSendState after = tcp_send_state(client.get());
  EXPECT_TRUE(after.ok);
  EXPECT_GT(after.delivery_rate, 0u);
  // Not a TCP socket: nothing to report.
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  Fd a(fds[0]), b(fds[1]);
  EXPECT_FALSE(tcp_send_state(a.get()).ok);
  EXPECT_FALSE(tcp_send_state(-1).ok);
}

TEST(Tcp, Ipv6Loopback) {
  Fd listener;
  try {
    listener = tcp_listen(parse_host_port("[::1]:0"));
  } catch (const std::system_error& e) {
    GTEST_SKIP() << "no IPv6 loopback here: " << e.what();
  }
  const uint16_t port = bound_port(listener.get());
  Fd client = tcp_connect({"::1", port}, {});
  Fd server = tcp_accept(listener.get(), 5000, {});
  EXPECT_TRUE(client);
  EXPECT_TRUE(server);
}

TEST(Tcp, AcceptTimesOutWithAnInvalidFd) {
  Fd listener = tcp_listen({"127.0.0.1", 0});
  const auto start = std::chrono::steady_clock::now();
  Fd none = tcp_accept(listener.get(), 50, {});
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_FALSE(none);
  EXPECT_GE(elapsed, std::chrono::milliseconds(45));
  EXPECT_LT(elapsed, std::chrono::seconds(5));
}

TEST(Tcp, ConnectToAClosedPortThrowsNamingTheAddress) {
  uint16_t port = 0;
  {
    Fd listener = tcp_listen({"127.0.0.1", 0});
    port = bound_port(listener.get());
  }
  const std::string address = "127.0.0.1:" + std::to_string(port);
  try {
    tcp_connect(parse_host_port(address), {});
    ADD_FAILURE() << "connect to a closed port succeeded";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code(), std::errc::connection_refused);
    EXPECT_NE(std::string(e.what()).find("connect to " + address), std::string::npos) << e.what();
  }
}

TEST(Tcp, ListenOnABusyPortThrowsNamingTheAddress) {
  Fd first = tcp_listen({"127.0.0.1", 0});
  const HostPort taken{"127.0.0.1", bound_port(first.get())};
  try {
    Fd second = tcp_listen(taken);
    ADD_FAILURE() << "second listen on one port succeeded";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code(), std::errc::address_in_use);
    EXPECT_NE(std::string(e.what()).find(to_string(taken)), std::string::npos) << e.what();
  }
}

TEST(Tcp, OptionsAreAppliedToBothEnds) {
  SocketOptions options;
  options.user_timeout_ms = 12345;
  options.keepalive_idle_s = 7;
  options.buffer_bytes = 256 * 1024;
  Fd listener = tcp_listen({"127.0.0.1", 0});
  Fd client = tcp_connect({"127.0.0.1", bound_port(listener.get())}, options);
  Fd server = tcp_accept(listener.get(), 5000, options);
  ASSERT_TRUE(server);
  for (const Fd* fd : {&client, &server}) {
    EXPECT_EQ(int_option(fd->get(), IPPROTO_TCP, TCP_NODELAY), 1);
    EXPECT_EQ(int_option(fd->get(), IPPROTO_TCP, TCP_USER_TIMEOUT), 12345);
    EXPECT_EQ(int_option(fd->get(), SOL_SOCKET, SO_KEEPALIVE), 1);
    EXPECT_EQ(int_option(fd->get(), IPPROTO_TCP, TCP_KEEPIDLE), 7);
    EXPECT_EQ(int_option(fd->get(), IPPROTO_TCP, TCP_KEEPINTVL), 5);
    EXPECT_EQ(int_option(fd->get(), IPPROTO_TCP, TCP_KEEPCNT), 3);
    // Linux doubles the requested size for bookkeeping.
    EXPECT_GE(int_option(fd->get(), SOL_SOCKET, SO_SNDBUF), 256 * 1024);
  }
}

TEST(Tcp, OptionsOnAUnixSocketSkipTheTcpOnes) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  Fd a(fds[0]), b(fds[1]);
  SocketOptions options;
  options.buffer_bytes = 128 * 1024;
  EXPECT_NO_THROW(apply_socket_options(a.get(), options));
  EXPECT_GE(int_option(a.get(), SOL_SOCKET, SO_SNDBUF), 128 * 1024);
}

TEST(Tcp, OptionsOnANonSocketThrowNamingTheCall) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  Fd a(fds[0]), b(fds[1]);
  try {
    apply_socket_options(a.get(), {});
    ADD_FAILURE() << "options applied to a pipe";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code(), std::errc::not_a_socket);
    EXPECT_NE(std::string(e.what()).find("getsockopt(SO_DOMAIN)"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dstx::io
