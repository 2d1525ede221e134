// The sending options shared by `dstx send`, `dstx demo` and `dstx migrate`: one parser, one list of names.
#pragma once

#include <set>
#include <string>

#include "cli/args.h"
#include "engine/transfer.h"

namespace dstx::cli {

// The names of the options send_options() reads (TLS included), plus the command's own `extra` ones.
std::set<std::string> send_option_names(std::set<std::string> extra);
// Flags (no value) that send_options() reads.
inline const std::set<std::string> kSendFlags = {"no-resume"};
engine::SendOptions send_options(const Args& args);

}  // namespace dstx::cli
