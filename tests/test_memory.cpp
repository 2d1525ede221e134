// io::IoMemory: the buffer memory of the sender's workers and the receiver's reorder window.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "io/memory.h"

namespace dstx::io {
namespace {

constexpr size_t kHuge = 2 << 20;

// The VmFlags of this process's mapping that holds `p` (from /proc/self/smaps); empty if not found.
std::string vm_flags(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto addr = reinterpret_cast<uintptr_t>(p);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2) {  // a mapping's first line
      inside = addr >= lo && addr < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line + " ";
    }
  }
  return {};
}

TEST(IoMemory, IsAlignedWritableAndMovable) {
  IoMemory m(5 << 20);
  ASSERT_NE(m.data(), nullptr);
  EXPECT_EQ(m.size(), size_t(5 << 20));
#if defined(__SANITIZE_ADDRESS__)
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.data()) % 4096, 0u);  // from the heap, page-aligned
#else
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.data()) % kHuge, 0u);
#endif
  EXPECT_EQ(reinterpret_cast<uintptr_t>(IoMemory(100).data()) % 4096, 0u);
  std::memset(m.data(), 0xab, m.size());
  EXPECT_EQ(m.data()[m.size() - 1], std::byte{0xab});
  std::byte* const before = m.data();
  IoMemory n = std::move(m);
  EXPECT_EQ(m.data(), nullptr);
  EXPECT_EQ(m.size(), 0u);
  EXPECT_EQ(n.data(), before);
  n = IoMemory();
  EXPECT_EQ(n.data(), nullptr);
  EXPECT_EQ(IoMemory(0).data(), nullptr);
}

// Resident memory of this process in KiB (/proc/self/statm counts pages).
long rss_kib() {
  std::ifstream f("/proc/self/statm");
  long size = 0, resident = 0;
  f >> size >> resident;
  return resident * 4;
}

// Huge pages are the system's choice (see io/memory.h for why they are not asked for): neither MADV_HUGEPAGE
// ("hg") nor MADV_NOHUGEPAGE ("nh") on the mapping.
TEST(IoMemory, LeavesHugePagesToTheSystemsPolicy) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "under AddressSanitizer the buffers come from the heap";
#endif
  IoMemory m(4 << 20);
  const std::string flags = vm_flags(m.data());
  ASSERT_FALSE(flags.empty()) << "no mapping in /proc/self/smaps holds the memory";
  EXPECT_EQ(flags.find(" hg "), std::string::npos) << flags;
  EXPECT_EQ(flags.find(" nh "), std::string::npos) << flags;
}

// Small buffers (a receiver's decode buffers for small chunks, one per stream) must not each take a 2 MiB huge
// page: the receiver's memory budget counts them at their size.
TEST(IoMemory, SmallBuffersUseOnlyTheirOwnPages) {
  const long before = rss_kib();
  std::vector<IoMemory> many;
  for (int i = 0; i < 32; ++i) {
    many.emplace_back(64 << 10);
    std::memset(many.back().data(), 1, many.back().size());
  }
  const long grown = rss_kib() - before;
  EXPECT_LT(grown, 16 << 10) << "32 buffers of 64 KiB made this process grow by " << grown << " KiB";
}

}  // namespace
}  // namespace dstx::io
