// The io_uring backend. One SQE per Completion, user_data = the Completion. CQEs are copied into `ready_`
// as soon as they are seen (so a CQ overflow can never lose one) and handed back only by reap(): nothing is
// called back from inside the drain loop.
#include <liburing.h>
#include <sys/socket.h>

#include <cassert>
#include <cerrno>
#include <chrono>
#include <deque>
#include <string>
#include <system_error>

#include "io/ring_backends.h"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace dstx::io::detail {

namespace {

// SUBMIT_ALL (5.18): one bad SQE must not strand the ones behind it. COOP_TASKRUN + TASKRUN_FLAG (5.19): no
// IPI per completion; liburing sees the flag and enters the kernel when a peek needs task work run.
// SINGLE_ISSUER (6.0): a ring belongs to one thread anyway; the kernel binds it to the creating thread. Older
// kernels reject unknown flags with EINVAL.
constexpr unsigned kSetupFlagsPreferred = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN |
                                          IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SINGLE_ISSUER;

// io_uring_enter returns EAGAIN/EBUSY while the kernel is short of memory or the CQ overflow list cannot be
// flushed; each retry first drains the CQ, so persisting this long means something is wrong.
constexpr int kBusyRetriesMax = 1000;

// How long the destructor's safety net waits for cancelled operations before giving up.
constexpr auto kCancelWait = std::chrono::seconds(2);

// liburing maps and unmaps a ring's queues with raw system calls, which ThreadSanitizer does not see: when a
// new ring's queues land where a closed ring's were, it takes the new owner's writes for a race with the old
// owner's. The kernel orders the unmap before the map; a release on each queue's address before unmapping and
// an acquire on it after mapping tell ThreadSanitizer so, for that memory only.
#if defined(__SANITIZE_THREAD__)
void ring_memory_released(const io_uring& ring) {
  __tsan_release(ring.sq.ring_ptr);
  __tsan_release(ring.cq.ring_ptr);
  __tsan_release(ring.sq.sqes);
}
void ring_memory_acquired(const io_uring& ring) {
  __tsan_acquire(ring.sq.ring_ptr);
  __tsan_acquire(ring.cq.ring_ptr);
  __tsan_acquire(ring.sq.sqes);
}
#else
void ring_memory_released(const io_uring&) {}
void ring_memory_acquired(const io_uring&) {}
#endif

class UringRing final : public Ring {
 public:
  explicit UringRing(const RingOptions& options) {
    int rc = io_uring_queue_init(options.entries, &ring_, kSetupFlagsPreferred);
    if (rc == -EINVAL) rc = io_uring_queue_init(options.entries, &ring_, 0);
    if (rc < 0) {
      throw std::system_error(-rc, std::generic_category(),
                              "io_uring_queue_init(" + std::to_string(options.entries) + ")");
    }
    ring_memory_acquired(ring_);
  }

  ~UringRing() override {
    assert(in_flight_ == 0 && "reap every operation before destroying the ring");
    // Release builds: the kernel would otherwise keep writing into buffers the caller is about to free.
    if (in_flight_ != 0) cancel_all();
    ring_memory_released(ring_);
    io_uring_queue_exit(&ring_);
  }

  UringRing(const UringRing&) = delete;
  UringRing& operator=(const UringRing&) = delete;

  Backend backend() const override { return Backend::uring; }

  bool queue(Completion* c) override {
    assert(c != nullptr);
    assert(c->len <= kMaxIoBytes);
    struct io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) return false;
    prep(sqe, *c);
    io_uring_sqe_set_data(sqe, c);
    c->result = 0;
    c->done = false;
    c->notified = c->op != Op::send_zc;
    ++in_flight_;
    return true;
  }

