#include "io/vfio/device.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "io/vfio/mig_fsm.h"

namespace dstx::io::vfio {
namespace {

// Capability chains are walked with a bound: a malformed chain (a loop, an offset outside the buffer) is the
// driver's bug, not a reason to spin.
constexpr int kCapsMax = 64;
// A region info answer larger than this is not believable.
constexpr uint32_t kRegionInfoBytesMax = 1u << 20;

void* as_arg(uintptr_t value) {
  return reinterpret_cast<void*>(value);
}

// A VFIO_DEVICE_FEATURE request with `data_bytes` of payload after the 8-byte header, 8-byte aligned.
struct FeatureBuf {
  explicit FeatureBuf(uint32_t flags, size_t data_bytes)
      : words((sizeof(vfio_device_feature) + data_bytes + 7) / 8) {
    auto* f = reinterpret_cast<vfio_device_feature*>(words.data());
    f->argsz = uint32_t(sizeof(vfio_device_feature) + data_bytes);
    f->flags = flags;
  }
  void* arg() { return words.data(); }
  template <typename T>
  T* data() {
    return reinterpret_cast<T*>(reinterpret_cast<std::byte*>(words.data()) + sizeof(vfio_device_feature));
  }
  std::vector<uint64_t> words;
};

std::string hint_for_open(int err) {
  switch (err) {
    case ENOENT:
      return " (no such device node: is the device bound to vfio-pci, and the module loaded?)";
    case EACCES:
    case EPERM:
      return " (permission denied: run as root or give this user the node, see docs/vfio.md)";
    case EBUSY:
      return " (the device or group is already in use, e.g. by a VM)";
    default:
      return "";
  }
}

}  // namespace

std::string DevicePath::spec() const {
  return kind == Kind::cdev ? "vfio:" + path : "vfio-group:" + path + ":" + name;
}

DevicePath parse_device_path(std::string_view spec) {
  DevicePath d;
  if (spec.starts_with("vfio:")) {
    d.kind = DevicePath::Kind::cdev;
    d.path = std::string(spec.substr(5));
    if (d.path.empty())
      throw std::invalid_argument("vfio: needs a device node (vfio:/dev/vfio/devices/vfioN)");
    return d;
  }
  if (spec.starts_with("vfio-group:")) {
    const std::string_view rest = spec.substr(11);
    const size_t colon = rest.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon + 1 == rest.size()) {
      throw std::invalid_argument(
          "vfio-group: expects /dev/vfio/GROUP:DEVICE (e.g. vfio-group:/dev/vfio/12:0000:01:00.0)");
    }
    d.kind = DevicePath::Kind::group;
    d.path = std::string(rest.substr(0, colon));
    d.name = std::string(rest.substr(colon + 1));
    return d;
  }
  throw std::invalid_argument("not a VFIO device spec: '" + std::string(spec) + "'");
}

const char* protocol_name(Protocol protocol) {
  return protocol == Protocol::v1 ? "v1" : "v2";
}

bool protocol_choice_from_name(std::string_view name, ProtocolChoice* out) {
  if (name == "v1")
    *out = ProtocolChoice::v1;
  else if (name == "v2")
    *out = ProtocolChoice::v2;
  else if (name == "auto")
    *out = ProtocolChoice::detect;
  else
    return false;
  return true;
}

VfioDevice::VfioDevice(std::shared_ptr<Kernel> kernel, std::string describe)
    : kernel_(std::move(kernel)), describe_(std::move(describe)) {}

VfioDevice::~VfioDevice() {
  for (V1Region::Area& a : region_.areas) {
    if (a.addr) kernel_->munmap(a.addr, a.size);
  }
  // The device goes first: it holds the group and the iommufd binding.
  for (int fd : {device_fd_, group_fd_, container_fd_, iommufd_}) {
    if (fd >= 0) kernel_->close(fd);
  }
}

void VfioDevice::fail(const std::string& what, int err) const {
  throw VfioError(describe_ + ": " + what + (err ? ": " + errno_text(err) : std::string()), err);
}

