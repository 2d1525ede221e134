// The dstx command as a child process, for the tests that run it as a user does: spawn it with stdout and
// stderr captured, wait for a line on stderr (bounded), wait for its exit, signal it. The test target defines
// DSTX_BINARY (the built dstx). A Proc still running when it goes out of scope is killed.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

extern char** environ;

namespace dstx::test {

// A child process running dstx with stdout and stderr captured through pipes.
class Proc {
 public:
  // `stdout_path`: the child's stdout goes to that file instead of a pipe (for output larger than a pipe
  // holds).
  explicit Proc(std::vector<std::string> args, const std::string& stdout_path = "") {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    if (stdout_path.empty()) {
      posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    } else {
      posix_spawn_file_actions_addopen(&fa, 1, stdout_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    }
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    args.insert(args.begin(), DSTX_BINARY);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, DSTX_BINARY, &fa, nullptr, argv.data(), environ) != 0) {
      throw std::runtime_error("spawn dstx");
    }
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
  Proc(const Proc&) = delete;
  Proc& operator=(const Proc&) = delete;

  // Reads stderr until a line containing `needle` appears (or the time-out); returns that line.
  std::string wait_stderr_line(const std::string& needle,
                               std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const size_t pos = err_.find(needle);
      if (pos != std::string::npos) {
        const size_t end = err_.find('\n', pos);
        if (end != std::string::npos) {
          const size_t begin = err_.rfind('\n', pos) == std::string::npos ? 0 : err_.rfind('\n', pos) + 1;
          return err_.substr(begin, end - begin);
        }
      }
      if (!pump(50)) break;
    }
    return {};
  }
  // Reads both pipes to their end, then reaps the child: its exit code, or 128 + the signal that ended it.
  int wait() {
    while (pump(20)) {
    }
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  void signal(int sig) { kill(pid_, sig); }
  // Bytes the child wrote to its stdout pipe that nobody has read yet.
  int stdout_pending() const {
    int n = 0;
    return ::ioctl(out_fd_, FIONREAD, &n) == 0 ? n : -1;
  }
  const std::string& out() const { return out_; }
  const std::string& err() const { return err_; }

 private:
  // Moves what is available from the pipes into the buffers; false once both are at EOF.
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

// Runs dstx to its end; returns its exit code (as Proc::wait) and, if asked, what it printed.
inline int run(std::vector<std::string> args, std::string* out = nullptr, std::string* err = nullptr) {
  Proc p(std::move(args));
  const int rc = p.wait();
  if (out) *out = p.out();
  if (err) *err = p.err();
  return rc;
}

// The port a `dstx recv --listen HOST:0` printed on stderr ("listening on HOST:PORT"), 0 when none came.
inline uint16_t start_recv(Proc& recv) {
  const std::string line = recv.wait_stderr_line("listening on");
  const size_t colon = line.rfind(':');
  if (colon == std::string::npos) return 0;
  return uint16_t(std::stoi(line.substr(colon + 1)));
}

}  // namespace dstx::test
