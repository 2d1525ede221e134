#include "engine/capi_endpoints.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string_view>
#include <system_error>

#include "engine/spec.h"
#include "io/vfio/mig_fsm.h"

namespace dstx::capi {
namespace {

std::string hex_pointer(const void* p) {
  char text[32];
  std::snprintf(text, sizeof text, "%p", p);
  return text;
}

// Caller memory as a random-access source: the workers copy their chunks straight out of it.
class BufferSource final : public io::Source {
 public:
  BufferSource(const std::byte* data, uint64_t size)
      : data_(data), size_(size), name_("buffer:" + hex_pointer(data) + ",size=" + std::to_string(size)) {}

  std::string describe() const override { return name_; }
  std::optional<uint64_t> size() const override { return size_; }
  bool random_access() const override { return true; }

  void read_at(io::Ring&, uint64_t offset, std::span<std::byte> out) override {
    if (offset > size_ || out.size() > size_ - offset) {
      throw std::out_of_range(name_ + ": read of " + std::to_string(out.size()) + " bytes at offset " +
                              std::to_string(offset) + " lies beyond the size");
    }
    if (!out.empty()) std::memcpy(out.data(), data_ + offset, out.size());
  }

 private:
  const std::byte* data_;
  uint64_t size_;
  std::string name_;
};

// Caller memory as a sink: bytes land at their offset; a state larger than the buffer fails the transfer.
class BufferSink final : public io::Sink {
 public:
  BufferSink(std::byte* data, uint64_t capacity)
      : data_(data),
        capacity_(capacity),
        name_("buffer:" + hex_pointer(data) + ",capacity=" + std::to_string(capacity)) {}

  std::string describe() const override { return name_; }

  void write(io::Ring&, uint64_t offset, std::span<const std::byte> data) override {
    check(offset, data.size());
    if (!data.empty()) std::memcpy(data_ + offset, data.data(), data.size());
    end_ = offset + data.size();
  }

  void write_zero(io::Ring&, uint64_t offset, uint64_t len) override {
    check(offset, len);
    if (len != 0) std::memset(data_ + offset, 0, static_cast<size_t>(len));
    end_ = offset + len;
  }

  // Pieces land where they belong: a sparse chunk is never expanded anywhere else first.
  bool takes_pieces() const override { return true; }

  void commit(io::Ring&, uint64_t total_bytes) override {
    if (total_bytes != end_) {
      throw std::runtime_error(name_ + ": commit of " + std::to_string(total_bytes) + " bytes, but " +
                               std::to_string(end_) + " were written");
    }
  }

  // The caller's memory cannot be un-written; the C ABI documents its contents as unspecified after a
  // failure.
  void abort() noexcept override {}

 private:
  void check(uint64_t offset, uint64_t len) const {
    if (offset != end_) {
      throw std::logic_error(name_ + ": write at offset " + std::to_string(offset) + ", expected offset " +
                             std::to_string(end_));
    }
    if (offset > capacity_ || len > capacity_ - offset) {
      throw std::runtime_error(name_ + ": the state is larger than the buffer (" +
                               std::to_string(offset + len) + " bytes needed so far, capacity " +
                               std::to_string(capacity_) + ")");
    }
  }

