/*
 * dstx.h: the stable C ABI of dstx, a device-state transfer engine for VM live migration.
 *
 * One transfer moves one device state from a source on this host to a sink on another (or the same) host
 * over N parallel stream sockets (TCP, or UNIX ones handed in), and succeeds on the sending side only after
 * the receiving side has written every byte, checked the whole-stream digest and committed the sink.
 *
 * Link with libdstx.so.1 (pkg-config dstx, or find_package(dstx) -> dstx::dstx) or with the static
 * libdstx.a (dstx::dstx_static, or pkg-config --static). docs/c-api.md walks through the calls a VMM makes.
 *
 * ABI rules, kept from the first release:
 *   - Handles are opaque. Every create has a destroy, and destroy(NULL) does nothing.
 *   - Numbers of enumerations (status codes, kinds, phases) never change; new ones are only appended.
 *     Functions return them as `int` and structs hold them in fixed-width fields, so a value that a newer
 *     library appends can never be an out-of-range enum in the caller.
 *   - Structs passed in or out start with `size`, which the caller sets to sizeof the struct it was compiled
 *     with (the DSTX_..._INIT macros do). Structs only grow at their end. In config structs every field's
 *     zero means "the default", so a caller built against an older, shorter struct gets defaults for the
 *     fields it does not know; a longer struct (a newer header, an older library) is accepted when the
 *     fields this library does not know are zero, and refused with DSTX_E_UNSUPPORTED otherwise.
 *   - No C++ exception ever leaves the library; every function reports failure by status.
 *   - Only the functions below are exported (version node DSTX_1.0; dstx_send_config_apply_tune: DSTX_1.1).
 *
 * Thread safety, in general (each function says more):
 *   - dstx_version*, dstx_strerror: any thread, any time.
 *   - Different handles are independent: use them from any threads at once.
 *   - On one handle: dstx_transfer_cancel, _poll, _wait, _fd, _stats, _local_port and dstx_last_error may be
 *     called from any thread, concurrently with each other and with a running transfer. dstx_transfer_run or
 *     _start is called once. dstx_transfer_destroy must not overlap any other call on that handle.
 *   - Callbacks run on the threads stated at dstx_progress_fn, dstx_log_fn and dstx_complete_fn.
 *
 * Kinds and values that a library version does not know answer DSTX_E_UNSUPPORTED with a detailed text
 * (dstx_last_error(NULL)).
 */
#ifndef DSTX_DSTX_H
#define DSTX_DSTX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DSTX_API __attribute__((visibility("default")))
#else
#define DSTX_API
#endif

/* ---- Versions --------------------------------------------------------------------------------------- */

#define DSTX_VERSION_MAJOR 0
#define DSTX_VERSION_MINOR 1
#define DSTX_VERSION_PATCH 0
#define DSTX_VERSION_NUMBER (DSTX_VERSION_MAJOR * 10000 + DSTX_VERSION_MINOR * 100 + DSTX_VERSION_PATCH)
#define DSTX_VERSION_STRING "0.1.0"
/* The shared library's SONAME is libdstx.so.DSTX_ABI_VERSION; it changes only if the ABI ever breaks. */
#define DSTX_ABI_VERSION 1

/* The version of the library actually loaded: "MAJOR.MINOR.PATCH" (static storage), and as a number. */
DSTX_API const char* dstx_version(void);
DSTX_API unsigned dstx_version_number(void);

/* ---- Status codes ----------------------------------------------------------------------------------- */

typedef enum dstx_status {
  DSTX_OK = 0,
  DSTX_E_INVALID = 1,     /* an argument or config field is invalid (the text names it) */
  DSTX_E_UNSUPPORTED = 2, /* not available in this library version or build, or not offered by the peer */
  DSTX_E_NOMEM = 3,       /* out of memory */
  DSTX_E_STATE = 4,       /* not valid in the handle's state (e.g. a second run, a poll before start) */
  DSTX_E_AGAIN = 5,       /* the transfer is still running (dstx_transfer_poll, dstx_transfer_wait) */
  DSTX_E_SOURCE = 6,      /* the source could not be opened or read (here or, as reported, at the peer) */
  DSTX_E_SINK = 7,        /* the sink could not be opened, written, verified or committed */
  DSTX_E_CONNECTION = 8,  /* connect, accept or an established connection failed */
  DSTX_E_TIMEOUT = 9,     /* a peer or a phase took longer than its time-out */
  DSTX_E_CANCELLED = 10,  /* dstx_transfer_cancel, here or at the peer (or before_stop_copy refused) */
  DSTX_E_PROTOCOL = 11,   /* malformed frames, protocol version, session or stream mismatch */
  DSTX_E_INTEGRITY = 12,  /* a chunk checksum or the whole-stream digest did not match */
  DSTX_E_SYSTEM = 13,     /* a system resource failed (threads, eventfd, I/O backend set-up) */
  DSTX_E_INTERNAL = 14    /* a bug in dstx: please report it with the text */
} dstx_status;

