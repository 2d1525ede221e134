// The plain-syscall backend: the same contract as io_uring, performed synchronously inside submit(). It is
// what runs where io_uring is disabled (kernel.io_uring_disabled, seccomp), so it must report results exactly
// like the uring backend does: one syscall per operation, short counts as they are, errors as -errno.
#include <sys/socket.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <deque>
#include <vector>

#include "io/ring_backends.h"

namespace dstx::io::detail {

namespace {

// A signal storm could otherwise keep one operation retrying forever.
constexpr int kEintrRetriesMax = 1000;

int32_t perform_once(const Completion& c) {
  ssize_t n = -1;
  switch (c.op) {
    case Op::read:
    case Op::read_fixed:
      n = c.offset < 0 ? ::read(c.fd, c.buf, c.len) : ::pread(c.fd, c.buf, c.len, c.offset);
      break;
    case Op::write:
    case Op::write_fixed:
      n = c.offset < 0 ? ::write(c.fd, c.buf, c.len) : ::pwrite(c.fd, c.buf, c.len, c.offset);
      break;
    case Op::send:
    case Op::send_zc:
      n = ::send(c.fd, c.buf, c.len, send_flags(c));
      break;
    case Op::recv:
      n = ::recv(c.fd, c.buf, c.len, 0);
      break;
    case Op::sendmsg: {
      msghdr msg{};
      msg.msg_iov = const_cast<iovec*>(c.iov);
      msg.msg_iovlen = c.iov_count;
      n = ::sendmsg(c.fd, &msg, send_flags(c));
      break;
    }
  }
  return n < 0 ? -errno : static_cast<int32_t>(n);
}

int32_t perform(Completion c, const std::vector<int>& files) {
  if (c.file_index >= 0) {
    if (size_t(c.file_index) >= files.size() || files[size_t(c.file_index)] < 0) return -EBADF;
    c.fd = files[size_t(c.file_index)];
  }
  int32_t r = -EINTR;
  for (int attempt = 0; attempt < kEintrRetriesMax && r == -EINTR; ++attempt) r = perform_once(c);
  return r;
}

class SyscallRing final : public Ring {
 public:
  explicit SyscallRing(const RingOptions& options) : entries_(options.entries) { queued_.reserve(entries_); }

  ~SyscallRing() override { assert(in_flight() == 0 && "reap every operation before destroying the ring"); }

  Backend backend() const override { return Backend::syscall; }

  bool queue(Completion* c) override {
    assert(c != nullptr);
    assert(c->len <= kMaxIoBytes);
    if (queued_.size() >= entries_) return false;
    c->result = 0;
    c->done = false;
    c->notified = true;  // send_zc is a copying send here: the buffer is free as soon as the call returns
    queued_.push_back(c);
    return true;
  }

  // Everything queued completes here, so min_complete is always satisfied (or cannot be, when larger than
  // what is in flight: io_uring would wait forever, we return).
  int submit(unsigned /*min_complete*/) override {
    for (Completion* c : queued_) {
      c->result = perform(*c, files_);
      c->done = true;
      ready_.push_back(c);
    }
    queued_.clear();
    return 0;
  }

  size_t reap(std::span<Completion*> out) override {
    size_t n = 0;
    while (n < out.size() && !ready_.empty()) {
      out[n++] = ready_.front();
      ready_.pop_front();
    }
    return n;
  }

  int register_buffers(std::span<const iovec> /*buffers*/) override { return 0; }

  int register_files(std::span<const int> fds) override {
    files_.assign(fds.begin(), fds.end());
    return 0;
  }

  int update_file(unsigned index, int fd) override {
    if (files_.empty()) return -ENXIO;
    if (index >= files_.size()) return -EINVAL;
    files_[index] = fd;
    return 0;
  }

  unsigned in_flight() const override { return static_cast<unsigned>(queued_.size() + ready_.size()); }

 private:
  const unsigned entries_;
  std::vector<Completion*> queued_;
  std::deque<Completion*> ready_;
  std::vector<int> files_;  // register_files
};

}  // namespace

std::unique_ptr<Ring> make_syscall_ring(const RingOptions& options) {
  return std::make_unique<SyscallRing>(options);
}

}  // namespace dstx::io::detail
