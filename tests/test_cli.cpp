// The dstx command as a user runs it: exit codes, messages, JSON, a 1 GiB file transfer, a killed sender,
// Ctrl-C.
#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "cli_proc.h"
#include "scratch_dir.h"
#include "engine/spec.h"
#include "io/content.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using dstx::test::Proc;
using dstx::test::run;
using dstx::test::start_recv;

int run_cmp(const fs::path& a, const fs::path& b) {
  return std::system(("cmp -s '" + a.string() + "' '" + b.string() + "'").c_str());
}

class CliTest : public ::testing::Test {
 protected:
  const dstx::test::ScratchDir scratch_{"dstx-cli"};
  const fs::path& dir_ = scratch_.path();
};

TEST_F(CliTest, UsageErrorsExitTwoAndNameWhatWasWrong) {
  std::string err;
  EXPECT_EQ(run({}, nullptr, &err), 2);
  EXPECT_EQ(run({"frobnicate"}, nullptr, &err), 2);
  EXPECT_NE(err.find("unknown command 'frobnicate'"), std::string::npos) << err;
  EXPECT_EQ(run({"send", "--bogus", "1"}, nullptr, &err), 2);
  EXPECT_NE(err.find("--bogus"), std::string::npos) << err;
  EXPECT_EQ(run({"send", "--source", "emu:", "--to", "127.0.0.1:1", "--chunk-size", "3Q"}, nullptr, &err), 2);
  EXPECT_NE(err.find("3Q"), std::string::npos) << err;
  EXPECT_EQ(run({"send", "--source", "emu:", "--to", "127.0.0.1:1", "--chunk-size", "32M"}, nullptr, &err),
            2);
  EXPECT_NE(err.find("--chunk-size"), std::string::npos) << err;
  EXPECT_EQ(run({"send", "--source", "nope:x", "--to", "127.0.0.1:1"}, nullptr, &err), 2);
  EXPECT_NE(err.find("unknown source kind 'nope'"), std::string::npos) << err;
  EXPECT_EQ(run({"send", "--source", "emu:profile=plaid", "--to", "127.0.0.1:1"}, nullptr, &err), 2);
  EXPECT_NE(err.find("plaid"), std::string::npos) << err;
  EXPECT_EQ(run({"recv", "--listen", "127.0.0.1:99999", "--sink", "null:"}, nullptr, &err), 2);
  EXPECT_NE(err.find("99999"), std::string::npos) << err;
  EXPECT_EQ(run({"recv", "--listen", "127.0.0.1:0"}, nullptr, &err), 2);
  EXPECT_NE(err.find("missing --sink"), std::string::npos) << err;
  EXPECT_EQ(run({"send", "--source", "emu:", "--to", "127.0.0.1:1", "--codec", "gzip"}, nullptr, &err), 2);
  EXPECT_NE(err.find("gzip"), std::string::npos) << err;
  EXPECT_EQ(run({"send", "--source", "emu:", "--to", "127.0.0.1:1", "--replay-buffer", "2G"}, nullptr, &err), 2);
  EXPECT_NE(err.find("--replay-buffer 2G: at most 1G"), std::string::npos) << err;
  EXPECT_EQ(run({"demo", "--seed", "1K"}, nullptr, &err), 2);  // a seed is a number, not a size
  EXPECT_NE(err.find("--seed '1K'"), std::string::npos) << err;
  EXPECT_EQ(run({"recv", "--listen", "127.0.0.1:0", "--sink", "fd:77"}, nullptr, &err), 2);
  EXPECT_NE(err.find("file descriptor 77 in 'fd:77' is not open"), std::string::npos) << err;
  EXPECT_EQ(run({"recv", "--listen", "127.0.0.1:0", "--sink", "fd:2", "--count", "2"}, nullptr, &err), 2);
  EXPECT_NE(err.find("--count 2 with --sink fd:2: the descriptor is closed after the first transfer"),
            std::string::npos)
      << err;
}