/* Static English text for a status ("success" for DSTX_OK, a generic text for unknown values). Never NULL. */
DSTX_API const char* dstx_strerror(int status);

/* ---- Endpoints: where the state comes from and goes to ---------------------------------------------- */

typedef enum dstx_endpoint_kind {
  DSTX_ENDPOINT_NONE = 0,
  /* A VFIO device fd that the VMM opened and set up: an iommufd cdev (/dev/vfio/devices/vfioN) bound and
   * attached to an IOAS, or the fd VFIO_GROUP_GET_DEVICE_FD returned. The library drives the device's
   * migration states through the v1 migration region or the v2 migration feature (see vfio_protocol); the
   * VMM leaves them alone from create until the transfer has ended.
   * Source: the device must be RUNNING. Pre-copy rounds run while the VM runs (dstx_send_config
   * precopy_max_rounds, downtime_target_ms), then before_stop_copy is called (pause the vCPUs there), the
   * device enters STOP_COPY (v1: SAVING) and the rest of its state is sent. After COMMITTED the device is in
   * STOP (the VMM then stops or quits the VM); after any failure or cancel it is RUNNING again (reset when
   * nothing else brings it back), and the VMM resumes its vCPUs.
   * Sink: the device must be RUNNING or STOP. It enters RESUMING with the first byte and leaves it for STOP
   * at commit, when the device validates the state (a refusal fails the transfer with DSTX_E_SINK and the
   * text of the device). It is reset after a failure, and when the handle is destroyed without a commit.
   * dstx_stats reports the device's state (device_state), downtime and pre-copy rounds. */
  DSTX_ENDPOINT_VFIO_DEVICE = 1,
  /* A VFIO v2 migration data_fd that the caller obtained. As a source the device must already be in
   * STOP_COPY (the fd is read to end of file; PRE_COPY's ENOMSG fails the transfer). As a sink the device
   * must be in RESUMING; after DSTX_OK the caller moves it RESUMING -> STOP, which validates the state. */
  DSTX_ENDPOINT_DATA_FD = 2,
  /* A path. Source: a regular file or block device, read with random access. Sink: writes PATH.partial and
   * renames it to PATH only at commit (PATH.partial must not exist); a transfer that fails after the commit
   * (before COMMITTED could go to the sender) removes PATH again. */
  DSTX_ENDPOINT_FILE = 3,
  /* A byte stream fd (pipe, socket, tty, or a file read/written from its current position). Source: read
   * until end of file. Sink: written in order; on failure a socket is shut down for writing. */
  DSTX_ENDPOINT_FD = 4,
  /* Caller memory. Source: buffer_bytes bytes at buffer, never written, that must stay unchanged until the
   * transfer ends. Sink: up to buffer_bytes bytes are written at buffer; a larger state fails with
   * DSTX_E_SINK; dstx_stats.bytes_written tells the size; after a failure the contents are unspecified. */
  DSTX_ENDPOINT_BUFFER = 5,
  /* A spec string as the dstx command takes it: "file:PATH", "emu:size=SIZE,profile=NAME,seed=N"
   * (generated test state; as a sink it verifies every byte), "null:" (sink: discard), "stdin:",
   * "stdout:". "fd:N" is refused here (it would take ownership of N): use DSTX_ENDPOINT_FD.
   * VFIO devices, which then behave exactly as DSTX_ENDPOINT_VFIO_DEVICE (vfio_protocol applies):
   * "vfio:/dev/vfio/devices/vfioN" and "vfio-group:/dev/vfio/GROUP:DEVICE" (the library opens the device
   * itself), and emulated devices "emu-v1:KEY=VALUE,..." (v1 migration region) and "emu-v2:KEY=VALUE,..."
   * (v2 data_fd), for tests and demos, with the keys of `dstx migrate --help`: size=SIZE, profile=NAME,
   * seed=N, dirty=BYTES_PER_SEC (state the running device changes), fault=NAME (reject-state,
   * eio-read@BYTES, eio-write@BYTES, transition-fail@[FROM-]STATE, ...). Each create makes its own emulated
   * device; a sink loads whatever state it receives and checks its digest at commit. */
  DSTX_ENDPOINT_SPEC = 6
} dstx_endpoint_kind;

