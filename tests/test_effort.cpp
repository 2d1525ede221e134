// The --codec auto controller against simulated links: a model gives, for the effort in force, the logical
// rate and whether the link or the CPU sets it; time is simulated, so the tests are exact.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <cmath>
#include <vector>

#include "engine/effort.h"
#include "scratch_dir.h"

namespace dstx::engine {
namespace {

using Clock = EffortController::Clock;
namespace fs = std::filesystem;

// Per rung (raw, lz4, zstd, zstd+1, zstd+2, as the sender's ladder): wire bytes per logical byte and CPU
// seconds per logical GB. Most tests stop the ladder at 3.0, where the sender stopped it before zstd+2.
constexpr double kWire[] = {1.0, 0.5, 0.37, 0.34, 0.32};
constexpr double kCpu[] = {0.4, 1.5, 2.2, 3.5, 4.6};

double blend(const double (&per_rung)[5], double effort) {
  const int rung = std::min(int(effort), 3);
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
  double idle_cores = 0;  // idle cores no worker runs on (one stream on a machine with two cores)
  bool waits_busy = false;  // the link wait is the workers' own CPU (the kernel's send path, as on veth)
  // The first chunks look CPU-bound whatever the link (set-up, socket buffers filling): no link wait, no
  // idle CPU, but TCP reports the path's rate.
  int busy_start_chunks = 0;
  double start_path_gbps = -1;  // what TCP reports meanwhile, if not the link's rate (a burst's sample)
  // Whether the busy start is the CPU's pace, its bytes piling up in the send queues as far as the link does
  // not carry them (a slow link), or the link's (a path that was fast at first and slowed down then).
  bool start_fills_queues = false;
  // The data along the state: runs of `run_chunks` chunks alternately compress better and worse, which
  // speeds up and slows down every level by this share (binary state at 1 Gbit/s: twofold).
  double swing = 0;
  int run_chunks = 30;
  // The share of the state in zero pages, which raw skips as every codec does: only the encoded sizes and
  // TCP's path rate (wire bytes: link_gbps times the non-zero share) count them (the rates above are per
  // logical byte already).
  double zero_pages = 0;
  // Cores idle at this effort: what neither the sender nor the other load uses.
  double spare(double effort) const {
    return std::max(0.0, cores - rate(effort) * blend(kCpu, effort) - other_load) + idle_cores;
  }
};

struct Trace {
  std::vector<double> efforts;  // the effort in force for each chunk
  double seconds = 0;
};

// Sends `chunks` chunks of 1 MiB over `streams` streams, at the rate the model gives for the effort in force.
// The machine's idle time and each chunk's encode cost follow the model too.
Trace simulate(const Link& link, double top, int chunks, int streams = 2, EffortPrior prior = {}) {
  double idle_seconds = 0;
  EffortController c(top, size_t(streams), [&] { return idle_seconds; }, prior);
  Trace run;
  auto now = Clock::time_point{} + std::chrono::seconds(1);
  uint64_t sent = 0;
  double queued = 0;  // logical bytes in the send queues, which the link has not carried yet
  for (int i = 0; i < chunks; ++i) {
    const double effort = c.effort();
    run.efforts.push_back(effort);
    const bool busy_start = i < link.busy_start_chunks;
    const double chunk = double(1 << 20);
    double dt = chunk / (link.rate(effort) * 1e9);
    if (link.swing > 0) dt /= (i / link.run_chunks) % 2 ? 1 - link.swing : 1 + link.swing;
    if (busy_start && link.start_fills_queues) {
      dt = chunk / (link.cores / blend(kCpu, effort) * 1e9);
      queued += chunk - std::min(queued + chunk, link.link_gbps / blend(kWire, effort) * 1e9 * dt);
    }
    run.seconds += dt;
    idle_seconds += busy_start ? 0 : dt * link.spare(effort);
    const int rung = std::min(int(effort), 3);
    const double f = effort - rung;
    for (const auto& [r, share] : {std::pair{rung, 1 - f}, std::pair{rung + 1, f}}) {
      const double bytes = share * double(1 << 20);
      const double plain = bytes * (1 - link.zero_pages);
      c.add_encode_cost(r, uint64_t(bytes), uint64_t(plain), uint64_t(plain * kWire[r]),
                        std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(bytes * kCpu[r] * 1e-9)));
    }
    now += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(dt));
    // Link-limited workers spend most of their time waiting with a frame ready, CPU-limited ones hardly; the
    // rest they are busy, on the cores they have.
    const double wait = busy_start ? 0 : link.link_limited(effort) ? link.link_wait : 0.05;
    c.add_link_wait(
        std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(dt * streams * wait)));
    c.add_worker_cpu(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
                         dt * std::min(link.cores, double(streams)) * (link.waits_busy ? 1 : 1 - wait))),
                     std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(dt * streams)));
    sent += 1 << 20;
    c.observe(now, sent, [&] {
      const bool path_known = link.tcp_path_rate && (busy_start || link.link_limited(effort));
      const double path = busy_start && link.start_path_gbps >= 0 ? link.start_path_gbps
                                                                  : link.link_gbps * (1 - link.zero_pages);
      return EffortController::Sockets{.queued = uint64_t(queued), .path_rate = path_known ? path * 1e9 : -1};
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

TEST(EffortController, AModerateLinkWaitWithIdleCpuForTheWholeStepStillClimbs) {
  // 1 Gbit/s with binary state: on zstd-1 the workers wait on the link only 35-45 % of the time (below the
  // link-bound share), but more than half a core idles, more than each quarter step up costs in encoding.
  const Link slow{.link_gbps = 0.12, .cores = 1.5, .link_wait = 0.35};
  ASSERT_TRUE(slow.link_limited(2.0));
  ASSERT_GT(slow.spare(2.0), 0.5);
  ASSERT_GT(slow.rate(3.0), slow.rate(2.0) * 1.05);
  const Trace run = simulate(slow, 3.0, 1200);
  EXPECT_GT(tail_mean(run.efforts, 300), 2.9);
  // With the idle CPU taken (by the receiver, say) it climbs no further than where the opening left it
  // (and with nothing idle, looks below now and then).
  Link busy = slow;
  busy.other_load = slow.spare(2.0) - 0.05;
  const Trace held = simulate(busy, 3.0, 1200);
  EXPECT_LE(*std::max_element(held.efforts.end() - 300, held.efforts.end()), 2.0);
  EXPECT_GE(tail_mean(held.efforts, 300), 1.9);
  // Nothing idle: the workers' link wait does not prove the link sets the pace (on one machine a receiver
  // short of CPU fills the sockets too), so the level below is measured again once its estimate is stale.
  EXPECT_LT(*std::min_element(held.efforts.end() - 300, held.efforts.end()), 2.0);
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
  // raw comes right after the warm-up's first part (the chunk that starts it and 2 more), without a
  // measured lz4 period (8 more). Parts of 4 chunks took 5.
  EXPECT_LE(settled - run.efforts.begin(), 3);
}

TEST(EffortController, ZeroPagesDoNotMakeLz4LookLikeItShrankTheDataALot) {
  // State with 85 % zero pages on a link faster than the compressor: lz4 sends 0.08 of the state's bytes,
  // but raw skips the zero pages too, and lz4 shrinks what is left only by half. Raw comes right after the
  // warm-up, as on data without zero pages.
  const Link fast{.link_gbps = 10, .cores = 1.0, .zero_pages = 0.85};
  const Trace run = simulate(fast, 3.0, 200);
  EXPECT_LE(std::find(run.efforts.begin(), run.efforts.end(), 0.0) - run.efforts.begin(), 3);
  EXPECT_TRUE(std::all_of(run.efforts.begin() + 3, run.efforts.end(), [](double e) { return e == 0.0; }));
}

TEST(EffortController, OneBusyStreamSkipsLz4sPeriodThoughAnotherCoreIdles) {
  // One stream on two cores, link faster than lz4: the worker is busy on its core, the other core idles
  // (the receiver, on the same host, takes a third of it). That core is out of the worker's reach: raw
  // comes right after the warm-up, as with a worker per core.
  const Link fast{.link_gbps = 10, .cores = 1.0, .idle_cores = 0.67};
  const Trace run = simulate(fast, 3.0, 200, 1);
  EXPECT_LE(std::find(run.efforts.begin(), run.efforts.end(), 0.0) - run.efforts.begin(), 3);
  EXPECT_TRUE(std::all_of(run.efforts.begin() + 3, run.efforts.end(), [](double e) { return e == 0.0; }));
  // The same worker on a link slower than lz4 waits on it, and the time it waits is CPU it can spend: it
  // climbs onto zstd, never down to raw.
  const Link slow{.link_gbps = 0.12, .cores = 1.0, .idle_cores = 0.67};
  const Trace climb = simulate(slow, 3.0, 600, 1);
  EXPECT_GT(*std::min_element(climb.efforts.begin(), climb.efforts.end()), 0.9);
  EXPECT_GE(tail_mean(climb.efforts, 300), 1.9);
}

TEST(EffortController, AWorkerBusyInTheKernelWhileItWaitsTriesNoMoreEffort) {
  // One stream to a peer on the same host: the worker "waits on the link" half the time, but the wait is the
  // kernel's send path on its own core, and the idle core is out of its reach. A quarter of lz4 is slower;
  // once its cost is known it is not tried again, every few periods, on the strength of the idle core.
  const Link veth{.link_gbps = 1.9, .cores = 1.0, .link_wait = 0.5, .idle_cores = 0.5, .waits_busy = true};
  ASSERT_TRUE(veth.link_limited(0));
  ASSERT_LT(veth.rate(0.25), veth.rate(0));
  const Trace run = simulate(veth, 3.0, 3000, 1);
  const auto settled = std::find(run.efforts.begin(), run.efforts.end(), 0.0);
  ASSERT_NE(settled, run.efforts.end());
  EXPECT_EQ(std::count_if(settled + 64, run.efforts.end(), [](double e) { return e > 0; }), 0);
  // Had the wait left its core idle, the trials would go on (they cost little here, and the link might
  // have changed).
  Link idle = veth;
  idle.waits_busy = false;
  const Trace tried = simulate(idle, 3.0, 3000, 1);
  const auto settled_too = std::find(tried.efforts.begin(), tried.efforts.end(), 0.0);
  ASSERT_NE(settled_too, tried.efforts.end());
  EXPECT_GT(std::count_if(settled_too + 64, tried.efforts.end(), [](double e) { return e > 0; }), 0);
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

TEST(EffortController, ALittleSpareCpuStillLetsTheLinkBoundWorkersTryAQuarterOfLz4) {
  // 10 Gbit/s with binary state on this project's 2-core machine: raw fills the link, the receiver on the
  // same host leaves about 0.06 cores idle, and a quarter of the chunks on lz4 costs about 0.32 cores more
  // in encoding, yet delivers more (fewer wire bytes also save kernel CPU on both ends, which encode costs
  // do not show). The trial is made and kept.
  const Link tight{.link_gbps = 1.17, .cores = 1.0, .other_load = 0.47};
  ASSERT_TRUE(tight.link_limited(0));
  ASSERT_GT(tight.rate(0.25), tight.rate(0) * 1.1);
  ASSERT_NEAR(tight.spare(0), 0.06, 0.01);
  const Trace run = simulate(tight, 3.0, 3000);
  EXPECT_GE(tail_mean(run.efforts, 1000), 0.2);
  // With half that idle (about a tenth of what the step asks) it is not tried once the costs are known: the
  // bar is not merely "any spare CPU at all". (This model delivers more at 0.25 either way: it does not take
  // the other load out of the sender's cores.)
  const Link tighter{.link_gbps = 1.17, .cores = 1.0, .other_load = 0.502};
  ASSERT_NEAR(tighter.spare(0), 0.03, 0.01);
  const Trace held = simulate(tighter, 3.0, 3000);
  const auto settled = std::find(held.efforts.begin(), held.efforts.end(), 0.0);
  ASSERT_NE(settled, held.efforts.end());
  EXPECT_EQ(std::count_if(settled + 64, held.efforts.end(), [](double e) { return e > 0; }), 0);
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

TEST(EffortController, OnASlowLinkDataThatVariesDoesNotHoldTheClimbBack) {
  // 1 Gbit/s with CPU to spare at the top, on data whose compressibility changes every 10 or 20 chunks: a
  // level is measured on other data than the next level meets, and the level above can seem slower than the
  // one below. Waiting on the link with idle CPU for all of the step up, the controller measures it again
  // instead of waiting for the old measurement to go stale (which left it at 2.72-2.77 on average over the
  // last 150 chunks, and reached the top at chunk 321 with runs of 20).
  for (const int run_chunks : {10, 20}) {
    const Link slow{
      .link_gbps = 0.12, .cores = 2.0, .link_wait = 0.6, .swing = 0.3, .run_chunks = run_chunks};
    const Trace run = simulate(slow, 3.0, 400);
    const auto top_at = std::find(run.efforts.begin(), run.efforts.end(), 3.0) - run.efforts.begin();
    EXPECT_LT(top_at, 260) << run_chunks;
    EXPECT_GT(tail_mean(run.efforts, 150), 2.95) << run_chunks;
  }
}

TEST(EffortController, AFastPathWhoseStepsNeedFarMoreCpuThanIdlesGetsNoTrials) {
  // Raw at 4 GB/s, the workers waiting on the sockets half the time with 0.4 cores idle: a quarter of lz4
  // would need 1.1 cores more and deliver 2.96 GB/s. It is not tried (it was, every few periods).
  const Link fast{.link_gbps = 4.0, .cores = 2.0, .link_wait = 0.5};
  ASSERT_TRUE(fast.link_limited(0));
  ASSERT_NEAR(fast.spare(0), 0.4, 1e-9);
  ASSERT_LT(fast.rate(0.25), fast.rate(0) * 0.8);
  const Trace run = simulate(fast, 3.0, 3000);
  EXPECT_EQ(std::count_if(run.efforts.begin() + 200, run.efforts.end(), [](double e) { return e > 0; }), 0);
  // Where the step's CPU is nearly idle already (a slower path), the trials go on.
  const Link slower{.link_gbps = 2.0, .cores = 1.6, .link_wait = 0.5};
  ASSERT_GT(slower.spare(0) + 0.5, 2.0 * (kCpu[1] - kCpu[0]) / 4);
  const Trace tried = simulate(slower, 3.0, 3000);
  EXPECT_GT(std::count_if(tried.efforts.begin() + 200, tried.efforts.end(), [](double e) { return e > 0; }),
            0);
}

TEST(EffortController, TheFifthRungIsClimbedWhereTheCpuPaysForIt) {
  // 1 Gbit/s with CPU for every rung: the sender's top rung (zstd two levels up) delivers most.
  const Link slow{.link_gbps = 0.12, .cores = 2.0};
  ASSERT_GT(slow.rate(4.0), slow.rate(3.0) * 1.05);
  const Trace run = simulate(slow, 4.0, 1200);
  EXPECT_GT(tail_mean(run.efforts, 300), 3.9);
  // With 1.5 cores the top rung is CPU-bound and slower than the one below; the best mix is about 3.55
  // (where the link and the CPU both run out). auto holds about there, not on the top rung.
  const Link tight{.link_gbps = 0.12, .cores = 1.5};
  ASSERT_LT(tight.rate(4.0), tight.rate(3.0));
  ASSERT_GT(tight.rate(3.5), tight.rate(3.0));
  const Trace held = simulate(tight, 4.0, 1200);
  EXPECT_GT(tail_mean(held.efforts, 300), 3.25);
  EXPECT_LT(tail_mean(held.efforts, 300), 3.75);
}

TEST(EffortController, ZstdWaitingOnTheLinkWithCpuIdleEndsTheOpeningOnZstd) {
  // 1 Gbit/s, CPU to spare: zstd's opening period falls on data that compresses worse than lz4's did, and
  // its rate is lower. Waiting on the link with CPU idle, it still delivers more than lz4 would have (it
  // shrinks the data more): the opening ends on zstd, not back on lz4 for a climb that takes periods.
  const Link slow{.link_gbps = 0.12, .cores = 2.0, .link_wait = 0.6, .swing = 0.3, .run_chunks = 16};
  const Trace run = simulate(slow, 3.0, 120);
  const auto zstd_at = std::find(run.efforts.begin(), run.efforts.end(), 2.0) - run.efforts.begin();
  ASSERT_LT(zstd_at, 24);
  EXPECT_GE(*std::min_element(run.efforts.begin() + zstd_at, run.efforts.end()), 2.0);
}

TEST(EffortController, AStartThatLooksCpuBoundOnASlowPathKeepsLz4sPeriod) {
  // 1 Gbit/s whose first chunks look CPU-bound (no link wait, no idle CPU); TCP measured the path. Skipping
  // lz4's period would start raw, and lz4 would count as lost: the climb would then start from raw.
  Link slow{.link_gbps = 0.12, .cores = 1.5, .tcp_path_rate = true, .busy_start_chunks = 16};
  Trace run = simulate(slow, 3.0, 600);
  EXPECT_EQ(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 0);
  EXPECT_GE(tail_mean(run.efforts, 300), 1.9);
  // TCP's first samples can be far off (a shaper's burst). The send queues, filling meanwhile, still show
  // that the link did not keep up even with lz4: raw is never tried.
  slow.start_path_gbps = 16;
  slow.start_fills_queues = true;
  run = simulate(slow, 3.0, 600);
  EXPECT_EQ(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 0);
  // zstd's opening period follows the warm-up's four parts and lz4's 8 chunks. A part needs 2 chunks and
  // 3 ms, and a chunk takes about 1 ms here: 3 chunks each (a warm-up that ended after 4 chunks here made
  // auto climb less at 1 Gbit/s; parts of 4 chunks, two of them, put zstd at 19).
  const auto zstd_at = std::find(run.efforts.begin(), run.efforts.end(), 2.0) - run.efforts.begin();
  EXPECT_GE(zstd_at, 20);
  EXPECT_LT(zstd_at, 24);
  EXPECT_GE(tail_mean(run.efforts, 300), 1.9);
  // A path that kept up at first and slowed down then misleads both: raw starts, but waits on the link, and
  // lz4 and zstd get their periods after all, instead of a climb from raw a quarter step at a time.
  slow.start_fills_queues = false;
  run = simulate(slow, 3.0, 600);
  EXPECT_LE(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 24);
  EXPECT_LT(std::find(run.efforts.begin(), run.efforts.end(), 2.0) - run.efforts.begin(), 80);
  EXPECT_GE(tail_mean(run.efforts, 300), 1.9);
  // When only the warm-up's first part (3 chunks) misleads, raw's own warm-up already waits on the link with
  // CPU idle: lz4 is back after that, before raw's measured period.
  slow.busy_start_chunks = 3;
  run = simulate(slow, 3.0, 600);
  EXPECT_LE(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 8);  // raw's warm-up only (+8: its period)
  EXPECT_LT(std::find(run.efforts.begin(), run.efforts.end(), 2.0) - run.efforts.begin(), 32);
  // A fast path (faster than lz4) still skips it, right after the warm-up's first part.
  const Link fast{.link_gbps = 10, .cores = 1.0, .tcp_path_rate = true, .busy_start_chunks = 16};
  run = simulate(fast, 3.0, 200);
  EXPECT_LE(std::find(run.efforts.begin(), run.efforts.end(), 0.0) - run.efforts.begin(), 3);
}

TEST(EffortController, ATunedSlowLinkKeepsLz4sPeriodWhereTcpSamplesABurst) {
  // 1 Gbit/s whose first chunks look CPU-bound while TCP reports the shaper's burst, and the send queues do
  // not fill: without a profile raw starts (AStartThatLooksCpuBoundOnASlowPathKeepsLz4sPeriod). dstx tune
  // measured the link at 0.12 GB/s: raw cannot deliver what lz4 does, and is never tried.
  const Link slow{.link_gbps = 0.12, .cores = 1.5, .tcp_path_rate = true, .busy_start_chunks = 16,
                  .start_path_gbps = 16};
  const EffortPrior tuned{.raw_rate = 0.12e9, .lz4_rate = 1 / kCpu[1] * 1e9};
  ASSERT_FALSE(tuned.opens_raw(2));
  const Trace untuned = simulate(slow, 3.0, 600);
  ASSERT_GT(std::count(untuned.efforts.begin(), untuned.efforts.end(), 0.0), 0);
  // A --bandwidth cap at the link's rate says as much, without a profile.
  for (const EffortPrior prior : {tuned, EffortPrior{}.capped(0.12e9)}) {
    SCOPED_TRACE(prior.lz4_rate);
    const Trace run = simulate(slow, 3.0, 600, 2, prior);
    EXPECT_EQ(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 0);
    EXPECT_LT(std::find(run.efforts.begin(), run.efforts.end(), 2.0) - run.efforts.begin(),
              std::find(untuned.efforts.begin(), untuned.efforts.end(), 2.0) - untuned.efforts.begin());
    EXPECT_GE(tail_mean(run.efforts, 300), 1.9);
    EXPECT_LT(run.seconds, untuned.seconds);
  }
}

TEST(EffortPrior, ACapBoundsTheTunedRawRate) {
  const EffortPrior tuned{.raw_rate = 3e9, .lz4_rate = 0.5e9};
  EXPECT_EQ(tuned.capped(0).raw_rate, 3e9);
  EXPECT_EQ(tuned.capped(5e9).raw_rate, 3e9);
  EXPECT_EQ(tuned.capped(1e8).raw_rate, 1e8);
  EXPECT_EQ(tuned.capped(1e8).lz4_rate, 0.5e9);
  EXPECT_TRUE(tuned.opens_raw(2));
  EXPECT_FALSE(tuned.capped(1e8).opens_raw(2));
  EXPECT_EQ(EffortPrior{}.capped(1e8).raw_rate, 1e8);  // the cap alone
  EXPECT_FALSE(EffortPrior{}.capped(1e8).opens_raw(1));  // but not lz4's speed
}

TEST(EffortController, RawIsTriedWhereZeroPagesLetItOutrunLz4OnASlowerPath) {
  // 85 % zero pages: the path carries 0.6 GB/s of wire bytes, less than lz4's 1.33 GB/s of state, but raw
  // drops the zero pages and delivers 4 GB/s of state. Raw is tried after lz4's period and kept, whether
  // the path's rate comes from TCP or from dstx tune.
  const Link fast{.link_gbps = 4, .cores = 2.0, .tcp_path_rate = true, .zero_pages = 0.85};
  const EffortPrior tuned{.raw_rate = 0.6e9, .lz4_rate = 1 / kCpu[1] * 1e9};
  for (const EffortPrior prior : {EffortPrior{}, tuned}) {
    SCOPED_TRACE(prior.raw_rate);
    const Trace run = simulate(fast, 3.0, 200, 2, prior);
    EXPECT_LE(std::find(run.efforts.begin(), run.efforts.end(), 0.0) - run.efforts.begin(), 24);
    EXPECT_LT(tail_mean(run.efforts, 100), 0.1);
  }
}

TEST(EffortController, AVerySlowLinksWarmUpLastsAsLongAsTwoPartsCutAtTheirLongest) {
  // 40 Mbit/s: a part of the warm-up (2 chunks) takes longer than a period may, and is cut. The warm-up
  // ends after two such parts, as when it had two parts of 4 chunks, not after all four: on a link this slow
  // the opening would otherwise start ~0.4 s later.
  const Link slow{.link_gbps = 0.005, .cores = 1.5};
  const Trace run = simulate(slow, 3.0, 60);
  const auto zstd_at = std::find(run.efforts.begin(), run.efforts.end(), 2.0) - run.efforts.begin();
  // The first chunk, two parts of 2 chunks, lz4's period cut after 2 (with four parts: 11).
  EXPECT_LE(zstd_at, 7);
  EXPECT_EQ(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 0);
}

TEST(EffortController, ATunedLinkFasterThanLz4OpensOnRawWithoutItsWarmUp) {
  // dstx tune measured this link at 3 GB/s raw and lz4 at 0.67 GB/s a core (kCpu[1]): raw from the first
  // chunk, where the warm-up alone sends the first 3 chunks with lz4.
  const Link fast{.link_gbps = 10, .cores = 1.0};
  const EffortPrior tuned{.raw_rate = 3e9, .lz4_rate = 1 / kCpu[1] * 1e9};
  ASSERT_TRUE(tuned.opens_raw(2));
  const Trace run = simulate(fast, 3.0, 200, 2, tuned);
  EXPECT_TRUE(std::all_of(run.efforts.begin(), run.efforts.end(), [](double e) { return e == 0.0; }));
  const Trace untuned = simulate(fast, 3.0, 200);
  EXPECT_EQ(untuned.efforts[0], 1.0);
  EXPECT_LT(run.seconds, untuned.seconds);
  // Not when lz4 keeps up on the workers there are (5 streams: 3.3 GB/s), nor without lz4's speed.
  EXPECT_FALSE(tuned.opens_raw(5));
  EXPECT_EQ(simulate(fast, 3.0, 200, 5, tuned).efforts[0], 1.0);
  EXPECT_FALSE((EffortPrior{.raw_rate = 3e9}.opens_raw(1)));
}

TEST(EffortController, AProfileTunedOnAFastLinkGivesLz4BackOnASlowOne) {
  // The same profile on a 1 Gbit/s link: raw's warm-up waits on the link with CPU idle, at far less than
  // what lz4's (tuned) speed allows, so lz4 gets its period and zstd follows, as without the profile. Without
  // lz4's tuned cost nothing would bring it back, and lz4 would count as lost after raw's measured period:
  // the climb would start from raw, a quarter step at a time.
  const Link slow{.link_gbps = 0.12, .cores = 1.5};
  const EffortPrior tuned{.raw_rate = 3e9, .lz4_rate = 1 / kCpu[1] * 1e9};
  const Trace run = simulate(slow, 3.0, 600, 2, tuned);
  EXPECT_EQ(run.efforts[0], 0.0);
  // The first chunk and raw's warm-up (8 chunks), then lz4's (8 draining, 8 measured) and zstd's.
  EXPECT_LE(std::count(run.efforts.begin(), run.efforts.end(), 0.0), 9);
  EXPECT_LE(std::find(run.efforts.begin(), run.efforts.end(), 2.0) - run.efforts.begin(), 26);
  EXPECT_GT(tail_mean(run.efforts, 300), 2.9);
}

TEST(EffortController, WithoutZstdTheLadderStopsAtLz4) {
  const Link slow{.link_gbps = 0.12, .cores = 1.5};
  const Trace run = simulate(slow, 1.0, 400);
  EXPECT_EQ(run.efforts.back(), 1.0);
  EXPECT_GT(*std::min_element(run.efforts.begin(), run.efforts.end()), 0.9);  // lz4 waited: no raw period
}

// The idle meter on a made-up /proc and /sys: cpuidle's exact counters for a CPU that went in and out of idle
// states, /proc/stat for one that did not (it may have slept all along).
class IdleMeterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int cpu : {0, 1}) fs::create_directories(state_dir(cpu));
  }
  fs::path state_dir(int cpu) const {
    return root_ / "sys/devices/system/cpu" / ("cpu" + std::to_string(cpu)) / "cpuidle/state0";
  }
  void write(const fs::path& f, const std::string& text) const {
    fs::create_directories(f.parent_path());
    std::ofstream(f) << text;
  }
  // /proc/stat's per-CPU idle ticks (USER_HZ, 10 ms here) and each CPU's cpuidle residency (us) and entries.
  void set(long idle0, long idle1, long us0, long entries0, long us1, long entries1) const {
    write(root_ / "proc/stat", "cpu  10 0 10 " + std::to_string(idle0 + idle1) + " 0 0 0 0 0 0\n" +
                                   "cpu0 5 0 5 " + std::to_string(idle0) + " 0 0 0 0 0 0\n" +
                                   "cpu1 5 0 5 " + std::to_string(idle1) + " 0 0 0 0 0 0\nintr 1 2 3\n");
    write(state_dir(0) / "time", std::to_string(us0) + "\n");
    write(state_dir(0) / "usage", std::to_string(entries0) + "\n");
    write(state_dir(1) / "time", std::to_string(us1) + "\n");
    write(state_dir(1) / "usage", std::to_string(entries1) + "\n");
  }
  const test::ScratchDir scratch_{"dstx-idle"};
  const fs::path& root_ = scratch_.path();
};

TEST_F(IdleMeterTest, CountsCpuidleForCpusThatWokeAndProcStatForTheOthers) {
  if (::sysconf(_SC_CLK_TCK) != 100) GTEST_SKIP() << "USER_HZ is not 100 here";
  cpu_set_t both;
  CPU_ZERO(&both);
  CPU_SET(0, &both);
  CPU_SET(1, &both);
  set(100, 100, 1000000, 10, 1000000, 10);
  IdleMeter meter(both, root_.string());
  ASSERT_TRUE(meter.precise());
  EXPECT_DOUBLE_EQ(meter(), 0.0);  // the first reading is the baseline
  // cpu0 slept 5 ms in 3 naps (cpuidle; /proc/stat's tick says 10 ms); cpu1 never woke up from a sleep that
  // cpuidle has not counted yet: 20 ms by /proc/stat.
  set(101, 102, 1005000, 13, 1000000, 10);
  EXPECT_NEAR(meter(), 0.005 + 0.020, 1e-9);
  // Counters that go backwards (a CPU hot-plugged) add nothing.
  set(101, 101, 1004000, 14, 1000000, 10);
  EXPECT_NEAR(meter(), 0.025, 1e-9);
  // /proc/stat unreadable or without a CPU of the set: unknown.
  fs::remove(root_ / "proc/stat");
  EXPECT_LT(meter(), 0);
  write(root_ / "proc/stat", "cpu  1 0 1 1 0 0 0 0 0 0\ncpu0 1 0 1 1 0 0 0 0 0 0\n");
  EXPECT_LT(meter(), 0);
}

TEST_F(IdleMeterTest, WithoutCpuidleForEveryCpuOnlyProcStatCounts) {
  if (::sysconf(_SC_CLK_TCK) != 100) GTEST_SKIP() << "USER_HZ is not 100 here";
  cpu_set_t three;
  CPU_ZERO(&three);
  for (int cpu : {0, 1, 2}) CPU_SET(cpu, &three);
  set(100, 100, 1000000, 10, 1000000, 10);
  write(root_ / "proc/stat", "cpu0 1 0 1 100 0 0 0 0 0 0\ncpu1 1 0 1 100 0 0 0 0 0 0\ncpu2 1 0 1 100 0\n");
  IdleMeter meter(three, root_.string());
  EXPECT_FALSE(meter.precise());  // cpu2 has no cpuidle
  EXPECT_DOUBLE_EQ(meter(), 0.0);
  write(root_ / "proc/stat", "cpu0 1 0 1 101 0 0 0 0 0 0\ncpu1 1 0 1 100 0 0 0 0 0 0\ncpu2 1 0 1 103 0\n");
  EXPECT_NEAR(meter(), 0.040, 1e-9);  // cpuidle's counters are not read at all
}

// --- which chunks take the rung above ---------------------------------------------------------------------

// Feeds `estimates` in order, with the share asked; returns which chunks went up.
std::vector<bool> pick(ShareSelector& sel, double share, const std::vector<double>& estimates) {
  std::vector<bool> up;
  for (double e : estimates) {
    const double limit = sel.limit(share);
    up.push_back(limit >= 0 && e <= limit);
    sel.record(share, e, up.back());
  }
  return up;
}

TEST(ShareSelector, TakesTheMostCompressibleShareOfMixedChunks) {
  ShareSelector sel;
  // Alternating: a compressible chunk (0.3), a poor one (0.9), a fair one (0.6), a poor one.
  std::vector<double> e;
  for (int i = 0; i < 400; ++i) e.push_back(i % 2 ? 0.9 : i % 4 == 0 ? 0.3 : 0.6);
  const std::vector<bool> up = pick(sel, 0.25, e);
  size_t good = 0, other = 0;
  for (size_t i = 100; i < e.size(); ++i) (e[i] == 0.3 ? good : other) += up[i];
  EXPECT_EQ(good, 75u);  // every compressible chunk after the warm-up, and nothing else
  EXPECT_EQ(other, 0u);
  // At a half share, the fair ones join them; the poor ones still never go.
  const std::vector<bool> half = pick(sel, 0.5, e);
  size_t poor = 0, taken = 0;
  for (size_t i = 100; i < e.size(); ++i) {
    taken += half[i];
    poor += half[i] && e[i] == 0.9;
  }
  EXPECT_EQ(poor, 0u);
  EXPECT_NEAR(double(taken), 150, 3);
}

TEST(ShareSelector, KeepsTheShareWhenEstimatesTie) {
  ShareSelector sel;
  const std::vector<bool> up = pick(sel, 0.25, std::vector<double>(400, 0.01));  // zero pages everywhere
  EXPECT_NEAR(double(std::count(up.begin(), up.end(), true)), 100, ShareSelector::kCreditLimit + 1);
  // Ahead of the share, a tie goes down: the chunks are spread, not sent up in runs to the credit limit (2
  // chunks go up together once, where the selector leaves its even start).
  size_t run = 0, longest = 0;
  for (bool u : up) longest = std::max(longest, run = u ? run + 1 : 0);
  EXPECT_LE(longest, 2u);
}

TEST(ShareSelector, HoldsRunsToTheCreditLimit) {
  ShareSelector sel;
  std::vector<double> e;
  for (int i = 0; i < 64; ++i) e.push_back(i % 2 ? 0.8 : 0.4);  // history: half of it compressible
  pick(sel, 0.5, e);
  // A long run of very compressible chunks: only kCreditLimit of them beyond the half share go up.
  const std::vector<bool> run = pick(sel, 0.5, std::vector<double>(40, 0.1));
  const double taken = double(std::count(run.begin(), run.end(), true));
  EXPECT_LE(taken, 20 + ShareSelector::kCreditLimit + 1);
  EXPECT_GE(taken, 20);
  // And a run of poor ones (still compressible): once the credit has gone from ahead to behind, the share
  // takes them too.
  const std::vector<bool> poor = pick(sel, 0.5, std::vector<double>(40, 0.95));
  EXPECT_GE(double(std::count(poor.begin(), poor.end(), true)), 20 - 2 * ShareSelector::kCreditLimit - 1);
}

TEST(ShareSelector, WithoutEstimatesSpreadsTheShareEvenly) {
  ShareSelector sel;
  std::vector<bool> up;
  for (int i = 0; i < 12; ++i) {
    up.push_back(sel.evenly(0.25));
    sel.record(0.25, -1, up.back());
  }
  EXPECT_EQ(up, std::vector<bool>({false, false, false, true, false, false, false, true, false, false, false,
                                   true}));
  EXPECT_LT(ShareSelector().limit(0), 0);
  EXPECT_TRUE(std::isinf(ShareSelector().limit(1)));
  // Too few estimates: evenly.
  ShareSelector fresh;
  EXPECT_LT(fresh.limit(0.5), 0);
  fresh.record(0.5, 0.7, false);
  EXPECT_TRUE(std::isinf(fresh.limit(0.5)));
}

}  // namespace
}  // namespace dstx::engine
