#include "engine/effort.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace dstx::engine {
namespace {

constexpr double kSpareWindowSeconds = 0.1;  // spare CPU is averaged over this long at most
constexpr double kSpareMinSeconds = 0.003;    // and at least this long: cpuidle counts in microseconds,
constexpr double kSpareMinSecondsCoarse = 0.05;  // but /proc/stat in 10 ms ticks per CPU

constexpr unsigned kPeriodChunks = 24;
constexpr unsigned kOpeningChunks = 8;
constexpr double kPeriodMinSeconds = 0.02;
constexpr double kOpeningMinSeconds = 0.008;
// The warm-up before the opening: parts of kFirstChunks chunks and kFirstMinSeconds, at most kFirstParts of
// them and kFirstMaxSeconds in all while none finds a reason to skip lz4 (see end_period). A fast link gets
// to raw after one part; on a slow one the opening starts where it did with one warm-up of 8 chunks (with
// one of 4, auto at 1 Gbit/s climbed less: 1.5-3 % slower, with 10 % less CPU spent), and on a very slow one
// (each part cut at kPeriodMaxSeconds) after as long as two such parts took. Parts of 2 chunks and 3 ms
// rather than 4 and 5 ms: on unlimited veth with binary state lz4's part ran 8 ms at 0.4-0.6 GB/s where raw
// does 3.5, and ends 2-6 ms sooner now (512 MiB, 11 runs side by side: 190.0 -> 177.4 ms, --codec none
// 166.3; 10 Gbit/s 445 -> 439 ms; 1 Gbit/s and the other profiles within noise).
constexpr unsigned kFirstChunks = 2;
constexpr double kFirstMinSeconds = kSpareMinSeconds;  // a part that ends sooner knows no idle CPU yet
constexpr unsigned kFirstParts = 4;
constexpr double kPeriodMaxSeconds = 0.2;
constexpr double kFirstMaxSeconds = 2 * kPeriodMaxSeconds;
constexpr double kSmoothing = 0.5;
constexpr double kMargin = 0.03;          // a measured neighbour must deliver this much more to be taken
constexpr unsigned kStalePeriods = 6;     // measurements older than this many periods are forgotten
constexpr double kLinkBoundShare = 0.45;  // link wait at or above this: more effort may pay
constexpr double kCpuBoundShare = 0.25;   // at or below this: less effort may pay

constexpr double kNoSpareCores = 0.1;         // less idle than this: the machine has no CPU to spare
constexpr double kPathMargin = 1.5;          // TCP's path rate is a sample: raw is skipped below 1/1.5 of lz4
constexpr double kSkipLz4MinRatio = 0.4;     // see the warm-up in end_period
constexpr double kKeptUpShare = 0.75;        // likewise
// A rung's encode cost is known after this many bytes: with the default 1 MiB chunks at most what lz4's
// warm-up part encodes (the chunk that starts it and 2 more), so that raw's warm-up can give lz4 its period
// back (lz4_wanted_back) and a trial up from raw is weighed by its cost (with 4 MiB, unknown costs let
// trials through that cost 1.6-2.2 GB/s periods on unlimited veth).
constexpr uint64_t kCostMinBytes = 2 << 20;
// The share of a step's extra encode CPU that must be idle for an upward trial. Well below all of it:
// fewer bytes on the wire save kernel CPU on both ends, which encode costs do not show, and costs measured
// while both hyperthreads of a core are busy overstate the step. On this project's 2-core machine, steps
// whose encode cost was 2-4 times the idle CPU still paid (10 Gbit/s binary and mixed), and on the slower
// machine of session 8 at 10 Gbit/s binary 5 times (0.06-0.1 cores idle, 0.3-0.5 asked: 0.25 held the trial
// back and auto lost 2-4 % to raw; 0.15 lets it through, 1-3.4 % faster than 0.25 in three invocations);
// what the bar holds back is a machine with next to nothing idle (25 Gbit/s and faster, where sender and
// receiver share it).
constexpr double kSpareBar = 0.15;
// But a step may ask for at most this much CPU per worker beyond what idles. Unlimited veth, binary state,
// raw at 3.1 GB/s: the workers wait on the sockets half the time with 0.33 cores idle, and a quarter step
// asked for 1.15 cores; each trial ran at 2.2 GB/s for a period (auto 179.5 -> 176.1 ms without them, 9
// runs). At 10 Gbit/s a step asks for about 0.45 cores and still gets its trial (2 streams, one per core).
constexpr double kBorrowPerStream = 0.25;
// Idle CPU that asks for a trial upwards while the link wait is moderate, when the step's cost is unknown.
// On this project's machine: 0.5-0.8 cores at 1 Gbit/s, under 0.25 from 10 Gbit/s up.
constexpr double kAmpleSpareCores = 0.4;

// Idle seconds (idle + iowait) per CPU from /proc/stat, indexed by CPU number; false when it cannot be read.
// It counts an idle period still in progress, but in ticks of 10 ms.
bool proc_stat_idle(const std::string& path, std::vector<double>& per_cpu) {
  static const double tick = 1.0 / double(std::max(1L, ::sysconf(_SC_CLK_TCK)));
  std::FILE* f = std::fopen(path.c_str(), "re");
  if (!f) return false;
  std::fill(per_cpu.begin(), per_cpu.end(), -1.0);  // a CPU gone offline has no line: not its last value
  bool any = false;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    unsigned cpu = 0;
    unsigned long long user, nice, system, idle_ticks, iowait;
    if (std::strncmp(line, "cpu", 3) != 0) break;  // the per-CPU lines come first
    if (!std::isdigit(static_cast<unsigned char>(line[3]))) continue;  // the "cpu  " total line
    if (std::sscanf(line, "cpu%u %llu %llu %llu %llu %llu", &cpu, &user, &nice, &system, &idle_ticks,
                    &iowait) != 6 || cpu >= CPU_SETSIZE)
      continue;
    if (per_cpu.size() <= cpu) per_cpu.resize(cpu + 1, -1);
    per_cpu[cpu] = double(idle_ticks + iowait) * tick;
    any = true;
  }
  std::fclose(f);
  return any;
}

