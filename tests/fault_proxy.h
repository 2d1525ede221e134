// A TCP proxy between a sender and a receiver that injects one fault into the sender → receiver direction of
// one connection: flip a bit, cut the connection (both directions die at once, as when a link goes down; the
// path may stay down for a while or for good), truncate it (a clean close mid-stream), duplicate bytes, or
// delay everything. It can also clear capability bits in every connection's HELLO (a receiver without them,
// as both ends then agree). Used by the transfer, resume and fault-matrix tests. Loopback only.
#pragma once

#include <poll.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "engine/wire.h"
#include "io/socket.h"

namespace dstx::test {

struct Fault {
  enum Kind { none, flip, cut, truncate, duplicate, delay } kind = none;
  int connection = 0;   // which accepted connection, in accept order (reconnections count too)
  int64_t at = 0;       // byte position in that connection's sender → receiver bytes
  int64_t length = 64;  // duplicate: how many bytes are sent twice
  int delay_ms = 0;     // delay: added before every forwarded piece, on every connection
  int delay_pieces = -1;  // delay: only before the first this many pieces of each direction (-1: all)
  int down_ms = 0;      // cut: refuse connections for this long afterwards (-1: for good)
  int stall_ms = 0;     // cut: first read and drop what comes for this long, so that frames the sender has
                        // handed over in full are lost whatever the socket buffers hold
  uint64_t clear_caps = 0;  // capability bits cleared in the HELLO of every connection (any fault kind)
  int buffer_bytes = 0;     // the proxy's socket buffers on every connection (so that little waits in
                            // them); 0: the kernel's, which grow to tens of megabytes
};

class FaultProxy {
 public:
  FaultProxy(uint16_t target, Fault fault) : target_(target), fault_(fault) {
    listener_ = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
    port_ = io::bound_port(listener_.get());
    thread_ = std::thread([this] { run(); });
  }
  ~FaultProxy() {
    stop_ = true;
    thread_.join();
  }
  uint16_t port() const { return port_; }
  bool fired() const { return fired_; }
  // Cuts every connection accepted so far, both directions, now: a link that goes down at a moment the test
  // picks (with a cut fault's down_ms it stays down that long; give it a connection that never comes, -1).
  // Returns how many there were.
  size_t cut_all() {
    std::lock_guard lock(mu_);
    fired_at_ = Clock::now();
    fired_ = true;
    for (auto& [down, up] : connections_) {
      shutdown(down->get(), SHUT_RDWR);
      shutdown(up->get(), SHUT_RDWR);
    }
    return connections_.size();
  }
  // Cuts the connection accepted `index`-th (streams connect in their order), both directions, now. False
  // when there is none such yet.
  bool cut(size_t index) {
    std::lock_guard lock(mu_);
    if (index >= connections_.size()) return false;
    fired_at_ = Clock::now();
    fired_ = true;
    shutdown(connections_[index].first->get(), SHUT_RDWR);
    shutdown(connections_[index].second->get(), SHUT_RDWR);
    return true;
  }

 private:
  using Clock = std::chrono::steady_clock;

  bool path_down() const {
    if (!fired_ || fault_.kind != Fault::cut || fault_.down_ms == 0) return false;
    return fault_.down_ms < 0 || Clock::now() < fired_at_.load() + std::chrono::milliseconds(fault_.down_ms);
  }

  void run() {
    std::vector<std::thread> pumps;
    int index = 0;
    while (!stop_) {
      const io::SocketOptions buffers{.buffer_bytes = fault_.buffer_bytes};
      io::Fd c = io::tcp_accept(listener_.get(), 50, buffers);
      if (!c) continue;
      if (path_down()) continue;  // closes it
      io::Fd up;
      try {
        up = io::tcp_connect(io::HostPort{"127.0.0.1", target_}, buffers);
      } catch (const std::exception&) {
        continue;
      }
      auto upstream = std::make_shared<io::Fd>(std::move(up));
      auto downstream = std::make_shared<io::Fd>(std::move(c));
      {
        std::lock_guard lock(mu_);
        connections_.emplace_back(downstream, upstream);  // kept open until the proxy goes: cut_all
      }
      const bool faulty = index++ == fault_.connection;
      pumps.emplace_back([=, this] { pump(downstream->get(), upstream->get(), faulty, downstream->get()); });
      pumps.emplace_back([=, this] { pump(upstream->get(), downstream->get(), false, -1); });
    }
    for (auto& t : pumps) t.join();
  }

