// Sequence bookkeeping on both sides.
//  - SendSequencer hands out sequence numbers to the sender's workers, keeps them within a bounded window of
//    the oldest unfinished chunk, and folds finished chunks into the whole-stream digest in sequence order.
//  - ReorderWindow holds decoded chunks on the receiver until the sink can take them in order. Its buffers are
//    the receive buffers, so its size is the receiver's memory bound. A sequence number owns a table entry
//    (seq % slots) and, while admitted, one buffer from a stack of free ones: the buffer freed last is reused
//    first, so the few chunks in flight keep landing in memory that is still in the cache.
// Sequence numbers start at 1 (0 means "none").
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "engine/wire.h"
#include "io/memory.h"

namespace dstx::engine {

class SendSequencer {
 public:
  explicit SendSequencer(uint32_t window_chunks);

  enum class Claim { ok, window_full, exhausted };
  // Claims the next sequence number if it lies within the window and below the total.
  Claim try_claim(uint64_t* seq);
  // What try_claim would answer now, without claiming.
  Claim peek() const;
  // Sets the number of chunks (known up front, or when a sequential source hits its end).
  void set_total(uint64_t chunks);
  uint64_t total() const;
  // Marks seq finished (any order); finished chunks are folded into the digest in order.
  void complete(uint64_t seq, uint32_t raw_len, uint64_t hash);
  // Waits until the window moves (or wake_all / timeout).
  void wait_for_progress(std::chrono::milliseconds timeout);
  void wake_all();
  uint64_t completed() const;  // chunks finished contiguously from 1
  uint64_t digest() const;     // valid once completed() == total()

 private:
  struct Entry {
    bool ready = false;
    uint32_t raw_len = 0;
    uint64_t hash = 0;
  };
  const uint32_t window_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t cursor_ = 1;  // next sequence number to hand out
  uint64_t next_ = 1;    // oldest unfinished
  uint64_t total_ = UINT64_MAX;
  std::vector<Entry> entries_;
  wire::StreamDigest digest_;
};

struct ChunkMeta {
  uint64_t seq = 0;
  uint64_t offset = 0;
  uint32_t raw_len = 0;
  uint64_t hash = 0;
  uint16_t flags = 0;
  // > 0: the slot holds the chunk's sparse payload, this many bytes packed against the slot's end (verified
  // as it is, kept so for a sink that takes pieces), not the raw bytes at its start.
  uint32_t packed_len = 0;
};

class ReorderWindow {
 public:
  // slots * slot_bytes bytes are allocated once, up front.
  ReorderWindow(uint32_t slots, size_t slot_bytes);

  enum class Admit { ok, duplicate, closed };
  // Reserves the slot of `seq`, blocking while seq lies beyond the window. `buf` receives the slot's buffer.
  Admit admit(uint64_t seq, std::span<std::byte>* buf);
  // Gives back an admitted slot whose chunk was lost on the way (a broken connection): it may come again.
  void cancel(uint64_t seq);
  // The admitted chunk is decoded and verified: the consumer may take it.
  void publish(const ChunkMeta& meta);

  enum class Wait { ready, timeout, closed };
  // Consumer: waits for the next chunk in order. `slot_out` receives the chunk's whole buffer (at least raw_len
  // bytes), the consumer's until release_next.
  Wait wait_next(std::chrono::milliseconds timeout, ChunkMeta* meta, std::span<std::byte>* slot_out);
  // Consumer: frees the slot returned by wait_next and moves the window on.
  void release_next();
  // Wakes every waiter; admit and wait_next return closed from now on.
  void close();
  // Ends the consumer's current (or next) wait_next early with timeout, so that it looks again at what it
  // waits for besides chunks (the end of the streams).
  void wake();
  uint64_t next() const;  // the sequence number the consumer waits for
  uint32_t slots() const { return slots_; }

 private:
  enum class State : uint8_t { free, filling, ready };
  struct Slot {
    State state = State::free;
    ChunkMeta meta;
    uint32_t buf = 0;  // the buffer held while filling or ready
  };
  std::byte* buffer(uint32_t index) const;
  const uint32_t slots_;
  const size_t slot_bytes_;
  io::IoMemory memory_;
  mutable std::mutex mu_;
  std::condition_variable admit_cv_;
  std::condition_variable ready_cv_;
  uint64_t next_ = 1;
  bool closed_ = false;
  bool woken_ = false;
  std::vector<Slot> table_;
  std::vector<uint32_t> free_bufs_;  // buffers of no slot, the one freed last at the back
};

}  // namespace dstx::engine