TEST_F(CliTest, HelpOnEveryCommand) {
  for (const char* cmd : {"send", "recv", "demo"}) {
    std::string out;
    EXPECT_EQ(run({cmd, "--help"}, &out), 0) << cmd;
    EXPECT_NE(out.find("usage: dstx"), std::string::npos) << cmd;
  }
  std::string out;
  EXPECT_EQ(run({"--help"}, &out), 0);
  EXPECT_NE(out.find("exit codes"), std::string::npos);
}

TEST_F(CliTest, ConnectionRefusedFailsWithTheAddress) {
  std::string out;
  // Port 1 on loopback: nothing listens there.
  EXPECT_EQ(run({"send", "--source", "emu:size=1M", "--to", "127.0.0.1:1", "--json"}, &out), 1);
  EXPECT_NE(out.find("\"status\":\"failed\""), std::string::npos) << out;
  EXPECT_NE(out.find("127.0.0.1:1"), std::string::npos) << out;
}

TEST_F(CliTest, DemoCommitsAndVerifies) {
  std::string out;
  ASSERT_EQ(run({"demo", "--size", "64M", "--json"}, &out), 0) << out;
  EXPECT_NE(out.find("\"role\":\"send\""), std::string::npos);
  EXPECT_NE(out.find("\"role\":\"recv\""), std::string::npos);
  EXPECT_EQ(out.find("failed"), std::string::npos) << out;
  ASSERT_EQ(run({"demo", "--size", "16M", "--profile", "text", "--quiet"}, &out), 0) << out;
  EXPECT_NE(out.find("byte-exact"), std::string::npos) << out;
}

// The "done when" of the core issue: a 1 GiB file through send and recv arrives identical.
TEST_F(CliTest, OneGibFileArrivesIdentical) {
  const fs::path in = dir_ / "state.bin", out = dir_ / "copy.bin";
  {
    const dstx::io::ContentGenerator gen(dstx::io::Profile::mixed, 2024);
    std::vector<std::byte> buf(4 << 20);
    std::ofstream f(in, std::ios::binary);
    for (uint64_t off = 0; off < (1ull << 30); off += buf.size()) {
      gen.fill(off, buf);
      f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(buf.size()));
    }
  }
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "file:" + out.string(), "--json"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  std::string send_out;
  const int send_rc =
      run({"send", "--source", "file:" + in.string(), "--to", "127.0.0.1:" + std::to_string(port), "--json"},
          &send_out);
  const int recv_rc = recv.wait();
  ASSERT_EQ(send_rc, 0) << send_out;
  ASSERT_EQ(recv_rc, 0) << recv.out() << recv.err();
  EXPECT_NE(send_out.find("\"status\":\"committed\""), std::string::npos);
  EXPECT_NE(send_out.find("\"bytes\":1073741824"), std::string::npos) << send_out;
  EXPECT_NE(recv.out().find("\"status\":\"committed\""), std::string::npos);
  ASSERT_EQ(fs::file_size(out), 1ull << 30);
  EXPECT_EQ(run_cmp(in, out), 0);
}

TEST_F(CliTest, KilledSenderLeavesNothingAtTheDestination) {
  const fs::path out = dir_ / "copy.bin";
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "file:" + out.string(), "--json",
             "--resume-timeout", "1000"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  Proc send({"send", "--source", "emu:size=64G,profile=random", "--to", "127.0.0.1:" + std::to_string(port),
             "--streams", "2"});
  // Wait until data is flowing: the .partial file exists and grows.
  const fs::path partial = out.string() + ".partial";
  for (int i = 0; i < 200 && !(fs::exists(partial) && fs::file_size(partial) > (8 << 20)); ++i) {
    std::this_thread::sleep_for(25ms);
  }
  ASSERT_TRUE(fs::exists(partial));
  send.signal(SIGKILL);
  EXPECT_EQ(send.wait(), 128 + SIGKILL);
  EXPECT_EQ(recv.wait(), 1) << recv.out();  // after waiting out the resume time-out for a sender that is gone
  EXPECT_NE(recv.out().find("\"status\":\"failed\""), std::string::npos) << recv.out();
  EXPECT_NE(recv.out().find("not resumed within 1000 ms"), std::string::npos) << recv.out();
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(partial));
}

