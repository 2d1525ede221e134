#include "cli/send_options.h"

#include "cli/tls_args.h"
#include "engine/spec.h"

namespace dstx::cli {

std::set<std::string> send_option_names(std::set<std::string> extra) {
  extra.insert({"streams", "codec", "zstd-level", "chunk-size", "depth", "connect-timeout", "commit-timeout",
                "idle-timeout", "bandwidth", "reconnect-attempts", "replay-buffer", "tcp-user-timeout",
                "zero-copy-min"});
  return with_tls_options(std::move(extra));
}

engine::SendOptions send_options(const Args& args) {
  engine::SendOptions o;
  o.streams = args.get_unsigned("streams", 0, 1, engine::wire::kMaxStreams);
  if (auto c = args.get("codec")) {
    if (!engine::codec_mode_from_name(*c, &o.codec)) {
      throw UsageError("--codec '" + *c + "': expected auto, none, lz4 or zstd");
    }
  }
  o.zstd_level = args.get_int("zstd-level", 1, 1, 19);
  const uint64_t chunk = args.get_size("chunk-size", engine::kDefaultChunkBytes);
  if (chunk < engine::wire::kMinChunkBytes || chunk > engine::wire::kMaxChunkBytes) {
    throw UsageError("--chunk-size " + engine::format_bytes(double(chunk)) + ": must be between 4K and 16M");
  }
  o.chunk_bytes = uint32_t(chunk);
  o.depth = args.get_unsigned("depth", 4, 1, 64);
  o.socket.connect_timeout_ms = args.get_int("connect-timeout", 10000, 1, 3600000);
  o.socket.user_timeout_ms = args.get_int("tcp-user-timeout", o.socket.user_timeout_ms, 0, 3600000);
  o.commit_timeout_ms = args.get_int("commit-timeout", 120000, 1, 86400000);
  o.idle_timeout_ms = args.get_int("idle-timeout", o.idle_timeout_ms, 0, 86400000);
  o.resume = !args.has("no-resume");
  o.reconnect_attempts = args.get_int("reconnect-attempts", o.reconnect_attempts, 1, 1000);
  o.replay_bytes = args.get_size("replay-buffer", o.replay_bytes);
  o.zero_copy_min_bytes = args.get_size("zero-copy-min", o.zero_copy_min_bytes);
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

}  // namespace dstx::cli
