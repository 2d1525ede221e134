// dstx migrate and dstx recv --sink DEVICE as a user runs them: exit codes, JSON fields, digests that match
// on both sides, a failure and Ctrl-C that leave the device RUNNING, clear errors for bad input.
#include <signal.h>

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "cli_proc.h"

namespace {

using namespace std::chrono_literals;
using dstx::test::Proc;
using dstx::test::start_recv;

// The value of "key" in a one-line JSON object: a string without quotes, or a number as text; "" if absent.
std::string field(const std::string& json, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  const size_t at = json.find(k);
  if (at == std::string::npos) return {};
  size_t v = at + k.size();
  if (json[v] == '"') return json.substr(v + 1, json.find('"', v + 1) - v - 1);
  const size_t end = json.find_first_of(",}", v);
  return json.substr(v, end - v);
}

struct Pair {
  int migrate_rc = -1, recv_rc = -1;
  std::string migrate_out, recv_out, migrate_err, recv_err;
};

Pair migrate(const std::string& device, const std::string& sink, std::vector<std::string> extra = {}) {
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", sink, "--json", "--accept-timeout", "20000"});
  const uint16_t port = start_recv(recv);
  std::vector<std::string> args = {"migrate", "--device", device, "--to", "127.0.0.1:" + std::to_string(port),
                                   "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  Proc m(args);
  Pair p;
  p.migrate_rc = m.wait();
  p.recv_rc = recv.wait();
  p.migrate_out = m.out();
  p.migrate_err = m.err();
  p.recv_out = recv.out();
  p.recv_err = recv.err();
  return p;
}

TEST(CliMigrate, BothProtocolsCommitWithTheSameStateDigestOnBothSides) {
  for (const std::string kind : {"emu-v2:", "emu-v1:"}) {
    const Pair p = migrate(kind + "size=32M,profile=mixed,seed=4,dirty=64M", kind + "size=32M");
    ASSERT_EQ(p.migrate_rc, 0) << p.migrate_out << p.migrate_err;
    ASSERT_EQ(p.recv_rc, 0) << p.recv_out << p.recv_err;
    EXPECT_EQ(field(p.migrate_out, "status"), "committed");
    EXPECT_EQ(field(p.migrate_out, "role"), "migrate");
    EXPECT_EQ(field(p.migrate_out, "protocol"), kind == "emu-v2:" ? "v2" : "v1");
    EXPECT_EQ(field(p.migrate_out, "device_state"), "STOP");
    EXPECT_EQ(field(p.recv_out, "device_state"), "STOP");
    EXPECT_GE(std::stod(field(p.migrate_out, "downtime_ms")), 0.0);
    EXPECT_GE(std::stoi(field(p.migrate_out, "precopy_rounds")), 1);
    const std::string digest = field(p.migrate_out, "state_digest");
    EXPECT_EQ(digest.size(), 32u) << p.migrate_out;
    EXPECT_EQ(digest, field(p.recv_out, "state_digest")) << p.recv_out;
  }
}

TEST(CliMigrate, AFailureLeavesTheSourceRunningAndTheDestinationReset) {
  const Pair p = migrate("emu-v2:size=16M,fault=eio-read@1M", "emu-v2:size=16M");
  EXPECT_EQ(p.migrate_rc, 1);
  EXPECT_EQ(p.recv_rc, 1);
  EXPECT_EQ(field(p.migrate_out, "status"), "failed");
  EXPECT_EQ(field(p.migrate_out, "reason"), "source");
  EXPECT_NE(field(p.migrate_out, "error").find("EIO"), std::string::npos) << p.migrate_out;
  EXPECT_EQ(field(p.migrate_out, "device_state"), "RUNNING");
  EXPECT_EQ(field(p.recv_out, "device_state"), "RUNNING");

  const Pair q = migrate("emu-v1:size=16M", "emu-v1:size=16M,fault=reject-state");
  EXPECT_EQ(q.migrate_rc, 1);
  EXPECT_EQ(q.recv_rc, 1);
  EXPECT_NE(field(q.migrate_out, "error").find("rejected the state"), std::string::npos) << q.migrate_out;
  EXPECT_EQ(field(q.migrate_out, "device_state"), "RUNNING");
  EXPECT_EQ(field(q.recv_out, "device_state"), "RUNNING");
}

TEST(CliMigrate, CtrlCPutsTheDeviceBackToRunning) {
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "emu-v2:size=64M", "--json"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  // A slow driver: 20 ms per 256 KiB makes this migration take seconds.
  Proc m({"migrate", "--device", "emu-v2:size=64M,delay-us=20000", "--to",
          "127.0.0.1:" + std::to_string(port), "--json"});
  std::this_thread::sleep_for(500ms);
  m.signal(SIGINT);
  EXPECT_EQ(m.wait(), 1);
  EXPECT_EQ(field(m.out(), "reason"), "cancelled") << m.out();
  EXPECT_EQ(field(m.out(), "device_state"), "RUNNING") << m.out();
  EXPECT_EQ(recv.wait(), 1);
  EXPECT_EQ(field(recv.out(), "device_state"), "RUNNING") << recv.out();
}

TEST(CliMigrate, TheReceiverCanInsistOnAProtocol) {
  // emu-v1 offers only the migration region: insisting on v1 loads the state through it.
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "emu-v1:size=8M", "--vfio-protocol", "v1", "--json"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  Proc m({"migrate", "--device", "emu-v1:size=8M,seed=3", "--to", "127.0.0.1:" + std::to_string(port), "--json"});
  EXPECT_EQ(m.wait(), 0) << m.out() << m.err();
  EXPECT_EQ(recv.wait(), 0) << recv.out() << recv.err();
  EXPECT_EQ(field(recv.out(), "device_state"), "STOP") << recv.out();
  EXPECT_EQ(field(m.out(), "state_digest"), field(recv.out(), "state_digest"));

  // A device without the asked-for protocol: refused before anything listens, and the reason is named.
  Proc forced({"recv", "--listen", "127.0.0.1:0", "--sink", "emu-v2:size=1M", "--vfio-protocol", "v1", "--json"});
  EXPECT_EQ(forced.wait(), 1);
  EXPECT_NE(forced.out().find("no v1 migration region"), std::string::npos) << forced.out();
  EXPECT_EQ(forced.err().find("listening on"), std::string::npos) << forced.err();
  // Not a device: a usage error that names the option.
  Proc not_device({"recv", "--listen", "127.0.0.1:0", "--sink", "null:", "--vfio-protocol", "v2"});
  EXPECT_EQ(not_device.wait(), 2);
  EXPECT_NE(not_device.err().find("--vfio-protocol applies only to a VFIO device sink"), std::string::npos)
      << not_device.err();
  Proc bad({"recv", "--listen", "127.0.0.1:0", "--sink", "emu-v2:", "--vfio-protocol", "v3"});
  EXPECT_EQ(bad.wait(), 2);
  EXPECT_NE(bad.err().find("expected v1, v2 or auto"), std::string::npos) << bad.err();
}

TEST(CliMigrate, HumanOutputNamesTheDeviceState) {
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "emu-v1:size=4M"});
  const uint16_t port = start_recv(recv);
  Proc m({"migrate", "--device", "emu-v1:size=4M", "--to", "127.0.0.1:" + std::to_string(port), "--quiet"});
  EXPECT_EQ(m.wait(), 0) << m.err();
  EXPECT_EQ(recv.wait(), 0) << recv.err();
  EXPECT_NE(m.out().find("now STOP"), std::string::npos) << m.out();
  EXPECT_NE(m.out().find("state digest"), std::string::npos) << m.out();
  EXPECT_NE(recv.out().find("now STOP"), std::string::npos) << recv.out();
}

