/* mtty_marker: reads and writes the UART scratch registers of a kernel mtty sample device (samples/vfio-mdev/mtty.c)
 * through VFIO, and reads its v2 migration state. Built statically for the conformance VM (tests/vm/): the scratch
 * register (offset 7 of each port's I/O BAR; BAR0 is port 0, BAR1 port 1 on mtty-2) is part of the migration
 * stream, so a value written on the source and read back on the destination proves the state really moved.
 *
 * It opens the device the way dstx does, so either path can be checked independently of dstx:
 *   vfio:/dev/vfio/devices/vfioN         iommufd cdev: open, /dev/iommu, BIND_IOMMUFD, IOAS_ALLOC, ATTACH_PT
 *   vfio-group:/dev/vfio/GROUP:NAME       container, Type1v2, GROUP_GET_DEVICE_FD(NAME) (an mdev's UUID)
 *
 * usage: mtty_marker SPEC read               prints "scr 0xAA 0xBB" (one value per port)
 *        mtty_marker SPEC write AA [BB]      writes the scratch register of port 0 [and port 1]
 *        mtty_marker SPEC state              prints "state NAME N" (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE)
 * Exit: 0 ok, 1 a VFIO call failed (the call and errno are printed), 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* Newer than Debian 12's linux-libc-dev (6.1): numbers from the 6.12 uAPI (vfio.h, iommufd.h). */
#ifndef VFIO_DEVICE_BIND_IOMMUFD
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#endif
#define MM_IOMMU_IOAS_ALLOC _IO(';', 0x81)

struct bind_iommufd {
  uint32_t argsz, flags;
  int32_t iommufd;
  uint32_t out_devid;
};
struct attach_pt {
  uint32_t argsz, flags, pt_id;
};
struct ioas_alloc {
  uint32_t size, flags, out_ioas_id;
};

#define SCR 7 /* UART_SCR */

static const char* prog = "mtty_marker";

static void die(const char* what, int err) {
  if (err)
    fprintf(stderr, "%s: %s: %s (errno %d)\n", prog, what, strerror(err), err);
  else
    fprintf(stderr, "%s: %s\n", prog, what);
  exit(1);
}

static int open_cdev(const char* path) {
  int dev = open(path, O_RDWR | O_CLOEXEC);
  if (dev < 0) die(path, errno);
  int iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
  if (iommufd < 0) die("open /dev/iommu", errno);
  struct bind_iommufd bind = {.argsz = sizeof bind, .flags = 0, .iommufd = iommufd, .out_devid = 0};
  if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind) < 0) die("VFIO_DEVICE_BIND_IOMMUFD", errno);
  struct ioas_alloc ioas = {.size = sizeof ioas, .flags = 0, .out_ioas_id = 0};
  if (ioctl(iommufd, MM_IOMMU_IOAS_ALLOC, &ioas) < 0) die("IOMMU_IOAS_ALLOC", errno);
  struct attach_pt attach = {.argsz = sizeof attach, .flags = 0, .pt_id = ioas.out_ioas_id};
  if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach) < 0) die("VFIO_DEVICE_ATTACH_IOMMUFD_PT", errno);
  return dev;
}

static int open_group(const char* group_path, const char* name) {
  int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
  if (container < 0) die("open /dev/vfio/vfio", errno);
  if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION) die("VFIO_GET_API_VERSION", errno);
  if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) <= 0)
    die("VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)", errno);
  int group = open(group_path, O_RDWR | O_CLOEXEC);
  if (group < 0) die(group_path, errno);
  struct vfio_group_status status = {.argsz = sizeof status};
  if (ioctl(group, VFIO_GROUP_GET_STATUS, &status) < 0) die("VFIO_GROUP_GET_STATUS", errno);
  if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) die("group not viable", 0);
  if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0) die("VFIO_GROUP_SET_CONTAINER", errno);
  if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0) die("VFIO_SET_IOMMU(TYPE1v2)", errno);
  int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name);
  if (dev < 0) die("VFIO_GROUP_GET_DEVICE_FD", errno);
  return dev;
}

