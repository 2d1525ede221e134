// The C ABI's log callback while a stream is lost and resumed, as a VMM sees it: a WARN line from each side
// (prefixed "send: " and "recv: "), on the thread that runs each transfer. It needs a fault between the two,
// which the C program (test_capi.c) has no proxy for, so this test drives the C functions from C++ with
// tests/fault_proxy.h. The stats that count resumes and codecs are checked here as well.
#include <sys/socket.h>

#include <gtest/gtest.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dstx/dstx.h"
#include "engine/capi_transfer.h"
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

// A receiver listening on a free loopback port, into the sink `spec`; `log` (may be null) hears WARN lines.
dstx_transfer* listening_receiver(const char* spec, Log* log, uint16_t* port) {
  dstx_recv_config rc = DSTX_RECV_CONFIG_INIT;
  rc.net = DSTX_NET_ADDRESS;
  rc.address = "127.0.0.1:0";
  rc.accept_timeout_ms = 20000;
  if (log) {
    rc.log = Log::on_log;
    rc.user = log;  // the default level, DSTX_LOG_WARN
  }
  dstx_endpoint sink = DSTX_ENDPOINT_INIT;
  sink.kind = DSTX_ENDPOINT_SPEC;
  sink.spec = spec;
  dstx_transfer* recv = nullptr;
  EXPECT_EQ(dstx_recv_create(&rc, &sink, &recv), DSTX_OK) << dstx_last_error(nullptr);
  if (recv) {
    EXPECT_EQ(dstx_transfer_local_port(recv, port), DSTX_OK);
  }
  return recv;
}

TEST(CapiEvents, ALostAndResumedStreamIsLoggedOnBothSides) {
  Log recv_log, send_log;
  uint16_t port = 0;
  dstx_transfer* recv = listening_receiver("null:", &recv_log, &port);
  ASSERT_NE(recv, nullptr);

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
  // The stats count it too: one resume on each side, and the sender's chunks sent again (an emulated
  // source is read again, like a file: nothing is kept in a replay buffer).
  dstx_stats ss = DSTX_STATS_INIT, rs = DSTX_STATS_INIT;
  ASSERT_EQ(dstx_transfer_stats(send, &ss), DSTX_OK);
  ASSERT_EQ(dstx_transfer_stats(recv, &rs), DSTX_OK);
  EXPECT_EQ(ss.resumes, 1u);
  EXPECT_EQ(rs.resumes, 1u);
  EXPECT_EQ(ss.replayed_chunks, ss.reread_chunks);
  EXPECT_LE(ss.replayed_chunks, ss.chunks);
  EXPECT_EQ(rs.replayed_chunks, 0u);
  dstx_transfer_destroy(send);
  dstx_transfer_destroy(recv);
}

