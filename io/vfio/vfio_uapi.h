// The VFIO (and iommufd) uAPI as dstx uses it: the system's <linux/vfio.h> plus what older headers lack.
// Debian 12 ships the 6.1 header: it has v2 migration (FEATURE_MIGRATION, MIG_DEVICE_STATE) and the
// deprecated v1 region constants, but not PRE_COPY (6.2), MIG_DATA_SIZE (6.2), the iommufd cdev ioctls (6.6)
// or <linux/iommufd.h>. Everything defined here is copied in meaning (numbers, layouts) from the kernel's
// include/uapi/linux/vfio.h and iommufd.h; newer headers define the same numbers, checked below.
#pragma once

#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/vfio.h>

#include <cstddef>
#include <cstdint>

// v2 migration: PRE_COPY support flag and the pre-copy size query on the data_fd (kernel 6.2).
#ifndef VFIO_MIGRATION_PRE_COPY
#define VFIO_MIGRATION_PRE_COPY (1 << 2)
#endif

#ifndef VFIO_MIG_GET_PRECOPY_INFO
struct vfio_precopy_info {
  __u32 argsz;
  __u32 flags;
  __aligned_u64 initial_bytes;
  __aligned_u64 dirty_bytes;
};
#define VFIO_MIG_GET_PRECOPY_INFO _IO(VFIO_TYPE, VFIO_BASE + 21)
#else
// A header new enough for the ioctl also has the enumerators; they must agree with ours (see MigState).
static_assert(VFIO_DEVICE_STATE_PRE_COPY == 6 && VFIO_DEVICE_STATE_PRE_COPY_P2P == 7);
#endif

#ifndef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
struct vfio_device_feature_mig_data_size {
  __aligned_u64 stop_copy_length;
};
#define VFIO_DEVICE_FEATURE_MIG_DATA_SIZE 9
#endif

// The v1 region's identification (removed from the v2-era headers under their old names).
#ifndef VFIO_REGION_TYPE_MIGRATION_DEPRECATED
#define VFIO_REGION_TYPE_MIGRATION_DEPRECATED (3)
#endif
#ifndef VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED
#define VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED (1)
#endif

// iommufd character-device binding (kernel 6.6). The structs are the original layouts: later kernels
// appended fields (a VF token pointer, a PASID) behind argsz, so the short forms stay valid everywhere.
#ifndef VFIO_DEVICE_BIND_IOMMUFD
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#endif
#ifndef VFIO_DEVICE_ATTACH_IOMMUFD_PT
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#endif

// <linux/iommufd.h> (kernel 6.2): IOMMUFD_TYPE ';', commands from 0x80; IOAS_ALLOC is 0x81.
#ifndef IOMMU_IOAS_ALLOC
#define IOMMU_IOAS_ALLOC _IO(';', 0x81)
#endif

namespace dstx::io::vfio {

struct BindIommufd {  // struct vfio_device_bind_iommufd, up to out_devid
  uint32_t argsz;
  uint32_t flags;
  int32_t iommufd;
  uint32_t out_devid;
};
static_assert(sizeof(BindIommufd) == 16);

struct AttachIommufdPt {  // struct vfio_device_attach_iommufd_pt, up to pt_id
  uint32_t argsz;
  uint32_t flags;
  uint32_t pt_id;
};
static_assert(sizeof(AttachIommufdPt) == 12);

struct IommuIoasAlloc {  // struct iommu_ioas_alloc
  uint32_t size;
  uint32_t flags;
  uint32_t out_ioas_id;
};
static_assert(sizeof(IommuIoasAlloc) == 12);

// v2 device states (enum vfio_device_mig_state), as a type of our own: the 6.1 enum stops at RUNNING_P2P.
enum class MigState : uint32_t {
  error = 0,
  stop = 1,
  running = 2,
  stop_copy = 3,
  resuming = 4,
  running_p2p = 5,
  pre_copy = 6,
  pre_copy_p2p = 7,
};
inline constexpr uint32_t kMigStateCount = 8;

// The v1 migration region's header at region offset 0 (struct vfio_device_migration_info).
struct V1Header {
  uint32_t device_state;
  uint32_t reserved;
  uint64_t pending_bytes;
  uint64_t data_offset;
  uint64_t data_size;
};
inline constexpr uint64_t kV1StateOffset = offsetof(V1Header, device_state);
inline constexpr uint64_t kV1PendingOffset = offsetof(V1Header, pending_bytes);
inline constexpr uint64_t kV1DataOffsetOffset = offsetof(V1Header, data_offset);
inline constexpr uint64_t kV1DataSizeOffset = offsetof(V1Header, data_size);
static_assert(kV1PendingOffset == 8 && kV1DataOffsetOffset == 16 && kV1DataSizeOffset == 24 &&
              sizeof(V1Header) == 32);
static_assert(sizeof(V1Header) == sizeof(struct vfio_device_migration_info));

// v1 device_state bits.
inline constexpr uint32_t kV1Stop = 0;
inline constexpr uint32_t kV1Running = 1u << 0;
inline constexpr uint32_t kV1Saving = 1u << 1;
inline constexpr uint32_t kV1Resuming = 1u << 2;
inline constexpr uint32_t kV1Mask = kV1Running | kV1Saving | kV1Resuming;
inline constexpr uint32_t kV1Error = kV1Saving | kV1Resuming;  // the error state; left only by reset
// RESUMING may not be combined with another bit (VFIO_DEVICE_STATE_VALID).
constexpr bool v1_state_valid(uint32_t s) {
  return (s & kV1Resuming) ? (s & kV1Mask) == kV1Resuming : true;
}
constexpr bool v1_state_is_error(uint32_t s) {
  return (s & kV1Mask) == kV1Error;
}

// vfio-pci's fixed region count: device-specific regions (the v1 migration region) come after these.
inline constexpr uint32_t kPciNumRegions = VFIO_PCI_NUM_REGIONS;

}  // namespace dstx::io::vfio
