// The migration driver: a VFIO device (real or emulated) as a Source that walks the device through its save
// phases while the engine sends, and as a Sink that loads a received state into a device.
//
// Source, v2: RUNNING -> PRE_COPY; each pre-copy round reads the data_fd until ENOMSG (or 0, as some
// drivers say it), then asks VFIO_MIG_GET_PRECOPY_INFO and MIG_DATA_SIZE; rounds go on while the remaining
// state shrinks and does not yet fit the downtime target at the measured rate, up to a round limit; then
// STOP_COPY (downtime starts) and reads to EOF. v1: SAVING|RUNNING transactions in rounds until
// pending_bytes is small enough, then SAVING until pending_bytes is 0. Each v1 transaction ends with
// end_of_transaction; data in a mapped area is handed out as a zero-copy view, the rest read through the
// ring. After COMMITTED the device goes to STOP; after any failure back to RUNNING (reset if it cannot).
//
// Sink: the first write enters RESUMING. v2 writes the stream to the data_fd in order; v1 writes each
// transaction (data_offset, bytes through the mapping or the ring, data_size), splitting only where the
// destination's section is smaller. commit() leaves RESUMING (the device validates: failure throws, the
// receiver then aborts); abort() resets the device.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "engine/transfer.h"
#include "io/vfio/device.h"
#include "io/vfio/emu_kernel.h"

namespace dstx::engine {

struct MigrateOptions {
  unsigned precopy_max_rounds = 8;  // 0: straight to stop-copy
  uint32_t downtime_target_ms = 300;
  io::vfio::ProtocolChoice protocol = io::vfio::ProtocolChoice::detect;
  // Called once, right before the device enters STOP_COPY (v1: SAVING), on the thread reading the device:
  // a VMM pauses its vCPUs here. Downtime counts from this call. Throwing fails the migration (the device
  // goes back to RUNNING); the text of the exception is the failure's.
  std::function<void()> before_stop_copy;
};

inline constexpr const char* kDeviceKinds =
    "vfio:/dev/vfio/devices/vfioN, vfio-group:/dev/vfio/GROUP:DEVICE, emu-v1:KEY=VALUE,..., "
    "emu-v2:KEY=VALUE,...";
// The keys of emu-v1:/emu-v2:, for --help.
inline constexpr const char* kEmuDeviceKeys =
    "size=SIZE, profile=NAME, seed=N, dirty=BYTES_PER_SEC, fault=NAME (repeatable), open=cdev|group, "
    "delay-us=N; "
    "v2: precopy=0|1, p2p=0|1, temp-end=enomsg|zero; v1: section=SIZE, mmap=all|part|none|ro";

bool is_device_spec(std::string_view spec);
// The part after "emu-v1:" or "emu-v2:". *open_as gets how dstx opens it (default: v2 cdev, v1 group).
// Throws std::invalid_argument naming the bad part.
io::vfio::EmuDeviceConfig parse_emu_device(io::vfio::Protocol protocol, std::string_view params,
                                           io::vfio::DevicePath::Kind* open_as);

// A device opened from a spec, with the kernel it lives in.
struct OpenedDevice {
  std::string spec;
  std::shared_ptr<io::vfio::EmuKernel> emu;  // emulated devices only
  int emu_id = -1;
  std::unique_ptr<io::vfio::VfioDevice> device;
};
// Throws std::invalid_argument for a malformed spec, io::vfio::VfioError when the device cannot be used.
OpenedDevice open_device(std::string_view spec, io::vfio::ProtocolChoice choice);
// A VFIO device fd that the caller opened and set up (a VMM's: a cdev bound and attached, or a group's device
// fd), used as is. Takes ownership of `fd` (closed with the device, also when this throws): pass a duplicate
// to keep yours. `name` stands for the spec in texts; `kernel` null means the host's. Throws
// io::vfio::VfioError when the fd is not a device that offers migration.
OpenedDevice open_device_fd(int fd, io::vfio::ProtocolChoice choice, std::string name,
                            std::shared_ptr<io::vfio::Kernel> kernel = nullptr);

class MigrationSource final : public io::Source {
 public:
  using Clock = std::chrono::steady_clock;
  MigrationSource(OpenedDevice device, const MigrateOptions& options);
  ~MigrationSource() override;  // rolls the device back unless committed

  std::string describe() const override { return dev_.spec; }
  std::optional<uint64_t> size() const override { return std::nullopt; }
  std::optional<uint64_t> size_estimate() override;  // v2: MIG_DATA_SIZE (the whole state before pre-copy)
  bool random_access() const override { return false; }
  size_t read_next(io::Ring& ring, std::span<std::byte> out, io::ReadInfo* info) override;
  void release_view(uint64_t view_token) override;

  // The receiver committed: the device stops. Returns "" or why it did not.
  std::string finish_committed();
  // Anything failed: the device runs again (RUNNING), reset if nothing else works. Returns "" when it simply
  // went back, else what happened. Never throws.
  std::string roll_back() noexcept;

