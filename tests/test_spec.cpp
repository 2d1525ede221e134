// Endpoint specs, sizes and rates: what users type.
#include <unistd.h>

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "engine/migrate.h"
#include "engine/spec.h"

namespace dstx::engine {
namespace {

TEST(Spec, Sizes) {
  EXPECT_EQ(parse_size("0"), 0u);
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("64K"), 64u << 10);
  EXPECT_EQ(parse_size("1M"), 1u << 20);
  EXPECT_EQ(parse_size("1MiB"), 1u << 20);
  EXPECT_EQ(parse_size("2g"), 2ull << 30);
  EXPECT_EQ(parse_size("1.5G"), 3ull << 29);
  EXPECT_EQ(parse_size("1T"), 1ull << 40);
  EXPECT_EQ(parse_size("16777215.5T"), (16777215ull << 40) + (1ull << 39));
  // The last: a fraction that rounds up to a whole 2^40 would make exactly 2^64, which wrapped to 0.
  for (const char* bad : {"", "K", "1.5", "12Q", "-1", "1..5G", "99999999999999999999", "20000000000T",
                          "16777215.9999999999999T"}) {
    EXPECT_THROW(parse_size(bad), std::invalid_argument) << bad;
  }
  try {
    parse_size("12Q");
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'12Q'"), std::string::npos);
  }
}

TEST(Spec, Rates) {
  EXPECT_EQ(parse_rate("1gbit"), 125000000u);
  EXPECT_EQ(parse_rate("100mbit"), 12500000u);
  EXPECT_EQ(parse_rate("800kbit"), 100000u);
  EXPECT_EQ(parse_rate("500M"), 500u << 20);
  EXPECT_EQ(parse_rate("8bit"), 1u);
  // 7 bit/s would be 0 bytes/s, which the engine reads as "no cap"; and no product may wrap around.
  for (const char* bad :
       {"0", "bit", "0gbit", "fastbit", "1.5gbit", "x", "7bit", "18446744073709551615gbit"}) {
    EXPECT_THROW(parse_rate(bad), std::invalid_argument) << bad;
  }
}

TEST(Spec, EmuParameters) {
  const EmuSpec d = parse_emu("");
  EXPECT_EQ(d.size, 256ull << 20);
  EXPECT_EQ(d.profile, io::Profile::mixed);
  const EmuSpec e = parse_emu("size=1G,profile=zero-heavy,seed=42");
  EXPECT_EQ(e.size, 1ull << 30);
  EXPECT_EQ(e.profile, io::Profile::zero_heavy);
  EXPECT_EQ(e.seed, 42u);
  EXPECT_THROW(parse_emu("colour=blue"), std::invalid_argument);
  EXPECT_THROW(parse_emu("profile=plaid"), std::invalid_argument);
  EXPECT_THROW(parse_emu("seed=x"), std::invalid_argument);
  EXPECT_THROW(parse_emu("size"), std::invalid_argument);
}

// emu: content and emulated devices (emu-v1:, emu-v2:) read their common keys alike: same values, same errors.
TEST(Spec, EmuDevicesShareTheContentKeys) {
  io::vfio::DevicePath::Kind open_as;
  const io::vfio::EmuDeviceConfig c =
      parse_emu_device(io::vfio::Protocol::v2, "size=3M,profile=binary,seed=9,,dirty=1M", &open_as);
  EXPECT_EQ(c.state.size, 3u << 20);
  EXPECT_EQ(c.state.profile, io::Profile::binary);
  EXPECT_EQ(c.state.seed, 9u);
  EXPECT_EQ(c.state.dirty_bytes_per_sec, 1u << 20);
  for (const char* params : {"seed=x", "profile=plaid", "size", "size=1Q"}) {
    std::string content_error, device_error;
    try {
      parse_emu(params);
    } catch (const std::invalid_argument& e) {
      content_error = e.what();
    }
    try {
      parse_emu_device(io::vfio::Protocol::v1, params, &open_as);
    } catch (const std::invalid_argument& e) {
      device_error = e.what();
    }
    EXPECT_FALSE(content_error.empty()) << params;
    EXPECT_EQ(content_error, device_error) << params;
  }
  std::vector<std::pair<std::string, std::string>> seen;
  for_each_param("a=1,,b=,c=x=y", "test", [&](std::string_view k, std::string_view v) {
    seen.emplace_back(std::string(k), std::string(v));
  });
  EXPECT_EQ(seen, (std::vector<std::pair<std::string, std::string>>{{"a", "1"}, {"b", ""}, {"c", "x=y"}}));
  try {
    for_each_param("a=1,oops", "test", [](std::string_view, std::string_view) {});
    ADD_FAILURE() << "no error for an item without '='";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "test: expected key=value, got 'oops'");
  }
}

TEST(Spec, SourcesAndSinksByKind) {
  EXPECT_NE(open_source("emu:size=1M")->describe().find("emu"), std::string::npos);
  EXPECT_TRUE(open_sink("null:"));
  EXPECT_FALSE(open_source("stdin:")->random_access());
  for (const char* bad : {"nokind", "bogus:x", "file:", "fd:abc", "fd:-1"}) {
    EXPECT_THROW(open_source(bad), std::invalid_argument) << bad;
  }
  for (const char* bad : {"nokind", "bogus:x", "file:", "fd:12x"}) {
    EXPECT_THROW(open_sink(bad), std::invalid_argument) << bad;
  }
  // A number that names no open descriptor is refused, not taken as whatever gets that number next.
  const int closed = ::dup(STDERR_FILENO);
  ASSERT_GE(closed, 0);
  ::close(closed);
  const std::string spec = "fd:" + std::to_string(closed);
  for (const bool as_sink : {false, true}) {
    try {
      if (as_sink) {
        open_sink(spec);
      } else {
        open_source(spec);
      }
      ADD_FAILURE() << spec << " accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()),
                "file descriptor " + std::to_string(closed) + " in '" + spec + "' is not open");
    }
  }
  try {
    open_source("bogus:x");
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("unknown source kind 'bogus'"), std::string::npos) << e.what();
  }
  // A missing file is a runtime error naming the path, not a usage error.
  try {
    open_source("file:/nonexistent/dstx-state");
    ADD_FAILURE() << "opened a missing file";
  } catch (const std::invalid_argument&) {
    ADD_FAILURE() << "a missing file is not a usage error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dstx-state"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dstx::engine
