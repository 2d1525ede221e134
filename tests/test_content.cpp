#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "compress/codec.h"
#include "io/content.h"

namespace dstx::io {
namespace {

using Bytes = std::vector<std::byte>;
constexpr size_t kPage = kContentPageBytes;

constexpr Profile kAllProfiles[] = {Profile::zero, Profile::zero_heavy, Profile::binary,
                                    Profile::text, Profile::random,     Profile::mixed};

Bytes generate(Profile profile, uint64_t seed, uint64_t offset, size_t len) {
  Bytes out(len);
  ContentGenerator(profile, seed).fill(offset, out);
  return out;
}

bool page_is_zero(const std::byte* page) {
  return std::all_of(page, page + kPage, [](std::byte b) { return b == std::byte{0}; });
}

// LZ4 output over input, compressing independent 1 MiB chunks as the engine does.
double lz4_ratio(const Bytes& data) {
  constexpr size_t kChunk = 1 << 20;
  Bytes out(compress::encode_bound(compress::Codec::lz4, kChunk));
  const compress::EncodeOptions opts{
      .codec = compress::Codec::lz4, .detect_zero = false, .probe_incompressible = false};
  size_t encoded = 0;
  for (size_t at = 0; at < data.size(); at += kChunk) {
    const size_t n = std::min(kChunk, data.size() - at);
    encoded += compress::encode_chunk(opts, std::span(data).subspan(at, n), out).encoded_len;
  }
  return static_cast<double>(encoded) / static_cast<double>(data.size());
}

std::string name_of(Profile p) {
  return std::string(profile_name(p));
}

// --- names -----------------------------------------------------------------------------------------------

TEST(ContentNames, EveryProfileRoundTrips) {
  const std::string all(profile_names());
  for (Profile p : kAllProfiles) {
    Profile parsed = Profile::zero;
    ASSERT_TRUE(profile_from_name(profile_name(p), &parsed)) << name_of(p);
    EXPECT_EQ(parsed, p);
    EXPECT_NE(all.find(profile_name(p)), std::string::npos) << all;
  }
  EXPECT_EQ(profile_name(Profile::zero_heavy), "zero-heavy");
  Profile parsed;
  EXPECT_TRUE(profile_from_name("zero-heavy", &parsed));
  EXPECT_EQ(parsed, Profile::zero_heavy);
}

TEST(ContentNames, BadNamesRejected) {
  Profile parsed = Profile::text;
  for (std::string_view bad : {"", "Zero", "zero_heavy", "rand", "mixed ", "binary\n", "unknown"}) {
    EXPECT_FALSE(profile_from_name(bad, &parsed)) << bad;
  }
  EXPECT_EQ(parsed, Profile::text);
}

// --- determinism -----------------------------------------------------------------------------------------

TEST(ContentDeterminism, SameSeedSameBytesDifferentSeedDifferentBytes) {
  for (Profile p : kAllProfiles) {
    SCOPED_TRACE(name_of(p));
    for (uint64_t offset : {uint64_t{0}, uint64_t{1} << 40}) {
      const Bytes a = generate(p, 7, offset, 1 << 20);
      const Bytes b = generate(p, 7, offset, 1 << 20);
      EXPECT_TRUE(a == b);
      const Bytes c = generate(p, 8, offset, 1 << 20);
      if (p == Profile::zero) {
        EXPECT_TRUE(a == c);
      } else {
        EXPECT_FALSE(a == c);
      }
    }
  }
}

TEST(ContentDeterminism, PagesDiffer) {
  // Pages are not copies of one another (that would make the profiles compress far too well).
  for (Profile p : {Profile::binary, Profile::text, Profile::random}) {
    const Bytes data = generate(p, 1, 0, 64 * kPage);
    std::set<std::string> pages;
    for (size_t i = 0; i < 64; ++i) {
      pages.insert(std::string(reinterpret_cast<const char*>(data.data()) + i * kPage, kPage));
    }
    EXPECT_EQ(pages.size(), 64u) << name_of(p);
  }
}

TEST(ContentDeterminism, ParallelFillsAgree) {
  const ContentGenerator gen(Profile::mixed, 99);
  constexpr size_t kLen = 8 << 20;
  Bytes whole(kLen);
  gen.fill(0, whole);
  Bytes halves(kLen);
  std::thread t1([&] { gen.fill(0, std::span(halves).first(kLen / 2 + 1234)); });
  std::thread t2([&] { gen.fill(kLen / 2 + 1234, std::span(halves).subspan(kLen / 2 + 1234)); });
  t1.join();
  t2.join();
  EXPECT_TRUE(whole == halves);
}

// --- unaligned ranges ------------------------------------------------------------------------------------

TEST(ContentFill, UnalignedRangesEqualSliceOfAlignedFill) {
  constexpr uint64_t kBase = 1000 * kPage;
  constexpr size_t kLen = 6 * kPage;
  struct Range {
    size_t start, len;
  };
  const Range ranges[] = {
      {0, 0},                     // empty
      {0, 1},                     // first byte
      {kLen - 1, 1},              // last byte
      {1, kPage - 2},             // inside one page
      {kPage - 3, 6},             // across one boundary
      {kPage + 17, 3 * kPage},    // starts mid-page, ends mid-page, whole pages between
      {2 * kPage, kPage},         // exactly one page
      {5, kLen - 5},              // to the end
      {123, 2 * kPage - 123},     // ends on a page boundary
      {3 * kPage - 1, kPage + 2}  // one byte either side of a page
  };
  for (Profile p : kAllProfiles) {
    SCOPED_TRACE(name_of(p));
    const Bytes aligned = generate(p, 5, kBase, kLen);
    for (const Range& r : ranges) {
      const Bytes part = generate(p, 5, kBase + r.start, r.len);
      EXPECT_TRUE(std::equal(part.begin(), part.end(), aligned.begin() + static_cast<ptrdiff_t>(r.start)))
          << "start " << r.start << " len " << r.len;
    }
  }
}

// --- profile character -----------------------------------------------------------------------------------

TEST(ContentProfiles, ZeroIsAllZero) {
  const Bytes data = generate(Profile::zero, 3, 12345, 4 << 20);
  EXPECT_TRUE(compress::is_zero(data.data(), data.size()));
}

TEST(ContentProfiles, ZeroHeavyIsMostlyZeroPages) {
  constexpr size_t kPages = 2048;
  const Bytes data = generate(Profile::zero_heavy, 3, 0, kPages * kPage);
  size_t zero_pages = 0;
  for (size_t i = 0; i < kPages; ++i) zero_pages += page_is_zero(data.data() + i * kPage) ? 1 : 0;
  const double fraction = static_cast<double>(zero_pages) / kPages;
  EXPECT_GT(fraction, 0.80);
  EXPECT_LT(fraction, 0.90);
  // The non-zero pages are binary-like, not nearly empty.
  for (size_t i = 0; i < kPages; ++i) {
    const std::byte* page = data.data() + i * kPage;
    if (page_is_zero(page)) continue;
    const auto nonzero = std::count_if(page, page + kPage, [](std::byte b) { return b != std::byte{0}; });
    EXPECT_GT(nonzero, 2000) << "page " << i;
  }
}

TEST(ContentProfiles, RandomIsIncompressible) {
  const Bytes data = generate(Profile::random, 3, 0, 4 << 20);
  EXPECT_GE(lz4_ratio(data), 0.99);
  EXPECT_TRUE(compress::looks_incompressible(data));
  size_t counts[256] = {};
  for (std::byte b : data) ++counts[static_cast<uint8_t>(b)];
  const size_t expected = data.size() / 256;
  for (size_t c : counts) {
    EXPECT_GT(c, expected * 9 / 10);
    EXPECT_LT(c, expected * 11 / 10);
  }
}

TEST(ContentProfiles, BinaryCompressesLikeExecutables) {
  // /usr/bin executables give 0.55-0.67 with lz4 -1.
  const double ratio = lz4_ratio(generate(Profile::binary, 3, 0, 8 << 20));
  EXPECT_GT(ratio, 0.45);
  EXPECT_LT(ratio, 0.65);
  EXPECT_FALSE(compress::looks_incompressible(generate(Profile::binary, 4, 0, 1 << 20)));
}

TEST(ContentProfiles, TextIsPrintableWordsAndCompressesLikeText) {
  const Bytes data = generate(Profile::text, 3, 0, 8 << 20);
  const double ratio = lz4_ratio(data);
  EXPECT_GT(ratio, 0.40);
  EXPECT_LT(ratio, 0.60);
  size_t spaces = 0, newlines = 0;
  for (std::byte b : data) {
    const auto c = static_cast<unsigned char>(b);
    ASSERT_TRUE(c == '\n' || (c >= 0x20 && c < 0x7f)) << int(c);
    spaces += c == ' ';
    newlines += c == '\n';
  }
  EXPECT_GT(spaces, data.size() / 10);
  EXPECT_GT(newlines, data.size() / 200);
}

TEST(ContentProfiles, MixedIsPageRunsOfTheOtherProfiles) {
  constexpr uint64_t kSeed = 11;
  constexpr size_t kPages = 4096;
  const Bytes mixed = generate(Profile::mixed, kSeed, 0, kPages * kPage);
  const Profile singles[] = {Profile::zero, Profile::binary, Profile::text, Profile::random};
  std::vector<Bytes> references;
  for (Profile p : singles) references.push_back(generate(p, kSeed, 0, kPages * kPage));
  size_t per_profile[std::size(singles)] = {};
  size_t changes = 0;
  int previous = -1;
  for (size_t i = 0; i < kPages; ++i) {
    const auto* page = mixed.data() + i * kPage;
    int match = -1;
    for (size_t k = 0; k < std::size(singles) && match < 0; ++k) {
      if (std::memcmp(page, references[k].data() + i * kPage, kPage) == 0) match = static_cast<int>(k);
    }
    ASSERT_GE(match, 0) << "page " << i << " is not a page of any single profile";
    ++per_profile[match];
    if (match != previous) ++changes;
    previous = match;
  }
  for (size_t k = 0; k < std::size(singles); ++k) {
    EXPECT_GT(per_profile[k], kPages / 20) << name_of(singles[k]);
  }
  // Runs are 1..64 pages long: many changes, but far fewer than pages.
  EXPECT_GT(changes, kPages / 64);
  EXPECT_LT(changes, kPages / 4);
}

// --- first_mismatch --------------------------------------------------------------------------------------

TEST(ContentMismatch, FindsFlippedByteAtExactOffset) {
  constexpr uint64_t kOffset = 3 * kPage + 1000;
  constexpr size_t kLen = 5 * kPage + 77;
  for (Profile p : kAllProfiles) {
    SCOPED_TRACE(name_of(p));
    const ContentGenerator gen(p, 21);
    Bytes data(kLen);
    gen.fill(kOffset, data);
    EXPECT_EQ(gen.first_mismatch(kOffset, data), -1);
    EXPECT_EQ(gen.first_mismatch(kOffset, {}), -1);
    for (size_t at : {size_t{0}, size_t{1}, kPage - 1000 - 1, kPage - 1000, 2 * kPage, kLen / 2, kLen - 1}) {
      data[at] ^= std::byte{0x10};
      EXPECT_EQ(gen.first_mismatch(kOffset, data), static_cast<int64_t>(at));
      data[at] ^= std::byte{0x10};
    }
    // Two differences: the first one is reported.
    data[kLen - 5] ^= std::byte{1};
    data[kPage] ^= std::byte{1};
    EXPECT_EQ(gen.first_mismatch(kOffset, data), static_cast<int64_t>(kPage));
    // The same bytes checked at the wrong offset do not match (all-zero ranges, which zero, zero-heavy and
    // mixed can produce, match anywhere).
    data[kLen - 5] ^= std::byte{1};
    data[kPage] ^= std::byte{1};
    if (!compress::is_zero(data.data(), data.size())) {
      EXPECT_GE(gen.first_mismatch(kOffset + 1, data), 0);
    }
  }
}

}  // namespace
}  // namespace dstx::io
