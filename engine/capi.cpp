// The exported functions of libdstx: argument and config checking, handle life cycle, and the translation
// from C structs to engine options. Every entry point catches everything: no exception leaves the library.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string_view>

#include "dstx/dstx.h"
#include "engine/capi_endpoints.h"
#include "engine/capi_transfer.h"
#include "engine/tune_profile.h"
#include "engine/wire.h"
#include "io/socket.h"

#ifndef DSTX_LIBRARY_VERSION
#error "DSTX_LIBRARY_VERSION must be defined by the build (project(VERSION))"
#endif
static_assert(
    std::string_view(DSTX_LIBRARY_VERSION) == DSTX_VERSION_STRING,
    "include/dstx/dstx.h: the DSTX_VERSION_* macros disagree with project(VERSION) in CMakeLists.txt");
static_assert(DSTX_VERSION_NUMBER ==
              DSTX_VERSION_MAJOR * 10000 + DSTX_VERSION_MINOR * 100 + DSTX_VERSION_PATCH);

namespace {

using dstx::capi::failure;
using dstx::capi::from_handle;
using dstx::capi::Status;
using dstx::capi::to_handle;
using dstx::capi::Transfer;
namespace engine = dstx::engine;
namespace io = dstx::io;
namespace wire = dstx::engine::wire;

// The sizes of the structs as first published (DSTX_1.0, LP64). Callers may pass these or anything larger;
// these numbers never change, whatever is appended to the structs later.
constexpr size_t kEndpointSizeV1 = 56;
constexpr size_t kSendConfigSizeV1 = 144;
constexpr size_t kRecvConfigSizeV1 = 120;
constexpr size_t kStatsSizeV1 = 160;
#if UINTPTR_MAX == UINT64_MAX
// The structs may grow (at their end); the published first sizes stay what they were.
static_assert(sizeof(dstx_endpoint) >= kEndpointSizeV1 && sizeof(dstx_send_config) >= kSendConfigSizeV1 &&
                  sizeof(dstx_recv_config) >= kRecvConfigSizeV1 && sizeof(dstx_stats) >= kStatsSizeV1,
              "a public struct shrank: fields are never removed (tests/capi/check_abi.sh)");
static_assert(offsetof(dstx_endpoint, reserved) + sizeof(uint32_t) == kEndpointSizeV1 &&
                  offsetof(dstx_send_config, user) + sizeof(void*) == kSendConfigSizeV1 &&
                  offsetof(dstx_recv_config, user) + sizeof(void*) == kRecvConfigSizeV1 &&
                  offsetof(dstx_stats, digest) + sizeof(uint64_t) == kStatsSizeV1,
              "the last field of a first-version struct moved: new fields go after it");
// Appended after the first release (VFIO device endpoints, TLS, memory and zero-copy), pinned the same way:
// later fields go after.
static_assert(offsetof(dstx_send_config, before_stop_copy) == kSendConfigSizeV1 &&
                  offsetof(dstx_send_config, replay_buffer_bytes) == kSendConfigSizeV1 + 48 &&
                  offsetof(dstx_send_config, zero_copy_min_bytes) == kSendConfigSizeV1 + 56 &&
                  offsetof(dstx_send_config, send_flags) == kSendConfigSizeV1 + 64 &&
                  offsetof(dstx_send_config, reserved2) == kSendConfigSizeV1 + 68 &&
                  offsetof(dstx_send_config, tuned_raw_bytes_per_second) == kSendConfigSizeV1 + 72 &&
                  offsetof(dstx_send_config, tuned_lz4_bytes_per_second) == kSendConfigSizeV1 + 80 &&
                  sizeof(dstx_send_config) == kSendConfigSizeV1 + 88 &&
                  offsetof(dstx_recv_config, tls_ca_file) == kRecvConfigSizeV1 &&
                  sizeof(dstx_recv_config) == kRecvConfigSizeV1 + 5 * sizeof(void*) &&
                  offsetof(dstx_stats, device_state) == kStatsSizeV1 &&
                  offsetof(dstx_stats, state_digest) == 256 - 40 && offsetof(dstx_stats, resumes) == 256 &&
                  offsetof(dstx_stats, paged_chunks) + 8 == sizeof(dstx_stats) && sizeof(dstx_stats) == 312,
              "a field appended after the first release moved: new fields go after it");
#endif

// Published numbers (dstx.h). abidiff cannot see them (functions take and return them as plain integers),
// so they are pinned here: changing one fails the build.
static_assert(DSTX_OK == 0 && DSTX_E_INVALID == 1 && DSTX_E_UNSUPPORTED == 2 && DSTX_E_NOMEM == 3 &&
              DSTX_E_STATE == 4 && DSTX_E_AGAIN == 5 && DSTX_E_SOURCE == 6 && DSTX_E_SINK == 7 &&
              DSTX_E_CONNECTION == 8 && DSTX_E_TIMEOUT == 9 && DSTX_E_CANCELLED == 10 &&
              DSTX_E_PROTOCOL == 11 && DSTX_E_INTEGRITY == 12 && DSTX_E_SYSTEM == 13 &&
              DSTX_E_INTERNAL == 14);
static_assert(DSTX_ENDPOINT_NONE == 0 && DSTX_ENDPOINT_VFIO_DEVICE == 1 && DSTX_ENDPOINT_DATA_FD == 2 &&
              DSTX_ENDPOINT_FILE == 3 && DSTX_ENDPOINT_FD == 4 && DSTX_ENDPOINT_BUFFER == 5 &&
              DSTX_ENDPOINT_SPEC == 6);
static_assert(DSTX_VFIO_AUTO == 0 && DSTX_VFIO_V1 == 1 && DSTX_VFIO_V2 == 2);
static_assert(DSTX_NET_NONE == 0 && DSTX_NET_ADDRESS == 1 && DSTX_NET_FDS == 2 && DSTX_NET_LISTEN_FD == 3);
static_assert(DSTX_PHASE_IDLE == 0 && DSTX_PHASE_CONNECTING == 1 && DSTX_PHASE_PRECOPY == 2 &&
              DSTX_PHASE_STOP_COPY == 3 && DSTX_PHASE_DONE == 4 && DSTX_PHASE_FAILED == 5);
static_assert(DSTX_DEVICE_NONE == 0 && DSTX_DEVICE_UNKNOWN == 1 && DSTX_DEVICE_ERROR == 2 &&
              DSTX_DEVICE_STOP == 3 && DSTX_DEVICE_RUNNING == 4 && DSTX_DEVICE_STOP_COPY == 5 &&
              DSTX_DEVICE_RESUMING == 6 && DSTX_DEVICE_RUNNING_P2P == 7 && DSTX_DEVICE_PRE_COPY == 8 &&
              DSTX_DEVICE_PRE_COPY_P2P == 9);
static_assert(DSTX_LOG_ERROR == 1 && DSTX_LOG_WARN == 2 && DSTX_LOG_INFO == 3 && DSTX_LOG_DEBUG == 4);
static_assert(DSTX_CODEC_AUTO == 0 && DSTX_CODEC_NONE == 1 && DSTX_CODEC_LZ4 == 2 && DSTX_CODEC_ZSTD == 3 &&
              DSTX_CODEC_SPARSE == 4);
static_assert(DSTX_ABI_VERSION == 1, "the SONAME is libdstx.so.1 (cmake/DstxCapi.cmake)");

// The text dstx_last_error(NULL) returns: the outcome of the calling thread's latest create. A plain array,
// so that no destructor is registered per thread (the library may be dlclose'd).
thread_local char t_create_error[1024];

void set_create_error(const std::string& text) {
  std::snprintf(t_create_error, sizeof t_create_error, "%s", text.c_str());
}

// Copies a caller's size-first struct into a full-size one. A shorter struct (an older header) leaves the
// newer fields zero, i.e. default; a longer one (a newer header) is accepted when the fields this library
// does not know are all zero, so asking for something this library cannot do never passes silently.
template <class T>
Status copy_sized(const T* in, size_t min_size, const char* name, T* out) {
  if (in == nullptr) return failure(DSTX_E_INVALID, std::string(name) + " is NULL");
  const size_t size = in->size;
  if (size < min_size) {
    return failure(DSTX_E_INVALID, std::string(name) + "->size is " + std::to_string(size) +
                                       ", smaller than any published version of the struct (" +
                                       std::to_string(min_size) + "): initialise it with its DSTX_..._INIT");
  }
  std::memset(static_cast<void*>(out), 0, sizeof(T));
  std::memcpy(static_cast<void*>(out), in, std::min(size, sizeof(T)));
  if (size > sizeof(T)) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(in);
    for (size_t i = sizeof(T); i < size; ++i) {
      if (bytes[i] != 0) {
        return failure(DSTX_E_UNSUPPORTED,
                       std::string(name) + " sets a field at byte " + std::to_string(i) + " that libdstx " +
                           DSTX_LIBRARY_VERSION +
                           " does not know (the program was built against a newer dstx.h)");
      }
    }
  }
  out->size = sizeof(T);
  return {};
}

