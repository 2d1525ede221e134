// The state of an emulated VFIO device and its migration stream, shared by the emulated v1 and v2 drivers.
//
// State: `size` bytes in 4 KiB pages. Each page has a version; its bytes are io::ContentGenerator output for
// (profile, seed mixed with the version) at the page's offset, or all zero after a reset. A running device
// with dirty=RATE bumps the versions of pseudo-random pages at RATE bytes per second. Nothing of the state is
// stored but versions and per-page XXH3-64 hashes, so a 1 GiB device costs a few MiB.
//
// The state digest is XXH3-128 over the little-endian XXH3-64 of every page in order: a two-level hash of the
// full state, the same on both sides after a good migration.
//
// Save stream: records with a 32-byte header (magic "DSEM", kind, flags, a, b, c, XXH32 of the first 28
// bytes), all little-endian:
//   kind 1 stream header: flags = format version 1, a = state size, b = seed, c = profile
//   kind 2 pages:         a = first page, b = page count (<= 256); then b u32 versions; then the pages' bytes
//   kind 3 trailer:       a = page count; then the 16-byte state digest (high u64, low u64)
// Pre-copy passes send every page not yet sent or dirtied since it was sent; stop-copy sends what is left
// and the trailer. The loader hashes what it receives and checks the trailer's digest when told to finish.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "io/content.h"

namespace dstx::io::vfio {

inline constexpr uint32_t kEmuPageBytes = 4096;
inline constexpr uint32_t kEmuRecordHeaderBytes = 32;
inline constexpr uint32_t kEmuRecordPagesMax = 256;
inline constexpr uint32_t kEmuTrailerBytes = kEmuRecordHeaderBytes + 16;

struct StateDigest {
  uint64_t high = 0;
  uint64_t low = 0;
  bool operator==(const StateDigest&) const = default;
  std::string hex() const;  // 32 lower-case hex digits, high part first (as xxhsum prints XXH3-128)
};

struct EmuStateConfig {
  uint64_t size = 64ull << 20;
  Profile profile = Profile::mixed;
  uint64_t seed = 1;
  uint64_t dirty_bytes_per_sec = 0;
};

// Not thread-safe: the owning driver serialises access.
class EmuState {
 public:
  using Clock = std::chrono::steady_clock;
  explicit EmuState(const EmuStateConfig& config);
  ~EmuState();
  EmuState(const EmuState&) = delete;
  EmuState& operator=(const EmuState&) = delete;

  uint64_t size() const { return size_; }
  uint64_t pages() const { return versions_.size(); }
  uint32_t page_len(uint64_t page) const;

  // The device runs (dirties) or not; time only counts while running.
  void set_running(bool running, Clock::time_point now);
  bool running() const { return running_; }
  // Applies the dirtying due up to `now` (no-op when stopped or dirty rate 0).
  void advance(Clock::time_point now);

  StateDigest digest();  // of the current state; hashes pages whose hash is not known yet
  void reset_to_zero();  // VFIO_DEVICE_RESET: a fresh device holds zeros

  // ---- Saving. Only one session at a time.
  enum class Mode : uint8_t { precopy, stopcopy };
  void save_begin(Mode mode);
  void save_end();
  bool saving() const { return save_.active; }
  void save_set_mode(Mode mode);  // precopy -> stopcopy
  Mode save_mode() const { return save_.mode; }
  // Writes the next stream bytes into `out`. Returns how many; fewer than asked means: precopy, the current
  // pass is complete (0 once nothing more); stopcopy, the stream is complete.
  size_t save_produce(std::span<std::byte> out);
  void save_next_pass();  // precopy: start a new pass over dirtied pages
  bool save_pass_done() const { return save_.pass_done; }
  bool save_eof() const { return save_.eof; }
  bool save_has_dirty() const { return save_.need_count > 0; }
  unsigned save_pass() const { return save_.pass; }
  uint64_t save_produced() const { return save_.produced; }
  // Estimates in stream bytes (what is still to be produced in this session).
  uint64_t save_initial_bytes() const;    // pages never sent in this session
  uint64_t save_dirty_bytes() const;      // pages sent and dirtied since
  uint64_t save_remaining_bytes() const;  // all of it, trailer included; 0 exactly when stop-copy is complete
  // The record being produced: its pages count neither as initial nor as dirty any more, but are not out yet.
  uint64_t save_in_progress_bytes() const;
  // What producing now would yield without further dirtying: precopy, 0 exactly when no page needs sending
  // (the v1 pending_bytes); stopcopy, save_remaining_bytes().
  uint64_t save_pending_now() const;
  uint64_t full_stream_bytes() const;  // a whole stream of the current state