std::unique_ptr<VfioDevice> VfioDevice::open(std::shared_ptr<Kernel> kernel, const DevicePath& where,
                                             ProtocolChoice choice) {
  std::unique_ptr<VfioDevice> dev(new VfioDevice(std::move(kernel), where.spec()));
  if (where.kind == DevicePath::Kind::cdev)
    dev->open_cdev(where);
  else
    dev->open_group(where);
  dev->probe(choice);
  return dev;
}

std::unique_ptr<VfioDevice> VfioDevice::adopt(std::shared_ptr<Kernel> kernel, int device_fd,
                                              std::string describe, ProtocolChoice choice) {
  std::unique_ptr<VfioDevice> dev;
  try {
    dev.reset(new VfioDevice(kernel, std::move(describe)));
  } catch (...) {
    kernel->close(device_fd);
    throw;
  }
  dev->device_fd_ = device_fd;  // from here on the device closes it
  dev->probe(choice);
  return dev;
}

void VfioDevice::probe(ProtocolChoice choice) {
  vfio_device_info info{};
  info.argsz = sizeof info;
  if (const int rc = kernel_->ioctl(device_fd_, VFIO_DEVICE_GET_INFO, &info); rc < 0) {
    fail("VFIO_DEVICE_GET_INFO", -rc);
  }
  device_flags_ = info.flags;
  region_.index = UINT32_MAX;
  if (choice != ProtocolChoice::v2) {
    // Walk the regions only when v1 may be used: the walk maps the migration region's data section.
    for (uint32_t i = 0; i < info.num_regions && region_.index == UINT32_MAX; ++i) {
      region_.index = i;
      if (!find_v1_region()) region_.index = UINT32_MAX;
    }
  }
  detect(choice);
}

void VfioDevice::open_cdev(const DevicePath& where) {
  int fd = kernel_->open(where.path, O_RDWR);
  if (fd < 0) fail("open " + where.path + hint_for_open(-fd), -fd);
  device_fd_ = fd;
  fd = kernel_->open("/dev/iommu", O_RDWR);
  if (fd < 0) fail("open /dev/iommu (needed to bind " + where.path + ")" + hint_for_open(-fd), -fd);
  iommufd_ = fd;
  BindIommufd bind{.argsz = sizeof(BindIommufd), .flags = 0, .iommufd = iommufd_, .out_devid = 0};
  if (const int rc = kernel_->ioctl(device_fd_, VFIO_DEVICE_BIND_IOMMUFD, &bind); rc < 0) {
    fail("VFIO_DEVICE_BIND_IOMMUFD" + hint_for_open(-rc), -rc);
  }
  IommuIoasAlloc ioas{.size = sizeof(IommuIoasAlloc), .flags = 0, .out_ioas_id = 0};
  if (const int rc = kernel_->ioctl(iommufd_, IOMMU_IOAS_ALLOC, &ioas); rc < 0) fail("IOMMU_IOAS_ALLOC", -rc);
  AttachIommufdPt attach{.argsz = sizeof(AttachIommufdPt), .flags = 0, .pt_id = ioas.out_ioas_id};
  if (const int rc = kernel_->ioctl(device_fd_, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach); rc < 0) {
    fail("VFIO_DEVICE_ATTACH_IOMMUFD_PT (IOAS " + std::to_string(ioas.out_ioas_id) + ")", -rc);
  }
}

