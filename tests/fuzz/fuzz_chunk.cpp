// Fuzz target: the chunk decoder, compress::decode_chunk, for every codec (and invalid codec numbers) with an
// arbitrary raw length, payload and expected hash.
//
// Input: codec (1 byte; values 4..7 are invalid codecs), flags (1 byte), raw_len (u32), expected hash (u64),
// then the payload (the rest).
//   flag bit 0: zero chunk        bit 1: repair the hash (decode, hash what came out, decode again)
//   bit 2: codec none decodes in place (enc aliases raw_out)   bit 3: raw_len up to 16 MiB + 64 (else < 128
//   KiB)   bit 4: a paged payload (its sparse form's length taken from the hash's low bits, below raw_len)
//   bit 5: the hash in compress::HashForm::pages (else raw)
//
// Checks: nothing is written outside raw_out (ASan when present; else guard bytes around it); ok implies the
// bytes hash to the expected hash in the form asked for (and are zero for a zero chunk); a payload above the
// codec's bound is never accepted; the decoder is deterministic (the repaired second decode gives the same
// bytes and ok).
#include <memory>
#include <vector>

#include "compress/codec.h"
#include "fuzz_support.h"

namespace {

using namespace dstx;
using compress::DecodeError;

#ifndef DSTX_FUZZ_ASAN
constexpr size_t kGuardBytes = 64;
constexpr std::byte kGuard{0xa5};
#endif

// raw_out of exactly raw_len bytes. Under ASan it is its own allocation, so any stray write is reported at
// the faulting instruction; otherwise guard bytes on both sides are checked after the call.
class OutBuffer {
 public:
  explicit OutBuffer(size_t len) : len_(len) {
#ifdef DSTX_FUZZ_ASAN
    exact_.reset(new std::byte[len ? len : 1]);  // uninitialised, like a window slot
#else
    guarded_.assign(len + 2 * kGuardBytes, kGuard);
#endif
  }
  std::span<std::byte> span() {
#ifdef DSTX_FUZZ_ASAN
    return {exact_.get(), len_};
#else
    return {guarded_.data() + kGuardBytes, len_};
#endif
  }
  bool guards_intact() const {
#ifdef DSTX_FUZZ_ASAN
    return true;
#else
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (guarded_[i] != kGuard || guarded_[kGuardBytes + len_ + i] != kGuard) return false;
    }
    return true;
#endif
  }

 private:
  size_t len_;
  std::unique_ptr<std::byte[]> exact_;
  std::vector<std::byte> guarded_;
};

bool all_zero(std::span<const std::byte> s) {
  for (std::byte b : s) {
    if (b != std::byte{0}) return false;
  }
  return true;
}

DecodeError checked_decode(compress::Codec codec, bool zero, std::span<const std::byte> enc, OutBuffer& out,
                           uint64_t hash, compress::HashForm form, size_t paged_len = 0) {
  const DecodeError err = compress::decode_chunk(codec, zero, enc, out.span(), hash, paged_len, form);
  FUZZ_CHECK(unsigned(err) <= unsigned(DecodeError::hash_mismatch), "unknown DecodeError %u", unsigned(err));
  FUZZ_CHECK(out.guards_intact(), "decode_chunk(codec %u, zero %d, enc %zu, raw %zu) wrote outside raw_out",
             unsigned(codec), zero, enc.size(), out.span().size());
  if (!compress::codec_valid(uint8_t(codec))) {
    FUZZ_CHECK(err == DecodeError::unknown_codec, "codec %u accepted", unsigned(codec));
  }
  if (err == DecodeError::ok) {
    if (zero) {
      FUZZ_CHECK(enc.empty() && hash == 0 && all_zero(out.span()), "a zero chunk decoded to non-zero bytes");
    } else {
      FUZZ_CHECK(compress::chunk_hash(form, out.span()) == hash,
                 "ok, but the bytes do not hash to the expected hash (form %u)", unsigned(form));
      const size_t decoded = paged_len ? paged_len : out.span().size();
      FUZZ_CHECK(enc.size() <= compress::encode_bound(codec, decoded),
                 "accepted %zu payload bytes above the codec %u bound %zu for %zu", enc.size(),
                 unsigned(codec), compress::encode_bound(codec, decoded), decoded);
      FUZZ_CHECK(!paged_len || codec == compress::Codec::lz4 || codec == compress::Codec::zstd,
                 "a paged payload of codec %u accepted", unsigned(codec));
    }
  }
  return err;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Reader in(data, size);
  const auto codec = compress::Codec(in.u8() & 7);
  const uint8_t flags = in.u8();
  const uint32_t raw_word = in.u32();
  const uint64_t hash = in.u64();
  // The payload is the tail of the fuzzer's own buffer, so a read past its end is caught under ASan too.
  const auto payload = in.rest();
  const std::span<const std::byte> enc(reinterpret_cast<const std::byte*>(payload.data()), payload.size());

  const bool zero = flags & 1;
  const auto form = (flags & 32) ? compress::HashForm::pages : compress::HashForm::raw;
  const size_t raw_len = (flags & 8) ? raw_word % ((16u << 20) + 65) : raw_word % (128u << 10);

  if ((flags & 4) && codec == compress::Codec::none && !zero) {
    // In place: the receiver reads a raw chunk straight into its window slot and decodes it there.
    OutBuffer out(enc.size());
    if (!enc.empty()) std::memcpy(out.span().data(), enc.data(), enc.size());
    const DecodeError err = checked_decode(codec, false, out.span(), out, hash, form);
    if (err == DecodeError::ok) {
      FUZZ_CHECK(std::memcmp(out.span().data(), enc.data(), enc.size()) == 0,
                 "in-place decode changed bytes");
    }
    return 0;
  }

  if (flags & 16) {
    const size_t paged_len = raw_len > 1 ? 1 + (hash & 0xffffff) % (raw_len - 1) : 1;
    OutBuffer out(raw_len);
    checked_decode(codec, zero, enc, out, hash, form, paged_len);
    return 0;
  }

  OutBuffer out(raw_len);
  const DecodeError err = checked_decode(codec, zero, enc, out, hash, form);
  if ((flags & 2) && err == DecodeError::hash_mismatch && !zero) {
    // The payload decoded; with the right hash it must be accepted, with the same bytes.
    const uint64_t right = compress::chunk_hash(form, out.span());
    OutBuffer second(raw_len);
    const DecodeError err2 = checked_decode(codec, zero, enc, second, right, form);
    FUZZ_CHECK(err2 == DecodeError::ok, "decoded once, then %s", compress::decode_error_text(err2));
    FUZZ_CHECK(std::memcmp(second.span().data(), out.span().data(), raw_len) == 0,
               "decode is not deterministic");
  }
  return 0;
}
