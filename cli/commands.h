// Commands that live in their own files; cli/main.cpp dispatches to them.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "engine/transfer.h"
#include "io/endpoints.h"

namespace dstx::cli {

// dstx migrate: drive a VFIO device (real or emulated) through pre-copy and stop-copy to a receiver.
int cmd_migrate(const std::vector<std::string>& argv);

// dstx tune: measure this machine and link, save the profile send/demo/migrate default to (cli/tune.cpp).
int cmd_tune(const std::vector<std::string>& argv);

// Requested by the first SIGINT or SIGTERM (cli/main.cpp); a second ends the process at once.
engine::Cancel& signal_cancel();
// What the first signal prints to stderr (a string literal): what cancelling does, and that a second forces.
void set_signal_note(const char* note);

// dstx recv into a device sink: the device's final state (and digest) for the summary; nothing for other
// sinks.
void print_device_sink(std::FILE* out, io::Sink& sink);

}  // namespace dstx::cli
