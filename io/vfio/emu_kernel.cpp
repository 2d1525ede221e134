#include "io/vfio/emu_kernel.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "io/vfio/mig_fsm.h"

namespace dstx::io::vfio {
namespace {

using Clock = std::chrono::steady_clock;
using S = MigState;

constexpr uint64_t kRegionOffset = 1ull << 20;  // the v1 migration region's offset in the device fd
constexpr uint64_t kHeaderPage = 4096;          // the region's trapped header page; the data section follows
constexpr uint64_t kSectionMin = 64 << 10;
constexpr size_t kPumpBytes = 256 << 10;  // a driver thread moves this much per step
constexpr int kPollSliceMs = 5;           // waits re-check the session this often
constexpr int kPipeBytes = 1 << 20;
constexpr size_t kTraceMax = 100000;
constexpr uint32_t kMigrationRegionIndex = kPciNumRegions;  // the first device-specific index
constexpr std::byte kPoison{0xA5};  // what a consumed data section holds until it is refilled

struct SaveSession {
  uint64_t gen = 0;
  int user_fd = -1;    // pipe read end: the data_fd the user reads
  int driver_fd = -1;  // pipe write end, non-blocking, written by the feeder
  std::thread feeder;
  std::atomic<bool> stop{false};
  bool idle = false;          // the pre-copy pass is produced and written: nothing more until a new pass
  bool end_reported = false;  // the pass end was reported (ENOMSG) since the pass finished
  bool broken = false;        // the feeder could not write (the user closed the data_fd)
  uint64_t consumed = 0;
  // Produced by the feeder but not yet in the pipe (it writes without the device lock): still the user's to
  // read, so PRECOPY_INFO and the stop-copy estimate count it with the pipe's bytes. A write is subtracted
  // after it lands, so for a moment its bytes count twice: an estimate may run over, never short.
  std::atomic<uint64_t> in_transit{0};
};

struct LoadSession {
  uint64_t gen = 0;
  int user_fd = -1;    // pipe write end: the data_fd the user writes
  int driver_fd = -1;  // pipe read end, non-blocking, drained by the consumer
  // Wakes the consumer when it is told to stop or drain (an eventfd; -1 if none could be made: it then
  // notices within kPollSliceMs). Without it, leaving RESUMING took up to a poll slice of idle waiting,
  // counted in every emulated migration's downtime.
  int wake_fd = -1;
  std::thread consumer;
  std::atomic<bool> stop{false};
  std::atomic<bool> drain{false};
  uint64_t written = 0;
};

struct Device {
  Device(int i, const EmuDeviceConfig& c) : id(i), cfg(c), st(c.state), rng(c.state.seed * 31 + 7) {}
  const int id;
  const EmuDeviceConfig cfg;
  std::mutex mu;
  std::condition_variable cv;
  EmuState st;
  EmuCounters counters;
  bool trace = false;
  std::string cdev_path, group_path, name;
  bool group_open = false;
  int bound_fd = -1;   // the cdev fd bound to an iommufd
  int device_fds = 0;  // open device fds, cdev or group
  int group_device_fds = 0;
  // v2
  S state = S::running;
  uint64_t flags = 0;
  std::unique_ptr<SaveSession> save;
  std::unique_ptr<LoadSession> load;
  uint64_t next_gen = 1;
  // v1
  uint32_t v1 = kV1Running;
  int region_fd = -1;           // memfd holding the region at kRegionOffset
  std::byte* region = nullptr;  // the driver's own mapping of the region
  uint64_t region_size = 0;
  uint64_t section_size = 0;
  std::vector<std::pair<uint64_t, uint64_t>> areas;  // mmap'able (offset, size) within the region
  bool txn_ready = false;
  uint64_t txn_offset = 0;
  uint64_t txn_size = 0;
  bool resume_offset_given = false;
  uint64_t v1_read_bytes = 0;
  uint64_t v1_written_bytes = 0;
  std::mt19937_64 rng;

