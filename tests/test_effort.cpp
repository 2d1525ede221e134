// The --codec auto controller against simulated links: a model gives, for the effort in force, the logical
// rate and whether the link or the CPU sets it; time is simulated, so the tests are exact.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/effort.h"

namespace dstx::engine {
namespace {

using Clock = EffortController::Clock;

// Per rung (raw, lz4, zstd, zstd+2): wire bytes per logical byte and CPU seconds per logical GB.
constexpr double kWire[] = {1.0, 0.5, 0.37, 0.34};
constexpr double kCpu[] = {0.4, 1.5, 2.2, 3.5};

double blend(const double (&per_rung)[4], double effort) {
  const int rung = std::min(int(effort), 2);
  const double f = effort - rung;
  return per_rung[rung] * (1 - f) + per_rung[rung + 1] * f;
}

struct Link {
  double link_gbps;  // wire GB/s the link carries
  double cores;      // CPU the sender has
  // The share of time the workers wait on a full link. Zero chunks, which keep the workers busy without
  // touching the link, dilute it in real transfers.
  double link_wait = 0.7;
  bool tcp_path_rate = false;  // whether TCP reports the path's rate when the link is full
  double rate(double effort) const {
    return std::min(link_gbps / blend(kWire, effort), cores / blend(kCpu, effort));
  }
  bool link_limited(double effort) const {
    return link_gbps / blend(kWire, effort) < cores / blend(kCpu, effort);
  }
  double other_load = 0;  // cores something else on the machine keeps busy (a receiver on the same host)
  // Cores idle at this effort: what neither the sender nor the other load uses.
  double spare(double effort) const {
    return std::max(0.0, cores - rate(effort) * blend(kCpu, effort) - other_load);
  }
};

struct Trace {
  std::vector<double> efforts;  // the effort in force for each chunk
  double seconds = 0;
};

// Sends `chunks` chunks of 1 MiB over two streams, at the rate the model gives for the effort in force.
// The machine's idle time and each chunk's encode cost follow the model too.
Trace simulate(const Link& link, double top, int chunks) {
  double idle_seconds = 0;
  EffortController c(top, 2, [&] { return idle_seconds; });
  Trace run;
  auto now = Clock::time_point{} + std::chrono::seconds(1);
  uint64_t sent = 0;
  for (int i = 0; i < chunks; ++i) {
    const double effort = c.effort();
    run.efforts.push_back(effort);
    const double dt = double(1 << 20) / (link.rate(effort) * 1e9);
    run.seconds += dt;
    idle_seconds += dt * link.spare(effort);
    const int rung = std::min(int(effort), 2);
    const double f = effort - rung;
    for (const auto& [r, share] : {std::pair{rung, 1 - f}, std::pair{rung + 1, f}}) {
      const double bytes = share * double(1 << 20);
      c.add_encode_cost(r, uint64_t(bytes), uint64_t(bytes * kWire[r]),
                        std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(bytes * kCpu[r] * 1e-9)));
    }
    now += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(dt));
    // Link-limited workers spend most of their time waiting with a frame ready, CPU-limited ones hardly.
    c.add_link_wait(std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(dt * 2 * (link.link_limited(effort) ? link.link_wait : 0.05))));
    sent += 1 << 20;
    c.observe(now, sent, [&] {
      return EffortController::Sockets{
          .path_rate = link.tcp_path_rate && link.link_limited(effort) ? link.link_gbps * 1e9 : -1};
    });
  }
  return run;
}

double tail_mean(const std::vector<double>& v, size_t n) {
  double sum = 0;
  for (size_t i = v.size() - n; i < v.size(); ++i) sum += v[i];
  return sum / double(n);
}

TEST(EffortController, ASlowLinkClimbsToTheTopRungWithoutARawPeriod) {
  const Link slow{.link_gbps = 0.12, .cores = 1.5};  // 1 Gbit/s, CPU to spare even at the top rung
  const Trace run = simulate(slow, 3.0, 600);
  EXPECT_EQ(run.efforts.back(), 3.0);
  // lz4 waited on the link from the start, so raw (twice the bytes) was never tried.
  EXPECT_GT(*std::min_element(run.efforts.begin(), run.efforts.end()), 0.9);
  EXPECT_GT(tail_mean(run.efforts, 300), 2.9);
}

