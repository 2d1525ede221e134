// The path behind DSTX_ENDPOINT_VFIO_DEVICE: a device fd that the VMM opened and set up, handed to the
// migration driver (engine::open_device_fd, io::vfio::VfioDevice::adopt) instead of a spec that dstx opens.
//
// The C test program (test_capi.c) cannot reach this path with a working device: there are no VFIO devices
// here, and the emulated ones live in an in-process emulated kernel whose fds mean nothing to the host kernel
// (the C ABI duplicates the VMM's fd and drives it through the host kernel). So this test plays the VMM
// against the emulated kernel: it opens the device the way a VMM does (iommufd cdev: open, bind, IOAS,
// attach; group: container, group, VFIO_GROUP_GET_DEVICE_FD), hands the fd over, and migrates it with
// pre-copy rounds, the before_stop_copy hook and stop-copy; and it checks a failing destination leaves the
// source RUNNING.
#include <fcntl.h>
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "engine/migrate.h"
#include "io/vfio/emu_kernel.h"
#include "io/vfio/mig_fsm.h"

namespace dstx::engine {
namespace {

using io::vfio::DevicePath;
using io::vfio::EmuDeviceConfig;
using io::vfio::EmuKernel;
using io::vfio::Protocol;
using io::vfio::ProtocolChoice;

// The fds a VMM holds for one device; the device fd goes to dstx, the others stay the VMM's.
struct VmmDevice {
  std::shared_ptr<EmuKernel> kernel = std::make_shared<EmuKernel>();
  int id = -1;
  int device_fd = -1;
  std::vector<int> others;  // iommufd, or container and group
  ~VmmDevice() {
    for (auto it = others.rbegin(); it != others.rend(); ++it) kernel->close(*it);
  }
};

void open_like_a_vmm(VmmDevice& v, const EmuDeviceConfig& config, DevicePath::Kind how) {
  const EmuKernel::Added added = v.kernel->add_device(config);
  v.id = added.id;
  EmuKernel& k = *v.kernel;
  if (how == DevicePath::Kind::cdev) {
    const int dev = k.open(added.cdev.path, O_RDWR);
    ASSERT_GE(dev, 0);
    const int iommufd = k.open("/dev/iommu", O_RDWR);
    ASSERT_GE(iommufd, 0);
    v.others.push_back(iommufd);
    io::vfio::BindIommufd bind{
        .argsz = sizeof(io::vfio::BindIommufd), .flags = 0, .iommufd = iommufd, .out_devid = 0};
    ASSERT_EQ(k.ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind), 0);
    io::vfio::IommuIoasAlloc ioas{.size = sizeof(io::vfio::IommuIoasAlloc), .flags = 0, .out_ioas_id = 0};
    ASSERT_EQ(k.ioctl(iommufd, IOMMU_IOAS_ALLOC, &ioas), 0);
    io::vfio::AttachIommufdPt attach{
        .argsz = sizeof(io::vfio::AttachIommufdPt), .flags = 0, .pt_id = ioas.out_ioas_id};
    ASSERT_EQ(k.ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach), 0);
    v.device_fd = dev;
    return;
  }
  const int container = k.open("/dev/vfio/vfio", O_RDWR);
  ASSERT_GE(container, 0);
  v.others.push_back(container);
  const int group = k.open(added.group.path, O_RDWR);
  ASSERT_GE(group, 0);
  v.others.push_back(group);
  int c = container;
  ASSERT_EQ(k.ioctl(group, VFIO_GROUP_SET_CONTAINER, &c), 0);
  ASSERT_EQ(k.ioctl(container, VFIO_SET_IOMMU, reinterpret_cast<void*>(uintptr_t(VFIO_TYPE1v2_IOMMU))), 0);
  std::string name = added.group.name;
  const int dev = k.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name.data());
  ASSERT_GE(dev, 0);
  v.device_fd = dev;
}

EmuDeviceConfig config(Protocol protocol, const std::string& params) {
  DevicePath::Kind ignored;
  return parse_emu_device(protocol, params, &ignored);
}

struct Outcome {
  MigrateResult send;
  Result recv;
};

Outcome run(MigrationSource& src, DeviceSink& sink) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const uint16_t port = io::bound_port(listener.get());
  RecvOptions ro;
  ro.accept_timeout_ms = 10000;
  Stats send_stats, recv_stats;
  Cancel send_cancel, recv_cancel;
  Outcome out;
  std::thread receiver([&] { out.recv = receive(sink, listener.get(), ro, &recv_stats, &recv_cancel); });
  SendOptions so{.streams = 2};
  so.commit_timeout_ms = 20000;
  out.send = migrate_to(src, io::HostPort{"127.0.0.1", port}, so, &send_stats, &send_cancel);
  if (!out.send.transfer.committed) recv_cancel.request();
  receiver.join();
  return out;
}

struct Case {
  Protocol protocol;
  DevicePath::Kind source_open;
  DevicePath::Kind sink_open;
};

class DeviceFd : public ::testing::TestWithParam<Case> {};