TEST(CliMigrate, BadInputIsAUsageErrorAndAMissingDeviceIsNamed) {
  Proc bad_kind({"migrate", "--device", "file:/etc/hostname", "--to", "127.0.0.1:9"});
  EXPECT_EQ(bad_kind.wait(), 2);
  EXPECT_NE(bad_kind.err().find("vfio:/dev/vfio/devices/vfioN"), std::string::npos) << bad_kind.err();
  Proc bad_protocol({"migrate", "--device", "emu-v2:", "--to", "127.0.0.1:9", "--vfio-protocol", "v3"});
  EXPECT_EQ(bad_protocol.wait(), 2);
  Proc bad_key({"migrate", "--device", "emu-v2:colour=blue", "--to", "127.0.0.1:9"});
  EXPECT_EQ(bad_key.wait(), 2);
  EXPECT_NE(bad_key.err().find("unknown key 'colour'"), std::string::npos) << bad_key.err();
  Proc missing({"migrate", "--device", "vfio:/dev/vfio/devices/vfio99", "--to", "127.0.0.1:9", "--json"});
  EXPECT_EQ(missing.wait(), 1);
  EXPECT_NE(missing.out().find("/dev/vfio/devices/vfio99"), std::string::npos) << missing.out();
  EXPECT_NE(missing.out().find("errno"), std::string::npos) << missing.out();
  Proc forced(
      {"migrate", "--device", "emu-v2:size=1M", "--to", "127.0.0.1:9", "--vfio-protocol", "v1", "--json"});
  EXPECT_EQ(forced.wait(), 1);
  EXPECT_NE(forced.out().find("no v1 migration region"), std::string::npos) << forced.out();
  Proc help({"migrate", "--help"});
  EXPECT_EQ(help.wait(), 0);
  EXPECT_NE(help.out().find("--precopy-max-rounds"), std::string::npos);
  Proc main_help({"--help"});
  EXPECT_EQ(main_help.wait(), 0);
  EXPECT_NE(main_help.out().find("migrate"), std::string::npos);
}

}  // namespace