void VfioDevice::open_group(const DevicePath& where) {
  int fd = kernel_->open("/dev/vfio/vfio", O_RDWR);
  if (fd < 0) fail("open /dev/vfio/vfio" + hint_for_open(-fd), -fd);
  container_fd_ = fd;
  const int api = kernel_->ioctl(container_fd_, VFIO_GET_API_VERSION, nullptr);
  if (api < 0) fail("VFIO_GET_API_VERSION", -api);
  if (api != VFIO_API_VERSION) {
    fail("VFIO API version " + std::to_string(api) + ", expected " + std::to_string(VFIO_API_VERSION), 0);
  }
  const int ext = kernel_->ioctl(container_fd_, VFIO_CHECK_EXTENSION, as_arg(VFIO_TYPE1v2_IOMMU));
  if (ext <= 0) fail("the container does not offer the Type1v2 IOMMU", ext < 0 ? -ext : 0);
  fd = kernel_->open(where.path, O_RDWR);
  if (fd < 0) fail("open " + where.path + hint_for_open(-fd), -fd);
  group_fd_ = fd;
  vfio_group_status status{};
  status.argsz = sizeof status;
  if (const int rc = kernel_->ioctl(group_fd_, VFIO_GROUP_GET_STATUS, &status); rc < 0) {
    fail("VFIO_GROUP_GET_STATUS", -rc);
  }
  if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
    fail(where.path +
             " is not viable: every device in the IOMMU group must be bound to vfio-pci (or to no driver)",
         0);
  }
  if (const int rc = kernel_->ioctl(group_fd_, VFIO_GROUP_SET_CONTAINER, &container_fd_); rc < 0) {
    fail("VFIO_GROUP_SET_CONTAINER", -rc);
  }
  if (const int rc = kernel_->ioctl(container_fd_, VFIO_SET_IOMMU, as_arg(VFIO_TYPE1v2_IOMMU)); rc < 0) {
    fail("VFIO_SET_IOMMU (Type1v2)", -rc);
  }
  std::string name = where.name;  // the ioctl takes a NUL-terminated string
  fd = kernel_->ioctl(group_fd_, VFIO_GROUP_GET_DEVICE_FD, name.data());
  if (fd < 0) fail("VFIO_GROUP_GET_DEVICE_FD '" + where.name + "'" + hint_for_open(-fd), -fd);
  device_fd_ = fd;
}

void VfioDevice::detect(ProtocolChoice choice) {
  FeatureBuf f(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
               sizeof(vfio_device_feature_migration));
  const int rc = kernel_->ioctl(device_fd_, VFIO_DEVICE_FEATURE, f.arg());
  const bool has_v2 = rc >= 0 && (f.data<vfio_device_feature_migration>()->flags & VFIO_MIGRATION_STOP_COPY);
  const bool has_v1 = region_.index != UINT32_MAX;
  if (has_v2) migration_flags_ = f.data<vfio_device_feature_migration>()->flags;
  switch (choice) {
    case ProtocolChoice::v2:
      if (!has_v2) {
        fail(rc < 0 ? "no v2 migration (VFIO_DEVICE_FEATURE_MIGRATION)"
                    : "v2 migration without STOP_COPY support",
             rc < 0 ? -rc : 0);
      }
      protocol_ = Protocol::v2;
      return;
    case ProtocolChoice::v1:
      if (!has_v1) fail("no v1 migration region (VFIO_REGION_TYPE_MIGRATION_DEPRECATED)", 0);
      protocol_ = Protocol::v1;
      map_v1_areas();
      return;
    case ProtocolChoice::detect:
      if (has_v2) {
        protocol_ = Protocol::v2;
        return;
      }
      if (has_v1) {
        protocol_ = Protocol::v1;
        map_v1_areas();
        return;
      }
      fail(
          "the device offers no migration: neither VFIO_DEVICE_FEATURE_MIGRATION (v2) nor a v1 migration "
          "region",
          0);
  }
}

