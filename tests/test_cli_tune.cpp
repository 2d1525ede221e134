// dstx tune as a user runs it: the profile it saves, send/demo taking their defaults from a profile (explicit
// options win, --no-tune ignores it, a malformed one is a usage error naming the file), and recv --count.
// No timing assertions: only that the measurements are sane and that the profile is used.
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli_proc.h"
#include "scratch_dir.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using dstx::test::Proc;
using dstx::test::run;
using dstx::test::start_recv;

// The first top-level-looking "key": NUMBER in `text`, or -1.
long long number_field(const std::string& text, const std::string& key) {
  const std::string quoted = "\"" + key + "\":";
  for (size_t at = text.find(quoted); at != std::string::npos; at = text.find(quoted, at + 1)) {
    size_t i = at + quoted.size();
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
    size_t j = i;
    while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) ++j;
    if (j > i) return std::stoll(text.substr(i, j - i));
  }
  return -1;
}

int count_of(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

class TuneCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    profile_ = (dir_ / "tune.json").string();
    // Every dstx this test starts reads (only) this profile, never the user's.
    setenv("DSTX_TUNE_PROFILE", profile_.c_str(), 1);
  }
  void TearDown() override {
    unsetenv("DSTX_TUNE_PROFILE");
    unsetenv("DSTX_TRACE_CODEC");
  }
  void write_profile(const std::string& text) { std::ofstream(profile_) << text; }

  // One send of `source` to a fresh `dstx recv --sink null:`; returns the send's exit code and JSON.
  int send_once(std::vector<std::string> extra, std::string* out, std::string* err = nullptr,
                const std::string& source = "emu:size=8M,profile=mixed") {
    Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "null:", "--quiet"});
    const uint16_t port = start_recv(recv);
    if (port == 0) return -1;
    std::vector<std::string> args = {
        "send",  "--source", source, "--to", "127.0.0.1:" + std::to_string(port),
        "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    const int rc = run(args, out, err);
    recv.wait();
    return rc;
  }

  const dstx::test::ScratchDir scratch_{"dstx-tune"};
  const fs::path& dir_ = scratch_.path();
  std::string profile_;
};

TEST_F(TuneCliTest, QuickTuneWritesASaneProfile) {
  const std::string path = (dir_ / "sub" / "out.json").string();
  std::string out, err;
  ASSERT_EQ(run({"tune", "--quick", "--size", "8M", "--out", path}, &out, &err), 0) << out << err;
  EXPECT_NE(out.find("saved to " + path), std::string::npos) << out;
  EXPECT_NE(out.find("zero copy"), std::string::npos) << out;
  std::ifstream in(path);
  ASSERT_TRUE(in) << path;
  std::stringstream text;
  text << in.rdbuf();
  const std::string p = text.str();
  EXPECT_EQ(number_field(p, "version"), 1) << p;
  EXPECT_GE(number_field(p, "cores"), 1) << p;
  EXPECT_NE(p.find("\"link\": \"loopback\""), std::string::npos) << p;
  const long long chunk = number_field(p, "chunk_bytes");
  EXPECT_TRUE(chunk == 256 << 10 || chunk == 1 << 20) << p;  // the --quick points
  EXPECT_GE(number_field(p, "streams"), 1) << p;
  EXPECT_LE(number_field(p, "streams"), 64) << p;
  const long long zc = number_field(p, "zero_copy_min_bytes");
  EXPECT_TRUE(zc == 0 || zc == 256 << 10 || zc == 1 << 20) << p;
  for (const char* key : {"\"lz4\"", "\"zstd-1\"", "\"binary\"", "\"text\"", "\"mixed\"", "\"encode_mb_s\"",
                          "\"decode_mb_s\"", "\"zero_copy_note\""}) {
    EXPECT_NE(p.find(key), std::string::npos) << key << "\n" << p;
  }
  // What --codec auto opens on: the fastest plain-send rate of the zero-copy table, lz4's fastest encode.
  const auto largest = [&](size_t from, size_t to, const std::string& key) {
    double best = -1;
    for (size_t at = p.find("\"" + key + "\": ", from); at < to; at = p.find("\"" + key + "\": ", at + 1)) {
      best = std::max(best, std::stod(p.substr(at + key.size() + 4)));
    }
    return best;
  };
  const double copy = largest(p.find("\"zero_copy\": ["), p.find("\"runs\""), "copy_mb_s");
  const double lz4 = largest(p.find("\"lz4\": {"), p.find("\"zstd-1\": {"), "encode_mb_s");
  ASSERT_GT(copy, 0) << p;
  ASSERT_GT(lz4, 0) << p;
  EXPECT_NEAR(double(number_field(p, "raw_mb_s")), copy, 1.0) << p;
  EXPECT_NEAR(double(number_field(p, "lz4_mb_s")), lz4, 1.0) << p;
  EXPECT_NE(out.find("--codec auto opens on "), std::string::npos) << out;
  EXPECT_GE(count_of(p, "\"kind\": \"sweep\""), 2) << p;
  EXPECT_EQ(count_of(p, "\"kind\": \"zero_copy\""), 12) << p;  // 2 frame sizes x 2 modes x median of 3
  // The profile it wrote is one send accepts.
  setenv("DSTX_TUNE_PROFILE", path.c_str(), 1);
  std::string json;
  ASSERT_EQ(send_once({}, &json, &err), 0) << json << err;
  // An 8 MiB state is cut finer than the profile's chunk: 8M / 512 = 16K, raised to 64K.
  EXPECT_EQ(number_field(json, "chunk_bytes"), std::min(chunk, 64ll << 10)) << json;
  EXPECT_EQ(number_field(json, "chunks"), (8ll << 20) / std::min(chunk, 64ll << 10)) << json;
}

