// Memory for I/O buffers.
#pragma once

#include <cstddef>

namespace dstx::io {

// Anonymous memory mapped for buffers, page-aligned; from 2 MiB up aligned to 2 MiB with transparent huge pages
// asked for (MADV_HUGEPAGE: the kernels' default THP mode is "madvise"). First touch then costs a fault per
// 2 MiB instead of per 4 KiB, and copying and coding through the buffers needs fewer TLB entries. Only whole
// 2 MiB extents inside the size asked for get huge pages, so the memory used never exceeds that size rounded
// to 4 KiB (the receiver's memory budget counts on it). Where the kernel has no huge pages at hand it falls
// back to small pages by itself. Throws std::bad_alloc. Under AddressSanitizer the memory comes from the heap
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
