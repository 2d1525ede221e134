#include "engine/migrate.h"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <stdexcept>

#include "engine/spec.h"
#include "io/vfio/mig_fsm.h"

namespace dstx::engine {
namespace {

using io::vfio::DevicePath;
using io::vfio::EmuDeviceConfig;
using io::vfio::EmuFault;
using io::vfio::MigState;
using io::vfio::Protocol;
using io::vfio::ProtocolChoice;

// A device that keeps answering "no data" while claiming pending bytes is broken; this many in a row ends it.
constexpr unsigned kEmptyTransactionsMax = 1000;
// An emulated device's state, at most (its bookkeeping is ~14 bytes per 4 KiB page).
constexpr uint64_t kEmuSizeMax = 64ull << 30;

std::invalid_argument bad(std::string text) {
  return std::invalid_argument(std::move(text));
}

bool parse_bool(std::string_view key, std::string_view value) {
  if (value == "1" || value == "yes" || value == "on") return true;
  if (value == "0" || value == "no" || value == "off") return false;
  throw bad("emu: " + std::string(key) + "=" + std::string(value) + ": expected 0 or 1");
}

EmuFault parse_fault(std::string_view text) {
  const size_t at = text.find('@');
  const std::string_view name = text.substr(0, at);
  EmuFault f;
  if (!io::vfio::emu_fault_kind_from_name(name, &f.kind)) {
    throw bad("emu: unknown fault '" + std::string(text) + "' (one of " + io::vfio::kEmuFaultNames + ")");
  }
  const bool wants_arg = io::vfio::emu_fault_takes_bytes(f.kind) || io::vfio::emu_fault_takes_state(f.kind);
  if (wants_arg != (at != std::string_view::npos)) {
    throw bad("emu: fault '" + std::string(text) +
              "': " + (wants_arg ? "needs @BYTES or @STATE" : "takes no @ argument"));
  }
  if (!wants_arg) return f;
  const std::string_view arg = text.substr(at + 1);
  if (io::vfio::emu_fault_takes_bytes(f.kind)) {
    f.at = parse_size(arg);
    return f;
  }
  // [FROM-]STATE: state names have underscores, never dashes.
  const size_t dash = arg.find('-');
  const std::string_view into = dash == std::string_view::npos ? arg : arg.substr(dash + 1);
  MigState from;
  const bool from_ok = dash == std::string_view::npos ||
                       (io::vfio::mig_state_from_name(arg.substr(0, dash), &from) && from != MigState::error);
  if (!from_ok || !io::vfio::mig_state_from_name(into, &f.state) || f.state == MigState::error) {
    throw bad("emu: fault '" + std::string(text) +
              "': [FROM-]STATE, each one of RUNNING, STOP, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, "
              "PRE_COPY_P2P");
  }
  if (dash != std::string_view::npos) f.from = from;
  return f;
}

std::string json_text(const std::string& s) {
  std::string out;
  for (const char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out;
}

}  // namespace

bool is_device_spec(std::string_view spec) {
  return spec.starts_with("vfio:") || spec.starts_with("vfio-group:") || spec.starts_with("emu-v1:") ||
         spec.starts_with("emu-v2:");
}

EmuDeviceConfig parse_emu_device(Protocol protocol, std::string_view params, DevicePath::Kind* open_as) {
  EmuDeviceConfig c;
  c.protocol = protocol;
  *open_as = protocol == Protocol::v2 ? DevicePath::Kind::cdev : DevicePath::Kind::group;
  EmuSpec content{.size = c.state.size, .profile = c.state.profile, .seed = c.state.seed};
  const bool v1 = protocol == Protocol::v1;
  for_each_param(params, "emu", [&](std::string_view key, std::string_view value) {
    if (parse_emu_key(key, value, &content)) {
      if (key == "size" && (content.size == 0 || content.size > kEmuSizeMax))
        throw bad("emu: size must be 1 byte to 64G");
    } else if (key == "dirty") {
      c.state.dirty_bytes_per_sec = parse_size(value);
    } else if (key == "fault") {
      c.faults.push_back(parse_fault(value));
    } else if (key == "open") {
      if (value == "cdev")
        *open_as = DevicePath::Kind::cdev;
      else if (value == "group")
        *open_as = DevicePath::Kind::group;
      else
        throw bad("emu: open=" + std::string(value) + ": expected cdev or group");
    } else if (!v1 && key == "precopy") {
      c.precopy = parse_bool(key, value);
    } else if (!v1 && key == "p2p") {
      c.p2p = parse_bool(key, value);
    } else if (!v1 && key == "temp-end") {
      if (value == "enomsg")
        c.enomsg = true;
      else if (value == "zero")
        c.enomsg = false;
      else
        throw bad("emu: temp-end=" + std::string(value) + ": expected enomsg or zero");
    } else if (v1 && key == "section") {
      c.section_bytes = parse_size(value);
      if (c.section_bytes < (64 << 10) || c.section_bytes > (1ull << 30))
        throw bad("emu: section must be 64K to 1G");
    } else if (v1 && key == "mmap") {
      if (value == "all")
        c.mmap = EmuDeviceConfig::Mmap::all;
      else if (value == "part")
        c.mmap = EmuDeviceConfig::Mmap::part;
      else if (value == "none")
        c.mmap = EmuDeviceConfig::Mmap::none;
      else if (value == "ro")
        c.mmap = EmuDeviceConfig::Mmap::read_only;
      else
        throw bad("emu: mmap=" + std::string(value) + ": expected all, part, none or ro");
    } else if (key == "delay-us") {
      c.delay_us = uint32_t(std::min<uint64_t>(parse_emu_number(key, value), 10'000'000));
    } else {
      throw bad("emu-" + std::string(io::vfio::protocol_name(protocol)) + ": unknown key '" +
                std::string(key) + "' (" + kEmuDeviceKeys + ")");
    }
  });
  c.state.size = content.size;
  c.state.profile = content.profile;
  c.state.seed = content.seed;
  return c;
}

OpenedDevice open_device(std::string_view spec, ProtocolChoice choice) {
  OpenedDevice d;
  d.spec = std::string(spec);
  if (spec.starts_with("emu-v1:") || spec.starts_with("emu-v2:")) {
    const Protocol protocol = spec.starts_with("emu-v1:") ? Protocol::v1 : Protocol::v2;
    DevicePath::Kind open_as;
    const EmuDeviceConfig config = parse_emu_device(protocol, spec.substr(7), &open_as);
    d.emu = std::make_shared<io::vfio::EmuKernel>();
    const io::vfio::EmuKernel::Added added = d.emu->add_device(config);
    d.emu_id = added.id;
    d.device = io::vfio::VfioDevice::open(d.emu, open_as == DevicePath::Kind::cdev ? added.cdev : added.group,
                                          choice);
    return d;
  }
  d.device = io::vfio::VfioDevice::open(io::vfio::real_kernel(), io::vfio::parse_device_path(spec), choice);
  return d;
}

OpenedDevice open_device_fd(int fd, ProtocolChoice choice, std::string name,
                            std::shared_ptr<io::vfio::Kernel> kernel) {
  OpenedDevice d;
  d.device = io::vfio::VfioDevice::adopt(kernel ? std::move(kernel) : io::vfio::real_kernel(), fd,
                                         std::move(name), choice);
  d.spec = d.device->describe();
  return d;
}

// ================================================================ MigrationSource

MigrationSource::MigrationSource(OpenedDevice device, const MigrateOptions& options)
    : dev_(std::move(device)), opt_(options) {}

MigrationSource::~MigrationSource() {
  if (phase_ != Phase::committed) roll_back();
  close_data_fd();
}

void MigrationSource::fail(const std::string& what, int err) const {
  throw std::runtime_error(dev_.spec + ": " + what +
                           (err ? ": " + io::vfio::errno_text(err) : std::string()) +
                           (dev_.emu && !dev_.emu->counters(dev_.emu_id).last_error.empty()
                                ? " (device: " + dev_.emu->counters(dev_.emu_id).last_error + ")"
                                : std::string()));
}

std::optional<uint64_t> MigrationSource::size_estimate() {
  if (dev_.device->protocol() != Protocol::v2) return std::nullopt;  // v1's pending_bytes needs SAVING
  return dev_.device->stop_copy_length();
}

void MigrationSource::close_data_fd() {
  if (data_fd_ >= 0) dev_.device->kernel().close(data_fd_);
  data_fd_ = -1;
}

void MigrationSource::account(uint64_t n) {
  if (phase_ == Phase::precopy) {
    precopy_bytes_ += n;
    round_bytes_ += n;
  } else {
    stopcopy_bytes_ += n;
  }
}

void MigrationSource::start() {
  io::vfio::VfioDevice& d = *dev_.device;
  if (d.protocol() == Protocol::v2) {
    const MigState s = d.state();
    if (s != MigState::running) {
      fail(std::string("the device is ") + io::vfio::mig_state_name(s) + "; a migration starts from RUNNING");
    }
    touched_ = true;
    if ((d.migration_flags() & VFIO_MIGRATION_PRE_COPY) && opt_.precopy_max_rounds > 0) {
      int fd = -1;
      if (const int rc = d.set_state(MigState::pre_copy, &fd); rc < 0) fail("RUNNING -> PRE_COPY", -rc);
      if (fd < 0) fail("RUNNING -> PRE_COPY returned no data_fd");
      data_fd_ = fd;
      phase_ = Phase::precopy;
      precopy_start_ = Clock::now();
      return;
    }
  } else {
    const uint32_t s = d.v1_state();
    if ((s & io::vfio::kV1Mask) != io::vfio::kV1Running) {
      fail("the device is " + io::vfio::v1_state_name(s) + "; a migration starts from RUNNING");
    }
    touched_ = true;
    if (opt_.precopy_max_rounds > 0) {
      if (const int rc = d.v1_set_state(io::vfio::kV1Saving | io::vfio::kV1Running); rc < 0) {
        fail("device_state SAVING|RUNNING (pre-copy)", -rc);
      }
      phase_ = Phase::precopy;
      precopy_start_ = Clock::now();
      return;
    }
  }
  enter_stopcopy();
}

void MigrationSource::enter_stopcopy() {
  io::vfio::VfioDevice& d = *dev_.device;
  stopcopy_start_ = Clock::now();                      // the VM's devices stop here: downtime begins
  if (opt_.before_stop_copy) opt_.before_stop_copy();  // the VMM pauses its vCPUs
  if (d.protocol() == Protocol::v2) {
    int fd = -1;
    if (const int rc = d.set_state(MigState::stop_copy, &fd); rc < 0) {
      fail(std::string(phase_ == Phase::precopy ? "PRE_COPY" : "RUNNING") + " -> STOP_COPY", -rc);
    }
    // From PRE_COPY the saving session goes on (no new fd); a driver that hands out another fd for the same
    // session is tolerated: the new one is read from here on.
    if (fd >= 0 && fd != data_fd_) {
      close_data_fd();
      data_fd_ = fd;
    }
    if (data_fd_ < 0) fail("STOP_COPY returned no data_fd");
  } else if (const int rc = d.v1_set_state(io::vfio::kV1Saving); rc < 0) {
    fail("device_state SAVING (stop-and-copy)", -rc);
  }
  phase_ = Phase::stopcopy;
}

// A pre-copy round ended. Stop pre-copy when the rounds are used up, when the round moved nothing, when the
// remaining state no longer shrinks, or when it fits the downtime target at the rate seen so far (and the
// device has no initial data left to give).
bool MigrationSource::end_round(uint64_t remaining, uint64_t initial_left) {
  ++rounds_;
  const double seconds = std::chrono::duration<double>(Clock::now() - precopy_start_).count();
  const double rate = seconds > 0 ? double(precopy_bytes_) / seconds : 0;
  const bool fits = rate > 0 && double(remaining) / rate * 1000.0 <= double(opt_.downtime_target_ms);
  const bool stop = rounds_ >= opt_.precopy_max_rounds || round_bytes_ == 0 || (fits && initial_left == 0) ||
                    (rounds_ >= 2 && remaining >= prev_remaining_);
  prev_remaining_ = remaining;
  round_bytes_ = 0;
  if (stop) enter_stopcopy();
  return stop;
}

size_t MigrationSource::read_next(io::Ring& ring, std::span<std::byte> out, io::ReadInfo* info) {
  // The first failure is the one to report: every later read (another worker's) repeats it rather than
  // describing its consequence.
  if (!failed_.empty()) throw std::runtime_error(failed_);
  try {
    switch (phase_) {
      case Phase::done:
        return 0;
      case Phase::committed:
      case Phase::rolled_back:
        throw std::logic_error(dev_.spec + ": read after the migration ended");
      case Phase::idle:
        start();
        break;
      default:
        break;
    }
    return dev_.device->protocol() == Protocol::v2 ? read_v2(ring, out) : read_v1(ring, out, info);
  } catch (const std::exception& e) {
    failed_ = e.what();
    throw;
  }
}

size_t MigrationSource::read_v2(io::Ring& ring, std::span<std::byte> out) {
  io::vfio::VfioDevice& d = *dev_.device;
  io::vfio::Kernel& k = d.kernel();
  size_t filled = 0;
  // Bounded: every pass either moves bytes, ends a round (at most precopy_max_rounds), or ends the stream.
  for (uint64_t pass = 0;; ++pass) {
    if (filled == out.size()) return filled;
    const int64_t n = k.read(ring, data_fd_, out.data() + filled, out.size() - filled, -1);
    if (n > 0) {
      filled += size_t(n);
      account(uint64_t(n));
      continue;
    }
    if (n == -EINTR || n == -EAGAIN) {
      if ((cancel_ && cancel_->requested()) || stop_requested()) {
        fail("gave up waiting for the device (the transfer ended)");
      }
      k.poll(data_fd_, POLLIN, 100);
      continue;
    }
    if (phase_ == Phase::precopy && (n == -ENOMSG || n == 0)) {
      // The temporary end of the pre-copy stream (mtty says so with 0, the uAPI with ENOMSG).
      io::vfio::PrecopyInfo pi;
      const bool have_info = d.precopy_info(data_fd_, &pi) == 0;
      const std::optional<uint64_t> left = d.stop_copy_length();
      const uint64_t remaining = left ? *left : have_info ? pi.initial_bytes + pi.dirty_bytes : 0;
      end_round(remaining, have_info ? pi.initial_bytes : 0);
      continue;
    }
    if (phase_ == Phase::stopcopy && n == 0) {
      phase_ = Phase::done;
      return filled;
    }
    fail(std::string("read of migration data in ") + (phase_ == Phase::precopy ? "PRE_COPY" : "STOP_COPY"),
         n < 0 ? int(-n) : EIO);
  }
}

size_t MigrationSource::read_v1(io::Ring& ring, std::span<std::byte> out, io::ReadInfo* info) {
  io::vfio::VfioDevice& d = *dev_.device;
  const io::vfio::V1Region& region = d.v1_region();
  for (;;) {
    if (txn_.open) {
      const uint64_t at = txn_.offset + txn_.pos;
      const io::vfio::VfioDevice::Span span = d.v1_span(at);
      const size_t n = size_t(std::min<uint64_t>({out.size(), txn_.size - txn_.pos, span.len}));
      if (span.addr) {
        // Zero copy: the engine encodes and sends straight from the mapped data section.
        info->view = span.addr;
        info->view_token = ++next_token_;
        views_out_.fetch_add(1);
        view_bytes_ += n;
      } else {
        for (size_t done = 0; done < n;) {
          const int64_t r =
              d.kernel().read(ring, d.fd(), out.data() + done, n - done, int64_t(region.offset + at + done));
          if (r < 0 && r != -EINTR)
            fail("v1: read of the data section at " + std::to_string(at + done), int(-r));
          if (r == 0) fail("v1: short read of the data section at " + std::to_string(at + done));
          if (r > 0) done += size_t(r);
        }
        copied_bytes_ += n;
      }
      txn_.pos += n;
      account(n);
      if (txn_.pos == txn_.size) {
        info->end_of_transaction = true;
        txn_.open = false;
      }
      return n;
    }
    // The next transaction refills the data section: every view of this one must be back first.
    if (views_out_.load() > 0) return io::kReadAgain;
    const uint64_t pending = d.v1_pending_bytes();  // also tells the driver the last transaction was consumed
    if (phase_ == Phase::precopy) {
      if (!round_open_) {
        round_budget_ = pending;
        round_open_ = true;
      }
      if (pending == 0 || round_bytes_ >= round_budget_) {
        round_open_ = false;
        if (end_round(pending, 0)) continue;  // now stop-and-copy: ask pending_bytes again
        round_budget_ = pending;
        round_open_ = true;
      }
    } else if (pending == 0) {
      phase_ = Phase::done;
      return 0;
    }
    const uint64_t offset = d.v1_data_offset();  // the driver prepares the data (and may take its time)
    const uint64_t size = d.v1_data_size();
    if (offset < sizeof(io::vfio::V1Header) || offset > region.size || size > region.size - offset) {
      fail("v1: the device reported data_offset " + std::to_string(offset) + " and data_size " +
           std::to_string(size) + " outside its " + std::to_string(region.size) + "-byte region");
    }
    if (size == 0) {
      if ((cancel_ && cancel_->requested()) || stop_requested()) {
        fail("gave up waiting for the device (the transfer ended)");
      }
      if (++empty_txns_ > kEmptyTransactionsMax) {
        fail("v1: the device reports " + std::to_string(pending) + " pending bytes but hands out no data");
      }
      if (phase_ == Phase::precopy) round_budget_ = 0;  // nothing more now: end the round
      continue;
    }
    empty_txns_ = 0;
    txn_ = Txn{true, offset, size, 0};
  }
}

void MigrationSource::release_view(uint64_t) {
  views_out_.fetch_sub(1);
}

std::string MigrationSource::finish_committed() {
  io::vfio::VfioDevice& d = *dev_.device;
  std::string note;
  if (d.protocol() == Protocol::v2) {
    if (const int rc = d.set_state(MigState::stop, nullptr); rc < 0) {
      note = "the state was committed, but STOP_COPY -> STOP failed: " + io::vfio::errno_text(-rc);
    }
    close_data_fd();
  } else if (const int rc = d.v1_set_state(io::vfio::kV1Stop); rc < 0) {
    note = "the state was committed, but device_state STOP failed: " + io::vfio::errno_text(-rc);
  }
  phase_ = Phase::committed;
  return note;
}

std::string MigrationSource::roll_back() noexcept {
  if (phase_ == Phase::committed || phase_ == Phase::rolled_back) return {};
  if (!touched_) {
    phase_ = Phase::rolled_back;
    return {};
  }
  std::string note;
  try {
    io::vfio::VfioDevice& d = *dev_.device;
    bool running = false;
    int rc;
    if (d.protocol() == Protocol::v2) {
      rc = d.set_state(MigState::running, nullptr);
      close_data_fd();
      running = rc == 0 && d.state() == MigState::running;
    } else {
      rc = d.v1_set_state(io::vfio::kV1Running);
      running = rc == 0 && (d.v1_state() & io::vfio::kV1Mask) == io::vfio::kV1Running;
    }
    if (!running) {
      // ERROR (or a refused transition) leaves only a reset; it returns the device to RUNNING.
      note = "could not return to RUNNING (" + (rc < 0 ? io::vfio::errno_text(-rc) : d.state_name()) +
             "); reset it";
      if (const int rr = d.reset(); rr < 0) note += ", and the reset failed: " + io::vfio::errno_text(-rr);
      const std::string now = d.state_name();
      if (now != "RUNNING") note += "; the device is " + now;
    }
  } catch (const std::exception& e) {
    note = std::string("roll back: ") + e.what();
  }
  phase_ = Phase::rolled_back;
  return note;
}

std::string MigrationSource::device_state() {
  return dev_.device->state_name();
}

std::string MigrationSource::state_digest() {
  return dev_.emu ? dev_.emu->state_digest(dev_.emu_id).hex() : std::string();
}

// ================================================================ DeviceSink

DeviceSink::DeviceSink(OpenedDevice device) : dev_(std::move(device)) {}

DeviceSink::~DeviceSink() {
  if (!committed_) abort();
  if (data_fd_ >= 0) dev_.device->kernel().close(data_fd_);
}

std::string DeviceSink::device_says() const {
  if (!dev_.emu) return {};
  const std::string why = dev_.emu->counters(dev_.emu_id).last_error;
  return why.empty() ? std::string() : " (device: " + why + ")";
}

void DeviceSink::fail(const std::string& what, int err) const {
  throw std::runtime_error(what + (err ? ": " + io::vfio::errno_text(err) : std::string()) + device_says());
}

void DeviceSink::begin() {
  io::vfio::VfioDevice& d = *dev_.device;
  if (d.protocol() == Protocol::v2) {
    const MigState s = d.state();
    if (s != MigState::running && s != MigState::stop) {
      fail(std::string("the device is ") + io::vfio::mig_state_name(s) +
           "; resuming starts from RUNNING or STOP");
    }
    int fd = -1;
    if (const int rc = d.set_state(MigState::resuming, &fd); rc < 0) {
      fail(std::string(io::vfio::mig_state_name(s)) + " -> RESUMING", -rc);
    }
    if (fd < 0) fail("RESUMING returned no data_fd");
    data_fd_ = fd;
  } else {
    const uint32_t s = d.v1_state() & io::vfio::kV1Mask;
    if (s != io::vfio::kV1Running && s != io::vfio::kV1Stop) {
      fail("the device is " + io::vfio::v1_state_name(s) + "; resuming starts from RUNNING or STOP");
    }
    if (const int rc = d.v1_set_state(io::vfio::kV1Resuming); rc < 0) fail("device_state RESUMING", -rc);
  }
  begun_ = true;
}

void DeviceSink::write(io::Ring& ring, uint64_t, std::span<const std::byte> data) {
  if (!begun_) begin();
  io::vfio::VfioDevice& d = *dev_.device;
  if (d.protocol() == Protocol::v2) {
    // In order, segmentation free (the uAPI does not ask to preserve it).
    while (!data.empty()) {
      const int64_t n = d.kernel().write(ring, data_fd_, data.data(), data.size(), -1);
      if (n > 0) {
        data = data.subspan(size_t(n));
      } else if (n == -EINTR || n == -EAGAIN) {
        if (stop_requested()) fail("gave up waiting for the device to take data (the transfer ended)");
        d.kernel().poll(data_fd_, POLLOUT, 100);
      } else {
        fail("write of migration data to RESUMING", n < 0 ? int(-n) : EIO);
      }
    }
    return;
  }
  const io::vfio::V1Region& region = d.v1_region();
  while (!data.empty()) {
    if (!txn_open_) {
      txn_offset_ = d.v1_data_offset();
      if (txn_offset_ < sizeof(io::vfio::V1Header) || txn_offset_ >= region.size) {
        fail("v1: the device reported data_offset " + std::to_string(txn_offset_) + " outside its " +
             std::to_string(region.size) + "-byte region");
      }
      txn_capacity_ = region.size - txn_offset_;
      txn_pos_ = 0;
      txn_open_ = true;
    }
    const size_t take = size_t(std::min<uint64_t>(data.size(), txn_capacity_ - txn_pos_));
    write_v1_bytes(ring, txn_offset_ + txn_pos_, data.first(take));
    txn_pos_ += take;
    data = data.subspan(take);
    // The source's transaction is larger than this device's section: split it here, and only here.
    if (txn_pos_ == txn_capacity_ && !data.empty()) flush_transaction();
  }
}

void DeviceSink::write_v1_bytes(io::Ring& ring, uint64_t at, std::span<const std::byte> data) {
  io::vfio::VfioDevice& d = *dev_.device;
  while (!data.empty()) {
    const io::vfio::VfioDevice::Span span = d.v1_span(at, /*for_write=*/true);
    const size_t n = size_t(std::min<uint64_t>(data.size(), span.len));
    if (span.addr) {
      std::memcpy(span.addr, data.data(), n);
    } else {
      for (size_t done = 0; done < n;) {
        const int64_t r = d.kernel().write(ring, d.fd(), data.data() + done, n - done,
                                           int64_t(d.v1_region().offset + at + done));
        if (r < 0 && r != -EINTR)
          fail("v1: write of the data section at " + std::to_string(at + done), int(-r));
        if (r == 0) fail("v1: the data section accepted no bytes at " + std::to_string(at + done));
        if (r > 0) done += size_t(r);
      }
    }
    at += n;
    data = data.subspan(n);
  }
}

void DeviceSink::flush_transaction() {
  try {
    dev_.device->v1_set_data_size(txn_pos_);  // the driver consumes the transaction now
  } catch (const io::vfio::VfioError& e) {
    fail(std::string(e.what()) + " (transaction " + std::to_string(transactions_ + 1) + ", " +
         std::to_string(txn_pos_) + " bytes)");
  }
  txn_open_ = false;
  ++transactions_;
}

void DeviceSink::end_transaction(io::Ring&) {
  if (dev_.device->protocol() == Protocol::v1 && txn_open_ && txn_pos_ > 0) flush_transaction();
}

void DeviceSink::commit(io::Ring&, uint64_t) {
  if (!begun_) begin();  // an empty stream: the device decides whether that is a state
  io::vfio::VfioDevice& d = *dev_.device;
  if (d.protocol() == Protocol::v2) {
    const int rc = d.set_state(MigState::stop, nullptr);
    if (rc < 0) fail("the device rejected the state (RESUMING -> STOP)", -rc);
    d.kernel().close(data_fd_);
    data_fd_ = -1;
  } else {
    // A stream from a v2 source carries no transaction ends: what is open is the last transaction.
    if (txn_open_ && txn_pos_ > 0) flush_transaction();
    if (const int rc = d.v1_set_state(io::vfio::kV1Stop); rc < 0) {
      fail("the device rejected the state (device_state RESUMING -> STOP)", -rc);
    }
  }
  committed_ = true;
}

void DeviceSink::abort() noexcept {
  if (aborted_) return;  // after the commit too: the device holds a state the sender never saw committed
  aborted_ = true;
  try {
    if (data_fd_ >= 0) dev_.device->kernel().close(data_fd_);
    data_fd_ = -1;
    // Aborting RESUMING takes a reset; a device that never started resuming gets one too, so whatever it
    // holds after a failed transfer is a fresh device's state, never a half-loaded one.
    if (const int rc = dev_.device->reset(); rc < 0)
      abort_note_ = "reset failed: " + io::vfio::errno_text(-rc);
  } catch (const std::exception& e) {
    abort_note_ = e.what();
  }
}

std::string DeviceSink::device_state() {
  return dev_.device->state_name();
}

std::string DeviceSink::state_digest() {
  return dev_.emu ? dev_.emu->state_digest(dev_.emu_id).hex() : std::string();
}

// ================================================================ opening and the driver

std::unique_ptr<MigrationSource> open_migration_source(std::string_view spec, const MigrateOptions& options) {
  return std::make_unique<MigrationSource>(open_device(spec, options.protocol), options);
}

std::unique_ptr<DeviceSink> open_device_sink(std::string_view spec, ProtocolChoice choice) {
  return std::make_unique<DeviceSink>(open_device(spec, choice));
}

namespace {

MigrateResult finish(MigrationSource& source, Result transfer, bool want_digest) {
  MigrateResult r;
  const auto ended = MigrationSource::Clock::now();
  r.device_note = transfer.committed ? source.finish_committed() : source.roll_back();
  if (const auto started = source.stop_copy_started()) {
    // Committed: the downtime ends with COMMITTED, not with the teardown of send()'s threads.
    const auto until =
        transfer.committed ? transfer.committed_at.value_or(ended) : MigrationSource::Clock::now();
    r.downtime_ms = std::chrono::duration<double, std::milli>(until - *started).count();
  }
  r.transfer = std::move(transfer);
  r.precopy_rounds = source.precopy_rounds();
  r.precopy_bytes = source.precopy_bytes();
  r.stopcopy_bytes = source.stopcopy_bytes();
  r.protocol = io::vfio::protocol_name(source.protocol());
  r.device_state = source.device_state();
  if (want_digest) r.state_digest = source.state_digest();
  return r;
}

// The transfer's result, also when it throws after all (out of memory): the device is then rolled back now,
// not when the source goes.
template <typename Send>
Result sent(Send&& send) {
  try {
    return send();
  } catch (const std::exception& e) {
    Result r;
    r.reason = wire::Reason::internal;
    r.error = e.what();
    return r;
  }
}

}  // namespace

MigrateResult migrate(MigrationSource& source, std::vector<io::Fd> connections, const SendOptions& options,
                      Stats* stats, const Cancel* cancel, bool want_digest) {
  source.set_cancel(cancel);
  return finish(source, sent([&] { return send(source, std::move(connections), options, stats, cancel); }),
                want_digest);
}

MigrateResult migrate_to(MigrationSource& source, const io::HostPort& to, const SendOptions& options,
                         Stats* stats, const Cancel* cancel, bool want_digest) {
  source.set_cancel(cancel);
  return finish(source, sent([&] { return send_to(source, to, options, stats, cancel); }), want_digest);
}

std::string device_sink_json_fields(io::Sink& sink) {
  auto* device = dynamic_cast<DeviceSink*>(&sink);
  if (!device) return {};
  std::string out = std::string(",\"protocol\":\"") + io::vfio::protocol_name(device->protocol()) +
                    "\",\"device_state\":\"" + json_text(device->device_state()) + "\"";
  const std::string digest = device->state_digest();
  if (!digest.empty()) out += ",\"state_digest\":\"" + digest + "\"";
  if (!device->abort_note().empty()) out += ",\"device_note\":\"" + json_text(device->abort_note()) + "\"";
  return out;
}

}  // namespace dstx::engine
