// Private to io/: the two Ring implementations, reached only through make_ring().
#pragma once

#include <memory>

#include "io/ring.h"

namespace dstx::io::detail {

// Throws std::system_error naming the failing call (io_uring_queue_init).
std::unique_ptr<Ring> make_uring_ring(const RingOptions& options);
std::unique_ptr<Ring> make_syscall_ring(const RingOptions& options);

}  // namespace dstx::io::detail