TEST_F(CliTest, CtrlCCancelsBothSidesCleanly) {
  const fs::path out = dir_ / "copy.bin";
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "file:" + out.string(), "--json"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  Proc send({"send", "--source", "emu:size=64G,profile=random", "--to", "127.0.0.1:" + std::to_string(port),
             "--json"});
  const fs::path partial = out.string() + ".partial";
  for (int i = 0; i < 200 && !(fs::exists(partial) && fs::file_size(partial) > (8 << 20)); ++i) {
    std::this_thread::sleep_for(25ms);
  }
  send.signal(SIGINT);
  EXPECT_EQ(send.wait(), 1);
  EXPECT_NE(send.out().find("\"reason\":\"cancelled\""), std::string::npos) << send.out();
  EXPECT_EQ(recv.wait(), 1);
  EXPECT_NE(recv.out().find("cancelled"), std::string::npos) << recv.out();
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(partial));
}

}  // namespace

namespace {

// A receiver blocked writing into a pipe nobody reads (its stdout here) cannot finish a cancel: the first
// Ctrl-C says a second one forces, and the second ends the process at once.
TEST_F(CliTest, ASecondCtrlCEndsAReceiverThatCannotFinishItsCancel) {
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "stdout:"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  Proc send({"send", "--source", "emu:size=64M,profile=random", "--to", "127.0.0.1:" + std::to_string(port)});
  // The state fills the pipe behind stdout (64 KiB): the sink's writer blocks.
  for (int i = 0; i < 400 && recv.stdout_pending() < (64 << 10); ++i) std::this_thread::sleep_for(25ms);
  ASSERT_GE(recv.stdout_pending(), 64 << 10);
  recv.signal(SIGINT);
  std::this_thread::sleep_for(300ms);
  recv.signal(SIGINT);
  EXPECT_EQ(recv.wait(), 128 + SIGINT) << recv.err();
  EXPECT_NE(recv.err().find("dstx: cancelling; a second Ctrl-C ends it at once"), std::string::npos)
      << recv.err();
  EXPECT_EQ(send.wait(), 1);
}

TEST_F(CliTest, CtrlCOnTheReceiverCancelsBothSides) {
  const fs::path out = dir_ / "copy.bin";
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "file:" + out.string(), "--json"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  Proc send({"send", "--source", "emu:size=64G,profile=random", "--to", "127.0.0.1:" + std::to_string(port),
             "--json"});
  const fs::path partial = out.string() + ".partial";
  for (int i = 0; i < 200 && !(fs::exists(partial) && fs::file_size(partial) > (8 << 20)); ++i) {
    std::this_thread::sleep_for(25ms);
  }
  recv.signal(SIGINT);
  EXPECT_EQ(recv.wait(), 1);
  EXPECT_NE(recv.out().find("\"reason\":\"cancelled\""), std::string::npos) << recv.out();
  EXPECT_EQ(send.wait(), 1);
  EXPECT_NE(send.out().find("receiver aborted (cancelled)"), std::string::npos) << send.out();
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(partial));
}

}  // namespace

namespace {

// A stream sink gets the state and nothing else: the summary (or --json) goes to stderr then.
TEST_F(CliTest, StdoutSinkCarriesOnlyTheState) {
  const fs::path in = dir_ / "in.bin";
  {
    std::ofstream f(in, std::ios::binary);
    std::vector<std::byte> buf(3'000'001);
    dstx::io::ContentGenerator(dstx::io::Profile::mixed, 5).fill(0, buf);
    f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(buf.size()));
  }
  const fs::path got = dir_ / "stdout.bin";
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "stdout:", "--json"}, got.string());
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  std::string out;
  ASSERT_EQ(
      run({"send", "--source", "file:" + in.string(), "--to", "127.0.0.1:" + std::to_string(port)}, &out), 0)
      << out;
  ASSERT_EQ(recv.wait(), 0) << recv.err();
  EXPECT_EQ(fs::file_size(got), fs::file_size(in));
  EXPECT_EQ(run_cmp(in, got), 0);
  EXPECT_NE(recv.err().find("\"status\":\"committed\""), std::string::npos) << recv.err();
}

}  // namespace

