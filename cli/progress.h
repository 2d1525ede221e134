// The live progress line (a terminal only) and the end-of-transfer summary, human or JSON.
#pragma once

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>

#include "engine/transfer.h"

namespace dstx::cli {

class ProgressLine {
 public:
  // Draws on stderr every 200 ms while alive, when `enabled` and stderr is a terminal.
  ProgressLine(const engine::Stats& stats, std::string label, bool enabled);
  ~ProgressLine();
  void stop();

 private:
  void run();
  const engine::Stats& stats_;
  std::string label_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  bool drew_ = false;
};

// Prints a running transfer's log lines (a stream lost, resumed) on stderr as "dstx ROLE: TEXT", over the
// progress line when one is drawn (it is redrawn at its next tick).
engine::LogFn stderr_log(const char* role);

void print_summary(std::FILE* out, const char* role, const engine::Result& result,
                   const engine::Stats& stats);
void print_json(std::FILE* out, const char* role, const engine::Result& result, const engine::Stats& stats,
                const std::string& extra_fields = "");
std::string json_escape(const std::string& text);

}  // namespace dstx::cli
