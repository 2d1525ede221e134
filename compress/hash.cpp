#include "compress/hash.h"

// Debian's libxxhash, on x86 through its dispatcher (xxh_x86dispatch.h renames the XXH3 calls below to their
// *_dispatch versions): it picks the widest vector unit the CPU has at run time, where code compiled for the
// x86-64 baseline gets SSE2. On this project's machine (AVX-512) a 1 MiB chunk hashes at ~80 GB/s instead of
// ~19, and every chunk is hashed twice (sender and receiver). Other architectures call the library's plain
// XXH3. The state's layout comes from the same package as the library. These are global symbols: a host
// program that exports its own, different xxHash could take their place in libdstx (before, dstx inlined
// xxHash and shared no symbol with anyone).
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xxh_x86dispatch.h>
#endif

namespace dstx::compress {

uint64_t hash64(const void* data, size_t len) {
  return XXH3_64bits(data, len);
}

std::string Hash128::hex() const {
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, XXH128_hash_t{.low64 = low, .high64 = high});
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text(2 * sizeof(canonical.digest), '0');
  for (size_t i = 0; i < sizeof(canonical.digest); ++i) {
    text[2 * i] = kDigits[canonical.digest[i] >> 4];
    text[2 * i + 1] = kDigits[canonical.digest[i] & 0xf];
  }
  return text;
}

Hash128 hash128(const void* data, size_t len) {
  const XXH128_hash_t h = XXH3_128bits(data, len);
  return Hash128{.high = h.high64, .low = h.low64};
}

// XXH3_state_t is 64-byte aligned; C++17 aligned new honours that through make_unique.
struct Hasher64::State {
  XXH3_state_t xxh;
};

Hasher64::Hasher64() : state_(std::make_unique<State>()) {
  reset();
}
Hasher64::~Hasher64() = default;
void Hasher64::reset() {
  XXH3_64bits_reset(&state_->xxh);
}
void Hasher64::update(const void* data, size_t len) {
  XXH3_64bits_update(&state_->xxh, data, len);
}
uint64_t Hasher64::digest() const {
  return XXH3_64bits_digest(&state_->xxh);
}

struct Hasher128::State {
  XXH3_state_t xxh;
};

Hasher128::Hasher128() : state_(std::make_unique<State>()) {
  reset();
}
Hasher128::~Hasher128() = default;
void Hasher128::reset() {
  XXH3_128bits_reset(&state_->xxh);
}
void Hasher128::update(const void* data, size_t len) {
  XXH3_128bits_update(&state_->xxh, data, len);
}
Hash128 Hasher128::digest() const {
  const XXH128_hash_t h = XXH3_128bits_digest(&state_->xxh);
  return Hash128{.high = h.high64, .low = h.low64};
}

}  // namespace dstx::compress