namespace {

// The receiver dies mid-transfer: the sender tries to resume, gives up after its attempts, and says so.
TEST_F(CliTest, KilledReceiverFailsTheSenderCleanly) {
  const fs::path out = dir_ / "copy.bin";
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "file:" + out.string()});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  Proc send({"send", "--source", "emu:size=64G,profile=random", "--to", "127.0.0.1:" + std::to_string(port),
             "--json", "--reconnect-attempts", "2"});
  const fs::path partial = out.string() + ".partial";
  for (int i = 0; i < 200 && !(fs::exists(partial) && fs::file_size(partial) > (8 << 20)); ++i) {
    std::this_thread::sleep_for(25ms);
  }
  recv.signal(SIGKILL);
  EXPECT_EQ(recv.wait(), 128 + SIGKILL);
  EXPECT_EQ(send.wait(), 1);
  EXPECT_NE(send.out().find("\"status\":\"failed\""), std::string::npos) << send.out();
  EXPECT_NE(send.out().find("not resumed after 2 attempts"), std::string::npos) << send.out();
  EXPECT_FALSE(fs::exists(out));  // a killed receiver leaves its .partial: the next run refuses it, by name
}

// Killed at each phase: before any data (handshake), mid-data, and after the last chunk (waiting for the
// commit). The receiver fails and leaves nothing in every case.
TEST_F(CliTest, SenderKilledAtEachPhaseLeavesNothing) {
  for (const char* phase : {"handshake", "data", "commit"}) {
    const fs::path out = dir_ / (std::string("copy-") + phase);
    Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "file:" + out.string(), "--json",
               "--resume-timeout", "500", "--idle-timeout", "2000"});
    const uint16_t port = start_recv(recv);
    ASSERT_NE(port, 0) << recv.err();
    const std::string to = "127.0.0.1:" + std::to_string(port);
    if (std::string(phase) == "handshake") {
      // Dies right after connecting, before its handshake is through.
      Proc send({"send", "--source", "emu:size=64G,profile=random", "--to", to, "--bandwidth", "1K"});
      std::this_thread::sleep_for(5ms);
      send.signal(SIGKILL);
      send.wait();
    } else if (std::string(phase) == "data") {
      Proc send({"send", "--source", "emu:size=64G,profile=random", "--to", to});
      const fs::path partial = out.string() + ".partial";
      for (int i = 0; i < 200 && !(fs::exists(partial) && fs::file_size(partial) > (4 << 20)); ++i) {
        std::this_thread::sleep_for(25ms);
      }
      send.signal(SIGKILL);
      send.wait();
    } else {
      // Killed around its last chunk and END: the receiver either commits (everything arrived and was
      // verified) or fails cleanly. Both are allowed; half of each is not.
      Proc send({"send", "--source", "emu:size=4M,profile=random", "--to", to});
      std::this_thread::sleep_for(50ms);
      send.signal(SIGKILL);
      send.wait();
    }
    const int rc = recv.wait();
    const bool committed = recv.out().find("\"status\":\"committed\"") != std::string::npos;
    if (std::string(phase) != "commit") {
      EXPECT_EQ(rc, 1) << phase << ": " << recv.out();
      EXPECT_FALSE(committed) << phase;
    }
    EXPECT_EQ(fs::exists(out), committed && rc == 0) << phase << ": " << recv.out();
    EXPECT_FALSE(fs::exists(out.string() + ".partial")) << phase;
  }
}

}  // namespace
