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

const char* kVfioUnsupported =
    "DSTX_ENDPOINT_VFIO_DEVICE is not implemented in this version of libdstx yet: the VFIO migration driver "
    "(v1 migration region and v2 data_fd, pre-copy rounds, stop-copy, resume) is being wired into the C ABI. "
    "Until then, move the device into STOP_COPY (source) or RESUMING (sink) yourself and pass its migration "
    "data_fd as DSTX_ENDPOINT_DATA_FD";

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
      return failure(DSTX_E_UNSUPPORTED, who + ": " + kVfioUnsupported);
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
      for (const char* device : {"vfio:", "vfio-group:", "emu-v1:", "emu-v2:"}) {
        if (spec.starts_with(device)) {
          return failure(DSTX_E_UNSUPPORTED,
                         who + ": '" + std::string(spec) + "' is a VFIO device; " + kVfioUnsupported);
        }
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

Status open_source(const dstx_endpoint& e, OpenedSource* out) {
  if (Status s = check_endpoint(e, "source"); !s.ok()) return s;
  switch (e.kind) {
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
  switch (e.kind) {
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
