// The VFIO v2 migration state machine as data: the kernel's combination-transition table
// (vfio_mig_get_next_state in drivers/vfio/vfio_main.c) and the arcs a driver must implement for each set of
// migration flags. The emulated drivers step through it exactly as kernel drivers do; tests check every
// from/to pair against an independent shortest-path search.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "io/vfio/vfio_uapi.h"

namespace dstx::io::vfio {

const char* mig_state_name(MigState state);  // "RUNNING", "PRE_COPY_P2P", ...; "INVALID" when out of range
bool mig_state_from_name(std::string_view name, MigState* out);

// The migration flags (VFIO_MIGRATION_*) a device needs for `state` to exist (the kernel's
// state_flags_table). ERROR "needs" every flag: it can never be requested.
uint64_t mig_state_required_flags(MigState state);
bool mig_state_supported(MigState state, uint64_t migration_flags);

// The saving group (PRE_COPY, PRE_COPY_P2P, STOP_COPY) shares one data transfer session.
bool mig_state_saving(MigState state);

// The next single arc from `cur` toward `target` on a device with `migration_flags`. False (and *next
// untouched) when `target` cannot be reached: an unsupported or ERROR state, or a blocked arc
// (STOP_COPY -> PRE_COPY). cur == target gives next == cur.
bool mig_next_state(MigState cur, MigState target, uint64_t migration_flags, MigState* next);

// Every state along the combination transition after `cur`, ending with `target` (empty when equal).
std::optional<std::vector<MigState>> mig_path(MigState cur, MigState target, uint64_t migration_flags);

// Whether a driver with these flags must implement the single arc from -> to (the list in the kernel's
// comment above vfio_from_fsm_table). The table only ever uses such arcs.
bool mig_arc_required(MigState from, MigState to, uint64_t migration_flags);

// v1 device_state bits as text: "RUNNING", "SAVING|RUNNING", "SAVING", "STOP", "RESUMING", "ERROR",
// "INVALID(0x5)".
std::string v1_state_name(uint32_t device_state);

}  // namespace dstx::io::vfio