  io::vfio::Protocol protocol() const { return dev_.device->protocol(); }
  unsigned precopy_rounds() const { return rounds_.load(); }  // any thread
  uint64_t precopy_bytes() const { return precopy_bytes_; }
  uint64_t stopcopy_bytes() const { return stopcopy_bytes_; }
  std::optional<Clock::time_point> stop_copy_started() const { return stopcopy_start_; }
  int views_held() const { return views_out_.load(); }
  uint64_t view_bytes() const { return view_bytes_; }      // v1: handed out as views of the mapped section
  uint64_t copied_bytes() const { return copied_bytes_; }  // v1: read from the section through the ring
  std::string device_state();                              // the device's state now
  std::string state_digest();  // emulated devices: full-state XXH3-128 hex; "" otherwise
  io::vfio::VfioDevice& device() { return *dev_.device; }
  io::vfio::EmuKernel* emu() { return dev_.emu.get(); }
  int emu_id() const { return dev_.emu_id; }
  // Waits on the device (a data_fd that says "try again") end when this is requested. migrate() sets it.
  void set_cancel(const Cancel* cancel) { cancel_ = cancel; }

 private:
  enum class Phase : uint8_t { idle, precopy, stopcopy, done, committed, rolled_back };
  void start();
  void enter_stopcopy();
  bool end_round(uint64_t remaining, uint64_t initial_left);  // true when stop-copy began
  size_t read_v2(io::Ring& ring, std::span<std::byte> out);
  size_t read_v1(io::Ring& ring, std::span<std::byte> out, io::ReadInfo* info);
  void account(uint64_t n);
  void close_data_fd();
  [[noreturn]] void fail(const std::string& what, int err = 0) const;

  OpenedDevice dev_;
  MigrateOptions opt_;
  Phase phase_ = Phase::idle;
  // A transition was asked of the device: only then has roll_back anything to undo (a device refused for
  // its state, a paused VM's in STOP, or one never read, is left as it was).
  bool touched_ = false;
  int data_fd_ = -1;
  std::atomic<unsigned> rounds_{0};
  uint64_t round_bytes_ = 0;
  uint64_t round_budget_ = 0;  // v1: the pending bytes a round set out to move
  bool round_open_ = false;
  uint64_t prev_remaining_ = UINT64_MAX;
  uint64_t precopy_bytes_ = 0;
  uint64_t stopcopy_bytes_ = 0;
  Clock::time_point precopy_start_;
  std::optional<Clock::time_point> stopcopy_start_;
  struct Txn {
    bool open = false;
    uint64_t offset = 0;  // region-relative
    uint64_t size = 0;
    uint64_t pos = 0;
  } txn_;
  unsigned empty_txns_ = 0;
  std::string failed_;
  const Cancel* cancel_ = nullptr;
  std::atomic<int> views_out_{0};
  uint64_t next_token_ = 0;
  uint64_t view_bytes_ = 0;
  uint64_t copied_bytes_ = 0;
};

class DeviceSink final : public io::Sink {
 public:
  explicit DeviceSink(OpenedDevice device);
  ~DeviceSink() override;

  std::string describe() const override { return dev_.spec; }
  void write(io::Ring& ring, uint64_t offset, std::span<const std::byte> data) override;
  void end_transaction(io::Ring& ring) override;
  void commit(io::Ring& ring, uint64_t total_bytes) override;
  void abort() noexcept override;

  io::vfio::Protocol protocol() const { return dev_.device->protocol(); }
  std::string device_state();
  std::string state_digest();
  uint64_t transactions() const { return transactions_; }  // v1 transactions written
  const std::string& abort_note() const { return abort_note_; }
  io::vfio::VfioDevice& device() { return *dev_.device; }
  io::vfio::EmuKernel* emu() { return dev_.emu.get(); }
  int emu_id() const { return dev_.emu_id; }

 private:
  void begin();
  void write_v1_bytes(io::Ring& ring, uint64_t region_offset, std::span<const std::byte> data);
  void flush_transaction();
  std::string device_says() const;  // emulated devices: " (device: why)"
  [[noreturn]] void fail(const std::string& what, int err = 0) const;

  OpenedDevice dev_;
  bool begun_ = false;
  bool committed_ = false;
  bool aborted_ = false;
  int data_fd_ = -1;
  bool txn_open_ = false;
  uint64_t txn_offset_ = 0;
  uint64_t txn_capacity_ = 0;
  uint64_t txn_pos_ = 0;
  uint64_t transactions_ = 0;
  std::string abort_note_;
};

std::unique_ptr<MigrationSource> open_migration_source(std::string_view spec, const MigrateOptions& options);
std::unique_ptr<DeviceSink> open_device_sink(
    std::string_view spec, io::vfio::ProtocolChoice choice = io::vfio::ProtocolChoice::detect);

struct MigrateResult {
  Result transfer;
  double downtime_ms =
      -1;  // from entering stop-copy to COMMITTED (or, on failure, to running again); -1 if never
  unsigned precopy_rounds = 0;
  uint64_t precopy_bytes = 0;
  uint64_t stopcopy_bytes = 0;
  std::string protocol;      // "v1" or "v2"
  std::string device_state;  // the source device's state at the end
  std::string state_digest;  // emulated devices
  std::string device_note;  // what the device needed after the transfer (a failed STOP, a reset), if anything
};

// One migration: send the device state, then STOP after COMMITTED, or RUNNING after any failure.
// `want_digest` computes the emulated device's state digest for the report. Never throws.
MigrateResult migrate(MigrationSource& source, std::vector<io::Fd> connections, const SendOptions& options,
                      Stats* stats, const Cancel* cancel, bool want_digest = true);
MigrateResult migrate_to(MigrationSource& source, const io::HostPort& to, const SendOptions& options,
                         Stats* stats, const Cancel* cancel, bool want_digest = true);

// For dstx recv --json: ,"protocol":"v2","device_state":"STOP","state_digest":"…" when `sink` is a device
// sink (state_digest for emulated devices only); "" for any other sink.
std::string device_sink_json_fields(io::Sink& sink);

}  // namespace dstx::engine
