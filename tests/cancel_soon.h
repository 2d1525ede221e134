// Cancels a running call a moment after it started and checks that it ends soon after: for waits that must
// notice a cancel at once, not at their time-out.
#pragma once

#include <chrono>
#include <future>
#include <optional>
#include <thread>

#include "engine/transfer.h"
#include "io/endpoints.h"
#include "io/socket.h"

namespace dstx::test {

// Runs run(cancel) on another thread, requests the cancel after 200 ms, and returns its result if it ended
// within 15 s more (nullopt otherwise, once it has ended after all).
template <typename Run>
std::optional<engine::Result> ended_soon_after_cancel(Run&& run) {
  engine::Cancel cancel;
  auto running = std::async(std::launch::async, [&] { return run(&cancel); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  cancel.request();
  const bool soon = running.wait_for(std::chrono::seconds(15)) == std::future_status::ready;
  engine::Result r = running.get();
  if (!soon) return std::nullopt;
  return r;
}

// A receive on a fresh listener that one connection reaches and then says nothing to, cancelled meanwhile.
inline std::optional<engine::Result> receive_cancelled_at_a_mute_connection(io::Sink& sink,
                                                                            const engine::RecvOptions& ro) {
  io::Fd listener = io::tcp_listen(io::HostPort{"127.0.0.1", 0});
  const io::Fd mute = io::tcp_connect(io::HostPort{"127.0.0.1", io::bound_port(listener.get())}, {});
  return ended_soon_after_cancel(
      [&](const engine::Cancel* cancel) { return engine::receive(sink, listener.get(), ro, nullptr, cancel); });
}

}  // namespace dstx::test
