#include "engine/spec.h"

#include <fcntl.h>
#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "engine/migrate.h"

namespace dstx::engine {
namespace {

std::invalid_argument bad(std::string text) { return std::invalid_argument(std::move(text)); }

int parse_fd(std::string_view text, std::string_view spec) {
  int fd = -1;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), fd);
  if (ec != std::errc() || end != text.data() + text.size() || fd < 0) {
    throw bad("bad file descriptor '" + std::string(text) + "' in '" + std::string(spec) + "'");
  }
  // Not open: the number would name whatever the process opens next (a listener, a stream's socket).
  if (::fcntl(fd, F_GETFD) < 0) {
    throw bad("file descriptor " + std::to_string(fd) + " in '" + std::string(spec) + "' is not open");
  }
  return fd;
}

}  // namespace

uint64_t parse_size(std::string_view text) {
  const std::string orig(text);
  auto fail = [&] {
    return bad("bad size '" + orig + "': expected a number with an optional K, M, G or T suffix (powers of 1024)");
  };
  if (text.empty()) throw fail();
  uint64_t mult = 1;
  if (text.ends_with("iB")) text.remove_suffix(2);
  else if (text.ends_with("B") && text.size() > 1 && std::isalpha(static_cast<unsigned char>(text[text.size() - 2])))
    text.remove_suffix(1);
  if (!text.empty()) {
    switch (text.back()) {
      case 'k': case 'K': mult = 1ull << 10; break;
      case 'm': case 'M': mult = 1ull << 20; break;
      case 'g': case 'G': mult = 1ull << 30; break;
      case 't': case 'T': mult = 1ull << 40; break;
      default: break;
    }
    if (mult != 1) text.remove_suffix(1);
  }
  if (text.empty()) throw fail();
  uint64_t whole = 0;
  const char* p = text.data();
  const char* e = text.data() + text.size();
  auto [q, ec] = std::from_chars(p, e, whole);
  if (ec != std::errc()) throw fail();
  double frac = 0;
  if (q != e) {
    if (*q != '.' || mult == 1) throw fail();
    double scale = 0.1;
    for (++q; q != e; ++q, scale /= 10) {
      if (*q < '0' || *q > '9') throw fail();
      frac += (*q - '0') * scale;
    }
  }
  // The fraction may round up to a whole `mult`: the sum must not wrap around either.
  const uint64_t part = uint64_t(std::llround(frac * double(mult)));
  if (whole > UINT64_MAX / mult || whole * mult > UINT64_MAX - part) {
    throw bad("size '" + orig + "' is too large");
  }
  return whole * mult + part;
}

uint64_t parse_rate(std::string_view text) {
  if (text.ends_with("bit")) {
    std::string_view n = text.substr(0, text.size() - 3);
    uint64_t mult = 1;
    if (!n.empty()) {
      switch (n.back()) {
        case 'k': case 'K': mult = 1000; break;
        case 'm': case 'M': mult = 1000 * 1000; break;
        case 'g': case 'G': mult = 1000 * 1000 * 1000; break;
        default: break;
      }
      if (mult != 1) n.remove_suffix(1);
    }
    uint64_t v = 0;
    const auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), v);
    if (n.empty() || ec != std::errc() || end != n.data() + n.size() || v == 0) {
      throw bad("bad rate '" + std::string(text) + "': expected e.g. 500M (bytes/s) or 1gbit");
    }
    if (v > UINT64_MAX / mult) throw bad("bad rate '" + std::string(text) + "': too large");
    if (v * mult < 8) throw bad("bad rate '" + std::string(text) + "': below one byte per second");
    return v * mult / 8;
  }
  const uint64_t v = parse_size(text);
  if (v == 0) throw bad("bad rate '" + std::string(text) + "': must be above zero");
  return v;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

