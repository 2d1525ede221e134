#include "io/vfio/emu_state.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstring>

namespace dstx::io::vfio {
namespace {

constexpr uint32_t kMagic = 0x4D455344;  // bytes "DSEM"
constexpr uint16_t kKindStream = 1;
constexpr uint16_t kKindPages = 2;
constexpr uint16_t kKindTrailer = 3;
constexpr uint16_t kFormatVersion = 1;
// Stream bytes per page, for estimates: the page, its version, its share of a record header.
constexpr uint64_t kWirePerPage = kEmuPageBytes + 4 + kEmuRecordHeaderBytes / kEmuRecordPagesMax;

void put_le(std::byte* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = std::byte(v >> (8 * i));
}
uint64_t get_le(const std::byte* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

uint64_t version_seed(uint64_t seed, uint32_t version) {
  return version == 0 ? seed : seed ^ (uint64_t(version) * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull);
}

}  // namespace

struct EmuState::PageHasher {
  XXH3_state_t state;
};

std::string StateDigest::hex() const {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(high),
                static_cast<unsigned long long>(low));
  return buf;
}

EmuState::EmuState(const EmuStateConfig& c)
    : size_(c.size),
      profile_(c.profile),
      seed_(c.seed),
      dirty_rate_(c.dirty_bytes_per_sec),
      versions_((c.size + kEmuPageBytes - 1) / kEmuPageBytes, 0),
      hashes_(versions_.size(), 0),
      hash_known_(versions_.size(), 0),
      last_advance_(Clock::now()),
      rng_(c.seed * 0x2545F4914F6CDD1Dull + 1),
      hasher_(std::make_unique<PageHasher>()) {}

EmuState::~EmuState() = default;

uint32_t EmuState::page_len(uint64_t page) const {
  const uint64_t start = page * kEmuPageBytes;
  return uint32_t(std::min<uint64_t>(kEmuPageBytes, size_ - start));
}

void EmuState::fill(uint64_t page, uint32_t version, uint32_t from, std::span<std::byte> out) const {
  if (version == kZeroVersion) {
    std::memset(out.data(), 0, out.size());
    return;
  }
  ContentGenerator(profile_, version_seed(seed_, version)).fill(page * kEmuPageBytes + from, out);
}

void EmuState::set_running(bool running, Clock::time_point now) {
  advance(now);
  running_ = running;
  last_advance_ = now;
}

void EmuState::advance(Clock::time_point now) {
  if (!running_ || dirty_rate_ == 0 || pages() == 0 || now <= last_advance_) {
    last_advance_ = std::max(last_advance_, now);
    return;
  }
  const double seconds = std::chrono::duration<double>(now - last_advance_).count();
  last_advance_ = now;
  double due = dirty_carry_ + seconds * double(dirty_rate_) / kEmuPageBytes;
  // A long pause between calls dirties at most every page twice over: more changes nothing observable.
  due = std::min(due, double(2 * pages()));
  const uint64_t count = uint64_t(due);
  dirty_carry_ = due - double(count);
  for (uint64_t i = 0; i < count; ++i) {
    rng_ ^= rng_ << 13;
    rng_ ^= rng_ >> 7;
    rng_ ^= rng_ << 17;
    dirty_page(rng_ % pages());
  }
}

void EmuState::dirty_page(uint64_t page) {
  uint32_t& v = versions_[page];
  v = (v == kZeroVersion || v + 1 == kZeroVersion) ? 1 : v + 1;
  hash_known_[page] = 0;
  if (save_.active && !save_.need[page]) {
    save_.need[page] = 1;
    ++save_.need_count;
  }
}

StateDigest EmuState::digest() {
  std::vector<std::byte> buf(kEmuPageBytes);
  for (uint64_t p = 0; p < pages(); ++p) {
    if (hash_known_[p]) continue;
    const std::span<std::byte> page(buf.data(), page_len(p));
    fill(p, versions_[p], 0, page);
    hashes_[p] = XXH3_64bits(page.data(), page.size());
    hash_known_[p] = 1;
  }
  static_assert(std::endian::native == std::endian::little, "page hashes are digested as little-endian u64s");
  const XXH128_hash_t h = XXH3_128bits(hashes_.data(), hashes_.size() * sizeof(uint64_t));
  return StateDigest{h.high64, h.low64};
}

void EmuState::reset_to_zero() {
  std::vector<std::byte> zeros(kEmuPageBytes);
  const uint64_t zero_hash = XXH3_64bits(zeros.data(), zeros.size());
  std::fill(versions_.begin(), versions_.end(), kZeroVersion);
  for (uint64_t p = 0; p < pages(); ++p) {
    hashes_[p] = page_len(p) == kEmuPageBytes ? zero_hash : XXH3_64bits(zeros.data(), page_len(p));
    hash_known_[p] = 1;
  }
  save_end();
  load_ = Load{};
}

// ---------------------------------------------------------------- saving

void EmuState::save_begin(Mode mode) {
  save_ = Save{};
  save_.active = true;
  save_.mode = mode;
  save_.need.assign(pages(), 1);
  save_.need_count = pages();
  save_.sent.assign(pages(), 0);
  save_.unsent_count = pages();
  save_.rec_versions.reserve(kEmuRecordPagesMax);
}

void EmuState::save_end() {
  save_ = Save{};
}

void EmuState::save_set_mode(Mode mode) {
  if (save_.mode == mode) return;
  save_.mode = mode;
  save_.cursor = 0;
  save_.pass_done = false;
}

void EmuState::save_next_pass() {
  if (save_.mode != Mode::precopy) return;
  save_.cursor = 0;
  save_.pass_done = false;
  ++save_.pass;
}

void EmuState::stage_header(uint16_t kind, uint16_t flags, uint64_t a, uint64_t b, uint32_t c) {
  save_.stage.assign(kEmuRecordHeaderBytes, std::byte{0});
  std::byte* h = save_.stage.data();
  put_le(h, kMagic, 4);
  put_le(h + 4, kind, 2);
  put_le(h + 6, flags, 2);
  put_le(h + 8, a, 8);
  put_le(h + 16, b, 8);
  put_le(h + 24, c, 4);
  put_le(h + 28, XXH32(h, 28, 0), 4);
  save_.stage_pos = 0;
}

bool EmuState::start_record() {
  Save& s = save_;
  if (!s.header_done) {
    stage_header(kKindStream, kFormatVersion, size_, seed_, uint32_t(profile_));
    s.header_done = true;
    return true;
  }
  if (s.eof || (s.mode == Mode::precopy && s.pass_done)) return false;
  uint64_t p = s.cursor;
  while (p < pages() && !s.need[p]) ++p;
  if (p == pages()) {
    if (s.mode == Mode::precopy) {
      s.pass_done = true;
      s.cursor = pages();
      return false;
    }
    if (s.need_count > 0) {  // pages behind the cursor, dirtied before the device stopped
      s.cursor = 0;
      return true;
    }
    if (!s.trailer_done) {
      const StateDigest d = digest();
      stage_header(kKindTrailer, 0, pages(), 0, 0);
      s.stage.resize(kEmuTrailerBytes);
      put_le(s.stage.data() + kEmuRecordHeaderBytes, d.high, 8);
      put_le(s.stage.data() + kEmuRecordHeaderBytes + 8, d.low, 8);
      s.trailer_done = true;
      return true;
    }
    s.eof = true;
    return false;
  }
  uint32_t count = 1;
  while (count < kEmuRecordPagesMax && p + count < pages() && s.need[p + count]) ++count;
  s.rec_versions.clear();
  for (uint32_t i = 0; i < count; ++i) {
    s.need[p + i] = 0;
    --s.need_count;
    if (!s.sent[p + i]) {
      s.sent[p + i] = 1;
      --s.unsent_count;
    }
    s.rec_versions.push_back(versions_[p + i]);
  }
  stage_header(kKindPages, 0, p, count, 0);
  s.stage.resize(kEmuRecordHeaderBytes + 4 * size_t(count));
  for (uint32_t i = 0; i < count; ++i)
    put_le(s.stage.data() + kEmuRecordHeaderBytes + 4 * i, s.rec_versions[i], 4);
  s.rec_first = p;
  s.rec_count = count;
  s.rec_index = 0;
  s.page_pos = 0;
  s.cursor = p + count;
  return true;
}

size_t EmuState::save_produce(std::span<std::byte> out) {
  Save& s = save_;
  if (!s.active) return 0;
  size_t n = 0;
  while (n < out.size()) {
    if (s.stage_pos < s.stage.size()) {
      const size_t take = std::min(out.size() - n, s.stage.size() - s.stage_pos);
      std::memcpy(out.data() + n, s.stage.data() + s.stage_pos, take);
      s.stage_pos += take;
      n += take;
      continue;
    }
    if (s.rec_index < s.rec_count) {
      const uint64_t page = s.rec_first + s.rec_index;
      const uint32_t len = page_len(page);
      const size_t take = std::min<size_t>(out.size() - n, len - s.page_pos);
      if (s.page_pos == 0) XXH3_64bits_reset(&hasher_->state);
      const std::span<std::byte> piece = out.subspan(n, take);
      fill(page, s.rec_versions[s.rec_index], s.page_pos, piece);
      XXH3_64bits_update(&hasher_->state, piece.data(), piece.size());
      s.page_pos += uint32_t(take);
      n += take;
      if (s.page_pos == len) {
        // A page dirtied while it was being produced goes out again later; its hash is not final yet.
        if (versions_[page] == s.rec_versions[s.rec_index]) {
          hashes_[page] = XXH3_64bits_digest(&hasher_->state);
          hash_known_[page] = 1;
        }
        s.page_pos = 0;
        ++s.rec_index;
      }
      continue;
    }
    if (!start_record()) break;
  }
  s.produced += n;
  return n;
}

uint64_t EmuState::save_initial_bytes() const {
  return save_.active ? save_.unsent_count * kWirePerPage : 0;
}

uint64_t EmuState::save_dirty_bytes() const {
  return save_.active ? (save_.need_count - save_.unsent_count) * kWirePerPage : 0;
}

uint64_t EmuState::save_remaining_bytes() const {
  const Save& s = save_;
  if (!s.active) return full_stream_bytes();
  if (s.eof) return 0;
  uint64_t left = save_in_progress_bytes() + s.need_count * kWirePerPage;
  if (!s.header_done) left += kEmuRecordHeaderBytes;
  if (!s.trailer_done) left += kEmuTrailerBytes;
  return std::max<uint64_t>(left, 1);
}

uint64_t EmuState::save_pending_now() const {
  const Save& s = save_;
  if (!s.active) return 0;
  if (s.mode == Mode::stopcopy) return save_remaining_bytes();
  uint64_t left = save_in_progress_bytes() + s.need_count * kWirePerPage;
  if (!s.header_done) left += kEmuRecordHeaderBytes;
  return left;
}

uint64_t EmuState::save_in_progress_bytes() const {
  const Save& s = save_;
  if (!s.active) return 0;
  uint64_t left = s.stage.size() - s.stage_pos;
  if (s.rec_index < s.rec_count) left += uint64_t(s.rec_count - s.rec_index) * kEmuPageBytes - s.page_pos;
  return left;
}

uint64_t EmuState::full_stream_bytes() const {
  return kEmuRecordHeaderBytes + pages() * kWirePerPage + kEmuTrailerBytes;
}

// ---------------------------------------------------------------- loading

void EmuState::load_begin() {
  load_ = Load{};
  load_.active = true;
  load_.loaded.assign(pages(), 0);
}

void EmuState::load_abort() {
  load_ = Load{};
}

bool EmuState::load_fail(std::string why) {
  if (load_.error.empty()) load_.error = std::move(why);
  return false;
}

bool EmuState::load_record_header() {
  Load& l = load_;
  const std::byte* h = l.header;
  l.header_fill = 0;
  if (get_le(h, 4) != kMagic)
    return load_fail("bad record magic at stream byte " + std::to_string(l.consumed));
  if (get_le(h + 28, 4) != XXH32(h, 28, 0)) return load_fail("record header check failed");
  const uint16_t kind = uint16_t(get_le(h + 4, 2));
  const uint64_t a = get_le(h + 8, 8);
  const uint64_t b = get_le(h + 16, 8);
  const uint32_t c = uint32_t(get_le(h + 24, 4));
  if (kind == kKindStream) {
    if (l.stream_header_seen) return load_fail("a second stream header");
    if (get_le(h + 6, 2) != kFormatVersion)
      return load_fail("unknown state format " + std::to_string(get_le(h + 6, 2)));
    if (a != size_) {
      return load_fail("state of " + std::to_string(a) + " bytes does not fit this device's " +
                       std::to_string(size_) + " bytes");
    }
    if (c > uint32_t(Profile::mixed)) return load_fail("unknown content profile " + std::to_string(c));
    profile_ = Profile(c);
    seed_ = b;
    l.stream_header_seen = true;
    return true;
  }
  if (!l.stream_header_seen) return load_fail("state does not start with a stream header");
  if (kind == kKindPages) {
    if (b == 0 || b > kEmuRecordPagesMax || a >= pages() || b > pages() - a) {
      return load_fail("pages record out of range (first " + std::to_string(a) + ", count " +
                       std::to_string(b) + ")");
    }
    l.first = a;
    l.count = uint32_t(b);
    l.versions_buf.assign(4 * size_t(b), std::byte{0});
    l.versions_fill = 0;
    l.part = Load::Part::versions;
    return true;
  }
  if (kind == kKindTrailer) {
    if (a != pages())
      return load_fail("trailer counts " + std::to_string(a) + " pages, device has " +
                       std::to_string(pages()));
    l.digest_fill = 0;
    l.part = Load::Part::digest;
    return true;
  }
  return load_fail("unknown record kind " + std::to_string(kind));
}

bool EmuState::load_consume(std::span<const std::byte> data) {
  Load& l = load_;
  if (!l.active) return load_fail("not resuming");
  if (!l.error.empty()) return false;
  while (!data.empty()) {
    switch (l.part) {
      case Load::Part::header: {
        const size_t take = std::min<size_t>(data.size(), kEmuRecordHeaderBytes - l.header_fill);
        std::memcpy(l.header + l.header_fill, data.data(), take);
        l.header_fill += uint32_t(take);
        l.consumed += take;
        data = data.subspan(take);
        if (l.header_fill == kEmuRecordHeaderBytes && !load_record_header()) return false;
        break;
      }
      case Load::Part::versions: {
        const size_t take = std::min<size_t>(data.size(), l.versions_buf.size() - l.versions_fill);
        std::memcpy(l.versions_buf.data() + l.versions_fill, data.data(), take);
        l.versions_fill += uint32_t(take);
        l.consumed += take;
        data = data.subspan(take);
        if (l.versions_fill == l.versions_buf.size()) {
          l.index = 0;
          l.page_pos = 0;
          l.part = Load::Part::pages;
        }
        break;
      }
      case Load::Part::pages: {
        const uint64_t page = l.first + l.index;
        const uint32_t len = page_len(page);
        const size_t take = std::min<size_t>(data.size(), len - l.page_pos);
        if (l.page_pos == 0) XXH3_64bits_reset(&hasher_->state);
        XXH3_64bits_update(&hasher_->state, data.data(), take);
        l.page_pos += uint32_t(take);
        l.consumed += take;
        data = data.subspan(take);
        if (l.page_pos == len) {
          uint32_t v = uint32_t(get_le(l.versions_buf.data() + 4 * size_t(l.index), 4));
          versions_[page] = v;
          hashes_[page] = XXH3_64bits_digest(&hasher_->state);
          hash_known_[page] = 1;
          if (!l.loaded[page]) {
            l.loaded[page] = 1;
            ++l.loaded_count;
          }
          l.page_pos = 0;
          if (++l.index == l.count) l.part = Load::Part::header;
        }
        break;
      }
      case Load::Part::digest: {
        const size_t take = std::min<size_t>(data.size(), 16 - l.digest_fill);
        std::memcpy(l.digest_buf + l.digest_fill, data.data(), take);
        l.digest_fill += uint32_t(take);
        l.consumed += take;
        data = data.subspan(take);
        if (l.digest_fill == 16) {
          l.trailer = StateDigest{get_le(l.digest_buf, 8), get_le(l.digest_buf + 8, 8)};
          l.part = Load::Part::done;
        }
        break;
      }
      case Load::Part::done:
        return load_fail("bytes after the state's trailer");
    }
  }
  return true;
}

std::string EmuState::load_finish() {
  Load& l = load_;
  if (!l.error.empty()) return l.error;
  if (!l.stream_header_seen) return "no state loaded (empty or truncated stream)";
  if (l.part != Load::Part::done) {
    return l.part == Load::Part::header && l.header_fill == 0
               ? "state has no trailer (truncated stream)"
               : "state ends inside a record (truncated stream)";
  }
  if (l.loaded_count != pages()) {
    return std::to_string(pages() - l.loaded_count) + " of " + std::to_string(pages()) +
           " pages never arrived";
  }
  const StateDigest d = digest();
  if (!(d == l.trailer))
    return "state digest mismatch: loaded " + d.hex() + ", the stream says " + l.trailer.hex();
  l.active = false;
  return {};
}

}  // namespace dstx::io::vfio
