// TCP_INFO's fields that glibc's <netinet/tcp.h> lacks come from the kernel's header, in a unit of their own.
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "io/socket.h"

namespace dstx::io {

TcpSendState tcp_send_state(int fd) {
  tcp_info info{};
  socklen_t len = sizeof info;
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return {};
  TcpSendState s;
  // Fields the running kernel does not fill stay zero (len says how much it wrote).
  s.ok = len >= offsetof(tcp_info, tcpi_sndbuf_limited) + sizeof info.tcpi_sndbuf_limited;
  s.busy_us = info.tcpi_busy_time;
  s.rwnd_limited_us = info.tcpi_rwnd_limited;
  s.sndbuf_limited_us = info.tcpi_sndbuf_limited;
  s.delivery_rate = info.tcpi_delivery_rate;
  s.app_limited = info.tcpi_delivery_rate_app_limited;
  return s;
}

}  // namespace dstx::io
