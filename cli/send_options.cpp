#include "cli/send_options.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "cli/progress.h"
#include "cli/tls_args.h"
#include "engine/spec.h"

namespace dstx::cli {

std::string tune_profile_path() {
  if (const char* p = std::getenv("DSTX_TUNE_PROFILE"); p && *p) return p;
  if (const char* x = std::getenv("XDG_CONFIG_HOME"); x && *x) return std::string(x) + "/dstx/tune.json";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.config/dstx/tune.json";
  return {};
}

// A minimal, strict scan: the text must be one JSON object with balanced brackets and closed strings; only
// the top-level keys named below are read, and each must be a plain non-negative integer. The first four
// are required; the last two came later (profiles saved before them lack them).
std::optional<TuneDefaults> parse_tune_profile(std::string_view text, std::string* error) {
  static const char* const kKeys[] = {"version",  "chunk_bytes", "streams", "zero_copy_min_bytes",
                                      "raw_mb_s", "lz4_mb_s"};
  constexpr size_t kRequired = 4;
  std::map<std::string, uint64_t> found;
  auto fail = [&](const std::string& why) {
    *error = why;
    return std::optional<TuneDefaults>();
  };
  size_t i = 0;
  auto skip_ws = [&] {
    while (i < text.size() && std::strchr(" \t\r\n", text[i]) && text[i] != '\0') ++i;
  };
  skip_ws();
  if (i >= text.size() || text[i] != '{') return fail("not a JSON object");
  int depth = 0;
  std::string last_string;
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '"') {
      const size_t start = ++i;
      while (i < text.size() && text[i] != '"') i += text[i] == '\\' ? 2 : 1;
      if (i >= text.size()) return fail("unterminated string");
      last_string.assign(text.substr(start, i - start));
      continue;
    }
    if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      if (--depth < 0) return fail("unbalanced brackets");
      if (depth == 0) {
        ++i;
        break;
      }
    } else if (c == ':' && depth == 1) {
      ++i;
      skip_ws();
      for (const char* k : kKeys) {
        if (last_string != k) continue;
        if (found.count(k)) return fail(std::string("\"") + k + "\" appears twice");
        uint64_t v = 0;
        size_t digits = 0;
        while (i < text.size() && text[i] >= '0' && text[i] <= '9' && digits < 19) {
          v = v * 10 + uint64_t(text[i] - '0');
          ++i;
          ++digits;
        }
        if (digits == 0 || (i < text.size() && std::strchr(".eE-0123456789", text[i]) && text[i] != '\0')) {
          return fail(std::string("\"") + k + "\" is not a non-negative whole number");
        }
        found[k] = v;
      }
      --i;  // the loop's ++i
    }
  }
  skip_ws();
  if (depth != 0) return fail("unbalanced brackets");
  if (i != text.size()) return fail("text after the object");
  for (size_t k = 0; k < kRequired; ++k) {
    if (!found.count(kKeys[k])) return fail(std::string("missing \"") + kKeys[k] + "\"");
  }
  if (found["version"] != 1) return fail("unsupported version " + std::to_string(found["version"]));
  TuneDefaults d;
  const uint64_t chunk = found["chunk_bytes"];
  if (chunk < engine::wire::kMinChunkBytes || chunk > engine::wire::kMaxChunkBytes) {
    return fail("chunk_bytes " + std::to_string(chunk) + " is not between 4K and 16M");
  }
  if (found["streams"] < 1 || found["streams"] > engine::wire::kMaxStreams) {
    return fail("streams " + std::to_string(found["streams"]) + " is not between 1 and " +
                std::to_string(engine::wire::kMaxStreams));
  }
  d.chunk_bytes = uint32_t(chunk);
  d.streams = unsigned(found["streams"]);
  d.zero_copy_min_bytes = found["zero_copy_min_bytes"];
  constexpr uint64_t kMaxMbPerSecond = engine::kMaxTunedBytesPerSecond / 1000000;
  for (const char* k : {"raw_mb_s", "lz4_mb_s"}) {
    if (found[k] > kMaxMbPerSecond) {
      return fail(std::string(k) + " " + std::to_string(found[k]) + " is above " +
                  std::to_string(kMaxMbPerSecond));
    }
  }
  d.raw_bytes_per_second = found["raw_mb_s"] * 1000000;
  d.lz4_bytes_per_second = found["lz4_mb_s"] * 1000000;
  return d;
}

std::optional<TuneDefaults> load_tune_profile(const std::string& path) {
  if (path.empty()) return std::nullopt;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (errno == ENOENT || errno == ENOTDIR) return std::nullopt;  // no profile: the built-in defaults
    throw UsageError("tune profile " + path + ": " + std::strerror(errno) + " (--no-tune ignores it)");
  }
  std::ostringstream text;
  text << in.rdbuf();
  std::string why;
  auto d = parse_tune_profile(text.str(), &why);
  if (!d) {
    throw UsageError("tune profile " + path + " is malformed: " + why +
                     " (run dstx tune again, remove it, or pass --no-tune)");
  }
  return d;
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
    if (auto t = load_tune_profile(tune_profile_path())) {
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
