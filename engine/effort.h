// The --codec auto controller: how much compression effort the sender spends, from what it measures.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include <sched.h>

namespace dstx::engine {

// Cumulative idle seconds of a set of CPUs. cpuidle's per-state residency counters are exact (microseconds) but
// count a sleep only when it ends: a CPU asleep all along would look busy. So a CPU that entered idle states
// since the last reading counts by cpuidle, one that did not (asleep or busy all along) by /proc/stat, which
// counts a sleep in progress, in 10 ms ticks. Without cpuidle (or for too many CPUs to read each period),
// /proc/stat alone. root: prepended to /proc and /sys (tests).
class IdleMeter {
 public:
  static constexpr size_t kMaxFiles = 128;  // cpuidle files read per reading at most (else /proc/stat alone)

  explicit IdleMeter(const cpu_set_t& set, std::string root = "");
  bool precise() const { return precise_; }  // cpuidle's counters are read
  double operator()();                        // < 0 when /proc/stat cannot be read or lacks a CPU

 private:
  struct Cpu {
    unsigned id = 0;
    std::vector<std::string> time_files, usage_files;
    double last_stat = -1;
    int64_t last_us = -1, last_entries = -1;
  };
  std::string root_;
  std::vector<Cpu> cpus_;
  std::vector<double> stat_;
  bool precise_ = true;
  double total_ = 0;
};

// Which chunks take the rung above when the effort sends a share of them there. Between raw and lz4, the
// most compressible ones: those whose estimate_ratio() is among the lowest `share` of the recent chunks'.
// They save the most wire bytes per CPU second (on binary state 1.4x what a share picked at random saves,
// see compress::estimate_ratio), so a CPU that can compress only part of the state compresses the part
// that pays. A credit (the share per chunk, less one per chunk sent up) keeps the share: it moves the
// quantile when the data drifts, settles ties, and holds runs of compressible (or incompressible) chunks to
// kCreditLimit chunks ahead of (or behind) the share: the buffers between CPU and link hold a few chunks
// only, and a longer run leaves one of them idle (at 10 Gbit/s, binary: 4 chunks cost 2 % against 1-2).
// Above lz4 there are no estimates and the credit alone spreads the share evenly. One per worker: not
// thread-safe.
class ShareSelector {
 public:
  static constexpr size_t kHistory = 64;      // estimates remembered
  static constexpr size_t kMinHistory = 8;    // with fewer, the share is spread evenly
  static constexpr double kCreditLimit = 2;   // chunks sent up ahead of or behind the share at most
  static constexpr double kCreditGain = 0.05; // quantile moved per chunk of credit

  // The highest estimate that takes the rung above, for `share` in [0, 1]: < 0 when no chunk may,
  // +infinity when every chunk may.
  double limit(double share) const;
  // Without estimates: whether the next chunk takes the rung above.
  bool evenly(double share) const { return share >= 1 || (share > 0 && credit_ + share >= 1); }
  // A non-zero chunk's outcome: its estimate (< 0 when none was made) and whether it took the rung above.
  void record(double share, double estimate, bool up);