/* Which VFIO migration protocol a device endpoint uses (DSTX_ENDPOINT_VFIO_DEVICE and device specs). */
typedef enum dstx_vfio_protocol {
  DSTX_VFIO_AUTO = 0, /* v2 when the device offers it, else v1 */
  DSTX_VFIO_V1 = 1,   /* the deprecated migration region */
  DSTX_VFIO_V2 = 2    /* VFIO_DEVICE_FEATURE_MIGRATION and a data_fd */
} dstx_vfio_protocol;

/*
 * File descriptors in an endpoint are duplicated (F_DUPFD_CLOEXEC) by the create call: the caller keeps
 * ownership of its fd, may close it right after create, and the library closes only its duplicate (at
 * destroy). A duplicate shares the open file: the position of a stream and its status flags are common.
 */
typedef struct dstx_endpoint {
  size_t size;            /* sizeof(dstx_endpoint) */
  uint32_t kind;          /* dstx_endpoint_kind */
  int32_t fd;             /* VFIO_DEVICE, DATA_FD, FD */
  const char* path;       /* FILE (copied by create) */
  const char* spec;       /* SPEC (copied by create) */
  void* buffer;           /* BUFFER */
  uint64_t buffer_bytes;  /* BUFFER: source: the state's size; sink: the capacity */
  uint32_t vfio_protocol; /* VFIO_DEVICE and SPEC device specs: dstx_vfio_protocol */
  uint32_t reserved;      /* must be 0 */
} dstx_endpoint;

#define DSTX_ENDPOINT_INIT \
  { .size = sizeof(dstx_endpoint) }

/* ---- Connections --------------------------------------------------------------------------------------- */

typedef enum dstx_net_kind {
  DSTX_NET_NONE = 0,
  /* "HOST:PORT" or "[V6ADDR]:PORT". Sending: connect `streams` streams. Receiving: listen there (port 0
   * picks a free port, see dstx_transfer_local_port); the socket is bound by create. */
  DSTX_NET_ADDRESS = 1,
  /* Already-connected stream sockets (TCP or UNIX), one per stream: fds[0..fd_count). Sending: stream i
   * is fds[i]. Receiving: the sockets the VMM accepted for this transfer, in any order; there must be as
   * many as the sender has streams (a missing one fails after handshake_timeout_ms). */
  DSTX_NET_FDS = 2,
  /* Receiving only: fds[0] is a listening socket (fd_count 1); the sender's streams are accepted on it. */
  DSTX_NET_LISTEN_FD = 3
} dstx_net_kind;

/*
 * Sockets handed in are duplicated by create, like endpoint fds: the VMM keeps ownership and must close its
 * own fds. Because a duplicate is the same socket, what the protocol does to the socket is visible through
 * the caller's fd: a connection carries exactly one transfer and is shut down (SHUT_RDWR) when the transfer
 * ends; O_NONBLOCK is cleared while the transfer runs (the engine's workers block) and restored afterwards;
 * TCP liveness options (TCP_NODELAY, keepalive, TCP_USER_TIMEOUT, buffer sizes) are applied to TCP sockets.
 * The caller must not read, write or poll-for-read the sockets while the transfer runs.
 */

/* ---- Live statistics ----------------------------------------------------------------------------------- */

typedef enum dstx_phase {
  DSTX_PHASE_IDLE = 0,       /* created, not started */
  DSTX_PHASE_CONNECTING = 1, /* sending: connecting the streams; receiving: waiting for the sender */
  DSTX_PHASE_PRECOPY = 2,    /* VFIO devices: pre-copy rounds while the VM runs (with VFIO_DEVICE) */
  DSTX_PHASE_STOP_COPY = 3,  /* moving the (remaining) state through to COMMITTED; a one-shot transfer of a
                                file, buffer, fd or data_fd is in this phase from handshake to commit */
  DSTX_PHASE_DONE = 4,       /* committed */
  DSTX_PHASE_FAILED = 5      /* failed or cancelled */
} dstx_phase;

