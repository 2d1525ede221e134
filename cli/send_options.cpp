#include "cli/send_options.h"

#include "cli/progress.h"
#include "cli/tls_args.h"
#include "engine/spec.h"

namespace dstx::cli {

std::optional<engine::TuneProfile> load_tune_profile(const std::string& path) {
  engine::TuneProfile p;
  std::string why;
  switch (engine::read_tune_profile(path, &p, &why)) {
    case engine::ProfileRead::ok:
      return p;
    case engine::ProfileRead::missing:
      return std::nullopt;  // no profile: the built-in defaults
    case engine::ProfileRead::unreadable:
      throw UsageError("tune profile " + path + ": " + why + " (--no-tune ignores it)");
    case engine::ProfileRead::malformed:
      break;
  }
  throw UsageError("tune profile " + path + " is malformed: " + why +
                   " (run dstx tune again, remove it, or pass --no-tune)");
}

std::set<std::string> send_option_names(std::set<std::string> extra) {
  extra.insert({"streams", "codec", "zstd-level", "chunk-size", "depth", "connect-timeout", "commit-timeout",
                "idle-timeout", "bandwidth", "reconnect-attempts", "replay-buffer", "tcp-user-timeout",
                "zero-copy-min"});
  return with_tls_options(std::move(extra));
}

engine::SendOptions send_options(const Args& args) {
  engine::SendOptions o;
  // dstx tune's measurements are the defaults; explicit options win.
  if (!args.has("no-tune")) {
    if (auto t = load_tune_profile(engine::tune_profile_path())) {
      o.streams = t->streams;
      o.chunk_bytes = t->chunk_bytes;
      o.zero_copy_min_bytes = t->zero_copy_min_bytes;
      o.tuned_raw_bytes_per_second = t->raw_bytes_per_second;
      o.tuned_lz4_bytes_per_second = t->lz4_bytes_per_second;
    }
  }
  o.streams = args.get_unsigned("streams", o.streams, 1, engine::wire::kMaxStreams);
  if (auto c = args.get("codec")) {
    if (!engine::codec_mode_from_name(*c, &o.codec)) {
      throw UsageError("--codec '" + *c + "': expected auto, none, sparse, lz4 or zstd");
    }
  }
  o.zstd_level = args.get_int("zstd-level", 1, 1, 19);
  const uint64_t chunk = args.get_size("chunk-size", o.chunk_bytes);
  if (chunk < engine::wire::kMinChunkBytes || chunk > engine::wire::kMaxChunkBytes) {
    throw UsageError("--chunk-size " + engine::format_bytes(double(chunk)) + ": must be between 4K and 16M");
  }
  o.chunk_bytes = uint32_t(chunk);
  o.fit_chunks = !args.has("chunk-size");  // explicit: exactly that size; else smaller for a small state
  o.depth = args.get_unsigned("depth", 4, 1, 64);
  o.socket.connect_timeout_ms = args.get_int("connect-timeout", 10000, 1, 3600000);
  o.socket.user_timeout_ms = args.get_int("tcp-user-timeout", o.socket.user_timeout_ms, 0, 3600000);
  o.commit_timeout_ms = args.get_int("commit-timeout", 120000, 1, 86400000);
  o.idle_timeout_ms = args.get_int("idle-timeout", o.idle_timeout_ms, 0, 86400000);
  o.resume = !args.has("no-resume");
  o.register_buffers = args.has("register-buffers");
  o.reconnect_attempts = args.get_int("reconnect-attempts", o.reconnect_attempts, 1, 1000);
  o.replay_bytes = args.get_size("replay-buffer", o.replay_bytes);
  if (o.replay_bytes > engine::kMaxReplayBytes)
    throw UsageError("--replay-buffer " + *args.get("replay-buffer") + ": at most 1G");
  o.zero_copy_min_bytes = args.get_size("zero-copy-min", o.zero_copy_min_bytes);
  o.log = stderr_log("send");
  if (auto rate = args.get("bandwidth")) {
    try {
      o.bandwidth_bytes_per_second = engine::parse_rate(*rate);
    } catch (const std::exception& e) {
      throw UsageError(std::string("--bandwidth: ") + e.what());
    }
  }
  o.tls = tls_options(args);
  return o;
}

io::vfio::ProtocolChoice vfio_protocol(const Args& args) {
  io::vfio::ProtocolChoice choice = io::vfio::ProtocolChoice::detect;
  if (auto p = args.get("vfio-protocol")) {
    if (!io::vfio::protocol_choice_from_name(*p, &choice)) {
      throw UsageError("--vfio-protocol '" + *p + "': expected v1, v2 or auto");
    }
  }
  return choice;
}

}  // namespace dstx::cli
