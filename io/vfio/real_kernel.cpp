// The host kernel behind the Kernel interface: plain syscalls, bulk data through the caller's ring.
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "io/vfio/kernel.h"

namespace dstx::io::vfio {
namespace {

int64_t result_or_errno(int64_t r) {
  return r < 0 ? -int64_t(errno) : r;
}

class RealKernel final : public Kernel {
 public:
  std::string name() const override { return "kernel"; }

  int open(const std::string& path, int flags) override {
    int fd;
    do fd = ::open(path.c_str(), flags | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : fd;
  }

  int close(int fd) override { return ::close(fd) < 0 ? -errno : 0; }

  int ioctl(int fd, unsigned long request, void* arg) override {
    int r;
    do r = ::ioctl(fd, request, arg);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
  }

  int64_t pread(int fd, void* buf, size_t len, uint64_t offset) override {
    ssize_t r;
    do r = ::pread(fd, buf, len, off_t(offset));
    while (r < 0 && errno == EINTR);
    return result_or_errno(r);
  }

  int64_t pwrite(int fd, const void* buf, size_t len, uint64_t offset) override {
    ssize_t r;
    do r = ::pwrite(fd, buf, len, off_t(offset));
    while (r < 0 && errno == EINTR);
    return result_or_errno(r);
  }

  int mmap(int fd, size_t len, int prot, uint64_t offset, void** out) override {
    void* p = ::mmap(nullptr, len, prot, MAP_SHARED, fd, off_t(offset));
    if (p == MAP_FAILED) return -errno;
    *out = p;
    return 0;
  }

  int munmap(void* addr, size_t len) override { return ::munmap(addr, len) < 0 ? -errno : 0; }

  int64_t read(Ring& ring, int fd, void* buf, size_t len, int64_t offset) override {
    return ring_once(ring, Op::read, fd, buf, len, offset);
  }

  int64_t write(Ring& ring, int fd, const void* buf, size_t len, int64_t offset) override {
    return ring_once(ring, Op::write, fd, const_cast<void*>(buf), len, offset);
  }

  int poll(int fd, short events, int timeout_ms) override {
    pollfd p{.fd = fd, .events = events, .revents = 0};
    const int r = ::poll(&p, 1, timeout_ms);
    if (r < 0) return -errno;
    return r == 0 ? 0 : p.revents;
  }
};

const char* errno_name(int err) {
  switch (err) {
    case ENOENT:
      return "ENOENT";
    case EACCES:
      return "EACCES";
    case EPERM:
      return "EPERM";
    case EBUSY:
      return "EBUSY";
    case EINVAL:
      return "EINVAL";
    case EIO:
      return "EIO";
    case ENOTTY:
      return "ENOTTY";
    case ENODEV:
      return "ENODEV";
    case ENXIO:
      return "ENXIO";
    case ENOMSG:
      return "ENOMSG";
    case EBADF:
      return "EBADF";
    case EFAULT:
      return "EFAULT";
    case ENOMEM:
      return "ENOMEM";
    case ESPIPE:
      return "ESPIPE";
    case EAGAIN:
      return "EAGAIN";
    case EPIPE:
      return "EPIPE";
    case EEXIST:
      return "EEXIST";
    case ENOSPC:
      return "ENOSPC";
    case EOPNOTSUPP:
      return "EOPNOTSUPP";
    default:
      return nullptr;
  }
}

}  // namespace

std::shared_ptr<Kernel> real_kernel() {
  static const std::shared_ptr<Kernel> kernel = std::make_shared<RealKernel>();
  return kernel;
}

int64_t ring_once(Ring& ring, Op op, int fd, void* buf, size_t len, int64_t offset) {
  if (ring.in_flight() != 0) return -EBUSY;  // another completion would be taken for ours
  for (;;) {
    Completion c{
        .op = op, .fd = fd, .buf = buf, .len = uint32_t(std::min(len, kMaxIoBytes)), .offset = offset};
    if (!ring.queue(&c)) return -EBUSY;
    Completion* got = nullptr;
    // Bounded: each round either reaps our one completion or waits in submit() for it.
    for (int round = 0; round < 1000000 && got == nullptr; ++round) {
      const int rc = ring.submit(1);
      ring.reap(std::span<Completion*>(&got, 1));  // a failed submit hands `c` back with its error
      if (rc < 0 && got == nullptr) return rc;
    }
    if (got != &c) return -EBUSY;
    if (c.result == -EINTR) continue;
    return c.result;
  }
}

std::string errno_text(int err) {
  std::string text = std::generic_category().message(err) + " (errno " + std::to_string(err);
  if (const char* name = errno_name(err)) text += std::string(", ") + name;
  return text + ")";
}

}  // namespace dstx::io::vfio