TEST_F(TuneCliTest, JsonAndPlan) {
  std::string out, err;
  ASSERT_EQ(run({"tune", "--plan", "--quick"}, &out, &err), 0) << err;
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  EXPECT_EQ(out, std::to_string((cores > 1 ? 4 : 2) + 12) + " transfers\n");
  ASSERT_EQ(run({"tune", "--quick", "--size", "4M", "--json"}, &out, &err), 0) << err;
  EXPECT_EQ(number_field(out, "version"), 1) << out;
  EXPECT_TRUE(fs::exists(profile_)) << "without --out the profile goes to $DSTX_TUNE_PROFILE";
  EXPECT_EQ(run({"tune", "--size", "1K", "--out", profile_}, &out, &err), 2);
  EXPECT_EQ(run({"tune", "--bogus"}, &out, &err), 2);
  ASSERT_EQ(run({"tune", "--help"}, &out), 0);
  EXPECT_NE(out.find("--count N"), std::string::npos) << out;
  ASSERT_EQ(run({"send", "--help"}, &out), 0);
  EXPECT_NE(out.find("--no-tune"), std::string::npos) << out;
}

TEST_F(TuneCliTest, SendTakesItsDefaultsFromTheProfileAndOptionsOverride) {
  // Nested "chunk_bytes"/"streams" (in runs) must not be read: only the top-level ones. The profile's chunk
  // is below what an 8 MiB state is cut into (8M / 512 = 16K, raised to 64K), so it shows unchanged.
  write_profile(
      "{\"version\":1,\"machine\":{\"cores\":2},\"link\":\"loopback\",\"chunk_bytes\":16384,\"streams\":1,"
      "\"zero_copy_min_bytes\":0,\"codecs\":{},\"runs\":[{\"chunk_bytes\":4194304,\"streams\":8}]}\n");
  std::string out;
  ASSERT_EQ(send_once({}, &out), 0) << out;
  EXPECT_EQ(number_field(out, "chunks"), 512) << out;  // 8M / 16K
  EXPECT_EQ(number_field(out, "chunk_bytes"), 16384) << out;
  EXPECT_EQ(number_field(out, "streams"), 1) << out;
  // An explicit size is taken exactly, even above what the state's size would get.
  ASSERT_EQ(send_once({"--chunk-size", "1M", "--streams", "2"}, &out), 0) << out;
  EXPECT_EQ(number_field(out, "chunks"), 8) << out;
  EXPECT_EQ(number_field(out, "chunk_bytes"), 1 << 20) << out;
  EXPECT_EQ(number_field(out, "streams"), 2) << out;
  ASSERT_EQ(send_once({"--no-tune"}, &out), 0) << out;
  EXPECT_EQ(number_field(out, "chunk_bytes"), 64 << 10) << out;  // the built-in 1M, cut for 8 MiB
  EXPECT_EQ(number_field(out, "chunks"), 128) << out;
  // demo shares the parser.
  ASSERT_EQ(run({"demo", "--size", "8M", "--json"}, &out), 0) << out;
  EXPECT_EQ(number_field(out, "chunks"), 512) << out;
}

