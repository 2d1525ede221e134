// dstx migrate: the source side of a device migration. Exit 0 only after COMMITTED; on any failure the
// device is back in RUNNING before dstx exits 1.

#include <cinttypes>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/progress.h"
#include "cli/send_options.h"
#include "engine/migrate.h"
#include "engine/spec.h"
#include "engine/transfer.h"

namespace dstx::cli {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;

const char* kMigrateHelp =
    "usage: dstx migrate --device SPEC --to HOST:PORT [options]\n"
    "\n"
    "Migrates a VFIO device's state: pre-copy rounds while the device runs, then stop-copy, then STOP once\n"
    "the receiver (dstx recv --sink DEVICE) has loaded and accepted it. Any failure puts the device back to\n"
    "RUNNING.\n"
    "\n"
    "  --device SPEC            vfio:/dev/vfio/devices/vfioN (iommufd cdev),\n"
    "                           vfio-group:/dev/vfio/GROUP:DEVICE (PCI address or mdev UUID),\n"
    "                           emu-v1:KEY=VALUE,... or emu-v2:KEY=VALUE,... (emulated devices, see below)\n"
    "  --to HOST:PORT           the receiver\n"
    "  --streams N              parallel TCP streams (default: the tune profile's, else one per core)\n"
    "  --precopy-max-rounds N   pre-copy rounds at most (default 8; 0: straight to stop-copy)\n"
    "  --downtime-target MS     leave pre-copy once the rest fits in this many ms (default 300)\n"
    "  --vfio-protocol P        v1, v2 or auto (default: v2 when the device offers it, else v1)\n"
    "  --codec MODE             auto (default), none, sparse, lz4, zstd\n"
    "  --chunk-size SIZE        4K..16M, exactly (default: the tune profile's, else 1M; a v2 device whose\n"
    "                           stop-copy estimate is under 512 of them gets size/512, at least 64K)\n"
    "  --connect-timeout MS, --commit-timeout MS, --idle-timeout MS, --bandwidth RATE,\n"
    "  --reconnect-attempts N, --replay-buffer SIZE, --no-resume, --tcp-user-timeout MS, --depth N,\n"
    "  --zstd-level N, --zero-copy-min SIZE, --register-buffers, --no-tune, and the --tls-… options: as for\n"
    "  dstx send (dstx send --help)\n"
    "  --json                   one JSON object: the send fields plus protocol, downtime_ms, "
    "precopy_rounds,\n"
    "                           precopy_bytes, stopcopy_bytes, device_state, state_digest (emulated "
    "devices)\n"
    "  --quiet                  no progress line\n"
    "\n"
    "emulated device keys: size=SIZE, profile=NAME, seed=N, dirty=BYTES_PER_SEC, fault=NAME (repeatable),\n"
    "  open=cdev|group, delay-us=N (a slow driver); v2: precopy=0|1, p2p=0|1, temp-end=enomsg|zero;\n"
    "  v1: section=SIZE, mmap=all|part|none|ro\n"
    "faults: reject-state, eio-read@BYTES, eio-write@BYTES, transition-fail@STATE, transition-error@STATE,\n"
    "  short-read, bad-range\n"
    "docs/vfio.md: real hardware (vfio-pci binding, permissions, which protocol is used).\n";

bool wants_help(const std::vector<std::string>& a) {
  for (const auto& s : a) {
    if (s == "--help" || s == "-h") return true;
  }
  return false;
}

std::string json_escaped(const std::string& s) {
  return json_escape(s);
}

std::string extra_json(const engine::MigrateResult& r) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                ",\"protocol\":\"%s\",\"downtime_ms\":%.3f,\"precopy_rounds\":%u,\"precopy_bytes\":%" PRIu64
                ",\"stopcopy_bytes\":%" PRIu64,
                r.protocol.c_str(), r.downtime_ms, r.precopy_rounds, r.precopy_bytes, r.stopcopy_bytes);
  std::string out = buf;
  out += ",\"device_state\":\"" + json_escaped(r.device_state) + "\"";
  if (!r.state_digest.empty()) out += ",\"state_digest\":\"" + r.state_digest + "\"";
  if (!r.device_note.empty()) out += ",\"device_note\":\"" + json_escaped(r.device_note) + "\"";
  return out;
}

}  // namespace

