#include "io/content.h"

#include <algorithm>
#include <array>
#include <cstring>

namespace dstx::io {
namespace {

constexpr size_t kPage = kContentPageBytes;
// Generators for binary and text write whole templates or words with fixed-size stores and may run past the
// page end by up to this much; they work in a private buffer with this slack.
constexpr size_t kSlackBytes = 128;

// Distinct salts keep the streams of different uses of one (seed, page) pair unrelated.
constexpr uint64_t kSaltPage = 0x243f6a8885a308d3ull;
constexpr uint64_t kSaltZeroHeavy = 0x13198a2e03707344ull;
constexpr uint64_t kSaltMixedGroup = 0xa4093822299f31d0ull;
constexpr uint64_t kSaltMixedRun = 0x082efa98ec4e6c89ull;
constexpr uint64_t kSaltPointer = 0x452821e638d01377ull;

constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t mix(uint64_t seed, uint64_t index, uint64_t salt) {
  return splitmix64(seed ^ splitmix64(index ^ salt));
}

// wyrand: one add and one 64x64->128 multiply per output, passes PractRand/BigCrush, and the state chain is a
// single add, so consecutive outputs overlap in the pipeline.
struct Wyrand {
  uint64_t state;
  uint64_t next() {
    state += 0xa0761d6478bd642full;
    const __uint128_t t = static_cast<__uint128_t>(state) * (state ^ 0xe7037ed1a0b428dbull);
    return static_cast<uint64_t>(t >> 64) ^ static_cast<uint64_t>(t);
  }
};

inline void store64(uint8_t* p, uint64_t v) {
  std::memcpy(p, &v, sizeof(v));
}

// ---------------------------------------------------------------------------------------------------------
// random

void random_page(uint64_t seed, uint64_t page, uint8_t* out) {
  Wyrand rng{mix(seed, page, kSaltPage)};
  for (size_t i = 0; i < kPage; i += 16) {
    store64(out + i, rng.next());
    store64(out + i + 8, rng.next());
  }
}

// ---------------------------------------------------------------------------------------------------------
// binary: x86-64-flavoured machine code. A template vocabulary with small operand sets gives the short
// repeats real code has; rel32 displacements and immediates give the noise; short back-copies stand in for
// repeated idioms; pointer runs and alignment padding stand in for data and gaps between functions.

enum Tail : uint8_t { kNone, kDisp8, kImm8, kRel8, kRel32, kImm32 };

struct Op {
  uint8_t bytes[14];
  uint8_t len;
  uint8_t tail;
};
static_assert(sizeof(Op) == 16);

constexpr Op op(std::initializer_list<uint8_t> bytes, Tail tail = kNone) {
  Op o{};
  size_t i = 0;
  for (uint8_t b : bytes) o.bytes[i++] = b;
  o.len = static_cast<uint8_t>(i);
  o.tail = tail;
  return o;
}

// 64 entries, indexed by 6 random bits; frequent instructions appear more than once.
constexpr std::array<Op, 64> kOps = {
    op({0x55, 0x48, 0x89, 0xe5}),                                // push rbp; mov rbp,rsp
    op({0x41, 0x57, 0x41, 0x56, 0x41, 0x55, 0x41, 0x54, 0x53}),  // push r15..rbx
    op({0x5b, 0x41, 0x5c, 0x41, 0x5d, 0x5d, 0xc3}),              // pop ...; ret
    op({0x48, 0x89, 0xc7}),                                      // mov rdi,rax
    op({0x48, 0x89, 0xdf}),                                      // mov rdi,rbx
    op({0x48, 0x89, 0xc6}),                                      // mov rsi,rax
    op({0x4c, 0x89, 0xe7}),                                      // mov rdi,r12
    op({0x48, 0x89, 0xee}),                                      // mov rsi,rbp
    op({0x31, 0xc0}),                                            // xor eax,eax
    op({0x31, 0xd2}),                                            // xor edx,edx
    op({0x48, 0x85, 0xc0}),                                      // test rax,rax
    op({0x85, 0xc0}),                                            // test eax,eax
    op({0x48, 0x89, 0xc3}),                                      // mov rbx,rax
    op({0x0f, 0x1f, 0x44, 0x00, 0x00}),                          // nop dword [rax+rax]
    op({0x48, 0x8b, 0x07}),                                      // mov rax,[rdi]
    op({0x48, 0x8b, 0x43}, kDisp8),                              // mov rax,[rbx+d8]
    op({0x48, 0x8b, 0x47}, kDisp8),                              // mov rax,[rdi+d8]
    op({0x48, 0x89, 0x43}, kDisp8),                              // mov [rbx+d8],rax
    op({0x8b, 0x45}, kDisp8),                                    // mov eax,[rbp+d8]
    op({0x89, 0x45}, kDisp8),                                    // mov [rbp+d8],eax
    op({0x48, 0x8b, 0x45}, kDisp8),                              // mov rax,[rbp+d8]
    op({0x48, 0x8b, 0x45}, kDisp8),
    op({0x48, 0x89, 0x45}, kDisp8),  // mov [rbp+d8],rax
    op({0x48, 0x89, 0x45}, kDisp8),
    op({0x48, 0x8d, 0x45}, kDisp8),        // lea rax,[rbp+d8]
    op({0x48, 0x8b, 0x7d}, kDisp8),        // mov rdi,[rbp+d8]
    op({0x48, 0x8b, 0x75}, kDisp8),        // mov rsi,[rbp+d8]
    op({0x48, 0x8b, 0x54, 0x24}, kDisp8),  // mov rdx,[rsp+d8]
    op({0x48, 0x83, 0xec}, kImm8),         // sub rsp,imm8
    op({0x48, 0x83, 0xc4}, kImm8),         // add rsp,imm8
    op({0x83, 0xf8}, kImm8),               // cmp eax,imm8
    op({0x48, 0x83, 0xc0}, kImm8),         // add rax,imm8
    op({0x74}, kRel8),                     // je rel8
    op({0x75}, kRel8),                     // jne rel8
    op({0xeb}, kRel8),                     // jmp rel8
    op({0x7e}, kRel8),                     // jle rel8
    op({0xe8}, kRel32),                    // call rel32
    op({0xe8}, kRel32),
    op({0xe8}, kRel32),
    op({0xe9}, kRel32),                        // jmp rel32
    op({0x0f, 0x84}, kRel32),                  // je rel32
    op({0x0f, 0x85}, kRel32),                  // jne rel32
    op({0x48, 0x8b, 0x05}, kRel32),            // mov rax,[rip+rel32]
    op({0x48, 0x8d, 0x3d}, kRel32),            // lea rdi,[rip+rel32]
    op({0x48, 0x8d, 0x35}, kRel32),            // lea rsi,[rip+rel32]
    op({0xff, 0x15}, kRel32),                  // call [rip+rel32]
    op({0xb8}, kImm32),                        // mov eax,imm32
    op({0xba}, kImm32),                        // mov edx,imm32
    op({0xbe}, kImm32),                        // mov esi,imm32
    op({0xbf}, kImm32),                        // mov edi,imm32
    op({0xc7, 0x45, 0xfc}, kImm32),            // mov dword [rbp-4],imm32
    op({0x41, 0xb8}, kImm32),                  // mov r8d,imm32
    op({0x48, 0x89, 0xe5}),                    // mov rbp,rsp
    op({0x5d, 0xc3}),                          // pop rbp; ret
    op({0xc9, 0xc3}),                          // leave; ret
    op({0x48, 0x01, 0xd0}),                    // add rax,rdx
    op({0x48, 0x29, 0xc2}),                    // sub rdx,rax
    op({0x48, 0x39, 0xc3}),                    // cmp rbx,rax
    op({0x0f, 0xb6, 0x00}),                    // movzx eax,byte [rax]
    op({0x48, 0x63, 0xd0}),                    // movsxd rdx,eax
    op({0x48, 0xc1, 0xe0}, kImm8),             // shl rax,imm8
    op({0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00}),  // nop word [rax+rax]
    op({0x4c, 0x8d, 0x05}, kRel32),            // lea r8,[rip+rel32]
    op({0x48, 0x8b, 0x3d}, kRel32),            // mov rdi,[rip+rel32]
};

constexpr uint8_t kDisp8Values[16] = {0xf8, 0xf0, 0xe8, 0xe0, 0xd8, 0xd0, 0xc8, 0xc0,
                                      0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40};

constexpr uint8_t kTailBytes[] = {0, 1, 1, 1, 4, 4};  // by Tail

// Appends one instruction chosen by the low 32 bits of `r`: 6 bits pick the template, the rest fill its tail.
// Branch-free: every tail kind is computed and one is picked by index, because a switch on a random kind
// mispredicts about every other instruction.
inline uint8_t* emit_op(uint8_t* p, uint32_t r) {
  const Op& o = kOps[r & 63];
  std::memcpy(p, &o, sizeof(o));  // whole 16-byte entry; bytes past len are overwritten next
  p += o.len;
  const uint32_t t = r >> 6;
  const uint32_t tails[] = {
      0,
      kDisp8Values[t & 15],
      (t & 15) << 3,
      t & 0xff,
      (t & 0x3ffff) - 0x20000,  // near branch/call target: the high bytes are 00 or ff
      t & 0xff,                 // small immediate
  };
  std::memcpy(p, &tails[o.tail], 4);
  return p + kTailBytes[o.tail];
}

void binary_page(uint64_t seed, uint64_t page, uint8_t* out) {
  alignas(64) uint8_t buf[kPage + kSlackBytes];
  Wyrand rng{mix(seed, page, kSaltPage)};
  // Pointers into one heap or mapping share their high bytes across the whole device state.
  const uint64_t pointer_base = 0x0000550000000000ull | (mix(seed, 0, kSaltPointer) & 0x000000fff0000000ull);
  uint8_t* p = buf;
  uint8_t* const end = buf + kPage;
  while (p < end) {
    const uint64_t r = rng.next();
    const uint32_t event = static_cast<uint32_t>(r >> 56);
    if (event < 64 && p - buf >= 1088) {
      // A repeated idiom: copy 8..39 bytes from 64..1087 bytes back. The source ends before p, so a fixed
      // 40-byte copy never reads bytes that are not final yet.
      const size_t dist = 64 + ((r >> 32) & 1023);
      std::memcpy(p, p - dist, 40);
      p += 8 + ((r >> 42) & 31);
    } else if (event < 72) {
      // A few pointers, 8-byte aligned as in a data section or a spilled structure.
      std::memset(p, 0, 8);
      p = buf + ((p - buf + 7) & ~ptrdiff_t{7});
      const unsigned count = 1 + ((r >> 32) & 3);
      uint64_t bits = rng.next();
      for (unsigned i = 0; i < count; ++i, bits >>= 16) {
        store64(p, pointer_base | ((bits & 0xffff) << 4));
        p += 8;
      }
    } else if (event < 78) {
      // End of a function: ret, then zero padding to the next 16-byte boundary.
      *p++ = 0xc3;
      std::memset(p, 0, 16);
      p = buf + ((p - buf + 15) & ~ptrdiff_t{15});
    } else {
      p = emit_op(p, static_cast<uint32_t>(r));
      p = emit_op(p, static_cast<uint32_t>(r >> 24));
    }
  }
  std::memcpy(out, buf, kPage);
}

// ---------------------------------------------------------------------------------------------------------
// text

struct Word {
  char text[15];
  uint8_t len;
};
static_assert(sizeof(Word) == 16);

constexpr const char* kWordList[] = {
    "the",    "of",     "and",   "to",     "a",     "in",      "is",    "it",     "you",      "that",
    "he",     "was",    "for",   "on",     "are",   "with",    "as",    "his",    "they",     "be",
    "at",     "one",    "have",  "this",   "from",  "or",      "had",   "by",     "not",      "but",
    "what",   "some",   "we",    "can",    "out",   "other",   "were",  "all",    "there",    "when",
    "up",     "use",    "your",  "how",    "said",  "an",      "each",  "she",    "which",    "do",
    "their",  "time",   "if",    "will",   "way",   "about",   "many",  "then",   "them",     "write",
    "would",  "like",   "so",    "these",  "her",   "long",    "make",  "thing",  "see",      "him",
    "two",    "has",    "look",  "more",   "day",   "could",   "go",    "come",   "did",      "number",
    "sound",  "no",     "most",  "people", "my",    "over",    "know",  "water",  "than",     "call",
    "first",  "who",    "may",   "down",   "side",  "been",    "now",   "find",   "any",      "new",
    "work",   "part",   "take",  "get",    "place", "made",    "live",  "where",  "after",    "back",
    "little", "only",   "round", "man",    "year",  "came",    "show",  "every",  "good",     "me",
    "give",   "our",    "under", "name",   "very",  "through", "just",  "form",   "sentence", "great",
    "think",  "say",    "help",  "low",    "line",  "differ",  "turn",  "cause",  "much",     "mean",
    "before", "move",   "right", "boy",    "old",   "too",     "same",  "tell",   "does",     "set",
    "three",  "want",   "air",   "well",   "also",  "play",    "small", "end",    "put",      "home",
    "read",   "hand",   "port",  "large",  "spell", "add",     "even",  "land",   "here",     "must",
    "big",    "high",   "such",  "follow", "act",   "why",     "ask",   "men",    "change",   "went",
    "light",  "kind",   "off",   "need",   "house", "picture", "try",   "us",     "again",    "animal",
    "point",  "mother", "world", "near",   "build", "self",    "earth", "father", "device",   "migration",
};
constexpr size_t kWordCount = sizeof(kWordList) / sizeof(kWordList[0]);
static_assert(kWordCount == 200);

// Common word groups, drawn like words: English repeats them, and they give the compressor the longer
// matches that separate real text from a bag of words.
constexpr const char* kPhraseList[] = {
    "of the",     "in the",     "to the",      "and the",     "on the",   "it is",    "it was",
    "there is",   "at the",     "for the",     "from the",    "with the", "that the", "by the",
    "as well as", "one of the", "some of the", "each of the", "is not",   "can be",   "will be",
    "would be",   "they were",  "he said",     "we can",      "you can",  "the same", "the first",
    "the world",  "at the end", "the old man", "the way",
};
constexpr size_t kPhraseCount = sizeof(kPhraseList) / sizeof(kPhraseList[0]);
constexpr size_t kPhraseSlots = 6;

// 512 slots so 9 random bits pick an entry. Every word has a slot, each phrase kPhraseSlots, and the spare
// slots go to the frequent words roughly as 1/(rank + 4), a crude Zipf law.
constexpr size_t kWordSlots = 512;
constexpr std::array<Word, kWordSlots> make_word_table() {
  std::array<uint16_t, kWordCount> slots{};
  const size_t spare = kWordSlots - kWordCount - kPhraseCount * kPhraseSlots;
  double weight_sum = 0;
  for (size_t i = 0; i < kWordCount; ++i) weight_sum += 1.0 / static_cast<double>(i + 4);
  size_t used = kPhraseCount * kPhraseSlots;
  for (size_t i = 0; i < kWordCount; ++i) {
    const double extra = static_cast<double>(spare) / static_cast<double>(i + 4) / weight_sum;
    slots[i] = static_cast<uint16_t>(1 + static_cast<size_t>(extra));
    used += slots[i];
  }
  for (size_t i = 0; used < kWordSlots; ++i, ++used) ++slots[i];

  std::array<Word, kWordSlots> table{};
  size_t slot = 0;
  auto put = [&](const char* w) {
    size_t n = 0;
    while (w[n] != '\0') {
      table[slot].text[n] = w[n];
      ++n;
    }
    table[slot].len = static_cast<uint8_t>(n);
    ++slot;
  };
  for (size_t i = 0; i < kWordCount; ++i) {
    for (size_t k = 0; k < slots[i]; ++k) put(kWordList[i]);
  }
  for (size_t i = 0; i < kPhraseCount; ++i) {
    for (size_t k = 0; k < kPhraseSlots; ++k) put(kPhraseList[i]);
  }
  return table;
}
constexpr std::array<Word, kWordSlots> kWords = make_word_table();

void text_page(uint64_t seed, uint64_t page, uint8_t* out) {
  alignas(64) uint8_t buf[kPage + kSlackBytes];
  Wyrand rng{mix(seed, page, kSaltPage)};
  uint8_t* p = buf;
  uint8_t* const end = buf + kPage;
  uint8_t* line_start = p;
  bool capital = true;
  while (p < end) {
    uint64_t r = rng.next();
    // Three words per random draw: 9 bits pick the word, the next 8 its separator.
    for (int k = 0; k < 3; ++k, r >>= 17) {
      const Word& w = kWords[r & (kWordSlots - 1)];
      std::memcpy(p, &w, sizeof(w));  // whole 16-byte entry; bytes past len are overwritten next
      if (capital) *p ^= 0x20;
      p += w.len;
      const unsigned sep = (r >> 9) & 0xff;
      capital = false;
      if (p - line_start >= 72) {
        *p++ = sep < 48 ? '.' : ',';
        *p++ = '\n';
        line_start = p;
        capital = sep < 48;
      } else if (sep < 16) {
        std::memcpy(p, ". ", 2);
        p += 2;
        capital = true;
      } else if (sep < 32) {
        std::memcpy(p, ", ", 2);
        p += 2;
      } else {
        *p++ = ' ';
      }
    }
  }
  std::memcpy(out, buf, kPage);
}

// ---------------------------------------------------------------------------------------------------------
// zero-heavy and mixed

bool zero_heavy_page_is_zero(uint64_t seed, uint64_t page) {
  // 85% of the 2^64 range.
  return mix(seed, page, kSaltZeroHeavy) < 0xd999999999999999ull;
}

constexpr size_t kMixedGroupPages = 64;
constexpr Profile kMixedChoices[] = {Profile::zero, Profile::zero_heavy, Profile::binary, Profile::text,
                                     Profile::random};

// Runs are laid out inside fixed 64-page groups, so a page's run follows from (seed, page) alone: replay the
// group's run lengths until the one holding the page.
Profile mixed_page_profile(uint64_t seed, uint64_t page) {
  const uint64_t group = page / kMixedGroupPages;
  const uint64_t in_group = page % kMixedGroupPages;
  Wyrand rng{mix(seed, group, kSaltMixedGroup)};
  uint64_t run_start = 0;
  for (;;) {
    const uint64_t run_pages = 1 + (rng.next() >> 58);  // 1..64
    if (in_group < run_start + run_pages) break;
    run_start += run_pages;
  }
  const uint64_t run_index = group * kMixedGroupPages + run_start;
  const uint64_t pick = mix(seed, run_index, kSaltMixedRun);
  constexpr size_t n = sizeof(kMixedChoices) / sizeof(kMixedChoices[0]);
  return kMixedChoices[static_cast<size_t>((static_cast<__uint128_t>(pick) * n) >> 64)];
}

void generate_page(Profile profile, uint64_t seed, uint64_t page, uint8_t* out) {
  if (profile == Profile::mixed) profile = mixed_page_profile(seed, page);
  switch (profile) {
    case Profile::zero:
      std::memset(out, 0, kPage);
      return;
    case Profile::zero_heavy:
      if (zero_heavy_page_is_zero(seed, page)) {
        std::memset(out, 0, kPage);
      } else {
        binary_page(seed, page, out);
      }
      return;
    case Profile::binary:
      binary_page(seed, page, out);
      return;
    case Profile::text:
      text_page(seed, page, out);
      return;
    case Profile::random:
    case Profile::mixed:  // unreachable: resolved above
      random_page(seed, page, out);
      return;
  }
  random_page(seed, page, out);
}

constexpr std::string_view kProfileNames[] = {"zero", "zero-heavy", "binary", "text", "random", "mixed"};

}  // namespace

std::string_view profile_name(Profile profile) {
  const auto index = static_cast<size_t>(profile);
  return index < std::size(kProfileNames) ? kProfileNames[index] : std::string_view("unknown");
}

bool profile_from_name(std::string_view name, Profile* out) {
  for (size_t i = 0; i < std::size(kProfileNames); ++i) {
    if (name == kProfileNames[i]) {
      *out = static_cast<Profile>(i);
      return true;
    }
  }
  return false;
}

std::string_view profile_names() {
  return "zero, zero-heavy, binary, text, random, mixed";
}

void ContentGenerator::fill_page(uint64_t page_index, std::byte* page) const {
  generate_page(profile_, seed_, page_index, reinterpret_cast<uint8_t*>(page));
}

void ContentGenerator::fill(uint64_t offset, std::span<std::byte> out) const {
  size_t done = 0;
  while (done < out.size()) {
    const uint64_t position = offset + done;
    const uint64_t page = position / kPage;
    const size_t in_page = static_cast<size_t>(position % kPage);
    const size_t n = std::min(kPage - in_page, out.size() - done);
    if (n == kPage) {
      fill_page(page, out.data() + done);
    } else {
      alignas(64) std::byte scratch[kPage];
      fill_page(page, scratch);
      std::memcpy(out.data() + done, scratch + in_page, n);
    }
    done += n;
  }
}

int64_t ContentGenerator::first_mismatch(uint64_t offset, std::span<const std::byte> data) const {
  alignas(64) std::byte scratch[kPage];
  size_t done = 0;
  while (done < data.size()) {
    const uint64_t position = offset + done;
    const size_t in_page = static_cast<size_t>(position % kPage);
    const size_t n = std::min(kPage - in_page, data.size() - done);
    fill_page(position / kPage, scratch);
    const std::byte* got = data.data() + done;
    const std::byte* want = scratch + in_page;
    if (std::memcmp(got, want, n) != 0) {
      const size_t i = static_cast<size_t>(std::mismatch(got, got + n, want).first - got);
      return static_cast<int64_t>(done + i);
    }
    done += n;
  }
  return -1;
}

}  // namespace dstx::io
