// Memory for I/O buffers.
#pragma once

#include <cstddef>

namespace dstx::io {

// Anonymous memory mapped for buffers, page-aligned; from 2 MiB up aligned to 2 MiB, so that where the
// system's transparent huge page mode is "always" the kernel can back whole 2 MiB extents with huge pages.
// They are not asked for (no MADV_HUGEPAGE): in a VM whose host takes back freed guest memory (free page
// reporting hands back free 2 MiB blocks), a huge page fault on a cold start waits for the host, and 64 MiB
// took 30-120 ms instead of 3 ms warm and 22 ms in small pages, cold or warm. A transfer after a pause of 2 s
// was 5 % (10 Gbit/s binary) to 50 % (all-zero, loopback) slower with them; back to back, 2-7 % faster. A
// migration starts cold. The memory used never exceeds the size asked for rounded to 4 KiB (the receiver's
// memory budget counts on it). Throws std::bad_alloc. Under AddressSanitizer the memory comes from the heap
// instead, where overruns are caught.
class IoMemory {
 public:
  IoMemory() = default;
  explicit IoMemory(size_t bytes);
  ~IoMemory();
  IoMemory(IoMemory&& other) noexcept;
  IoMemory& operator=(IoMemory&& other) noexcept;
  IoMemory(const IoMemory&) = delete;
  IoMemory& operator=(const IoMemory&) = delete;

  std::byte* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void release();

  std::byte* data_ = nullptr;
  size_t size_ = 0;    // what was asked for
  size_t mapped_ = 0;  // what is mapped from data_
};

}  // namespace dstx::io