  // Forwards `from` → `to`; with `faulty`, applies the fault at its position. `peer` is the other socket of
  // a cut, shut too so both directions die.
  void pump(int from, int to, bool faulty, int peer) {
    std::vector<char> buf(1 << 16);
    int64_t pos = 0;
    if (peer >= 0 && fault_.clear_caps != 0) {  // the sender's direction starts with its HELLO
      if (!forward_hello(from, to)) {
        shutdown(to, SHUT_WR);
        return;
      }
      pos = engine::wire::kHeaderBytes + engine::wire::kHelloBytes;
    }
    int pieces = 0;
    for (;;) {
      pollfd p{.fd = from, .events = POLLIN, .revents = 0};
      const int r = poll(&p, 1, 50);
      if (r == 0) {
        if (stop_) break;
        continue;
      }
      const ssize_t n = recv(from, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      if (fault_.kind == Fault::delay && (fault_.delay_pieces < 0 || pieces++ < fault_.delay_pieces))
        std::this_thread::sleep_for(std::chrono::milliseconds(fault_.delay_ms));
      const bool here = faulty && !fired_ && fault_.at >= pos && fault_.at < pos + n;
      if (here) {
        const size_t k = size_t(fault_.at - pos);
        switch (fault_.kind) {
          case Fault::flip:
            buf[k] ^= 0x10;
            break;
          case Fault::cut:
            if (fault_.stall_ms > 0) drop_for(from, std::chrono::milliseconds(fault_.stall_ms));
            fired_at_ = Clock::now();
            fired_ = true;
            shutdown(from, SHUT_RDWR);
            shutdown(to, SHUT_RDWR);
            if (peer >= 0) shutdown(peer, SHUT_RDWR);
            return;
          case Fault::truncate:
            fired_ = true;
            if (k > 0) send(to, buf.data(), k, MSG_NOSIGNAL);
            shutdown(to, SHUT_WR);
            shutdown(from, SHUT_RDWR);
            return;
          case Fault::duplicate: {
            fired_ = true;
            const size_t len = size_t(std::min<int64_t>(fault_.length, n - int64_t(k)));
            if (send(to, buf.data(), k + len, MSG_NOSIGNAL) != ssize_t(k + len)) return;
            if (send(to, buf.data() + k, size_t(n) - k, MSG_NOSIGNAL) != n - ssize_t(k)) return;
            pos += n;
            continue;
          }
          default:
            break;
        }
        fired_ = true;
      }
      pos += n;
      if (send(to, buf.data(), size_t(n), MSG_NOSIGNAL) != n) break;
    }
    shutdown(to, SHUT_WR);
  }

  // Reads the HELLO frame from `from` whole, clears fault_.clear_caps in it (its checksum redone) and sends
  // it on. False when the connection ends first or the frame is no HELLO.
  bool forward_hello(int from, int to) {
    std::array<std::byte, engine::wire::kHeaderBytes + engine::wire::kHelloBytes> frame;
    for (size_t got = 0; got < frame.size();) {
      pollfd p{.fd = from, .events = POLLIN, .revents = 0};
      if (poll(&p, 1, 50) == 0) {
        if (stop_) return false;
        continue;
      }
      const ssize_t n = recv(from, frame.data() + got, frame.size() - got, 0);
      if (n <= 0) return false;
      got += size_t(n);
    }
    const std::span<std::byte, engine::wire::kHelloBytes> hello(frame.data() + engine::wire::kHeaderBytes,
                                                                engine::wire::kHelloBytes);
    engine::wire::Hello h;
    if (engine::wire::decode_hello(hello, &h) != engine::wire::Error::ok) return false;
    h.capabilities &= ~fault_.clear_caps;
    engine::wire::encode_hello(h, hello);
    return send(to, frame.data(), frame.size(), MSG_NOSIGNAL) == ssize_t(frame.size());
  }

  // Reads and drops what `from` sends for `d` (a path that swallows frames before it breaks).
  static void drop_for(int from, std::chrono::milliseconds d) {
    std::vector<char> sink(1 << 16);
    const auto until = Clock::now() + d;
    while (Clock::now() < until) {
      pollfd p{.fd = from, .events = POLLIN, .revents = 0};
      if (poll(&p, 1, 10) > 0 && recv(from, sink.data(), sink.size(), 0) <= 0) break;
    }
  }

  uint16_t target_;
  Fault fault_;
  io::Fd listener_;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> fired_{false};
  std::atomic<Clock::time_point> fired_at_{};
  std::mutex mu_;
  std::vector<std::pair<std::shared_ptr<io::Fd>, std::shared_ptr<io::Fd>>> connections_;  // under mu_
  std::thread thread_;
};

}  // namespace dstx::test