typedef struct dstx_stats {
  size_t size;                /* in: sizeof(dstx_stats) as the caller knows it; the library fills that much */
  uint32_t phase;             /* dstx_phase */
  int32_t status;             /* DSTX_E_AGAIN until the transfer ended, then its final status */
  uint32_t streams;           /* streams in use (0 before they are known) */
  uint32_t precopy_rounds;    /* VFIO_DEVICE sources: pre-copy rounds run */
  uint64_t total_bytes;       /* the state's size when known in advance, else 0 */
  uint64_t bytes_read;        /* sending: state bytes read from the source (this version: = bytes_sent) */
  uint64_t bytes_sent;        /* sending: state bytes handed to the network (before compression) */
  uint64_t bytes_written;     /* receiving: state bytes written to the sink */
  uint64_t wire_bytes;        /* bytes on the wire, frame headers included */
  uint64_t chunks;            /* chunks sent or received */
  uint64_t zero_chunks;       /* of which all-zero (sent as a header only) */
  uint64_t raw_chunks;        /* of which sent uncompressed */
  uint64_t compressed_chunks; /* of which compressed */
  uint64_t acked_chunks;      /* sending: chunks the receiver has acknowledged */
  double ratio;          /* wire_bytes / state bytes so far (0 when none): below 1 means compression won */
  uint64_t elapsed_ns;   /* since the transfer started (frozen when it ends); both sides */
  uint64_t connect_ns;   /* sending: connecting the streams (0 for handed-in fds) */
  uint64_t precopy_ns;   /* VFIO_DEVICE sources: time in pre-copy */
  uint64_t stop_copy_ns; /* sending: time in DSTX_PHASE_STOP_COPY (handshake to COMMITTED or failure) */
  uint64_t downtime_ns;  /* sending: from entering stop-copy until COMMITTED (0 unless committed); VFIO_DEVICE
                            sources: from the call of before_stop_copy (the VM stops) until COMMITTED */
  uint64_t digest;       /* after DSTX_OK: the whole-stream XXH3-64 digest, the same on both sides */
  /* Appended after the first release. A library older than your header fills only the part it knows and
   * leaves these as they were: start from DSTX_STATS_INIT (zeros). "VFIO_DEVICE endpoints" includes device
   * specs in DSTX_ENDPOINT_SPEC. */
  uint32_t device_state;      /* VFIO_DEVICE endpoints, both sides: the device's migration state now (while
                                 the transfer runs) or at the end (once it has ended): a dstx_device_state */
  uint32_t vfio_protocol;     /* VFIO_DEVICE endpoints: the protocol in use, DSTX_VFIO_V1 or DSTX_VFIO_V2 */
  uint64_t precopy_bytes;     /* VFIO_DEVICE sources, once ended: state bytes read during pre-copy */
  uint64_t stop_copy_bytes;   /* VFIO_DEVICE sources, once ended: state bytes read in stop-copy */
  char device_state_name[32]; /* device_state as text: "RUNNING", "STOP", "PRE_COPY", ...; v1 devices show
                                 their bits ("SAVING|RUNNING"); "" when not a device. NUL-terminated */
  char state_digest[40];      /* after DSTX_OK with an emulated device (emu-v1:, emu-v2:): the XXH3-128 of the
                                 device's whole state in 32 hex digits, equal on both sides; else "" */
  /* Appended later still, the same way (an older library leaves them as DSTX_STATS_INIT set them). */
  uint64_t resumes;         /* both sides: broken streams reconnected and resumed (a WARN log line each) */
  uint64_t replayed_chunks; /* sending: data chunks sent again on a resumed stream */
  uint64_t reread_chunks;   /* sending: of those, read from the source again (beyond the replay buffer); they
                               go raw, and the receiver counts them so, not by the sender's first encoding */
  uint64_t lz4_chunks;      /* compressed_chunks by codec: LZ4 */
  uint64_t zstd_chunks;     /* zstd */
  uint64_t sparse_chunks;   /* only the non-zero pages, raw (a page bitmap in front) */
  uint64_t paged_chunks;    /* of lz4_chunks and zstd_chunks, those that compressed only their non-zero pages */
} dstx_stats;

#define DSTX_STATS_INIT \
  { .size = sizeof(dstx_stats) }

/*
 * A VFIO device's migration state in dstx_stats.device_state. The numbers are the v2 uAPI's
 * (enum vfio_device_mig_state) plus 2, so that 0 can mean "no device". v1 devices' device_state bits map
 * onto them: RUNNING, SAVING|RUNNING = PRE_COPY, SAVING = STOP_COPY, RESUMING, 0 = STOP, anything else
 * (SAVING|RESUMING) = ERROR.
 */
typedef enum dstx_device_state {
  DSTX_DEVICE_NONE = 0,    /* the endpoint is not a VFIO device */
  DSTX_DEVICE_UNKNOWN = 1, /* the state could not be read (device_state_name says why) */
  DSTX_DEVICE_ERROR = 2,   /* left only by a reset */
  DSTX_DEVICE_STOP = 3,
  DSTX_DEVICE_RUNNING = 4,
  DSTX_DEVICE_STOP_COPY = 5,
  DSTX_DEVICE_RESUMING = 6,
  DSTX_DEVICE_RUNNING_P2P = 7,
  DSTX_DEVICE_PRE_COPY = 8,
  DSTX_DEVICE_PRE_COPY_P2P = 9
} dstx_device_state;

