// The QEMU-style baseline: one TCP stream, read 1 MiB from the source, send it raw, repeat; the receiver
// writes what arrives. No checksums, no compression, no zero skipping. Plain blocking syscalls.
//   plain_loop send FILE HOST PORT
//   plain_loop recv PORT OUTFILE|-        (- discards)
// Prints one JSON line: {"role":..,"bytes":..,"seconds":..}.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr size_t kChunkBytes = 1 << 20;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "plain_loop: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= size_t(w);
  }
  return true;
}

int send_mode(const char* file, const char* host, int port) {
  const int in = ::open(file, O_RDONLY | O_CLOEXEC);
  if (in < 0) die(file);
  const int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) die("address");
  if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) die("connect");
  std::vector<char> buf(kChunkBytes);
  uint64_t total = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const ssize_t n = ::read(in, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("read");
    if (n == 0) break;
    if (!write_all(s, buf.data(), size_t(n))) die("send");
    total += uint64_t(n);
  }
  ::shutdown(s, SHUT_WR);
  char c;
  while (::read(s, &c, 1) > 0) {
  }  // wait until the receiver has everything and closes
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("{\"role\":\"send\",\"bytes\":%llu,\"seconds\":%.6f}\n", (unsigned long long)total, secs);
  return 0;
}

int recv_mode(int port, const char* out_path) {
  const int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  if (::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) die("bind");
  if (::listen(l, 1) != 0) die("listen");
  std::fprintf(stderr, "plain_loop: listening on %d\n", port);
  const int s = ::accept4(l, nullptr, nullptr, SOCK_CLOEXEC);
  if (s < 0) die("accept");
  const bool discard = std::strcmp(out_path, "-") == 0;
  const int out = discard ? -1 : ::open(out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (!discard && out < 0) die(out_path);
  std::vector<char> buf(kChunkBytes);
  uint64_t total = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const ssize_t n = ::recv(s, buf.data(), buf.size(), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("recv");
    if (n == 0) break;
    if (!discard && !write_all(out, buf.data(), size_t(n))) die("write");
    total += uint64_t(n);
  }
  if (!discard && ::fdatasync(out) != 0) die("fdatasync");
  ::close(s);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("{\"role\":\"recv\",\"bytes\":%llu,\"seconds\":%.6f}\n", (unsigned long long)total, secs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::strcmp(argv[1], "send") == 0) return send_mode(argv[2], argv[3], std::atoi(argv[4]));
  if (argc == 4 && std::strcmp(argv[1], "recv") == 0) return recv_mode(std::atoi(argv[2]), argv[3]);
  std::fprintf(stderr, "usage: plain_loop send FILE HOST PORT | plain_loop recv PORT OUTFILE|-\n");
  return 2;
}