// Sum of the numbers in the files, or -1 if one cannot be read.
int64_t sum_of_files(const std::vector<std::string>& files) {
  int64_t sum = 0;
  for (const std::string& f : files) {
    const int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char text[32];
    const ssize_t n = ::read(fd, text, sizeof text - 1);
    ::close(fd);
    if (n <= 0) return -1;
    text[n] = 0;
    sum += int64_t(std::strtoull(text, nullptr, 10));
  }
  return sum;
}

}  // namespace

IdleMeter::IdleMeter(const cpu_set_t& set, std::string root) : root_(std::move(root)) {
  size_t files = 0;
  for (unsigned id = 0; id < CPU_SETSIZE; ++id) {
    if (!CPU_ISSET(id, &set)) continue;
    Cpu cpu{.id = id};
    for (unsigned state = 0;; ++state) {
      const std::string dir = root_ + "/sys/devices/system/cpu/cpu" + std::to_string(id) + "/cpuidle/state" +
                              std::to_string(state);
      if (::access((dir + "/time").c_str(), R_OK) != 0) break;
      cpu.time_files.push_back(dir + "/time");
      cpu.usage_files.push_back(dir + "/usage");
    }
    files += 2 * cpu.time_files.size();
    precise_ = precise_ && !cpu.time_files.empty();
    cpus_.push_back(std::move(cpu));
  }
  if (files > kMaxFiles) precise_ = false;
}

double IdleMeter::operator()() {
  if (!proc_stat_idle(root_ + "/proc/stat", stat_)) return -1;
  for (Cpu& cpu : cpus_) {
    const double stat = cpu.id < stat_.size() ? stat_[cpu.id] : -1;
    if (stat < 0) return -1;
    const int64_t us = precise_ ? sum_of_files(cpu.time_files) : -1;
    const int64_t entries = precise_ ? sum_of_files(cpu.usage_files) : -1;
    if (cpu.last_stat >= 0) {
      const bool by_cpuidle =
        us >= 0 && entries >= 0 && cpu.last_us >= 0 && cpu.last_entries >= 0 && entries != cpu.last_entries;
      total_ += std::max(0.0, by_cpuidle ? double(us - cpu.last_us) * 1e-6 : stat - cpu.last_stat);
    }
    cpu.last_stat = stat;
    cpu.last_us = us;
    cpu.last_entries = entries;
  }
  return total_;
}

