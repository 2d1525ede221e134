// The sending options shared by `dstx send`, `dstx demo` and `dstx migrate`: one parser, one list of names.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "cli/args.h"
#include "engine/transfer.h"
#include "engine/tune_profile.h"
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

// nullopt when `path` is empty or does not exist; throws UsageError naming `path` when it cannot be used.
std::optional<engine::TuneProfile> load_tune_profile(const std::string& path);

}  // namespace dstx::cli
