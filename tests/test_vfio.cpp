// io/vfio: the v2 state machine table against every from/to pair, the host kernel's error messages, and the
// emulated kernel and drivers driven through VfioDevice exactly as the migration code drives them: every
// v1 region clause and every v2 arc.
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "io/ring.h"
#include "io/vfio/device.h"
#include "io/vfio/emu_kernel.h"
#include "io/vfio/mig_fsm.h"

namespace dstx::io::vfio {
namespace {

using S = MigState;

constexpr uint64_t kAll = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;
constexpr uint64_t kFlagSets[] = {VFIO_MIGRATION_STOP_COPY, VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
                                  VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY, kAll};
constexpr S kStates[] = {S::error,    S::stop,        S::running,  S::stop_copy,
                         S::resuming, S::running_p2p, S::pre_copy, S::pre_copy_p2p};

std::string path_text(S from, const std::optional<std::vector<S>>& path) {
  if (!path) return "blocked";
  std::string t = mig_state_name(from);
  for (S s : *path) t += std::string(" -> ") + mig_state_name(s);
  return t;
}

// ---------------------------------------------------------------- the FSM table

// The combination transitions listed in the kernel's comment above vfio_from_fsm_table, all features on.
const char* kKernelCombinations[] = {
    "PRE_COPY -> PRE_COPY_P2P -> STOP_COPY",
    "PRE_COPY -> RUNNING -> RUNNING_P2P",
    "PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP",
    "PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP -> RESUMING",
    "PRE_COPY_P2P -> RUNNING_P2P -> RUNNING",
    "PRE_COPY_P2P -> RUNNING_P2P -> STOP",
    "PRE_COPY_P2P -> RUNNING_P2P -> STOP -> RESUMING",
    "RESUMING -> STOP -> RUNNING_P2P",
    "RESUMING -> STOP -> RUNNING_P2P -> PRE_COPY_P2P",
    "RESUMING -> STOP -> RUNNING_P2P -> RUNNING",
    "RESUMING -> STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY",
    "RESUMING -> STOP -> STOP_COPY",
    "RUNNING -> RUNNING_P2P -> PRE_COPY_P2P",
    "RUNNING -> RUNNING_P2P -> STOP",
    "RUNNING -> RUNNING_P2P -> STOP -> RESUMING",
    "RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY",
    "RUNNING_P2P -> RUNNING -> PRE_COPY",
    "RUNNING_P2P -> STOP -> RESUMING",
    "RUNNING_P2P -> STOP -> STOP_COPY",
    "STOP -> RUNNING_P2P -> PRE_COPY_P2P",
    "STOP -> RUNNING_P2P -> RUNNING",
    "STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY",
    "STOP_COPY -> STOP -> RESUMING",
    "STOP_COPY -> STOP -> RUNNING_P2P",
    "STOP_COPY -> STOP -> RUNNING_P2P -> RUNNING",
};

TEST(MigFsm, EveryPairWithEveryFeatureMatchesTheKernelsList) {
  std::map<std::pair<S, S>, std::string> listed;
  for (const char* c : kKernelCombinations) {
    std::istringstream in(c);
    std::vector<S> states;
    std::string word;
    while (in >> word) {
      if (word == "->") continue;
      S s;
      ASSERT_TRUE(mig_state_from_name(word, &s)) << word;
      states.push_back(s);
    }
    listed[{states.front(), states.back()}] = c;
  }
  ASSERT_EQ(listed.size(), 25u);
  int single = 0, combined = 0, blocked = 0, same = 0;
  for (S from : kStates) {
    for (S to : kStates) {
      if (from == S::error || to == S::error) continue;
      const auto path = mig_path(from, to, kAll);
      const std::string got = path_text(from, path);
      if (from == to) {
        EXPECT_EQ(got, mig_state_name(from));
        ++same;
      } else if (from == S::stop_copy && (to == S::pre_copy || to == S::pre_copy_p2p)) {
        EXPECT_EQ(got, "blocked") << mig_state_name(from) << " -> " << mig_state_name(to);
        ++blocked;
      } else if (listed.count({from, to})) {
        EXPECT_EQ(got, listed[std::make_pair(from, to)]);
        ++combined;
      } else {
        EXPECT_TRUE(mig_arc_required(from, to, kAll)) << got;
        EXPECT_EQ(got, std::string(mig_state_name(from)) + " -> " + mig_state_name(to));
        ++single;
      }
    }
  }
  EXPECT_EQ(same, 7);
  EXPECT_EQ(blocked, 2);
  EXPECT_EQ(combined, 25);
  EXPECT_EQ(single, 15);  // the arcs a driver with P2P and PRE_COPY implements
}

// Shortest paths over the arcs a driver implements, where a saving-group state may sit inside a path only
// while the path has not left the group it started in (the session carries on; the uAPI's rule), found by
// breadth-first search: an independent statement of what the table encodes.
std::optional<size_t> shortest(S from, S to, uint64_t flags) {
  if (!mig_state_supported(from, flags) || !mig_state_supported(to, flags)) return std::nullopt;
  if (from == S::stop_copy && (to == S::pre_copy || to == S::pre_copy_p2p)) return std::nullopt;  // blocked
  struct Node {
    S s;
    bool in_session;  // every state so far is a saving state: the starting session goes on
  };
  std::map<std::pair<S, bool>, size_t> dist{{{from, mig_state_saving(from)}, 0}};
  std::deque<Node> queue{{from, mig_state_saving(from)}};
  while (!queue.empty()) {
    const Node n = queue.front();
    queue.pop_front();
    const size_t d = dist[{n.s, n.in_session}];
    if (n.s == to) return d;
    if (n.s != from && mig_state_saving(n.s) && !n.in_session) continue;  // entered the group: must end here
    for (S next : kStates) {
      if (!mig_state_supported(next, flags) || !mig_arc_required(n.s, next, flags)) continue;
      const Node m{next, n.in_session && mig_state_saving(next)};
      if (dist.count({m.s, m.in_session})) continue;
      dist[{m.s, m.in_session}] = d + 1;
      queue.push_back(m);
    }
  }
  return std::nullopt;
}

TEST(MigFsm, EveryPairIsAShortestPathOverImplementedArcsForEveryFeatureSet) {
  for (uint64_t flags : kFlagSets) {
    for (S from : kStates) {
      for (S to : kStates) {
        const auto path = mig_path(from, to, flags);
        const auto best = shortest(from, to, flags);
        SCOPED_TRACE(std::string("flags ") + std::to_string(flags) + ": " + mig_state_name(from) + " -> " +
                     mig_state_name(to) + " = " + path_text(from, path));
        ASSERT_EQ(path.has_value(), best.has_value());
        if (!path) continue;
        EXPECT_EQ(path->size(), *best);
        S at = from;
        for (size_t i = 0; i < path->size(); ++i) {
          const S next = (*path)[i];
          EXPECT_TRUE(mig_arc_required(at, next, flags)) << "uses an arc the driver need not implement";
          EXPECT_TRUE(mig_state_supported(next, flags));
          if (i + 1 < path->size() && !mig_state_saving(from)) {
            EXPECT_FALSE(mig_state_saving(next)) << "a session opened inside the path";
          }
          at = next;
        }
      }
    }
  }
}

TEST(MigFsm, ErrorAndUnsupportedStatesCannotBeRequested) {
  S next;
  for (S s : kStates) {
    EXPECT_FALSE(mig_next_state(s, S::error, kAll, &next)) << mig_state_name(s);
    EXPECT_FALSE(mig_next_state(S::error, s, kAll, &next)) << "ERROR is left only by reset";
  }
  EXPECT_FALSE(mig_path(S::running, S::running_p2p, VFIO_MIGRATION_STOP_COPY));
  EXPECT_FALSE(mig_path(S::running, S::pre_copy, VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P));
  EXPECT_FALSE(mig_path(S::running, S::pre_copy_p2p, VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY));
  EXPECT_FALSE(mig_path(S::running, S::stop, 0)) << "no STOP_COPY flag: no migration at all";
  EXPECT_FALSE(mig_next_state(S(9), S::stop, kAll, &next));
  EXPECT_STREQ(mig_state_name(S(9)), "INVALID");
}

TEST(MigFsm, V1StateNames) {
  EXPECT_EQ(v1_state_name(kV1Running), "RUNNING");
  EXPECT_EQ(v1_state_name(kV1Saving | kV1Running), "SAVING|RUNNING");
  EXPECT_EQ(v1_state_name(kV1Saving), "SAVING");
  EXPECT_EQ(v1_state_name(kV1Stop), "STOP");
  EXPECT_EQ(v1_state_name(kV1Resuming), "RESUMING");
  EXPECT_EQ(v1_state_name(kV1Saving | kV1Resuming), "ERROR");
  EXPECT_EQ(v1_state_name(kV1Resuming | kV1Running), "INVALID(0x5)");
  EXPECT_TRUE(v1_state_valid(kV1Saving | kV1Running));
  EXPECT_FALSE(v1_state_valid(kV1Resuming | kV1Running));
  EXPECT_TRUE(v1_state_is_error(kV1Error));
}

// ---------------------------------------------------------------- the host kernel

TEST(RealKernel, OpeningAMissingCdevNamesThePathAndTheErrno) {
  const std::string path = "/dev/vfio/devices/vfio99";
  if (access(path.c_str(), F_OK) == 0) GTEST_SKIP() << path << " exists here";
  try {
    VfioDevice::open(real_kernel(), parse_device_path("vfio:" + path), ProtocolChoice::detect);
    FAIL() << "opened a device that does not exist";
  } catch (const VfioError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("open " + path), std::string::npos) << what;
    EXPECT_NE(what.find("errno 2, ENOENT"), std::string::npos) << what;
    EXPECT_NE(what.find("No such file or directory"), std::string::npos) << what;
    EXPECT_EQ(e.err(), ENOENT);
  }
}

TEST(RealKernel, OpeningAGroupWithoutVfioNamesTheContainer) {
  if (access("/dev/vfio/vfio", F_OK) == 0) GTEST_SKIP() << "/dev/vfio/vfio exists here";
  try {
    VfioDevice::open(real_kernel(), parse_device_path("vfio-group:/dev/vfio/7:0000:01:00.0"),
                     ProtocolChoice::v2);
    FAIL();
  } catch (const VfioError& e) {
    EXPECT_NE(std::string(e.what()).find("open /dev/vfio/vfio"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ENOENT"), std::string::npos) << e.what();
  }
}

TEST(RealKernel, CallsReturnNegativeErrno) {
  auto k = real_kernel();
  EXPECT_EQ(k->open("/nonexistent/dstx", O_RDONLY), -ENOENT);
  EXPECT_EQ(k->close(-1), -EBADF);
  EXPECT_EQ(k->ioctl(-1, VFIO_GET_API_VERSION, nullptr), -EBADF);
  char b[4];
  EXPECT_EQ(k->pread(-1, b, 4, 0), -EBADF);
  void* p = nullptr;
  EXPECT_EQ(k->mmap(-1, 4096, 1, 0, &p), -EBADF);
  auto ring = make_ring(Backend::syscall);
  EXPECT_EQ(k->read(*ring, -1, b, 4, -1), -EBADF);
}

TEST(DevicePaths, ParseAndSayWhatIsWrong) {
  const DevicePath c = parse_device_path("vfio:/dev/vfio/devices/vfio3");
  EXPECT_EQ(c.kind, DevicePath::Kind::cdev);
  EXPECT_EQ(c.path, "/dev/vfio/devices/vfio3");
  const DevicePath g = parse_device_path("vfio-group:/dev/vfio/12:0000:01:00.0");
  EXPECT_EQ(g.kind, DevicePath::Kind::group);
  EXPECT_EQ(g.path, "/dev/vfio/12");
  EXPECT_EQ(g.name, "0000:01:00.0");
  EXPECT_EQ(g.spec(), "vfio-group:/dev/vfio/12:0000:01:00.0");
  const DevicePath m = parse_device_path("vfio-group:/dev/vfio/3:83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
  EXPECT_EQ(m.name, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");  // an mdev (mtty) is named by its UUID
  EXPECT_THROW(parse_device_path("vfio:"), std::invalid_argument);
  EXPECT_THROW(parse_device_path("vfio-group:/dev/vfio/12"), std::invalid_argument);
  EXPECT_THROW(parse_device_path("file:/x"), std::invalid_argument);
  ProtocolChoice p;
  EXPECT_TRUE(protocol_choice_from_name("v1", &p) && p == ProtocolChoice::v1);
  EXPECT_FALSE(protocol_choice_from_name("v3", &p));
}

// ---------------------------------------------------------------- emulated devices

struct Emu {
  explicit Emu(const EmuDeviceConfig& c, bool group = false, ProtocolChoice choice = ProtocolChoice::detect)
      : k(std::make_shared<EmuKernel>()) {
    const EmuKernel::Added a = k->add_device(c);
    id = a.id;
    dev = VfioDevice::open(k, group ? a.group : a.cdev, choice);
  }
  std::shared_ptr<EmuKernel> k;
  int id = -1;
  std::unique_ptr<VfioDevice> dev;
};

EmuDeviceConfig config(Protocol p, uint64_t size = 1 << 20) {
  EmuDeviceConfig c;
  c.protocol = p;
  c.state.size = size;
  c.state.profile = Profile::mixed;
  c.state.seed = 5;
  c.section_bytes = 256 << 10;
  return c;
}

std::unique_ptr<Ring> ring() {
  return make_ring(choose_backend(nullptr));
}

TEST(EmuDevice, OpensThroughTheCdevAndTheGroupAndDetectsItsProtocol) {
  for (bool group : {false, true}) {
    Emu v2(config(Protocol::v2), group);
    EXPECT_EQ(v2.dev->protocol(), Protocol::v2);
    EXPECT_EQ(v2.dev->migration_flags(), kAll);
    EXPECT_EQ(v2.dev->state(), S::running);
    Emu v1(config(Protocol::v1), group);
    EXPECT_EQ(v1.dev->protocol(), Protocol::v1);
    EXPECT_EQ(v1.dev->v1_region().index, kPciNumRegions) << "found past the decoy type capability on BAR0";
    EXPECT_EQ(v1.dev->v1_state(), kV1Running);
  }
}

TEST(EmuDevice, AForcedProtocolTheDeviceLacksIsAClearError) {
  try {
    Emu e(config(Protocol::v2), false, ProtocolChoice::v1);
    FAIL();
  } catch (const VfioError& e) {
    EXPECT_NE(std::string(e.what()).find("no v1 migration region"), std::string::npos) << e.what();
  }
  try {
    Emu e(config(Protocol::v1), false, ProtocolChoice::v2);
    FAIL();
  } catch (const VfioError& e) {
    EXPECT_NE(std::string(e.what()).find("no v2 migration"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ENOTTY"), std::string::npos) << e.what();
  }
}

TEST(EmuDevice, ACdevRefusesEverythingBeforeBindAndASecondBind) {
  auto k = std::make_shared<EmuKernel>();
  const EmuKernel::Added a = k->add_device(config(Protocol::v2));
  const int fd = k->open(a.cdev.path, O_RDWR);
  ASSERT_GE(fd, 0);
  vfio_device_info info{};
  info.argsz = sizeof info;
  EXPECT_EQ(k->ioctl(fd, VFIO_DEVICE_GET_INFO, &info), -EINVAL)
      << "no access before VFIO_DEVICE_BIND_IOMMUFD";
  auto dev = VfioDevice::open(k, a.cdev, ProtocolChoice::detect);  // binds its own fd
  const int iommu = k->open("/dev/iommu", O_RDWR);
  BindIommufd b{.argsz = sizeof b, .flags = 0, .iommufd = iommu, .out_devid = 0};
  EXPECT_EQ(k->ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, &b), -EBUSY);
  EXPECT_THROW(VfioDevice::open(k, a.group, ProtocolChoice::detect), VfioError) << "in use through the cdev";
  k->close(iommu);
  k->close(fd);
}

// ---- v1 clauses

// The region is found through the capability chain, and the data section is mapped where the sparse-mmap
// capability says (and only there).
TEST(EmuV1, RegionAndSparseMmapAreas) {
  EmuDeviceConfig c = config(Protocol::v1);
  c.section_bytes = 1 << 20;
  Emu e(c);
  const V1Region& r = e.dev->v1_region();
  EXPECT_EQ(r.size, 4096u + (1 << 20));
  EXPECT_NE(r.offset, 0u);
  ASSERT_EQ(r.areas.size(), 2u);  // mmap=part: a hole in the middle
  EXPECT_EQ(e.dev->v1_mapped_areas(), 2);
  EXPECT_EQ(r.areas[0].offset, 4096u);
  const VfioDevice::Span head = e.dev->v1_span(0);
  EXPECT_EQ(head.addr, nullptr) << "the header page is trapped, never mapped";
  EXPECT_EQ(head.len, 4096u);
  const uint64_t hole = r.areas[0].offset + r.areas[0].size;
  const VfioDevice::Span in_hole = e.dev->v1_span(hole);
  EXPECT_EQ(in_hole.addr, nullptr);
  EXPECT_EQ(in_hole.len, r.areas[1].offset - hole);
  void* p = nullptr;
  EXPECT_EQ(e.k->mmap(e.dev->fd(), 4096, 1, r.offset + hole, &p), -EINVAL) << "outside the sparse areas";
  EXPECT_EQ(e.k->mmap(e.dev->fd(), 4096, 1, r.offset, &p), -EINVAL) << "the header";

  c.mmap = EmuDeviceConfig::Mmap::none;
  Emu none(c);
  EXPECT_EQ(none.dev->v1_mapped_areas(), 0);
  EXPECT_EQ(none.dev->v1_span(4096).len, UINT64_MAX);

  // A driver that maps the section read-only: mapped for reading, but written through the fd.
  c.mmap = EmuDeviceConfig::Mmap::read_only;
  Emu ro(c);
  EXPECT_EQ(ro.dev->v1_mapped_areas(), 1);
  EXPECT_EQ(ro.k->mmap(ro.dev->fd(), 4096, PROT_READ | PROT_WRITE, ro.dev->v1_region().offset + 4096, &p),
            -EACCES);
  EXPECT_NE(ro.dev->v1_span(4096).addr, nullptr);
  const VfioDevice::Span for_write = ro.dev->v1_span(4096, /*for_write=*/true);
  EXPECT_EQ(for_write.addr, nullptr);
  EXPECT_EQ(for_write.len, UINT64_MAX);
  EXPECT_NE(e.dev->v1_span(4096, /*for_write=*/true).addr, nullptr);  // writable where the driver allows it
}

// Save: pending_bytes -> data_offset -> data_size -> data -> pending_bytes, in that order; repeated
// data_offset/data_size reads describe the same buffer; the section is reused (poisoned here) once
// pending_bytes is read again.
TEST(EmuV1, SaveLoopOrderAndSectionReuse) {
  Emu e(config(Protocol::v1));
  e.k->set_trace(e.id, true);
  ASSERT_EQ(e.dev->v1_set_state(kV1Saving), 0);
  const uint64_t first_pending = e.dev->v1_pending_bytes();
  EXPECT_GT(first_pending, 1u << 20) << "the whole state is pending";
  uint64_t pending = first_pending;
  std::vector<std::byte> copy;
  uint64_t sizes = 0;
  int txns = 0;
  std::byte* view = nullptr;
  uint64_t view_size = 0;
  while (pending > 0) {
    const uint64_t off = e.dev->v1_data_offset();
    const uint64_t size = e.dev->v1_data_size();
    EXPECT_EQ(e.dev->v1_data_offset(), off) << "data_offset again: the same buffer";
    EXPECT_EQ(e.dev->v1_data_size(), size);
    EXPECT_LE(size, 256u << 10);
    EXPECT_GE(off, 4096u);
    const VfioDevice::Span s = e.dev->v1_span(off);
    if (s.addr && s.len >= size && !view) {
      view = s.addr;
      view_size = size;
      copy.assign(s.addr, s.addr + size);
    }
    sizes += size;
    ++txns;
    const uint64_t before = pending;
    pending = e.dev->v1_pending_bytes();
    if (pending > 0) {
      EXPECT_LT(pending, before) << "pending falls as data is consumed";
    }
    if (view) {
      EXPECT_NE(std::memcmp(view, copy.data(), view_size), 0) << "consumed data must not be read again";
      view = nullptr;
    }
  }
  EXPECT_GT(txns, 4);
  const EmuCounters c = e.k->counters(e.id);
  EXPECT_EQ(c.save_transactions.size(), size_t(txns));
  EXPECT_GT(std::set<uint64_t>(c.save_transactions.begin(), c.save_transactions.end()).size(), 2u)
      << "data_size varies";
  // The trace: the order of the protocol, without data reads (the data came through the mapping).
  std::vector<std::string> expect = {"write device_state", "pending_bytes"};
  for (int i = 0; i < txns; ++i) {
    for (const char* s : {"data_offset", "data_size", "data_offset", "data_size", "pending_bytes"})
      expect.push_back(s);
  }
  EXPECT_EQ(c.trace, expect);
  ASSERT_EQ(e.dev->v1_set_state(kV1Stop), 0);
}

TEST(EmuV1, DataSizeBeforeDataOffsetAndOutOfStateAccessesAreRefused) {
  Emu e(config(Protocol::v1));
  EXPECT_THROW(e.dev->v1_data_offset(), VfioError) << "neither saving nor resuming";
  ASSERT_EQ(e.dev->v1_set_state(kV1Saving | kV1Running), 0);
  try {
    e.dev->v1_data_size();
    FAIL();
  } catch (const VfioError& x) {
    EXPECT_EQ(x.err(), EINVAL);
    EXPECT_NE(std::string(x.what()).find("data_size"), std::string::npos) << x.what();
  }
  EXPECT_EQ(e.dev->v1_pending_bytes() > 0, true);
  EXPECT_EQ(e.dev->v1_set_state(kV1Resuming | kV1Running), -EINVAL) << "RESUMING with another bit";
  EXPECT_EQ(e.dev->v1_set_state(kV1Error), -EINVAL) << "the error state cannot be requested";
  ASSERT_EQ(e.dev->v1_set_state(kV1Saving), 0);
  EXPECT_EQ(e.dev->v1_set_state(kV1Saving | kV1Running), -EINVAL) << "stop-and-copy back to pre-copy";
  EXPECT_EQ(e.dev->v1_set_state(kV1Resuming), -EINVAL) << "SAVING -> RESUMING";
}

TEST(EmuV1, PendingGrowsWhileThePreCopyDeviceRunsAndDirties) {
  EmuDeviceConfig c = config(Protocol::v1, 16 << 20);
  c.state.dirty_bytes_per_sec = 256ull << 20;
  Emu e(c);
  ASSERT_EQ(e.dev->v1_set_state(kV1Saving | kV1Running), 0);
  // Drain the initial pass.
  uint64_t pending = e.dev->v1_pending_bytes();
  for (int i = 0; i < 10000 && pending > (1 << 20); ++i) {
    e.dev->v1_data_offset();
    e.dev->v1_data_size();
    pending = e.dev->v1_pending_bytes();
  }
  const uint64_t low = pending;
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // ~12 MiB of dirtying at 256 MiB/s
  EXPECT_GT(e.dev->v1_pending_bytes(), low);
}

// Resume: data_offset, the bytes, data_size per transaction; a full save/load through two devices gives the
// same state digest, and the loader sees the source's transaction sizes.
TEST(EmuV1, ResumeTransactionsAndDigest) {
  Emu src(config(Protocol::v1, 3 << 20));
  Emu dst(config(Protocol::v1, 3 << 20));
  dst.k->set_trace(dst.id, true);
  ASSERT_EQ(src.dev->v1_set_state(kV1Saving), 0);
  ASSERT_EQ(dst.dev->v1_set_state(kV1Resuming), 0);
  auto r = ring();
  std::vector<uint64_t> sizes;
  std::vector<std::byte> buf;
  while (src.dev->v1_pending_bytes() > 0) {
    const uint64_t off = src.dev->v1_data_offset();
    const uint64_t size = src.dev->v1_data_size();
    buf.resize(size);
    const int64_t n =
        src.k->read(*r, src.dev->fd(), buf.data(), size, int64_t(src.dev->v1_region().offset + off));
    ASSERT_EQ(n, int64_t(size));
    const uint64_t doff = dst.dev->v1_data_offset();
    ASSERT_EQ(dst.k->write(*r, dst.dev->fd(), buf.data(), size, int64_t(dst.dev->v1_region().offset + doff)),
              int64_t(size));
    dst.dev->v1_set_data_size(size);
    sizes.push_back(size);
  }
  ASSERT_EQ(src.dev->v1_set_state(kV1Stop), 0);
  ASSERT_EQ(dst.dev->v1_set_state(kV1Stop), 0) << dst.k->counters(dst.id).last_error;
  EXPECT_EQ(dst.k->counters(dst.id).load_transactions, sizes);
  EXPECT_EQ(src.k->state_digest(src.id), dst.k->state_digest(dst.id));
  const auto& t = dst.k->counters(dst.id).trace;
  ASSERT_GE(t.size(), 3u);
  EXPECT_EQ(t[0], "write device_state");
  EXPECT_EQ(t[1], "data_offset");
  EXPECT_EQ(t[2], "data");
  EXPECT_EQ(t[3], "write data_size");
}

TEST(EmuV1, AnIncompleteOrCorruptLoadIsRejectedWithTheErrorState) {
  Emu dst(config(Protocol::v1));
  ASSERT_EQ(dst.dev->v1_set_state(kV1Resuming), 0);
  EXPECT_EQ(dst.dev->v1_set_state(kV1Stop), -EINVAL) << "nothing was loaded";
  EXPECT_EQ(dst.dev->v1_state(), kV1Error);
  EXPECT_NE(dst.k->counters(dst.id).last_error.find("no state loaded"), std::string::npos);
  EXPECT_EQ(dst.dev->v1_set_state(kV1Running), -EINVAL) << "the error state is left only by reset";
  ASSERT_EQ(dst.dev->reset(), 0);
  EXPECT_EQ(dst.dev->v1_state(), kV1Running);
  // Garbage as a transaction: the driver refuses it at data_size.
  ASSERT_EQ(dst.dev->v1_set_state(kV1Resuming), 0);
  const uint64_t off = dst.dev->v1_data_offset();
  std::memset(dst.dev->v1_span(off).addr, 0x42, 100);
  try {
    dst.dev->v1_set_data_size(100);
    FAIL();
  } catch (const VfioError& e) {
    EXPECT_EQ(e.err(), EINVAL);
  }
}

TEST(EmuV1, ShortAndOutOfRangeAccessesAreClearErrors) {
  EmuDeviceConfig c = config(Protocol::v1);
  c.faults.push_back(EmuFault{.kind = EmuFault::Kind::short_read});
  Emu e(c);
  ASSERT_EQ(e.dev->v1_set_state(kV1Saving), 0);
  try {
    e.dev->v1_pending_bytes();
    FAIL();
  } catch (const VfioError& x) {
    EXPECT_NE(std::string(x.what()).find("short read of pending_bytes (4 of 8 bytes)"), std::string::npos)
        << x.what();
  }
  char b[8];
  EXPECT_EQ(e.k->pread(e.dev->fd(), b, 2, e.dev->v1_region().offset + 8), -EINVAL) << "part of a field";
  EXPECT_EQ(e.k->pread(e.dev->fd(), b, 8, e.dev->v1_region().offset + 4), -EINVAL) << "the reserved word";
}

TEST(EmuV1, TransitionFaultsLeaveTheStateOrBreakTheDevice) {
  EmuDeviceConfig c = config(Protocol::v1);
  c.faults.push_back(EmuFault{.kind = EmuFault::Kind::transition_fail, .state = S::pre_copy});
  c.faults.push_back(
      EmuFault{.kind = EmuFault::Kind::transition_error, .state = S::stop_copy, .from = S::running});
  Emu e(c);
  EXPECT_EQ(e.dev->v1_set_state(kV1Saving | kV1Running), -EIO);
  EXPECT_EQ(e.dev->v1_state(), kV1Running);
  EXPECT_EQ(e.dev->v1_set_state(kV1Saving), -EIO);
  EXPECT_EQ(e.dev->v1_state(), kV1Error) << "SAVING|RESUMING: the v1 error state";
  EXPECT_EQ(e.dev->state_name(), "ERROR");
  ASSERT_EQ(e.dev->reset(), 0);
  EXPECT_EQ(e.dev->v1_state(), kV1Running);
  EXPECT_EQ(e.k->counters(e.id).resets, 1u);
}

// ---- v2 arcs

// Moves the device to `from` the way a user would (combination transitions), with whatever session that
// needs, and returns the open data_fd (or -1).
int reach(VfioDevice& d, S from) {
  int fd = -1;
  if (from == S::running) return -1;
  if (from == S::pre_copy || from == S::pre_copy_p2p || from == S::stop_copy) {
    EXPECT_EQ(d.set_state(from, &fd), 0);
    return fd;
  }
  EXPECT_EQ(d.set_state(from, &fd), 0) << mig_state_name(from);
  return fd;
}

struct ArcCase {
  S from, to;
  uint64_t flags;
};

class EmuV2Arc : public ::testing::TestWithParam<ArcCase> {};

// Every single arc a driver implements, for each feature set, performed on the emulated device: the state
// after it, and the data_fd it opens (or not).
TEST_P(EmuV2Arc, Works) {
  const ArcCase a = GetParam();
  EmuDeviceConfig c = config(Protocol::v2, 256 << 10);
  c.p2p = a.flags & VFIO_MIGRATION_P2P;
  c.precopy = a.flags & VFIO_MIGRATION_PRE_COPY;
  Emu e(c);
  ASSERT_EQ(e.dev->migration_flags(), a.flags);
  int fd = reach(*e.dev, a.from);
  ASSERT_EQ(e.dev->state(), a.from);
  if (a.from == S::resuming) {
    // RESUMING -> STOP validates: load a real state first (saved from another device).
    Emu src(config(Protocol::v2, 256 << 10));
    int sfd = -1;
    ASSERT_EQ(src.dev->set_state(S::stop_copy, &sfd), 0);
    auto r = ring();
    std::vector<std::byte> buf(64 << 10);
    for (;;) {
      const int64_t n = src.k->read(*r, sfd, buf.data(), buf.size(), -1);
      ASSERT_GE(n, 0);
      if (n == 0) break;
      for (int64_t done = 0; done < n;) {
        const int64_t w = e.k->write(*r, fd, buf.data() + done, size_t(n - done), -1);
        ASSERT_GT(w, 0);
        done += w;
      }
    }
    src.k->close(sfd);
  }
  int new_fd = -1;
  ASSERT_EQ(e.dev->set_state(a.to, &new_fd), 0) << e.k->counters(e.id).last_error;
  EXPECT_EQ(e.dev->state(), a.to);
  const bool opens = (a.to == S::pre_copy || a.to == S::pre_copy_p2p) && !mig_state_saving(a.from);
  const bool opens2 = (a.from == S::stop && (a.to == S::stop_copy || a.to == S::resuming));
  if (opens || opens2) {
    EXPECT_GE(new_fd, 0) << "this arc starts a data transfer session";
  } else {
    EXPECT_EQ(new_fd, -1);
  }
  if (mig_state_saving(a.from) && a.to == S::stop_copy) {
    // The saving group shares its session: the old data_fd now yields the stop-copy stream to EOF.
    auto r = ring();
    std::vector<std::byte> buf(1 << 20);
    int64_t n;
    uint64_t total = 0;
    while ((n = e.k->read(*r, fd, buf.data(), buf.size(), -1)) > 0) total += uint64_t(n);
    EXPECT_EQ(n, 0) << "EOF ends STOP_COPY";
    EXPECT_GT(total, 256u << 10);
  }
  if (fd >= 0) e.k->close(fd);
  if (new_fd >= 0) e.k->close(new_fd);
}

std::vector<ArcCase> all_arcs() {
  std::vector<ArcCase> out;
  for (uint64_t flags : kFlagSets) {
    for (S from : kStates) {
      for (S to : kStates) {
        if (from != to && mig_arc_required(from, to, flags)) out.push_back({from, to, flags});
      }
    }
  }
  return out;
}

std::string arc_name(const ::testing::TestParamInfo<ArcCase>& info) {
  std::string n = std::string(mig_state_name(info.param.from)) + "_to_" + mig_state_name(info.param.to) + "_";
  n += (info.param.flags & VFIO_MIGRATION_P2P) ? "p2p" : "nop2p";
  n += (info.param.flags & VFIO_MIGRATION_PRE_COPY) ? "_precopy" : "_noprecopy";
  return n;
}

INSTANTIATE_TEST_SUITE_P(EveryArc, EmuV2Arc, ::testing::ValuesIn(all_arcs()), arc_name);

TEST(EmuV2, PreCopyEndsPassesWithEnomsgAndReportsSizes) {
  Emu e(config(Protocol::v2, 2 << 20));
  int fd = -1;
  ASSERT_EQ(e.dev->set_state(S::pre_copy, &fd), 0);
  ASSERT_GE(fd, 0);
  PrecopyInfo pi;
  ASSERT_EQ(e.dev->precopy_info(fd, &pi), 0);
  EXPECT_GT(pi.initial_bytes, 2u << 20);
  EXPECT_EQ(pi.dirty_bytes, 0u);
  const std::optional<uint64_t> before = e.dev->stop_copy_length();
  ASSERT_TRUE(before);
  EXPECT_GT(*before, 2u << 20);
  auto r = ring();
  std::vector<std::byte> buf(256 << 10);
  uint64_t total = 0;
  int64_t n;
  while ((n = e.k->read(*r, fd, buf.data(), buf.size(), -1)) > 0) total += uint64_t(n);
  EXPECT_EQ(n, -ENOMSG) << "a pre-copy pass ends with ENOMSG, never EOF";
  EXPECT_GT(total, 2u << 20);
  ASSERT_EQ(e.dev->precopy_info(fd, &pi), 0);
  EXPECT_EQ(pi.initial_bytes, 0u);
  EXPECT_EQ(e.k->read(*r, fd, buf.data(), buf.size(), -1), -ENOMSG) << "nothing dirtied: still nothing";
  EXPECT_LT(*e.dev->stop_copy_length(), 4096u) << "only the trailer is left";
  EXPECT_EQ(e.k->read(*r, fd, buf.data(), buf.size(), 0), -ESPIPE) << "a stream: no positioned reads";
  ASSERT_EQ(e.dev->set_state(S::stop_copy, nullptr), 0);
  EXPECT_EQ(e.dev->precopy_info(fd, &pi), -EINVAL) << "PRECOPY_INFO is for PRE_COPY states only";
  while ((n = e.k->read(*r, fd, buf.data(), buf.size(), -1)) > 0) total += uint64_t(n);
  EXPECT_EQ(n, 0);
  EXPECT_EQ(e.k->read(*r, fd, buf.data(), buf.size(), -1), 0) << "EOF stays EOF";
  ASSERT_EQ(e.dev->set_state(S::stop, nullptr), 0);
  EXPECT_EQ(e.k->read(*r, fd, buf.data(), buf.size(), -1), -ENODEV)
      << "the session ended with STOP_COPY -> STOP";
  e.k->close(fd);
}

TEST(EmuV2, TemporaryEndAsZeroLikeMtty) {
  EmuDeviceConfig c = config(Protocol::v2);
  c.enomsg = false;
  Emu e(c);
  int fd = -1;
  ASSERT_EQ(e.dev->set_state(S::pre_copy, &fd), 0);
  auto r = ring();
  std::vector<std::byte> buf(256 << 10);
  int64_t n;
  while ((n = e.k->read(*r, fd, buf.data(), buf.size(), -1)) > 0) {
  }
  EXPECT_EQ(n, 0);
  EXPECT_EQ(e.dev->state(), S::pre_copy) << "0 in PRE_COPY is not the end of the stream";
  e.k->close(fd);
}

TEST(EmuV2, DirtyingDevicesGiveMorePassesAndDirtyBytes) {
  EmuDeviceConfig c = config(Protocol::v2, 8 << 20);
  c.state.dirty_bytes_per_sec = 512ull << 20;
  Emu e(c);
  int fd = -1;
  ASSERT_EQ(e.dev->set_state(S::pre_copy, &fd), 0);
  auto r = ring();
  std::vector<std::byte> buf(256 << 10);
  while (e.k->read(*r, fd, buf.data(), buf.size(), -1) > 0) {
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  PrecopyInfo pi;
  ASSERT_EQ(e.dev->precopy_info(fd, &pi), 0);
  EXPECT_GT(pi.dirty_bytes, 0u);
  EXPECT_GT(e.k->read(*r, fd, buf.data(), buf.size(), -1), 0) << "the next read starts the next pass";
  EXPECT_GE(e.k->counters(e.id).precopy_passes, 2u);
  e.k->close(fd);
  ASSERT_EQ(e.dev->set_state(S::running, nullptr), 0);
}

TEST(EmuV2, BlockedUnsupportedAndErrorStates) {
  EmuDeviceConfig c = config(Protocol::v2);
  c.p2p = false;
  c.faults.push_back(EmuFault{.kind = EmuFault::Kind::transition_error, .state = S::stop});
  Emu e(c);
  EXPECT_EQ(e.dev->set_state(S::running_p2p, nullptr), -EINVAL) << "P2P not offered";
  EXPECT_EQ(e.dev->set_state(S::error, nullptr), -EINVAL);
  int fd = -1;
  ASSERT_EQ(e.dev->set_state(S::pre_copy, &fd), 0);
  EXPECT_EQ(e.dev->set_state(S::stop_copy, nullptr), 0);
  EXPECT_EQ(e.dev->set_state(S::pre_copy, nullptr), -EINVAL) << "STOP_COPY -> PRE_COPY is blocked";
  EXPECT_EQ(e.dev->set_state(S::running, nullptr), -EIO) << "the STOP arc breaks the device";
  EXPECT_EQ(e.dev->state(), S::error);
  EXPECT_EQ(e.dev->set_state(S::running, nullptr), -EINVAL) << "ERROR is left only by reset";
  ASSERT_EQ(e.dev->reset(), 0);
  EXPECT_EQ(e.dev->state(), S::running);
  e.k->close(fd);
}

TEST(EmuV2, ACorruptedStreamIsRejectedAtStopAndAFullOneAccepted) {
  for (bool corrupt : {false, true}) {
    Emu src(config(Protocol::v2, 1 << 20));
    EmuDeviceConfig dc = config(Protocol::v2, 1 << 20);
    dc.state.seed = 99;  // the destination's own state differs before the load
    Emu dst(dc);
    EXPECT_NE(src.k->state_digest(src.id), dst.k->state_digest(dst.id));
    int sfd = -1, dfd = -1;
    ASSERT_EQ(src.dev->set_state(S::stop_copy, &sfd), 0);
    ASSERT_EQ(dst.dev->set_state(S::resuming, &dfd), 0);
    auto r = ring();
    std::vector<std::byte> buf(100000);  // odd segmentation: the uAPI lets the writer choose it
    uint64_t at = 0;
    for (;;) {
      const int64_t n = src.k->read(*r, sfd, buf.data(), buf.size(), -1);
      ASSERT_GE(n, 0);
      if (n == 0) break;
      if (corrupt && at <= 500000 && 500000 < at + uint64_t(n)) buf[500000 - at] ^= std::byte{1};
      at += uint64_t(n);
      for (int64_t done = 0; done < n;) {  // a write may take less than offered
        const int64_t w = dst.k->write(*r, dfd, buf.data() + done, size_t(n - done), -1);
        ASSERT_GT(w, 0);
        done += w;
      }
    }
    const int rc = dst.dev->set_state(S::stop, nullptr);
    if (corrupt) {
      EXPECT_EQ(rc, -EINVAL);
      EXPECT_NE(dst.k->counters(dst.id).last_error.find("digest mismatch"), std::string::npos)
          << dst.k->counters(dst.id).last_error;
      EXPECT_EQ(dst.dev->state(), S::resuming) << "a failed arc leaves the device where it was";
    } else {
      EXPECT_EQ(rc, 0) << dst.k->counters(dst.id).last_error;
      EXPECT_EQ(src.k->state_digest(src.id), dst.k->state_digest(dst.id));
    }
    src.k->close(sfd);
    dst.k->close(dfd);
  }
}

TEST(EmuV2, ClosingTheDeviceEndsTheSessionAndTheDeviceRuns) {
  auto k = std::make_shared<EmuKernel>();
  const EmuKernel::Added a = k->add_device(config(Protocol::v2));
  int fd = -1;
  {
    auto dev = VfioDevice::open(k, a.cdev, ProtocolChoice::detect);
    ASSERT_EQ(dev->set_state(S::stop_copy, &fd), 0);
  }
  EXPECT_EQ(k->v2_state(a.id), S::running);
  auto r = ring();
  char b[16];
  EXPECT_EQ(k->read(*r, fd, b, sizeof b, -1), -ENODEV);
  k->close(fd);
}

}  // namespace
}  // namespace dstx::io::vfio