double ShareSelector::limit(double share) const {
  if (share >= 1) return std::numeric_limits<double>::infinity();
  if (share <= 0) return -1;
  if (count_ < kMinHistory) return evenly(share) ? std::numeric_limits<double>::infinity() : -1;
  // Runs of compressible (or incompressible) chunks would otherwise leave the link (or the CPU) idle
  // meanwhile: the buffers between them hold a few chunks only.
  if (credit_ + share - 1 < -kCreditLimit) return -1;
  if (credit_ + share > kCreditLimit) return std::numeric_limits<double>::infinity();
  // The share's quantile of the recent estimates, moved by the credit: behind the share, a little higher.
  const double q = std::clamp(share + kCreditGain * credit_, 0.0, 1.0);
  if (q <= 0) return -1;
  std::array<double, kHistory> sorted;
  std::copy_n(history_.begin(), count_, sorted.begin());
  const size_t k = std::clamp<size_t>(size_t(q * double(count_) + 0.5), 1, count_);
  std::nth_element(sorted.begin(), sorted.begin() + ptrdiff_t(k - 1), sorted.begin() + ptrdiff_t(count_));
  const double value = sorted[k - 1];
  // Estimates that tie (chunks of zero pages and little else) all fall on one side: below when ahead.
  return credit_ < 0 ? std::nextafter(value, -1.0) : value;
}

void ShareSelector::record(double share, double estimate, bool up) {
  if (estimate >= 0) {
    history_[next_] = estimate;
    next_ = (next_ + 1) % kHistory;
    count_ = std::min(count_ + 1, kHistory);
  }
  // Bounded: a run of incompressible chunks (above kIncompressibleRatio, raw whatever the limit) owes
  // nothing.
  credit_ = std::clamp(credit_ + share - (up ? 1 : 0), -kCreditLimit - 1, kCreditLimit + 1);
}

EffortController::EffortController(double top, size_t streams, IdleSeconds idle, EffortPrior prior)
    : levels_(std::clamp(int(top * kLevelsPerRung) + 1, kLevelsPerRung + 1, kMaxLevels)),
      streams_(double(std::max<size_t>(streams, 1))),
      idle_(std::move(idle)),
      spare_min_seconds_(kSpareMinSeconds) {
  if (!idle_) {
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    if (::sched_getaffinity(0, sizeof cpus, &cpus) == 0) {
      IdleMeter meter(cpus);
      if (!meter.precise()) spare_min_seconds_ = kSpareMinSecondsCoarse;
      idle_ = [meter = std::move(meter)]() mutable { return meter(); };
    }
  }
  estimate_.fill(-1);
  measured_at_.fill(0);
  opening_ = {kLevelsPerRung, 0, 2 * kLevelsPerRung};  // lz4, raw, then zstd if the ladder has it
  opening_count_ = levels_ > 2 * kLevelsPerRung ? 3 : 2;
  current_ = opening_[0];
  trace_ = std::getenv("DSTX_TRACE_CODEC") != nullptr;
  if (prior.raw_rate > 0) prior_link_rate_ = prior.raw_rate;  // for lz4's warm-up: raw_link_rate
  // The link outruns lz4 on every worker: lz4's warm-up would only show that (unlimited veth, binary state,
  // 15 runs side by side: 171.9 -> 161.5 ms, --codec none 160.5; 25 Gbit/s, 11 runs: 202.1 -> 195.3, 195.1).
  // lz4's tuned cost stands in until its own is measured: raw's warm-up can then give lz4 its period back on
  // a link slower than the profile's. Only here: the lz4 opening measures its own, as without a profile.
  if (prior.opens_raw(streams)) {
    opened_ = 1;
    current_ = opening_[1];
    prior_lz4_cost_ = 1 / prior.lz4_rate;
    if (trace_) {
      std::fprintf(stderr, "opening on raw: tuned link %.3f GB/s, lz4 %.3f GB/s x %.0f workers\n",
                   prior.raw_rate / 1e9, prior.lz4_rate / 1e9, streams_);
    }
  }
  effort_.store(level_effort(current_), std::memory_order_relaxed);
}

