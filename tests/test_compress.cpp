#include <gtest/gtest.h>
#include <lz4.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "compress/codec.h"
#include "compress/hash.h"

namespace dstx::compress {
namespace {

using Bytes = std::vector<std::byte>;

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

Bytes random_bytes(size_t len, uint64_t seed) {
  Bytes out(len);
  for (size_t i = 0; i < len; i += 8) {
    const uint64_t v = splitmix64(seed);
    std::memcpy(out.data() + i, &v, std::min<size_t>(8, len - i));
  }
  return out;
}

// Words from a small vocabulary: compresses well with every codec, and never happens to be all zero.
Bytes text_bytes(size_t len, uint64_t seed) {
  static const char* const kWords[] = {"state ", "device ", "migration ", "page ",   "dirty ",
                                       "copy ",  "vfio ",   "region ",    "buffer ", "stream "};
  Bytes out;
  out.reserve(len + 16);
  while (out.size() < len) {
    const char* w = kWords[splitmix64(seed) % 10];
    for (; *w != '\0'; ++w) out.push_back(static_cast<std::byte>(*w));
  }
  out.resize(len);
  return out;
}

Bytes as_bytes(std::string_view s) {
  Bytes out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

struct Encoded {
  EncodeResult result;
  Bytes payload;  // what goes on the wire: out, or the raw bytes themselves for codec none
};

Encoded encode(const Bytes& raw, Codec codec, bool detect_zero = true, bool probe = true) {
  EncodeOptions opts;
  opts.codec = codec;
  opts.detect_zero = detect_zero;
  opts.probe_incompressible = probe;
  Bytes out(encode_bound(codec, raw.size()));
  Encoded e;
  e.result = encode_chunk(opts, raw, out);
  if (e.result.zero) return e;
  if (e.result.codec == Codec::none) {
    e.payload = raw;
  } else {
    e.payload.assign(out.begin(), out.begin() + e.result.encoded_len);
  }
  return e;
}

DecodeError decode(const Encoded& e, Bytes& raw_out) {
  return decode_chunk(e.result.codec, e.result.zero, e.payload, raw_out, e.result.hash);
}

// --- names and bounds ------------------------------------------------------------------------------------

TEST(Codec, NamesRoundTrip) {
  for (uint8_t v = 0; v < kCodecCount; ++v) {
    const auto codec = static_cast<Codec>(v);
    Codec parsed = Codec::none;
    ASSERT_TRUE(codec_from_name(codec_name(codec), &parsed)) << int(v);
    EXPECT_EQ(parsed, codec);
    EXPECT_TRUE(codec_valid(v));
  }
  EXPECT_EQ(codec_name(Codec::lz4), "lz4");
  EXPECT_EQ(codec_name(Codec::zstd), "zstd");
  Codec parsed = Codec::zstd;
  EXPECT_FALSE(codec_from_name("LZ4", &parsed));
  EXPECT_FALSE(codec_from_name("", &parsed));
  EXPECT_FALSE(codec_from_name("gzip", &parsed));
  EXPECT_EQ(parsed, Codec::zstd);
  EXPECT_FALSE(codec_valid(kCodecCount));
  EXPECT_FALSE(codec_valid(255));
}

TEST(Codec, EncodeBound) {
  EXPECT_EQ(encode_bound(Codec::none, 4096), 4096u);
  EXPECT_GT(encode_bound(Codec::lz4, 4096), 4096u);
  EXPECT_GT(encode_bound(Codec::zstd, 4096), 4096u);
  EXPECT_EQ(encode_bound(static_cast<Codec>(7), 4096), 0u);
  // Beyond LZ4's input limit (and past 4 GiB, where a cast to unsigned would wrap) lz4 cannot encode.
  EXPECT_EQ(encode_bound(Codec::lz4, size_t{0x7E000001}), 0u);
  EXPECT_EQ(encode_bound(Codec::lz4, (size_t{1} << 32) + 5), 0u);
}

// --- round trips -----------------------------------------------------------------------------------------

class RoundTrip : public ::testing::TestWithParam<std::tuple<Codec, size_t>> {};

TEST_P(RoundTrip, CompressibleRandomAndZero) {
  const auto [codec, size] = GetParam();
  const Bytes inputs[] = {text_bytes(size, size), random_bytes(size, size + 1), Bytes(size)};
  for (size_t k = 0; k < std::size(inputs); ++k) {
    SCOPED_TRACE(k);
    const Bytes& raw = inputs[k];
    const Encoded e = encode(raw, codec);
    if (k == 2) {
      EXPECT_TRUE(e.result.zero);
      EXPECT_EQ(e.result.encoded_len, 0u);
      EXPECT_EQ(e.result.hash, 0u);
    } else {
      EXPECT_FALSE(e.result.zero);
      EXPECT_EQ(e.result.hash, hash64(raw.data(), raw.size()));
      EXPECT_EQ(e.result.encoded_len, e.payload.size());
      EXPECT_LE(e.result.encoded_len, raw.size());
      if (e.result.codec != Codec::none) {
        EXPECT_LT(e.result.encoded_len, raw.size());
      }
    }
    // Text of a page or more shrinks with every real codec; random data never does.
    if (k == 0 && size >= 4096) {
      EXPECT_EQ(e.result.codec, codec);
    }
    if (k == 1) {
      EXPECT_EQ(e.result.codec, Codec::none);
    }
    Bytes back(size, std::byte{0x5a});
    ASSERT_EQ(decode(e, back), DecodeError::ok);
    EXPECT_TRUE(back == raw);
  }
}

INSTANTIATE_TEST_SUITE_P(AllCodecs, RoundTrip,
                         ::testing::Combine(::testing::Values(Codec::none, Codec::lz4, Codec::zstd),
                                            ::testing::Values(size_t{1}, size_t{4095}, size_t{4096},
                                                              size_t{1} << 20, size_t{16} << 20)),
                         [](const auto& test_param) {
                           return std::string(codec_name(std::get<0>(test_param.param))) + "_" +
                                  std::to_string(std::get<1>(test_param.param));
                         });

TEST(Encode, ZeroChunkWithoutDetectionIsCompressed) {
  const Bytes raw(64 * 1024);
  for (Codec codec : {Codec::lz4, Codec::zstd}) {
    const Encoded e = encode(raw, codec, /*detect_zero=*/false);
    EXPECT_FALSE(e.result.zero);
    EXPECT_EQ(e.result.codec, codec);
    EXPECT_LT(e.result.encoded_len, 1024u);
    Bytes back(raw.size(), std::byte{1});
    ASSERT_EQ(decode(e, back), DecodeError::ok);
    EXPECT_TRUE(back == raw);
  }
}

TEST(Encode, ZstdLevelsAllRoundTrip) {
  const Bytes raw = text_bytes(256 * 1024, 3);
  for (int level : {-5, 1, 3, 9}) {
    EncodeOptions opts;
    opts.codec = Codec::zstd;
    opts.level = level;
    Bytes out(encode_bound(Codec::zstd, raw.size()));
    const EncodeResult r = encode_chunk(opts, raw, out);
    ASSERT_EQ(r.codec, Codec::zstd) << level;
    Bytes back(raw.size());
    ASSERT_EQ(decode_chunk(r.codec, r.zero, std::span(out).first(r.encoded_len), back, r.hash),
              DecodeError::ok);
    EXPECT_TRUE(back == raw);
  }
}

TEST(Encode, SmallOutputBufferFallsBackToRaw) {
  // A buffer below the bound is not an error: whatever does not fit is sent raw.
  const Bytes raw = text_bytes(64 * 1024, 9);
  for (Codec codec : {Codec::lz4, Codec::zstd}) {
    Bytes out(16);
    const EncodeResult r = encode_chunk(EncodeOptions{.codec = codec}, raw, out);
    EXPECT_EQ(r.codec, Codec::none);
    EXPECT_EQ(r.encoded_len, raw.size());
  }
}

// --- incompressible data ---------------------------------------------------------------------------------

TEST(Incompressible, RandomGoesRawWithoutTouchingOut) {
  const Bytes raw = random_bytes(1 << 20, 77);
  EXPECT_TRUE(looks_incompressible(raw));
  for (Codec codec : {Codec::lz4, Codec::zstd}) {
    for (bool probe : {true, false}) {
      Bytes out(encode_bound(codec, raw.size()), std::byte{0xa5});
      const EncodeResult r =
          encode_chunk(EncodeOptions{.codec = codec, .probe_incompressible = probe}, raw, out);
      EXPECT_EQ(r.codec, Codec::none);
      EXPECT_FALSE(r.zero);
      EXPECT_EQ(r.encoded_len, raw.size());
      EXPECT_EQ(r.hash, hash64(raw.data(), raw.size()));
      if (probe) {
        // The probe decided: nothing may have been written to out.
        bool untouched = true;
        for (std::byte b : out) untouched = untouched && b == std::byte{0xa5};
        EXPECT_TRUE(untouched) << codec_name(codec);
      }
    }
  }
}

TEST(Incompressible, CompressibleAndSmallInputs) {
  EXPECT_FALSE(looks_incompressible(text_bytes(1 << 20, 1)));
  EXPECT_FALSE(looks_incompressible(Bytes(1 << 20)));
  EXPECT_FALSE(looks_incompressible(text_bytes(5000, 2)));
  EXPECT_TRUE(looks_incompressible(random_bytes(5000, 2)));
  EXPECT_FALSE(looks_incompressible({}));
  // Random start, middle and end with compressible data between: the probe samples more than those three
  // places (mixed state has whole chunks like this), and sees the data between.
  Bytes mixed = text_bytes(1 << 20, 4);
  const Bytes noise = random_bytes(8192, 5);
  for (size_t at : {size_t{0}, size_t{1} << 19, (size_t{1} << 20) - 8192}) {
    std::memcpy(mixed.data() + at, noise.data(), noise.size());
  }
  EXPECT_FALSE(looks_incompressible(mixed));
  // Random with one compressible run between its samples: the probe only sees its samples.
  Bytes mostly_random = random_bytes(1 << 20, 6);
  const Bytes text = text_bytes(64 << 10, 7);
  std::memcpy(mostly_random.data() + (64 << 10), text.data(), text.size());
  EXPECT_TRUE(looks_incompressible(mostly_random));
  // Random but for one compressible sample (the second of eight 2 KiB pieces, spread evenly): 7 of 8 pieces
  // that do not shrink are not enough to skip it.
  const size_t second = ((size_t{1} << 20) / 7) & ~size_t{2047};
  std::memcpy(mostly_random.data() + second, text.data(), 2048);
  EXPECT_FALSE(looks_incompressible(mostly_random));
}

// The probe stops early once the pieces left cannot change its answer: the answer is the one all eight
// pieces give, for chunks of random, compressible and zero pieces in every mix.
TEST(Incompressible, StoppingEarlyGivesTheAnswerOfAllPieces) {
  std::mt19937 rng(12);
  const Bytes noise = random_bytes(1 << 20, 13);
  const Bytes text = text_bytes(1 << 20, 14);
  constexpr size_t kSize = 1 << 20, kPieces = 8, kPiece = 2048;
  int incompressible = 0;
  for (int round = 0; round < 300; ++round) {
    Bytes chunk = noise;
    std::vector<size_t> offsets;
    for (size_t i = 0; i < kPieces; ++i) offsets.push_back(std::min((kSize * i / (kPieces - 1)) & ~(kPiece - 1),
                                                                     kSize - kPiece));
    for (const size_t at : offsets) {
      const unsigned kind = rng() % 8;  // mostly random, some text (a few bytes of it or all), some zero
      if (kind == 6) std::memcpy(chunk.data() + at, text.data() + at, kPiece);
      if (kind == 7) std::memset(chunk.data() + at, 0, kPiece);
      if (kind == 5) std::memcpy(chunk.data() + at, text.data() + at, rng() % kPiece);
    }
    for (const bool skip_zero : {false, true}) {
      size_t in = 0, out = 0;
      for (const size_t at : offsets) {
        if (skip_zero && is_zero(chunk.data() + at, kPiece)) continue;
        char dst[LZ4_COMPRESSBOUND(kPiece)];
        const int n = LZ4_compress_default(reinterpret_cast<const char*>(chunk.data() + at), dst, int(kPiece),
                                           int(sizeof dst));
        in += kPiece;
        out += size_t(n);
      }
      const bool all_pieces = in > 0 && double(out) > kIncompressibleRatio * double(in);
      EXPECT_EQ(looks_incompressible(chunk, skip_zero), all_pieces) << "round " << round << " " << skip_zero;
      incompressible += all_pieces;
    }
  }
  // Both answers were given many times.
  EXPECT_GT(incompressible, 50);
  EXPECT_LT(incompressible, 550);
}

// --- compressibility estimates (--codec auto's choice of the chunks it compresses) ---------------------------

// Text with every n-th 256-byte piece replaced by noise: compressibility falls as the noise share grows.
Bytes noisy_text(size_t len, size_t noise_every, uint64_t seed) {
  Bytes out = text_bytes(len, seed);
  const Bytes noise = random_bytes(len, seed + 1);
  for (size_t at = 0; at + 256 <= len; at += 256) {
    if (noise_every && (at / 256) % noise_every == 0) std::memcpy(out.data() + at, noise.data() + at, 256);
  }
  return out;
}

TEST(Estimate, RanksChunksAsCompressingThemWholeDoes) {
  const size_t size = 1 << 20;
  const Bytes chunks[] = {Bytes(size), text_bytes(size, 1), noisy_text(size, 4, 2), noisy_text(size, 2, 3),
                          random_bytes(size, 4)};
  double last_estimate = -1;
  size_t last_size = 0;
  for (const Bytes& c : chunks) {
    const double e = estimate_ratio(c);
    Bytes out(encode_bound(Codec::lz4, size));
    const EncodeResult r = encode_chunk(EncodeOptions{.codec = Codec::lz4, .detect_zero = false,
                                                      .probe_incompressible = false},
                                        c, out);
    const size_t whole = r.encoded_len;
    EXPECT_GT(e, last_estimate);
    EXPECT_GT(whole, last_size);
    last_estimate = e;
    last_size = whole;
  }
  EXPECT_LT(estimate_ratio(chunks[0]), 0.05);
  EXPECT_GT(estimate_ratio(chunks[4]), kIncompressibleRatio);
  EXPECT_EQ(estimate_ratio({}), 0.0);
  // Up to 8 KiB the input is compressed whole: a small random input is as incompressible as a large one.
  EXPECT_GT(estimate_ratio(random_bytes(5000, 5)), kIncompressibleRatio);
  EXPECT_LT(estimate_ratio(text_bytes(5000, 6)), 0.5);
}

TEST(Estimate, ChunksAboveTheLimitGoRawAndReportTheirEstimate) {
  const size_t size = 1 << 20;
  const Bytes good = text_bytes(size, 7);
  const Bytes fair = noisy_text(size, 2, 8);
  const double limit = (estimate_ratio(good) + estimate_ratio(fair)) / 2;
  for (const Bytes* c : {&good, &fair}) {
    Bytes out(encode_bound(Codec::lz4, size));
    const EncodeResult r = encode_chunk(EncodeOptions{.codec = Codec::lz4, .max_estimate = limit}, *c, out);
    EXPECT_DOUBLE_EQ(r.estimate, estimate_ratio(*c));
    EXPECT_EQ(r.codec, c == &good ? Codec::lz4 : Codec::none);
    EXPECT_EQ(r.over_limit, c != &good);
    Bytes back(size);
    const Bytes payload = r.codec == Codec::none ? *c : Bytes(out.begin(), out.begin() + r.encoded_len);
    EXPECT_EQ(decode_chunk(r.codec, r.zero, payload, back, r.hash), DecodeError::ok);
    EXPECT_EQ(back, *c);
  }
  // Incompressible data goes raw whatever the limit; no limit asked for: no estimate made.
  Bytes out(encode_bound(Codec::lz4, size));
  const EncodeResult noise =
      encode_chunk(EncodeOptions{.codec = Codec::lz4, .max_estimate = 1e9}, random_bytes(size, 9), out);
  EXPECT_EQ(noise.codec, Codec::none);
  EXPECT_TRUE(noise.over_limit);  // the estimate decided, not a failed compression
  EXPECT_GT(noise.estimate, kIncompressibleRatio);
  EXPECT_LT(encode_chunk(EncodeOptions{.codec = Codec::lz4}, good, out).estimate, 0);
  // Small chunks too (below the incompressible probe's minimum): the limit holds whatever the size.
  const Bytes small = text_bytes(16 << 10, 10);
  const EncodeResult below = encode_chunk(EncodeOptions{.codec = Codec::lz4, .max_estimate = 0.0}, small, out);
  EXPECT_EQ(below.codec, Codec::none);
  EXPECT_GT(below.estimate, 0);
  // A chunk going raw with zero pages still drops them (sparse) when allowed.
  Bytes sparse = fair;
  std::fill(sparse.begin(), sparse.begin() + (size / 2), std::byte{0});
  const EncodeResult r = encode_chunk(
      EncodeOptions{.codec = Codec::lz4, .sparse_fallback = true, .max_estimate = 0.0}, sparse, out);
  EXPECT_EQ(r.codec, Codec::sparse);
}

// --- zero detection --------------------------------------------------------------------------------------

TEST(IsZero, EmptyAndAllZero) {
  EXPECT_TRUE(is_zero(nullptr, 0));
  std::vector<std::byte> zeros((1 << 20) + 64);
  for (size_t len : {size_t{1}, size_t{31}, size_t{32}, size_t{33}, size_t{255}, size_t{256}, size_t{257},
                     size_t{4096}, size_t{1} << 20}) {
    for (size_t start = 0; start < 8; ++start) EXPECT_TRUE(is_zero(zeros.data() + start, len)) << len;
  }
}

TEST(IsZero, OneNonZeroByteAnywhereInSmallBuffers) {
  // Every length up to a few blocks, every position, several misalignments: covers the head check, the
  // 256-byte blocks, the 32-byte loop and the overlapping tail.
  std::vector<std::byte> buf(700 + 8);
  for (size_t start = 0; start < 4; ++start) {
    for (size_t len = 1; len <= 700; ++len) {
      for (size_t pos = 0; pos < len; ++pos) {
        std::byte* p = buf.data() + start;
        p[pos] = std::byte{0x80};
        const bool z = is_zero(p, len);
        p[pos] = std::byte{0};
        if (z) FAIL() << "missed byte at " << pos << " of " << len << " (start " << start << ")";
      }
      ASSERT_TRUE(is_zero(buf.data() + start, len));
    }
  }
}

TEST(IsZero, OneNonZeroByteInLargeBuffers) {
  std::vector<std::byte> buf((16 << 20) + 16);
  for (size_t len : {size_t{4096}, size_t{4097}, size_t{1} << 20, (size_t{1} << 20) + 3, size_t{16} << 20}) {
    for (size_t start : {size_t{0}, size_t{1}, size_t{7}}) {
      std::byte* p = buf.data() + start;
      for (size_t pos : {size_t{0}, size_t{1}, size_t{31}, size_t{32}, len / 2, len / 2 + 3, len - 33,
                         len - 32, len - 2, len - 1}) {
        p[pos] = std::byte{1};
        EXPECT_FALSE(is_zero(p, len)) << "pos " << pos << " len " << len << " start " << start;
        p[pos] = std::byte{0};
      }
      EXPECT_TRUE(is_zero(p, len));
    }
  }
}

// --- decode errors ---------------------------------------------------------------------------------------

TEST(DecodeErrors, UnknownCodec) {
  const Bytes raw = text_bytes(100, 1);
  Bytes out(raw.size());
  for (uint8_t v : {uint8_t{kCodecCount}, uint8_t{200}, uint8_t{255}}) {
    EXPECT_EQ(decode_chunk(static_cast<Codec>(v), false, raw, out, hash64(raw.data(), raw.size())),
              DecodeError::unknown_codec);
    EXPECT_EQ(decode_chunk(static_cast<Codec>(v), true, {}, out, 0), DecodeError::unknown_codec);
  }
}

TEST(DecodeErrors, NoneLengths) {
  const Bytes raw = text_bytes(4096, 1);
  const uint64_t h = hash64(raw.data(), raw.size());
  Bytes out_short(4095), out_long(4097), out(4096);
  EXPECT_EQ(decode_chunk(Codec::none, false, raw, out_short, h), DecodeError::bad_length);  // enc too long
  EXPECT_EQ(decode_chunk(Codec::none, false, raw, out_long, h), DecodeError::bad_length);   // enc too short
  EXPECT_EQ(decode_chunk(Codec::none, false, std::span(raw).first(10), out, h), DecodeError::bad_length);
  EXPECT_EQ(decode_chunk(Codec::none, false, raw, out, h), DecodeError::ok);
}

TEST(DecodeErrors, NoneInPlace) {
  Bytes buf = text_bytes(4096, 8);
  const Bytes copy = buf;
  EXPECT_EQ(decode_chunk(Codec::none, false, buf, buf, hash64(buf.data(), buf.size())), DecodeError::ok);
  EXPECT_TRUE(buf == copy);
}

TEST(DecodeErrors, Lz4Lengths) {
  const Bytes raw = text_bytes(64 * 1024, 2);
  const Encoded e = encode(raw, Codec::lz4);
  ASSERT_EQ(e.result.codec, Codec::lz4);
  const uint64_t h = e.result.hash;
  Bytes out(raw.size());
  // enc too short: nothing at all.
  EXPECT_EQ(decode_chunk(Codec::lz4, false, {}, out, h), DecodeError::bad_length);
  // enc too long: past the bound for this raw length.
  Bytes too_long(encode_bound(Codec::lz4, raw.size()) + 1, std::byte{0});
  EXPECT_EQ(decode_chunk(Codec::lz4, false, too_long, out, h), DecodeError::bad_length);
  // raw_len mismatch that makes the payload impossible: a raw length whose bound is below the payload size.
  Bytes tiny(16);
  EXPECT_EQ(decode_chunk(Codec::lz4, false, e.payload, tiny, h), DecodeError::bad_length);
  Bytes empty;
  EXPECT_EQ(decode_chunk(Codec::lz4, false, e.payload, empty, h), DecodeError::bad_length);
  // raw_len mismatch that only decoding reveals: the payload yields fewer or more bytes than promised.
  Bytes bigger(raw.size() + 1), smaller(raw.size() - 1);
  EXPECT_EQ(decode_chunk(Codec::lz4, false, e.payload, bigger, h), DecodeError::corrupt);
  EXPECT_EQ(decode_chunk(Codec::lz4, false, e.payload, smaller, h), DecodeError::corrupt);
  EXPECT_EQ(decode_chunk(Codec::lz4, false, e.payload, out, h), DecodeError::ok);
}

TEST(DecodeErrors, ZstdLengths) {
  const Bytes raw = text_bytes(64 * 1024, 3);
  const Encoded e = encode(raw, Codec::zstd);
  ASSERT_EQ(e.result.codec, Codec::zstd);
  const uint64_t h = e.result.hash;
  Bytes out(raw.size());
  EXPECT_EQ(decode_chunk(Codec::zstd, false, {}, out, h), DecodeError::bad_length);
  Bytes too_long(encode_bound(Codec::zstd, raw.size()) + 1, std::byte{0});
  EXPECT_EQ(decode_chunk(Codec::zstd, false, too_long, out, h), DecodeError::bad_length);
  // The frame header records the content size: any other raw length is rejected before decompressing.
  Bytes bigger(raw.size() + 1), smaller(raw.size() - 1), empty;
  EXPECT_EQ(decode_chunk(Codec::zstd, false, e.payload, bigger, h), DecodeError::bad_length);
  EXPECT_EQ(decode_chunk(Codec::zstd, false, e.payload, smaller, h), DecodeError::bad_length);
  EXPECT_EQ(decode_chunk(Codec::zstd, false, e.payload, empty, h), DecodeError::bad_length);
  EXPECT_EQ(decode_chunk(Codec::zstd, false, e.payload, out, h), DecodeError::ok);
}

TEST(DecodeErrors, CorruptLz4) {
  const Bytes raw = text_bytes(64 * 1024, 4);
  const Encoded e = encode(raw, Codec::lz4);
  ASSERT_EQ(e.result.codec, Codec::lz4);
  Bytes out(raw.size());
  // Truncated: the last sequence runs past the input.
  EXPECT_EQ(
      decode_chunk(Codec::lz4, false, std::span(e.payload).first(e.payload.size() - 1), out, e.result.hash),
      DecodeError::corrupt);
  // A literal-length run of 0xff extensions that overruns the input.
  Bytes garbage(100, std::byte{0xff});
  EXPECT_EQ(decode_chunk(Codec::lz4, false, garbage, out, e.result.hash), DecodeError::corrupt);
  // A match reaching before the start of the output: one literal, then offset 256.
  const Bytes before_start = {std::byte{0x10}, std::byte{'a'}, std::byte{0x00}, std::byte{0x01},
                              std::byte{0x00}};
  Bytes small(64);
  EXPECT_EQ(decode_chunk(Codec::lz4, false, before_start, small, 0), DecodeError::corrupt);
}

TEST(DecodeErrors, CorruptZstd) {
  const Bytes raw = text_bytes(64 * 1024, 5);
  const Encoded e = encode(raw, Codec::zstd);
  ASSERT_EQ(e.result.codec, Codec::zstd);
  Bytes out(raw.size());
  EXPECT_EQ(
      decode_chunk(Codec::zstd, false, std::span(e.payload).first(e.payload.size() - 1), out, e.result.hash),
      DecodeError::corrupt);
  Bytes bad_magic = e.payload;
  bad_magic[0] ^= std::byte{0x01};
  EXPECT_EQ(decode_chunk(Codec::zstd, false, bad_magic, out, e.result.hash), DecodeError::corrupt);
  // Trailing bytes after the frame are not a second frame.
  Bytes trailing = e.payload;
  trailing.push_back(std::byte{0});
  trailing.push_back(std::byte{0});
  EXPECT_EQ(decode_chunk(Codec::zstd, false, trailing, out, e.result.hash), DecodeError::corrupt);
  Bytes garbage(100, std::byte{0xff});
  EXPECT_EQ(decode_chunk(Codec::zstd, false, garbage, out, e.result.hash), DecodeError::corrupt);
}

TEST(DecodeErrors, HashMismatchOneFlippedBit) {
  const Bytes raw = text_bytes(64 * 1024, 6);
  for (Codec codec : {Codec::none, Codec::lz4, Codec::zstd}) {
    const Encoded e = encode(raw, codec);
    ASSERT_EQ(e.result.codec, codec);
    Bytes out(raw.size());
    for (int bit : {0, 31, 63}) {
      EXPECT_EQ(decode_chunk(codec, false, e.payload, out, e.result.hash ^ (uint64_t{1} << bit)),
                DecodeError::hash_mismatch)
          << codec_name(codec) << " bit " << bit;
    }
  }
  // A flipped bit in a raw payload decodes "fine" and only the hash catches it.
  Bytes flipped = raw;
  flipped[12345] ^= std::byte{0x04};
  Bytes out(raw.size());
  EXPECT_EQ(decode_chunk(Codec::none, false, flipped, out, hash64(raw.data(), raw.size())),
            DecodeError::hash_mismatch);
}

TEST(DecodeErrors, ZeroChunk) {
  Bytes out(4096, std::byte{7});
  const Bytes one(1);
  EXPECT_EQ(decode_chunk(Codec::none, true, one, out, 0), DecodeError::bad_length);
  EXPECT_EQ(decode_chunk(Codec::none, true, {}, out, 1), DecodeError::hash_mismatch);
  EXPECT_EQ(decode_chunk(Codec::none, true, {}, out, 0), DecodeError::ok);
  EXPECT_TRUE(is_zero(out.data(), out.size()));
}

TEST(DecodeErrors, TextsAreDistinct) {
  const DecodeError all[] = {DecodeError::ok, DecodeError::unknown_codec, DecodeError::bad_length,
                             DecodeError::corrupt, DecodeError::hash_mismatch};
  for (size_t i = 0; i < std::size(all); ++i) {
    ASSERT_NE(decode_error_text(all[i]), nullptr);
    EXPECT_GT(std::strlen(decode_error_text(all[i])), 0u);
    for (size_t j = 0; j < i; ++j) EXPECT_STRNE(decode_error_text(all[i]), decode_error_text(all[j]));
  }
}

// --- hashing ---------------------------------------------------------------------------------------------

// Expected values from xxhsum 0.8.1 (Debian package xxhash):
//   printf 'The quick brown fox jumps over the lazy dog' | xxhsum -H2   (XXH3-128) and -H3 (XXH3-64)
//   python3 -c "import sys; sys.stdout.buffer.write(bytes((i*7+3)&255 for i in range(1000)))" | xxhsum -H2
//   printf '' | xxhsum -H2
TEST(Hash, KnownValues) {
  const Bytes fox = as_bytes("The quick brown fox jumps over the lazy dog");
  EXPECT_EQ(hash128(fox.data(), fox.size()).hex(), "ddd650205ca3e7fa24a1cc2e3a8a7651");
  EXPECT_EQ(hash64(fox.data(), fox.size()), 0xce7d19a5418fb365ull);
  const Hash128 h = hash128(fox.data(), fox.size());
  EXPECT_EQ(h.high, 0xddd650205ca3e7faull);
  EXPECT_EQ(h.low, 0x24a1cc2e3a8a7651ull);

  Bytes seq(1000);
  for (size_t i = 0; i < seq.size(); ++i) seq[i] = static_cast<std::byte>((i * 7 + 3) & 255);
  EXPECT_EQ(hash128(seq.data(), seq.size()).hex(), "6bcc7eff62da44c26c4f14bd97bd9e82");
  EXPECT_EQ(hash64(seq.data(), seq.size()), 0x6c4f14bd97bd9e82ull);

  EXPECT_EQ(hash128(nullptr, 0).hex(), "99aa06d3014798d86001c324468d497f");
  EXPECT_EQ(hash64(nullptr, 0), 0x2d06800538d394c2ull);
}

TEST(Hash, HexIsCanonical) {
  EXPECT_EQ((Hash128{.high = 0x0123456789abcdefull, .low = 0xfedcba9876543210ull}).hex(),
            "0123456789abcdeffedcba9876543210");
  EXPECT_EQ(Hash128{}.hex(), std::string(32, '0'));
}

TEST(Hash, StreamingEqualsOneShot) {
  const Bytes data = random_bytes(3 * 1024 * 1024 + 17, 11);
  const uint64_t want64 = hash64(data.data(), data.size());
  const Hash128 want128 = hash128(data.data(), data.size());
  Hasher64 h64;
  Hasher128 h128;
  EXPECT_EQ(h64.digest(), hash64(nullptr, 0));
  EXPECT_EQ(h128.digest(), hash128(nullptr, 0));
  // Uneven pieces cross XXH3's internal stripe and block boundaries at many different points.
  for (size_t step : {size_t{1}, size_t{63}, size_t{240}, size_t{4096}, size_t{1000003}}) {
    h64.reset();
    h128.reset();
    const size_t limit = step == 1 ? 20000 : data.size();
    for (size_t at = 0; at < limit; at += step) {
      const size_t n = std::min(step, limit - at);
      h64.update(data.data() + at, n);
      h128.update(data.data() + at, n);
    }
    EXPECT_EQ(h64.digest(), hash64(data.data(), limit)) << step;
    EXPECT_EQ(h128.digest(), hash128(data.data(), limit)) << step;
  }
  h64.reset();
  h64.update(data.data(), data.size());
  EXPECT_EQ(h64.digest(), want64);
  EXPECT_EQ(h64.digest(), want64);  // digest does not consume the state
  h128.reset();
  h128.update(data.data(), data.size());
  EXPECT_EQ(h128.digest(), want128);
}

// Sparse: zero pages elided, the rest raw. Random pages with every other page zero, and a short tail page.
TEST(Sparse, RoundTripsAndShrinksByTheZeroPages) {
  for (size_t len : {size_t{8192}, size_t{(1 << 20)}, size_t{(1 << 20) + 100}, size_t{5 * 4096 - 1}}) {
    Bytes raw = random_bytes(len, 3);
    size_t zero_bytes = 0;
    for (size_t page = 0; page * 4096 < len; page += 2) {
      const size_t n = std::min<size_t>(4096, len - page * 4096);
      std::memset(raw.data() + page * 4096, 0, n);
      zero_bytes += n;
    }
    EncodeOptions opts;
    opts.codec = Codec::sparse;
    Bytes out(encode_bound(Codec::sparse, len));
    const EncodeResult r = encode_chunk(opts, raw, out);
    ASSERT_EQ(r.codec, Codec::sparse) << len;
    const size_t pages = (len + 4095) / 4096;
    EXPECT_EQ(r.encoded_len, (pages + 7) / 8 + len - zero_bytes) << len;
    Bytes back(len, std::byte{0x5a});
    EXPECT_EQ(decode_chunk(Codec::sparse, false, std::span(out.data(), r.encoded_len), back, r.hash),
              DecodeError::ok);
    EXPECT_EQ(back, raw);
  }
}

TEST(Sparse, IsTheFallbackForChunksThatGoRaw) {
  Bytes raw = random_bytes(64 << 10, 4);
  std::memset(raw.data() + 4096, 0, 8192);
  EncodeOptions opts;
  opts.codec = Codec::none;
  Bytes out(encode_bound(Codec::lz4, raw.size()));
  EXPECT_EQ(encode_chunk(opts, raw, out).codec, Codec::none);  // not asked for: raw stays raw
  opts.sparse_fallback = true;
  EXPECT_EQ(encode_chunk(opts, raw, out).codec, Codec::sparse);
  {
    // lz4 without paging, on random pages and one zero page that the probe's pieces miss: the probe sends it
    // raw, and the zero page still goes.
    Bytes one = random_bytes(64 << 10, 8);
    std::memset(one.data() + 4096, 0, 4096);
    const EncodeResult r = encode_chunk({.codec = Codec::lz4, .sparse_fallback = true}, one, out);
    EXPECT_EQ(r.codec, Codec::sparse);
    EXPECT_EQ(r.encoded_len, 2 + one.size() - 4096);
  }
  // Random pages: lz4 cannot shrink them (the probe, which leaves out the zero pages a paged chunk never
  // compresses, says so), the zero pages still go.
  opts.codec = Codec::lz4;
  opts.paged = true;
  Bytes scratch(paged_scratch_bytes(raw.size()));
  const EncodeResult r = encode_chunk(opts, raw, out, scratch);
  EXPECT_EQ(r.codec, Codec::sparse);
  EXPECT_EQ(r.encoded_len, 2 + raw.size() - 8192);
  Bytes none_zero = random_bytes(64 << 10, 5);
  EXPECT_EQ(encode_chunk(opts, none_zero, out, scratch).codec, Codec::none);  // no zero page: nothing to gain
  // An output too small for the pages that stay: raw, and nothing written past the output.
  Bytes small(raw.size() - 16384 + 16, std::byte{0x77});
  const EncodeResult tight = encode_chunk(opts, raw, std::span(small.data(), small.size() - 16), scratch);
  EXPECT_EQ(tight.codec, Codec::none);
  for (size_t i = small.size() - 16; i < small.size(); ++i) ASSERT_EQ(small[i], std::byte{0x77}) << i;
}

TEST(Sparse, RejectsMalformedPayloads) {
  Bytes raw = random_bytes(3 * 4096 + 10, 6);
  std::memset(raw.data() + 4096, 0, 4096);
  EncodeOptions opts;
  opts.codec = Codec::sparse;
  Bytes out(encode_bound(Codec::sparse, raw.size()));
  const EncodeResult r = encode_chunk(opts, raw, out);
  ASSERT_EQ(r.codec, Codec::sparse);
  Bytes back(raw.size());
  Bytes enc(out.begin(), out.begin() + r.encoded_len);
  // Truncated and over-long payloads.
  EXPECT_EQ(decode_chunk(Codec::sparse, false, std::span(enc.data(), enc.size() - 1), back, r.hash),
            DecodeError::bad_length);
  Bytes longer = enc;
  longer.push_back(std::byte{0});
  EXPECT_EQ(decode_chunk(Codec::sparse, false, longer, back, r.hash), DecodeError::bad_length);
  // A bitmap claiming a page past the end (4 pages: bit 4 is beyond).
  Bytes beyond = enc;
  beyond[0] |= std::byte{1u << 4};
  EXPECT_EQ(decode_chunk(Codec::sparse, false, beyond, back, r.hash), DecodeError::corrupt);
  // A bitmap that marks the zero page present: lengths no longer add up.
  Bytes flipped = enc;
  flipped[0] |= std::byte{1u << 1};
  EXPECT_EQ(decode_chunk(Codec::sparse, false, flipped, back, r.hash), DecodeError::bad_length);
  // Payload bytes changed: the hash catches it.
  Bytes changed = enc;
  changed[5] ^= std::byte{1};
  EXPECT_EQ(decode_chunk(Codec::sparse, false, changed, back, r.hash), DecodeError::hash_mismatch);
  EXPECT_EQ(decode_chunk(Codec::sparse, false, std::span(enc.data(), 0), back, r.hash), DecodeError::bad_length);
}

// The receiver's way with a sparse payload: verified without expanding it, handed on in runs or expanded in
// place from the end of a buffer. Every bitmap of 9 pages (the last one short), against the raw bytes.
TEST(Sparse, VerifiedRunsAndInPlaceExpansionMatchTheDecoder) {
  const size_t len = 8 * 4096 + 123;
  const Bytes random = random_bytes(len, 8);
  Hasher64 hasher;
  for (unsigned mask = 1; mask < (1u << 9) - 1; ++mask) {  // at least one page present, one zero
    Bytes raw = random;
    for (size_t page = 0; page < 9; ++page)
      if (!(mask >> page & 1)) std::memset(raw.data() + page * 4096, 0, std::min<size_t>(4096, len - page * 4096));
    Bytes out(encode_bound(Codec::sparse, len));
    const EncodeResult r = encode_chunk(EncodeOptions{.codec = Codec::sparse, .detect_zero = false, .probe_incompressible = false}, raw, out);
    ASSERT_EQ(r.codec, Codec::sparse) << mask << " " << r.encoded_len;
    const std::span<const std::byte> enc(out.data(), r.encoded_len);
    ASSERT_EQ(verify_sparse(enc, len, r.hash, hasher), DecodeError::ok) << mask;
    EXPECT_EQ(verify_sparse(enc, len, r.hash ^ 1, hasher), DecodeError::hash_mismatch) << mask;
    // Runs: alternate between present and zero, cover the chunk in order, and carry its bytes.
    Bytes joined;
    int last_kind = -1;
    for_each_sparse_run(enc, len, [&](size_t off, size_t n, const std::byte* data) {
      EXPECT_EQ(off, joined.size());
      EXPECT_NE(int(data != nullptr), last_kind);
      last_kind = data != nullptr;
      if (data)
        joined.insert(joined.end(), data, data + n);
      else
        joined.resize(joined.size() + n, std::byte{0});
    });
    EXPECT_EQ(joined, raw) << mask;
    // In place, in a buffer the chunk's size and in a larger one, whatever was in it before.
    for (size_t extra : {size_t{0}, size_t{1}, size_t{4096 + 7}}) {
      Bytes buf(len + extra, std::byte{0xa5});
      std::memcpy(buf.data() + buf.size() - enc.size(), enc.data(), enc.size());
      expand_sparse_at_end(buf, enc.size(), len);
      ASSERT_TRUE(std::equal(raw.begin(), raw.end(), buf.begin())) << mask << " extra " << extra;
    }
  }
}

TEST(Sparse, VerifyRejectsWhatTheDecoderRejects) {
  Bytes raw = random_bytes(3 * 4096 + 10, 6);
  std::memset(raw.data() + 4096, 0, 4096);
  Bytes out(encode_bound(Codec::sparse, raw.size()));
  const EncodeResult r = encode_chunk(EncodeOptions{.codec = Codec::sparse}, raw, out);
  ASSERT_EQ(r.codec, Codec::sparse);
  Bytes enc(out.begin(), out.begin() + r.encoded_len);
  Hasher64 h;
  EXPECT_EQ(verify_sparse(std::span(enc.data(), enc.size() - 1), raw.size(), r.hash, h), DecodeError::bad_length);
  Bytes beyond = enc;
  beyond[0] |= std::byte{1u << 4};
  EXPECT_EQ(verify_sparse(beyond, raw.size(), r.hash, h), DecodeError::corrupt);
  Bytes flipped = enc;
  flipped[0] |= std::byte{1u << 1};
  EXPECT_EQ(verify_sparse(flipped, raw.size(), r.hash, h), DecodeError::bad_length);
  Bytes changed = enc;
  changed[5] ^= std::byte{1};
  EXPECT_EQ(verify_sparse(changed, raw.size(), r.hash, h), DecodeError::hash_mismatch);
  EXPECT_EQ(verify_sparse(std::span(enc.data(), 0), raw.size(), r.hash, h), DecodeError::bad_length);
  Bytes huge(encode_bound(Codec::sparse, raw.size()) + 1);
  EXPECT_EQ(verify_sparse(huge, raw.size(), r.hash, h), DecodeError::bad_length);
}

// sparse_gather: the same result, but only the bitmap is written; the pages stay in raw, and the page runs
// of the bitmap pick them out.
TEST(Sparse, GatherWritesTheBitmapOnly) {
  Bytes raw = random_bytes(6 * 4096 + 5, 12);
  std::memset(raw.data() + 4096, 0, 2 * 4096);
  std::memset(raw.data() + 5 * 4096, 0, 4096);
  Bytes copied(encode_bound(Codec::sparse, raw.size()));
  Bytes gathered(copied.size(), std::byte{0x3c});
  EncodeOptions opts{.codec = Codec::sparse, .probe_incompressible = false};
  const EncodeResult a = encode_chunk(opts, raw, copied);
  opts.sparse_gather = true;
  const EncodeResult b = encode_chunk(opts, raw, gathered);
  ASSERT_EQ(a.codec, Codec::sparse);
  ASSERT_EQ(b.codec, Codec::sparse);
  EXPECT_EQ(b.encoded_len, a.encoded_len);
  EXPECT_EQ(b.hash, a.hash);
  const size_t bitmap = sparse_bitmap_bytes(raw.size());
  ASSERT_EQ(bitmap, 1u);
  EXPECT_EQ(gathered[0], copied[0]);
  for (size_t i = bitmap; i < gathered.size(); ++i) ASSERT_EQ(gathered[i], std::byte{0x3c}) << i;
  Bytes joined(copied.begin(), copied.begin() + bitmap);
  for_each_sparse_page_run(std::span<const std::byte>(gathered.data(), bitmap), raw.size(),
                           [&](size_t off, size_t len, bool present) {
                             if (present) joined.insert(joined.end(), raw.begin() + off, raw.begin() + off + len);
                           });
  EXPECT_TRUE(std::equal(joined.begin(), joined.end(), copied.begin()));
  EXPECT_EQ(joined.size(), a.encoded_len);
}

// Paged: lz4 and zstd compress a chunk's sparse form (bitmap and present pages) instead of the whole chunk,
// so its zero pages cost no compression time. Text pages with every third page zero, a short last page, and
// sizes with a long bitmap; the payload decodes back to the chunk, through decode_chunk and through the
// receiver's in-place path (decode_paged into the end of a slot, verify_sparse, expand_sparse_at_end).
TEST(Paged, CompressesTheSparseFormAndDecodesBothWays) {
  for (const Codec codec : {Codec::lz4, Codec::zstd}) {
    for (size_t len : {size_t{3 * 4096}, size_t{(1 << 20)}, size_t{(1 << 20) + 100}, size_t{77 * 4096 + 1}}) {
      SCOPED_TRACE(std::string(codec_name(codec)) + " " + std::to_string(len));
      Bytes raw = text_bytes(len, 7);
      for (size_t page = 1; page * 4096 < len; page += 3)
        std::memset(raw.data() + page * 4096, 0, std::min<size_t>(4096, len - page * 4096));
      EncodeOptions opts{.codec = codec, .probe_incompressible = false, .paged = true};
      Bytes out(encode_bound(codec, len)), scratch(paged_scratch_bytes(len));
      const EncodeResult r = encode_chunk(opts, raw, out, scratch);
      ASSERT_EQ(r.codec, codec);
      EncodeOptions sparse_opts{.codec = Codec::sparse};
      Bytes sparse_out(encode_bound(Codec::sparse, len));
      const EncodeResult s = encode_chunk(sparse_opts, raw, sparse_out);
      ASSERT_EQ(s.codec, Codec::sparse);
      EXPECT_EQ(r.paged_len, s.encoded_len);  // the sparse form, exactly
      EXPECT_LT(r.encoded_len, r.paged_len);
      EXPECT_EQ(r.hash, hash64(raw.data(), raw.size()));
      const std::span<const std::byte> enc(out.data(), r.encoded_len);
      Bytes back(len, std::byte{0x5a});
      EXPECT_EQ(decode_chunk(codec, false, enc, back, r.hash, r.paged_len), DecodeError::ok);
      EXPECT_EQ(back, raw);
      // Without the paged length the payload is not the chunk.
      EXPECT_NE(decode_chunk(codec, false, enc, back, r.hash), DecodeError::ok);
      // In place: the sparse form at the end of a slot of the chunk size, then expanded.
      Bytes slot(1 << 20 > len ? size_t(1 << 20) : len + 4096, std::byte{0x33});
      const std::span<std::byte> tail = std::span(slot).last(r.paged_len);
      ASSERT_EQ(decode_paged(codec, enc, tail, len), DecodeError::ok);
      Hasher64 hasher;
      EXPECT_EQ(verify_sparse(tail, len, r.hash, hasher), DecodeError::ok);
      expand_sparse_at_end(slot, r.paged_len, len);
      EXPECT_TRUE(std::equal(raw.begin(), raw.end(), slot.begin()));
    }
  }
}

TEST(Paged, OnlyWhenItPaysAndTheScratchIsThere) {
  Bytes raw = text_bytes(64 << 10, 8);
  EncodeOptions opts{.codec = Codec::lz4, .probe_incompressible = false, .paged = true};
  Bytes out(encode_bound(Codec::lz4, raw.size())), scratch(paged_scratch_bytes(raw.size()));
  EXPECT_EQ(encode_chunk(opts, raw, out, scratch).paged_len, 0u);  // no zero page: the whole chunk
  std::memset(raw.data() + 8192, 0, 4096);
  EXPECT_GT(encode_chunk(opts, raw, out, scratch).paged_len, 0u);
  EXPECT_EQ(encode_chunk(opts, raw, out, std::span(scratch).first(scratch.size() - 1)).paged_len, 0u);
  EXPECT_EQ(encode_chunk(opts, raw, out).paged_len, 0u);  // no scratch
  opts.paged = false;
  EXPECT_EQ(encode_chunk(opts, raw, out, scratch).paged_len, 0u);
  opts = {.codec = Codec::sparse, .paged = true};  // sparse and none are never paged
  EXPECT_EQ(encode_chunk(opts, raw, out, scratch).paged_len, 0u);
  opts.codec = Codec::none;
  EXPECT_EQ(encode_chunk(opts, raw, out, scratch).paged_len, 0u);
  // Random pages around zero pages: nothing compresses, the zero pages still go, with or without a sparse
  // fallback (whole, the chunk compressed before paging existed: its zero pages shrank), copied or gathered.
  Bytes noise = random_bytes(64 << 10, 9);
  std::memset(noise.data() + 8192, 0, 3 * 4096);
  for (const Codec codec : {Codec::lz4, Codec::zstd}) {
    for (const bool fallback : {false, true}) {
      for (const bool gather : {false, true}) {
        SCOPED_TRACE(std::string(codec_name(codec)) + (fallback ? " fallback" : "") +
                     (gather ? " gather" : ""));
        opts = {.codec = codec, .probe_incompressible = false, .sparse_fallback = fallback,
                .sparse_gather = gather, .paged = true};
        Bytes o(out.size(), std::byte{0x6b});
        const EncodeResult r = encode_chunk(opts, noise, o, scratch);
        EXPECT_EQ(r.codec, Codec::sparse);
        EXPECT_EQ(r.paged_len, 0u);
        EXPECT_EQ(r.encoded_len, sparse_bitmap_bytes(noise.size()) + noise.size() - 3 * 4096);
        if (gather) {  // the bitmap (the pages go out from the chunk)
          Bytes copied(encode_bound(Codec::sparse, noise.size()));
          const EncodeOptions sparse_only{.codec = Codec::sparse, .probe_incompressible = false};
          ASSERT_EQ(encode_chunk(sparse_only, noise, copied).codec, Codec::sparse);
          const size_t bitmap = sparse_bitmap_bytes(noise.size());
          EXPECT_TRUE(std::equal(o.begin(), o.begin() + ptrdiff_t(bitmap), copied.begin()));
        } else {
          Bytes back(noise.size());
          EXPECT_EQ(decode_chunk(Codec::sparse, false, std::span(o.data(), r.encoded_len), back, r.hash),
                    DecodeError::ok);
          EXPECT_EQ(back, noise);
        }
      }
    }
  }
  // The estimate and the probe leave out the zero pages a paged chunk never compresses: random pages and
  // zero pages look compressible whole, and are not.
  Bytes half = random_bytes(1 << 20, 10);
  for (size_t page = 0; page < 256; page += 2) std::memset(half.data() + page * 4096, 0, 4096);
  EXPECT_LT(estimate_ratio(half), 0.7);
  EXPECT_GT(estimate_ratio(half, true), kIncompressibleRatio);
  EXPECT_FALSE(looks_incompressible(half));
  EXPECT_TRUE(looks_incompressible(half, true));
  opts = {.codec = Codec::lz4, .probe_incompressible = true, .sparse_fallback = true, .paged = true};
  Bytes big_out(encode_bound(Codec::lz4, half.size())), big_scratch(paged_scratch_bytes(half.size()));
  EXPECT_EQ(encode_chunk(opts, half, big_out, big_scratch).codec, Codec::sparse);
  opts.probe_incompressible = false;
  opts.max_estimate = 0.9;
  const EncodeResult est = encode_chunk(opts, half, big_out, big_scratch);
  EXPECT_TRUE(est.over_limit);
  EXPECT_EQ(est.codec, Codec::sparse);
}

TEST(Paged, DecodeRejectsWhatDoesNotMatch) {
  Bytes raw = text_bytes(16 << 10, 10);
  std::memset(raw.data(), 0, 4096);
  EncodeOptions opts{.codec = Codec::lz4, .probe_incompressible = false, .paged = true};
  Bytes out(encode_bound(Codec::lz4, raw.size())), scratch(paged_scratch_bytes(raw.size()));
  const EncodeResult r = encode_chunk(opts, raw, out, scratch);
  ASSERT_GT(r.paged_len, 0u);
  const std::span<const std::byte> enc(out.data(), r.encoded_len);
  Bytes sparse(r.paged_len + 1);
  EXPECT_EQ(decode_paged(Codec::lz4, enc, std::span(sparse).first(r.paged_len), raw.size()), DecodeError::ok);
  EXPECT_NE(decode_paged(Codec::lz4, enc, sparse, raw.size()), DecodeError::ok);  // a wrong length
  const std::span<std::byte> exact = std::span(sparse).first(r.paged_len);
  EXPECT_NE(decode_paged(Codec::zstd, enc, exact, raw.size()), DecodeError::ok);
  EXPECT_EQ(decode_paged(Codec::sparse, enc, std::span(sparse).first(r.paged_len), raw.size()),
            DecodeError::unknown_codec);
  // A sparse form whose layout does not fit the chunk: its bitmap claims a page the payload lacks.
  Bytes bad(r.paged_len);
  ASSERT_EQ(decode_paged(Codec::lz4, enc, bad, raw.size()), DecodeError::ok);
  bad[0] = std::byte{0xff};
  Bytes recompressed(encode_bound(Codec::lz4, bad.size()));
  EncodeOptions plain{.codec = Codec::lz4, .probe_incompressible = false};
  const EncodeResult b = encode_chunk(plain, bad, recompressed);
  ASSERT_EQ(b.codec, Codec::lz4);
  EXPECT_NE(decode_paged(Codec::lz4, std::span(recompressed.data(), b.encoded_len), bad, raw.size()),
            DecodeError::ok);
  Bytes back(raw.size());
  EXPECT_EQ(decode_chunk(Codec::lz4, false, enc, back, r.hash ^ 1, r.paged_len), DecodeError::hash_mismatch);
  EXPECT_EQ(decode_chunk(Codec::lz4, true, enc, back, r.hash, r.paged_len), DecodeError::bad_length);
}

// HashForm::pages, built by hand from its definition: the present pages in order, the bitmap, the length
// (u64 little-endian). Chunks of one short page, whole pages, a short last page, and a long bitmap.
TEST(PageHash, IsThePresentPagesThenTheBitmapThenTheLength) {
  for (size_t len : {size_t{1}, size_t{4096}, size_t{5 * 4096 - 1}, size_t{(1 << 20) + 100}}) {
    SCOPED_TRACE(len);
    Bytes raw = random_bytes(len, 21);
    for (size_t page = 1; page * 4096 < len; page += 3)
      std::memset(raw.data() + page * 4096, 0, std::min<size_t>(4096, len - page * 4096));
    Bytes pages, bitmap(sparse_bitmap_bytes(len));
    for (size_t page = 0; page * 4096 < len; ++page) {
      if (page % 3 == 1) continue;  // the zero ones
      bitmap[page / 8] |= std::byte(1u << (page % 8));
      pages.insert(pages.end(), raw.begin() + page * 4096, raw.begin() + std::min(len, (page + 1) * 4096));
    }
    Bytes form = pages;
    form.insert(form.end(), bitmap.begin(), bitmap.end());
    for (size_t i = 0; i < 8; ++i) form.push_back(std::byte(uint64_t(len) >> (8 * i)));
    EXPECT_EQ(chunk_hash(HashForm::pages, raw), hash64(form.data(), form.size()));
    EXPECT_EQ(chunk_hash(HashForm::raw, raw), hash64(raw.data(), raw.size()));
  }
}

// The bitmap and the length are in the hash: the same page elsewhere in the chunk, or one more zero page at
// the end, hashes differently; so does a zero page against a page of one set byte.
TEST(PageHash, TellsWhereEachPageIsAndHowLongTheChunkIs) {
  const Bytes page = random_bytes(4096, 22);
  Bytes first(8192), second(8192), longer(12288);
  std::copy(page.begin(), page.end(), first.begin());
  std::copy(page.begin(), page.end(), second.begin() + 4096);
  std::copy(page.begin(), page.end(), longer.begin());
  Bytes one_byte = first;
  one_byte[8191] = std::byte{1};
  const uint64_t a = chunk_hash(HashForm::pages, first);
  EXPECT_NE(a, chunk_hash(HashForm::pages, second));
  EXPECT_NE(a, chunk_hash(HashForm::pages, longer));
  EXPECT_NE(a, chunk_hash(HashForm::pages, page));
  EXPECT_NE(a, chunk_hash(HashForm::pages, one_byte));
  EXPECT_NE(a, chunk_hash(HashForm::raw, first));
}

// Every codec, with and without paging, gathered sparse forms, and chunks with no zero page: the encoder
// reports the chunk's hash in the form asked for, and the decoder and verify_sparse accept it in that form
// only.
TEST(PageHash, EncodersReportItAndDecodersCheckIt) {
  Bytes holes = text_bytes(9 * 4096 + 17, 23);
  std::memset(holes.data() + 4096, 0, 3 * 4096);
  const Bytes full = text_bytes(64 << 10, 24);
  Bytes scratch(paged_scratch_bytes(holes.size()));
  Hasher64 hasher;
  for (const Bytes* raw : {static_cast<const Bytes*>(&holes), &full}) {
    for (const Codec codec : {Codec::none, Codec::lz4, Codec::zstd, Codec::sparse}) {
      for (const bool paged : {false, true}) {
        SCOPED_TRACE(std::string(codec_name(codec)) + (paged ? " paged " : " ") + std::to_string(raw->size()));
        EncodeOptions opts{.codec = codec, .probe_incompressible = false, .sparse_fallback = true,
                           .paged = paged, .hash = HashForm::pages};
        Bytes out(encode_bound(Codec::sparse, raw->size()) + encode_bound(codec, raw->size()));
        const EncodeResult r = encode_chunk(opts, *raw, out, scratch);
        EXPECT_EQ(r.hash, chunk_hash(HashForm::pages, *raw));
        const std::span<const std::byte> enc =
            r.codec == Codec::none ? std::span<const std::byte>(*raw) : std::span(out.data(), r.encoded_len);
        Bytes back(raw->size());
        EXPECT_EQ(decode_chunk(r.codec, false, enc, back, r.hash, r.paged_len, HashForm::pages), DecodeError::ok);
        EXPECT_EQ(back, *raw);
        EXPECT_EQ(decode_chunk(r.codec, false, enc, back, r.hash, r.paged_len, HashForm::raw),
                  DecodeError::hash_mismatch);
        if (r.codec == Codec::sparse) {
          EXPECT_EQ(verify_sparse(enc, raw->size(), r.hash, hasher, HashForm::pages), DecodeError::ok);
          EXPECT_EQ(verify_sparse(enc, raw->size(), r.hash, hasher, HashForm::raw), DecodeError::hash_mismatch);
          EXPECT_EQ(verify_sparse(enc, raw->size(), r.hash ^ 1, hasher, HashForm::pages),
                    DecodeError::hash_mismatch);
        }
        opts.sparse_gather = true;  // the bitmap alone written, the same hash
        EXPECT_EQ(encode_chunk(opts, *raw, out, scratch).hash, r.hash);
      }
    }
  }
}

// A sparse form that moves a page (lengths still add up) fails the hash; one that marks an all-zero page
// present stands for the same bytes but is not the chunk's form, so pages calls it corrupt (raw, which
// hashes the bytes, accepts it).
TEST(PageHash, AMovedPageOrAZeroPageMarkedPresentIsRejected) {
  Bytes raw = random_bytes(2 * 4096, 25);
  std::memset(raw.data() + 4096, 0, 4096);
  const uint64_t pages = chunk_hash(HashForm::pages, raw);
  Hasher64 hasher;
  Bytes moved(1 + 4096);
  moved[0] = std::byte{0b10};
  std::copy(raw.begin(), raw.begin() + 4096, moved.begin() + 1);
  Bytes back(raw.size());
  EXPECT_EQ(verify_sparse(moved, raw.size(), pages, hasher, HashForm::pages), DecodeError::hash_mismatch);
  EXPECT_EQ(decode_chunk(Codec::sparse, false, moved, back, pages, 0, HashForm::pages), DecodeError::hash_mismatch);
  Bytes marked(1 + raw.size());
  marked[0] = std::byte{0b11};
  std::copy(raw.begin(), raw.end(), marked.begin() + 1);
  EXPECT_EQ(verify_sparse(marked, raw.size(), pages, hasher, HashForm::pages), DecodeError::corrupt);
  EXPECT_EQ(decode_chunk(Codec::sparse, false, marked, back, pages, 0, HashForm::pages), DecodeError::corrupt);
  const uint64_t bytes = chunk_hash(HashForm::raw, raw);
  EXPECT_EQ(verify_sparse(marked, raw.size(), bytes, hasher, HashForm::raw), DecodeError::ok);
  EXPECT_EQ(decode_chunk(Codec::sparse, false, marked, back, bytes, 0, HashForm::raw), DecodeError::ok);
  EXPECT_EQ(back, raw);
}

}  // namespace
}  // namespace dstx::compress
