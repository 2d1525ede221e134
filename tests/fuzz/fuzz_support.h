// Shared by the fuzz targets: a check that stops the program (libFuzzer then saves the input as a crash
// reproducer; the corpus replay under CTest fails), a reader that turns fuzz bytes into parameters, and the
// wire checksums computed from docs/wire-format.md rather than through engine/wire.cpp, so that a target can
// repair them and reach past the checksum gate.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>

#include "compress/hash.h"

// Unlike assert(), active in every build type.
#define FUZZ_CHECK(cond, ...)                                                            \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                                 \
      std::fputc('\n', stderr);                                                          \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

#if defined(__SANITIZE_ADDRESS__)
#define DSTX_FUZZ_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DSTX_FUZZ_ASAN 1
#endif
#endif

namespace dstx::fuzz {

// Takes parameters off the front of the input; past the end every value is 0.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t u8() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t(u8()) << (8 * i);
    return v;
  }
  uint64_t u64() {
    uint64_t v = u32();
    return v | uint64_t(u32()) << 32;
  }
  // Up to n bytes (fewer at the end of the input).
  std::span<const uint8_t> bytes(size_t n) {
    const size_t take = n < size_ - pos_ ? n : size_ - pos_;
    std::span<const uint8_t> out(data_ + pos_, take);
    pos_ += take;
    return out;
  }
  std::span<const uint8_t> rest() { return bytes(size_ - pos_); }
  size_t left() const { return size_ - pos_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

inline uint32_t get32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | uint32_t(p[i]);
  return v;
}
inline uint64_t get64(const std::byte* p) {
  return uint64_t(get32(p)) | uint64_t(get32(p + 4)) << 32;
}
inline void put16(std::byte* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = std::byte(v >> (8 * i));
}
inline void put32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = std::byte(v >> (8 * i));
}
inline void put64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = std::byte(v >> (8 * i));
}

// docs/wire-format.md: header check = low 32 bits of XXH3-64 of bytes 0..43; the HELLO payload ends with the
// XXH3-64 of all its bytes before.
inline void fix_header_check(std::byte* header48) {
  put32(header48 + 44, uint32_t(compress::hash64(header48, 44)));
}
inline void fix_hello_check(std::byte* hello, size_t hello_bytes) {
  put64(hello + hello_bytes - 8, compress::hash64(hello, hello_bytes - 8));
}

}  // namespace dstx::fuzz