  const EmuFault* fault(EmuFault::Kind kind) const {
    for (const EmuFault& f : cfg.faults) {
      if (f.kind == kind) return &f;
    }
    return nullptr;
  }
  const EmuFault* transition_fault(EmuFault::Kind kind, S from, S into) const {
    for (const EmuFault& f : cfg.faults) {
      if (f.kind == kind && f.state == into && (!f.from || *f.from == from)) return &f;
    }
    return nullptr;
  }
  void note(const char* what) {
    if (trace && counters.trace.size() < kTraceMax) counters.trace.emplace_back(what);
  }
  int refuse(int err, std::string why) {
    counters.last_error = std::move(why);
    return -err;
  }
};

bool running_state(S s) {
  return s == S::running || s == S::running_p2p || s == S::pre_copy || s == S::pre_copy_p2p;
}

// The v2 state a v1 device_state corresponds to, for transition faults.
S v1_as_state(uint32_t bits) {
  switch (bits & kV1Mask) {
    case kV1Running:
      return S::running;
    case kV1Saving | kV1Running:
      return S::pre_copy;
    case kV1Saving:
      return S::stop_copy;
    case kV1Resuming:
      return S::resuming;
    case kV1Stop:
      return S::stop;
    default:
      return S::error;
  }
}

int fionread(int fd) {
  int n = 0;
  return ::ioctl(fd, FIONREAD, &n) < 0 ? 0 : n;
}

// Writes all of buf to a non-blocking fd, waiting in slices so `stop` is noticed. False on stop or error.
bool write_all(int fd, const std::byte* buf, size_t len, const std::atomic<bool>& stop,
               std::atomic<uint64_t>* in_transit = nullptr) {
  while (len > 0) {
    if (stop) return false;
    const ssize_t n = ::write(fd, buf, len);
    if (n > 0) {
      buf += n;
      len -= size_t(n);
      if (in_transit) in_transit->fetch_sub(uint64_t(n));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      pollfd p{.fd = fd, .events = POLLOUT, .revents = 0};
      ::poll(&p, 1, kPollSliceMs);
      continue;
    }
    return false;
  }
  return true;
}

// The saving driver thread: produces the stream into the pipe. In pre-copy it stops at the end of each
// pass and waits for the reader to ask for the next one; in stop-copy it closes the pipe at the end (EOF).
void feeder_main(Device* d, SaveSession* s) {
  // A reader that closes the data_fd early makes write() fail with EPIPE; the signal must not kill the
  // process, so it stays blocked (and pending, harmlessly) in this thread only.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::vector<std::byte> buf(kPumpBytes);
  std::unique_lock lk(d->mu);
  while (!s->stop) {
    const bool stopcopy = d->st.save_mode() == EmuState::Mode::stopcopy;
    const bool more = stopcopy ? !d->st.save_eof() : !d->st.save_pass_done();
    if (!more) {
      if (stopcopy) {
        ::close(s->driver_fd);  // end of stream for the reader
        s->driver_fd = -1;
        break;
      }
      s->idle = true;
      d->cv.wait(lk);
      continue;
    }
    d->st.advance(Clock::now());
    const size_t n = d->st.save_produce(buf);
    if (n == 0) continue;
    s->idle = false;
    s->in_transit = n;
    lk.unlock();
    if (d->cfg.delay_us) std::this_thread::sleep_for(std::chrono::microseconds(d->cfg.delay_us));
    const bool ok = write_all(s->driver_fd, buf.data(), n, s->stop, &s->in_transit);
    lk.lock();
    s->in_transit = 0;
    if (!ok) {
      if (!s->stop) s->broken = true;
      break;
    }
  }
}

// The resuming driver thread: drains the pipe into the loader until told to stop, or to drain and the pipe
// is empty, or the user closes the data_fd.
void consumer_main(Device* d, LoadSession* s) {
  std::vector<std::byte> buf(kPumpBytes);
  for (;;) {
    pollfd p[2] = {{.fd = s->driver_fd, .events = POLLIN, .revents = 0},
                   {.fd = s->wake_fd, .events = POLLIN, .revents = 0}};
    ::poll(p, s->wake_fd >= 0 ? 2 : 1, kPollSliceMs);
    const ssize_t n = ::read(s->driver_fd, buf.data(), buf.size());
    if (n > 0) {
      std::lock_guard lk(d->mu);
      d->st.load_consume(std::span<const std::byte>(buf.data(), size_t(n)));
      continue;
    }
    if (n == 0) break;
    if (errno == EAGAIN || errno == EINTR) {
      if (s->stop || s->drain) break;
      continue;
    }
    break;
  }
}

}  // namespace

// ---------------------------------------------------------------- fault names

const char* emu_fault_kind_name(EmuFault::Kind kind) {
  switch (kind) {
    case EmuFault::Kind::reject_state:
      return "reject-state";
    case EmuFault::Kind::eio_read:
      return "eio-read";
    case EmuFault::Kind::eio_write:
      return "eio-write";
    case EmuFault::Kind::transition_fail:
      return "transition-fail";
    case EmuFault::Kind::transition_error:
      return "transition-error";
    case EmuFault::Kind::short_read:
      return "short-read";
    case EmuFault::Kind::bad_range:
      return "bad-range";
  }
  return "?";
}

bool emu_fault_kind_from_name(std::string_view name, EmuFault::Kind* out) {
  for (EmuFault::Kind k : {EmuFault::Kind::reject_state, EmuFault::Kind::eio_read, EmuFault::Kind::eio_write,
                           EmuFault::Kind::transition_fail, EmuFault::Kind::transition_error,
                           EmuFault::Kind::short_read, EmuFault::Kind::bad_range}) {
    if (name == emu_fault_kind_name(k)) {
      *out = k;
      return true;
    }
  }
  return false;
}

bool emu_fault_takes_bytes(EmuFault::Kind kind) {
  return kind == EmuFault::Kind::eio_read || kind == EmuFault::Kind::eio_write;
}

bool emu_fault_takes_state(EmuFault::Kind kind) {
  return kind == EmuFault::Kind::transition_fail || kind == EmuFault::Kind::transition_error;
}

// ---------------------------------------------------------------- the kernel

struct FdObj {
  enum class Kind : uint8_t { iommufd, container, group, device, save_data, load_data } kind = Kind::iommufd;
  std::shared_ptr<Device> dev;
  uint32_t next_ioas = 1;  // iommufd
  std::vector<uint32_t> ioas;
  int group_fd = -1;  // container: the group set on it
  bool iommu_set = false;
  int container_fd = -1;  // group
  bool cdev = false;      // device: opened as a cdev (must bind before use)
  bool bound = false;
  bool attached = false;
  uint64_t gen = 0;  // data fds: the session they belong to
};

struct EmuKernel::Impl {
  std::mutex mu;  // the fd table and device list; taken before a device's mutex, never after
  std::map<int, FdObj> fds;
  std::vector<std::shared_ptr<Device>> devices;

  std::shared_ptr<Device> device(int id) {
    std::lock_guard lk(mu);
    if (id < 0 || size_t(id) >= devices.size())
      throw std::out_of_range("no emulated device " + std::to_string(id));
    return devices[size_t(id)];
  }

  // ---- sessions (device mutex held through `lk`; it is released while a driver thread is joined)

