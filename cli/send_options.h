// The sending options shared by `dstx send`, `dstx demo` and `dstx migrate`: one parser, one list of names.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "cli/args.h"
#include "engine/transfer.h"
#include "io/vfio/device.h"

namespace dstx::cli {

// The names of the options send_options() reads (TLS included), plus the command's own `extra` ones.
std::set<std::string> send_option_names(std::set<std::string> extra);
// Flags (no value) that send_options() reads.
inline const std::set<std::string> kSendFlags = {"no-resume", "no-tune", "register-buffers"};
// Builds the options. Defaults come from the tune profile when one exists (unless --no-tune), explicit
// options override it. A malformed profile is a UsageError naming the file.
engine::SendOptions send_options(const Args& args);

// --vfio-protocol v1|v2|auto (dstx migrate, dstx recv with a device sink); `detect` when absent.
io::vfio::ProtocolChoice vfio_protocol(const Args& args);

// The three numbers of a `dstx tune` profile that sending uses.
struct TuneDefaults {
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
std::optional<TuneDefaults> parse_tune_profile(std::string_view text, std::string* error);
// nullopt when `path` is empty or does not exist; throws UsageError naming `path` when it cannot be used.
std::optional<TuneDefaults> load_tune_profile(const std::string& path);

}  // namespace dstx::cli