// A period is long enough once it saw a good number of chunks (fast links settle quickly, so short transfers
// get the right codec too) or once it is long anyway (slow links).
bool EffortController::period_over(Clock::time_point now) {
  const double dt = std::chrono::duration<double>(now - period_start_).count();
  ++period_chunks_;
  const bool in_opening = opened_ < opening_count_;
  const bool first = opened_ == 0 && !warmed_up_;
  const unsigned enough = first ? kFirstChunks : in_opening ? kOpeningChunks : kPeriodChunks;
  const double shortest = first ? kFirstMinSeconds : in_opening ? kOpeningMinSeconds : kPeriodMinSeconds;
  return (period_chunks_ >= enough && dt >= shortest) || dt >= kPeriodMaxSeconds;
}

void EffortController::end_period(Clock::time_point now, uint64_t sent, uint64_t delivered) {
  const uint64_t waited_ns = link_wait_ns_.load(std::memory_order_relaxed);
  const uint64_t worker_ns = worker_ns_.load(std::memory_order_relaxed);
  const uint64_t worker_wall_ns = worker_wall_ns_.load(std::memory_order_relaxed);
  const double idle = idle_ ? idle_() : -1;
  if (period_start_ == Clock::time_point{}) {
    period_start_ = now;
    period_bytes_ = delivered;
    period_sent_ = sent;
    period_link_wait_ns_ = waited_ns;
    period_worker_ns_ = worker_ns;
    period_worker_wall_ns_ = worker_wall_ns;
    window_idle_ = idle;
    window_start_ = now;
    return;
  }
  const double dt = std::max(std::chrono::duration<double>(now - period_start_).count(), 1e-9);
  // Workers report totals without a common order: one may be a little older than the last one seen.
  delivered = std::max(delivered, period_bytes_);
  const double rate = (double(delivered) - double(period_bytes_)) / dt;
  const double link_share = double(waited_ns - period_link_wait_ns_) * 1e-9 / (dt * streams_);
  period_start_ = now;
  period_bytes_ = delivered;
  sent_rate_ = (double(std::max(sent, period_sent_)) - double(period_sent_)) / dt;
  period_sent_ = sent;
  // The workers' busy share (CPU over wall time, summed over what they reported in the period), times their
  // number; the last value stands through a period without reports.
  if (worker_wall_ns > period_worker_wall_ns_) {
    busy_cores_ =
        streams_ * double(worker_ns - period_worker_ns_) / double(worker_wall_ns - period_worker_wall_ns_);
  }
  period_link_wait_ns_ = waited_ns;
  period_worker_ns_ = worker_ns;
  period_worker_wall_ns_ = worker_wall_ns;
  period_chunks_ = 0;
  // Spare CPU, averaged over windows of kSpareMinSeconds to kSpareWindowSeconds at one level; a new window
  // starts when one is full and with each new level, and until it has run kSpareMinSeconds the last value
  // stands.
  const double window = std::chrono::duration<double>(now - window_start_).count();
  if (idle < 0 || window_idle_ < 0) {
    window_idle_ = idle;
    window_start_ = now;
    if (idle < 0) spare_cores_ = -1;  // no longer readable: unknown, not the last value
  } else if (window >= spare_min_seconds_) {
    spare_cores_ = std::max(0.0, idle - window_idle_) / window;
    if (window >= kSpareWindowSeconds) {
      window_idle_ = idle;
      window_start_ = now;
    }
  }
  if (!warmed_up_) {
    warmed_up_ = true;  // the first period measures socket buffers and slow start filling, not the link
    // But if lz4 kept the workers busy, left no CPU idle that they could have used, and never waited on the
    // link even then, while lz4 sent at least 40 % of what raw would have (raw skips zero pages too: on
    // zero-heavy state lz4 sends 0.57 of raw's bytes, 0.08 of the state's; counted against the state, lz4
    // took 20 ms of a 90 ms transfer on unlimited veth), raw can only be faster: its warm-up starts now, and
    // lz4 counts as lost (so zstd is not tried either). Data lz4 shrinks a lot proves nothing of the kind:
    // the socket buffers alone may have taken it.
    const double lz4_ratio = std::max(0.0, encoded_ratio(1, 1));
    // A start-up can look CPU-bound on any link (threads and buffers being set up, socket buffers swallowing
    // the first megabytes): when TCP already measured a path (or dstx tune did) on which raw would deliver
    // less than lz4, raw cannot win, and lz4 keeps its period. Nor when the send queues grew meanwhile: the
    // link did not keep up even with lz4 (1 Gbit/s, binary state: 0.33-0.66 of what was sent left the
    // queues, where TCP's first rate samples, a shaper's burst, said 0.25-30 GB/s; 10 Gbit/s and faster:
    // 0.83-1.0).
    const double raw = raw_link_rate(/*with_prior=*/true);
    const bool path_allows_raw = raw < 0 || raw >= rate;
    const bool link_kept_up = rate >= kKeptUpShare * sent_rate_;
    trace(rate, link_share);
    if (opened_ == 0 && link_share <= kCpuBoundShare && no_spare() &&
        lz4_ratio >= kSkipLz4MinRatio && path_allows_raw && link_kept_up) {
      opened_ = 1;
      switch_to(opening_[1], now, idle);
      warmed_up_ = false;
    } else if (opened_ == 0 && ++warm_up_parts_ < kFirstParts &&
               warm_up_seconds_ + dt < kFirstMaxSeconds) {
      warm_up_seconds_ += dt;
      warmed_up_ = false;
    } else if (opened_ == 1 && current_ == 0 && estimate_[size_t(kLevelsPerRung)] < 0 &&
               lz4_wanted_back(rate, link_share)) {
      // Raw's warm-up after a skipped lz4 already shows what its measured period would (below): lz4 comes
      // back a period sooner. On zero-heavy state at 1 Gbit/s lz4 sends barely more than the link carries,
      // and its warm-up fits in the socket buffers, so nothing tells it from a fast link's.
      switch_to(opening_[0], now, idle);
      warmed_up_ = false;
    }
    return;
  }
  double& est = estimate_[size_t(current_)];
  est = est < 0 ? rate : (1 - kSmoothing) * est + kSmoothing * rate;
  measured_at_[size_t(current_)] = ++periods_;
  for (int l = 0; l < levels_; ++l) {  // what was measured long ago says little about the link now
    if (periods_ - measured_at_[size_t(l)] > kStalePeriods) estimate_[size_t(l)] = -1;
  }
  const bool link_bound = link_share >= kLinkBoundShare;
  // Or no CPU idle at all, whoever waits: on one machine a receiver short of CPU keeps the sender's socket
  // buffers full, and the workers seem to wait on the link (unlimited veth, binary state: 0.3-0.47 of the
  // time at effort 0.25 with nothing idle). Without this, a level below whose measurement went stale was
  // never tried again, and auto could stay at 0.25 for a whole transfer (2 traces in 10: 1.11-1.27 GB/s
  // against 1.9).
  const bool cpu_bound = link_share <= kCpuBoundShare || no_spare();

  const bool in_opening = opened_ < opening_count_;
  int next = current_;
  if (in_opening) {
    // lz4 waited on the link, or TCP measured a path on which raw would deliver far less than lz4's logical
    // rate: raw would only be slower.
    const double raw = raw_link_rate(/*with_prior=*/false);
    const bool path_too_slow = raw >= 0 && raw * kPathMargin < est;
    if (opened_ == 0 && (link_bound || path_too_slow)) ++opened_;
    const bool lz4_lost =
        opened_ == 1 && estimate_[0] >= 0 && estimate_[size_t(kLevelsPerRung)] <= estimate_[0];
    if (opened_ == 1 && current_ == 0 && estimate_[size_t(kLevelsPerRung)] < 0 &&
        lz4_wanted_back(est, link_share)) {
      // lz4's period was skipped for a warm-up that looked CPU-bound, yet raw waits on the link (more than a
      // CPU-bound worker does: its period may still hold part of the misleading start), with CPU idle, at
      // less than half what lz4's encode cost allows: the start misled (set-up work, TCP's first rate
      // samples on a shaped link, a path that slowed down). lz4 gets its period after all, and the
      // comparison above decides when it ends. (On a link that merely outruns lz4 a little, 10 Gbit/s with
      // binary state, the period would cost 3 %.)
      next = opening_[0];
    } else if (opened_ + 1 < opening_count_ && !lz4_lost) {
      next = opening_[++opened_];
    } else {
      opened_ = opening_count_;
      // zstd's period ends the opening waiting on the link with CPU idle, and zstd shrinks the data more
      // than lz4 did: zstd delivers more, whatever the two periods' rates say. They were measured on
      // different data, and at 1 Gbit/s the rate along mixed state varies more from one period to the next
      // than from lz4 to zstd (auto went back to lz4 in 4 of 6 traces on mixed state, and took ~300 ms to
      // climb back; 0 of 6 now).
      const bool zstd_holds = current_ == opening_[2] && link_bound && !no_spare() &&
                              encoded_ratio(2, kCostMinBytes) >= 0 &&
                              encoded_ratio(2, kCostMinBytes) < encoded_ratio(1, kCostMinBytes);
      for (int l = 0; l < levels_ && !zstd_holds; ++l) {
        if (estimate_[size_t(l)] > estimate_[size_t(next)]) next = l;
      }
    }
  } else {
    double best = est * (1 + kMargin);
    for (int l : {current_ - 1, current_ + 1}) {
      if (l < 0 || l >= levels_) continue;
      // Upwards: a link that keeps the workers waiting much of the time, and CPU that could pay for part of
      // the step; or, while they wait on it more than a CPU-bound worker does, CPU left idle that could pay
      // for all of it. (At 1 Gbit/s with binary state the workers wait 35-45 % of the time on zstd-1 with
      // half a core idle, and zstd-2 is 6 % faster than zstd-1.)
      const bool up_pays = (link_bound && cpu_to_spare(est)) || (!cpu_bound && ample_spare(est));
      const bool worth_trying = l > current_ ? up_pays : cpu_bound;
      // Waiting on the link much of the time with idle CPU for all of the step up: the level above is worth
      // measuring again whatever an older measurement said. It was taken on other data, and at 1 Gbit/s the
      // rate along mixed state varies more from one period to the next than from one level to the next (auto
      // sat at 1.5 for 8 periods with a core idle and the workers waiting 0.5-0.7 of the time).
      const bool retry = l > current_ && link_bound && ample_spare(est);
      const double score =
        estimate_[size_t(l)] >= 0 && !retry ? estimate_[size_t(l)] : worth_trying ? best * 1.001 : 0;
      if (score > best) {
        best = score;
        next = l;
      }
    }
  }
  trace(rate, link_share);
  // In the opening a change is a whole rung: the data the socket buffers still hold was encoded the old way
  // and would be counted against the new one, so the next period only lets it drain.
  if (in_opening && next != current_) warmed_up_ = false;
  switch_to(next, now, idle);
}

