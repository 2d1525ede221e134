// TCP_INFO's fields that glibc's <netinet/tcp.h> lacks come from the kernel's header, in a unit of their own.
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>

#include "io/socket.h"

namespace dstx::io {

TcpSendState tcp_send_state(int fd) {
  tcp_info info{};
  socklen_t len = sizeof info;
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return {};
  // Kernels before 4.9 write less and have no delivery rate.
  if (len < offsetof(tcp_info, tcpi_delivery_rate) + sizeof info.tcpi_delivery_rate) return {};
  return {.ok = true,
          .delivery_rate = info.tcpi_delivery_rate,
          .app_limited = bool(info.tcpi_delivery_rate_app_limited)};
}

}  // namespace dstx::io