/* ---- Callbacks ----------------------------------------------------------------------------------------- */

typedef struct dstx_transfer dstx_transfer;

/*
 * Progress: called on a thread the library owns (one per transfer, only when a progress callback is set),
 * every progress_interval_ms while the transfer runs and once more, with the final figures, after it ended;
 * never concurrently with itself, and never after dstx_transfer_run returned or the completion was
 * signalled. `stats` is valid during the call only; stats->size is the library's size (read only the fields
 * your header knows, which is all of them when you were compiled against this header or an older one).
 */
typedef void (*dstx_progress_fn)(void* user, dstx_transfer* transfer, const dstx_stats* stats);

typedef enum dstx_log_level {
  DSTX_LOG_ERROR = 1,
  DSTX_LOG_WARN = 2,
  DSTX_LOG_INFO = 3,
  DSTX_LOG_DEBUG = 4
} dstx_log_level;

/*
 * Log: called on the thread that runs the transfer (the caller's inside dstx_transfer_run, the library's
 * after dstx_transfer_start), one line per call without a trailing newline, only for levels <= log_level.
 * `message` is valid during the call only.
 */
typedef void (*dstx_log_fn)(void* user, dstx_transfer* transfer, int level, const char* message);

/*
 * Completion: called once per transfer, on the thread that ran it, after the final progress call and before
 * the eventfd (dstx_transfer_fd) becomes readable; dstx_transfer_poll already answers `status` by then.
 */
typedef void (*dstx_complete_fn)(void* user, dstx_transfer* transfer, int status);

/*
 * Before stop-copy (VFIO_DEVICE sources, dstx_send_config.before_stop_copy): called once, right before the
 * device enters STOP_COPY (v1: SAVING), after the pre-copy rounds (or at once without them). The VMM pauses
 * its vCPUs here, so that the device state stops changing. Called on one of the library's worker threads
 * while the device's reads wait for it (keep it short: it is part of the downtime, and the transfer's idle
 * time-out runs). Return 0 to go on; anything else cancels the transfer (DSTX_E_CANCELLED), the device goes
 * back to RUNNING, and the VMM resumes its vCPUs. Not called when the transfer fails before stop-copy.
 */
typedef int (*dstx_stop_copy_fn)(void* user, dstx_transfer* transfer);

/*
 * Inside any callback the program may call dstx_transfer_cancel, _stats, _poll, _fd, _local_port and
 * dstx_last_error on the same handle, and anything on other handles; it must not call dstx_transfer_run,
 * _start, _wait or _destroy on the same handle (they would wait for the callback itself).
 */

/* ---- Configs ------------------------------------------------------------------------------------------- */

typedef enum dstx_codec {
  DSTX_CODEC_AUTO = 0, /* zero-chunk skipping + lz4, raw where compression does not pay */
  DSTX_CODEC_NONE = 1,
  DSTX_CODEC_LZ4 = 2,
  DSTX_CODEC_ZSTD = 3,
  DSTX_CODEC_SPARSE = 4 /* no compression, zero pages left out: the least CPU that still skips zeros (a
                         * libdstx built before it answers DSTX_E_UNSUPPORTED) */
} dstx_codec;