 private:
  std::array<double, kHistory> history_{};
  size_t count_ = 0;
  size_t next_ = 0;
  double credit_ = 0;
};

// What `dstx tune` measured on this link and machine beforehand, in logical bytes/s (0: unknown): the rate
// raw transfers reached (or --bandwidth's cap, if lower or the only one known), and lz4's single-core encode
// speed on the data it encodes fastest. A link faster than lz4 on every worker (raw_rate > lz4_rate x
// streams) opens on raw, as when lz4's warm-up showed the CPU setting the pace: lz4 gets a period only if raw
// then waits on the link with CPU idle (see EffortController's opening), and its encode cost counts as
// 1 / lz4_rate until it is measured. In lz4's warm-up a slower link's rate stands in for TCP's path rate
// where that is higher (EffortController::raw_link_rate).
struct EffortPrior {
  double raw_rate = 0;
  double lz4_rate = 0;
  bool opens_raw(size_t streams) const {
    return lz4_rate > 0 && raw_rate > lz4_rate * double(std::max<size_t>(streams, 1));
  }
  // Under --bandwidth's cap (bytes/s, 0: none) raw goes no faster than the cap.
  EffortPrior capped(double cap) const {
    EffortPrior p = *this;
    if (cap > 0) p.raw_rate = raw_rate > 0 ? std::min(raw_rate, cap) : cap;
    return p;
  }
};

// --codec auto walks a ladder of encodings, cheapest first: raw (zero pages dropped), lz4, zstd, and zstd one
// and two levels higher (at most level 19). The effort in [0, top] says where the sender stands: its integer
// part picks the lower rung, its fraction the share of chunks that take the rung above. Which effort is best
// depends on the link, the data and the CPU left over (on loopback the "link" is the CPU itself), so no
// model of them is trusted.
//
// Two measurements steer it, per period of chunks:
// - the logical throughput of non-zero chunks actually delivered (bytes that left the kernel's send queues),
//   per effort level on a grid of quarter steps, smoothed per level and forgotten when old. Zero chunks cost
//   the same on every rung and next to nothing; their share varies along the state and would swamp the
//   difference between levels;
// - the share of time the workers waited on their sockets while holding a frame ready to go ("link
//   wait"). Much of it means the link sets the pace and spare CPU could shrink the frames; little means the
//   CPU (or the source) sets it and more effort can only slow things down.
// The controller moves to a measured neighbour level that delivered clearly more, and tries an unmeasured
// one only in the direction the link wait points to, and upwards only if the CPU left over could pay for the
// step at each rung's measured encode cost. CPU left over: the idle time of the cores this process may use
// (cpuidle's residency counters and /proc/stat), but no more than what the workers left unused of a core
// each (a core no worker runs on is out of their reach); workers waiting on their sockets do not mean spare
// CPU when something else (on one machine, the receiver) keeps the cores busy.
// It opens with one short period on each pure rung, and starts from the fastest:
// - lz4, skipped when its warm-up (its first 2 to 8 chunks) kept the workers busy without waiting on the
//   link and left no CPU idle in their reach, unless TCP measured a path slower than lz4 or the send queues
//   grew (the link did not keep up with lz4), or when dstx tune measured the link faster than lz4
//   (EffortPrior); and given back its period when raw then waits on the link more than a CPU-bound worker
//   does, with CPU idle, at less than half what lz4's encode cost allows (a start-up can look CPU-bound on
//   any link);
// - raw, skipped when lz4 already waited on the link, or TCP's path rate is far below lz4's rate (twice the
//   bytes on the same link can only be slower);
// - zstd, skipped when lz4 lost to raw (a link that outruns lz4 outruns zstd too); where its period waits
//   on the link with CPU idle and it shrank the data more than lz4, the opening ends on it whatever the
//   rates (measured on different data) say.
// Links much faster or much slower than the compressor, the common cases, are settled right there. The
// opening and the warm-up before it run at lz4 (unless an EffortPrior says otherwise) with short periods: on
// a slow link every raw chunk costs a lot of link time, on a fast one every compressed chunk a lot of CPU,
// and lz4 is the cheaper mistake in both.
class EffortController {
 public:
  using Clock = std::chrono::steady_clock;

  // Cumulative idle CPU seconds of the cores this process may run on, or < 0 when unknown.
  using IdleSeconds = std::function<double()>;

  // top: the highest effort (1 = lz4 is the top rung, 4 = the zstd rungs too). streams: workers reporting.
  // idle: where spare CPU is read (empty: cpuidle's residency counters, else /proc/stat, for the cores in
  // this thread's affinity mask).
  EffortController(double top, size_t streams, IdleSeconds idle = {}, EffortPrior prior = {});

  double effort() const { return effort_.load(std::memory_order_relaxed); }
  double top() const { return level_effort(levels_ - 1); }