// Time-outs: 0 is the default, -1 no limit. `unlimited` is what the engine takes for "no limit".
Status timeout_ms(int32_t value, int default_ms, int unlimited, const char* name, int* out) {
  if (value == 0) {
    *out = default_ms;
  } else if (value == -1) {
    *out = unlimited;
  } else if (value < 0) {
    return failure(DSTX_E_INVALID, std::string(name) + " is " + std::to_string(value) +
                                       ": expected milliseconds > 0, 0 for the default or -1 for no limit");
  } else {
    *out = value;
  }
  return {};
}

Status socket_options(int32_t connect_ms, int32_t user_timeout_ms, int32_t keepalive_idle_s,
                      int32_t buffer_bytes, io::SocketOptions* out) {
  const io::SocketOptions defaults;
  if (Status s = timeout_ms(connect_ms, defaults.connect_timeout_ms, -1, "connect_timeout_ms",
                            &out->connect_timeout_ms);
      !s.ok()) {
    return s;
  }
  // -1: leave the kernel's user time-out alone (the engine sets it only when >= 0).
  if (Status s =
          timeout_ms(user_timeout_ms, defaults.user_timeout_ms, -1, "user_timeout_ms", &out->user_timeout_ms);
      !s.ok()) {
    return s;
  }
  if (keepalive_idle_s == 0) {
    out->keepalive_idle_s = defaults.keepalive_idle_s;
  } else if (keepalive_idle_s == -1) {
    out->keepalive_idle_s = 0;  // the engine turns keepalive on only for > 0
  } else if (keepalive_idle_s < 0) {
    return failure(DSTX_E_INVALID, "keepalive_idle_s is " + std::to_string(keepalive_idle_s) +
                                       ": expected seconds > 0, 0 for the default or -1 for none");
  } else {
    out->keepalive_idle_s = keepalive_idle_s;
  }
  if (buffer_bytes < 0) {
    return failure(DSTX_E_INVALID,
                   "socket_buffer_bytes is " + std::to_string(buffer_bytes) + ": must not be negative");
  }
  out->buffer_bytes = buffer_bytes;
  return {};
}