int cmd_migrate(const std::vector<std::string>& argv) {
  if (wants_help(argv)) {
    std::fputs(kMigrateHelp, stdout);
    return kExitOk;
  }
  std::set<std::string> flags = kSendFlags;
  flags.insert({"json", "quiet"});
  const Args args(
      argv, send_option_names({"device", "to", "precopy-max-rounds", "downtime-target", "vfio-protocol"}),
      flags);
  const engine::SendOptions so = send_options(args);
  engine::MigrateOptions mo;
  mo.precopy_max_rounds = args.get_unsigned("precopy-max-rounds", mo.precopy_max_rounds, 0, 1000);
  mo.downtime_target_ms = args.get_unsigned("downtime-target", mo.downtime_target_ms, 0, 3600000);
  mo.protocol = vfio_protocol(args);
  io::HostPort to;
  try {
    to = io::parse_host_port(args.require("to"));
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--to: ") + e.what());
  }
  const std::string spec = args.require("device");
  if (!engine::is_device_spec(spec)) {
    throw UsageError("--device '" + spec + "': expected one of " + engine::kDeviceKinds);
  }
  const bool json = args.has("json");

  // Ctrl-C cancels the migration; the device goes back to RUNNING before we exit.
  set_signal_note(
      "dstx migrate: cancelling, the device goes back to RUNNING; a second Ctrl-C ends at once, without "
      "that\n");

  engine::Stats stats;
  std::unique_ptr<engine::MigrationSource> source;
  try {
    source = engine::open_migration_source(spec, mo);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--device: ") + e.what());
  } catch (const std::exception& e) {
    engine::Result r;
    r.reason = engine::wire::Reason::source;
    r.error = e.what();
    if (json)
      print_json(stdout, "migrate", r, stats);
    else
      print_summary(stderr, "migrate", r, stats);
    return kExitFailed;
  }
  ProgressLine progress(stats, "migrate", !json && !args.has("quiet"));
  const engine::MigrateResult r = engine::migrate_to(*source, to, so, &stats, &signal_cancel());
  progress.stop();
  if (json) {
    print_json(stdout, "migrate", r.transfer, stats, extra_json(r));
  } else {
    std::FILE* out = r.transfer.committed ? stdout : stderr;
    print_summary(out, "migrate", r.transfer, stats);
    std::fprintf(out, "  device %s (%s): %u pre-copy rounds (%s), stop-copy %s", spec.c_str(),
                 r.protocol.c_str(), r.precopy_rounds, engine::format_bytes(double(r.precopy_bytes)).c_str(),
                 engine::format_bytes(double(r.stopcopy_bytes)).c_str());
    if (r.downtime_ms >= 0) std::fprintf(out, ", downtime %.1f ms", r.downtime_ms);
    std::fprintf(out, "; now %s\n", r.device_state.c_str());
    if (!r.state_digest.empty()) std::fprintf(out, "  state digest %s\n", r.state_digest.c_str());
    if (!r.device_note.empty()) std::fprintf(stderr, "migrate: device: %s\n", r.device_note.c_str());
  }
  return r.transfer.committed ? kExitOk : kExitFailed;
}

void print_device_sink(std::FILE* out, io::Sink& sink) {
  auto* device = dynamic_cast<engine::DeviceSink*>(&sink);
  if (!device) return;
  std::fprintf(out, "  device %s (%s): now %s\n", device->describe().c_str(),
               io::vfio::protocol_name(device->protocol()), device->device_state().c_str());
  const std::string digest = device->state_digest();
  if (!digest.empty()) std::fprintf(out, "  state digest %s\n", digest.c_str());
  if (!device->abort_note().empty()) std::fprintf(stderr, "recv: device: %s\n", device->abort_note().c_str());
}

}  // namespace dstx::cli