  static int start_save(Device& d, EmuState::Mode mode, int* new_fd) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) < 0) return -errno;
    ::fcntl(p[1], F_SETPIPE_SZ, kPipeBytes);
    ::fcntl(p[1], F_SETFL, O_NONBLOCK);
    auto s = std::make_unique<SaveSession>();
    s->gen = d.next_gen++;
    s->user_fd = p[0];
    s->driver_fd = p[1];
    d.st.save_begin(mode);
    d.counters.precopy_passes = mode == EmuState::Mode::precopy ? 1 : 0;
    SaveSession* raw = s.get();
    d.save = std::move(s);
    d.save->feeder = std::thread(feeder_main, &d, raw);
    *new_fd = p[0];
    return 0;
  }

  static void end_save(Device& d, std::unique_lock<std::mutex>& lk) {
    if (!d.save) return;
    std::unique_ptr<SaveSession> s = std::move(d.save);
    s->stop = true;
    d.cv.notify_all();
    lk.unlock();
    if (s->feeder.joinable()) s->feeder.join();
    lk.lock();
    if (s->driver_fd >= 0) ::close(s->driver_fd);
    d.st.save_end();
    // s->user_fd is the user's: it stays open until closed, and answers ENODEV from now on.
  }

  static int start_load(Device& d, int* new_fd) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) < 0) return -errno;
    ::fcntl(p[1], F_SETPIPE_SZ, kPipeBytes);
    ::fcntl(p[0], F_SETFL, O_NONBLOCK);
    auto s = std::make_unique<LoadSession>();
    s->gen = d.next_gen++;
    s->user_fd = p[1];
    s->driver_fd = p[0];
    s->wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    d.st.load_begin();
    LoadSession* raw = s.get();
    d.load = std::move(s);
    d.load->consumer = std::thread(consumer_main, &d, raw);
    *new_fd = p[1];
    return 0;
  }

  static void end_load(Device& d, std::unique_lock<std::mutex>& lk, bool drain) {
    if (!d.load) return;
    std::unique_ptr<LoadSession> s = std::move(d.load);
    (drain ? s->drain : s->stop) = true;
    if (s->wake_fd >= 0) {
      const uint64_t one = 1;
      (void)!::write(s->wake_fd, &one, sizeof one);
    }
    lk.unlock();
    if (s->consumer.joinable()) s->consumer.join();
    lk.lock();
    ::close(s->driver_fd);
    if (s->wake_fd >= 0) ::close(s->wake_fd);
  }

  static void reset(Device& d, std::unique_lock<std::mutex>& lk) {
    end_save(d, lk);
    end_load(d, lk, false);
    d.st.reset_to_zero();
    d.state = S::running;
    d.v1 = kV1Running;
    d.txn_ready = false;
    d.resume_offset_given = false;
    d.st.set_running(true, Clock::now());
    ++d.counters.resets;
  }

  // The last device fd closed: like a real driver, the migration session ends and the device runs.
  static void device_closed(Device& d, std::unique_lock<std::mutex>& lk) {
    end_save(d, lk);
    end_load(d, lk, false);
    d.st.load_abort();
    d.state = S::running;
    d.v1 = kV1Running;
    d.txn_ready = false;
    d.resume_offset_given = false;
    d.st.set_running(true, Clock::now());
  }

  // ---- v2 transitions

  static int v2_step(Device& d, std::unique_lock<std::mutex>& lk, S next, int* new_fd) {
    const S cur = d.state;
    if (!mig_arc_required(cur, next, d.flags)) {
      return d.refuse(EINVAL, std::string("arc ") + mig_state_name(cur) + " -> " + mig_state_name(next) +
                                  " is not one a driver implements");
    }
    if (d.transition_fault(EmuFault::Kind::transition_fail, cur, next)) {
      return d.refuse(EIO, std::string("transition into ") + mig_state_name(next) + " failed (fault)");
    }
    if (d.transition_fault(EmuFault::Kind::transition_error, cur, next)) {
      end_save(d, lk);
      end_load(d, lk, false);
      d.state = S::error;
      d.st.set_running(false, Clock::now());
      return d.refuse(EIO,
                      std::string("transition into ") + mig_state_name(next) + " broke the device (fault)");
    }
    int rc = 0;
    if ((cur == S::running && next == S::pre_copy) || (cur == S::running_p2p && next == S::pre_copy_p2p)) {
      rc = start_save(d, EmuState::Mode::precopy, new_fd);
    } else if (cur == S::stop && next == S::stop_copy) {
      rc = start_save(d, EmuState::Mode::stopcopy, new_fd);
    } else if ((cur == S::pre_copy || cur == S::pre_copy_p2p) && next == S::stop_copy) {
      // The saving group shares one session: the stream goes on, now with everything left.
      if (d.save) {
        d.st.advance(Clock::now());
        d.st.save_set_mode(EmuState::Mode::stopcopy);
        d.save->idle = false;
        d.cv.notify_all();
      }
    } else if ((cur == S::pre_copy && next == S::running) ||
               (cur == S::pre_copy_p2p && next == S::running_p2p) ||
               (cur == S::stop_copy && next == S::stop)) {
      end_save(d, lk);
    } else if (cur == S::stop && next == S::resuming) {
      rc = start_load(d, new_fd);
    } else if (cur == S::resuming && next == S::stop) {
      if (!d.load) return d.refuse(EINVAL, "no resuming session to complete");
      end_load(d, lk, true);
      std::string why = d.st.load_finish();
      if (why.empty() && d.fault(EmuFault::Kind::reject_state)) why = "state rejected (fault reject-state)";
      if (!why.empty()) return d.refuse(EINVAL, why);
    }
    if (rc < 0) return rc;
    d.state = next;
    d.st.set_running(running_state(next), Clock::now());
    return 0;
  }

  static int v2_set_state(Device& d, std::unique_lock<std::mutex>& lk, S target, int* new_fd) {
    *new_fd = -1;
    if (uint32_t(target) >= kMigStateCount || !mig_state_supported(target, d.flags)) {
      return d.refuse(EINVAL, std::string("state ") + mig_state_name(target) + " is not supported");
    }
    while (d.state != target) {
      S next;
      if (!mig_next_state(d.state, target, d.flags, &next)) {
        return d.refuse(
            EINVAL, std::string("no path from ") + mig_state_name(d.state) + " to " + mig_state_name(target));
      }
      // Only the final arc may open a session (the table guarantees it); an earlier one would leak its fd.
      if (*new_fd >= 0) return d.refuse(EINVAL, "a session opened before the final arc");
      const int rc = v2_step(d, lk, next, new_fd);
      if (rc < 0) return rc;
    }
    return 0;
  }

  // What the user has yet to read of what the feeder produced: in the pipe, or on its way there.
  static uint64_t pipe_bytes(const Device& d) {
    return d.save ? uint64_t(fionread(d.save->user_fd)) + d.save->in_transit.load() : 0;
  }

  // ---- v1 region

  void poison(Device& d, uint64_t offset, uint64_t len) { std::memset(d.region + offset, int(kPoison), len); }

  int64_t v1_prepare(Device& d) {
    if (d.cfg.delay_us) std::this_thread::sleep_for(std::chrono::microseconds(d.cfg.delay_us));
    d.st.advance(Clock::now());
    if (d.st.save_mode() == EmuState::Mode::precopy && d.st.save_pass_done() && d.st.save_has_dirty()) {
      d.st.save_next_pass();
      ++d.counters.precopy_passes;
    }
    if (const EmuFault* f = d.fault(EmuFault::Kind::eio_read); f && d.v1_read_bytes >= f->at) {
      return d.refuse(EIO, "saving failed (fault eio-read)");
    }
    const uint64_t low = std::max<uint64_t>(1, d.section_size / 8);
    uint64_t size = low + d.rng() % (d.section_size - low + 1);
    if (const EmuFault* f = d.fault(EmuFault::Kind::eio_read)) size = std::min(size, f->at - d.v1_read_bytes);
    const uint64_t slots = (d.section_size - size) / kEmuPageBytes + 1;
    const uint64_t offset = kHeaderPage + (d.rng() % slots) * kEmuPageBytes;
    const size_t n = d.st.save_produce(std::span<std::byte>(d.region + offset, size));
    d.txn_ready = true;
    d.txn_offset = offset;
    d.txn_size = n;
    d.v1_read_bytes += n;
    d.counters.saved_bytes += n;
    d.counters.save_transactions.push_back(n);
    return 0;
  }

  int64_t v1_header_read(Device& d, void* buf, size_t len, uint64_t field) {
    const bool saving = d.v1 & kV1Saving;
    uint64_t value = 0;
    size_t width = 8;
    if (field == kV1StateOffset && len == 4) {
      d.note("device_state");
      value = d.v1;
      width = 4;
    } else if (field == kV1PendingOffset && len == 8) {
      d.note("pending_bytes");
      if (saving) {
        if (d.txn_ready) {  // the previous transaction is consumed: the section may be reused
          poison(d, d.txn_offset, d.txn_size);
          d.txn_ready = false;
        }
        if (const EmuFault* f = d.fault(EmuFault::Kind::eio_read); f && d.v1_read_bytes >= f->at) {
          return d.refuse(EIO, "saving failed (fault eio-read)");
        }
        d.st.advance(Clock::now());
        value = d.st.save_pending_now();
      }
      if (d.fault(EmuFault::Kind::short_read)) width = 4;
    } else if (field == kV1DataOffsetOffset && len == 8) {
      d.note("data_offset");
      if (saving) {
        if (!d.txn_ready) {
          if (const int64_t rc = v1_prepare(d); rc < 0) return rc;
        }
        value = d.fault(EmuFault::Kind::bad_range) ? d.region_size : d.txn_offset;
      } else if (d.v1 & kV1Resuming) {
        d.resume_offset_given = true;
        value = kHeaderPage;
      } else {
        return d.refuse(EINVAL, "data_offset read while neither saving nor resuming");
      }
    } else if (field == kV1DataSizeOffset && len == 8) {
      d.note("data_size");
      if (!saving || !d.txn_ready) return d.refuse(EINVAL, "data_size read before data_offset");
      value = d.txn_size;
    } else {
      return d.refuse(EINVAL, "bad access to the migration region header");
    }
    std::memcpy(buf, &value, width);
    return int64_t(width);
  }

  int64_t v1_header_write(Device& d, std::unique_lock<std::mutex>& lk, const void* buf, size_t len,
                          uint64_t field) {
    if (field == kV1StateOffset && len == 4) {
      d.note("write device_state");
      uint32_t value;
      std::memcpy(&value, buf, 4);
      const int rc = v1_set_state(d, lk, value);
      return rc < 0 ? rc : 4;
    }
    if (field == kV1DataSizeOffset && len == 8) {
      d.note("write data_size");
      uint64_t size;
      std::memcpy(&size, buf, 8);
      if (!(d.v1 & kV1Resuming) || !d.resume_offset_given) {
        return d.refuse(EINVAL, "data_size written without reading data_offset while resuming");
      }
      if (size > d.region_size - kHeaderPage)
        return d.refuse(EINVAL, "data_size larger than the data section");
      if (const EmuFault* f = d.fault(EmuFault::Kind::eio_write); f && d.v1_written_bytes + size > f->at) {
        return d.refuse(EIO, "resuming failed (fault eio-write)");
      }
      d.resume_offset_given = false;
      const bool ok = d.st.load_consume(std::span<const std::byte>(d.region + kHeaderPage, size));
      poison(d, kHeaderPage, size);
      d.v1_written_bytes += size;
      d.counters.loaded_bytes += size;
      d.counters.load_transactions.push_back(size);
      if (!ok) return d.refuse(EINVAL, d.st.load_error());
      return 8;
    }
    return d.refuse(EINVAL, "bad write to the migration region header");
  }

  static int v1_set_state(Device& d, std::unique_lock<std::mutex>& lk, uint32_t next) {
    const uint32_t cur = d.v1;
    if (next & ~kV1Mask) return d.refuse(EINVAL, "unknown device_state bits");
    if (v1_state_is_error(cur))
      return d.refuse(EINVAL, "the device is in the error state: only a reset leaves it");
    if (!v1_state_valid(next)) return d.refuse(EINVAL, "invalid device_state " + v1_state_name(next));
    if (next == cur) return 0;
    const bool was_saving = cur & kV1Saving, saving = next & kV1Saving;
    if ((cur & kV1Resuming) && saving) return d.refuse(EINVAL, "RESUMING -> SAVING");
    if (was_saving && (next & kV1Resuming)) return d.refuse(EINVAL, "SAVING -> RESUMING");
    if (was_saving && saving && !(cur & kV1Running) && (next & kV1Running)) {
      return d.refuse(EINVAL, "stop-and-copy cannot return to pre-copy");
    }
    const S from = v1_as_state(cur), into = v1_as_state(next);
    if (d.transition_fault(EmuFault::Kind::transition_fail, from, into)) {
      return d.refuse(EIO, "device_state " + v1_state_name(next) + " failed (fault)");
    }
    if (d.transition_fault(EmuFault::Kind::transition_error, from, into)) {
      d.st.save_end();
      d.txn_ready = false;
      d.v1 = kV1Error;
      d.st.set_running(false, Clock::now());
      return d.refuse(EIO, "device_state " + v1_state_name(next) + " broke the device (fault)");
    }
    d.st.advance(Clock::now());
    if (!was_saving && saving) {
      d.st.save_begin((next & kV1Running) ? EmuState::Mode::precopy : EmuState::Mode::stopcopy);
      d.counters.precopy_passes = (next & kV1Running) ? 1 : 0;
      d.txn_ready = false;
      d.v1_read_bytes = 0;
    } else if (was_saving && saving) {
      d.st.save_set_mode(EmuState::Mode::stopcopy);
    } else if (was_saving && !saving) {
      d.st.save_end();
      d.txn_ready = false;
    }
    if (!(cur & kV1Resuming) && (next & kV1Resuming)) {
      d.st.load_begin();
      d.resume_offset_given = false;
      d.v1_written_bytes = 0;
    } else if ((cur & kV1Resuming) && !(next & kV1Resuming)) {
      std::string why = d.st.load_finish();
      if (why.empty() && d.fault(EmuFault::Kind::reject_state)) why = "state rejected (fault reject-state)";
      if (!why.empty()) {
        d.v1 = kV1Error;  // v1 drivers signal a failed load with the error state
        d.st.set_running(false, Clock::now());
        return d.refuse(EINVAL, why);
      }
    }
    d.v1 = next;
    d.st.set_running(next & kV1Running, Clock::now());
    (void)lk;
    return 0;
  }

  // ---- ioctls

  int region_info(Device& d, void* arg) {
    vfio_region_info in;
    std::memcpy(&in, arg, sizeof in);
    if (in.argsz < sizeof(vfio_region_info)) return -EINVAL;
    const bool v1 = d.cfg.protocol == Protocol::v1;
    const uint32_t regions = v1 ? kPciNumRegions + 1 : kPciNumRegions;
    if (in.index >= regions) return -EINVAL;
    std::vector<std::byte> out(sizeof(vfio_region_info));
    vfio_region_info info{};
    info.argsz = in.argsz;
    info.index = in.index;
    auto add_cap = [&](const void* cap, size_t bytes) {
      const size_t at = out.size();
      out.resize(at + bytes);
      std::memcpy(out.data() + at, cap, bytes);
      return at;
    };
    std::vector<size_t> caps;
    if (in.index == VFIO_PCI_BAR0_REGION_INDEX) {
      // A decoy: a type capability of another kind, so a client must check type and subtype.
      info.size = 4096;
      info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_CAPS;
      info.offset = 0;
      vfio_region_info_cap_type t{};
      t.header.id = VFIO_REGION_INFO_CAP_TYPE;
      t.header.version = 1;
      t.type = VFIO_REGION_TYPE_GFX;
      t.subtype = 1;
      caps.push_back(add_cap(&t, sizeof t));
    } else if (in.index == VFIO_PCI_CONFIG_REGION_INDEX) {
      info.size = 256;
      info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
      info.offset = 0;
    } else if (v1 && in.index == kMigrationRegionIndex) {
      info.size = d.region_size;
      info.offset = kRegionOffset;
      info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_CAPS;
      if (!d.areas.empty()) {
        info.flags |= VFIO_REGION_INFO_FLAG_MMAP;
        std::vector<std::byte> sp(sizeof(vfio_region_info_cap_sparse_mmap) +
                                  d.areas.size() * sizeof(vfio_region_sparse_mmap_area));
        vfio_region_info_cap_sparse_mmap head{};
        head.header.id = VFIO_REGION_INFO_CAP_SPARSE_MMAP;
        head.header.version = 1;
        head.nr_areas = uint32_t(d.areas.size());
        std::memcpy(sp.data(), &head, sizeof head);
        for (size_t i = 0; i < d.areas.size(); ++i) {
          vfio_region_sparse_mmap_area a{};
          a.offset = d.areas[i].first;
          a.size = d.areas[i].second;
          std::memcpy(sp.data() + sizeof head + i * sizeof a, &a, sizeof a);
        }
        caps.push_back(add_cap(sp.data(), sp.size()));
      }
      vfio_region_info_cap_type t{};
      t.header.id = VFIO_REGION_INFO_CAP_TYPE;
      t.header.version = 1;
      t.type = VFIO_REGION_TYPE_MIGRATION_DEPRECATED;
      t.subtype = VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED;
      caps.push_back(add_cap(&t, sizeof t));
    }
    // Chain the capabilities: offsets are from the start of the info buffer.
    for (size_t i = 0; i < caps.size(); ++i) {
      const uint32_t next = i + 1 < caps.size() ? uint32_t(caps[i + 1]) : 0;
      std::memcpy(out.data() + caps[i] + offsetof(vfio_info_cap_header, next), &next, sizeof next);
    }
    if (!caps.empty()) {
      if (in.argsz < out.size()) {
        info.argsz = uint32_t(out.size());  // too small for the chain: say how big, give no chain
        info.cap_offset = 0;
        std::memcpy(arg, &info, sizeof info);
        return 0;
      }
      info.cap_offset = uint32_t(caps[0]);
    }
    std::memcpy(out.data(), &info, sizeof info);
    std::memcpy(arg, out.data(), out.size());
    return 0;
  }

  static int check_feature(uint32_t flags, size_t argsz, uint32_t supported, size_t minsz) {
    if ((flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET)) & ~supported) return -EINVAL;
    if (flags & VFIO_DEVICE_FEATURE_PROBE) return 0;
    if (!(flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET))) return -EINVAL;
    if (argsz < minsz) return -EINVAL;
    return 1;
  }

  // Returns >= 0 or -errno; a new session fd goes to *new_fd.
  int feature(Device& d, std::unique_lock<std::mutex>& lk, void* arg, int* new_fd) {
    vfio_device_feature head;
    std::memcpy(&head, arg, sizeof head);
    if (head.argsz < sizeof head) return -EINVAL;
    const uint32_t known = VFIO_DEVICE_FEATURE_MASK | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET |
                           VFIO_DEVICE_FEATURE_PROBE;
    if (head.flags & ~known) return -EINVAL;
    if (!(head.flags & VFIO_DEVICE_FEATURE_PROBE) && (head.flags & VFIO_DEVICE_FEATURE_GET) &&
        (head.flags & VFIO_DEVICE_FEATURE_SET)) {
      return -EINVAL;
    }
    std::byte* data = static_cast<std::byte*>(arg) + sizeof head;
    const size_t data_bytes = head.argsz - sizeof head;
    const bool v2 = d.cfg.protocol == Protocol::v2;
    switch (head.flags & VFIO_DEVICE_FEATURE_MASK) {
      case VFIO_DEVICE_FEATURE_MIGRATION: {
        if (!v2) return -ENOTTY;
        const int rc = check_feature(head.flags, data_bytes, VFIO_DEVICE_FEATURE_GET,
                                     sizeof(vfio_device_feature_migration));
        if (rc != 1) return rc;
        vfio_device_feature_migration m{};
        m.flags = d.flags;
        std::memcpy(data, &m, sizeof m);
        return 0;
      }
      case VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: {
        if (!v2) return -ENOTTY;
        const int rc =
            check_feature(head.flags, data_bytes, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET,
                          sizeof(vfio_device_feature_mig_state));
        if (rc != 1) return rc;
        vfio_device_feature_mig_state m;
        std::memcpy(&m, data, sizeof m);
        int err = 0;
        if (head.flags & VFIO_DEVICE_FEATURE_GET) {
          m.device_state = uint32_t(d.state);
          m.data_fd = -1;
        } else {
          err = v2_set_state(d, lk, S(m.device_state), new_fd);
          m.data_fd = *new_fd;
        }
        std::memcpy(data, &m, sizeof m);
        return err;
      }
      case VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: {
        if (!v2) return -ENOTTY;
        const int rc = check_feature(head.flags, data_bytes, VFIO_DEVICE_FEATURE_GET,
                                     sizeof(vfio_device_feature_mig_data_size));
        if (rc != 1) return rc;
        d.st.advance(Clock::now());
        vfio_device_feature_mig_data_size m{};
        m.stop_copy_length = d.save ? d.st.save_remaining_bytes() + pipe_bytes(d) : d.st.full_stream_bytes();
        std::memcpy(data, &m, sizeof m);
        return 0;
      }
      default:
        return -ENOTTY;
    }
  }
};

