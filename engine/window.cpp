#include "engine/window.h"

#include <cassert>
#include <cstdlib>
#include <new>

namespace dstx::engine {

SendSequencer::SendSequencer(uint32_t window_chunks) : window_(window_chunks), entries_(window_chunks) {
  assert(window_chunks > 0);
}

SendSequencer::Claim SendSequencer::try_claim(uint64_t* seq) {
  std::lock_guard lock(mu_);
  if (cursor_ > total_) return Claim::exhausted;
  if (cursor_ >= next_ + window_) return Claim::window_full;
  *seq = cursor_++;
  return Claim::ok;
}

SendSequencer::Claim SendSequencer::peek() const {
  std::lock_guard lock(mu_);
  if (cursor_ > total_) return Claim::exhausted;
  if (cursor_ >= next_ + window_) return Claim::window_full;
  return Claim::ok;
}

void SendSequencer::set_total(uint64_t chunks) {
  {
    std::lock_guard lock(mu_);
    total_ = chunks;
  }
  cv_.notify_all();
}

uint64_t SendSequencer::total() const {
  std::lock_guard lock(mu_);
  return total_;
}

void SendSequencer::complete(uint64_t seq, uint32_t raw_len, uint64_t hash) {
  bool moved = false;
  {
    std::lock_guard lock(mu_);
    assert(seq >= next_ && seq < next_ + window_);
    entries_[seq % window_] = Entry{true, raw_len, hash};
    while (entries_[next_ % window_].ready) {
      Entry& e = entries_[next_ % window_];
      digest_.add(next_, e.raw_len, e.hash);
      e.ready = false;
      ++next_;
      moved = true;
    }
  }
  if (moved) cv_.notify_all();
}

void SendSequencer::wait_for_progress(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  const uint64_t seen = next_;
  cv_.wait_for(lock, timeout, [&] { return next_ != seen; });
}

void SendSequencer::wake_all() {
  cv_.notify_all();
}

uint64_t SendSequencer::completed() const {
  std::lock_guard lock(mu_);
  return next_ - 1;
}

uint64_t SendSequencer::digest() const {
  std::lock_guard lock(mu_);
  return digest_.value();
}

ReorderWindow::ReorderWindow(uint32_t slots, size_t slot_bytes)
    : slots_(slots), slot_bytes_(slot_bytes), table_(slots) {
  assert(slots > 0);
  if (slot_bytes > 0) memory_ = io::IoMemory(size_t(slots) * slot_bytes);
  free_bufs_.reserve(slots);
  for (uint32_t i = slots; i-- > 0;) free_bufs_.push_back(i);
}

std::byte* ReorderWindow::buffer(uint32_t index) const {
  return memory_.data() + size_t(index) * slot_bytes_;
}

ReorderWindow::Admit ReorderWindow::admit(uint64_t seq, std::span<std::byte>* buf) {
  std::unique_lock lock(mu_);
  admit_cv_.wait(lock, [&] { return closed_ || seq < next_ + slots_; });
  if (closed_) return Admit::closed;
  if (seq < next_) return Admit::duplicate;
  Slot& slot = table_[seq % slots_];
  if (slot.state != State::free) return Admit::duplicate;
  // Every slot that is not free holds a buffer, so one is left for this one. The most recently freed buffer
  // is taken first: its lines are still in the cache the stream thread and the writer share.
  assert(!free_bufs_.empty());
  slot.state = State::filling;
  slot.meta.seq = seq;
  slot.buf = free_bufs_.back();
  free_bufs_.pop_back();
  if (buf) *buf = std::span<std::byte>(buffer(slot.buf), slot_bytes_);
  return Admit::ok;
}

void ReorderWindow::cancel(uint64_t seq) {
  std::lock_guard lock(mu_);
  Slot& slot = table_[seq % slots_];
  if (slot.state == State::filling && slot.meta.seq == seq) {
    slot.state = State::free;
    free_bufs_.push_back(slot.buf);
  }
}

void ReorderWindow::publish(const ChunkMeta& meta) {
  bool wake = false;
  {
    std::lock_guard lock(mu_);
    Slot& slot = table_[meta.seq % slots_];
    assert(slot.state == State::filling && slot.meta.seq == meta.seq);
    slot.meta = meta;
    slot.state = State::ready;
    wake = meta.seq == next_;
  }
  if (wake) ready_cv_.notify_all();
}

ReorderWindow::Wait ReorderWindow::wait_next(std::chrono::milliseconds timeout, ChunkMeta* meta,
                                             std::span<std::byte>* slot_out) {
  std::unique_lock lock(mu_);
  const bool ok = ready_cv_.wait_for(
      lock, timeout, [&] { return closed_ || woken_ || table_[next_ % slots_].state == State::ready; });
  if (closed_) return Wait::closed;
  const bool ready = table_[next_ % slots_].state == State::ready;
  woken_ = false;
  if (!ok || !ready) return Wait::timeout;
  const Slot& slot = table_[next_ % slots_];
  *meta = slot.meta;
  *slot_out = std::span<std::byte>(buffer(slot.buf), slot_bytes_);
  return Wait::ready;
}

void ReorderWindow::release_next() {
  {
    std::lock_guard lock(mu_);
    Slot& slot = table_[next_ % slots_];
    assert(slot.state == State::ready);  // one buffer on the free stack twice would serve two chunks
    slot.state = State::free;
    free_bufs_.push_back(slot.buf);
    ++next_;
  }
  admit_cv_.notify_all();
}

void ReorderWindow::wake() {
  {
    std::lock_guard lock(mu_);
    woken_ = true;
  }
  ready_cv_.notify_all();
}

void ReorderWindow::close() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
  }
  admit_cv_.notify_all();
  ready_cv_.notify_all();
}

uint64_t ReorderWindow::next() const {
  std::lock_guard lock(mu_);
  return next_;
}

}  // namespace dstx::engine