  // ---- Loading.
  void load_begin();
  void load_abort();  // the session ended without finishing: what arrived stays, nothing is checked
  // Feeds stream bytes. Returns false (and remembers why) on a malformed stream.
  bool load_consume(std::span<const std::byte> data);
  // Final consistency check of what was loaded. Returns "" when the state is complete and matches the
  // trailer's digest; otherwise why not.
  std::string load_finish();
  const std::string& load_error() const { return load_.error; }
  bool loading() const { return load_.active; }
  uint64_t load_consumed() const { return load_.consumed; }

 private:
  static constexpr uint32_t kZeroVersion = UINT32_MAX;
  void fill(uint64_t page, uint32_t version, uint32_t from, std::span<std::byte> out) const;
  void dirty_page(uint64_t page);
  void stage_header(uint16_t kind, uint16_t flags, uint64_t a, uint64_t b, uint32_t c);
  bool start_record();
  bool load_record_header();
  bool load_fail(std::string why);

  uint64_t size_;
  Profile profile_;
  uint64_t seed_;
  uint64_t dirty_rate_;
  std::vector<uint32_t> versions_;
  std::vector<uint64_t> hashes_;
  std::vector<uint8_t> hash_known_;
  bool running_ = true;
  Clock::time_point last_advance_;
  double dirty_carry_ = 0;
  uint64_t rng_;

  struct Save {
    bool active = false;
    Mode mode = Mode::precopy;
    std::vector<uint8_t> need;  // page must be (re)sent
    uint64_t need_count = 0;
    std::vector<uint8_t> sent;  // page sent at least once in this session
    uint64_t unsent_count = 0;
    uint64_t cursor = 0;
    unsigned pass = 0;
    bool pass_done = false;
    bool header_done = false;
    bool trailer_done = false;
    bool eof = false;
    std::vector<std::byte> stage;  // record header (+ versions) not yet produced
    size_t stage_pos = 0;
    uint64_t rec_first = 0;
    uint32_t rec_count = 0;
    uint32_t rec_index = 0;  // page within the record being produced
    uint32_t page_pos = 0;
    std::vector<uint32_t> rec_versions;
    uint64_t produced = 0;
  } save_;

  struct Load {
    bool active = false;
    std::string error;
    uint64_t consumed = 0;
    std::byte header[kEmuRecordHeaderBytes];
    uint32_t header_fill = 0;
    enum class Part : uint8_t { header, versions, pages, digest, done } part = Part::header;
    bool stream_header_seen = false;
    uint64_t first = 0;
    uint32_t count = 0;
    std::vector<std::byte> versions_buf;
    uint32_t versions_fill = 0;
    uint32_t index = 0;
    uint32_t page_pos = 0;
    std::byte digest_buf[16];
    uint32_t digest_fill = 0;
    StateDigest trailer;
    std::vector<uint8_t> loaded;
    uint64_t loaded_count = 0;
  } load_;

  struct PageHasher;  // streaming XXH3-64 of one page, shared by saving and loading (never both at once)
  std::unique_ptr<PageHasher> hasher_;
};

}  // namespace dstx::io::vfio
