// The TLS options every networked command takes (send, recv, demo, migrate): names, help lines, parsing.
#pragma once

#include <set>
#include <string>

#include "cli/args.h"
#include "engine/tls.h"

namespace dstx::cli {

// The option names (without "--") that take a value: add them to a command's `with_value` set.
std::set<std::string> with_tls_options(std::set<std::string> with_value);

// Help lines for the options, one per line, indented like the other commands' option lists.
extern const char* const kTlsHelp;

// Reads the options. Throws UsageError for an incomplete or contradictory combination, or for files that do
// not load (a missing file, a key that does not match its certificate, a malformed PSK file).
engine::TlsOptions tls_options(const Args& args);

}  // namespace dstx::cli
