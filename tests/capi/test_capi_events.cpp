// The C ABI's log callback while a stream is lost and resumed, as a VMM sees it: a WARN line from each side
// (prefixed "send: " and "recv: "), on the thread that runs each transfer. It needs a fault between the two,
// which the C program (test_capi.c) has no proxy for, so this test drives the C functions from C++ with
// tests/fault_proxy.h.
#include <gtest/gtest.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dstx/dstx.h"
#include "fault_proxy.h"

namespace {

struct Log {
  std::mutex mu;
  std::vector<std::pair<int, std::string>> lines;
  std::set<std::thread::id> threads;

  static void on_log(void* user, dstx_transfer*, int level, const char* message) {
    Log* l = static_cast<Log*>(user);
    std::lock_guard lock(l->mu);
    l->lines.emplace_back(level, message);
    l->threads.insert(std::this_thread::get_id());
  }
  bool has(int level, const std::string& part) {
    std::lock_guard lock(mu);
    for (const auto& [lv, text] : lines)
      if (lv == level && text.find(part) != std::string::npos) return true;
    return false;
  }
  std::string all() {
    std::lock_guard lock(mu);
    std::string out;
    for (const auto& [lv, text] : lines) out += std::to_string(lv) + " " + text + " | ";
    return out;
  }
};

TEST(CapiEvents, ALostAndResumedStreamIsLoggedOnBothSides) {
  Log recv_log, send_log;
  dstx_recv_config rc = DSTX_RECV_CONFIG_INIT;
  rc.net = DSTX_NET_ADDRESS;
  rc.address = "127.0.0.1:0";
  rc.accept_timeout_ms = 20000;
  rc.log = Log::on_log;
  rc.user = &recv_log;  // the default level, DSTX_LOG_WARN
  dstx_endpoint sink = DSTX_ENDPOINT_INIT;
  sink.kind = DSTX_ENDPOINT_SPEC;
  sink.spec = "null:";
  dstx_transfer* recv = nullptr;
  ASSERT_EQ(dstx_recv_create(&rc, &sink, &recv), DSTX_OK) << dstx_last_error(nullptr);
  uint16_t port = 0;
  ASSERT_EQ(dstx_transfer_local_port(recv, &port), DSTX_OK);

  dstx::test::FaultProxy proxy(port, dstx::test::Fault{.kind = dstx::test::Fault::cut, .connection = 1,
                                                       .at = 1 << 20});
  const std::string address = "127.0.0.1:" + std::to_string(proxy.port());
  dstx_send_config sc = DSTX_SEND_CONFIG_INIT;
  sc.net = DSTX_NET_ADDRESS;
  sc.address = address.c_str();
  sc.streams = 2;
  sc.log = Log::on_log;
  sc.user = &send_log;
  dstx_endpoint source = DSTX_ENDPOINT_INIT;
  source.kind = DSTX_ENDPOINT_SPEC;
  source.spec = "emu:size=16M,profile=random,seed=5";  // stream 1 carries megabytes, uncompressed
  dstx_transfer* send = nullptr;
  ASSERT_EQ(dstx_send_create(&sc, &source, &send), DSTX_OK) << dstx_last_error(nullptr);

  std::thread::id receiving_thread;
  int recv_status = -1;
  std::thread receiver([&] {
    receiving_thread = std::this_thread::get_id();
    recv_status = dstx_transfer_run(recv);
  });
  const int send_status = dstx_transfer_run(send);
  receiver.join();
  EXPECT_EQ(send_status, DSTX_OK) << dstx_last_error(send);
  EXPECT_EQ(recv_status, DSTX_OK) << dstx_last_error(recv);
  EXPECT_TRUE(proxy.fired());

  EXPECT_TRUE(send_log.has(DSTX_LOG_WARN, "send: stream ")) << send_log.all();
  EXPECT_TRUE(send_log.has(DSTX_LOG_WARN, ": connection lost (")) << send_log.all();
  EXPECT_TRUE(send_log.has(DSTX_LOG_WARN, ": resumed on attempt ")) << send_log.all();
  EXPECT_TRUE(recv_log.has(DSTX_LOG_WARN, "recv: stream ")) << recv_log.all();
  EXPECT_TRUE(recv_log.has(DSTX_LOG_WARN, ": resumed by the sender after chunk ")) << recv_log.all();
  EXPECT_EQ(send_log.threads, std::set<std::thread::id>{std::this_thread::get_id()});
  EXPECT_EQ(recv_log.threads, std::set<std::thread::id>{receiving_thread});
  dstx_transfer_destroy(send);
  dstx_transfer_destroy(recv);
}

}  // namespace