TEST_F(TuneCliTest, AutoOpensOnRawWhereTheProfileSaysTheLinkOutrunsLz4) {
  // DSTX_TRACE_CODEC prints the controller's decisions, the opening among them. 64 MiB: long enough for a
  // traced period on any machine.
  setenv("DSTX_TRACE_CODEC", "1", 1);
  const std::string source = "emu:size=64M,profile=mixed";
  write_profile(
      "{\"version\":1,\"chunk_bytes\":1048576,\"streams\":2,\"zero_copy_min_bytes\":0,\"raw_mb_s\":5000,"
      "\"lz4_mb_s\":1000}");
  std::string out, err;
  ASSERT_EQ(send_once({}, &out, &err, source), 0) << out << err;
  EXPECT_NE(err.find("opening on raw: tuned link 5.000 GB/s, lz4 1.000 GB/s x 2 workers"), std::string::npos)
      << err;
  // A cap below lz4 on both streams (--bandwidth 1500M) is the link's rate now; so is lz4 on more
  // streams than the link outruns; nor without the profile.
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--bandwidth", "1500M"}, {"--streams", "5"}, {"--no-tune"}}) {
    ASSERT_EQ(send_once(args, &out, &err, source), 0) << out << err;
    EXPECT_EQ(err.find("opening on raw"), std::string::npos) << args[0] << "\n" << err;
    EXPECT_NE(err.find("effort 1.00"), std::string::npos) << args[0] << "\n" << err;  // it traced lz4
  }
  // A profile saved before these fields opens on lz4, as before.
  write_profile("{\"version\":1,\"chunk_bytes\":1048576,\"streams\":2,\"zero_copy_min_bytes\":0}");
  ASSERT_EQ(send_once({}, &out, &err, source), 0) << out << err;
  EXPECT_EQ(err.find("opening on raw"), std::string::npos) << err;
}

TEST_F(TuneCliTest, MissingProfileIsSilent) {
  setenv("DSTX_TUNE_PROFILE", "/nonexistent/dstx/tune.json", 1);
  std::string out, err;
  ASSERT_EQ(send_once({}, &out, &err), 0) << out << err;
  EXPECT_EQ(number_field(out, "chunks"), 128) << out;  // built-in 1M, cut to 64K for 8 MiB
  EXPECT_EQ(err.find("tune"), std::string::npos) << err;
  // Nor does XDG_CONFIG_HOME pointing nowhere matter.
  unsetenv("DSTX_TUNE_PROFILE");
  setenv("XDG_CONFIG_HOME", (dir_ / "nothing-here").c_str(), 1);
  ASSERT_EQ(send_once({}, &out, &err), 0) << out << err;
  EXPECT_EQ(number_field(out, "chunks"), 128) << out;  // built-in 1M, cut to 64K for 8 MiB
  unsetenv("XDG_CONFIG_HOME");
}