Status chunk_size(uint32_t value, uint32_t default_bytes, const char* name, uint32_t* out) {
  *out = value == 0 ? default_bytes : value;
  if (*out < wire::kMinChunkBytes || *out > wire::kMaxChunkBytes) {
    return failure(DSTX_E_INVALID, std::string(name) + " is " + std::to_string(value) + ": expected " +
                                       std::to_string(wire::kMinChunkBytes) + ".." +
                                       std::to_string(wire::kMaxChunkBytes) + " (or 0 for the default)");
  }
  return {};
}

void common_callbacks(Transfer& t, uint32_t log_level, uint32_t interval_ms, dstx_progress_fn progress,
                      dstx_log_fn log, dstx_complete_fn on_complete, void* user) {
  // Levels above DEBUG (a later TRACE) mean "everything this version has".
  t.log_level = log_level == 0 ? uint32_t(DSTX_LOG_WARN) : log_level;
  t.progress_interval_ms = interval_ms == 0 ? 100 : interval_ms;
  t.progress = progress;
  t.log = log;
  t.on_complete = on_complete;
  t.user = user;
}

Status make_event_fd(Transfer& t) {
  const int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return failure(DSTX_E_SYSTEM, std::string("eventfd: ") + std::strerror(errno));
  t.event_fd.reset(fd);
  return {};
}

Status parse_address(const char* address, const char* name, io::HostPort* out) {
  if (address == nullptr || address[0] == '\0') {
    return failure(DSTX_E_INVALID, std::string(name) + " is empty: expected \"HOST:PORT\"");
  }
  try {
    *out = io::parse_host_port(address);
  } catch (const std::invalid_argument& e) {
    return failure(DSTX_E_INVALID, std::string(name) + ": " + e.what());
  }
  return {};
}

