// The dstx command. Thin: parse, open endpoints, call the engine, print. Exit 0 only after COMMITTED,
// 1 when the transfer failed, 2 on usage errors.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cerrno>
#include <cstring>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/progress.h"
#include "cli/send_options.h"
#include "cli/tls_args.h"
#include "engine/migrate.h"
#include "engine/spec.h"
#include "engine/transfer.h"

namespace dstx::cli {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

engine::Cancel g_cancel;
std::atomic<const char*> g_force_note{"dstx: cancelling; a second Ctrl-C ends it at once\n"};

// The first SIGINT or SIGTERM cancels (both sides stop cleanly); a second ends the process at once, for a
// wait no cancel reaches (a blocking write into a pipe whose reader stopped, a name lookup).
void on_signal(int sig) {
  static std::atomic<int> seen{0};
  if (seen.fetch_add(1) == 0) {
    const int saved = errno;  // the interrupted thread's
    g_cancel.request();
    const char* note = g_force_note.load();
    (void)!::write(STDERR_FILENO, note, std::strlen(note));
    errno = saved;
    return;
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

void install_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

}  // namespace

engine::Cancel& signal_cancel() { return g_cancel; }
void set_signal_note(const char* note) { g_force_note = note; }

namespace {

const char* kMainHelp =
    "dstx: device-state transfer for VM live migration\n"
    "\n"
    "usage: dstx COMMAND [OPTIONS]   (dstx COMMAND --help for details)\n"
    "\n"
    "commands:\n"
    "  send    read state from a source and stream it to a receiver\n"
    "  recv    serve one transfer and write it into a sink\n"
    "  demo    a receiver and a sender over loopback, emulated state, verified byte for byte\n"
    "  migrate migrate a VFIO device's state to dstx recv: pre-copy, stop-copy, back to RUNNING on failure\n"
    "  tune    measure this machine and link; save the chunk size, streams and zero-copy minimum send uses\n"
    "\n"
    "exit codes: 0 committed, 1 transfer failed, 2 usage error\n";

const char* kSendHelp =
    "usage: dstx send --source SPEC --to HOST:PORT [options]\n"
    "\n"
    "  --source SPEC       file:PATH, emu:size=SIZE,profile=NAME,seed=N, stdin:, fd:N\n"
    "  --to HOST:PORT      the receiver (dstx recv --listen)\n"
    "  --streams N         parallel TCP streams (default: the tune profile's, else one per core)\n"
    "  --codec MODE        auto (default: zero skip + lz4, raw where it does not pay), none, sparse\n"
    "                      (raw without its zero pages), lz4, zstd\n"
    "  --zstd-level N      1..19 (default 1)\n"
    "  --chunk-size SIZE   4K..16M, exactly (default: the tune profile's, else 1M; a state of known size under\n"
    "                      512 of them gets smaller ones: size/512 in powers of two, at least 64K)\n"
    "  --depth N           chunks in flight per stream (default 4)\n"
    "  --connect-timeout MS, --commit-timeout MS\n"
    "  --idle-timeout MS   fail when nothing moves for this long (default 30000; 0: never; not while the\n"
    "                      receiver commits, which --commit-timeout bounds)\n"
    "  --bandwidth RATE    cap on the wire rate, e.g. 500M (bytes/s) or 1gbit\n"
    "  --reconnect-attempts N  per broken stream before giving up (default 5)\n"
    "  --replay-buffer SIZE    unacknowledged frames kept for resuming (default 32M, at most 1G; a device or\n"
    "                          stream source only: a file is read again)\n"
    "  --no-resume         fail at the first broken connection instead of resuming\n"
    "  --zero-copy-min SIZE  send frames at least this large with SEND_ZC\n"
    "                      (default: the tune profile's, else 0: never)\n"
    "  --register-buffers  register the frame buffers with io_uring (READ_FIXED; costs set-up time)\n"
    "  --no-tune           ignore the dstx tune profile: $DSTX_TUNE_PROFILE, else\n"
    "                      ${XDG_CONFIG_HOME:-~/.config}/dstx/tune.json; when it exists, it sets the\n"
    "                      defaults of --streams, --chunk-size and --zero-copy-min (explicit options win)\n"
    "  --tcp-user-timeout MS  a connection with data unacknowledged this long is broken (default 30000)\n"
    "  --json              print one JSON object instead of the summary\n"
    "  --quiet             no progress line\n";

const char* kRecvHelp =
    "usage: dstx recv --listen HOST:PORT --sink SPEC [options]\n"
    "\n"
    "  --listen HOST:PORT  address to accept the sender on (port 0: any; the port is printed)\n"
    "  --sink SPEC         file:PATH (PATH appears only when committed), emu:…, null:, stdout:, fd:N\n"
    "                      or a VFIO device to load the state into: vfio:…, vfio-group:…, emu-v1:…, "
    "emu-v2:…\n"
    "                      (see dstx migrate --help)\n"
    "  --vfio-protocol P   a VFIO device sink only: v1, v2 or auto (default: v2 when the device offers it)\n"
    "  --streams N         the most streams to accept (default 64)\n"
    "  --count N           serve N transfers one after another on the same listener, each into a fresh sink\n"
    "                      opened from SPEC (default 1; exit 0 only if all committed; stops at the first\n"
    "                      failure). A sender that connects while the previous transfer is still\n"
    "                      closing is refused as busy: start the next one ~0.3 s after the last committed\n"
    "  --max-chunk-size SIZE  largest chunk accepted (default 16M)\n"
    "  --memory SIZE       memory budget for buffers (default 64M)\n"
    "  --accept-timeout MS how long to wait for a sender (default 60000)\n"
    "  --idle-timeout MS   fail when nothing arrives for this long (default 30000; 0: never; not while the\n"
    "                      sink commits)\n"
    "  --resume-timeout MS how long a broken stream may take to reconnect (default 30000)\n"
    "  --tcp-user-timeout MS  a connection with data unacknowledged this long is broken (default 30000)\n"
    "  --json, --quiet\n";

const char* kDemoHelp =
    "usage: dstx demo [--size SIZE] [--profile NAME] [--seed N] [--streams N] [--codec MODE] [--json]\n"
    "\n"
    "Migrates emulated device state (default 1G, mixed) from a sender to a receiver over loopback TCP.\n"
    "The receiver checks every byte against the generator and the whole-stream digest before it commits.\n"
    "profiles: zero, zero-heavy, binary, text, random, mixed\n";

bool wants_help(const std::vector<std::string>& a) {
  for (const auto& s : a) {
    if (s == "--help" || s == "-h") return true;
  }
  return false;
}

// `out` is stderr when the state itself goes to stdout (a stream sink): nothing may follow the stream there.
int finish(const char* role, const engine::Result& r, const engine::Stats& st, bool json,
           std::FILE* out = stdout, const std::string& extra_json = "") {
  if (json)
    print_json(out, role, r, st, extra_json);
  else
    print_summary(r.committed ? out : stderr, role, r, st);
  return r.committed ? kExitOk : kExitFailed;
}

bool writes_stdout(const std::string& spec) {
  return spec == "stdout:" || spec.rfind("stdout:", 0) == 0 || spec == "fd:1";
}

int cmd_send(const std::vector<std::string>& argv) {
  if (wants_help(argv)) {
    std::fputs(kSendHelp, stdout);
    std::fputs(kTlsHelp, stdout);
    return kExitOk;
  }
  const Args args(argv, send_option_names({"source", "to"}),
                  {"json", "quiet", "no-resume", "no-tune", "register-buffers"});
  const engine::SendOptions options = send_options(args);
  io::HostPort to;
  try {
    to = io::parse_host_port(args.require("to"));
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--to: ") + e.what());
  }
  const std::string spec = args.require("source");
  engine::Stats stats;
  std::unique_ptr<io::Source> source;
  try {
    source = engine::open_source(spec);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--source: ") + e.what());
  } catch (const std::exception& e) {
    engine::Result r;
    r.reason = engine::wire::Reason::source;
    r.error = e.what();
    return finish("send", r, stats, args.has("json"));
  }
  ProgressLine progress(stats, "send", !args.has("json") && !args.has("quiet"));
  const engine::Result r = engine::send_to(*source, to, options, &stats, &g_cancel);
  progress.stop();
  return finish("send", r, stats, args.has("json"));
}

int cmd_recv(const std::vector<std::string>& argv) {
  if (wants_help(argv)) {
    std::fputs(kRecvHelp, stdout);
    std::fputs(kTlsHelp, stdout);
    return kExitOk;
  }
  const Args args(argv,
                  with_tls_options({"listen", "sink", "streams", "max-chunk-size", "memory", "accept-timeout",
                                    "idle-timeout", "resume-timeout", "tcp-user-timeout", "count",
                                    "vfio-protocol"}),
                  {"json", "quiet"});
  engine::RecvOptions o;
  o.max_streams = args.get_unsigned("streams", engine::wire::kMaxStreams, 1, engine::wire::kMaxStreams);
  const uint64_t max_chunk = args.get_size("max-chunk-size", engine::wire::kMaxChunkBytes);
  if (max_chunk < engine::wire::kMinChunkBytes || max_chunk > engine::wire::kMaxChunkBytes) {
    throw UsageError("--max-chunk-size: must be between 4K and 16M");
  }
  o.max_chunk_bytes = uint32_t(max_chunk);
  o.memory_budget_bytes = args.get_size("memory", o.memory_budget_bytes);
  o.accept_timeout_ms = args.get_int("accept-timeout", o.accept_timeout_ms, 1, 86400000);
  o.idle_timeout_ms = args.get_int("idle-timeout", o.idle_timeout_ms, 0, 86400000);
  o.resume_timeout_ms = args.get_int("resume-timeout", o.resume_timeout_ms, 1, 86400000);
  o.socket.user_timeout_ms = args.get_int("tcp-user-timeout", o.socket.user_timeout_ms, 0, 3600000);
  o.tls = tls_options(args);
  o.log = stderr_log("recv");
  const unsigned count = args.get_unsigned("count", 1, 1, 1000000);
  io::HostPort where;
  try {
    where = io::parse_host_port(args.require("listen"));
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--listen: ") + e.what());
  }
  const std::string spec = args.require("sink");
  if (args.has("vfio-protocol") && !engine::is_device_spec(spec)) {
    throw UsageError("--vfio-protocol applies only to a VFIO device sink (" + std::string(engine::kDeviceKinds) +
                     "), not '" + spec + "'");
  }
  const io::vfio::ProtocolChoice protocol = vfio_protocol(args);
  if (count > 1 && spec.starts_with("fd:")) {
    throw UsageError("--count " + std::to_string(count) + " with --sink " + spec +
                     ": the descriptor is closed after the first transfer (use stdout: or file:)");
  }
  io::Fd listener;
  // --count N: one transfer after another on the same listener, each into a sink freshly opened from `spec`.
  int rc = kExitOk;
  for (unsigned n = 0; n < count && rc == kExitOk; ++n) {
    engine::Stats stats;
    std::unique_ptr<io::Sink> sink;
    try {
      sink = engine::open_sink(spec, protocol);
    } catch (const std::invalid_argument& e) {
      throw UsageError(std::string("--sink: ") + e.what());
    } catch (const std::exception& e) {
      engine::Result r;
      r.reason = engine::wire::Reason::sink;
      r.error = e.what();
      return finish("recv", r, stats, args.has("json"));
    }
    if (!listener) {
      try {
        listener = io::tcp_listen(where);
      } catch (const std::exception& e) {
        sink->abort();
        engine::Result r;
        r.reason = engine::wire::Reason::connection;
        r.error = e.what();
        return finish("recv", r, stats, args.has("json"));
      }
      // Tell scripts which port was bound (useful with port 0). stderr keeps stdout clean for --json/stdout:.
      std::fprintf(stderr, "dstx recv: listening on %s:%u\n", where.host.c_str(),
                   io::bound_port(listener.get()));
    }
    ProgressLine progress(stats, "recv", !args.has("json") && !args.has("quiet"));
    const engine::Result r = engine::receive(*sink, listener.get(), o, &stats, &g_cancel);
    progress.stop();
    // A device sink adds the device's final state (and, emulated, its state digest).
    rc = finish("recv", r, stats, args.has("json"), writes_stdout(spec) ? stderr : stdout,
                engine::device_sink_json_fields(*sink));
    if (!args.has("json")) print_device_sink(r.committed ? stdout : stderr, *sink);
  }
  return rc;
}

int cmd_demo(const std::vector<std::string>& argv) {
  if (wants_help(argv)) {
    std::fputs(kDemoHelp, stdout);
    std::fputs(kTlsHelp, stdout);
    return kExitOk;
  }
  const Args args(argv, send_option_names({"size", "profile", "seed"}),
                  {"json", "quiet", "no-resume", "no-tune", "register-buffers"});
  engine::EmuSpec spec;
  spec.size = args.get_size("size", 1ull << 30);
  if (auto p = args.get("profile")) {
    if (!io::profile_from_name(*p, &spec.profile)) {
      throw UsageError("--profile '" + *p + "': expected one of " + std::string(io::profile_names()));
    }
  }
  spec.seed = args.get_unsigned("seed", 1, 0, INT32_MAX);
  engine::SendOptions so = send_options(args);
  const bool json = args.has("json");
  const io::ContentGenerator gen(spec.profile, spec.seed);
  auto source = io::open_emu_source(gen, spec.size);
  auto sink = io::open_emu_sink(gen, spec.size);
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  if (!json) {
    std::printf("dstx demo: %s of emulated '%s' state (seed %llu), 127.0.0.1:%u, %u streams, codec %s\n",
                engine::format_bytes(double(spec.size)).c_str(),
                std::string(io::profile_name(spec.profile)).c_str(), (unsigned long long)spec.seed, port,
                so.streams ? so.streams : engine::default_streams(), engine::codec_mode_name(so.codec));
    std::fflush(stdout);
  }
  engine::Stats recv_stats;
  engine::Result recv_result;
  engine::RecvOptions ro;
  ro.tls = so.tls;  // one certificate (or key) for both ends of the demo
  ro.log = stderr_log("recv");
  std::thread receiver(
      [&] { recv_result = engine::receive(*sink, listener.get(), ro, &recv_stats, &g_cancel); });
  engine::Stats send_stats;
  ProgressLine progress(send_stats, "demo", !json && !args.has("quiet"));
  const engine::Result send_result =
      engine::send_to(*source, io::HostPort{"127.0.0.1", port}, so, &send_stats, &g_cancel);
  if (!send_result.committed) g_cancel.request();  // the receiver may still be waiting for a connection
  receiver.join();
  progress.stop();
  if (json) {
    print_json(stdout, "send", send_result, send_stats);
    print_json(stdout, "recv", recv_result, recv_stats);
  } else {
    print_summary(send_result.committed ? stdout : stderr, "send", send_result, send_stats);
    print_summary(recv_result.committed ? stdout : stderr, "recv", recv_result, recv_stats);
    if (send_result.committed && recv_result.committed) {
      std::printf("demo: receiver checked all %s against the generator: byte-exact\n",
                  engine::format_bytes(double(recv_result.bytes)).c_str());
    }
  }
  return send_result.committed && recv_result.committed ? kExitOk : kExitFailed;
}

int run(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kMainHelp, stderr);
    return kExitUsage;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> rest(argv + 2, argv + argc);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kMainHelp, stdout);
    return kExitOk;
  }
  if (cmd == "--version") {
    std::printf("dstx 0.1.0 (wire protocol %u)\n", engine::wire::kVersion);
    return kExitOk;
  }
  install_signals();
  try {
    if (cmd == "send") return cmd_send(rest);
    if (cmd == "recv") return cmd_recv(rest);
    if (cmd == "demo") return cmd_demo(rest);
    if (cmd == "migrate") return cmd_migrate(rest);
    if (cmd == "tune") return cmd_tune(rest);
    std::fprintf(stderr, "dstx: unknown command '%s'\n\n%s", cmd.c_str(), kMainHelp);
    return kExitUsage;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "dstx %s: %s (see dstx %s --help)\n", cmd.c_str(), e.what(), cmd.c_str());
    return kExitUsage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dstx %s: %s\n", cmd.c_str(), e.what());
    return kExitFailed;
  }
}

}  // namespace
}  // namespace dstx::cli

int main(int argc, char** argv) {
  return dstx::cli::run(argc, argv);
}