void EffortController::trace(double rate, double link_share) const {
  if (trace_) {
    std::fprintf(stderr,
                 "%7.1f ms: effort %.2f: %.3f GB/s, link wait %.2f, spare cores %.2f (workers busy %.2f), "
                 "path %.3f GB/s, sent %.3f\n",
                 std::chrono::duration<double, std::milli>(period_start_ - created_).count(), level_effort(current_),
                 rate / 1e9, link_share, spare_cores_, busy_cores_, path_rate_ / 1e9, sent_rate_ / 1e9);
  }
}

// Whether raw, running at `rate` after lz4's period was skipped, waits on the link (more than a CPU-bound
// worker does) with CPU measured idle, at less than half what lz4's encode cost allows: see end_period.
bool EffortController::lz4_wanted_back(double rate, double link_share) const {
  return link_share > kCpuBoundShare && spare_cores_ >= 0 && !no_spare() && lz4_outruns(2 * rate);
}

// Whether lz4's measured encode cost lets the workers (a core each at most) encode more than `rate`
// logical bytes per second; false while the cost is unknown.
bool EffortController::lz4_outruns(double rate) const {
  const double cost = cost_per_byte(1);
  return cost >= 0 && rate * cost < streams_;
}

// What raw could deliver over the link, in logical bytes/s, < 0 when unknown. The link's rate: TCP's path
// rate, or with_prior the lower of it and the prior's. The prior counts in the warm-up only, where TCP's
// first samples on a shaped link measure the shaper's burst (at 1 Gbit/s with zero-heavy state 4.3 GB/s:
// lz4's warm-up, CPU-bound on what compresses well, was skipped for raw in 5 traces of 6, whose period
// delivered half of lz4's); later TCP's own samples are the better guide, and a profile tuned on another
// link may be stale. Raw drops zero pages, so it delivers the link's rate times the logical bytes per
// non-zero byte of the chunks lz4 encoded (zero-heavy state: 6.7; at 10 Gbit/s raw delivers 6-7 GB/s there
// where lz4 makes 2.5).
double EffortController::raw_link_rate(bool with_prior) const {
  const double link = !with_prior || prior_link_rate_ < 0 ? path_rate_
                      : path_rate_ < 0                    ? prior_link_rate_
                                                          : std::min(path_rate_, prior_link_rate_);
  const uint64_t bytes = encode_bytes_[1].load(std::memory_order_relaxed);
  const uint64_t plain = plain_bytes_[1].load(std::memory_order_relaxed);
  if (link < 0 || bytes == 0) return link;
  return plain == 0 ? std::numeric_limits<double>::infinity() : link * double(bytes) / double(plain);
}