/* Time-outs in milliseconds: 0 means the default, -1 means no limit. */
typedef struct dstx_send_config {
  size_t size;                /* sizeof(dstx_send_config) */
  uint32_t net;               /* DSTX_NET_ADDRESS or DSTX_NET_FDS */
  uint32_t streams;           /* ADDRESS: streams to open (0: one per core, at most 64); FDS: 0 or fd_count */
  const char* address;        /* ADDRESS: the receiver's "HOST:PORT" (copied by create) */
  const int* fds;             /* FDS: connected sockets, one per stream (duplicated by create) */
  uint32_t fd_count;          /* FDS: 1..64 */
  uint32_t chunk_bytes;       /* 0: 1 MiB, less for a source of known size under 512 MiB (a buffer, a
                               * file, a VFIO v2 device by its stop-copy estimate): size / 512 rounded up to
                               * a power of two, at least 64 KiB; else 4096..16 MiB, exactly */
  uint32_t codec;             /* dstx_codec */
  int32_t zstd_level;         /* 0: 1; else 1..19 (DSTX_CODEC_ZSTD) */
  uint32_t depth;             /* chunks in flight per stream; 0: 4 */
  uint32_t window_chunks;     /* how far streams may run ahead of each other; 0: streams * depth * 2;
                               * at most 32768 */
  int32_t connect_timeout_ms; /* ADDRESS: per connection; 0: 10000 */
  int32_t handshake_timeout_ms; /* 0: 10000 */
  int32_t commit_timeout_ms;    /* after the last byte, how long to wait for COMMITTED; 0: 120000 */
  int32_t user_timeout_ms;      /* TCP_USER_TIMEOUT; 0: 30000; -1: leave the kernel's */
  int32_t keepalive_idle_s;     /* TCP keepalive idle time; 0: 10; -1: no keepalive */
  int32_t socket_buffer_bytes;  /* SO_SNDBUF/SO_RCVBUF; 0: the kernel's */
  int32_t idle_timeout_ms;      /* fail when nothing moves (no byte sent, no ACK) this long; 0: 30000. Not
                                 * once the receiver acknowledged every chunk: its commit has
                                 * commit_timeout_ms */
  /* ADDRESS: a broken stream is reconnected and resumes where the receiver's acknowledgements left off, up
   * to this many attempts per break (0: 5; -1: no resume). FDS: no resume (dstx cannot open the VMM's
   * connections). */
  int32_t reconnect_attempts;
  uint64_t bandwidth_bytes_per_second; /* cap on wire bytes, all streams together; 0: none */
  /* VFIO_DEVICE sources: pre-copy rounds at most (0: the driver's default, 8; -1: none, straight to
   * stop-copy), and the downtime to aim for when deciding to stop (0: the default, 300 ms). Pre-copy also
   * ends when the remaining state stops shrinking, or fits the target at the rate measured so far. A v2
   * device without VFIO_MIGRATION_PRE_COPY goes straight to stop-copy. */
  int32_t precopy_max_rounds;
  uint32_t downtime_target_ms;
  uint32_t log_level;            /* dstx_log_level; 0: DSTX_LOG_WARN */
  uint32_t progress_interval_ms; /* 0: 100 */
  dstx_progress_fn progress;     /* optional */
  dstx_log_fn log;               /* optional */
  dstx_complete_fn on_complete;  /* optional */
  void* user;                    /* passed to the callbacks */
  /* Appended after the first release (appending is how configs grow; a library older than your header
   * refuses a non-zero value here with DSTX_E_UNSUPPORTED): */
  dstx_stop_copy_fn before_stop_copy; /* VFIO_DEVICE sources, optional: see dstx_stop_copy_fn */
  /* TLS 1.3 on every stream (kTLS where the kernel offers it, else in user space). All NULL: plain TCP, and a
   * receiver that requires TLS refuses us. Certificates: the three tls_*_file together (PEM paths, loaded by
   * create); or psk_file ("IDENTITY:HEXKEY") instead. Strings are copied by create. */
  const char* tls_ca_file;   /* the CA(s) that must have issued the peer's certificate */
  const char* tls_cert_file; /* our certificate (chain) */
  const char* tls_key_file;  /* our private key */
  const char* tls_peer_name; /* optional: a DNS name or IP the peer's certificate must carry (subjectAltName) */
  const char* psk_file;      /* instead of certificates */
  /* Memory and zero-copy (appended after the TLS fields): */
  uint64_t replay_buffer_bytes; /* resume: sent frames kept until the receiver acknowledges them, all
                                 * streams together (a full buffer makes the sender wait); 0: 32 MiB;
                                 * at most 1 GiB. Only sequential sources (devices, fds) keep frames:
                                 * a file or buffer is read again for a resume */
  uint64_t zero_copy_min_bytes; /* io_uring SEND_ZC for frames at least this large; 0: never (on loopback
                                 * and veth the kernel copies anyway; `dstx tune` measures the break-even) */
  uint32_t send_flags;          /* DSTX_SEND_REGISTER_BUFFERS, or 0 */
  uint32_t reserved2;           /* must be 0 */
  /* DSTX_CODEC_AUTO's opening (appended after reserved2): what `dstx tune` measured on this link and
   * machine, its profile's raw_mb_s and lz4_mb_s times 10^6 (dstx_send_config_apply_tune reads them). 0:
   * unknown (both must be set to act). Where the link outran lz4 on every stream (raw > lz4 x streams, raw
   * capped by bandwidth_bytes_per_second), auto starts raw instead of warming up on lz4 (a DSTX_LOG_DEBUG
   * line says so), and it still turns to lz4 and zstd when the link turns out slower. Each at most 10^12. */
  uint64_t tuned_raw_bytes_per_second; /* the rate DSTX_CODEC_NONE reached on the link */
  uint64_t tuned_lz4_bytes_per_second; /* lz4's encode speed on one core */
} dstx_send_config;

/* send_flags: register the frame buffers with io_uring (READ_FIXED reads from files on block devices).
 * Pinning them costs set-up time before the first byte (~10 ms for 24 MiB per stream measured). */
