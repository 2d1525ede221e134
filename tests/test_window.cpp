// Sequencing on both sides: the sender's bounded claim window and in-order digest, the receiver's reorder
// window (bounded, blocking, duplicate-proof, wakes on close).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <thread>

#include "engine/window.h"

namespace dstx::engine {
namespace {

using namespace std::chrono_literals;

TEST(SendSequencer, ClaimsStayInsideTheWindowAndStopAtTheTotal) {
  SendSequencer s(4);
  s.set_total(6);
  uint64_t seq = 0;
  for (uint64_t want = 1; want <= 4; ++want) {
    ASSERT_EQ(s.try_claim(&seq), SendSequencer::Claim::ok);
    EXPECT_EQ(seq, want);
  }
  EXPECT_EQ(s.try_claim(&seq), SendSequencer::Claim::window_full);
  s.complete(2, 10, 2);  // out of order: the window does not move yet
  EXPECT_EQ(s.try_claim(&seq), SendSequencer::Claim::window_full);
  s.complete(1, 10, 1);  // 1 and 2 done: two more fit
  EXPECT_EQ(s.completed(), 2u);
  ASSERT_EQ(s.try_claim(&seq), SendSequencer::Claim::ok);
  EXPECT_EQ(seq, 5u);
  ASSERT_EQ(s.try_claim(&seq), SendSequencer::Claim::ok);
  EXPECT_EQ(seq, 6u);
  EXPECT_EQ(s.try_claim(&seq), SendSequencer::Claim::exhausted);
}

TEST(SendSequencer, DigestIsTheSameWhateverOrderChunksFinishIn) {
  constexpr uint64_t n = 64;
  wire::StreamDigest expect;
  for (uint64_t i = 1; i <= n; ++i) expect.add(i, uint32_t(i * 3), i * 7919);
  std::mt19937 rng(5);
  for (int round = 0; round < 5; ++round) {
    SendSequencer s(n);
    s.set_total(n);
    std::vector<uint64_t> order;
    uint64_t seq;
    while (s.try_claim(&seq) == SendSequencer::Claim::ok) order.push_back(seq);
    std::shuffle(order.begin(), order.end(), rng);
    for (uint64_t i : order) s.complete(i, uint32_t(i * 3), i * 7919);
    EXPECT_EQ(s.completed(), n);
    EXPECT_EQ(s.digest(), expect.value());
  }
}

TEST(ReorderWindow, DeliversInOrderWhateverOrderChunksArriveIn) {
  ReorderWindow w(8, 16);
  std::vector<uint64_t> order = {3, 1, 2, 5, 4, 8, 7, 6};
  for (uint64_t seq : order) {
    std::span<std::byte> buf;
    ASSERT_EQ(w.admit(seq, &buf), ReorderWindow::Admit::ok);
    ASSERT_EQ(buf.size(), 16u);
    buf[0] = std::byte(seq);
    w.publish(ChunkMeta{.seq = seq, .offset = (seq - 1) * 16, .raw_len = 16});
  }
  for (uint64_t want = 1; want <= 8; ++want) {
    ChunkMeta m;
    std::span<std::byte> data;
    ASSERT_EQ(w.wait_next(100ms, &m, &data), ReorderWindow::Wait::ready);
    EXPECT_EQ(m.seq, want);
    EXPECT_EQ(data[0], std::byte(want));
    w.release_next();
  }
  ChunkMeta m;
  std::span<std::byte> data;
  EXPECT_EQ(w.wait_next(10ms, &m, &data), ReorderWindow::Wait::timeout);
}

TEST(ReorderWindow, RejectsDuplicatesAndStaleChunks) {
  ReorderWindow w(4, 8);
  std::span<std::byte> buf;
  ASSERT_EQ(w.admit(2, &buf), ReorderWindow::Admit::ok);
  EXPECT_EQ(w.admit(2, &buf), ReorderWindow::Admit::duplicate);
  ASSERT_EQ(w.admit(1, &buf), ReorderWindow::Admit::ok);
  w.publish(ChunkMeta{.seq = 1, .raw_len = 8});
  ChunkMeta m;
  std::span<std::byte> data;
  ASSERT_EQ(w.wait_next(100ms, &m, &data), ReorderWindow::Wait::ready);
  w.release_next();
  EXPECT_EQ(w.admit(1, &buf), ReorderWindow::Admit::duplicate);  // already applied
}

TEST(ReorderWindow, AdmitBlocksBeyondTheWindowUntilItMoves) {
  ReorderWindow w(2, 8);
  std::span<std::byte> buf;
  ASSERT_EQ(w.admit(1, &buf), ReorderWindow::Admit::ok);
  ASSERT_EQ(w.admit(2, &buf), ReorderWindow::Admit::ok);
  std::atomic<bool> admitted{false};
  std::thread t([&] {
    std::span<std::byte> b;
    EXPECT_EQ(w.admit(3, &b), ReorderWindow::Admit::ok);
    admitted = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(admitted.load());  // chunk 3 must wait: the window holds 1 and 2
  w.publish(ChunkMeta{.seq = 1, .raw_len = 8});
  ChunkMeta m;
  std::span<std::byte> data;
  ASSERT_EQ(w.wait_next(100ms, &m, &data), ReorderWindow::Wait::ready);
  w.release_next();
  t.join();
  EXPECT_TRUE(admitted.load());
}

TEST(ReorderWindow, CloseWakesBlockedProducersAndConsumers) {
  ReorderWindow w(1, 8);
  std::span<std::byte> buf;
  ASSERT_EQ(w.admit(1, &buf), ReorderWindow::Admit::ok);
  ReorderWindow::Admit producer = ReorderWindow::Admit::ok;
  ReorderWindow::Wait consumer = ReorderWindow::Wait::ready;
  std::thread p([&] { producer = w.admit(2, &buf); });
  std::thread c([&] {
    ChunkMeta m;
    std::span<std::byte> d;
    consumer = w.wait_next(10s, &m, &d);
  });
  std::this_thread::sleep_for(30ms);
  w.close();
  p.join();
  c.join();
  EXPECT_EQ(producer, ReorderWindow::Admit::closed);
  EXPECT_EQ(consumer, ReorderWindow::Wait::closed);
}

// The writer waits for the next chunk and for the streams' ENDs: the last END wakes it at once (a wait of an
// hour that did not end would hang the test), a wake before the wait ends the next wait, and a ready chunk
// still comes out as ready.
TEST(ReorderWindow, WakeEndsTheConsumersWaitEarly) {
  ReorderWindow w(4, 8);
  ChunkMeta m;
  std::span<std::byte> d;
  ReorderWindow::Wait consumer = ReorderWindow::Wait::ready;
  std::thread c([&] { consumer = w.wait_next(std::chrono::hours(1), &m, &d); });
  std::this_thread::sleep_for(30ms);
  w.wake();
  c.join();
  EXPECT_EQ(consumer, ReorderWindow::Wait::timeout);

  w.wake();  // before the wait
  EXPECT_EQ(w.wait_next(std::chrono::hours(1), &m, &d), ReorderWindow::Wait::timeout);

  std::span<std::byte> buf;
  ASSERT_EQ(w.admit(1, &buf), ReorderWindow::Admit::ok);
  w.publish(ChunkMeta{.seq = 1, .offset = 0, .raw_len = 8, .hash = 0, .flags = 0});
  w.wake();
  EXPECT_EQ(w.wait_next(std::chrono::hours(1), &m, &d), ReorderWindow::Wait::ready);
  EXPECT_EQ(m.seq, 1u);
}

// A chunk takes the buffer freed last (still in the cache), not one fixed by its sequence number; a buffer is
// never handed out twice at once, and the consumer sees the whole buffer its chunk was written into.
TEST(ReorderWindow, ReusesTheBufferFreedLast) {
  ReorderWindow w(4, 8);
  std::span<std::byte> b1, b2, b3;
  ASSERT_EQ(w.admit(1, &b1), ReorderWindow::Admit::ok);
  ASSERT_EQ(w.admit(2, &b2), ReorderWindow::Admit::ok);
  EXPECT_NE(b1.data(), b2.data());
  EXPECT_EQ(b1.size(), 8u);
  b1[7] = std::byte{42};
  w.publish(ChunkMeta{.seq = 1, .raw_len = 3});
  ChunkMeta m;
  std::span<std::byte> d;
  ASSERT_EQ(w.wait_next(100ms, &m, &d), ReorderWindow::Wait::ready);
  EXPECT_EQ(d.data(), b1.data());
  EXPECT_EQ(d.size(), 8u);  // the whole buffer, whatever raw_len says
  EXPECT_EQ(d[7], std::byte{42});
  w.release_next();
  // seq 3 would have had buffer 3 by seq % slots; it gets chunk 1's, freed last.
  ASSERT_EQ(w.admit(3, &b3), ReorderWindow::Admit::ok);
  EXPECT_EQ(b3.data(), b1.data());
  // A cancelled chunk's buffer goes back too, and is the next one taken.
  std::span<std::byte> b4, b5;
  ASSERT_EQ(w.admit(4, &b4), ReorderWindow::Admit::ok);
  EXPECT_NE(b4.data(), b2.data());
  EXPECT_NE(b4.data(), b3.data());
  w.cancel(4);
  ASSERT_EQ(w.admit(4, &b5), ReorderWindow::Admit::ok);
  EXPECT_EQ(b5.data(), b4.data());
}

}  // namespace
}  // namespace dstx::engine
