// dstx tune: measures this machine and a link (codec speeds and break-even link rates, the best chunk size
// and stream count, the SEND_ZC break-even frame size) and saves a profile whose chunk size, stream count and
// zero-copy minimum become the defaults of send, demo and migrate (cli/send_options.cpp reads it).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/progress.h"
#include "cli/send_options.h"
#include "compress/codec.h"
#include "engine/effort.h"
#include "engine/spec.h"
#include "engine/transfer.h"
#include "io/content.h"
#include "io/endpoints.h"
#include "io/ring.h"
#include "io/socket.h"

namespace dstx::cli {
namespace {

const char* kTuneHelp =
    "usage: dstx tune [--to HOST:PORT] [--out PATH] [--size SIZE] [--quick] [--json] [--plan]\n"
    "\n"
    "Measures this machine and link and saves a profile that send, demo and migrate use as their defaults\n"
    "(explicit options still win; --no-tune ignores the profile):\n"
    "  codecs      lz4 and zstd-1 encode/decode speed and ratio per profile (binary, text, mixed), one "
    "thread,\n"
    "              and the link rate below which compressing pays (encode speed x cores)\n"
    "  transfers   chunk size (256K, 1M, 4M) x streams (1, cores, 2 x cores), --codec auto, mixed data:\n"
    "              the fastest becomes chunk_bytes and streams\n"
    "  zero copy   random data, --codec none, frames of 64K/256K/1M/4M with and without SEND_ZC, median of "
    "3;\n"
    "              zero_copy_min_bytes = the smallest frame size where SEND_ZC is >= 5% faster, else 0\n"
    "  opening     raw_mb_s = the fastest plain-send rate above, lz4_mb_s = lz4's fastest encode speed:\n"
    "              --codec auto starts raw, not lz4, where raw_mb_s > lz4_mb_s x streams\n"
    "\n"
    "  --to HOST:PORT  measure this link; the other side runs\n"
    "                  dstx recv --listen HOST:PORT --sink null: --count N   (N: see --plan)\n"
    "                  without --to: an in-process receiver on 127.0.0.1 (link \"loopback\")\n"
    "  --out PATH      where to save the profile (default: $DSTX_TUNE_PROFILE, else\n"
    "                  ${XDG_CONFIG_HOME:-~/.config}/dstx/tune.json)\n"
    "  --size SIZE     bytes per chunk-size/stream run (default 256M; --quick 32M)\n"
    "  --quick         fewer points and less data (chunk 256K, 1M x streams 1, cores; frames 256K, 1M)\n"
    "  --plan          print how many transfers the run makes (the receiver's --count) and exit\n"
    "  --json          print the profile instead of the table\n";

struct TuneError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string short_size(uint64_t bytes) {
  if (bytes >= (1u << 20) && bytes % (1u << 20) == 0) return std::to_string(bytes >> 20) + "M";
  if (bytes >= 1024 && bytes % 1024 == 0) return std::to_string(bytes >> 10) + "K";
  return std::to_string(bytes);
}

std::string fmt(const char* format, auto... values) {
  char buf[512];
  std::snprintf(buf, sizeof buf, format, values...);
  return buf;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// A random-access source of `size` bytes that repeats one pre-generated pattern: the runs measure the engine
// and the link, not the content generator.
class PatternSource : public io::Source {
 public:
  PatternSource(const io::ContentGenerator& gen, uint64_t size, size_t pattern_bytes)
      : size_(size), pattern_(std::min<uint64_t>(size, pattern_bytes)) {
    gen.fill(0, pattern_);
  }
  std::string describe() const override { return "tune pattern"; }
  std::optional<uint64_t> size() const override { return size_; }
  bool random_access() const override { return true; }
  void read_at(io::Ring&, uint64_t offset, std::span<std::byte> out) override {
    size_t done = 0;
    while (done < out.size()) {
      const size_t at = size_t((offset + done) % pattern_.size());
      const size_t n = std::min(out.size() - done, pattern_.size() - at);
      std::memcpy(out.data() + done, pattern_.data() + at, n);
      done += n;
    }
  }

 private:
  uint64_t size_;
  std::vector<std::byte> pattern_;
};

// ---- codecs ----

struct CodecPoint {
  std::string codec;  // "lz4", "zstd-1"
  std::string profile;
  double encode_mb_s = 0, decode_mb_s = 0, ratio = 1;
};

CodecPoint measure_codec(compress::Codec codec, int level, io::Profile profile, size_t data_bytes,
                         double min_seconds) {
  constexpr size_t kChunk = 1u << 20;
  std::vector<std::byte> raw(data_bytes);
  io::ContentGenerator(profile, 7).fill(0, raw);
  const size_t chunks = data_bytes / kChunk;
  const size_t bound = compress::encode_bound(codec, kChunk);
  std::vector<std::byte> enc(bound * chunks);
  std::vector<compress::EncodeResult> results(chunks);
  compress::EncodeOptions eo;
  eo.codec = codec;
  eo.level = level;
  eo.probe_incompressible = false;  // the codec itself, on every chunk
  eo.hash = compress::HashForm::pages;  // as transfers between current builds hash
  // Encode passes until min_seconds of work (at least one pass).
  uint64_t encoded_bytes = 0, passes = 0;
  const double t0 = now_seconds();
  double t = t0;
  do {
    encoded_bytes = 0;
    for (size_t i = 0; i < chunks; ++i) {
      results[i] = compress::encode_chunk(eo, std::span(raw).subspan(i * kChunk, kChunk),
                                          std::span(enc).subspan(i * bound, bound));
      encoded_bytes += results[i].encoded_len;
    }
    ++passes;
    t = now_seconds();
  } while (t - t0 < min_seconds);
  CodecPoint p;
  p.encode_mb_s = double(data_bytes) * double(passes) / (t - t0) / 1e6;
  p.ratio = double(encoded_bytes) / double(data_bytes);
  std::vector<std::byte> out(kChunk);
  passes = 0;
  const double d0 = now_seconds();
  double d = d0;
  do {
    for (size_t i = 0; i < chunks; ++i) {
      const auto& r = results[i];
      const std::span<const std::byte> payload =
          r.codec == compress::Codec::none
              ? std::span<const std::byte>(raw).subspan(i * kChunk, kChunk)
              : std::span<const std::byte>(enc).subspan(i * bound, r.encoded_len);
      if (compress::decode_chunk(r.codec, r.zero, r.zero ? std::span<const std::byte>() : payload, out,
                                 r.hash, 0, eo.hash) != compress::DecodeError::ok) {
        throw TuneError("codec measurement: a chunk did not decode");
      }
    }
    ++passes;
    d = now_seconds();
  } while (d - d0 < min_seconds);
  p.decode_mb_s = double(data_bytes) * double(passes) / (d - d0) / 1e6;
  return p;
}

// ---- transfers ----

struct Run {
  std::string kind;  // "sweep" or "zero_copy"
  uint32_t chunk_bytes = 0;
  unsigned streams = 0;
  std::string codec;
  uint64_t zero_copy_min = 0;
  uint64_t bytes = 0, wire_bytes = 0;
  double seconds = 0, mb_s = 0;
  std::string io;
};

class Runner {
 public:
  explicit Runner(std::optional<io::HostPort> to) : to_(std::move(to)) {}

  Run run(io::Source& source, const engine::SendOptions& so, const std::string& kind) {
    if (signal_cancel().requested()) throw TuneError("cancelled");
    engine::Stats send_stats;
    engine::Result sr;
    if (to_) {
      // The receiver's previous transfer keeps accepting (resumed streams) on its listener for a moment after
      // COMMITTED and refuses as "busy" a next transfer that connects then: give it time to close.
      if (runs_++ > 0) std::this_thread::sleep_for(kRemoteGap);
      sr = engine::send_to(source, *to_, so, &send_stats, &signal_cancel());
    } else {
      auto sink = io::open_null_sink();
      io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
      const uint16_t port = io::bound_port(listener.get());
      engine::Stats recv_stats;
      engine::Result rr;
      engine::Cancel recv_cancel;
      std::thread receiver(
          [&] { rr = engine::receive(*sink, listener.get(), {}, &recv_stats, &recv_cancel); });
      sr = engine::send_to(source, io::HostPort{"127.0.0.1", port}, so, &send_stats, &signal_cancel());
      if (!sr.committed) recv_cancel.request();
      receiver.join();
    }
    if (!sr.committed) {
      throw TuneError(kind + " run (chunk " + short_size(so.chunk_bytes) + ", " + std::to_string(so.streams) +
                      " streams) failed: " + sr.error);
    }
    Run r;
    r.kind = kind;
    r.chunk_bytes = so.chunk_bytes;
    r.streams = sr.streams;
    r.codec = engine::codec_mode_name(so.codec);
    r.zero_copy_min = so.zero_copy_min_bytes;
    r.bytes = sr.bytes;
    r.wire_bytes = sr.wire_bytes;
    r.seconds = sr.seconds;
    r.mb_s = sr.seconds > 0 ? double(sr.bytes) / sr.seconds / 1e6 : 0;
    r.io = sr.io_backend;
    return r;
  }

 private:
  static constexpr std::chrono::milliseconds kRemoteGap{300};
  std::optional<io::HostPort> to_;
  unsigned runs_ = 0;
};

struct Plan {
  std::vector<uint32_t> chunks;
  std::vector<unsigned> streams;
  std::vector<uint32_t> zc_frames;
  unsigned zc_repeats = 3;
  uint64_t sweep_bytes = 0, zc_bytes = 0;
  size_t codec_bytes = 0;
  double codec_seconds = 0;
  unsigned transfers() const {
    return unsigned(chunks.size() * streams.size() + zc_frames.size() * 2 * zc_repeats);
  }
};

Plan make_plan(bool quick, uint64_t size) {
  Plan p;
  const unsigned n = engine::default_streams();
  if (quick) {
    p.chunks = {256u << 10, 1u << 20};
    p.streams = {1, n};
    p.zc_frames = {256u << 10, 1u << 20};
    p.codec_bytes = 4u << 20;
    p.codec_seconds = 0.05;
  } else {
    p.chunks = {256u << 10, 1u << 20, 4u << 20};
    p.streams = {1, n, std::min(2 * n, unsigned(engine::wire::kMaxStreams))};
    p.zc_frames = {64u << 10, 256u << 10, 1u << 20, 4u << 20};
    p.codec_bytes = 8u << 20;
    p.codec_seconds = 0.25;
  }
  std::sort(p.streams.begin(), p.streams.end());
  p.streams.erase(std::unique(p.streams.begin(), p.streams.end()), p.streams.end());
  p.sweep_bytes = size;
  p.zc_bytes = std::max<uint64_t>(quick ? size : size / 4, 8u << 20);
  return p;
}

std::string profile_json(unsigned cores, const std::string& io_backend, const std::string& link,
                         const Run& best, uint64_t raw_mb_s, uint64_t lz4_mb_s, uint64_t zero_copy_min,
                         const std::string& zero_copy_note, const std::vector<CodecPoint>& codecs,
                         const std::vector<Run>& runs,
                         const std::vector<std::pair<uint32_t, std::pair<double, double>>>& zc) {
  std::string j = "{\n";
  j += fmt("  \"version\": 1,\n  \"machine\": {\"cores\": %u, \"io\": \"%s\"},\n", cores,
           json_escape(io_backend).c_str());
  j += "  \"link\": \"" + json_escape(link) + "\",\n";
  j += fmt("  \"chunk_bytes\": %u,\n  \"streams\": %u,\n  \"zero_copy_min_bytes\": %llu,\n", best.chunk_bytes,
           best.streams, (unsigned long long)zero_copy_min);
  j += fmt("  \"raw_mb_s\": %llu,\n  \"lz4_mb_s\": %llu,\n", (unsigned long long)raw_mb_s,
           (unsigned long long)lz4_mb_s);
  j += "  \"zero_copy_note\": \"" + json_escape(zero_copy_note) + "\",\n";
  j += "  \"codecs\": {";
  std::string current;
  for (size_t i = 0; i < codecs.size(); ++i) {
    const auto& c = codecs[i];
    if (c.codec != current) {
      if (!current.empty()) j += "},";
      j += "\n    \"" + c.codec + "\": {";
      current = c.codec;
    } else {
      j += ",";
    }
    j +=
        fmt("\n      \"%s\": {\"encode_mb_s\": %.1f, \"decode_mb_s\": %.1f, \"ratio\": %.4f, "
            "\"pays_below_link_mb_s\": %.1f}",
            c.profile.c_str(), c.encode_mb_s, c.decode_mb_s, c.ratio, c.encode_mb_s * cores);
  }
  if (!current.empty()) j += "}";
  j += "\n  },\n  \"zero_copy\": [";
  for (size_t i = 0; i < zc.size(); ++i) {
    j += fmt("%s\n    {\"frame_bytes\": %u, \"copy_mb_s\": %.1f, \"zero_copy_mb_s\": %.1f}", i ? "," : "",
             zc[i].first, zc[i].second.first, zc[i].second.second);
  }
  j += "\n  ],\n  \"runs\": [";
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    j +=
        fmt("%s\n    {\"kind\": \"%s\", \"chunk_bytes\": %u, \"streams\": %u, \"codec\": \"%s\", "
            "\"zero_copy_min_bytes\": %llu, \"bytes\": %llu, \"wire_bytes\": %llu, \"seconds\": %.6f, "
            "\"mb_s\": %.1f}",
            i ? "," : "", r.kind.c_str(), r.chunk_bytes, r.streams, r.codec.c_str(),
            (unsigned long long)r.zero_copy_min, (unsigned long long)r.bytes,
            (unsigned long long)r.wire_bytes, r.seconds, r.mb_s);
  }
  j += "\n  ]\n}\n";
  return j;
}

void save(const std::string& path, const std::string& text) {
  namespace fs = std::filesystem;
  const fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) fs::create_directories(p.parent_path(), ec);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw TuneError("cannot write " + tmp + ": " + std::strerror(errno));
  }
  fs::rename(tmp, p, ec);
  if (ec) throw TuneError("cannot rename " + tmp + " to " + path + ": " + ec.message());
}

}  // namespace