void for_each_param(std::string_view params, std::string_view what,
                    const std::function<void(std::string_view key, std::string_view value)>& fn) {
  while (!params.empty()) {
    const size_t comma = params.find(',');
    const std::string_view item = params.substr(0, comma);
    params = comma == std::string_view::npos ? std::string_view() : params.substr(comma + 1);
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      throw bad(std::string(what) + ": expected key=value, got '" + std::string(item) + "'");
    }
    fn(item.substr(0, eq), item.substr(eq + 1));
  }
}

uint64_t parse_emu_number(std::string_view key, std::string_view value) {
  uint64_t n = 0;
  const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
  if (ec != std::errc() || end != value.data() + value.size()) {
    throw bad("emu: " + std::string(key) + "=" + std::string(value) + ": expected a whole number");
  }
  return n;
}

bool parse_emu_key(std::string_view key, std::string_view value, EmuSpec* spec) {
  if (key == "size") {
    spec->size = parse_size(value);
  } else if (key == "profile") {
    if (!io::profile_from_name(value, &spec->profile)) {
      throw bad("emu: unknown profile '" + std::string(value) + "' (one of " + std::string(io::profile_names()) +
                ")");
    }
  } else if (key == "seed") {
    spec->seed = parse_emu_number(key, value);
  } else {
    return false;
  }
  return true;
}

EmuSpec parse_emu(std::string_view params) {
  EmuSpec spec;
  for_each_param(params, "emu", [&](std::string_view key, std::string_view value) {
    if (!parse_emu_key(key, value, &spec)) {
      throw bad("emu: unknown key '" + std::string(key) + "' (size, profile, seed)");
    }
  });
  return spec;
}

std::unique_ptr<io::Source> open_source(std::string_view spec) {
  const size_t colon = spec.find(':');
  if (colon == std::string_view::npos) {
    throw bad("source '" + std::string(spec) + "' has no kind: expected one of " + kSourceKinds);
  }
  const std::string_view kind = spec.substr(0, colon);
  const std::string_view rest = spec.substr(colon + 1);
  if (kind == "file") {
    if (rest.empty()) throw bad("file: needs a path (file:PATH)");
    return io::open_file_source(std::string(rest));
  }
  if (kind == "emu") {
    const EmuSpec e = parse_emu(rest);
    return io::open_emu_source(io::ContentGenerator(e.profile, e.seed), e.size);
  }
  if (kind == "stdin") return io::open_fd_source(STDIN_FILENO, false, "stdin:");
  if (kind == "fd") return io::open_fd_source(parse_fd(rest, spec), true, std::string(spec));
  // A device source saves the device's state and, without dstx migrate's commit, leaves it RUNNING.
  if (is_device_spec(spec)) return open_migration_source(spec, MigrateOptions{});
  throw bad("unknown source kind '" + std::string(kind) + "': expected one of " + kSourceKinds);
}

std::unique_ptr<io::Sink> open_sink(std::string_view spec, io::vfio::ProtocolChoice vfio) {
  const size_t colon = spec.find(':');
  if (colon == std::string_view::npos) {
    throw bad("sink '" + std::string(spec) + "' has no kind: expected one of " + kSinkKinds);
  }
  const std::string_view kind = spec.substr(0, colon);
  const std::string_view rest = spec.substr(colon + 1);
  if (kind == "file") {
    if (rest.empty()) throw bad("file: needs a path (file:PATH)");
    return io::open_file_sink(std::string(rest));
  }
  if (kind == "emu") {
    const EmuSpec e = parse_emu(rest);
    return io::open_emu_sink(io::ContentGenerator(e.profile, e.seed), e.size);
  }
  if (kind == "null") return io::open_null_sink();
  if (kind == "stdout") return io::open_fd_sink(STDOUT_FILENO, false, "stdout:");
  if (kind == "fd") return io::open_fd_sink(parse_fd(rest, spec), true, std::string(spec));
  if (is_device_spec(spec)) return open_device_sink(spec, vfio);
  throw bad("unknown sink kind '" + std::string(kind) + "': expected one of " + kSinkKinds);
}

}  // namespace dstx::engine
