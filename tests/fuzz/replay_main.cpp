// A main() for a fuzz target without libFuzzer: runs LLVMFuzzerTestOneInput once on every file named on the
// command line or found in a directory named there (not recursive), in name order. CTest uses it to replay
// the checked-in corpora with the ordinary (gcc) build.
//
// A failing check aborts; an input that runs longer than DSTX_REPLAY_TIMEOUT_S seconds (default 60) is a
// hang. Either way the input's path is printed first.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#if defined(DSTX_SANITIZED) && __has_include(<sanitizer/common_interface_defs.h>)
#include <sanitizer/common_interface_defs.h>
#define DSTX_REPLAY_DEATH_CALLBACK 1
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);

namespace {

// The input being run, for the signal handlers (written before each input, read only there).
char g_current[4096];

void write_str(const char* s) {
  ssize_t ignored = ::write(STDERR_FILENO, s, std::strlen(s));
  (void)ignored;
}

void on_fatal(int sig) {
  write_str(sig == SIGALRM ? "\nreplay: TIMEOUT on input " : "\nreplay: crash on input ");
  write_str(g_current);
  write_str("\n");
  ::signal(sig, SIG_DFL);
  if (sig == SIGALRM) ::_exit(70);
  ::raise(sig);
}

#ifdef DSTX_REPLAY_DEATH_CALLBACK
void on_sanitizer_death() {
  write_str("\nreplay: sanitizer report on input ");
  write_str(g_current);
  write_str("\n");
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
  namespace fs = std::filesystem;
  std::vector<fs::path> inputs;
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] == '-') continue;  // libFuzzer-style flags are accepted and ignored
    const fs::path p(argv[i]);
    if (fs::is_directory(p)) {
      for (const auto& e : fs::directory_iterator(p)) {
        if (e.is_regular_file()) inputs.push_back(e.path());
      }
    } else {
      inputs.push_back(p);
    }
  }
  std::sort(inputs.begin(), inputs.end());
  if (inputs.empty()) {
    std::fprintf(stderr, "replay: no inputs (usage: %s FILE|DIR...)\n", argv[0]);
    return 2;  // an empty corpus is a mistake, not a pass
  }
  const char* env = std::getenv("DSTX_REPLAY_TIMEOUT_S");
  const unsigned timeout_s = env ? unsigned(std::strtoul(env, nullptr, 10)) : 60;
  // SIGSEGV and friends are left to the sanitizers' own handlers (or the default) so their reports survive.
  for (int sig : {SIGABRT, SIGALRM}) ::signal(sig, on_fatal);
#ifdef DSTX_REPLAY_DEATH_CALLBACK
  __sanitizer_set_death_callback(on_sanitizer_death);
#endif

  for (const fs::path& p : inputs) {
    std::snprintf(g_current, sizeof g_current, "%s", p.c_str());
    std::ifstream f(p, std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "replay: cannot read %s\n", p.c_str());
      return 1;
    }
    // Exactly the file's size, so a read past the end is a heap overflow under ASan, as under libFuzzer.
    const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<uint8_t> input(bytes.begin(), bytes.end());
    input.shrink_to_fit();
    ::alarm(timeout_s);
    LLVMFuzzerTestOneInput(input.data(), input.size());
    ::alarm(0);
  }
  std::printf("replay: %zu inputs ran clean\n", inputs.size());
  return 0;
}
