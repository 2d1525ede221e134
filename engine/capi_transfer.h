// The object behind a dstx_transfer handle (dstx::capi::Transfer): one transfer, its endpoints and
// connections, the thread that runs it (the caller's or the library's), the progress monitor, and what the C
// ABI reads while it runs. Private to engine/capi*.cpp.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dstx/dstx.h"
#include "engine/capi_endpoints.h"
#include "engine/transfer.h"
#include "io/socket.h"

namespace dstx::capi {

// dstx_transfer stays an incomplete type everywhere (the handle is a Transfer*), so that the library's
// debug information, which the ABI check reads, shows the handle as the opaque struct of the header.
struct Transfer {
  enum class Side : uint8_t { send, recv };

  // What create validated and opened; read-only once the transfer runs.
  Side side = Side::send;
  dstx::engine::SendOptions send_options;
  dstx::engine::RecvOptions recv_options;
  dstx_progress_fn progress = nullptr;
  dstx_log_fn log = nullptr;
  dstx_complete_fn on_complete = nullptr;
  dstx_stop_copy_fn before_stop_copy = nullptr;  // sending from a VFIO device
  unsigned precopy_max_rounds = 0;               // sending from a VFIO device (the driver's option)
  void* user = nullptr;
  uint32_t log_level = DSTX_LOG_WARN;
  uint32_t progress_interval_ms = 100;
  uint32_t endpoint_kind = DSTX_ENDPOINT_NONE;
  OpenedSource source;
  OpenedSink sink;
  std::optional<dstx::io::HostPort> connect_to;  // sending with DSTX_NET_ADDRESS
  unsigned streams = 0;                          // sending: streams to connect or handed in
  std::vector<dstx::io::Fd> handed_fds;  // duplicates of the caller's connected sockets (DSTX_NET_FDS)
  dstx::io::Fd listener;                 // receiving: the listening socket (ours or a duplicate)
  int local_port = -1;                   // receiving on TCP: the bound port

  dstx::io::Fd event_fd;  // readable once the transfer has ended

  // Running state, shared with other threads.
  enum class State : int { idle, running, done };
  std::atomic<int> state{int(State::idle)};
  dstx::engine::Cancel cancel;
  dstx::engine::Stats stats;
  std::atomic<uint32_t> phase{DSTX_PHASE_IDLE};
  std::atomic<int> final_status{DSTX_E_AGAIN};
  std::atomic<int64_t> started_ns{0};  // steady clock; 0: not started
  std::atomic<int64_t> ended_ns{0};
  std::atomic<int64_t> connect_ns{0};
  std::atomic<int64_t> precopy_started_ns{0};  // VFIO device sources that pre-copy
  std::atomic<int64_t> precopy_ns{0};
  std::atomic<int64_t> stop_copy_started_ns{0};
  std::atomic<int64_t> stop_copy_ns{0};
  std::atomic<int64_t> downtime_ns{0};
  std::atomic<uint32_t> streams_in_use{0};
  std::atomic<uint64_t> digest{0};
  std::string error;                           // written once, before `state` becomes done
  std::atomic<bool> stop_copy_refused{false};  // before_stop_copy returned non-zero

  // A VFIO device endpoint's figures at the end, written once by the running thread before `device_final`
  // is set; until then dstx_stats reads the device's state from the device itself.
  struct DeviceFinal {
    uint32_t state = DSTX_DEVICE_NONE;
    std::string state_name;
    std::string digest;  // emulated devices, after DSTX_OK
    unsigned precopy_rounds = 0;
    uint64_t precopy_bytes = 0;
    uint64_t stop_copy_bytes = 0;
  } device_end;
  std::atomic<bool> device_final{false};

  std::mutex done_mu;
  std::condition_variable done_cv;
  std::thread worker;  // dstx_transfer_start

  ~Transfer();

  // Runs the transfer on the calling thread: the engine call, the monitor, the log lines, the completion
  // signals. Never throws. Returns the final status.
  int execute() noexcept;
  int current_status() const;
  void fill_stats(dstx_stats* out) const;  // a full-size struct
  void log_line(int level, const std::string& text);
  // A VFIO device source is about to enter STOP_COPY (engine::MigrateOptions::before_stop_copy, on the
  // worker thread reading the device): the phase changes and the VMM's callback runs. Throws when the VMM
  // refuses.
  void enter_stop_copy();

 private:
  Status run_send();
  Status run_recv();
  Status run_migrate(std::vector<io::Fd> conns);  // run_send for a VFIO device source
  void end_device_figures(bool committed);        // fills device_end, sets device_final
  void fill_device_stats(dstx_stats* out) const;
  void finish(const Status& status);
};

inline Transfer* from_handle(dstx_transfer* handle) {
  return reinterpret_cast<Transfer*>(handle);
}
inline const Transfer* from_handle(const dstx_transfer* handle) {
  return reinterpret_cast<const Transfer*>(handle);
}
inline dstx_transfer* to_handle(Transfer* t) {
  return reinterpret_cast<dstx_transfer*>(t);
}

// steady_clock in nanoseconds: a time point, and now.
int64_t ns_of(std::chrono::steady_clock::time_point t);
int64_t now_ns();
// The C ABI's status for an engine failure reason.
int status_from_reason(engine::wire::Reason reason);

}  // namespace dstx::capi