// ---------------------------------------------------------------- EmuKernel

EmuKernel::EmuKernel() : impl_(std::make_unique<Impl>()) {}

EmuKernel::~EmuKernel() {
  std::vector<std::shared_ptr<Device>> devices;
  {
    std::lock_guard lk(impl_->mu);
    devices = impl_->devices;
    for (auto& [fd, obj] : impl_->fds) ::close(fd);
    impl_->fds.clear();
  }
  for (auto& d : devices) {
    std::unique_lock lk(d->mu);
    Impl::end_save(*d, lk);
    Impl::end_load(*d, lk, false);
    if (d->region) ::munmap(d->region, d->region_size);
    if (d->region_fd >= 0) ::close(d->region_fd);
  }
}

EmuKernel::Added EmuKernel::add_device(const EmuDeviceConfig& config) {
  std::lock_guard lk(impl_->mu);
  const int id = int(impl_->devices.size());
  auto d = std::make_shared<Device>(id, config);
  char name[32];
  std::snprintf(name, sizeof name, "0000:00:%02x.0", unsigned(id) & 0xff);
  d->name = name;
  d->cdev_path = "/dev/vfio/devices/vfio" + std::to_string(id);
  d->group_path = "/dev/vfio/" + std::to_string(id);
  d->flags = VFIO_MIGRATION_STOP_COPY | (config.p2p ? VFIO_MIGRATION_P2P : 0) |
             (config.precopy ? VFIO_MIGRATION_PRE_COPY : 0);
  if (config.protocol == Protocol::v1) {
    d->section_size = std::max<uint64_t>(
        kSectionMin, (config.section_bytes + kEmuPageBytes - 1) / kEmuPageBytes * kEmuPageBytes);
    d->region_size = kHeaderPage + d->section_size;
    d->region_fd = ::memfd_create("dstx-emu-v1-region", MFD_CLOEXEC);
    if (d->region_fd < 0 || ::ftruncate(d->region_fd, off_t(kRegionOffset + d->region_size)) < 0) {
      throw std::system_error(errno, std::generic_category(), "emulated v1 region memfd");
    }
    void* p = ::mmap(nullptr, d->region_size, PROT_READ | PROT_WRITE, MAP_SHARED, d->region_fd,
                     off_t(kRegionOffset));
    if (p == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "emulated v1 region mmap");
    d->region = static_cast<std::byte*>(p);
    const uint64_t s = d->section_size;
    const auto page_down = [](uint64_t x) { return x / kEmuPageBytes * kEmuPageBytes; };
    switch (config.mmap) {
      case EmuDeviceConfig::Mmap::all:
      case EmuDeviceConfig::Mmap::read_only:
        d->areas = {{kHeaderPage, s}};
        break;
      case EmuDeviceConfig::Mmap::part: {
        const uint64_t first = page_down(s / 2);
        const uint64_t second = page_down(3 * s / 4);
        d->areas = {{kHeaderPage, first}, {kHeaderPage + second, s - second}};
        break;
      }
      case EmuDeviceConfig::Mmap::none:
        break;
    }
  }
  impl_->devices.push_back(d);
  Added added;
  added.id = id;
  added.cdev = DevicePath{DevicePath::Kind::cdev, d->cdev_path, {}};
  added.group = DevicePath{DevicePath::Kind::group, d->group_path, d->name};
  return added;
}

