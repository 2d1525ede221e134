// Deterministic synthetic device state: the emulated source generates it, the emulated sink checks against
// it, and the emulated VFIO devices use it for their state. Content depends only on (profile, seed, offset),
// in 4 KiB pages, so any range can be generated independently and in parallel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace dstx::io {

enum class Profile : uint8_t {
  zero,        // all zero bytes
  zero_heavy,  // ~85% zero pages, the rest binary-like
  binary,      // machine-code-like: opcodes, small immediates, pointers (lz4 ratio ~0.4-0.6)
  text,        // words, spaces, newlines (lz4 ratio ~0.4-0.5)
  random,      // incompressible
  mixed,       // page-granular runs (1..64 pages) of the profiles above
};
inline constexpr size_t kContentPageBytes = 4096;

std::string_view profile_name(Profile profile);
// "zero", "zero-heavy", "binary", "text", "random", "mixed"
bool profile_from_name(std::string_view name, Profile* out);
// All valid names, comma-separated (for error messages and --help).
std::string_view profile_names();

class ContentGenerator {
 public:
  ContentGenerator(Profile profile, uint64_t seed) : profile_(profile), seed_(seed) {}
  Profile profile() const { return profile_; }
  uint64_t seed() const { return seed_; }
  // Writes the bytes of logical range [offset, offset + out.size()). Thread-safe, deterministic.
  void fill(uint64_t offset, std::span<std::byte> out) const;
  // Offset of the first byte in `data` (which holds the range starting at `offset`) that differs from the
  // generated content, or -1 when all match.
  int64_t first_mismatch(uint64_t offset, std::span<const std::byte> data) const;

 private:
  void fill_page(uint64_t page_index, std::byte* page) const;  // one whole 4 KiB page
  Profile profile_;
  uint64_t seed_;
};

}  // namespace dstx::io