// What a rung's encoding made of the bytes given to it, against what raw would have sent of them (zero
// pages cost neither anything); < 0 before min_bytes logical bytes.
double EffortController::encoded_ratio(int rung, uint64_t min_bytes) const {
  const uint64_t bytes = encode_bytes_[size_t(rung)].load(std::memory_order_relaxed);
  const uint64_t plain = plain_bytes_[size_t(rung)].load(std::memory_order_relaxed);
  if (bytes < min_bytes || bytes == 0 || plain == 0) return -1;
  return double(encoded_bytes_[size_t(rung)].load(std::memory_order_relaxed)) / double(plain);
}

// A rung's measured encode cost in CPU seconds per byte; until kCostMinBytes were encoded on it, the prior's
// for lz4, else < 0.
double EffortController::cost_per_byte(int rung) const {
  const uint64_t bytes = encode_bytes_[size_t(rung)].load(std::memory_order_relaxed);
  if (bytes < kCostMinBytes) return rung == 1 ? prior_lz4_cost_ : -1;
  return double(encode_ns_[size_t(rung)].load(std::memory_order_relaxed)) * 1e-9 / double(bytes);
}

// A new level starts a new window of spare CPU.
void EffortController::switch_to(int level, Clock::time_point now, double idle) {
  if (level != current_ && window_idle_ >= 0) {
    window_idle_ = idle;
    window_start_ = now;
  }
  current_ = level;
  effort_.store(level_effort(level), std::memory_order_relaxed);
}

