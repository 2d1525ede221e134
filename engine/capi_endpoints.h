// The C ABI's endpoints: turns a dstx_endpoint into an engine Source or Sink, including the kinds only the
// C ABI has (caller buffers, caller fds that stay the caller's). Private to engine/capi*.cpp.
#pragma once

#include <memory>
#include <string>

#include "dstx/dstx.h"
#include "engine/migrate.h"
#include "io/endpoints.h"
#include "io/socket.h"

namespace dstx::capi {

// A status with its detailed text: what every fallible step of the C ABI returns.
struct Status {
  int code = DSTX_OK;
  std::string text;
  bool ok() const { return code == DSTX_OK; }
};

inline Status failure(int code, std::string text) {
  return Status{code, std::move(text)};
}

struct OpenedSource {
  std::unique_ptr<io::Source> source;
  engine::MigrationSource* device = nullptr;  // `source` when it is a VFIO device (fd or device spec)
};

struct OpenedSink {
  // The library's duplicate of a caller's fd when the sink does not own it. Declared first so that it is
  // closed after the sink is gone.
  io::Fd fd;
  std::unique_ptr<io::Sink> sink;
  engine::DeviceSink* device = nullptr;  // `sink` when it is a VFIO device (fd or device spec)
};

// `endpoint` has been size-checked and copied into a full-size struct by the caller. `migrate` is what a
// VFIO device source is driven with (pre-copy rounds, downtime target, the before-stop-copy hook); its
// protocol is taken from the endpoint.
Status open_source(const dstx_endpoint& endpoint, const engine::MigrateOptions& migrate, OpenedSource* out);
Status open_sink(const dstx_endpoint& endpoint, OpenedSink* out);

// A VFIO device's migration state for dstx_stats: a dstx_device_state and its name. Never throws but
// bad_alloc; an unreadable state is DSTX_DEVICE_UNKNOWN with the reason in the name.
void read_device_state(io::vfio::VfioDevice& device, uint32_t* state, std::string* name);

// dup(F_DUPFD_CLOEXEC) of a caller's fd, with a text naming `what` when it is not an open fd.
Status duplicate_fd(int fd, const char* what, io::Fd* out);

}  // namespace dstx::capi
