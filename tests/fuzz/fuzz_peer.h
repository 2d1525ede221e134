// For the fuzz targets that drive the real receiver: the sending end of a socket pair that writes a scripted
// byte stream, half-closes, and records everything the receiver answers; and the frames of such an answer.
#pragma once

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "engine/wire.h"
#include "fuzz_support.h"
#include "io/socket.h"

namespace dstx::fuzz {

// Makes a connected AF_UNIX stream pair: {the receiver's end, the peer's end}.
inline std::pair<io::Fd, io::Fd> socket_pair() {
  int sv[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair: errno %d", errno);
  return {io::Fd(sv[0]), io::Fd(sv[1])};
}

// Writes `script` and reads the answer on threads of its own, so neither side can block the other however
// large the script or the answer. The first kSyncBytes are written before the constructor returns (the socket
// buffer takes them at once): a receiver started afterwards finds its HELLO there, however late the threads
// get a CPU. The answer ends when the receiver closes its end.
class ScriptedPeer {
 public:
  static constexpr size_t kAnswerCap = 1 << 20;  // keep at most this much of the answer
  static constexpr size_t kSyncBytes = 64 << 10;

  ScriptedPeer(io::Fd fd, std::vector<std::byte> script) : fd_(std::move(fd)), script_(std::move(script)) {
    const size_t first = write_some(0, std::min(script_.size(), kSyncBytes));
    if (first == script_.size()) {
      ::shutdown(fd_.get(), SHUT_WR);
    } else {
      writer_ = std::thread([this, first] {
        write_some(first, script_.size());
        ::shutdown(fd_.get(), SHUT_WR);
      });
    }
    reader_ = std::thread([this] {
      std::byte buf[16384];
      for (;;) {
        const ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        const size_t keep = std::min(size_t(n), kAnswerCap - std::min(kAnswerCap, answer_.size()));
        capped_ = capped_ || keep < size_t(n);
        answer_.insert(answer_.end(), buf, buf + keep);
      }
    });
  }
  ScriptedPeer(const ScriptedPeer&) = delete;
  ScriptedPeer& operator=(const ScriptedPeer&) = delete;
  ~ScriptedPeer() { join(); }

  // Waits for both directions to finish (the receiver has closed its end) and returns the answer.
  const std::vector<std::byte>& join() {
    if (writer_.joinable()) writer_.join();
    if (reader_.joinable()) reader_.join();
    return answer_;
  }
  bool capped() const { return capped_; }  // after join(): the answer was longer than kAnswerCap

 private:
  // Sends script_[from, to); returns where it stopped (short when the receiver gave up and closed).
  size_t write_some(size_t from, size_t to) {
    while (from < to) {
      const ssize_t n = ::send(fd_.get(), script_.data() + from, to - from, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      from += size_t(n);
    }
    return from;
  }

  io::Fd fd_;
  std::vector<std::byte> script_;
  std::vector<std::byte> answer_;
  bool capped_ = false;
  std::thread writer_;
  std::thread reader_;
};

// One frame of a receiver's answer.
struct AnswerFrame {
  engine::wire::Header header;
  std::span<const std::byte> payload;
};

// Splits an answer into frames, checking each header as the sender would: a malformed frame from our own
// receiver is a finding. `capped`: the answer was cut short, so a partial last frame is expected.
inline std::vector<AnswerFrame> parse_answer(const std::vector<std::byte>& answer, bool capped) {
  std::vector<AnswerFrame> frames;
  size_t pos = 0;
  while (pos < answer.size()) {
    if (capped && answer.size() - pos < engine::wire::kHeaderBytes + engine::wire::kMaxTextBytes) break;
    FUZZ_CHECK(answer.size() - pos >= engine::wire::kHeaderBytes,
               "the receiver sent a partial header (%zu bytes)", answer.size() - pos);
    AnswerFrame f;
    const auto err = engine::wire::decode_header(std::span<const std::byte, engine::wire::kHeaderBytes>(
                                                     answer.data() + pos, engine::wire::kHeaderBytes),
                                                 engine::wire::kMaxChunkBytes, &f.header);
    FUZZ_CHECK(err == engine::wire::Error::ok, "the receiver sent a malformed header: %s",
               engine::wire::error_text(err));
    pos += engine::wire::kHeaderBytes;
    FUZZ_CHECK(answer.size() - pos >= f.header.payload_len, "the receiver sent a truncated payload");
    f.payload = std::span<const std::byte>(answer.data() + pos, f.header.payload_len);
    pos += f.header.payload_len;
    frames.push_back(f);
  }
  return frames;
}

}  // namespace dstx::fuzz