static int open_spec(const char* spec) {
  if (strncmp(spec, "vfio:", 5) == 0) return open_cdev(spec + 5);
  if (strncmp(spec, "vfio-group:", 11) == 0) {
    char* path = strdup(spec + 11);
    char* colon = strchr(path, ':');
    if (!colon || colon == path || colon[1] == 0) {
      fprintf(stderr, "%s: vfio-group: expects /dev/vfio/GROUP:NAME\n", prog);
      exit(2);
    }
    *colon = 0;
    return open_group(path, colon + 1);
  }
  fprintf(stderr, "%s: not a device spec: %s\n", prog, spec);
  exit(2);
}

/* The file offset of BAR `index`'s byte 0, or -1 when the BAR is absent (size 0). */
static long long bar_offset(int dev, unsigned index) {
  struct vfio_region_info info = {.argsz = sizeof info, .index = index};
  if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &info) < 0) die("VFIO_DEVICE_GET_REGION_INFO", errno);
  if (info.size == 0) return -1;
  if (info.size <= SCR) die("BAR smaller than a UART", 0);
  return (long long)info.offset;
}

static const char* state_name(uint32_t s) {
  static const char* names[] = {"ERROR",     "STOP",        "RUNNING",  "STOP_COPY",
                                "RESUMING",  "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"};
  return s < sizeof names / sizeof names[0] ? names[s] : "UNKNOWN";
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s SPEC read | SPEC write AA [BB] | SPEC state\n", prog);
    return 2;
  }
  const char* op = argv[2];
  int dev = open_spec(argv[1]);

  if (strcmp(op, "state") == 0) {
    uint64_t buf[(sizeof(struct vfio_device_feature) + sizeof(struct vfio_device_feature_mig_state) + 7) / 8] = {0};
    struct vfio_device_feature* f = (struct vfio_device_feature*)buf;
    f->argsz = sizeof buf;
    f->flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    if (ioctl(dev, VFIO_DEVICE_FEATURE, f) < 0) die("VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE", errno);
    uint32_t s = ((struct vfio_device_feature_mig_state*)f->data)->device_state;
    printf("state %s %u\n", state_name(s), s);
    return 0;
  }

  long long bars[2] = {bar_offset(dev, VFIO_PCI_BAR0_REGION_INDEX), bar_offset(dev, VFIO_PCI_BAR1_REGION_INDEX)};
  if (bars[0] < 0) die("no BAR0: not an mtty device?", 0);

  if (strcmp(op, "read") == 0) {
    printf("scr");
    for (int i = 0; i < 2; ++i) {
      if (bars[i] < 0) continue;
      uint8_t v = 0;
      ssize_t n = pread(dev, &v, 1, bars[i] + SCR);
      if (n != 1) die("pread scratch register", n < 0 ? errno : EIO);
      printf(" 0x%02x", v);
    }
    printf("\n");
    return 0;
  }
  if (strcmp(op, "write") == 0 && argc >= 4 && argc <= 5) {
    for (int i = 0; i + 3 < argc; ++i) {
      if (bars[i] < 0) die("the device has no second port (mtty-1?)", 0);
      char* end = NULL;
      unsigned long v = strtoul(argv[3 + i], &end, 0);
      if (!end || *end || v > 0xff) {
        fprintf(stderr, "%s: not a byte: %s\n", prog, argv[3 + i]);
        return 2;
      }
      uint8_t b = (uint8_t)v;
      ssize_t n = pwrite(dev, &b, 1, bars[i] + SCR);
      if (n != 1) die("pwrite scratch register", n < 0 ? errno : EIO);
    }
    return 0;
  }
  fprintf(stderr, "usage: %s SPEC read | SPEC write AA [BB] | SPEC state\n", prog);
  return 2;
}