  int submit(unsigned min_complete) override {
    // Waiting for more than can ever complete would hang.
    const size_t target = std::min<size_t>(min_complete, in_flight_);
    int busy_retries = 0;
    // Each pass submits SQEs or consumes at least one CQE (the wait returns only with one), so the loop is
    // bounded by the operations in flight; kBusyRetriesMax bounds the passes that do neither.
    for (;;) {
      drain_cqes();
      const bool need_more = ready_.size() < target;
      if (io_uring_sq_ready(&ring_) == 0 && !need_more) return 0;
      const int rc = test_failing_submissions.load(std::memory_order_relaxed) > 0 &&
                             test_failing_submissions.fetch_sub(1, std::memory_order_relaxed) > 0
                         ? -EAGAIN
                         : io_uring_submit_and_wait(&ring_, need_more ? 1 : 0);
      if (rc >= 0 || rc == -EINTR) {
        busy_retries = 0;
        continue;
      }
      if ((rc == -EAGAIN || rc == -EBUSY) && ++busy_retries <= kBusyRetriesMax) continue;
      withdraw_unsubmitted(rc == -EAGAIN ? -ENOMEM : rc);
      return rc;
    }
  }

  size_t reap(std::span<Completion*> out) override {
    drain_cqes();
    size_t n = 0;
    while (n < out.size() && !ready_.empty()) {
      out[n++] = ready_.front();
      ready_.pop_front();
    }
    assert(n <= in_flight_);
    in_flight_ -= static_cast<unsigned>(n);
    return n;
  }

  int register_buffers(std::span<const iovec> buffers) override {
    if (buffers_registered_) {
      const int rc = io_uring_unregister_buffers(&ring_);
      if (rc < 0) return rc;
      buffers_registered_ = false;
    }
    if (buffers.empty()) return 0;
    const int rc = io_uring_register_buffers(&ring_, buffers.data(), static_cast<unsigned>(buffers.size()));
    if (rc < 0) return rc;
    buffers_registered_ = true;
    return 0;
  }

  int register_files(std::span<const int> fds) override {
    assert(in_flight_ == 0);
    if (files_registered_) {
      const int rc = io_uring_unregister_files(&ring_);
      if (rc < 0) return rc;
      files_registered_ = false;
    }
    if (fds.empty()) return 0;
    const int rc = io_uring_register_files(&ring_, fds.data(), static_cast<unsigned>(fds.size()));
    if (rc < 0) return rc;
    files_registered_ = true;
    return 0;
  }

  int update_file(unsigned index, int fd) override {
    if (!files_registered_) return -ENXIO;
    const int rc = io_uring_register_files_update(&ring_, index, &fd, 1);
    return rc < 0 ? rc : rc == 1 ? 0 : -EINVAL;
  }

  unsigned in_flight() const override { return in_flight_; }

 private:
  static void prep(struct io_uring_sqe* sqe, Completion& c) {
    // -1 becomes ~0ULL, which the kernel reads as "use and advance the file position" (pipes, sockets).
    const auto offset = static_cast<uint64_t>(c.offset);
    const int fd = c.file_index >= 0 ? c.file_index : c.fd;  // the slot, with IOSQE_FIXED_FILE set below
    if (c.op == Op::sendmsg) {
      c.msg = msghdr{};
      c.msg.msg_iov = const_cast<iovec*>(c.iov);
      c.msg.msg_iovlen = c.iov_count;
    }
    prep_op(sqe, c, fd, offset);
    if (c.file_index >= 0) io_uring_sqe_set_flags(sqe, IOSQE_FIXED_FILE);
  }