TEST(EffortController, ALinkFasterThanTheCompressorSettlesOnRawAndStaysThere) {
  const Link fast{.link_gbps = 10, .cores = 1.0};  // the CPU sets the pace at every effort
  const Trace run = simulate(fast, 3.0, 2000);
  // After the opening nothing compressed is tried again: the workers never wait on the link.
  const auto settled = std::find(run.efforts.begin(), run.efforts.end(), 0.0);
  ASSERT_NE(settled, run.efforts.end());
  EXPECT_LT(settled - run.efforts.begin(), 64);
  EXPECT_TRUE(std::all_of(settled, run.efforts.end(), [](double e) { return e == 0.0; }));
  // lz4 kept the cores busy without waiting on the link in its warm-up and shrank the data only by half:
  // raw comes right after the warm-up (8 chunks), without a measured lz4 period (8 more).
  EXPECT_LE(settled - run.efforts.begin(), 9);
}

TEST(EffortController, ALinkBetweenTheTwoSettlesWhereLinkAndCpuMeet) {
  // Best effort for this link: where link_gbps / wire == cores / cpu, between raw and lz4.
  const Link mid{.link_gbps = 1.2, .cores = 1.6};
  double best = 0;
  for (double e = 0; e <= 3.0; e += 0.25) {
    if (mid.rate(e) > mid.rate(best)) best = e;
  }
  ASSERT_GT(best, 0.0);
  ASSERT_LT(best, 1.0);
  const Trace run = simulate(mid, 3.0, 3000);
  EXPECT_NEAR(tail_mean(run.efforts, 1000), best, 0.2);
  // And it beats both pure rungs it mixes.
  double raw_seconds = 0, lz4_seconds = 0;
  for (size_t i = 0; i < run.efforts.size(); ++i) {
    raw_seconds += double(1 << 20) / (mid.rate(0) * 1e9);
    lz4_seconds += double(1 << 20) / (mid.rate(1) * 1e9);
  }
  EXPECT_LT(run.seconds, std::min(raw_seconds, lz4_seconds));
}

TEST(EffortController, WorkersWaitingOnTheLinkWithNoCpuToSpareDoNotTryMoreEffort) {
  // Raw fills the link, so the workers wait on it; but a quarter of the chunks on lz4 would need more CPU
  // than is left over (on one machine the receiver takes it), and would be slower.
  const Link busy{.link_gbps = 2.5, .cores = 1.2, .other_load = 0.2};
  ASSERT_TRUE(busy.link_limited(0));
  ASSERT_LT(busy.rate(0.25), busy.rate(0));
  const Trace run = simulate(busy, 3.0, 4000);
  const auto settled = std::find(run.efforts.begin(), run.efforts.end(), 0.0);
  ASSERT_NE(settled, run.efforts.end());
  EXPECT_LT(settled - run.efforts.begin(), 64);
  // Once the encode costs are known, no chunk leaves raw again.
  const auto costs_known = settled + 64;
  EXPECT_EQ(std::count_if(costs_known, run.efforts.end(), [](double e) { return e > 0; }), 0);
}

TEST(EffortController, APathFarSlowerThanLz4SkipsRawEvenWhenTheWorkersHardlyWait) {
  // 1 Gbit/s with the workers busy on zero chunks most of the time: the link wait says little, but TCP's
  // path rate is far below what raw would have to carry.
  Link slow{.link_gbps = 0.12, .cores = 1.5, .link_wait = 0.3, .tcp_path_rate = true};
  Trace run = simulate(slow, 3.0, 600);
  EXPECT_EQ(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 0);
  EXPECT_GE(tail_mean(run.efforts, 300), 1.9);  // on zstd at least (the weak link wait holds it there)
  // Without the path rate, raw gets its trial.
  slow.tcp_path_rate = false;
  run = simulate(slow, 3.0, 600);
  EXPECT_GT(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 0);
}

TEST(EffortController, WithoutZstdTheLadderStopsAtLz4) {
  const Link slow{.link_gbps = 0.12, .cores = 1.5};
  const Trace run = simulate(slow, 1.0, 400);
  EXPECT_EQ(run.efforts.back(), 1.0);
  EXPECT_GT(*std::min_element(run.efforts.begin(), run.efforts.end()), 0.9);  // lz4 waited: no raw period
}

}  // namespace
}  // namespace dstx::engine
