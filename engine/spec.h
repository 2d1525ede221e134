// Parsing of endpoint specs ("file:PATH", "emu:size=1G,profile=mixed,seed=7", "null:", "stdin:", "stdout:",
// "fd:N") and sizes ("64K", "1.5G"). Errors throw std::invalid_argument naming the bad part.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "io/content.h"
#include "io/endpoints.h"
#include "io/vfio/device.h"

namespace dstx::engine {

// Bytes from "N", "N[KMGT]", "N[KMGT]iB" (binary multiples), decimals allowed with a suffix ("1.5G").
uint64_t parse_size(std::string_view text);
// A rate in bytes per second: "500M" (bytes, powers of 1024, like sizes) or tc-style bits "1gbit", "100mbit",
// "800kbit" (powers of 1000).
uint64_t parse_rate(std::string_view text);
// "1.50 GiB" style, for humans.
std::string format_bytes(double bytes);

struct EmuSpec {
  uint64_t size = 256ull << 20;
  io::Profile profile = io::Profile::mixed;
  uint64_t seed = 1;
};
// Parses the part after "emu:" ("size=…,profile=…,seed=…"; every key optional).
EmuSpec parse_emu(std::string_view params);
// The value of an emu spec's `key=value` as a whole number; throws naming both when it is not one.
uint64_t parse_emu_number(std::string_view key, std::string_view value);
// The keys of emulated content every emu spec takes (size, profile, seed) into `spec`; false for any other
// key. Throws on a bad value.
bool parse_emu_key(std::string_view key, std::string_view value, EmuSpec* spec);
// Calls fn(key, value) for each item of a comma-separated "key=value,..." list; empty items are skipped, an
// item without '=' throws (`what` names the spec kind in the message).
void for_each_param(std::string_view params, std::string_view what,
                    const std::function<void(std::string_view key, std::string_view value)>& fn);

std::unique_ptr<io::Source> open_source(std::string_view spec);
// A VFIO device sink (vfio:…, emu-v1:…) speaks the protocol `vfio` asks for; other sinks ignore it.
std::unique_ptr<io::Sink> open_sink(std::string_view spec,
                                    io::vfio::ProtocolChoice vfio = io::vfio::ProtocolChoice::detect);

// The spec kinds, for --help.
inline constexpr const char* kSourceKinds =
    "file:PATH, emu:size=SIZE,profile=NAME,seed=N, stdin:, fd:N, vfio:PATH, vfio-group:PATH:DEVICE, emu-v1:..., "
    "emu-v2:...";
inline constexpr const char* kSinkKinds =
    "file:PATH, emu:size=SIZE,profile=NAME,seed=N, null:, stdout:, fd:N, vfio:PATH, vfio-group:PATH:DEVICE, "
    "emu-v1:..., emu-v2:...";

}  // namespace dstx::engine