std::string EmuKernel::state_name(int id) {
  auto d = impl_->device(id);
  std::lock_guard lk(d->mu);
  return d->cfg.protocol == Protocol::v2 ? mig_state_name(d->state) : v1_state_name(d->v1);
}

MigState EmuKernel::v2_state(int id) {
  auto d = impl_->device(id);
  std::lock_guard lk(d->mu);
  return d->state;
}

uint32_t EmuKernel::v1_state(int id) {
  auto d = impl_->device(id);
  std::lock_guard lk(d->mu);
  return d->v1;
}

StateDigest EmuKernel::state_digest(int id) {
  auto d = impl_->device(id);
  std::lock_guard lk(d->mu);
  return d->st.digest();
}

EmuCounters EmuKernel::counters(int id) {
  auto d = impl_->device(id);
  std::lock_guard lk(d->mu);
  return d->counters;
}

void EmuKernel::set_trace(int id, bool on) {
  auto d = impl_->device(id);
  std::lock_guard lk(d->mu);
  d->trace = on;
  d->counters.trace.clear();
}

int EmuKernel::open(const std::string& path, int /*flags*/) {
  std::lock_guard lk(impl_->mu);
  FdObj obj;
  std::shared_ptr<Device> dev;
  if (path == "/dev/iommu") {
    obj.kind = FdObj::Kind::iommufd;
  } else if (path == "/dev/vfio/vfio") {
    obj.kind = FdObj::Kind::container;
  } else {
    for (auto& d : impl_->devices) {
      if (path == d->group_path) {
        if (d->group_open) return -EBUSY;
        obj.kind = FdObj::Kind::group;
        dev = d;
      } else if (path == d->cdev_path) {
        obj.kind = FdObj::Kind::device;
        obj.cdev = true;
        dev = d;
      }
    }
    if (!dev) return -ENOENT;
  }
  int fd;
  if (obj.kind == FdObj::Kind::device && dev->cfg.protocol == Protocol::v1) {
    fd = ::fcntl(dev->region_fd, F_DUPFD_CLOEXEC, 0);  // the device fd addresses the region's memfd
  } else {
    fd = ::memfd_create("dstx-emu-node", MFD_CLOEXEC);
  }
  if (fd < 0) return -errno;
  if (dev) {
    std::lock_guard dl(dev->mu);
    if (obj.kind == FdObj::Kind::group) dev->group_open = true;
    if (obj.kind == FdObj::Kind::device) ++dev->device_fds;
  }
  obj.dev = std::move(dev);
  impl_->fds[fd] = std::move(obj);
  return fd;
}

