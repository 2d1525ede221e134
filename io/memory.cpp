#include "io/memory.h"

#include <sys/mman.h>

#include <cstdint>
#include <new>
#include <utility>

namespace dstx::io {
namespace {

constexpr size_t kHugePage = 2 << 20;
constexpr size_t kSmallPage = 4096;

constexpr size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

IoMemory::IoMemory(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  if (bytes > SIZE_MAX / 2) throw std::bad_alloc();
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer guards heap blocks, not mappings: keep overruns of the buffers detectable.
  data_ = static_cast<std::byte*>(::operator new(bytes, std::align_val_t(4096)));
#else
  // Exactly the pages asked for, so that memory budgets count what is used: a kernel that uses huge pages
  // backs only the whole 2 MiB extents inside the mapping with them, and its tail with small ones.
  mapped_ = round_up(bytes, kSmallPage);
  const size_t align = bytes >= kHugePage ? kHugePage : kSmallPage;
  // Map `align` more than needed and trim both ends to the boundary.
  const size_t over = mapped_ + align;
  void* p = ::mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  const auto base = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = round_up(base, align);
  if (aligned > base) ::munmap(p, aligned - base);
  const uintptr_t end = aligned + mapped_;
  if (base + over > end) ::munmap(reinterpret_cast<void*>(end), base + over - end);
  data_ = reinterpret_cast<std::byte*>(aligned);
#endif
}

void IoMemory::release() {
  if (!data_) return;
#if defined(__SANITIZE_ADDRESS__)
  ::operator delete(data_, std::align_val_t(4096));
#else
  ::munmap(data_, mapped_);
#endif
  data_ = nullptr;
}

IoMemory::~IoMemory() { release(); }

IoMemory::IoMemory(IoMemory&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, 0)) {}

IoMemory& IoMemory::operator=(IoMemory&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
  }
  return *this;
}

}  // namespace dstx::io
