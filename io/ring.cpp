#include "io/ring.h"

#include <liburing.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <system_error>

#include "io/ring_backends.h"

namespace dstx::io {

std::atomic<int> test_failing_submissions{0};

namespace {

constexpr unsigned kRingEntriesMax = 4096;

// Each synchronous step reaps only its own completion, so a bounded number of reap rounds must find it;
// more means the ring lost it, which is a bug rather than a slow device.
constexpr int kReapRoundsMax = 1 << 20;
// Receives at least this large wait for their bytes with SO_RCVLOWAT (transfer_full).
constexpr size_t kLowWaterMinBytes = 64 << 10;

std::string errno_text(int err) {
  return std::generic_category().message(err);
}

// Returns the sysctl value, or -1 when the file does not exist (kernels before 6.6) or is unreadable.
int read_io_uring_disabled() {
  std::ifstream in("/proc/sys/kernel/io_uring_disabled");
  int value = -1;
  if (!(in >> value)) return -1;
  return value;
}

std::string unavailable_reason(int err) {
  std::string reason = "io_uring_setup: " + errno_text(err);
  const int disabled = read_io_uring_disabled();
  if (disabled > 0) {
    reason += " (kernel.io_uring_disabled=" + std::to_string(disabled);
    if (disabled == 1) reason += ": only root and members of kernel.io_uring_group may use it";
    reason += ")";
  } else if (err == EPERM) {
    reason += " (blocked by a seccomp filter, e.g. a container runtime's default profile)";
  } else if (err == ENOSYS) {
    reason += " (kernel built without io_uring, or the syscall is filtered)";
  } else if (err == ENOMEM) {
    reason += " (RLIMIT_MEMLOCK too small for the ring on this kernel?)";
  }
  return reason;
}

ProbeResult run_probe() {
  ProbeResult result;
  struct io_uring ring;
  const int rc = io_uring_queue_init(8, &ring, 0);
  if (rc < 0) {
    result.uring_unavailable_reason = unavailable_reason(-rc);
    return result;
  }
  result.uring_available = true;
  // IORING_REGISTER_PROBE arrived in 5.6: without it we cannot know, so claim nothing optional.
  if (struct io_uring_probe* p = io_uring_get_probe_ring(&ring)) {
    result.send_zc = io_uring_opcode_supported(p, IORING_OP_SEND_ZC) != 0;
    result.read_fixed = io_uring_opcode_supported(p, IORING_OP_READ_FIXED) != 0;
    io_uring_free_probe(p);
  }
  io_uring_queue_exit(&ring);
  return result;
}

// Waits until fd is ready for `events`; used after -EAGAIN from a non-blocking fd so the helpers block
// like their names promise instead of spinning.
void wait_ready(int fd, short events) {
  struct pollfd pfd = {fd, events, 0};
  while (::poll(&pfd, 1, -1) < 0 && errno == EINTR) {
  }
}

// Runs one operation to completion on an idle ring. Returns the raw result (bytes or -errno).
int32_t run_one(Ring& ring, Completion& c) {
  if (!ring.queue(&c)) return -EBUSY;
  for (int round = 0; round < kReapRoundsMax; ++round) {
    const int rc = ring.submit(1);
    // Reaped also after a failed submit, which hands the operation back with its error: `c` must not stay
    // in the ring once we return.
    Completion* got = nullptr;
    if (ring.reap(std::span<Completion*>(&got, 1)) == 1) {
      if (got != &c) return -EBUSY;  // someone else's completion: the ring was not idle
      return c.result;
    }
    if (rc < 0) return rc;
  }
  return -ETIME;
}

// The loop shared by the four helpers. A zero-byte result is EOF for reads; for writes it is an error.
int64_t transfer_full(Ring& ring, Op op, int fd, void* buf, size_t len, int64_t offset,
                      int file_index = -1) {
  const bool inbound = op == Op::read || op == Op::recv;
  // The helpers reap whatever completes next; another operation in flight would be taken and lost.
  if (ring.in_flight() != 0) return -EBUSY;
  auto* bytes = static_cast<char*>(buf);
  size_t done = 0;
  // A large receive asks TCP to wake us only once the rest of it is there (SO_RCVLOWAT; the kernel caps it
  // at half the receive buffer), not at every segment that arrives: on a paced link that saves most of the
  // wake-ups and context switches. Set to what is still missing before each attempt (more could never
  // arrive when this is the stream's last message), and back to 1 afterwards for small reads. Not a TCP
  // socket: the option fails or does nothing, and all is as without it. io_uring only: its receive is a
  // non-blocking attempt plus a poll, so every wait starts with nothing of the message left unread; a
  // blocking recv() copies while it waits, the unread bytes then never reach the mark, and it stalls on
  // TCP's timers (measured: 30x slower on a paced veth).
  struct LowWater {
    int fd;
    bool on;
    int at = 1;
    void set(size_t want) {
      const int v = int(std::min<size_t>(want, INT32_MAX));
      if (on && v != at && ::setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &v, sizeof v) == 0) at = v;
    }
    ~LowWater() { set(1); }
  } low_water{fd, op == Op::recv && len >= kLowWaterMinBytes && ring.backend() == Backend::uring};
  while (done < len) {
    low_water.set(len - done);
    Completion c;
    c.op = op;
    c.fd = fd;
    c.file_index = file_index;
    c.buf = bytes + done;
    c.len = static_cast<uint32_t>(std::min(len - done, kMaxIoBytes));
    c.offset = offset >= 0 ? offset + static_cast<int64_t>(done) : -1;
    const int32_t r = run_one(ring, c);
    if (r == -EINTR) continue;
    if (r == -EAGAIN) {
      wait_ready(fd, inbound ? POLLIN : POLLOUT);
      continue;
    }
    if (r < 0) return r;
    if (r == 0) {
      if (inbound) break;
      // A zero-byte write makes no progress; looping on it would never end.
      return -EIO;
    }
    done += static_cast<size_t>(r);
  }
  return static_cast<int64_t>(done);
}

}  // namespace

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::uring:
      return "io_uring";
    case Backend::syscall:
      return "syscall";
  }
  return "unknown";
}