  std::byte* data_;
  uint64_t capacity_;
  std::string name_;
  uint64_t end_ = 0;
};

bool is_device_spec(const dstx_endpoint& e) {
  return e.kind == DSTX_ENDPOINT_SPEC && e.spec != nullptr && engine::is_device_spec(e.spec);
}

io::vfio::ProtocolChoice protocol_choice(uint32_t vfio_protocol) {
  switch (vfio_protocol) {
    case DSTX_VFIO_V1:
      return io::vfio::ProtocolChoice::v1;
    case DSTX_VFIO_V2:
      return io::vfio::ProtocolChoice::v2;
    default:
      return io::vfio::ProtocolChoice::detect;
  }
}

// How a VFIO device endpoint is named in texts: the spec, or the caller's fd number.
std::string device_fd_name(int caller_fd) {
  return "VFIO device fd " + std::to_string(caller_fd);
}

// A VFIO device fd that is not one (a file, a socket, a group or container fd) fails its first device ioctl;
// the text says what was expected.
const char* kDeviceFdHint =
    " (DSTX_ENDPOINT_VFIO_DEVICE takes the device fd: an iommufd cdev the VMM bound and attached, or the fd "
    "VFIO_GROUP_GET_DEVICE_FD returned)";

// Checks what every kind needs before anything is opened; `role` names the endpoint in the texts.
Status check_endpoint(const dstx_endpoint& e, const char* role) {
  const std::string who = role;
  if (e.reserved != 0) return failure(DSTX_E_INVALID, who + ": reserved is not 0");
  switch (e.kind) {
    case DSTX_ENDPOINT_NONE:
      return failure(DSTX_E_INVALID, who + ": kind is DSTX_ENDPOINT_NONE (set the endpoint's kind)");
    case DSTX_ENDPOINT_VFIO_DEVICE:
      if (e.vfio_protocol > DSTX_VFIO_V2) {
        return failure(DSTX_E_INVALID, who + ": vfio_protocol " + std::to_string(e.vfio_protocol) +
                                           " is not a dstx_vfio_protocol");
      }
      if (e.fd < 0) return failure(DSTX_E_INVALID, who + ": fd " + std::to_string(e.fd) + " is negative");
      return {};
    case DSTX_ENDPOINT_DATA_FD:
    case DSTX_ENDPOINT_FD:
      if (e.fd < 0) return failure(DSTX_E_INVALID, who + ": fd " + std::to_string(e.fd) + " is negative");
      return {};
    case DSTX_ENDPOINT_FILE:
      if (e.path == nullptr || e.path[0] == '\0') return failure(DSTX_E_INVALID, who + ": path is empty");
      return {};
    case DSTX_ENDPOINT_BUFFER:
      if (e.buffer == nullptr && e.buffer_bytes != 0) {
        return failure(DSTX_E_INVALID,
                       who + ": buffer is NULL but buffer_bytes is " + std::to_string(e.buffer_bytes));
      }
      if (e.buffer_bytes > uint64_t(SIZE_MAX)) {
        return failure(DSTX_E_INVALID, who + ": buffer_bytes does not fit in the address space");
      }
      return {};
    case DSTX_ENDPOINT_SPEC: {
      if (e.spec == nullptr || e.spec[0] == '\0') return failure(DSTX_E_INVALID, who + ": spec is empty");
      const std::string_view spec(e.spec);
      if (engine::is_device_spec(spec) && e.vfio_protocol > DSTX_VFIO_V2) {
        return failure(DSTX_E_INVALID, who + ": vfio_protocol " + std::to_string(e.vfio_protocol) +
                                           " is not a dstx_vfio_protocol");
      }
      if (spec.starts_with("fd:")) {
        return failure(DSTX_E_INVALID, who + ": spec '" + std::string(spec) +
                                           "' would take ownership of the fd; use DSTX_ENDPOINT_FD, which "
                                           "duplicates it and leaves yours open");
      }
      return {};
    }
    default:
      return failure(DSTX_E_UNSUPPORTED, who + ": endpoint kind " + std::to_string(e.kind) +
                                             " is unknown to libdstx " + dstx_version());
  }
}

// Opening failures: bad spec syntax is the caller's mistake; anything else is the endpoint's.
template <class Open>
Status open_guarded(int endpoint_code, Open open) {
  try {
    open();
    return {};
  } catch (const std::invalid_argument& e) {
    return failure(DSTX_E_INVALID, e.what());
  } catch (const std::bad_alloc&) {
    return failure(DSTX_E_NOMEM, "out of memory");
  } catch (const std::exception& e) {
    return failure(endpoint_code, e.what());
  }
}

std::string fd_name(const char* kind, int caller_fd) {
  return std::string(kind) + std::to_string(caller_fd);
}

}  // namespace

Status duplicate_fd(int fd, const char* what, io::Fd* out) {
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (copy < 0) {
    const int err = errno;
    if (err == EBADF)
      return failure(DSTX_E_INVALID, std::string(what) + ": fd " + std::to_string(fd) + " is not open");
    return failure(DSTX_E_SYSTEM, std::string(what) + ": cannot duplicate fd " + std::to_string(fd) + ": " +
                                      std::strerror(err));
  }
  out->reset(copy);
  return {};
}

void read_device_state(io::vfio::VfioDevice& device, uint32_t* state, std::string* name) {
  // dstx_device_state is the v2 uAPI number + 2 (0 and 1 are "no device" and "unknown").
  static_assert(DSTX_DEVICE_ERROR == uint32_t(io::vfio::MigState::error) + 2 &&
                DSTX_DEVICE_PRE_COPY_P2P == uint32_t(io::vfio::MigState::pre_copy_p2p) + 2);
  try {
    if (device.protocol() == io::vfio::Protocol::v2) {
      const io::vfio::MigState s = device.state();
      *state = uint32_t(s) <= uint32_t(io::vfio::MigState::pre_copy_p2p) ? uint32_t(s) + 2
                                                                         : uint32_t(DSTX_DEVICE_UNKNOWN);
      *name = io::vfio::mig_state_name(s);
      return;
    }
    const uint32_t bits = device.v1_state();
    switch (bits & io::vfio::kV1Mask) {
      case io::vfio::kV1Stop:
        *state = DSTX_DEVICE_STOP;
        break;
      case io::vfio::kV1Running:
        *state = DSTX_DEVICE_RUNNING;
        break;
      case io::vfio::kV1Saving | io::vfio::kV1Running:
        *state = DSTX_DEVICE_PRE_COPY;
        break;
      case io::vfio::kV1Saving:
        *state = DSTX_DEVICE_STOP_COPY;
        break;
      case io::vfio::kV1Resuming:
        *state = DSTX_DEVICE_RESUMING;
        break;
      default:  // SAVING|RESUMING and RESUMING|RUNNING (invalid) alike
        *state = DSTX_DEVICE_ERROR;
        break;
    }
    *name = io::vfio::v1_state_name(bits);
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    *state = DSTX_DEVICE_UNKNOWN;
    *name = std::string("UNKNOWN (") + e.what() + ")";
  }
}

Status open_source(const dstx_endpoint& e, const engine::MigrateOptions& migrate, OpenedSource* out) {
  if (Status s = check_endpoint(e, "source"); !s.ok()) return s;
  engine::MigrateOptions options = migrate;
  options.protocol = protocol_choice(e.vfio_protocol);
  if (is_device_spec(e)) {
    return open_guarded(DSTX_E_SOURCE, [&] {
      std::unique_ptr<engine::MigrationSource> source = engine::open_migration_source(e.spec, options);
      out->device = source.get();
      out->source = std::move(source);
    });
  }
  switch (e.kind) {
    case DSTX_ENDPOINT_VFIO_DEVICE: {
      io::Fd copy;
      if (Status s = duplicate_fd(e.fd, "source", &copy); !s.ok()) return s;
      Status s = open_guarded(DSTX_E_SOURCE, [&] {
        std::string name = device_fd_name(e.fd);
        engine::OpenedDevice device =
            engine::open_device_fd(copy.release(), options.protocol, std::move(name));
        auto source = std::make_unique<engine::MigrationSource>(std::move(device), options);
        out->device = source.get();
        out->source = std::move(source);
      });
      if (!s.ok() && s.text.find("VFIO_DEVICE_GET_INFO") != std::string::npos) s.text += kDeviceFdHint;
      return s;
    }
    case DSTX_ENDPOINT_DATA_FD:
    case DSTX_ENDPOINT_FD: {
      io::Fd copy;
      if (Status s = duplicate_fd(e.fd, "source", &copy); !s.ok()) return s;
      const char* prefix = e.kind == DSTX_ENDPOINT_DATA_FD ? "data_fd:" : "fd:";
      return open_guarded(DSTX_E_SOURCE, [&] {
        out->source = io::open_fd_source(copy.get(), /*owned=*/true, fd_name(prefix, e.fd));
        copy.release();
      });
    }
    case DSTX_ENDPOINT_FILE:
      return open_guarded(DSTX_E_SOURCE, [&] { out->source = io::open_file_source(e.path); });
    case DSTX_ENDPOINT_BUFFER:
      return open_guarded(DSTX_E_SOURCE, [&] {
        out->source = std::make_unique<BufferSource>(static_cast<const std::byte*>(e.buffer), e.buffer_bytes);
      });
    case DSTX_ENDPOINT_SPEC:
      return open_guarded(DSTX_E_SOURCE, [&] { out->source = engine::open_source(e.spec); });
    default:
      return failure(DSTX_E_INTERNAL, "source: kind " + std::to_string(e.kind) + " passed the checks");
  }
}

Status open_sink(const dstx_endpoint& e, OpenedSink* out) {
  if (Status s = check_endpoint(e, "sink"); !s.ok()) return s;
  const io::vfio::ProtocolChoice choice = protocol_choice(e.vfio_protocol);
  if (is_device_spec(e)) {
    return open_guarded(DSTX_E_SINK, [&] {
      std::unique_ptr<engine::DeviceSink> sink = engine::open_device_sink(e.spec, choice);
      out->device = sink.get();
      out->sink = std::move(sink);
    });
  }
  switch (e.kind) {
    case DSTX_ENDPOINT_VFIO_DEVICE: {
      io::Fd copy;
      if (Status s = duplicate_fd(e.fd, "sink", &copy); !s.ok()) return s;
      Status s = open_guarded(DSTX_E_SINK, [&] {
        std::string name = device_fd_name(e.fd);
        auto sink = std::make_unique<engine::DeviceSink>(
            engine::open_device_fd(copy.release(), choice, std::move(name)));
        out->device = sink.get();
        out->sink = std::move(sink);
      });
      if (!s.ok() && s.text.find("VFIO_DEVICE_GET_INFO") != std::string::npos) s.text += kDeviceFdHint;
      return s;
    }
    case DSTX_ENDPOINT_DATA_FD:
    case DSTX_ENDPOINT_FD: {
      if (Status s = duplicate_fd(e.fd, "sink", &out->fd); !s.ok()) return s;
      const char* prefix = e.kind == DSTX_ENDPOINT_DATA_FD ? "data_fd:" : "fd:";
      // Not owned: on failure the fd sink then shuts a socket down (the reader sees the end) instead of
      // closing a duplicate, which would end nothing while the caller's fd is open. We close it ourselves.
      return open_guarded(DSTX_E_SINK, [&] {
        out->sink = io::open_fd_sink(out->fd.get(), /*owned=*/false, fd_name(prefix, e.fd));
      });
    }
    case DSTX_ENDPOINT_FILE:
      return open_guarded(DSTX_E_SINK, [&] { out->sink = io::open_file_sink(e.path); });
    case DSTX_ENDPOINT_BUFFER:
      return open_guarded(DSTX_E_SINK, [&] {
        out->sink = std::make_unique<BufferSink>(static_cast<std::byte*>(e.buffer), e.buffer_bytes);
      });
    case DSTX_ENDPOINT_SPEC:
      return open_guarded(DSTX_E_SINK, [&] { out->sink = engine::open_sink(e.spec); });
    default:
      return failure(DSTX_E_INTERNAL, "sink: kind " + std::to_string(e.kind) + " passed the checks");
  }
}

}  // namespace dstx::capi