#define DSTX_SEND_REGISTER_BUFFERS 1u

#define DSTX_SEND_CONFIG_INIT \
  { .size = sizeof(dstx_send_config) }

typedef struct dstx_recv_config {
  size_t size;              /* sizeof(dstx_recv_config) */
  uint32_t net;             /* DSTX_NET_ADDRESS, DSTX_NET_LISTEN_FD or DSTX_NET_FDS */
  uint32_t max_streams;     /* the most streams accepted; 0: 64 */
  const char* address;      /* ADDRESS: where to listen, "HOST:PORT" (copied by create) */
  const int* fds;           /* LISTEN_FD: fds[0], a listening socket; FDS: accepted sockets (duplicated) */
  uint32_t fd_count;        /* LISTEN_FD: 1; FDS: 1..64, the sender's stream count */
  uint32_t max_chunk_bytes; /* the largest chunk accepted; 0: 16 MiB; else 4096..16 MiB */
  uint64_t memory_budget_bytes;  /* reorder window and decode buffers; 0: 64 MiB */
  int32_t accept_timeout_ms;     /* waiting for the sender's first stream; 0: 60000 */
  int32_t handshake_timeout_ms;  /* 0: 10000 */
  int32_t user_timeout_ms;       /* TCP_USER_TIMEOUT on accepted sockets; 0: 30000; -1: the kernel's */
  int32_t keepalive_idle_s;      /* 0: 10; -1: no keepalive */
  int32_t socket_buffer_bytes;   /* 0: the kernel's */
  int32_t idle_timeout_ms;       /* fail when nothing arrives and nothing is written this long; 0: 30000.
                                  * Not while the sink commits (the sender's commit_timeout_ms bounds it) */
  int32_t resume_timeout_ms;     /* ADDRESS, LISTEN_FD: how long a broken stream may take to come back;
                                    0: 30000 */
  uint32_t log_level;            /* dstx_log_level; 0: DSTX_LOG_WARN */
  uint32_t progress_interval_ms; /* 0: 100 */
  int32_t listen_backlog;        /* ADDRESS: the listen() backlog; 0: 64 */
  dstx_progress_fn progress;     /* optional */
  dstx_log_fn log;               /* optional */
  dstx_complete_fn on_complete;  /* optional */
  void* user;                    /* passed to the callbacks */
  /* Appended after the first release: TLS 1.3 on every stream, as in dstx_send_config. All NULL: plain TCP,
   * and a sender that starts TLS is refused. */
  const char* tls_ca_file;
  const char* tls_cert_file;
  const char* tls_key_file;
  const char* tls_peer_name;
  const char* psk_file;
} dstx_recv_config;

#define DSTX_RECV_CONFIG_INIT \
  { .size = sizeof(dstx_recv_config) }

/* ---- Transfers ----------------------------------------------------------------------------------------- */

/*
 * Creates the sending side of one transfer: validates the config, opens the source (files are opened, fds
 * duplicated) and parses the address. Nothing is connected yet. On success *out is a new handle; on failure
 * *out is NULL and dstx_last_error(NULL) explains. Thread-safe.
 */
DSTX_API int dstx_send_create(const dstx_send_config* config, const dstx_endpoint* source,
                              dstx_transfer** out);

/*
 * Added in DSTX_1.1. Fills in *config what `dstx tune` measured on this machine and link, from the profile
 * it wrote: streams (DSTX_NET_ADDRESS only), zero_copy_min_bytes, tuned_raw_bytes_per_second and
 * tuned_lz4_bytes_per_second, each only where it is 0 (a setting the caller made wins) and only as far as
 * config->size reaches. chunk_bytes is left alone: at 0 dstx fits chunks to a small state, which a tuned
 * size for large ones would undo. path: the profile; NULL: where dstx send looks ($DSTX_TUNE_PROFILE, else
 * ${XDG_CONFIG_HOME:-$HOME/.config}/dstx/tune.json). Returns DSTX_OK when a profile was applied;
 * DSTX_E_SYSTEM when there is none at the path or it cannot be read, DSTX_E_INVALID when it is malformed
 * (or config is NULL or shorter than the first release's): *config is then unchanged, and
 * dstx_last_error(NULL) names the file and what is wrong. Thread-safe, unless another thread changes the
 * environment meanwhile (it reads DSTX_TUNE_PROFILE, XDG_CONFIG_HOME and HOME).
 */
DSTX_API int dstx_send_config_apply_tune(dstx_send_config* config, const char* path);

/*
 * Creates the receiving side of one transfer: validates the config, opens the sink (a FILE sink creates
 * PATH.partial now) and binds the listening socket (DSTX_NET_ADDRESS), so a sender may connect as soon as
 * this returns; connections are accepted once the transfer runs. On failure *out is NULL and
 * dstx_last_error(NULL) explains. Thread-safe.
 */