int cmd_tune(const std::vector<std::string>& argv) {
  for (const auto& a : argv) {
    if (a == "--help" || a == "-h") {
      std::fputs(kTuneHelp, stdout);
      return 0;
    }
  }
  const Args args(argv, {"to", "out", "size"}, {"quick", "json", "plan"});
  const bool quick = args.has("quick");
  const bool json = args.has("json");
  const uint64_t size = args.get_size("size", quick ? 32ull << 20 : 256ull << 20);
  if (size < (1u << 20)) throw UsageError("--size: at least 1M");
  std::optional<io::HostPort> to;
  if (auto t = args.get("to")) {
    try {
      to = io::parse_host_port(*t);
    } catch (const std::invalid_argument& e) {
      throw UsageError(std::string("--to: ") + e.what());
    }
  }
  const std::string link = to ? io::to_string(*to) : "loopback";
  const Plan plan = make_plan(quick, size);
  if (args.has("plan")) {
    std::printf("%u transfers\n", plan.transfers());
    return 0;
  }
  std::string out_path = args.get("out").value_or(engine::tune_profile_path());
  if (out_path.empty()) throw UsageError("no --out, and neither DSTX_TUNE_PROFILE nor HOME is set");

  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  if (to) {
    std::fprintf(
        stderr,
        "dstx tune: %u transfers to %s; the receiver runs: dstx recv --listen %s --sink null: --count %u\n",
        plan.transfers(), link.c_str(), link.c_str(), plan.transfers());
  }
  try {
    // Codecs, one thread.
    std::vector<CodecPoint> codecs;
    const std::pair<const char*, io::Profile> profiles[] = {
        {"binary", io::Profile::binary}, {"text", io::Profile::text}, {"mixed", io::Profile::mixed}};
    for (const auto& [name, codec, level] :
         {std::tuple{"lz4", compress::Codec::lz4, 1}, std::tuple{"zstd-1", compress::Codec::zstd, 1}}) {
      for (const auto& [pname, profile] : profiles) {
        if (signal_cancel().requested()) throw TuneError("cancelled");
        CodecPoint p = measure_codec(codec, level, profile, plan.codec_bytes, plan.codec_seconds);
        p.codec = name;
        p.profile = pname;
        std::fprintf(stderr, "dstx tune: %-6s %-6s encode %7.1f MB/s  decode %7.1f MB/s  ratio %.3f\n", name,
                     pname, p.encode_mb_s, p.decode_mb_s, p.ratio);
        codecs.push_back(p);
      }
    }

    Runner runner(to);
    std::vector<Run> runs;
    // Chunk size x streams, auto codec, mixed data.
    PatternSource mixed(io::ContentGenerator(io::Profile::mixed, 1), plan.sweep_bytes, 32u << 20);
    Run best;
    for (const uint32_t chunk : plan.chunks) {
      for (const unsigned streams : plan.streams) {
        engine::SendOptions so;
        so.chunk_bytes = chunk;
        so.streams = streams;
        so.codec = engine::CodecMode::auto_select;
        const Run r = runner.run(mixed, so, "sweep");
        std::fprintf(stderr, "dstx tune: chunk %-4s x %2u streams: %8.1f MB/s\n", short_size(chunk).c_str(),
                     streams, r.mb_s);
        runs.push_back(r);
        if (r.mb_s > best.mb_s) best = r;
      }
    }
    // SEND_ZC against plain sends, side by side, median of zc_repeats.
    PatternSource random(io::ContentGenerator(io::Profile::random, 2), plan.zc_bytes, 16u << 20);
    std::vector<std::vector<double>> copy(plan.zc_frames.size()), zerocopy(plan.zc_frames.size());
    for (unsigned rep = 0; rep < plan.zc_repeats; ++rep) {
      for (size_t i = 0; i < plan.zc_frames.size(); ++i) {
        for (const bool zc : {false, true}) {
          engine::SendOptions so;
          so.chunk_bytes = plan.zc_frames[i];
          so.streams = best.streams;
          so.codec = engine::CodecMode::none;
          so.zero_copy_min_bytes = zc ? plan.zc_frames[i] : 0;
          const Run r = runner.run(random, so, "zero_copy");
          runs.push_back(r);
          (zc ? zerocopy : copy)[i].push_back(r.mb_s);
        }
      }
    }
    std::vector<std::pair<uint32_t, std::pair<double, double>>> zc_table;
    uint64_t zero_copy_min = 0;
    for (size_t i = 0; i < plan.zc_frames.size(); ++i) {
      const double c = median(copy[i]), z = median(zerocopy[i]);
      zc_table.push_back({plan.zc_frames[i], {c, z}});
      std::fprintf(stderr, "dstx tune: frame %-4s copy %8.1f MB/s  SEND_ZC %8.1f MB/s  (%+.1f%%)\n",
                   short_size(plan.zc_frames[i]).c_str(), c, z, c > 0 ? (z / c - 1) * 100 : 0.0);
      if (zero_copy_min == 0 && c > 0 && z >= c * 1.05) zero_copy_min = plan.zc_frames[i];
    }
    const bool zc_possible = io::probe().send_zc && best.io.rfind("io_uring", 0) == 0;
    std::string zc_note;
    if (!zc_possible) {
      zc_note = "SEND_ZC is not available here (io: " + best.io + "): sends always copy";
      zero_copy_min = 0;
    } else if (zero_copy_min == 0) {
      zc_note = "SEND_ZC is never 5% faster: the kernel copies anyway on this path";
    } else {
      zc_note = "SEND_ZC is at least 5% faster from " + short_size(zero_copy_min) + " frames";
    }

    // What --codec auto opens on: the link's raw rate (the fastest plain-send frame size) against lz4's
    // fastest single-core encode speed (engine::EffortPrior).
    double raw = 0, lz4 = 0;
    for (const auto& [frame, speeds] : zc_table) raw = std::max(raw, speeds.first);
    for (const auto& c : codecs) {
      if (c.codec == "lz4") lz4 = std::max(lz4, c.encode_mb_s);
    }
    const auto raw_mb_s = uint64_t(raw), lz4_mb_s = uint64_t(lz4);
    const std::string profile = profile_json(cores, best.io, link, best, raw_mb_s, lz4_mb_s, zero_copy_min,
                                             zc_note, codecs, runs, zc_table);
    save(out_path, profile);

    if (json) {
      std::fputs(profile.c_str(), stdout);
      return 0;
    }
    std::printf("dstx tune: %u cores, io %s, link %s\n\n", cores, best.io.c_str(), link.c_str());
    std::printf("codecs (one thread, 1M chunks)   encode MB/s  decode MB/s   ratio  pays below link MB/s\n");
    for (const auto& c : codecs) {
      std::printf("  %-6s %-24s %11.1f  %11.1f  %6.3f  %20.1f\n", c.codec.c_str(), c.profile.c_str(),
                  c.encode_mb_s, c.decode_mb_s, c.ratio, c.encode_mb_s * cores);
    }
    std::printf("\ntransfers (mixed, codec auto, %s each)\n",
                engine::format_bytes(double(plan.sweep_bytes)).c_str());
    std::printf("  chunk   ");
    for (const unsigned s : plan.streams) std::printf("  %2u streams", s);
    std::printf("   (MB/s)\n");
    for (const uint32_t chunk : plan.chunks) {
      std::printf("  %-7s ", short_size(chunk).c_str());
      for (const unsigned s : plan.streams) {
        for (const Run& r : runs) {
          if (r.kind == "sweep" && r.chunk_bytes == chunk && r.streams == s) std::printf("  %10.1f", r.mb_s);
        }
      }
      std::printf("\n");
    }
    std::printf("\nzero copy (random, codec none, %u streams, %s each, median of %u)\n", best.streams,
                engine::format_bytes(double(plan.zc_bytes)).c_str(), plan.zc_repeats);
    std::printf("  frame     copy MB/s  SEND_ZC MB/s\n");
    for (const auto& [frame, speeds] : zc_table) {
      std::printf("  %-7s %11.1f  %12.1f  %+6.1f%%\n", short_size(frame).c_str(), speeds.first, speeds.second,
                  speeds.first > 0 ? (speeds.second / speeds.first - 1) * 100 : 0.0);
    }
    std::printf("\nprofile: chunk %s, %u streams, zero-copy min %s (%s)\n",
                short_size(best.chunk_bytes).c_str(), best.streams,
                zero_copy_min ? short_size(zero_copy_min).c_str() : "0 (never)", zc_note.c_str());
    const bool opens_raw =
        engine::EffortPrior{.raw_rate = double(raw_mb_s) * 1e6, .lz4_rate = double(lz4_mb_s) * 1e6}.opens_raw(
            best.streams);
    std::printf("--codec auto opens on %s: raw %llu MB/s %s lz4 %llu MB/s x %u streams\nsaved to %s\n",
                opens_raw ? "raw" : "lz4", (unsigned long long)raw_mb_s,
                opens_raw ? ">" : "<=", (unsigned long long)lz4_mb_s, best.streams, out_path.c_str());
    return 0;
  } catch (const TuneError& e) {
    std::fprintf(stderr, "dstx tune: %s\n", e.what());
    return 1;
  }
}

}  // namespace dstx::cli