// Reads region `region_.index`'s info with its capability chain and keeps it when it is the v1 migration
// region. The info is asked for twice when the capabilities do not fit: the first answer says how big.
bool VfioDevice::find_v1_region() {
  std::vector<uint64_t> words(sizeof(vfio_region_info) / 8 + 1);
  auto ask = [&](uint32_t argsz) {
    words.assign((argsz + 7) / 8, 0);
    auto* info = reinterpret_cast<vfio_region_info*>(words.data());
    info->argsz = argsz;
    info->index = region_.index;
    return kernel_->ioctl(device_fd_, VFIO_DEVICE_GET_REGION_INFO, info);
  };
  if (ask(sizeof(vfio_region_info)) < 0) return false;  // holes in the index space are normal
  auto* info = reinterpret_cast<vfio_region_info*>(words.data());
  if (!(info->flags & VFIO_REGION_INFO_FLAG_CAPS)) return false;
  if (info->argsz > sizeof(vfio_region_info)) {
    const uint32_t need = info->argsz;
    if (need > kRegionInfoBytesMax)
      fail("region " + std::to_string(region_.index) + " info claims " + std::to_string(need) + " bytes", 0);
    if (ask(need) < 0) return false;
    info = reinterpret_cast<vfio_region_info*>(words.data());
  }
  const auto* base = reinterpret_cast<const std::byte*>(words.data());
  const size_t bytes = std::min<size_t>(info->argsz, words.size() * 8);
  bool migration = false;
  bool has_sparse = false;
  size_t sparse_at = 0;
  uint32_t off = info->cap_offset;
  for (int n = 0; off != 0 && n < kCapsMax; ++n) {
    if (off < sizeof(vfio_region_info) || off + sizeof(vfio_info_cap_header) > bytes) break;
    vfio_info_cap_header hdr;
    std::memcpy(&hdr, base + off, sizeof hdr);
    if (hdr.id == VFIO_REGION_INFO_CAP_TYPE && off + sizeof(vfio_region_info_cap_type) <= bytes) {
      vfio_region_info_cap_type type;
      std::memcpy(&type, base + off, sizeof type);
      if (type.type == VFIO_REGION_TYPE_MIGRATION_DEPRECATED &&
          type.subtype == VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED) {
        migration = true;
      }
    } else if (hdr.id == VFIO_REGION_INFO_CAP_SPARSE_MMAP &&
               off + sizeof(vfio_region_info_cap_sparse_mmap) <= bytes) {
      has_sparse = true;
      sparse_at = off;
    }
    if (hdr.next != 0 && hdr.next <= off) break;  // chains only move forward
    off = hdr.next;
  }
  if (!migration) return false;
  region_.flags = info->flags;
  region_.size = info->size;
  region_.offset = info->offset;
  region_.areas.clear();
  if (region_.size < sizeof(V1Header)) fail("v1 migration region is smaller than its header", 0);
  if ((region_.flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE)) !=
      (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE)) {
    fail("v1 migration region is not readable and writable", 0);
  }
  if (has_sparse && (region_.flags & VFIO_REGION_INFO_FLAG_MMAP)) {
    vfio_region_info_cap_sparse_mmap sparse;
    std::memcpy(&sparse, base + sparse_at, sizeof sparse);
    const uint32_t nr = sparse.nr_areas;
    const size_t areas_at = sparse_at + sizeof(vfio_region_info_cap_sparse_mmap);
    for (uint32_t i = 0; i < nr && areas_at + (i + 1) * sizeof(vfio_region_sparse_mmap_area) <= bytes; ++i) {
      vfio_region_sparse_mmap_area a;
      std::memcpy(&a, base + areas_at + i * sizeof a, sizeof a);
      if (a.size == 0 || a.offset >= region_.size || a.size > region_.size - a.offset) continue;
      region_.areas.push_back({a.offset, a.size, nullptr});
    }
    std::sort(region_.areas.begin(), region_.areas.end(),
              [](auto& x, auto& y) { return x.offset < y.offset; });
    for (size_t i = 1; i < region_.areas.size(); ++i) {
      if (region_.areas[i].offset < region_.areas[i - 1].offset + region_.areas[i - 1].size) {
        fail("v1 migration region's sparse mmap areas overlap", 0);
      }
    }
  }
  return true;
}

void VfioDevice::map_v1_areas() {
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  for (V1Region::Area& a : region_.areas) {
    if ((region_.offset + a.offset) % page != 0) continue;  // not mappable: read it instead
    void* p = nullptr;
    int rc = kernel_->mmap(device_fd_, a.size, PROT_READ | PROT_WRITE, region_.offset + a.offset, &p);
    a.writable = rc == 0;
    if (rc < 0) rc = kernel_->mmap(device_fd_, a.size, PROT_READ, region_.offset + a.offset, &p);
    if (rc == 0) a.addr = static_cast<std::byte*>(p);
  }
}

int VfioDevice::v1_mapped_areas() const {
  return int(
      std::count_if(region_.areas.begin(), region_.areas.end(), [](auto& a) { return a.addr != nullptr; }));
}

VfioDevice::Span VfioDevice::v1_span(uint64_t offset, bool for_write) const {
  uint64_t next = UINT64_MAX;
  for (const V1Region::Area& a : region_.areas) {
    if (!a.addr || (for_write && !a.writable)) continue;
    if (offset >= a.offset && offset < a.offset + a.size)
      return {a.addr + (offset - a.offset), a.offset + a.size - offset};
    if (a.offset > offset) next = std::min(next, a.offset - offset);
  }
  return {nullptr, next};
}