const ProbeResult& probe() {
  // A function-local static is initialised exactly once even when several threads race here.
  static const ProbeResult result = run_probe();
  return result;
}

Backend choose_backend(std::string* why) {
  const char* env = std::getenv("DSTX_IO");
  const std::string forced = env != nullptr ? env : "";
  std::string because;
  Backend chosen;
  if (forced == "syscall") {
    // Forcing syscalls must work even where merely probing io_uring is logged or trapped by a filter.
    chosen = Backend::syscall;
    because = "syscall (forced by DSTX_IO=syscall)";
  } else if (forced == "uring") {
    if (!probe().uring_available) {
      throw std::runtime_error("DSTX_IO=uring but io_uring is unavailable: " +
                               probe().uring_unavailable_reason);
    }
    chosen = Backend::uring;
    because = "io_uring (forced by DSTX_IO=uring)";
  } else if (forced.empty()) {
    if (probe().uring_available) {
      chosen = Backend::uring;
      because = "io_uring (probe ok)";
    } else {
      chosen = Backend::syscall;
      because = "syscall (io_uring unavailable: " + probe().uring_unavailable_reason + ")";
    }
  } else {
    throw std::runtime_error("DSTX_IO=" + forced + ": expected uring or syscall");
  }
  if (why != nullptr) *why = std::move(because);
  return chosen;
}

std::unique_ptr<Ring> make_ring(Backend backend, const RingOptions& options) {
  const unsigned n = options.entries;
  if (n == 0 || n > kRingEntriesMax || (n & (n - 1)) != 0) {
    throw std::invalid_argument("RingOptions::entries=" + std::to_string(n) +
                                ": expected a power of two in 1.." + std::to_string(kRingEntriesMax));
  }
  switch (backend) {
    case Backend::uring:
      return detail::make_uring_ring(options);
    case Backend::syscall:
      return detail::make_syscall_ring(options);
  }
  throw std::invalid_argument("make_ring: unknown backend");
}

int64_t read_full(Ring& ring, int fd, void* buf, size_t len, int64_t offset) {
  return transfer_full(ring, Op::read, fd, buf, len, offset);
}

int64_t pread_full(int fd, void* buf, size_t len, int64_t offset) {
  size_t done = 0;
  while (done < len) {
    const ssize_t n = ::pread(fd, static_cast<std::byte*>(buf) + done, len - done, offset + int64_t(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    if (n == 0) break;
    done += size_t(n);
  }
  return int64_t(done);
}

int64_t write_full(Ring& ring, int fd, const void* buf, size_t len, int64_t offset) {
  // const_cast: the shared loop takes void*, but a write only ever reads from buf.
  return transfer_full(ring, Op::write, fd, const_cast<void*>(buf), len, offset);
}

int64_t send_full(Ring& ring, int fd, const void* buf, size_t len) {
  return transfer_full(ring, Op::send, fd, const_cast<void*>(buf), len, -1);
}

int64_t sendmsg_full(Ring& ring, int fd, std::span<iovec> pieces) {
  if (ring.in_flight() != 0) return -EBUSY;
  int64_t total = 0;
  size_t at = 0;
  while (at < pieces.size()) {
    if (pieces[at].iov_len == 0) {
      ++at;
      continue;
    }
    const size_t n = std::min(pieces.size() - at, kMaxIov);
    Completion c{.op = Op::sendmsg, .fd = fd, .more = at + n < pieces.size(), .iov = &pieces[at],
                 .iov_count = unsigned(n)};
    int32_t r = run_one(ring, c);
    if (r == -EAGAIN) {  // a non-blocking socket: wait for room, as send_full does
      wait_ready(fd, POLLOUT);
      continue;
    }
    if (r == -EINTR) continue;
    if (r < 0) return r;
    if (r == 0) return -EIO;  // no progress: looping on it would never end
    total += r;
    consume_pieces(pieces, &at, size_t(r));
  }
  return total;
}

void consume_pieces(std::span<iovec> pieces, size_t* at, size_t n) {
  while (n > 0 && *at < pieces.size()) {
    iovec& v = pieces[*at];
    if (n < v.iov_len) {
      v.iov_base = static_cast<std::byte*>(v.iov_base) + n;
      v.iov_len -= n;
      return;
    }
    n -= v.iov_len;
    v.iov_len = 0;
    ++*at;
  }
}

int64_t recv_full(Ring& ring, int fd, void* buf, size_t len, int file_index) {
  const int64_t got = transfer_full(ring, Op::recv, fd, buf, len, -1, file_index);
  if (got < 0 || static_cast<size_t>(got) == len) return got;
  return got == 0 ? 0 : -EPIPE;
}

}  // namespace dstx::io