  static void prep_op(struct io_uring_sqe* sqe, const Completion& c, int fd, uint64_t offset) {
    switch (c.op) {
      case Op::read:
        io_uring_prep_read(sqe, fd, c.buf, c.len, offset);
        break;
      case Op::write:
        io_uring_prep_write(sqe, fd, c.buf, c.len, offset);
        break;
      case Op::read_fixed:
        assert(c.buf_index >= 0);
        io_uring_prep_read_fixed(sqe, fd, c.buf, c.len, offset, c.buf_index);
        break;
      case Op::write_fixed:
        assert(c.buf_index >= 0);
        io_uring_prep_write_fixed(sqe, fd, c.buf, c.len, offset, c.buf_index);
        break;
      case Op::send:
        io_uring_prep_send(sqe, fd, c.buf, c.len, send_flags(c));
        break;
      case Op::send_zc:
        if (c.buf_index >= 0) {
          io_uring_prep_send_zc_fixed(sqe, fd, c.buf, c.len, send_flags(c), 0,
                                      static_cast<unsigned>(c.buf_index));
        } else {
          io_uring_prep_send_zc(sqe, fd, c.buf, c.len, send_flags(c), 0);
        }
        break;
      case Op::recv:
        io_uring_prep_recv(sqe, fd, c.buf, c.len, 0);
        break;
      case Op::sendmsg:
        io_uring_prep_sendmsg(sqe, fd, &c.msg, static_cast<unsigned>(send_flags(c)));
        break;
    }
  }

  // Moves every available CQE into the Completions. Never blocks: peek only enters the kernel to flush an
  // overflowed CQ or run pending task work, both without waiting.
  void drain_cqes() {
    struct io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe != nullptr) {
      on_cqe(*cqe);
      io_uring_cqe_seen(&ring_, cqe);
    }
  }

  // send_zc posts two CQEs: the result (with F_MORE when a notification will follow) and later F_NOTIF when
  // the kernel has dropped its last reference to the buffer. The Completion is handed back only after both,
  // so a caller may reuse or free the buffer as soon as reap() returns it. That costs the caller the
  // overlap between "sent" and "released", which keeps buffer ownership trivially correct.
  void on_cqe(const struct io_uring_cqe& cqe) {
    auto* c = static_cast<Completion*>(io_uring_cqe_get_data(&cqe));
    if (c == nullptr) return;  // our own cancel request (destructor)
    if ((cqe.flags & IORING_CQE_F_NOTIF) != 0) {
      assert(c->op == Op::send_zc);
      c->notified = true;
    } else {
      c->result = cqe.res;
      c->done = true;
      // Without F_MORE no notification follows (failed send, or a kernel that completes it inline).
      if ((cqe.flags & IORING_CQE_F_MORE) == 0) c->notified = true;
    }
    if (c->done && c->notified) ready_.push_back(c);
  }

  // The kernel would not take the queued SQEs: they would go with the next submission, on buffers their
  // callers may have freed by then. Each becomes a NOP whose completion is ignored (user_data null), and its
  // Completion comes back from reap() with `error`.
  void withdraw_unsubmitted(int error) {
    const unsigned head = io_uring_smp_load_acquire(ring_.sq.khead);
    for (unsigned i = head; i != ring_.sq.sqe_tail; ++i) {
      struct io_uring_sqe* sqe = &ring_.sq.sqes[i & ring_.sq.ring_mask];  // as io_uring_get_sqe gave it
      auto* c = reinterpret_cast<Completion*>(static_cast<uintptr_t>(sqe->user_data));
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data(sqe, nullptr);
      if (c == nullptr) continue;
      c->result = error;
      c->done = c->notified = true;
      ready_.push_back(c);
    }
  }

  void cancel_all() noexcept {
    struct io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
    }
    if (sqe != nullptr) {
      io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY);
      io_uring_sqe_set_data(sqe, nullptr);
    }
    const auto deadline = std::chrono::steady_clock::now() + kCancelWait;
    while (ready_.size() < in_flight_ && std::chrono::steady_clock::now() < deadline) {
      io_uring_submit(&ring_);
      struct __kernel_timespec ts = {0, 100 * 1000 * 1000};
      struct io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe_timeout(&ring_, &cqe, &ts) == 0) drain_cqes();
    }
  }

  struct io_uring ring_ {};
  std::deque<Completion*> ready_;
  unsigned in_flight_ = 0;
  bool buffers_registered_ = false;
  bool files_registered_ = false;
};

}  // namespace

std::unique_ptr<Ring> make_uring_ring(const RingOptions& options) {
  return std::make_unique<UringRing>(options);
}

}  // namespace dstx::io::detail