DSTX_API int dstx_recv_create(const dstx_recv_config* config, const dstx_endpoint* sink, dstx_transfer** out);

/*
 * Destroys a handle; NULL does nothing. A transfer still running (dstx_transfer_start) is cancelled and
 * waited for: destroy returns only after the library's threads for it have ended, so no callback runs
 * afterwards. Closes the library's duplicates of handed-in fds (never the caller's). Must not overlap any
 * other call on the handle, nor be called from one of its callbacks.
 */
DSTX_API void dstx_transfer_destroy(dstx_transfer* transfer);

/*
 * Runs the transfer on the calling thread and returns its final status (DSTX_OK only after COMMITTED).
 * Once per handle: a second run or start answers DSTX_E_STATE. dstx_transfer_cancel from another thread
 * makes it return DSTX_E_CANCELLED promptly.
 */
DSTX_API int dstx_transfer_run(dstx_transfer* transfer);

/*
 * The non-blocking form: starts the transfer on a thread the library owns and returns DSTX_OK at once (or
 * DSTX_E_STATE, DSTX_E_SYSTEM). Completion is signalled three ways, use any: the on_complete callback, the
 * eventfd of dstx_transfer_fd becoming readable, and dstx_transfer_poll/_wait answering the final status.
 */
DSTX_API int dstx_transfer_start(dstx_transfer* transfer);

/*
 * An eventfd (O_CLOEXEC, O_NONBLOCK) that becomes readable when the transfer has ended (for run and start
 * alike), to put into a VMM's event loop. It exists from create to destroy and belongs to the library: poll
 * it, read it if you like (it then stops being readable), never close it. -1 for NULL. Thread-safe.
 */
DSTX_API int dstx_transfer_fd(const dstx_transfer* transfer);

/*
 * The final status once the transfer has ended, DSTX_E_AGAIN while it runs, DSTX_E_STATE if it has not been
 * started. Never blocks. Thread-safe.
 */
DSTX_API int dstx_transfer_poll(const dstx_transfer* transfer);

/*
 * Waits up to timeout_ms (-1: without limit, 0: not at all) for the transfer to end; then as
 * dstx_transfer_poll. Thread-safe (several threads may wait), but not from the handle's own callbacks.
 */
DSTX_API int dstx_transfer_wait(dstx_transfer* transfer, int timeout_ms);

/*
 * Asks the transfer to stop: it ends with DSTX_E_CANCELLED on this side, and the peer is told (ABORTED,
 * reason cancelled), unless it had already ended. Before start, the transfer will fail at once when run.
 * Returns immediately (DSTX_OK, or DSTX_E_INVALID for NULL). Thread-safe and async-signal-safe: a VMM may
 * call it from a signal handler. A source read blocked inside the kernel (an idle pipe) is noticed only when
 * that read returns.
 */
DSTX_API int dstx_transfer_cancel(dstx_transfer* transfer);

/*
 * Copies the live statistics into *out (set out->size first: DSTX_STATS_INIT). Fills min(out->size,
 * sizeof(dstx_stats)) bytes and leaves out->size as it was. DSTX_E_INVALID when out->size is smaller than
 * the first version's struct. Thread-safe; the counters are each consistent, not a snapshot of all at once.
 */
DSTX_API int dstx_transfer_stats(const dstx_transfer* transfer, dstx_stats* out);

/*
 * Receiving with DSTX_NET_ADDRESS or DSTX_NET_LISTEN_FD on TCP: the local port the sender must connect to
 * (useful after listening on port 0). DSTX_E_STATE for a sending handle or a non-TCP socket. Thread-safe.
 */
DSTX_API int dstx_transfer_local_port(const dstx_transfer* transfer, uint16_t* port);

/*
 * The detailed English text of a failure. With a handle: why its transfer failed, once it has ended (e.g.
 * "emu sink: byte mismatch at offset 4096 (expected 0x1f, got 0x00)"); "" before that or after success.
 * Status codes from misuse (DSTX_E_STATE, or DSTX_E_INVALID for a bad argument to a handle's function) do
 * not change it. With NULL: why the calling thread's latest dstx_send_create, dstx_recv_create or
 * dstx_send_config_apply_tune failed ("" if it succeeded). Never NULL. Valid until the handle is destroyed
 * (NULL: until this thread's next such call). Thread-safe.
 */
DSTX_API const char* dstx_last_error(const dstx_transfer* transfer);

#ifdef __cplusplus
}
#endif

#endif /* DSTX_DSTX_H */
