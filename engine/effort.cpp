#include "engine/effort.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace dstx::engine {
namespace {

constexpr unsigned kPeriodChunks = 24;
constexpr unsigned kOpeningChunks = 8;
constexpr double kPeriodMinSeconds = 0.02;
constexpr double kOpeningMinSeconds = 0.008;
constexpr double kPeriodMaxSeconds = 0.2;
constexpr double kSmoothing = 0.5;
constexpr double kMargin = 0.03;          // a measured neighbour must deliver this much more to be taken
constexpr unsigned kStalePeriods = 6;     // measurements older than this many periods are forgotten
constexpr double kLinkBoundShare = 0.45;  // link wait at or above this: more effort may pay
constexpr double kCpuBoundShare = 0.25;   // at or below this: less effort may pay

}  // namespace

EffortController::EffortController(double top, size_t streams)
    : levels_(std::clamp(int(top * kLevelsPerRung) + 1, kLevelsPerRung + 1, kMaxLevels)),
      streams_(double(std::max<size_t>(streams, 1))) {
  estimate_.fill(-1);
  measured_at_.fill(0);
  opening_ = {kLevelsPerRung, 0, 2 * kLevelsPerRung};  // lz4, raw, then zstd if the ladder has it
  opening_count_ = levels_ > 2 * kLevelsPerRung ? 3 : 2;
  current_ = opening_[0];
  effort_.store(level_effort(current_), std::memory_order_relaxed);
  trace_ = std::getenv("DSTX_TRACE_CODEC") != nullptr;
}

// A period is long enough once it saw a good number of chunks (fast links settle quickly, so short transfers
// get the right codec too) or once it is long anyway (slow links).
bool EffortController::period_over(Clock::time_point now) {
  const double dt = std::chrono::duration<double>(now - period_start_).count();
  ++period_chunks_;
  const bool in_opening = opened_ < opening_count_;
  const unsigned enough = in_opening ? kOpeningChunks : kPeriodChunks;
  const double shortest = in_opening ? kOpeningMinSeconds : kPeriodMinSeconds;
  return (period_chunks_ >= enough && dt >= shortest) || dt >= kPeriodMaxSeconds;
}

void EffortController::end_period(Clock::time_point now, uint64_t delivered) {
  const uint64_t waited_ns = link_wait_ns_.load(std::memory_order_relaxed);
  if (period_start_ == Clock::time_point{}) {
    period_start_ = now;
    period_bytes_ = delivered;
    period_link_wait_ns_ = waited_ns;
    return;
  }
  const double dt = std::max(std::chrono::duration<double>(now - period_start_).count(), 1e-9);
  // Workers report totals without a common order: one may be a little older than the last one seen.
  delivered = std::max(delivered, period_bytes_);
  const double rate = (double(delivered) - double(period_bytes_)) / dt;
  const double link_share = double(waited_ns - period_link_wait_ns_) * 1e-9 / (dt * streams_);
  period_start_ = now;
  period_bytes_ = delivered;
  period_link_wait_ns_ = waited_ns;
  period_chunks_ = 0;
  if (!warmed_up_) {
    warmed_up_ = true;  // the first period measures socket buffers and slow start filling, not the link
    return;
  }
  double& est = estimate_[size_t(current_)];
  est = est < 0 ? rate : (1 - kSmoothing) * est + kSmoothing * rate;
  measured_at_[size_t(current_)] = ++periods_;
  for (int l = 0; l < levels_; ++l) {  // what was measured long ago says little about the link now
    if (periods_ - measured_at_[size_t(l)] > kStalePeriods) estimate_[size_t(l)] = -1;
  }
  const bool link_bound = link_share >= kLinkBoundShare;
  const bool cpu_bound = link_share <= kCpuBoundShare;

  const bool in_opening = opened_ < opening_count_;
  int next = current_;
  if (in_opening) {
    if (opened_ == 0 && link_bound) ++opened_;  // lz4 waited on the link: raw would only be slower
    const bool lz4_lost =
        opened_ == 1 && estimate_[0] >= 0 && estimate_[size_t(kLevelsPerRung)] <= estimate_[0];
    if (opened_ + 1 < opening_count_ && !lz4_lost) {
      next = opening_[++opened_];
    } else {
      opened_ = opening_count_;
      for (int l = 0; l < levels_; ++l) {
        if (estimate_[size_t(l)] > estimate_[size_t(next)]) next = l;
      }
    }
  } else {
    double best = est * (1 + kMargin);
    for (int l : {current_ - 1, current_ + 1}) {
      if (l < 0 || l >= levels_) continue;
      const bool worth_trying = l > current_ ? link_bound : cpu_bound;
      const double score = estimate_[size_t(l)] >= 0 ? estimate_[size_t(l)] : worth_trying ? best * 1.001 : 0;
      if (score > best) {
        best = score;
        next = l;
      }
    }
  }
  if (trace_) {
    std::fprintf(stderr, "effort %.2f: %.3f GB/s, link wait %.2f\n", level_effort(current_), rate / 1e9,
                 link_share);
  }
  // In the opening a change is a whole rung: the data the socket buffers still hold was encoded the old way
  // and would be counted against the new one, so the next period only lets it drain.
  if (in_opening && next != current_) warmed_up_ = false;
  current_ = next;
  effort_.store(level_effort(next), std::memory_order_relaxed);
}

}  // namespace dstx::engine