  // A worker waited this long for its socket (or the --bandwidth pacer) while holding an encoded frame.
  void add_link_wait(Clock::duration d) {
    link_wait_ns_.fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()),
                            std::memory_order_relaxed);
  }

  // A worker used `cpu` of its own CPU time, for anything (reading, encoding, sending), in the `wall` time
  // since its last report; each reports as it goes. What the workers leave unused of their cores bounds the
  // spare CPU they can spend on encoding. The shares are summed as such, so a worker's report need not fall
  // in the period it covers, and a worker that reports nothing in a period counts as busy as the others.
  void add_worker_cpu(Clock::duration cpu, Clock::duration wall) {
    worker_ns_.fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(cpu).count()),
                         std::memory_order_relaxed);
    worker_wall_ns_.fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(wall).count()),
                              std::memory_order_relaxed);
  }

  // A worker spent `cpu` of its own CPU time encoding `bytes` logical bytes of non-zero chunks on `rung`
  // (0 raw, 1 lz4, 2 zstd, 3 zstd+1, 4 zstd+2) into `encoded` bytes; raw would have sent `plain` of them
  // (their non-zero pages).
  void add_encode_cost(int rung, uint64_t bytes, uint64_t plain, uint64_t encoded, Clock::duration cpu) {
    const size_t r = size_t(std::clamp(rung, 0, kRungs - 1));
    encode_bytes_[r].fetch_add(bytes, std::memory_order_relaxed);
    plain_bytes_[r].fetch_add(plain, std::memory_order_relaxed);
    encoded_bytes_[r].fetch_add(encoded, std::memory_order_relaxed);
    encode_ns_[r].fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(cpu).count()),
                            std::memory_order_relaxed);
  }

  // What the sockets say when a period ends.
  struct Sockets {
    uint64_t queued = 0;     // logical bytes of non-zero chunks still in the kernel's send queues
    double path_rate = -1;   // wire bytes/s TCP measured the path to carry (from samples not limited by
                             // the sender), < 0 when unknown
  };

  // Called after each non-zero chunk with the total logical bytes of non-zero chunks handed to the kernel so
  // far and a function that returns Sockets (asked only when a period ends). Only what left the send queues
  // counts as throughput: the queues hold megabytes, and filling or draining them says nothing about the
  // codec (the warm-up asks only whether they filled). Calls that find another thread inside return at once.
  template <typename Probe>
  void observe(Clock::time_point now, uint64_t sent_total, const Probe& probe) {
    std::unique_lock lock(mu_, std::try_to_lock);
    if (!lock.owns_lock()) return;
    if (period_start_ != Clock::time_point{} && !period_over(now)) return;
    const Sockets s = probe();
    path_rate_ = s.path_rate;
    end_period(now, sent_total, sent_total - std::min(sent_total, s.queued));
  }

 private:
  static constexpr int kRungs = 5;
  static constexpr int kLevelsPerRung = 4;
  static constexpr int kMaxLevels = (kRungs - 1) * kLevelsPerRung + 1;
  static double level_effort(int level) { return double(level) / kLevelsPerRung; }

  bool period_over(Clock::time_point now);
  void end_period(Clock::time_point now, uint64_t sent, uint64_t delivered);
  bool cpu_to_spare(double rate) const;
  bool ample_spare(double rate) const;
  double extra_cores(double rate) const;
  double usable_spare() const;
  bool no_spare() const;
  bool lz4_outruns(double rate) const;
  bool lz4_wanted_back(double rate, double link_share) const;
  double cost_per_byte(int rung) const;
  double encoded_ratio(int rung, uint64_t min_bytes) const;
  double raw_link_rate(bool with_prior) const;
  void trace(double rate, double link_share) const;
  void switch_to(int level, Clock::time_point now, double idle);

  const int levels_;
  const double streams_;
  std::atomic<uint64_t> link_wait_ns_{0};
  std::atomic<uint64_t> worker_ns_{0};
  std::atomic<uint64_t> worker_wall_ns_{0};
  std::atomic<double> effort_{1.0};
  std::array<std::atomic<uint64_t>, kRungs> encode_bytes_{};
  std::array<std::atomic<uint64_t>, kRungs> plain_bytes_{};
  std::array<std::atomic<uint64_t>, kRungs> encoded_bytes_{};
  std::array<std::atomic<uint64_t>, kRungs> encode_ns_{};
  IdleSeconds idle_;
  std::mutex mu_;
  // Under mu_:
  std::array<double, kMaxLevels> estimate_;       // smoothed bytes/s per level, < 0 when unknown
  std::array<unsigned, kMaxLevels> measured_at_;  // the period that last measured the level
  std::array<int, 3> opening_;
  size_t opening_count_ = 0;
  size_t opened_ = 0;
  bool warmed_up_ = false;
  unsigned warm_up_parts_ = 0;  // of the warm-up before the opening
  double warm_up_seconds_ = 0;  // the time its parts took
  bool trace_ = false;
  unsigned periods_ = 0;
  int current_ = 0;
  Clock::time_point period_start_{};
  const Clock::time_point created_ = Clock::now();  // for the trace
  uint64_t period_bytes_ = 0;
  uint64_t period_sent_ = 0;  // logical bytes of non-zero chunks handed to the kernel, at the period's start
  double sent_rate_ = 0;      // what the last period handed to the kernel per second (the trace's "sent")
  uint64_t period_link_wait_ns_ = 0;
  uint64_t period_worker_ns_ = 0;
  uint64_t period_worker_wall_ns_ = 0;
  double busy_cores_ = 0;  // the workers' CPU time per second in the last period (0: none reported)
  unsigned period_chunks_ = 0;
  // Spare CPU: the idle seconds and the time when the current window started, and the last window's average.
  double window_idle_ = -1;
  Clock::time_point window_start_{};
  double spare_cores_ = -1;     // idle cores on average, < 0 when unknown
  double path_rate_ = -1;       // the last Sockets::path_rate
  double prior_link_rate_ = -1;  // EffortPrior::raw_rate, < 0 when unknown
  double spare_min_seconds_;    // the shortest window read (the idle counters' resolution)
  double prior_lz4_cost_ = -1;  // opening on raw: lz4's tuned CPU seconds per byte; else < 0
};

}  // namespace dstx::engine
