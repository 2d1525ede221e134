// An emulated kernel: /dev/iommu, /dev/vfio/vfio, VFIO groups and iommufd character devices, and two emulated
// vendor drivers behind them: a v1 driver (migration region in a memfd, a header page trapped through
// pread/pwrite, a data section described by a sparse-mmap capability and really mmap'able) and a v2 driver
// (data_fd is a real pipe fed or drained by a driver thread; ENOMSG at the end of each pre-copy pass, EOF at
// the end of STOP_COPY, VFIO_MIG_GET_PRECOPY_INFO, MIG_DATA_SIZE). Transitions step through the kernel's FSM
// table (mig_fsm.h) as real drivers do. Both drivers save and load the stream described in emu_state.h and
// reject a loaded state whose digest does not match.
//
// File descriptors are real (memfds, pipes), so the ring and mmap work on them; only their meaning is
// emulated. Like real drivers, closing the last device fd ends any migration session and returns the device
// to RUNNING; the device's content persists for the life of the EmuKernel.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "io/vfio/device.h"
#include "io/vfio/emu_state.h"
#include "io/vfio/kernel.h"

namespace dstx::io::vfio {

struct EmuFault {
  enum class Kind : uint8_t {
    reject_state,      // resuming: the device refuses the loaded state when RESUMING ends
    eio_read,          // saving: reading migration data fails with EIO once `at` stream bytes were read
    eio_write,         // resuming: writing migration data fails with EIO once `at` bytes were written
    transition_fail,   // every arc into `state` fails with EIO; the device stays where it was
    transition_error,  // every arc into `state` fails with EIO and leaves the device in ERROR
    short_read,        // v1: reads of pending_bytes return half the bytes
    bad_range,         // v1: data_offset points past the end of the region
  };
  Kind kind = Kind::reject_state;
  uint64_t at = 0;
  // transition_*: the arc into `state`, from `from` only when set. v1 devices use the same names:
  // PRE_COPY = SAVING|RUNNING, STOP_COPY = SAVING.
  MigState state = MigState::running;
  std::optional<MigState> from;
};
// "reject-state", "eio-read@SIZE", ... for help texts and errors.
inline constexpr const char* kEmuFaultNames =
    "reject-state, eio-read@BYTES, eio-write@BYTES, transition-fail@[FROM-]STATE, "
    "transition-error@[FROM-]STATE, "
    "short-read, bad-range";
const char* emu_fault_kind_name(EmuFault::Kind kind);
bool emu_fault_kind_from_name(std::string_view name, EmuFault::Kind* out);
bool emu_fault_takes_bytes(EmuFault::Kind kind);
bool emu_fault_takes_state(EmuFault::Kind kind);

struct EmuDeviceConfig {
  Protocol protocol = Protocol::v2;
  EmuStateConfig state;
  std::vector<EmuFault> faults;
  // v2
  bool precopy = true;  // offers VFIO_MIGRATION_PRE_COPY
  bool p2p = true;      // offers VFIO_MIGRATION_P2P
  bool enomsg = true;   // a pre-copy pass ends with ENOMSG (uAPI); false: read() returns 0 (as mtty does)
  // v1
  uint64_t section_bytes = 4ull << 20;  // data section size (a multiple of 4 KiB, at least 64 KiB)
  enum class Mmap : uint8_t {
    all,
    part,
    none,
    read_only  // as all, but the driver refuses writable mappings (EACCES)
  } mmap = Mmap::part;  // part: a hole in the middle is read, not mapped
  // Common
  uint32_t delay_us = 0;  // a slow driver: v1 takes this long per data_offset, v2 per 256 KiB it produces
};

struct EmuCounters {
  uint64_t resets = 0;
  uint64_t saved_bytes = 0;   // stream bytes read by the user
  uint64_t loaded_bytes = 0;  // stream bytes written by the user
  unsigned precopy_passes = 0;
  std::vector<uint64_t> save_transactions;  // v1: data_size of each transaction read
  std::vector<uint64_t> load_transactions;  // v1: data_size of each transaction written
  std::vector<std::string> trace;  // v1 header accesses in order ("pending", "data_offset", ...) when traced
  std::string last_error;          // why the device last refused something
};

class EmuKernel final : public Kernel {
 public:
  EmuKernel();
  ~EmuKernel() override;

  struct Added {
    int id = -1;
    DevicePath cdev;   // vfio:/dev/vfio/devices/vfioID
    DevicePath group;  // vfio-group:/dev/vfio/ID:0000:00:ID.0
  };
  Added add_device(const EmuDeviceConfig& config);

  // For tests and reports (any thread).
  std::string state_name(int id);
  MigState v2_state(int id);
  uint32_t v1_state(int id);
  StateDigest state_digest(int id);
  EmuCounters counters(int id);
  void set_trace(int id, bool on);

  std::string name() const override { return "emulated kernel"; }
  int open(const std::string& path, int flags) override;
  int close(int fd) override;
  int ioctl(int fd, unsigned long request, void* arg) override;
  int64_t pread(int fd, void* buf, size_t len, uint64_t offset) override;
  int64_t pwrite(int fd, const void* buf, size_t len, uint64_t offset) override;
  int mmap(int fd, size_t len, int prot, uint64_t offset, void** out) override;
  int munmap(void* addr, size_t len) override;
  int64_t read(Ring& ring, int fd, void* buf, size_t len, int64_t offset) override;
  int64_t write(Ring& ring, int fd, const void* buf, size_t len, int64_t offset) override;
  int poll(int fd, short events, int timeout_ms) override;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace dstx::io::vfio
