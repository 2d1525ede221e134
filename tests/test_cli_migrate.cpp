// dstx migrate and dstx recv --sink DEVICE as a user runs them: exit codes, JSON fields, digests that match
// on both sides, a failure and Ctrl-C that leave the device RUNNING, clear errors for bad input.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using namespace std::chrono_literals;

// A child process running dstx with stdout and stderr captured.
class Proc {
 public:
  explicit Proc(std::vector<std::string> args) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    args.insert(args.begin(), DSTX_BINARY);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, DSTX_BINARY, &fa, nullptr, argv.data(), environ) != 0)
      throw std::runtime_error("spawn");
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err[1]);
    out_fd_ = out[0];
    err_fd_ = err[0];
  }
  ~Proc() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      wait();
    }
    close(out_fd_);
    close(err_fd_);
  }
  // The port `dstx recv` printed, 0 when none came.
  uint16_t port() {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      const size_t at = err_.find("listening on ");
      const size_t end = at == std::string::npos ? at : err_.find('\n', at);
      if (end != std::string::npos) return uint16_t(std::stoi(err_.substr(err_.rfind(':', end) + 1)));
      if (!pump(50)) break;
    }
    return 0;
  }
  int wait() {
    while (pump(20)) {
    }
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  void signal(int sig) { kill(pid_, sig); }
  const std::string& out() const { return out_; }
  const std::string& err() const { return err_; }

 private:
  bool pump(int timeout_ms) {
    pollfd p[2] = {{out_fd_, POLLIN, 0}, {err_fd_, POLLIN, 0}};
    if (poll(p, 2, timeout_ms) <= 0) return true;
    bool open = false;
    char buf[4096];
    for (int i = 0; i < 2; ++i) {
      if (p[i].revents == 0) {
        open = true;
        continue;
      }
      const ssize_t n = read(p[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? out_ : err_).append(buf, size_t(n));
        open = true;
      }
    }
    return open;
  }
  pid_t pid_ = -1;
  int out_fd_ = -1, err_fd_ = -1;
  std::string out_, err_;
};

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
  const uint16_t port = recv.port();
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
  const uint16_t port = recv.port();
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

TEST(CliMigrate, HumanOutputNamesTheDeviceState) {
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "emu-v1:size=4M"});
  const uint16_t port = recv.port();
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