// Duplicates the caller's connected stream sockets (DSTX_NET_FDS).
Status take_connections(const int* fds, uint32_t count, std::vector<io::Fd>* out) {
  for (uint32_t i = 0; i < count; ++i) {
    io::Fd copy;
    const std::string what = "config.fds[" + std::to_string(i) + "]";
    if (Status s = dstx::capi::duplicate_fd(fds[i], what.c_str(), &copy); !s.ok()) return s;
    const std::string which = what + " (fd " + std::to_string(fds[i]) + ")";
    int type = 0, listening = 0;
    socklen_t len = sizeof type;
    if (::getsockopt(copy.get(), SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) {
      return failure(DSTX_E_INVALID, which + " is not a stream socket");
    }
    len = sizeof listening;
    if (::getsockopt(copy.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening != 0) {
      return failure(DSTX_E_INVALID, which +
                                         " is a listening socket: DSTX_NET_FDS takes connected ones (a "
                                         "receiver's listening socket goes in as DSTX_NET_LISTEN_FD)");
    }
    out->push_back(std::move(copy));
  }
  return {};
}

// The TLS fields of either config: NULL means unset. Checked (and every file loaded) at create, so a bad
// certificate is a create error, not a failed transfer.
template <class Config>
Status tls_from_config(const Config& c, engine::TlsOptions* out) {
  auto str = [](const char* p) { return p ? std::string(p) : std::string(); };
  out->ca_file = str(c.tls_ca_file);
  out->cert_file = str(c.tls_cert_file);
  out->key_file = str(c.tls_key_file);
  out->peer_name = str(c.tls_peer_name);
  out->psk_file = str(c.psk_file);
  if (const std::string err = engine::validate_tls_options(*out); !err.empty()) {
    return failure(DSTX_E_INVALID, "config TLS fields: " + err);
  }
  return {};
}

Status setup_send(Transfer& t, const dstx_send_config* config_in, const dstx_endpoint* source_in) {
  dstx_send_config c;
  if (Status s = copy_sized(config_in, kSendConfigSizeV1, "config", &c); !s.ok()) return s;
  dstx_endpoint e;
  if (Status s = copy_sized(source_in, kEndpointSizeV1, "source", &e); !s.ok()) return s;
  t.side = Transfer::Side::send;
  engine::SendOptions& o = t.send_options;
  if (Status s = tls_from_config(c, &o.tls); !s.ok()) return s;
  o.log = [&t](engine::LogLevel level, const std::string& text) { t.log_line(int(level), "send: " + text); };

  switch (c.net) {
    case DSTX_NET_ADDRESS: {
      io::HostPort hp;
      if (Status s = parse_address(c.address, "config.address", &hp); !s.ok()) return s;
      t.connect_to = hp;
      t.streams = c.streams == 0 ? engine::default_streams() : c.streams;
      if (t.streams > wire::kMaxStreams) {
        return failure(DSTX_E_INVALID, "config.streams is " + std::to_string(c.streams) + ": at most " +
                                           std::to_string(wire::kMaxStreams));
      }
      break;
    }
    case DSTX_NET_FDS:
      if (c.fds == nullptr || c.fd_count == 0 || c.fd_count > wire::kMaxStreams) {
        return failure(DSTX_E_INVALID, "config.fds/fd_count: DSTX_NET_FDS needs 1.." +
                                           std::to_string(wire::kMaxStreams) + " connected sockets");
      }
      if (c.streams != 0 && c.streams != c.fd_count) {
        return failure(DSTX_E_INVALID, "config.streams is " + std::to_string(c.streams) +
                                           " but fd_count is " + std::to_string(c.fd_count) +
                                           " (one stream per socket; leave streams 0)");
      }
      t.streams = c.fd_count;
      break;
    case DSTX_NET_LISTEN_FD:
      return failure(DSTX_E_INVALID,
                     "config.net: DSTX_NET_LISTEN_FD is for receiving; a sender connects "
                     "(DSTX_NET_ADDRESS) or uses connected sockets (DSTX_NET_FDS)");
    case DSTX_NET_NONE:
      return failure(DSTX_E_INVALID,
                     "config.net is DSTX_NET_NONE: say where to send (DSTX_NET_ADDRESS or "
                     "DSTX_NET_FDS)");
    default:
      return failure(DSTX_E_UNSUPPORTED, "config.net " + std::to_string(c.net) + " is unknown to libdstx " +
                                             DSTX_LIBRARY_VERSION);
  }

  if (Status s = chunk_size(c.chunk_bytes, engine::kDefaultChunkBytes, "config.chunk_bytes", &o.chunk_bytes);
      !s.ok()) {
    return s;
  }
  o.fit_chunks = c.chunk_bytes == 0;  // asked for: exactly that size
  switch (c.codec) {
    case DSTX_CODEC_AUTO:
      o.codec = engine::CodecMode::auto_select;
      break;
    case DSTX_CODEC_NONE:
      o.codec = engine::CodecMode::none;
      break;
    case DSTX_CODEC_LZ4:
      o.codec = engine::CodecMode::lz4;
      break;
    case DSTX_CODEC_ZSTD:
      o.codec = engine::CodecMode::zstd;
      break;
    case DSTX_CODEC_SPARSE:
      o.codec = engine::CodecMode::sparse;
      break;
    default:
      return failure(DSTX_E_UNSUPPORTED, "config.codec " + std::to_string(c.codec) +
                                             " is unknown to libdstx " + DSTX_LIBRARY_VERSION);
  }
  o.zstd_level = c.zstd_level == 0 ? 1 : c.zstd_level;
  if (o.zstd_level < 1 || o.zstd_level > 19) {
    return failure(DSTX_E_INVALID,
                   "config.zstd_level is " + std::to_string(c.zstd_level) + ": expected 1..19");
  }
  o.depth = c.depth == 0 ? 4 : c.depth;
  if (o.depth > 256) {
    return failure(DSTX_E_INVALID, "config.depth is " + std::to_string(c.depth) + ": at most 256");
  }
  // Its entries are allocated up front: bounded like streams and depth.
  constexpr uint32_t kMaxWindowChunks = uint32_t(wire::kMaxStreams) * 256 * 2;
  if (c.window_chunks > kMaxWindowChunks) {
    return failure(DSTX_E_INVALID, "config.window_chunks is " + std::to_string(c.window_chunks) +
                                       ": at most " + std::to_string(kMaxWindowChunks));
  }
  o.window_chunks = c.window_chunks;
  // The engine's 0 is "never"; ours is the default.
  if (Status s =
          timeout_ms(c.idle_timeout_ms, o.idle_timeout_ms, 0, "config.idle_timeout_ms", &o.idle_timeout_ms);
      !s.ok()) {
    return s;
  }
  o.bandwidth_bytes_per_second = c.bandwidth_bytes_per_second;
  if (c.replay_buffer_bytes > engine::kMaxReplayBytes) {
    return failure(DSTX_E_INVALID, "config.replay_buffer_bytes is " + std::to_string(c.replay_buffer_bytes) +
                                       ": at most " + std::to_string(engine::kMaxReplayBytes) + " (1 GiB)");
  }
  if (c.replay_buffer_bytes != 0) o.replay_bytes = c.replay_buffer_bytes;
  o.zero_copy_min_bytes = size_t(c.zero_copy_min_bytes);
  if ((c.send_flags & ~DSTX_SEND_REGISTER_BUFFERS) != 0) {
    return failure(DSTX_E_UNSUPPORTED, "config.send_flags " + std::to_string(c.send_flags) +
                                           " has bits unknown to libdstx " + DSTX_LIBRARY_VERSION);
  }
  if (c.reserved2 != 0) return failure(DSTX_E_INVALID, "config.reserved2 must be 0");
  o.register_buffers = (c.send_flags & DSTX_SEND_REGISTER_BUFFERS) != 0;
  for (const auto& [value, name] : {std::pair{c.tuned_raw_bytes_per_second, "tuned_raw_bytes_per_second"},
                                    std::pair{c.tuned_lz4_bytes_per_second, "tuned_lz4_bytes_per_second"}}) {
    if (value > engine::kMaxTunedBytesPerSecond) {
      return failure(DSTX_E_INVALID, std::string("config.") + name + " is " + std::to_string(value) +
                                         ": at most 10^12 (1 TB/s)");
    }
  }
  o.tuned_raw_bytes_per_second = c.tuned_raw_bytes_per_second;
  o.tuned_lz4_bytes_per_second = c.tuned_lz4_bytes_per_second;
  if (c.reconnect_attempts < -1) {
    return failure(DSTX_E_INVALID, "config.reconnect_attempts is " + std::to_string(c.reconnect_attempts) +
                                       ": expected attempts > 0, 0 for the default or -1 for no resume");
  }
  if (c.net == DSTX_NET_ADDRESS && c.reconnect_attempts != -1) {
    if (c.reconnect_attempts > 0) o.reconnect_attempts = c.reconnect_attempts;
  } else {
    o.resume = false;
  }
  if (c.precopy_max_rounds < -1) {
    return failure(DSTX_E_INVALID, "config.precopy_max_rounds is " + std::to_string(c.precopy_max_rounds) +
                                       ": expected rounds > 0, 0 for the default or -1 for none");
  }
  // VFIO device sources: the migration driver's options; the others ignore them.
  engine::MigrateOptions migrate;
  if (c.precopy_max_rounds == -1) {
    migrate.precopy_max_rounds = 0;
  } else if (c.precopy_max_rounds > 0) {
    migrate.precopy_max_rounds = unsigned(c.precopy_max_rounds);
  }
  if (c.downtime_target_ms != 0) migrate.downtime_target_ms = c.downtime_target_ms;
  t.precopy_max_rounds = migrate.precopy_max_rounds;
  t.before_stop_copy = c.before_stop_copy;
  migrate.before_stop_copy = [transfer = &t] { transfer->enter_stop_copy(); };
  if (Status s = timeout_ms(c.handshake_timeout_ms, o.handshake_timeout_ms, -1, "config.handshake_timeout_ms",
                            &o.handshake_timeout_ms);
      !s.ok()) {
    return s;
  }
  // The engine's commit wait has a deadline; "no limit" becomes the largest one.
  if (Status s = timeout_ms(c.commit_timeout_ms, o.commit_timeout_ms, INT_MAX, "config.commit_timeout_ms",
                            &o.commit_timeout_ms);
      !s.ok()) {
    return s;
  }
  if (Status s = socket_options(c.connect_timeout_ms, c.user_timeout_ms, c.keepalive_idle_s,
                                c.socket_buffer_bytes, &o.socket);
      !s.ok()) {
    return s;
  }
  if (o.resume && c.net == DSTX_NET_ADDRESS) {
    // As engine::send_to does: a broken stream gets a new connection to the same receiver, with the
    // caller's socket options like the first.
    o.reconnect = [to = *t.connect_to, socket = o.socket] { return io::tcp_connect(to, socket); };
  }
  common_callbacks(t, c.log_level, c.progress_interval_ms, c.progress, c.log, c.on_complete, c.user);

  // Everything checked: now take the caller's fds and open the source.
  if (c.net == DSTX_NET_FDS) {
    if (Status s = take_connections(c.fds, c.fd_count, &t.handed_fds); !s.ok()) return s;
  }
  t.endpoint_kind = e.kind;
  if (Status s = dstx::capi::open_source(e, migrate, &t.source); !s.ok()) return s;
  return make_event_fd(t);
}

Status setup_recv(Transfer& t, const dstx_recv_config* config_in, const dstx_endpoint* sink_in) {
  dstx_recv_config c;
  if (Status s = copy_sized(config_in, kRecvConfigSizeV1, "config", &c); !s.ok()) return s;
  dstx_endpoint e;
  if (Status s = copy_sized(sink_in, kEndpointSizeV1, "sink", &e); !s.ok()) return s;
  t.side = Transfer::Side::recv;
  engine::RecvOptions& o = t.recv_options;
  if (Status s = tls_from_config(c, &o.tls); !s.ok()) return s;
  o.log = [&t](engine::LogLevel level, const std::string& text) { t.log_line(int(level), "recv: " + text); };

  io::HostPort listen_at;
  switch (c.net) {
    case DSTX_NET_ADDRESS:
      if (Status s = parse_address(c.address, "config.address", &listen_at); !s.ok()) return s;
      break;
    case DSTX_NET_LISTEN_FD:
      if (c.fds == nullptr || c.fd_count != 1) {
        return failure(DSTX_E_INVALID,
                       "config.fds/fd_count: DSTX_NET_LISTEN_FD needs exactly one listening socket");
      }
      break;
    case DSTX_NET_FDS:
      if (c.fds == nullptr || c.fd_count == 0 || c.fd_count > wire::kMaxStreams) {
        return failure(DSTX_E_INVALID, "config.fds/fd_count: DSTX_NET_FDS needs 1.." +
                                           std::to_string(wire::kMaxStreams) + " connected sockets");
      }
      break;
    case DSTX_NET_NONE:
      return failure(DSTX_E_INVALID,
                     "config.net is DSTX_NET_NONE: say where to receive (DSTX_NET_ADDRESS or "
                     "DSTX_NET_LISTEN_FD)");
    default:
      return failure(DSTX_E_UNSUPPORTED, "config.net " + std::to_string(c.net) + " is unknown to libdstx " +
                                             DSTX_LIBRARY_VERSION);
  }

  o.max_streams = c.max_streams == 0 ? wire::kMaxStreams : c.max_streams;
  if (o.max_streams > wire::kMaxStreams) {
    return failure(DSTX_E_INVALID, "config.max_streams is " + std::to_string(c.max_streams) + ": at most " +
                                       std::to_string(wire::kMaxStreams));
  }
  if (Status s =
          chunk_size(c.max_chunk_bytes, wire::kMaxChunkBytes, "config.max_chunk_bytes", &o.max_chunk_bytes);
      !s.ok()) {
    return s;
  }
  if (c.memory_budget_bytes != 0) o.memory_budget_bytes = c.memory_budget_bytes;
  if (Status s =
          timeout_ms(c.idle_timeout_ms, o.idle_timeout_ms, 0, "config.idle_timeout_ms", &o.idle_timeout_ms);
      !s.ok()) {
    return s;
  }
  if (Status s = timeout_ms(c.resume_timeout_ms, o.resume_timeout_ms, INT_MAX, "config.resume_timeout_ms",
                            &o.resume_timeout_ms);
      !s.ok()) {
    return s;
  }
  if (Status s = timeout_ms(c.accept_timeout_ms, o.accept_timeout_ms, -1, "config.accept_timeout_ms",
                            &o.accept_timeout_ms);
      !s.ok()) {
    return s;
  }
  if (Status s = timeout_ms(c.handshake_timeout_ms, o.handshake_timeout_ms, -1, "config.handshake_timeout_ms",
                            &o.handshake_timeout_ms);
      !s.ok()) {
    return s;
  }
  if (Status s = socket_options(0, c.user_timeout_ms, c.keepalive_idle_s, c.socket_buffer_bytes, &o.socket);
      !s.ok()) {
    return s;
  }
  if (c.listen_backlog < 0) {
    return failure(DSTX_E_INVALID,
                   "config.listen_backlog is " + std::to_string(c.listen_backlog) + ": must not be negative");
  }
  common_callbacks(t, c.log_level, c.progress_interval_ms, c.progress, c.log, c.on_complete, c.user);

  // Everything checked: now the sockets, then the sink (a file sink creates PATH.partial).
  if (c.net == DSTX_NET_FDS) {
    if (Status s = take_connections(c.fds, c.fd_count, &t.handed_fds); !s.ok()) return s;
  } else if (c.net == DSTX_NET_ADDRESS) {
    try {
      t.listener = io::tcp_listen(listen_at, c.listen_backlog == 0 ? 64 : c.listen_backlog);
      t.local_port = io::bound_port(t.listener.get());
    } catch (const std::bad_alloc&) {
      throw;
    } catch (const std::exception& ex) {
      return failure(DSTX_E_CONNECTION, ex.what());
    }
  } else {
    if (Status s = dstx::capi::duplicate_fd(c.fds[0], "config.fds[0]", &t.listener); !s.ok()) return s;
    int listening = 0;
    socklen_t len = sizeof listening;
    if (::getsockopt(t.listener.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening == 0) {
      return failure(DSTX_E_INVALID, "config.fds[0] (fd " + std::to_string(c.fds[0]) +
                                         ") is not a listening socket (call listen() first)");
    }
    try {
      t.local_port = io::bound_port(t.listener.get());
    } catch (const std::exception&) {
      t.local_port = -1;  // a UNIX socket has no port
    }
  }
  t.endpoint_kind = e.kind;
  if (Status s = dstx::capi::open_sink(e, &t.sink); !s.ok()) return s;
  return make_event_fd(t);
}

// Runs an entry point's body: no exception leaves the library; one that escapes becomes the calling
// thread's error (dstx_last_error(NULL)) and a status.
template <class Body>
int guarded(Body body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    set_create_error("out of memory");
    return DSTX_E_NOMEM;
  } catch (const std::exception& e) {
    set_create_error(e.what());
    return DSTX_E_INTERNAL;
  } catch (...) {
    set_create_error("unknown exception");
    return DSTX_E_INTERNAL;
  }
}

template <class Setup>
int create(dstx_transfer** out, Setup setup) noexcept {
  return guarded([&]() -> int {
    if (out == nullptr) {
      set_create_error("out is NULL");
      return DSTX_E_INVALID;
    }
    *out = nullptr;
    auto t = std::make_unique<Transfer>();
    const Status s = setup(*t);
    if (!s.ok()) {
      set_create_error(s.text);
      return s.code;
    }
    set_create_error("");
    *out = to_handle(t.release());
    return DSTX_OK;
  });
}

bool claim(Transfer* t) {
  int expected = int(Transfer::State::idle);
  return t->state.compare_exchange_strong(expected, int(Transfer::State::running));
}

}  // namespace

extern "C" {

DSTX_API const char* dstx_version(void) {
  return DSTX_LIBRARY_VERSION;
}

DSTX_API unsigned dstx_version_number(void) {
  return DSTX_VERSION_NUMBER;
}

DSTX_API const char* dstx_strerror(int status) {
  switch (status) {
    case DSTX_OK:
      return "success";
    case DSTX_E_INVALID:
      return "invalid argument";
    case DSTX_E_UNSUPPORTED:
      return "not supported";
    case DSTX_E_NOMEM:
      return "out of memory";
    case DSTX_E_STATE:
      return "not valid in the transfer's state";
    case DSTX_E_AGAIN:
      return "transfer still running";
    case DSTX_E_SOURCE:
      return "source failed";
    case DSTX_E_SINK:
      return "sink failed";
    case DSTX_E_CONNECTION:
      return "connection failed";
    case DSTX_E_TIMEOUT:
      return "timed out";
    case DSTX_E_CANCELLED:
      return "cancelled";
    case DSTX_E_PROTOCOL:
      return "protocol error";
    case DSTX_E_INTEGRITY:
      return "integrity check failed";
    case DSTX_E_SYSTEM:
      return "system resource failure";
    case DSTX_E_INTERNAL:
      return "internal error";
    default:
      return "unknown dstx status";
  }
}

DSTX_API int dstx_send_create(const dstx_send_config* config, const dstx_endpoint* source,
                              dstx_transfer** out) {
  return create(out, [&](Transfer& t) { return setup_send(t, config, source); });
}

DSTX_API int dstx_send_config_apply_tune(dstx_send_config* config, const char* path) {
  return guarded([&]() -> int {
    if (config == nullptr) {
      set_create_error("config is NULL");
      return DSTX_E_INVALID;
    }
    if (config->size < kSendConfigSizeV1) {
      set_create_error("config->size is " + std::to_string(config->size) +
                       ", smaller than any published dstx_send_config (" + std::to_string(kSendConfigSizeV1) +
                       "): initialise it with DSTX_SEND_CONFIG_INIT");
      return DSTX_E_INVALID;
    }
    const std::string file = path != nullptr ? std::string(path) : engine::tune_profile_path();
    engine::TuneProfile p;
    std::string why;
    switch (engine::read_tune_profile(file, &p, &why)) {
      case engine::ProfileRead::ok:
        break;
      case engine::ProfileRead::missing:
        set_create_error(file.empty() ? std::string("no tune profile: DSTX_TUNE_PROFILE and HOME are unset")
                                      : "no tune profile at " + file + " (dstx tune writes one)");
        return DSTX_E_SYSTEM;
      case engine::ProfileRead::unreadable:
        set_create_error("tune profile " + file + ": " + why);
        return DSTX_E_SYSTEM;
      case engine::ProfileRead::malformed:
        set_create_error("tune profile " + file + " is malformed: " + why);
        return DSTX_E_INVALID;
    }
    // Only the fields this caller's struct has, and only those it left at 0.
    auto reaches = [&](size_t offset, size_t bytes) { return config->size >= offset + bytes; };
    if (config->net == DSTX_NET_ADDRESS && config->streams == 0) config->streams = p.streams;
    if (reaches(offsetof(dstx_send_config, zero_copy_min_bytes), sizeof(uint64_t)) &&
        config->zero_copy_min_bytes == 0) {
      config->zero_copy_min_bytes = p.zero_copy_min_bytes;
    }
    if (reaches(offsetof(dstx_send_config, tuned_lz4_bytes_per_second), sizeof(uint64_t))) {
      uint64_t& raw = config->tuned_raw_bytes_per_second;
      uint64_t& lz4 = config->tuned_lz4_bytes_per_second;
      if (raw == 0) raw = p.raw_bytes_per_second;
      if (lz4 == 0) lz4 = p.lz4_bytes_per_second;
    }
    set_create_error("");
    return DSTX_OK;
  });
}

DSTX_API int dstx_recv_create(const dstx_recv_config* config, const dstx_endpoint* sink,
                              dstx_transfer** out) {
  return create(out, [&](Transfer& t) { return setup_recv(t, config, sink); });
}

DSTX_API void dstx_transfer_destroy(dstx_transfer* handle) {
  Transfer* transfer = from_handle(handle);
  delete transfer;  // cancels and joins a running transfer; destructors do not throw
}

DSTX_API int dstx_transfer_run(dstx_transfer* handle) {
  Transfer* transfer = from_handle(handle);
  if (transfer == nullptr) return DSTX_E_INVALID;
  if (!claim(transfer)) return DSTX_E_STATE;
  return transfer->execute();
}

DSTX_API int dstx_transfer_start(dstx_transfer* handle) {
  Transfer* transfer = from_handle(handle);
  if (transfer == nullptr) return DSTX_E_INVALID;
  if (!claim(transfer)) return DSTX_E_STATE;
  try {
    transfer->worker = std::thread([transfer] { transfer->execute(); });
  } catch (...) {
    transfer->state = int(Transfer::State::idle);
    return DSTX_E_SYSTEM;
  }
  return DSTX_OK;
}

DSTX_API int dstx_transfer_fd(const dstx_transfer* handle) {
  const Transfer* transfer = from_handle(handle);
  return transfer == nullptr ? -1 : transfer->event_fd.get();
}

DSTX_API int dstx_transfer_poll(const dstx_transfer* handle) {
  const Transfer* transfer = from_handle(handle);
  if (transfer == nullptr) return DSTX_E_INVALID;
  return transfer->current_status();
}

DSTX_API int dstx_transfer_wait(dstx_transfer* handle, int timeout_ms) {
  Transfer* transfer = from_handle(handle);
  if (transfer == nullptr) return DSTX_E_INVALID;
  if (timeout_ms < -1) return DSTX_E_INVALID;
  try {
    auto done = [transfer] {
      return transfer->state.load(std::memory_order_acquire) == int(Transfer::State::done);
    };
    std::unique_lock lock(transfer->done_mu);
    if (transfer->state.load() == int(Transfer::State::idle)) return DSTX_E_STATE;
    if (timeout_ms < 0) {
      transfer->done_cv.wait(lock, done);
    } else {
      transfer->done_cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), done);
    }
  } catch (...) {
    return DSTX_E_SYSTEM;  // std::mutex/condition_variable failures: system_error
  }
  return transfer->current_status();
}