TEST_P(DeviceFd, MigratesWithPreCopyAndTheHook) {
  const Case c = GetParam();
  VmmDevice from, to;
  open_like_a_vmm(from, config(c.protocol, "size=8M,profile=mixed,seed=4,dirty=32M"), c.source_open);
  open_like_a_vmm(to, config(c.protocol, "size=8M"), c.sink_open);
  ASSERT_GE(from.device_fd, 0);
  ASSERT_GE(to.device_fd, 0);

  std::atomic<int> hook_calls{0};
  std::string state_in_hook;
  MigrateOptions mo;
  mo.precopy_max_rounds = 3;
  mo.downtime_target_ms = 1;
  MigrationSource* src_ptr = nullptr;
  mo.before_stop_copy = [&] {
    ++hook_calls;
    state_in_hook = src_ptr->device_state();
  };
  MigrationSource src(open_device_fd(from.device_fd, ProtocolChoice::detect, "vmm source fd", from.kernel),
                      mo);
  src_ptr = &src;
  DeviceSink sink(open_device_fd(to.device_fd, ProtocolChoice::detect, "vmm sink fd", to.kernel));
  EXPECT_EQ(src.protocol(), c.protocol);
  EXPECT_EQ(sink.protocol(), c.protocol);
  EXPECT_EQ(src.describe(), "vmm source fd");

  const Outcome o = run(src, sink);
  ASSERT_TRUE(o.send.transfer.committed) << o.send.transfer.error;
  ASSERT_TRUE(o.recv.committed) << o.recv.error;
  EXPECT_EQ(hook_calls.load(), 1);
  EXPECT_EQ(state_in_hook, c.protocol == Protocol::v2 ? "PRE_COPY" : "SAVING|RUNNING");
  EXPECT_GE(o.send.precopy_rounds, 1u);
  EXPECT_LE(o.send.precopy_rounds, 3u);
  EXPECT_GE(o.send.downtime_ms, 0);
  EXPECT_EQ(o.send.device_state, "STOP");
  EXPECT_EQ(sink.device_state(), "STOP");
  EXPECT_EQ(from.kernel->state_digest(from.id).hex(), to.kernel->state_digest(to.id).hex());
}

Case cases[] = {
    {Protocol::v2, DevicePath::Kind::cdev, DevicePath::Kind::group},
    {Protocol::v1, DevicePath::Kind::group, DevicePath::Kind::cdev},
};
std::string case_name(const ::testing::TestParamInfo<Case>& param) {
  return param.param.protocol == Protocol::v1 ? "v1" : "v2";
}
INSTANTIATE_TEST_SUITE_P(Capi, DeviceFd, ::testing::ValuesIn(cases), case_name);

TEST(DeviceFdFailure, ARejectedStateLeavesTheSourceRunning) {
  for (Protocol p : {Protocol::v2, Protocol::v1}) {
    VmmDevice from, to;
    open_like_a_vmm(from, config(p, "size=4M,seed=2"), DevicePath::Kind::cdev);
    open_like_a_vmm(to, config(p, "size=4M,fault=reject-state"), DevicePath::Kind::cdev);
    MigrationSource src(open_device_fd(from.device_fd, ProtocolChoice::detect, "src", from.kernel), {});
    DeviceSink sink(open_device_fd(to.device_fd, ProtocolChoice::detect, "sink", to.kernel));
    const Outcome o = run(src, sink);
    EXPECT_FALSE(o.send.transfer.committed);
    EXPECT_FALSE(o.recv.committed);
    EXPECT_NE(o.recv.error.find("rejected"), std::string::npos) << o.recv.error;
    EXPECT_EQ(o.send.device_state, "RUNNING");
    EXPECT_EQ(from.kernel->state_name(from.id), "RUNNING");
    EXPECT_EQ(to.kernel->state_name(to.id), "RUNNING");  // reset
  }
}

TEST(DeviceFdFailure, AHookThatThrowsLeavesTheSourceRunning) {
  VmmDevice from, to;
  open_like_a_vmm(from, config(Protocol::v2, "size=4M,seed=2"), DevicePath::Kind::cdev);
  open_like_a_vmm(to, config(Protocol::v2, "size=4M"), DevicePath::Kind::cdev);
  MigrateOptions mo;
  mo.before_stop_copy = [] { throw std::runtime_error("the vCPUs would not stop"); };
  MigrationSource src(open_device_fd(from.device_fd, ProtocolChoice::detect, "src", from.kernel), mo);
  DeviceSink sink(open_device_fd(to.device_fd, ProtocolChoice::detect, "sink", to.kernel));
  const Outcome o = run(src, sink);
  EXPECT_FALSE(o.send.transfer.committed);
  EXPECT_NE(o.send.transfer.error.find("the vCPUs would not stop"), std::string::npos)
      << o.send.transfer.error;
  EXPECT_EQ(o.send.device_state, "RUNNING");
  EXPECT_EQ(to.kernel->state_name(to.id), "RUNNING");
}

TEST(DeviceFdFailure, NotADeviceIsRefusedAndClosed) {
  auto kernel = std::make_shared<EmuKernel>();
  const int iommufd = kernel->open("/dev/iommu", O_RDWR);  // an fd, but not a device's
  ASSERT_GE(iommufd, 0);
  try {
    open_device_fd(iommufd, ProtocolChoice::detect, "an iommufd", kernel);
    FAIL() << "an iommufd was taken for a device";
  } catch (const io::vfio::VfioError& e) {
    EXPECT_NE(std::string(e.what()).find("an iommufd: VFIO_DEVICE_GET_INFO"), std::string::npos) << e.what();
  }
  EXPECT_EQ(kernel->close(iommufd), -EBADF) << "the fd was not closed on failure";
}

}  // namespace
}  // namespace dstx::engine