// ---------------------------------------------------------------- v2

MigState VfioDevice::state() {
  FeatureBuf f(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
               sizeof(vfio_device_feature_mig_state));
  const int rc = kernel_->ioctl(device_fd_, VFIO_DEVICE_FEATURE, f.arg());
  if (rc < 0) fail("VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE", -rc);
  return MigState(f.data<vfio_device_feature_mig_state>()->device_state);
}

int VfioDevice::set_state(MigState target, int* data_fd) {
  FeatureBuf f(VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
               sizeof(vfio_device_feature_mig_state));
  auto* mig = f.data<vfio_device_feature_mig_state>();
  mig->device_state = uint32_t(target);
  mig->data_fd = -1;
  const int rc = kernel_->ioctl(device_fd_, VFIO_DEVICE_FEATURE, f.arg());
  if (data_fd) *data_fd = rc < 0 ? -1 : mig->data_fd;
  return rc < 0 ? rc : 0;
}

std::optional<uint64_t> VfioDevice::stop_copy_length() {
  FeatureBuf f(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
               sizeof(vfio_device_feature_mig_data_size));
  if (kernel_->ioctl(device_fd_, VFIO_DEVICE_FEATURE, f.arg()) < 0) return std::nullopt;
  return f.data<vfio_device_feature_mig_data_size>()->stop_copy_length;
}

int VfioDevice::precopy_info(int data_fd, PrecopyInfo* out) {
  vfio_precopy_info info{};
  info.argsz = sizeof info;
  const int rc = kernel_->ioctl(data_fd, VFIO_MIG_GET_PRECOPY_INFO, &info);
  if (rc < 0) return rc;
  *out = PrecopyInfo{info.initial_bytes, info.dirty_bytes};
  return 0;
}

// ---------------------------------------------------------------- v1

uint64_t VfioDevice::v1_read(uint64_t field, int bytes, const char* name) {
  uint64_t value = 0;
  const int64_t n = kernel_->pread(device_fd_, &value, size_t(bytes), region_.offset + field);
  if (n < 0) fail(std::string("v1: read ") + name, int(-n));
  if (n != bytes) {
    fail(std::string("v1: short read of ") + name + " (" + std::to_string(n) + " of " +
             std::to_string(bytes) + " bytes)",
         0);
  }
  return value;
}

void VfioDevice::v1_write(uint64_t field, uint64_t value, int bytes, const char* name) {
  const int64_t n = kernel_->pwrite(device_fd_, &value, size_t(bytes), region_.offset + field);
  if (n < 0) fail(std::string("v1: write ") + name + " = " + std::to_string(value), int(-n));
  if (n != bytes) {
    fail(std::string("v1: short write of ") + name + " (" + std::to_string(n) + " of " +
             std::to_string(bytes) + " bytes)",
         0);
  }
}

uint32_t VfioDevice::v1_state() {
  return uint32_t(v1_read(kV1StateOffset, 4, "device_state"));
}

int VfioDevice::v1_set_state(uint32_t device_state) {
  const int64_t n = kernel_->pwrite(device_fd_, &device_state, 4, region_.offset + kV1StateOffset);
  if (n < 0) return int(n);
  return n == 4 ? 0 : -EIO;
}

uint64_t VfioDevice::v1_pending_bytes() {
  return v1_read(kV1PendingOffset, 8, "pending_bytes");
}
uint64_t VfioDevice::v1_data_offset() {
  return v1_read(kV1DataOffsetOffset, 8, "data_offset");
}
uint64_t VfioDevice::v1_data_size() {
  return v1_read(kV1DataSizeOffset, 8, "data_size");
}
void VfioDevice::v1_set_data_size(uint64_t bytes) {
  v1_write(kV1DataSizeOffset, bytes, 8, "data_size");
}

// ---------------------------------------------------------------- both

int VfioDevice::reset() {
  return kernel_->ioctl(device_fd_, VFIO_DEVICE_RESET, nullptr);
}

std::string VfioDevice::state_name() {
  try {
    if (protocol_ == Protocol::v2) return mig_state_name(state());
    return v1_state_name(v1_state());
  } catch (const std::exception& e) {
    return std::string("UNKNOWN (") + e.what() + ")";
  }
}

}  // namespace dstx::io::vfio