DSTX_API int dstx_transfer_cancel(dstx_transfer* handle) {
  Transfer* transfer = from_handle(handle);
  if (transfer == nullptr) return DSTX_E_INVALID;
  transfer->cancel.request();  // one relaxed store to a lock-free atomic: async-signal-safe
  return DSTX_OK;
}

DSTX_API int dstx_transfer_stats(const dstx_transfer* handle, dstx_stats* out) {
  const Transfer* transfer = from_handle(handle);
  if (transfer == nullptr || out == nullptr) return DSTX_E_INVALID;
  const size_t size = out->size;
  if (size < kStatsSizeV1) return DSTX_E_INVALID;
  dstx_stats full{};
  full.size = sizeof full;
  transfer->fill_stats(&full);
  std::memcpy(static_cast<void*>(out), &full, std::min(size, sizeof full));
  out->size = size;
  return DSTX_OK;
}

DSTX_API int dstx_transfer_local_port(const dstx_transfer* handle, uint16_t* port) {
  const Transfer* transfer = from_handle(handle);
  if (transfer == nullptr || port == nullptr) return DSTX_E_INVALID;
  if (transfer->side != Transfer::Side::recv || transfer->local_port < 0) return DSTX_E_STATE;
  *port = uint16_t(transfer->local_port);
  return DSTX_OK;
}

DSTX_API const char* dstx_last_error(const dstx_transfer* handle) {
  const Transfer* transfer = from_handle(handle);
  if (transfer == nullptr) return t_create_error;
  if (transfer->state.load(std::memory_order_acquire) != int(Transfer::State::done)) return "";
  return transfer->error.c_str();
}

}  // extern "C"