int EmuKernel::close(int fd) {
  std::shared_ptr<Device> closed_device;
  {
    std::lock_guard lk(impl_->mu);
    const auto it = impl_->fds.find(fd);
    if (it == impl_->fds.end()) return -EBADF;
    FdObj obj = std::move(it->second);
    impl_->fds.erase(it);
    if (obj.kind == FdObj::Kind::group) {
      std::lock_guard dl(obj.dev->mu);
      obj.dev->group_open = false;
    } else if (obj.kind == FdObj::Kind::device) {
      std::lock_guard dl(obj.dev->mu);
      if (obj.dev->bound_fd == fd) obj.dev->bound_fd = -1;
      if (!obj.cdev) --obj.dev->group_device_fds;
      if (--obj.dev->device_fds == 0) closed_device = obj.dev;
    }
    ::close(fd);
  }
  if (closed_device) {
    std::unique_lock dl(closed_device->mu);
    Impl::device_closed(*closed_device, dl);
  }
  return 0;
}

int EmuKernel::ioctl(int fd, unsigned long request, void* arg) {
  std::unique_lock lk(impl_->mu);
  const auto it = impl_->fds.find(fd);
  if (it == impl_->fds.end()) return -EBADF;
  FdObj& obj = it->second;
  switch (obj.kind) {
    case FdObj::Kind::iommufd: {
      if (request != IOMMU_IOAS_ALLOC) return -ENOTTY;
      IommuIoasAlloc a;
      std::memcpy(&a, arg, sizeof a);
      if (a.size < sizeof a || a.flags) return -EINVAL;
      a.out_ioas_id = obj.next_ioas++;
      obj.ioas.push_back(a.out_ioas_id);
      std::memcpy(arg, &a, sizeof a);
      return 0;
    }
    case FdObj::Kind::container: {
      if (request == VFIO_GET_API_VERSION) return VFIO_API_VERSION;
      if (request == VFIO_CHECK_EXTENSION) {
        const uintptr_t ext = reinterpret_cast<uintptr_t>(arg);
        return ext == VFIO_TYPE1_IOMMU || ext == VFIO_TYPE1v2_IOMMU ? 1 : 0;
      }
      if (request == VFIO_SET_IOMMU) {
        const uintptr_t type = reinterpret_cast<uintptr_t>(arg);
        if (obj.group_fd < 0) return -EINVAL;  // a group must be set first
        if (type != VFIO_TYPE1_IOMMU && type != VFIO_TYPE1v2_IOMMU) return -EINVAL;
        if (obj.iommu_set) return -EBUSY;
        obj.iommu_set = true;
        return 0;
      }
      return -ENOTTY;
    }
    case FdObj::Kind::group: {
      if (request == VFIO_GROUP_GET_STATUS) {
        vfio_group_status s;
        std::memcpy(&s, arg, sizeof s);
        if (s.argsz < sizeof s) return -EINVAL;
        s.flags = VFIO_GROUP_FLAGS_VIABLE | (obj.container_fd >= 0 ? VFIO_GROUP_FLAGS_CONTAINER_SET : 0);
        std::memcpy(arg, &s, sizeof s);
        return 0;
      }
      if (request == VFIO_GROUP_SET_CONTAINER) {
        int container;
        std::memcpy(&container, arg, sizeof container);
        const auto c = impl_->fds.find(container);
        if (c == impl_->fds.end() || c->second.kind != FdObj::Kind::container) return -EBADF;
        if (obj.container_fd >= 0) return -EINVAL;
        if (c->second.group_fd >= 0) return -EBUSY;  // this emulation keeps one group per container
        obj.container_fd = container;
        c->second.group_fd = fd;
        return 0;
      }
      if (request == VFIO_GROUP_GET_DEVICE_FD) {
        const auto c = impl_->fds.find(obj.container_fd);
        if (obj.container_fd < 0 || c == impl_->fds.end() || !c->second.iommu_set) return -EINVAL;
        const std::string wanted(static_cast<const char*>(arg));
        std::shared_ptr<Device> dev = obj.dev;
        if (wanted != dev->name) return -ENODEV;
        std::lock_guard dl(dev->mu);
        if (dev->bound_fd >= 0) return -EBUSY;
        const int dfd = dev->cfg.protocol == Protocol::v1 ? ::fcntl(dev->region_fd, F_DUPFD_CLOEXEC, 0)
                                                          : ::memfd_create("dstx-emu-device", MFD_CLOEXEC);
        if (dfd < 0) return -errno;
        ++dev->device_fds;
        ++dev->group_device_fds;
        FdObj dobj;
        dobj.kind = FdObj::Kind::device;
        dobj.dev = dev;
        impl_->fds[dfd] = std::move(dobj);
        return dfd;
      }
      return -ENOTTY;
    }
    case FdObj::Kind::save_data: {
      if (request != VFIO_MIG_GET_PRECOPY_INFO) return -ENOTTY;
      std::shared_ptr<Device> dev = obj.dev;
      const uint64_t gen = obj.gen;
      lk.unlock();
      std::lock_guard dl(dev->mu);
      if (!dev->save || dev->save->gen != gen) return -ENODEV;
      if (dev->state != S::pre_copy && dev->state != S::pre_copy_p2p) return -EINVAL;
      vfio_precopy_info info;
      std::memcpy(&info, arg, sizeof info);
      if (info.argsz < sizeof info) return -EINVAL;
      dev->st.advance(Clock::now());
      // Bytes on their way (the record being produced, the pipe) belong to the pass that produced them.
      const uint64_t on_the_way = dev->st.save_in_progress_bytes() + Impl::pipe_bytes(*dev);
      const bool first_pass = dev->st.save_pass() == 0;
      info.initial_bytes = dev->st.save_initial_bytes() + (first_pass ? on_the_way : 0);
      info.dirty_bytes = dev->st.save_dirty_bytes() + (first_pass ? 0 : on_the_way);
      std::memcpy(arg, &info, sizeof info);
      return 0;
    }
    case FdObj::Kind::load_data:
      return -ENOTTY;
    case FdObj::Kind::device:
      break;
  }

  // Device fds.
  std::shared_ptr<Device> dev = obj.dev;
  if (request == VFIO_DEVICE_BIND_IOMMUFD) {
    if (!obj.cdev) return -ENOTTY;
    BindIommufd b;
    std::memcpy(&b, arg, sizeof b);
    if (b.argsz < sizeof b || b.flags) return -EINVAL;
    const auto i = impl_->fds.find(b.iommufd);
    if (i == impl_->fds.end() || i->second.kind != FdObj::Kind::iommufd) return -EBADF;
    std::lock_guard dl(dev->mu);
    if (obj.bound) return -EINVAL;
    if (dev->bound_fd >= 0 || dev->group_device_fds > 0) return -EBUSY;
    dev->bound_fd = fd;
    obj.bound = true;
    b.out_devid = uint32_t(dev->id + 1);
    std::memcpy(arg, &b, sizeof b);
    return 0;
  }
  if (obj.cdev && !obj.bound) return -EINVAL;  // nothing but BIND before binding
  if (request == VFIO_DEVICE_ATTACH_IOMMUFD_PT) {
    if (!obj.cdev) return -ENOTTY;
    AttachIommufdPt a;
    std::memcpy(&a, arg, sizeof a);
    if (a.argsz < sizeof a || a.flags) return -EINVAL;
    bool known = false;
    for (auto& [_, o] : impl_->fds) {
      if (o.kind == FdObj::Kind::iommufd && std::find(o.ioas.begin(), o.ioas.end(), a.pt_id) != o.ioas.end())
        known = true;
    }
    if (!known) return -ENOENT;
    obj.attached = true;
    return 0;
  }
  lk.unlock();
  std::unique_lock dl(dev->mu);
  if (request == VFIO_DEVICE_GET_INFO) {
    vfio_device_info info;
    const size_t minsz = offsetof(vfio_device_info, num_irqs) + sizeof info.num_irqs;
    std::memcpy(&info, arg, minsz);
    if (info.argsz < minsz) return -EINVAL;
    info.flags = VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI;
    info.num_regions = dev->cfg.protocol == Protocol::v1 ? kPciNumRegions + 1 : kPciNumRegions;
    info.num_irqs = VFIO_PCI_NUM_IRQS;
    std::memcpy(arg, &info, minsz);
    return 0;
  }
  if (request == VFIO_DEVICE_GET_REGION_INFO) return impl_->region_info(*dev, arg);
  if (request == VFIO_DEVICE_RESET) {
    Impl::reset(*dev, dl);
    return 0;
  }
  if (request == VFIO_DEVICE_FEATURE) {
    int new_fd = -1;
    const int rc = impl_->feature(*dev, dl, arg, &new_fd);
    if (new_fd >= 0) {
      FdObj data;
      data.kind = dev->save && dev->save->user_fd == new_fd ? FdObj::Kind::save_data : FdObj::Kind::load_data;
      data.dev = dev;
      data.gen = data.kind == FdObj::Kind::save_data ? dev->save->gen : dev->load->gen;
      dl.unlock();
      std::lock_guard relock(impl_->mu);
      impl_->fds[new_fd] = std::move(data);
    }
    return rc;
  }
  return -ENOTTY;
}

