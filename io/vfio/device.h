// A VFIO device opened for migration, over a Kernel (the host's or the emulated one).
//
// Opening: "vfio:/dev/vfio/devices/vfioN" is an iommufd character device (open it, open /dev/iommu,
// VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC, VFIO_DEVICE_ATTACH_IOMMUFD_PT); "vfio-group:/dev/vfio/G:NAME"
// is the legacy group path (container /dev/vfio/vfio, VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU TYPE1v2,
// VFIO_GROUP_GET_DEVICE_FD NAME, where NAME is a PCI address or an mdev UUID).
// Protocol: v2 when VFIO_DEVICE_FEATURE_MIGRATION answers, else v1 when a region carries the
// VFIO_REGION_TYPE_MIGRATION_DEPRECATED/1 type capability; a choice other than `detect` insists on one.
// Every failure throws VfioError naming the device, the operation and the errno.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "io/vfio/kernel.h"
#include "io/vfio/vfio_uapi.h"

namespace dstx::io::vfio {

class VfioError : public std::runtime_error {
 public:
  VfioError(const std::string& text, int err) : std::runtime_error(text), err_(err) {}
  int err() const { return err_; }  // the errno behind it, 0 when none

 private:
  int err_;
};

struct DevicePath {
  enum class Kind : uint8_t { cdev, group } kind = Kind::cdev;
  std::string path;  // the cdev, or the group node
  std::string name;  // group: the device's name in the group
  std::string spec() const;
};
// "vfio:/dev/vfio/devices/vfioN" or "vfio-group:/dev/vfio/G:NAME". Throws std::invalid_argument.
DevicePath parse_device_path(std::string_view spec);

enum class Protocol : uint8_t { v1 = 1, v2 = 2 };
enum class ProtocolChoice : uint8_t { detect, v1, v2 };
const char* protocol_name(Protocol protocol);                                // "v1", "v2"
bool protocol_choice_from_name(std::string_view name, ProtocolChoice* out);  // "v1", "v2", "auto"

struct PrecopyInfo {
  uint64_t initial_bytes = 0;
  uint64_t dirty_bytes = 0;
};

// The v1 migration region and the parts of it that are mapped.
struct V1Region {
  uint32_t index = 0;
  uint32_t flags = 0;
  uint64_t size = 0;
  uint64_t offset = 0;  // of the region within the device fd
  struct Area {
    uint64_t offset = 0;  // within the region
    uint64_t size = 0;
    std::byte* addr = nullptr;  // null when the area could not be mapped
    bool writable = false;      // mapped for writing too (a driver may allow read-only mappings only)
  };
  std::vector<Area> areas;  // sorted by offset, non-overlapping
};

class VfioDevice {
 public:
  static std::unique_ptr<VfioDevice> open(std::shared_ptr<Kernel> kernel, const DevicePath& where,
                                          ProtocolChoice choice);
  // A device fd that its user already opened and set up (a cdev bound and attached to an IOAS, or the fd of
  // VFIO_GROUP_GET_DEVICE_FD): nothing is opened, bound or attached; the protocol is found as open() finds
  // it. Takes ownership of `device_fd` (closed with the device, and when this throws): pass a duplicate to
  // keep yours. `describe` names the device in texts.
  static std::unique_ptr<VfioDevice> adopt(std::shared_ptr<Kernel> kernel, int device_fd,
                                           std::string describe, ProtocolChoice choice);
  ~VfioDevice();
  VfioDevice(const VfioDevice&) = delete;
  VfioDevice& operator=(const VfioDevice&) = delete;

  const std::string& describe() const { return describe_; }
  Protocol protocol() const { return protocol_; }
  Kernel& kernel() { return *kernel_; }
  int fd() const { return device_fd_; }

  // ---- v2
  uint64_t migration_flags() const { return migration_flags_; }
  MigState state();  // VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE; throws
  // SET MIG_DEVICE_STATE: 0 and the new session's fd in *data_fd (-1 when the arc opens none), or -errno.
  int set_state(MigState target, int* data_fd);
  // MIG_DATA_SIZE: the device's estimate of the stop-copy size; nullopt when it does not offer it.
  std::optional<uint64_t> stop_copy_length();
  int precopy_info(int data_fd, PrecopyInfo* out);  // VFIO_MIG_GET_PRECOPY_INFO: 0 or -errno

  // ---- v1 (all throw on a failed or short access)
  const V1Region& v1_region() const { return region_; }
  uint32_t v1_state();
  int v1_set_state(uint32_t device_state);  // 0 or -errno: the driver may refuse a transition
  uint64_t v1_pending_bytes();
  uint64_t v1_data_offset();
  uint64_t v1_data_size();
  void v1_set_data_size(uint64_t bytes);
  // What lies at region offset `offset`: a mapped area (addr, bytes to its end) or unmapped bytes (nullptr,
  // bytes until the next mapped area; UINT64_MAX when none follows). `for_write`: areas mapped read-only
  // count as unmapped.
  struct Span {
    std::byte* addr = nullptr;
    uint64_t len = 0;
  };
  Span v1_span(uint64_t offset, bool for_write = false) const;
  int v1_mapped_areas() const;

  int reset();               // VFIO_DEVICE_RESET: 0 or -errno
  std::string state_name();  // v2 state name or v1 bits; "UNKNOWN (...)" when it cannot be read; never throws

 private:
  VfioDevice(std::shared_ptr<Kernel> kernel, std::string describe);
  void open_cdev(const DevicePath& where);
  void open_group(const DevicePath& where);
  void probe(ProtocolChoice choice);  // device info, the v1 region walk, then detect()
  void detect(ProtocolChoice choice);
  bool find_v1_region();
  void map_v1_areas();
  [[noreturn]] void fail(const std::string& what, int err) const;
  uint64_t v1_read(uint64_t field, int bytes, const char* name);
  void v1_write(uint64_t field, uint64_t value, int bytes, const char* name);

  std::shared_ptr<Kernel> kernel_;
  std::string describe_;
  int device_fd_ = -1;
  int iommufd_ = -1;
  int group_fd_ = -1;
  int container_fd_ = -1;
  Protocol protocol_ = Protocol::v2;
  uint64_t migration_flags_ = 0;
  uint32_t device_flags_ = 0;
  V1Region region_;
};

}  // namespace dstx::io::vfio
