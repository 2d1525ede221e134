#include "cli/progress.h"

#include <unistd.h>

#include <chrono>
#include <cinttypes>

#include "engine/spec.h"

namespace dstx::cli {

using engine::format_bytes;

engine::LogFn stderr_log(const char* role) {
  const bool tty = ::isatty(STDERR_FILENO);
  return [role, tty](engine::LogLevel level, const std::string& text) {
    if (level == engine::LogLevel::debug) return;  // for embedders that ask for it (the C ABI's log level)
    std::fprintf(stderr, "%sdstx %s: %s\n", tty ? "\r\033[K" : "", role, text.c_str());
  };
}

ProgressLine::ProgressLine(const engine::Stats& stats, std::string label, bool enabled)
    : stats_(stats), label_(std::move(label)) {
  if (enabled && ::isatty(STDERR_FILENO)) thread_ = std::thread([this] { run(); });
}

ProgressLine::~ProgressLine() {
  stop();
}

void ProgressLine::stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ProgressLine::run() {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  uint64_t last_bytes = 0;
  auto last_t = start;
  double rate = 0;
  while (!stop_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const auto now = Clock::now();
    const uint64_t bytes = stats_.bytes.load();
    const uint64_t wire = stats_.wire_bytes.load();
    const uint64_t total = stats_.total_bytes.load();
    const double dt = std::chrono::duration<double>(now - last_t).count();
    const double inst = dt > 0 ? double(bytes - last_bytes) / dt : 0;
    rate = rate == 0 ? inst : 0.7 * rate + 0.3 * inst;  // smooth the display, not the measurement
    last_bytes = bytes;
    last_t = now;
    char eta[32] = "";
    if (total > 0 && rate > 0 && bytes <= total) {
      std::snprintf(eta, sizeof eta, "  ETA %.0fs", double(total - bytes) / rate);
    }
    std::string done = format_bytes(double(bytes));
    if (total > 0) done += " / " + format_bytes(double(total));
    std::fprintf(stderr, "\r\033[K%s %s  %s/s  ratio %.2f%s", label_.c_str(), done.c_str(),
                 format_bytes(rate).c_str(), bytes ? double(wire) / double(bytes) : 1.0, eta);
    std::fflush(stderr);
    drew_ = true;
  }
  if (drew_) std::fprintf(stderr, "\r\033[K");
}

void print_summary(std::FILE* out, const char* role, const engine::Result& r, const engine::Stats& st) {
  const double gbps = r.seconds > 0 ? double(r.bytes) / r.seconds / 1e9 : 0;
  if (r.committed) {
    std::fprintf(out,
                 "%s: committed %s in %.2f s (%.2f GB/s), %s on the wire (ratio %.3f)\n"
                 "  %" PRIu64 " chunks%s: %" PRIu64 " zero, %" PRIu64 " raw, %" PRIu64
                 " compressed; %u streams; %s\n"
                 "  transport: %s\n"
                 "  verified: every chunk XXH3-64, stream digest %016" PRIx64 " matched on both sides\n",
                 role, format_bytes(double(r.bytes)).c_str(), r.seconds, gbps,
                 format_bytes(double(r.wire_bytes)).c_str(),
                 r.bytes ? double(r.wire_bytes) / double(r.bytes) : 1.0, r.chunks,
                 r.chunk_bytes ? (" of " + format_bytes(double(r.chunk_bytes))).c_str() : "",
                 st.zero_chunks.load(), st.raw_chunks.load(), st.compressed_chunks.load(), r.streams,
                 r.io_backend.c_str(), r.tls == "none" ? "plain TCP (no TLS)" : r.tls.c_str(), r.digest);
  } else {
    std::fprintf(out, "%s: FAILED (%s): %s\n  after %s in %.2f s; nothing was committed\n", role,
                 engine::wire::reason_name(r.reason), r.error.c_str(), format_bytes(double(r.bytes)).c_str(),
                 r.seconds);
  }
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out;
}

void print_json(std::FILE* out, const char* role, const engine::Result& r, const engine::Stats& st,
                const std::string& extra) {
  std::fprintf(out,
               "{\"status\":\"%s\",\"role\":\"%s\",\"bytes\":%" PRIu64 ",\"wire_bytes\":%" PRIu64
               ",\"seconds\":%.6f,\"gbps\":%.4f,\"ratio\":%.4f,\"chunks\":%" PRIu64
               ",\"zero_chunks\":%" PRIu64 ",\"raw_chunks\":%" PRIu64 ",\"compressed_chunks\":%" PRIu64
               ",\"streams\":%u,\"io\":\"%s\",\"tls\":\"%s\",\"digest\":\"%016" PRIx64 "\"",
               r.committed ? "committed" : "failed", role, r.bytes, r.wire_bytes, r.seconds,
               r.seconds > 0 ? double(r.bytes) / r.seconds / 1e9 : 0.0,
               r.bytes ? double(r.wire_bytes) / double(r.bytes) : 1.0, r.chunks, st.zero_chunks.load(),
               st.raw_chunks.load(), st.compressed_chunks.load(), r.streams,
               json_escape(r.io_backend).c_str(), json_escape(r.tls).c_str(), r.digest);
  std::fprintf(out,
               ",\"codecs\":{\"none\":%" PRIu64 ",\"lz4\":%" PRIu64 ",\"zstd\":%" PRIu64 ",\"sparse\":%" PRIu64
               "},\"paged_chunks\":%" PRIu64 ",\"resumes\":%" PRIu64,
               st.codec_chunks[0].load(), st.codec_chunks[1].load(), st.codec_chunks[2].load(),
               st.codec_chunks[3].load(), st.paged_chunks.load(), st.resumes.load());
  if (r.chunk_bytes) std::fprintf(out, ",\"chunk_bytes\":%" PRIu32, r.chunk_bytes);
  if (!r.committed) {
    std::fprintf(out, ",\"reason\":\"%s\",\"error\":\"%s\"", engine::wire::reason_name(r.reason),
                 json_escape(r.error).c_str());
  }
  std::fprintf(out, "%s}\n", extra.c_str());
}

}  // namespace dstx::cli
