// The I/O ring: one interface, two backends. The io_uring backend queues SQEs and reaps CQEs; the syscall
// backend performs each queued operation with a plain syscall when submit() runs and reports it the same way.
// A ring belongs to one thread, and must be made on that thread (io_uring is set up SINGLE_ISSUER: a submit
// from any other thread fails with -EEXIST). The caller owns each Completion until the ring hands it back
// from reap().
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace dstx::io {

// The kernel caps one read/write at this many bytes (MAX_RW_COUNT).
inline constexpr size_t kMaxIoBytes = 0x7ffff000;

enum class Op : uint8_t {
  read,         // pread(fd, buf, len, offset); offset -1 means "current file position" (pipes, sockets, ttys)
  write,        // pwrite(fd, buf, len, offset); offset -1 as above
  read_fixed,   // read into registered buffer `buf_index` (buf must point inside it)
  write_fixed,  // write from registered buffer `buf_index`
  send,         // send(fd, buf, len, MSG_NOSIGNAL, plus MSG_MORE when `more`, MSG_WAITALL when `wait_all`)
  send_zc,      // zero-copy send; result arrives first, buffer is reusable only after `notified` is set
  recv,         // recv(fd, buf, len, 0)
  sendmsg,      // sendmsg(fd, {iov, iov_count}, as send): one frame in pieces
};

// The most pieces one sendmsg may carry (the kernel's UIO_MAXIOV).
inline constexpr size_t kMaxIov = 1024;

struct Completion {
  Op op = Op::read;
  int fd = -1;
  void* buf = nullptr;
  uint32_t len = 0;
  int64_t offset = -1;
  int buf_index = -1;  // registered buffer index for read_fixed/write_fixed/send_zc from a registered buffer
  bool more = false;   // send/send_zc: more bytes of the same message follow at once (MSG_MORE): the kernel
                       // holds a short piece back to fill segments instead of sending it on its own
  // send/send_zc/sendmsg: MSG_WAITALL. io_uring then goes on sending as the socket takes more and completes
  // the operation once all of it is in (or the socket fails); without it the operation completes with what
  // the socket took at once. Only for a plain TCP socket (socket_sends_may_wait_all): kTLS refuses the flag
  // (EOPNOTSUPP). A blocking TCP send ignores it.
  bool wait_all = false;
  int file_index = -1;  // >= 0: use registered file `file_index` (register_files) instead of fd
  const iovec* iov = nullptr;  // sendmsg: the pieces (at most kMaxIov), the caller's until reaped
  unsigned iov_count = 0;
  uint64_t user = 0;   // caller's tag, untouched by the ring
  // Filled in by the ring:
  int32_t result = 0;    // bytes transferred (>= 0) or -errno
  bool done = false;     // the result is valid
  bool notified = true;  // send_zc: the kernel no longer references buf (always true for other ops)
  msghdr msg{};          // sendmsg: filled by the ring from iov (io_uring reads it until the operation ends)
};

struct RingOptions {
  unsigned entries = 64;  // submission queue depth (power of two, 1..4096)
};

enum class Backend : uint8_t { uring, syscall };
const char* backend_name(Backend backend);

struct ProbeResult {
  bool uring_available = false;
  std::string uring_unavailable_reason;  // e.g. "io_uring_setup: Operation not permitted
                                         // (kernel.io_uring_disabled=2)"
  bool send_zc = false;                  // IORING_OP_SEND_ZC supported
  bool read_fixed = false;               // IORING_OP_READ_FIXED supported
};
// Probes io_uring once per process (cached).
const ProbeResult& probe();

// Which backend to use: DSTX_IO=uring|syscall forces one (uring forced but unavailable is an error with the
// reason); otherwise uring when the probe succeeded. `why` receives a one-line explanation of the choice.
// Throws std::runtime_error for a bad DSTX_IO value or a forced backend that is unavailable.
Backend choose_backend(std::string* why);

class Ring {
 public:
  virtual ~Ring() = default;
  virtual Backend backend() const = 0;

  // Queues one operation. Returns false (and queues nothing) when the submission queue is full: call
  // submit() or wait() first. The Completion must stay alive until reap() returns it (and, for send_zc,
  // until `notified`).
  virtual bool queue(Completion* c) = 0;

  // Submits what is queued and waits until at least `min_complete` completions are ready to reap
  // (min_complete may be 0). Returns 0 or -errno. EINTR is retried inside. On failure nothing stays queued:
  // what the kernel did not take comes back from reap() with an error (-ENOMEM when it lacked memory), so
  // that no later submission runs it on a buffer its caller has given up.
  virtual int submit(unsigned min_complete) = 0;

  // Hands back up to out.size() finished completions (each with `done` set). Never blocks.
  virtual size_t reap(std::span<Completion*> out) = 0;

  // Registers buffers for read_fixed/write_fixed (replaces any earlier registration). 0 or -errno.
  // The syscall backend accepts and ignores them (fixed ops become plain ones).
  virtual int register_buffers(std::span<const iovec> buffers) = 0;

  // Registers files ("fixed files"): an operation with file_index >= 0 then names files[file_index] instead
  // of its fd, and io_uring skips looking the fd up and taking a reference on it per operation. Replaces any
  // earlier registration (an empty span unregisters); -1 entries are empty slots. Only with nothing in
  // flight. 0 or -errno. The syscall backend keeps the table and performs the operation on that fd.
  virtual int register_files(std::span<const int> fds) = 0;
  // Points registered slot `index` at another fd (e.g. a reconnected socket; -1 empties it). 0 or -errno.
  virtual int update_file(unsigned index, int fd) = 0;

  // Operations queued or in flight that have not yet been reaped (includes send_zc awaiting notification).
  virtual unsigned in_flight() const = 0;
};

// For tests: while above zero, each io_uring submission fails as when the kernel is short of memory
// (EAGAIN from io_uring_enter), and counts down.
extern std::atomic<int> test_failing_submissions;

// Makes a ring of the given backend. Throws std::system_error naming the failing call.
std::unique_ptr<Ring> make_ring(Backend backend, const RingOptions& options = {});

// Synchronous helpers on top of a ring (queue one, submit, reap it). They loop over short transfers, so the
// whole range is transferred unless an error or EOF occurs. Return bytes transferred or -errno.
// read_full stops early only at EOF (returns the short count).
int64_t read_full(Ring& ring, int fd, void* buf, size_t len, int64_t offset);
int64_t write_full(Ring& ring, int fd, const void* buf, size_t len, int64_t offset);
int64_t send_full(Ring& ring, int fd, const void* buf, size_t len);
// Sends every byte of `pieces`, in order, kMaxIov pieces per sendmsg (MSG_MORE on all but the last batch).
// Consumes the pieces as they go (a piece sent is left empty, a piece sent in part is trimmed). Returns the
// bytes sent or -errno.
int64_t sendmsg_full(Ring& ring, int fd, std::span<iovec> pieces);
// `n` more bytes of `pieces` went out, from pieces[*at] on: empties the pieces they cover and trims the one they
// end in, and moves *at past the emptied ones.
void consume_pieces(std::span<iovec> pieces, size_t* at, size_t n);
// Receives exactly len bytes; returns len, 0 on EOF before the first byte, -EPIPE (short) on EOF mid-way,
// or -errno. file_index >= 0: receive through that registered file (which must be fd's socket; fd is still
// used for socket options and polls).
int64_t recv_full(Ring& ring, int fd, void* buf, size_t len, int file_index = -1);
// read_full without a ring: pread() on the calling thread. For files in memory (tmpfs), where io_uring would
// hand every read to an async worker thread (shmem cannot say "would block"), only to copy the same bytes.
int64_t pread_full(int fd, void* buf, size_t len, int64_t offset);

}  // namespace dstx::io