int64_t EmuKernel::pread(int fd, void* buf, size_t len, uint64_t offset) {
  std::unique_lock lk(impl_->mu);
  const auto it = impl_->fds.find(fd);
  if (it == impl_->fds.end()) return -EBADF;
  if (it->second.kind != FdObj::Kind::device || (it->second.cdev && !it->second.bound)) return -EINVAL;
  std::shared_ptr<Device> dev = it->second.dev;
  lk.unlock();
  if (dev->cfg.protocol != Protocol::v1 || offset < kRegionOffset) return -EINVAL;
  const uint64_t at = offset - kRegionOffset;
  std::unique_lock dl(dev->mu);
  if (at < kHeaderPage) return impl_->v1_header_read(*dev, buf, len, at);
  if (at >= dev->region_size || len > dev->region_size - at) return -EINVAL;
  dl.unlock();
  const ssize_t n = ::pread(fd, buf, len, off_t(offset));
  return n < 0 ? -errno : n;
}

int64_t EmuKernel::pwrite(int fd, const void* buf, size_t len, uint64_t offset) {
  std::unique_lock lk(impl_->mu);
  const auto it = impl_->fds.find(fd);
  if (it == impl_->fds.end()) return -EBADF;
  if (it->second.kind != FdObj::Kind::device || (it->second.cdev && !it->second.bound)) return -EINVAL;
  std::shared_ptr<Device> dev = it->second.dev;
  lk.unlock();
  if (dev->cfg.protocol != Protocol::v1 || offset < kRegionOffset) return -EINVAL;
  const uint64_t at = offset - kRegionOffset;
  std::unique_lock dl(dev->mu);
  if (at < kHeaderPage) return impl_->v1_header_write(*dev, dl, buf, len, at);
  if (at >= dev->region_size || len > dev->region_size - at) return -EINVAL;
  dl.unlock();
  const ssize_t n = ::pwrite(fd, buf, len, off_t(offset));
  return n < 0 ? -errno : n;
}