TEST_F(TuneCliTest, MalformedProfileIsAUsageErrorNamingTheFile) {
  const std::vector<std::string> bad = {
      "",
      "{",
      "not json",
      "{\"version\":1,\"chunk_bytes\":\"big\",\"streams\":1,\"zero_copy_min_bytes\":0}",
      "{\"version\":1,\"chunk_bytes\":1048576,\"streams\":1}",
      "{\"version\":2,\"chunk_bytes\":1048576,\"streams\":1,\"zero_copy_min_bytes\":0}",
      "{\"version\":1,\"chunk_bytes\":100,\"streams\":1,\"zero_copy_min_bytes\":0}",
      "{\"version\":1,\"chunk_bytes\":1048576,\"streams\":0,\"zero_copy_min_bytes\":0}",
      "{\"version\":1,\"chunk_bytes\":1.5,\"streams\":1,\"zero_copy_min_bytes\":0}",
      "{\"version\":1,\"chunk_bytes\":1048576,\"streams\":1,\"zero_copy_min_bytes\":0} trailing",
      "{\"version\":1,\"chunk_bytes\":1048576,\"streams\":1,\"zero_copy_min_bytes\":0,\"raw_mb_s\":2.5}",
      "{\"version\":1,\"chunk_bytes\":1048576,\"streams\":1,\"zero_copy_min_bytes\":0,\"lz4_mb_s\":2000000}",
  };
  for (const auto& text : bad) {
    write_profile(text);
    std::string out, err;
    EXPECT_EQ(run({"send", "--source", "emu:size=1M", "--to", "127.0.0.1:1"}, &out, &err), 2) << text;
    EXPECT_NE(err.find(profile_), std::string::npos) << text << "\n" << err;
    EXPECT_NE(err.find("malformed"), std::string::npos) << text << "\n" << err;
  }
  // --no-tune gets past it (port 1: connection refused, a transfer failure).
  EXPECT_EQ(run({"send", "--source", "emu:size=1M", "--to", "127.0.0.1:1", "--no-tune"}), 1);
}

TEST_F(TuneCliTest, RecvCountServesTransfersOneAfterAnother) {
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "null:", "--count", "2", "--json"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  const std::string to = "127.0.0.1:" + std::to_string(port);
  for (const char* size : {"emu:size=4M", "emu:size=6M,profile=text"}) {
    std::string out;
    EXPECT_EQ(run({"send", "--source", size, "--to", to, "--json"}, &out), 0) << out;
    // The receiver accepts (resumed streams) on its listener for a moment after COMMITTED and refuses a new
    // transfer then as busy (engine/receiver.cpp acceptor): let the first one close.
    std::this_thread::sleep_for(300ms);
  }
  ASSERT_EQ(recv.wait(), 0) << recv.out() << recv.err();
  EXPECT_EQ(count_of(recv.out(), "\"status\":\"committed\""), 2) << recv.out();
  EXPECT_EQ(number_field(recv.out(), "bytes"), 4 << 20) << recv.out();
  std::string err;
  EXPECT_EQ(run({"recv", "--listen", "127.0.0.1:0", "--sink", "null:", "--count", "0"}, nullptr, &err), 2);
  EXPECT_NE(err.find("--count"), std::string::npos) << err;
}

TEST_F(TuneCliTest, TuneAgainstARemoteReceiver) {
  std::string plan;
  ASSERT_EQ(run({"tune", "--quick", "--plan"}, &plan), 0);
  const std::string count = plan.substr(0, plan.find(' '));
  Proc recv({"recv", "--listen", "127.0.0.1:0", "--sink", "null:", "--count", count, "--quiet"});
  const uint16_t port = start_recv(recv);
  ASSERT_NE(port, 0) << recv.err();
  const std::string to = "127.0.0.1:" + std::to_string(port);
  std::string out, err;
  ASSERT_EQ(run({"tune", "--quick", "--size", "4M", "--to", to, "--out", profile_}, &out, &err), 0)
      << out << err;
  EXPECT_EQ(recv.wait(), 0) << recv.err();
  std::ifstream in(profile_);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_NE(text.str().find("\"link\": \"" + to + "\""), std::string::npos) << text.str();
}

}  // namespace
