#include "io/vfio/mig_fsm.h"

#include <array>
#include <cstdio>

namespace dstx::io::vfio {
namespace {

using S = MigState;

constexpr uint64_t kStopCopy = VFIO_MIGRATION_STOP_COPY;
constexpr uint64_t kP2p = VFIO_MIGRATION_P2P;
constexpr uint64_t kPreCopy = VFIO_MIGRATION_PRE_COPY;

constexpr size_t idx(S s) {
  return static_cast<size_t>(s);
}

// kNextStep[cur][target]: the first arc of the path from cur to target when every optional state exists.
// Steps into a state the device lacks are skipped by looking up the row of that state again (see
// mig_next_state), exactly as the kernel does. Order of the inner arrays: ERROR, STOP, RUNNING, STOP_COPY,
// RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P.
constexpr std::array<std::array<S, kMigStateCount>, kMigStateCount> kNextStep = {{
    // from ERROR: nothing but reset leaves it
    {S::error, S::error, S::error, S::error, S::error, S::error, S::error, S::error},
    // from STOP
    {S::error, S::stop, S::running_p2p, S::stop_copy, S::resuming, S::running_p2p, S::running_p2p,
     S::running_p2p},
    // from RUNNING
    {S::error, S::running_p2p, S::running, S::running_p2p, S::running_p2p, S::running_p2p, S::pre_copy,
     S::running_p2p},
    // from STOP_COPY: PRE_COPY and PRE_COPY_P2P are blocked
    {S::error, S::stop, S::stop, S::stop_copy, S::stop, S::stop, S::error, S::error},
    // from RESUMING
    {S::error, S::stop, S::stop, S::stop, S::resuming, S::stop, S::stop, S::stop},
    // from RUNNING_P2P
    {S::error, S::stop, S::running, S::stop, S::stop, S::running_p2p, S::running, S::pre_copy_p2p},
    // from PRE_COPY
    {S::error, S::running, S::running, S::pre_copy_p2p, S::running, S::running, S::pre_copy, S::pre_copy_p2p},
    // from PRE_COPY_P2P
    {S::error, S::running_p2p, S::running_p2p, S::stop_copy, S::running_p2p, S::running_p2p, S::pre_copy,
     S::pre_copy_p2p},
}};

constexpr std::array<uint64_t, kMigStateCount> kRequiredFlags = {
    ~uint64_t(0),                 // ERROR
    kStopCopy,                    // STOP
    kStopCopy,                    // RUNNING
    kStopCopy,                    // STOP_COPY
    kStopCopy,                    // RESUMING
    kStopCopy | kP2p,             // RUNNING_P2P
    kStopCopy | kPreCopy,         // PRE_COPY
    kStopCopy | kP2p | kPreCopy,  // PRE_COPY_P2P
};

constexpr const char* kNames[kMigStateCount] = {"ERROR",    "STOP",        "RUNNING",  "STOP_COPY",
                                                "RESUMING", "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"};

bool valid(S s) {
  return idx(s) < kMigStateCount;
}

struct Arc {
  S from, to;
};

// The kernel's lists of arcs a driver implements, by feature.
constexpr Arc kArcsAlways[] = {
    {S::resuming, S::stop}, {S::stop, S::resuming}, {S::stop, S::stop_copy}, {S::stop_copy, S::stop}};
constexpr Arc kArcsP2p[] = {{S::running, S::running_p2p},
                            {S::running_p2p, S::running},
                            {S::running_p2p, S::stop},
                            {S::stop, S::running_p2p}};
constexpr Arc kArcsNoP2p[] = {{S::running, S::stop}, {S::stop, S::running}};
constexpr Arc kArcsPreCopy[] = {
    {S::running, S::pre_copy}, {S::pre_copy, S::running}, {S::pre_copy, S::stop_copy}};
constexpr Arc kArcsPreCopyP2p[] = {{S::pre_copy, S::running},        {S::pre_copy, S::pre_copy_p2p},
                                   {S::pre_copy_p2p, S::pre_copy},   {S::pre_copy_p2p, S::running_p2p},
                                   {S::pre_copy_p2p, S::stop_copy},  {S::running, S::pre_copy},
                                   {S::running_p2p, S::pre_copy_p2p}};

template <size_t N>
bool listed(const Arc (&arcs)[N], S from, S to) {
  for (const Arc& a : arcs) {
    if (a.from == from && a.to == to) return true;
  }
  return false;
}

}  // namespace

const char* mig_state_name(MigState state) {
  return valid(state) ? kNames[idx(state)] : "INVALID";
}

bool mig_state_from_name(std::string_view name, MigState* out) {
  for (size_t i = 0; i < kMigStateCount; ++i) {
    if (name == kNames[i]) {
      *out = static_cast<MigState>(i);
      return true;
    }
  }
  return false;
}

uint64_t mig_state_required_flags(MigState state) {
  return valid(state) ? kRequiredFlags[idx(state)] : ~uint64_t(0);
}

bool mig_state_supported(MigState state, uint64_t flags) {
  const uint64_t need = mig_state_required_flags(state);
  return (need & flags) == need;
}

bool mig_state_saving(MigState state) {
  return state == S::pre_copy || state == S::pre_copy_p2p || state == S::stop_copy;
}

bool mig_next_state(MigState cur, MigState target, uint64_t flags, MigState* next) {
  if (!valid(cur) || !valid(target) || !mig_state_supported(cur, flags) ||
      !mig_state_supported(target, flags)) {
    return false;
  }
  MigState step = kNextStep[idx(cur)][idx(target)];
  // Arcs through optional states the device lacks are skipped: the driver sees the arc to the next state
  // it has. The loop ends: every row leads to target, ERROR or a supported state within kMigStateCount steps.
  for (uint32_t guard = 0; !mig_state_supported(step, flags) && step != S::error; ++guard) {
    if (guard == kMigStateCount) return false;
    step = kNextStep[idx(step)][idx(target)];
  }
  if (step == S::error) return false;
  *next = step;
  return true;
}

std::optional<std::vector<MigState>> mig_path(MigState cur, MigState target, uint64_t flags) {
  std::vector<MigState> path;
  while (cur != target) {
    MigState next;
    if (!mig_next_state(cur, target, flags, &next) || path.size() == kMigStateCount) return std::nullopt;
    path.push_back(next);
    cur = next;
  }
  if (path.empty() && !mig_state_supported(target, flags)) return std::nullopt;
  return path;
}

bool mig_arc_required(MigState from, MigState to, uint64_t flags) {
  if (!(flags & kStopCopy)) return false;
  const bool p2p = flags & kP2p;
  const bool pre = flags & kPreCopy;
  if (listed(kArcsAlways, from, to)) return true;
  if (p2p && listed(kArcsP2p, from, to)) return true;
  if (!p2p && listed(kArcsNoP2p, from, to)) return true;
  if (pre && !p2p && listed(kArcsPreCopy, from, to)) return true;
  if (pre && p2p && listed(kArcsPreCopyP2p, from, to)) return true;
  return false;
}

std::string v1_state_name(uint32_t s) {
  if (!v1_state_valid(s) || (s & ~kV1Mask)) {
    if (v1_state_is_error(s)) return "ERROR";
    char buf[32];
    std::snprintf(buf, sizeof buf, "INVALID(0x%x)", s);
    return buf;
  }
  switch (s & kV1Mask) {
    case kV1Stop:
      return "STOP";
    case kV1Running:
      return "RUNNING";
    case kV1Saving | kV1Running:
      return "SAVING|RUNNING";
    case kV1Saving:
      return "SAVING";
    case kV1Resuming:
      return "RESUMING";
  }
  return "INVALID";
}

}  // namespace dstx::io::vfio