int EmuKernel::mmap(int fd, size_t len, int prot, uint64_t offset, void** out) {
  std::unique_lock lk(impl_->mu);
  const auto it = impl_->fds.find(fd);
  if (it == impl_->fds.end()) return -EBADF;
  if (it->second.kind != FdObj::Kind::device || (it->second.cdev && !it->second.bound)) return -EINVAL;
  std::shared_ptr<Device> dev = it->second.dev;
  lk.unlock();
  if (dev->cfg.protocol != Protocol::v1 || offset < kRegionOffset) return -EINVAL;
  const uint64_t at = offset - kRegionOffset;
  bool inside = false;
  for (const auto& [a_off, a_size] : dev->areas) {
    if (at >= a_off && at - a_off <= a_size && len <= a_size - (at - a_off)) inside = true;
  }
  if (!inside) return -EINVAL;  // only the sparse areas may be mapped
  if ((prot & PROT_WRITE) && dev->cfg.mmap == EmuDeviceConfig::Mmap::read_only) return -EACCES;
  void* p = ::mmap(nullptr, len, prot, MAP_SHARED, fd, off_t(offset));
  if (p == MAP_FAILED) return -errno;
  *out = p;
  return 0;
}

int EmuKernel::munmap(void* addr, size_t len) {
  return ::munmap(addr, len) < 0 ? -errno : 0;
}

int64_t EmuKernel::read(Ring& ring, int fd, void* buf, size_t len, int64_t offset) {
  std::unique_lock lk(impl_->mu);
  const auto it = impl_->fds.find(fd);
  if (it == impl_->fds.end()) return -EBADF;
  const FdObj::Kind kind = it->second.kind;
  std::shared_ptr<Device> dev = it->second.dev;
  const uint64_t gen = it->second.gen;
  lk.unlock();
  if (kind == FdObj::Kind::device) {
    if (offset < 0) return -EINVAL;
    if (dev->cfg.protocol == Protocol::v1 && uint64_t(offset) >= kRegionOffset &&
        uint64_t(offset) < kRegionOffset + kHeaderPage) {
      return pread(fd, buf, len, uint64_t(offset));
    }
    {
      std::lock_guard dl(dev->mu);
      dev->note("data");
    }
    return ring_once(ring, Op::read, fd, buf, len, offset);
  }
  if (kind == FdObj::Kind::load_data) return -EINVAL;
  if (kind != FdObj::Kind::save_data) return ring_once(ring, Op::read, fd, buf, len, offset);
  if (offset != -1) return -ESPIPE;  // a stream: no positioned reads
  // The saving data_fd.
  for (;;) {
    {
      std::unique_lock dl(dev->mu);
      SaveSession* s = dev->save.get();
      if (!s || s->gen != gen) return -ENODEV;
      if (s->broken) return -EIO;
      if (const EmuFault* f = dev->fault(EmuFault::Kind::eio_read)) {
        if (s->consumed >= f->at) return dev->refuse(EIO, "saving failed (fault eio-read)");
        len = std::min<uint64_t>(len, f->at - s->consumed);
      }
      dev->st.advance(Clock::now());
      if (dev->st.save_mode() == EmuState::Mode::precopy && s->idle && fionread(s->user_fd) == 0) {
        // The end of a pass: report it once, then start the next pass on the next read if anything changed.
        if (!s->end_reported) {
          s->end_reported = true;
          return dev->cfg.enomsg ? -ENOMSG : 0;
        }
        if (!dev->st.save_has_dirty()) return dev->cfg.enomsg ? -ENOMSG : 0;
        dev->st.save_next_pass();
        ++dev->counters.precopy_passes;
        s->idle = false;
        s->end_reported = false;
        dev->cv.notify_all();
      }
    }
    pollfd p{.fd = fd, .events = POLLIN, .revents = 0};
    if (::poll(&p, 1, kPollSliceMs) <= 0) continue;
    const int64_t n = ring_once(ring, Op::read, fd, buf, len, -1);
    if (n > 0) {
      std::lock_guard dl(dev->mu);
      if (dev->save && dev->save->gen == gen) dev->save->consumed += uint64_t(n);
      dev->counters.saved_bytes += uint64_t(n);
    }
    return n;
  }
}

int64_t EmuKernel::write(Ring& ring, int fd, const void* buf, size_t len, int64_t offset) {
  std::unique_lock lk(impl_->mu);
  const auto it = impl_->fds.find(fd);
  if (it == impl_->fds.end()) return -EBADF;
  const FdObj::Kind kind = it->second.kind;
  std::shared_ptr<Device> dev = it->second.dev;
  const uint64_t gen = it->second.gen;
  lk.unlock();
  if (kind == FdObj::Kind::device) {
    if (offset < 0) return -EINVAL;
    if (dev->cfg.protocol == Protocol::v1 && uint64_t(offset) >= kRegionOffset &&
        uint64_t(offset) < kRegionOffset + kHeaderPage) {
      return pwrite(fd, buf, len, uint64_t(offset));
    }
    {
      std::lock_guard dl(dev->mu);
      dev->note("data");
    }
    return ring_once(ring, Op::write, fd, const_cast<void*>(buf), len, offset);
  }
  if (kind == FdObj::Kind::save_data) return -EINVAL;
  if (kind != FdObj::Kind::load_data)
    return ring_once(ring, Op::write, fd, const_cast<void*>(buf), len, offset);
  if (offset != -1) return -ESPIPE;
  for (;;) {
    {
      std::lock_guard dl(dev->mu);
      LoadSession* s = dev->load.get();
      if (!s || s->gen != gen) return -ENODEV;
      if (!dev->st.load_error().empty()) return dev->refuse(EINVAL, dev->st.load_error());
      if (const EmuFault* f = dev->fault(EmuFault::Kind::eio_write)) {
        if (s->written >= f->at) return dev->refuse(EIO, "resuming failed (fault eio-write)");
        len = std::min<uint64_t>(len, f->at - s->written);
      }
    }
    pollfd p{.fd = fd, .events = POLLOUT, .revents = 0};
    if (::poll(&p, 1, kPollSliceMs) <= 0) continue;
    const int64_t n = ring_once(ring, Op::write, fd, const_cast<void*>(buf), len, -1);
    if (n > 0) {
      std::lock_guard dl(dev->mu);
      if (dev->load && dev->load->gen == gen) dev->load->written += uint64_t(n);
      dev->counters.loaded_bytes += uint64_t(n);
    }
    return n;
  }
}

int EmuKernel::poll(int fd, short events, int timeout_ms) {
  pollfd p{.fd = fd, .events = events, .revents = 0};
  const int r = ::poll(&p, 1, timeout_ms);
  if (r < 0) return -errno;
  return r == 0 ? 0 : p.revents;
}

}  // namespace dstx::io::vfio
