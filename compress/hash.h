// XXH3 hashing, through Debian's libxxhash (on x86 its run-time dispatcher: see hash.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace dstx::compress {

uint64_t hash64(const void* data, size_t len);  // XXH3-64, seed 0

struct Hash128 {
  uint64_t high = 0;
  uint64_t low = 0;
  bool operator==(const Hash128&) const = default;
  std::string hex() const;  // 32 lower-case hex digits, canonical (big-endian) order as xxhsum prints
};
Hash128 hash128(const void* data, size_t len);  // XXH3-128, seed 0

// Streaming XXH3-64.
class Hasher64 {
 public:
  Hasher64();
  ~Hasher64();
  Hasher64(const Hasher64&) = delete;
  Hasher64& operator=(const Hasher64&) = delete;
  void reset();
  void update(const void* data, size_t len);
  uint64_t digest() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Streaming XXH3-128.
class Hasher128 {
 public:
  Hasher128();
  ~Hasher128();
  Hasher128(const Hasher128&) = delete;
  Hasher128& operator=(const Hasher128&) = delete;
  void reset();
  void update(const void* data, size_t len);
  Hash128 digest() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace dstx::compress
