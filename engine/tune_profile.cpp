#include "engine/tune_profile.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "engine/transfer.h"
#include "engine/wire.h"

namespace dstx::engine {

std::string tune_profile_path() {
  if (const char* p = std::getenv("DSTX_TUNE_PROFILE"); p && *p) return p;
  if (const char* x = std::getenv("XDG_CONFIG_HOME"); x && *x) return std::string(x) + "/dstx/tune.json";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.config/dstx/tune.json";
  return {};
}

// A minimal, strict scan: the text must be one JSON object with balanced brackets and closed strings; only
// the top-level keys named below are read, and each must be a plain non-negative integer. The first four
// are required; the last two came later (profiles saved before them lack them).
std::optional<TuneProfile> parse_tune_profile(std::string_view text, std::string* error) {
  static const char* const kKeys[] = {"version",  "chunk_bytes", "streams", "zero_copy_min_bytes",
                                      "raw_mb_s", "lz4_mb_s"};
  constexpr size_t kRequired = 4;
  std::map<std::string, uint64_t> found;
  auto fail = [&](const std::string& why) {
    *error = why;
    return std::optional<TuneProfile>();
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
  TuneProfile d;
  const uint64_t chunk = found["chunk_bytes"];
  if (chunk < wire::kMinChunkBytes || chunk > wire::kMaxChunkBytes) {
    return fail("chunk_bytes " + std::to_string(chunk) + " is not between 4K and 16M");
  }
  if (found["streams"] < 1 || found["streams"] > wire::kMaxStreams) {
    return fail("streams " + std::to_string(found["streams"]) + " is not between 1 and " +
                std::to_string(wire::kMaxStreams));
  }
  d.chunk_bytes = uint32_t(chunk);
  d.streams = unsigned(found["streams"]);
  d.zero_copy_min_bytes = found["zero_copy_min_bytes"];
  constexpr uint64_t kMaxMbPerSecond = kMaxTunedBytesPerSecond / 1000000;
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

ProfileRead read_tune_profile(const std::string& path, TuneProfile* out, std::string* error) {
  if (path.empty()) return ProfileRead::missing;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (errno == ENOENT || errno == ENOTDIR) return ProfileRead::missing;
    *error = std::strerror(errno);
    return ProfileRead::unreadable;
  }
  std::ostringstream text;
  text << in.rdbuf();
  auto p = parse_tune_profile(text.str(), error);
  if (!p) return ProfileRead::malformed;
  *out = *p;
  return ProfileRead::ok;
}

}  // namespace dstx::engine
