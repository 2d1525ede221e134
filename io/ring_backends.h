// Private to io/: the two Ring implementations, reached only through make_ring().
#pragma once

#include <sys/socket.h>

#include <memory>

#include "io/ring.h"

namespace dstx::io::detail {

// The flags of a send: never SIGPIPE (a broken connection is an error result), MSG_MORE and MSG_WAITALL when
// asked.
inline int send_flags(const Completion& c) {
  return MSG_NOSIGNAL | (c.more ? MSG_MORE : 0) | (c.wait_all ? MSG_WAITALL : 0);
}

// Throws std::system_error naming the failing call (io_uring_queue_init).
std::unique_ptr<Ring> make_uring_ring(const RingOptions& options);
std::unique_ptr<Ring> make_syscall_ring(const RingOptions& options);

}  // namespace dstx::io::detail
