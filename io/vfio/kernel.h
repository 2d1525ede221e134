// The one narrow door to the kernel for VFIO: every VFIO access of dstx goes through a Kernel. RealKernel
// makes plain syscalls; EmuKernel (emu_kernel.h) is an in-process kernel with emulated vendor drivers that
// hands out real file descriptors wherever the uAPI does, so the same device code runs against both.
// Calls return -errno on failure, like the syscalls underneath (never errno, never an exception).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "io/ring.h"

namespace dstx::io::vfio {

class Kernel {
 public:
  virtual ~Kernel() = default;
  virtual std::string name() const = 0;  // "kernel" or "emulated kernel"

  virtual int open(const std::string& path, int flags) = 0;  // fd or -errno
  virtual int close(int fd) = 0;
  // `arg` is what the ioctl takes: a pointer to its struct, or an integer value cast to a pointer.
  virtual int ioctl(int fd, unsigned long request, void* arg) = 0;  // >= 0 or -errno
  // Small synchronous accesses (v1 region header fields): bytes transferred or -errno.
  virtual int64_t pread(int fd, void* buf, size_t len, uint64_t offset) = 0;
  virtual int64_t pwrite(int fd, const void* buf, size_t len, uint64_t offset) = 0;
  // Maps `len` bytes of `fd` at `offset`; 0 with *out set, or -errno.
  virtual int mmap(int fd, size_t len, int prot, uint64_t offset, void** out) = 0;
  virtual int munmap(void* addr, size_t len) = 0;
  // Bulk data (a v2 data_fd, a v1 data section outside its mapping) moves through the caller's ring, which
  // must have nothing else in flight. One read or write: it may transfer less than asked. offset -1 means
  // the file position (data_fds are streams and refuse explicit offsets).
  virtual int64_t read(Ring& ring, int fd, void* buf, size_t len, int64_t offset) = 0;
  virtual int64_t write(Ring& ring, int fd, const void* buf, size_t len, int64_t offset) = 0;
  // poll(2) on one fd: the revents, 0 on time-out, or -errno.
  virtual int poll(int fd, short events, int timeout_ms) = 0;
};

// The host kernel.
std::shared_ptr<Kernel> real_kernel();

// One operation on an idle ring: queue, submit, reap. Bytes or -errno (EINTR retried).
int64_t ring_once(Ring& ring, Op op, int fd, void* buf, size_t len, int64_t offset);

// "No such file or directory (errno 2, ENOENT)".
std::string errno_text(int err);

}  // namespace dstx::io::vfio
