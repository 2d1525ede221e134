// The profile `dstx tune` writes (JSON): the numbers sending takes from it. One reader for the CLI (dstx
// send, demo, migrate) and the C ABI (dstx_send_config_apply_tune).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dstx::engine {

struct TuneProfile {
  uint32_t chunk_bytes = 0;
  unsigned streams = 0;
  uint64_t zero_copy_min_bytes = 0;
  uint64_t raw_bytes_per_second = 0;  // "raw_mb_s", "lz4_mb_s" x 10^6 (0: not in the profile)
  uint64_t lz4_bytes_per_second = 0;
};

// $DSTX_TUNE_PROFILE, else ${XDG_CONFIG_HOME:-$HOME/.config}/dstx/tune.json; empty when neither is known.
std::string tune_profile_path();
// Reads the top-level "version" (must be 1), "chunk_bytes", "streams" and "zero_copy_min_bytes" of a profile,
// and "raw_mb_s" and "lz4_mb_s" where present.
// Returns nullopt and sets `error` when the text is not such a profile.
std::optional<TuneProfile> parse_tune_profile(std::string_view text, std::string* error);

enum class ProfileRead : uint8_t {
  ok,
  missing,     // no file at the path (or the path is empty): the built-in defaults apply
  unreadable,  // it exists but cannot be read; `error` says why
  malformed,   // not a profile; `error` says why
};
// Reads and parses the profile at `path` into `out`.
ProfileRead read_tune_profile(const std::string& path, TuneProfile* out, std::string* error);

}  // namespace dstx::engine
