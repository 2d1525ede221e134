// Private to io/: the two Ring implementations, reached only through make_ring().
#pragma once

#include <sys/socket.h>

#include <memory>

#include "io/ring.h"

namespace dstx::io::detail {

// The flags of a send: never SIGPIPE (a broken connection is an error result), MSG_MORE when asked, and
// MSG_WAITALL: io_uring then goes on sending as the socket takes more (TCP's own send ignores the flag), and
// completes the operation when all of it is in or the socket fails. Without it a send completed with what the
// socket took at once, and the rest waited for the worker to come back from encoding: at the start (small
// send buffers) a worker's first 0.5 MiB frame took 5-8 ms to leave, and so did the rest of any later frame
// the socket could not take whole.
inline int send_flags(const Completion& c) { return MSG_NOSIGNAL | MSG_WAITALL | (c.more ? MSG_MORE : 0); }

// Throws std::system_error naming the failing call (io_uring_queue_init).
std::unique_ptr<Ring> make_uring_ring(const RingOptions& options);
std::unique_ptr<Ring> make_syscall_ring(const RingOptions& options);

}  // namespace dstx::io::detail