// Whether the CPU left over could pay for a quarter of the chunks one rung up: a link that keeps the workers
// waiting does not mean the CPU is free (on one machine, the receiver may be the one using it). Unknown costs
// count as yes: the trial measures them. So does spare CPU not measured yet: waiting for it would hold the
// climb on a slow link for the opening's length again (3 % at 10 Gbit/s binary), and on a link where CPU is
// short, the one trial it lets through is measured and not repeated. A step that needs far more CPU than
// idles is not tried (kBorrowPerStream).
bool EffortController::cpu_to_spare(double rate) const {
  if (spare_cores_ < 0) return true;
  const double extra = extra_cores(rate);
  const double spare = usable_spare();
  return extra < 0 || (spare >= kSpareBar * extra && extra <= spare + kBorrowPerStream * streams_);
}

// Whether the idle CPU within the workers' reach pays for all of a quarter step up (a trial the link wait
// alone does not ask for; a step measured to cost nothing always does); while the step's cost is unknown,
// whether kAmpleSpareCores idle.
bool EffortController::ample_spare(double rate) const {
  if (spare_cores_ < 0) return false;
  const double extra = extra_cores(rate);
  return usable_spare() >= (extra < 0 ? kAmpleSpareCores : extra);
}

// The cores a quarter step up would add in encoding at `rate`, from the measured costs of the two rungs;
// < 0 while either is unknown (or at the top).
double EffortController::extra_cores(double rate) const {
  const int rung = current_ / kLevelsPerRung;
  if (rung + 1 >= kRungs || rate <= 0) return -1;
  const double cost[2] = {cost_per_byte(rung), cost_per_byte(rung + 1)};
  if (cost[0] < 0 || cost[1] < 0) return -1;
  return rate * std::max(0.0, cost[1] - cost[0]) / kLevelsPerRung;
}

// Whether the idle CPU is known and the workers could spend next to none of it.
bool EffortController::no_spare() const {
  return spare_cores_ >= 0 && usable_spare() < kNoSpareCores;
}

// The idle CPU the workers could spend on encoding: what the cores leave idle, but no more than the workers
// left unused of a core each. With fewer workers than cores (one stream on two cores) a core no worker runs
// on may idle while every worker is busy, and that CPU is out of their reach. Workers that report no CPU
// time count as idle (the bound is then the cores' idle time alone).
double EffortController::usable_spare() const {
  return std::min(spare_cores_, std::max(0.0, streams_ - busy_cores_));
}

}  // namespace dstx::engine
