#include "engine/capi_transfer.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <new>
#include <stdexcept>
#include <system_error>

#include "compress/codec.h"
#include "engine/spec.h"
#include "io/vfio/vfio_uapi.h"

namespace dstx::capi {

int64_t ns_of(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

int64_t now_ns() {
  return ns_of(std::chrono::steady_clock::now());
}

int status_from_reason(engine::wire::Reason reason) {
  using engine::wire::Reason;
  switch (reason) {
    case Reason::source:
      return DSTX_E_SOURCE;
    case Reason::sink:
      return DSTX_E_SINK;
    case Reason::cancelled:
      return DSTX_E_CANCELLED;
    case Reason::timeout:
      return DSTX_E_TIMEOUT;
    case Reason::connection:
      return DSTX_E_CONNECTION;
    case Reason::checksum:
    case Reason::digest:
      return DSTX_E_INTEGRITY;
    case Reason::version:
    case Reason::session:
    case Reason::stream:
    case Reason::chunk_size:
    case Reason::protocol:
      return DSTX_E_PROTOCOL;
    case Reason::capability:
      return DSTX_E_UNSUPPORTED;
    case Reason::unspecified:
    case Reason::internal:
      break;
  }
  return DSTX_E_INTERNAL;
}

namespace {

// Clears (or sets) O_NONBLOCK on a shared open file for one transfer and puts the caller's flags back after.
class FlagGuard {
 public:
  FlagGuard(int fd, bool nonblocking) : fd_(fd) {
    flags_ = ::fcntl(fd, F_GETFL);
    if (flags_ < 0) return;
    const int wanted = nonblocking ? (flags_ | O_NONBLOCK) : (flags_ & ~O_NONBLOCK);
    if (wanted == flags_ || ::fcntl(fd, F_SETFL, wanted) != 0) flags_ = -1;
  }
  ~FlagGuard() {
    if (flags_ >= 0) ::fcntl(fd_, F_SETFL, flags_);
  }
  FlagGuard(FlagGuard&& other) noexcept : fd_(other.fd_), flags_(other.flags_) { other.flags_ = -1; }
  FlagGuard(const FlagGuard&) = delete;
  FlagGuard& operator=(const FlagGuard&) = delete;
  FlagGuard& operator=(FlagGuard&&) = delete;

 private:
  int fd_;
  int flags_;  // the caller's flags to restore, or -1
};

// Calls the progress callback every interval while the transfer runs, and once more when stopped.
class Monitor {
 public:
  explicit Monitor(Transfer& t) : t_(t) {
    thread_ = std::thread([this] { loop(); });
  }
  ~Monitor() { stop(); }
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  void stop() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void loop() {
    const auto interval = std::chrono::milliseconds(t_.progress_interval_ms);
    std::unique_lock lock(mu_);
    for (;;) {
      if (cv_.wait_for(lock, interval, [this] { return stop_; })) break;
      lock.unlock();
      report();
      lock.lock();
    }
    lock.unlock();
    report();  // the final figures
  }

  void report() {
    dstx_stats stats{};
    stats.size = sizeof stats;
    t_.fill_stats(&stats);
    try {
      t_.progress(t_.user, to_handle(&t_), &stats);
    } catch (...) {
      // A C callback cannot throw; a C++ one that does must not take the library down with it.
    }
  }

  Transfer& t_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

std::string ratio_text(uint64_t wire, uint64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f", bytes ? double(wire) / double(bytes) : 0.0);
  return text;
}

std::string seconds_text(int64_t ns) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f s", double(ns) / 1e9);
  return text;
}

}  // namespace

Transfer::~Transfer() {
  if (worker.joinable()) {
    cancel.request();
    worker.join();
  }
}

void Transfer::log_line(int level, const std::string& text) {
  if (log == nullptr || uint32_t(level) > log_level) return;
  try {
    log(user, to_handle(this), level, text.c_str());
  } catch (...) {
  }
}

Status Transfer::run_send() {
  if (cancel.requested()) return failure(DSTX_E_CANCELLED, "cancelled before the transfer started");
  std::vector<io::Fd> conns;
  std::vector<FlagGuard> guards;
  if (connect_to) {
    phase = DSTX_PHASE_CONNECTING;
    const std::string where = io::to_string(*connect_to);
    log_line(DSTX_LOG_DEBUG, "send: connecting " + std::to_string(streams) + " streams to " + where);
    const int64_t t0 = now_ns();
    for (unsigned i = 0; i < streams; ++i) {
      if (cancel.requested()) return failure(DSTX_E_CANCELLED, "cancelled while connecting to " + where);
      try {
        conns.push_back(io::tcp_connect(*connect_to, send_options.socket));
      } catch (const std::bad_alloc&) {
        throw;
      } catch (const std::exception& e) {
        return failure(DSTX_E_CONNECTION,
                       "stream " + std::to_string(i) + " of " + std::to_string(streams) + ": " + e.what());
      }
    }
    connect_ns = now_ns() - t0;
    log_line(DSTX_LOG_INFO, "send: connected " + std::to_string(streams) + " streams to " + where + " in " +
                                seconds_text(connect_ns));
  } else {
    for (size_t i = 0; i < handed_fds.size(); ++i) {
      io::Fd copy;
      if (Status s = duplicate_fd(handed_fds[i].get(), "connection", &copy); !s.ok()) return s;
      // On our long-lived duplicate: the engine closes `copy` when it is done with it.
      guards.emplace_back(handed_fds[i].get(), /*nonblocking=*/false);
      try {
        io::apply_socket_options(copy.get(), send_options.socket);
      } catch (const std::bad_alloc&) {
        throw;
      } catch (const std::exception& e) {
        return failure(DSTX_E_CONNECTION, "handed-in connection " + std::to_string(i) + ": " + e.what());
      }
      conns.push_back(std::move(copy));
    }
  }
  streams_in_use = unsigned(conns.size());
  log_line(DSTX_LOG_DEBUG, "send: " + source.source->describe() + " over " + std::to_string(conns.size()) +
                               " streams, codec " + engine::codec_mode_name(send_options.codec) +
                               ", chunks of " + (send_options.fit_chunks ? "at most " : "") +
                               engine::format_bytes(double(send_options.chunk_bytes)));
  if (source.device != nullptr) return run_migrate(std::move(conns));
  phase = DSTX_PHASE_STOP_COPY;
  const int64_t t0 = now_ns();
  stop_copy_started_ns = t0;
  const engine::Result r = engine::send(*source.source, std::move(conns), send_options, &stats, &cancel);
  stop_copy_ns = now_ns() - t0;
  log_line(DSTX_LOG_DEBUG, "send: I/O backend: " + r.io_backend);
  if (!r.committed) return failure(status_from_reason(r.reason), r.error);
  // Up to COMMITTED, as for a device (engine::migrate), not to the end of send()'s teardown.
  downtime_ns = r.committed_at ? ns_of(*r.committed_at) - t0 : stop_copy_ns.load();
  digest = r.digest;
  log_line(DSTX_LOG_INFO, "send: committed " + std::to_string(r.bytes) + " bytes (" +
                              std::to_string(r.wire_bytes) + " on the wire, ratio " +
                              ratio_text(r.wire_bytes, r.bytes) + ") in " + seconds_text(stop_copy_ns));
  return {};
}

void Transfer::enter_stop_copy() {
  const int64_t now = now_ns();
  stop_copy_started_ns = now;
  if (const int64_t t0 = precopy_started_ns.load(); t0 != 0) precopy_ns = now - t0;
  phase = DSTX_PHASE_STOP_COPY;
  if (before_stop_copy == nullptr) return;
  int rc = -1;
  try {
    rc = before_stop_copy(user, to_handle(this));
  } catch (...) {
    // A C callback cannot throw; a C++ one that does refuses.
  }
  if (rc != 0) {
    stop_copy_refused = true;
    throw std::runtime_error("before_stop_copy returned " + std::to_string(rc) +
                             ": the migration was abandoned before stop-copy");
  }
}

Status Transfer::run_migrate(std::vector<io::Fd> conns) {
  engine::MigrationSource& src = *source.device;
  const bool precopy = precopy_max_rounds > 0 && (src.protocol() == io::vfio::Protocol::v1 ||
                                                  (src.device().migration_flags() & VFIO_MIGRATION_PRE_COPY));
  log_line(DSTX_LOG_DEBUG, std::string("send: VFIO ") + io::vfio::protocol_name(src.protocol()) +
                               " device, " +
                               (precopy ? "up to " + std::to_string(precopy_max_rounds) + " pre-copy rounds"
                                        : std::string("no pre-copy")));
  if (precopy) precopy_started_ns = now_ns();
  // Without pre-copy the first read enters STOP_COPY (enter_stop_copy).
  phase = precopy ? DSTX_PHASE_PRECOPY : DSTX_PHASE_STOP_COPY;
  // The digest is computed below, and only after a commit.
  engine::MigrateResult r =
      engine::migrate(src, std::move(conns), send_options, &stats, &cancel, /*want_digest=*/false);
  end_device_figures(r.transfer.committed);
  log_line(DSTX_LOG_DEBUG, "send: I/O backend: " + r.transfer.io_backend);
  const std::string rounds = std::to_string(r.precopy_rounds) + " pre-copy rounds (" +
                             std::to_string(r.precopy_bytes) + " bytes), " +
                             std::to_string(r.stopcopy_bytes) + " bytes in stop-copy";
  if (!r.transfer.committed) {
    std::string text = r.transfer.error;
    text += "; the device is " + r.device_state;
    if (!r.device_note.empty()) text += " (" + r.device_note + ")";
    return failure(stop_copy_refused ? DSTX_E_CANCELLED : status_from_reason(r.transfer.reason), text);
  }
  downtime_ns = int64_t(r.downtime_ms * 1e6);
  digest = r.transfer.digest;
  if (!r.device_note.empty()) log_line(DSTX_LOG_WARN, "send: " + r.device_note);
  log_line(DSTX_LOG_INFO, "send: committed " + std::to_string(r.transfer.bytes) + " bytes of device state (" +
                              std::to_string(r.transfer.wire_bytes) + " on the wire) after " + rounds +
                              "; downtime " + seconds_text(downtime_ns) + ", the device is " +
                              r.device_state);
  return {};
}

void Transfer::end_device_figures(bool committed) {
  io::vfio::VfioDevice* dev = source.device != nullptr ? &source.device->device()
                              : sink.device != nullptr ? &sink.device->device()
                                                       : nullptr;
  if (dev == nullptr) return;
  try {
    read_device_state(*dev, &device_end.state, &device_end.state_name);
    if (committed)
      device_end.digest = source.device ? source.device->state_digest() : sink.device->state_digest();
    if (source.device != nullptr) {
      device_end.precopy_rounds = source.device->precopy_rounds();
      device_end.precopy_bytes = source.device->precopy_bytes();
      device_end.stop_copy_bytes = source.device->stopcopy_bytes();
    }
  } catch (...) {
    // Out of memory for the texts: the figures that made it are reported.
  }
  device_final.store(true, std::memory_order_release);
}

void Transfer::fill_device_stats(dstx_stats* out) const {
  io::vfio::VfioDevice* dev = source.device != nullptr ? &source.device->device()
                              : sink.device != nullptr ? &sink.device->device()
                                                       : nullptr;
  if (dev == nullptr) return;
  out->vfio_protocol = dev->protocol() == io::vfio::Protocol::v1 ? DSTX_VFIO_V1 : DSTX_VFIO_V2;
  auto copy_text = [](char* to, size_t size, const std::string& text) {
    std::snprintf(to, size, "%s", text.c_str());
  };
  if (device_final.load(std::memory_order_acquire)) {
    out->device_state = device_end.state;
    copy_text(out->device_state_name, sizeof out->device_state_name, device_end.state_name);
    copy_text(out->state_digest, sizeof out->state_digest, device_end.digest);
    out->precopy_rounds = device_end.precopy_rounds;
    out->precopy_bytes = device_end.precopy_bytes;
    out->stop_copy_bytes = device_end.stop_copy_bytes;
    return;
  }
  // While it runs: the device's own answer (VFIO serialises state accesses; the engine's thread may be
  // changing the state at the same time, and either state is then true).
  uint32_t now_state = DSTX_DEVICE_UNKNOWN;
  std::string name;
  try {
    read_device_state(*dev, &now_state, &name);
  } catch (...) {
    name.clear();
  }
  out->device_state = now_state;
  copy_text(out->device_state_name, sizeof out->device_state_name, name);
  if (source.device != nullptr) out->precopy_rounds = source.device->precopy_rounds();
}

Status Transfer::run_recv() {
  if (cancel.requested()) {
    sink.sink->abort();
    return failure(DSTX_E_CANCELLED, "cancelled before the transfer started");
  }
  phase = DSTX_PHASE_CONNECTING;
  log_line(DSTX_LOG_DEBUG, "recv: waiting for the sender" +
                               (local_port >= 0 ? " on port " + std::to_string(local_port) : std::string()) +
                               ", sink " + sink.sink->describe());
  engine::Result r;
  if (!handed_fds.empty()) {
    // Connections the caller accepted: blocking for the engine's workers, the caller's flags back afterwards.
    std::vector<io::Fd> conns;
    std::vector<FlagGuard> guards;
    for (io::Fd& fd : handed_fds) {
      io::Fd copy;
      if (Status s = duplicate_fd(fd.get(), "connection", &copy); !s.ok()) {
        sink.sink->abort();
        return s;
      }
      guards.emplace_back(fd.get(), /*nonblocking=*/false);
      conns.push_back(std::move(copy));
    }
    r = engine::receive_accepted(*sink.sink, std::move(conns), recv_options, &stats, &cancel);
  } else {
    // A listening socket is non-blocking in the engine's own use: a connection that vanishes between poll and
    // accept must not block the accept. A caller's gets the same for the transfer.
    FlagGuard guard(listener.get(), /*nonblocking=*/true);
    r = engine::receive(*sink.sink, listener.get(), recv_options, &stats, &cancel);
  }
  listener.reset();  // frees the port; local_port keeps answering
  streams_in_use = r.streams;
  end_device_figures(r.committed);
  log_line(DSTX_LOG_DEBUG, "recv: I/O backend: " + r.io_backend);
  if (!r.committed) {
    std::string text = r.error;
    if (sink.device != nullptr) {
      text += "; the device was reset (" + device_end.state_name + ")";
      if (!sink.device->abort_note().empty()) text += ": " + sink.device->abort_note();
    }
    return failure(status_from_reason(r.reason), text);
  }
  digest = r.digest;
  if (sink.device != nullptr) {
    log_line(DSTX_LOG_INFO, "recv: the device accepted the state and is " + device_end.state_name);
  }
  log_line(DSTX_LOG_INFO, "recv: committed " + std::to_string(r.bytes) + " bytes (" +
                              std::to_string(r.wire_bytes) + " on the wire) from " +
                              std::to_string(r.streams) + " streams in " +
                              seconds_text(now_ns() - started_ns));
  return {};
}

void Transfer::finish(const Status& status) {
  ended_ns = now_ns();
  if (const int64_t t0 = stop_copy_started_ns.load(); t0 != 0 && stop_copy_ns.load() == 0) {
    stop_copy_ns = ended_ns - t0;
  }
  // A device source that failed in pre-copy.
  if (const int64_t t0 = precopy_started_ns.load(); t0 != 0 && precopy_ns.load() == 0) {
    precopy_ns = ended_ns - t0;
  }
  if (!status.ok()) {
    try {
      error = status.text.empty() ? dstx_strerror(status.code) : status.text;
    } catch (...) {
      // Out of memory for the text: the status still says what happened.
    }
    log_line(DSTX_LOG_ERROR, std::string(side == Side::send ? "send" : "recv") + " failed (" +
                                 dstx_strerror(status.code) + "): " + error);
  }
  phase = status.ok() ? DSTX_PHASE_DONE : DSTX_PHASE_FAILED;
  final_status = status.code;
}

int Transfer::execute() noexcept {
  started_ns = now_ns();
  Status status;
  std::optional<Monitor> monitor;
  try {
    if (progress != nullptr) {
      try {
        monitor.emplace(*this);
      } catch (const std::system_error& e) {
        throw std::runtime_error(std::string("cannot start the progress thread: ") + e.what());
      }
    }
    status = side == Side::send ? run_send() : run_recv();
  } catch (const std::bad_alloc&) {
    status = failure(DSTX_E_NOMEM, "out of memory");
  } catch (const std::system_error& e) {
    status = failure(DSTX_E_SYSTEM, e.what());
  } catch (const std::exception& e) {
    status = failure(DSTX_E_INTERNAL, e.what());
  } catch (...) {
    status = failure(DSTX_E_INTERNAL, "unknown exception");
  }
  finish(status);
  if (monitor) monitor->stop();
  {
    std::lock_guard lock(done_mu);
    state.store(int(State::done), std::memory_order_release);
  }
  done_cv.notify_all();
  if (on_complete != nullptr) {
    try {
      on_complete(user, to_handle(this), status.code);
    } catch (...) {
    }
  }
  const uint64_t one = 1;
  // An eventfd write of 1 cannot fail short of a counter overflow, which one write per transfer never
  // reaches.
  [[maybe_unused]] const ssize_t n = ::write(event_fd.get(), &one, sizeof one);
  return status.code;
}

int Transfer::current_status() const {
  switch (State(state.load(std::memory_order_acquire))) {
    case State::idle:
      return DSTX_E_STATE;
    case State::running:
      return DSTX_E_AGAIN;
    case State::done:
      return final_status.load();
  }
  return DSTX_E_INTERNAL;
}

void Transfer::fill_stats(dstx_stats* out) const {
  const size_t size = out->size;
  *out = dstx_stats{};
  out->size = size;
  const int64_t started = started_ns.load();
  const int64_t ended = ended_ns.load();
  uint32_t p = phase.load();
  // The receiving engine does not say when the handshake is over; its first counted frame bytes do.
  if (side == Side::recv && p == DSTX_PHASE_CONNECTING && stats.wire_bytes.load() > 0)
    p = DSTX_PHASE_STOP_COPY;
  out->phase = p;
  // Final from finish() on, so that the last progress call already carries it.
  out->status = final_status.load();
  out->streams = streams_in_use.load();
  out->total_bytes = stats.total_bytes.load();
  const uint64_t bytes = stats.bytes.load();
  if (side == Side::send) {
    // The engine counts state bytes when their chunk is handed to the network; reads are not counted apart.
    out->bytes_read = bytes;
    out->bytes_sent = bytes;
  } else {
    out->bytes_written = bytes;
  }
  out->wire_bytes = stats.wire_bytes.load();
  out->chunks = stats.chunks.load();
  out->zero_chunks = stats.zero_chunks.load();
  out->raw_chunks = stats.raw_chunks.load();
  out->compressed_chunks = stats.compressed_chunks.load();
  out->acked_chunks = stats.acked_chunks.load();
  out->resumes = stats.resumes.load();
  out->replayed_chunks = stats.replayed_chunks.load();
  out->reread_chunks = stats.reread_chunks.load();
  out->lz4_chunks = stats.codec_chunks[unsigned(compress::Codec::lz4)].load();
  out->zstd_chunks = stats.codec_chunks[unsigned(compress::Codec::zstd)].load();
  out->sparse_chunks = stats.codec_chunks[unsigned(compress::Codec::sparse)].load();
  out->paged_chunks = stats.paged_chunks.load();
  out->ratio = bytes ? double(out->wire_bytes) / double(bytes) : 0.0;
  if (started != 0) out->elapsed_ns = uint64_t((ended != 0 ? ended : now_ns()) - started);
  out->connect_ns = uint64_t(connect_ns.load());
  const int64_t pc_started = precopy_started_ns.load();
  const int64_t pc = precopy_ns.load();
  out->precopy_ns = uint64_t(pc != 0 ? pc : (pc_started != 0 && ended == 0 ? now_ns() - pc_started : 0));
  const int64_t sc_started = stop_copy_started_ns.load();
  const int64_t sc = stop_copy_ns.load();
  out->stop_copy_ns = uint64_t(sc != 0 ? sc : (sc_started != 0 && ended == 0 ? now_ns() - sc_started : 0));
  out->downtime_ns = uint64_t(downtime_ns.load());
  out->digest = digest.load();  // set only once committed
  fill_device_stats(out);
}

}  // namespace dstx::capi