// dstx_stats splits the compressed chunks by codec, the same on both sides, and counts those that were
// paged (mixed state has chunks whose zero pages lie among data); without a fault nothing is resumed.
TEST(CapiEvents, TheStatsSplitTheChunksByCodec) {
  for (const uint32_t codec : {uint32_t(DSTX_CODEC_LZ4), uint32_t(DSTX_CODEC_ZSTD), uint32_t(DSTX_CODEC_SPARSE)}) {
    SCOPED_TRACE("codec " + std::to_string(codec));
    const char* spec = "emu:size=16M,profile=mixed,seed=9";
    uint16_t port = 0;
    dstx_transfer* recv = listening_receiver(spec, nullptr, &port);
    ASSERT_NE(recv, nullptr);
    const std::string address = "127.0.0.1:" + std::to_string(port);
    dstx_send_config sc = DSTX_SEND_CONFIG_INIT;
    sc.net = DSTX_NET_ADDRESS;
    sc.address = address.c_str();
    sc.codec = codec;
    sc.chunk_bytes = 256 << 10;
    dstx_endpoint source = DSTX_ENDPOINT_INIT;
    source.kind = DSTX_ENDPOINT_SPEC;
    source.spec = spec;
    dstx_transfer* send = nullptr;
    ASSERT_EQ(dstx_send_create(&sc, &source, &send), DSTX_OK) << dstx_last_error(nullptr);
    int recv_status = -1;
    std::thread receiver([&] { recv_status = dstx_transfer_run(recv); });
    EXPECT_EQ(dstx_transfer_run(send), DSTX_OK) << dstx_last_error(send);
    receiver.join();
    EXPECT_EQ(recv_status, DSTX_OK) << dstx_last_error(recv);

    dstx_stats ss = DSTX_STATS_INIT, rs = DSTX_STATS_INIT;
    ASSERT_EQ(dstx_transfer_stats(send, &ss), DSTX_OK);
    ASSERT_EQ(dstx_transfer_stats(recv, &rs), DSTX_OK);
    for (const dstx_stats* s : {&ss, &rs}) {
      EXPECT_EQ(s->lz4_chunks + s->zstd_chunks + s->sparse_chunks, s->compressed_chunks);
      EXPECT_EQ(s->zero_chunks + s->raw_chunks + s->compressed_chunks, s->chunks);
      EXPECT_LE(s->paged_chunks, s->lz4_chunks + s->zstd_chunks);
      EXPECT_EQ(s->resumes, 0u);
      EXPECT_EQ(s->replayed_chunks, 0u);
    }
    EXPECT_EQ(ss.lz4_chunks, rs.lz4_chunks);
    EXPECT_EQ(ss.zstd_chunks, rs.zstd_chunks);
    EXPECT_EQ(ss.sparse_chunks, rs.sparse_chunks);
    EXPECT_EQ(ss.paged_chunks, rs.paged_chunks);
    if (codec == DSTX_CODEC_SPARSE) {
      EXPECT_GT(ss.sparse_chunks, 0u);
      EXPECT_EQ(ss.lz4_chunks + ss.zstd_chunks + ss.paged_chunks, 0u);
    } else {
      EXPECT_GT(codec == DSTX_CODEC_LZ4 ? ss.lz4_chunks : ss.zstd_chunks, 0u);
      EXPECT_EQ(codec == DSTX_CODEC_LZ4 ? ss.zstd_chunks : ss.lz4_chunks, 0u);
      EXPECT_GT(ss.paged_chunks, 0u);
    }
    dstx_transfer_destroy(send);
    dstx_transfer_destroy(recv);
  }
}

// A broken stream's new connection gets the caller's socket options like the first ones did (here the
// buffer size; the connect and user time-outs and keepalive travel with it). White box: the reconnection
// function the handle gives the engine, called directly.
TEST(CapiEvents, AReconnectionUsesTheCallersSocketOptions) {
  dstx::io::Fd listener = dstx::io::tcp_listen(dstx::io::HostPort{"127.0.0.1", 0});
  const std::string address = "127.0.0.1:" + std::to_string(dstx::io::bound_port(listener.get()));
  dstx_send_config sc = DSTX_SEND_CONFIG_INIT;
  sc.net = DSTX_NET_ADDRESS;
  sc.address = address.c_str();
  sc.socket_buffer_bytes = 96 << 10;  // below the default net.core.wmem_max
  dstx_endpoint source = DSTX_ENDPOINT_INIT;
  source.kind = DSTX_ENDPOINT_SPEC;
  source.spec = "emu:size=1M";
  dstx_transfer* send = nullptr;
  ASSERT_EQ(dstx_send_create(&sc, &source, &send), DSTX_OK) << dstx_last_error(nullptr);
  const auto* t = reinterpret_cast<const dstx::capi::Transfer*>(send);
  ASSERT_TRUE(t->send_options.reconnect);
  const dstx::io::Fd c = t->send_options.reconnect();
  int sndbuf = 0;
  socklen_t len = sizeof sndbuf;
  ASSERT_EQ(::getsockopt(c.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, &len), 0);
  EXPECT_EQ(sndbuf, 2 * (96 << 10));  // the kernel doubles what it is given
  dstx_transfer_destroy(send);
}

}  // namespace
