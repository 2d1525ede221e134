// Sources and sinks of device state: files, byte streams (fds), the emulated content generator, and null.
// The engine reads a Source chunk by chunk and writes a Sink strictly in order.
// Errors throw std::runtime_error/std::system_error whose text names the endpoint and what failed.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "io/content.h"
#include "io/ring.h"

namespace dstx::io {

// What a sequential read returned besides the bytes.
struct ReadInfo {
  bool end_of_transaction = false;  // these bytes end a source transaction (VFIO v1 migration region)
  // Zero copy: when set, the bytes are at `view` (e.g. a mapped device data section) and `out` was not written.
  // The view stays valid until release_view(view_token); the source does not move on past it before then.
  const std::byte* view = nullptr;
  uint64_t view_token = 0;
};

// Set by the engine for the length of a transfer: once *stop reads true (the transfer failed or was
// cancelled), an endpoint waiting on its other end (a pipe that gives nothing, a device that says "try
// again") gives up with an error instead of waiting on. Endpoints that never wait ignore it. Waits that only
// the kernel can end (a blocking write into a full pipe) are not covered.
class Stoppable {
 public:
  void set_stop(const std::atomic<bool>* stop) { stop_ = stop; }

 protected:
  bool stop_requested() const { return stop_ && stop_->load(std::memory_order_acquire); }

 private:
  const std::atomic<bool>* stop_ = nullptr;
};

// read_next's answer when it cannot move on now because views it handed out are still held (a VFIO v1 section
// is refilled only at the next transaction): the caller releases what it holds and asks again.
inline constexpr size_t kReadAgain = SIZE_MAX;

class Source : public Stoppable {
 public:
  virtual ~Source() = default;
  virtual std::string describe() const = 0;
  // Total bytes, when known before the transfer (files, generators). nullopt for streams.
  virtual std::optional<uint64_t> size() const = 0;
  // What a stream expects to produce, for sizing chunks only (it may produce more or less): size() when known;
  // a VFIO v2 device says what stop-copy would take now. nullopt when it cannot tell.
  virtual std::optional<uint64_t> size_estimate() { return size(); }
  // True: any range can be read at any time, from several threads at once (read_at). False: read_next only.
  virtual bool random_access() const = 0;
  // Random access through a file descriptor: when >= 0, logical offset == file offset in this fd and the
  // engine may queue reads on its own rings (several in flight). -1 otherwise.
  virtual int read_fd() const { return -1; }
  // True when reads are served from memory (a file on tmpfs or ramfs; short of swapping): the engine then
  // reads on its own thread (read_at), which costs less than queueing reads that the kernel hands to worker
  // threads anyway.
  virtual bool reads_from_memory() const { return false; }
  // Random access: fills `out` with the bytes at `offset` (out must lie within size()). Thread-safe.
  virtual void read_at(Ring& ring, uint64_t offset, std::span<std::byte> out);
  // Sequential: reads the next bytes in order into `out` (at most out.size()), filling it unless the stream or
  // a transaction ends, or a stream's input paused. Returns the byte count; 0 means end of stream. One caller
  // at a time (the engine serialises). `info` (never null) reports a transaction end or a zero-copy view. kReadAgain: see above.
  virtual size_t read_next(Ring& ring, std::span<std::byte> out, ReadInfo* info);
  // Releases a view returned through ReadInfo. Thread-safe; called once per view.
  virtual void release_view(uint64_t view_token);
};

class Sink : public Stoppable {
 public:
  virtual ~Sink() = default;
  virtual std::string describe() const = 0;
  // Bytes arrive strictly in order: `offset` is the number of bytes written before. One caller at a time.
  virtual void write(Ring& ring, uint64_t offset, std::span<const std::byte> data) = 0;
  // A run of zero bytes (a zero chunk, or a chunk's zero pages). Default: writes zeros from a static zero page.
  virtual void write_zero(Ring& ring, uint64_t offset, uint64_t len);
  // True when a chunk written in pieces (write for its data, write_zero for its runs of zero pages; up to a
  // piece per 4 KiB page) costs no more than one write of the whole: the receiver then never expands a chunk
  // whose zero pages were left out on the wire. Default: false (a system call per write, or a stream).
  virtual bool takes_pieces() const { return false; }
  // The bytes written since the previous call complete one source transaction (VFIO v1: write data_size).
  // Default: nothing.
  virtual void end_transaction(Ring& ring);
  // Every byte is written and verified: make the result durable and visible (a file appears under its name
  // only here). Throws if it cannot; the caller then calls abort().
  virtual void commit(Ring& ring, uint64_t total_bytes) = 0;
  // The transfer failed or was cancelled: leave nothing that looks complete, after a commit too (the sender
  // never learnt of it): a file goes, a device is reset; a stream's bytes are out of reach. Never throws;
  // idempotent.
  virtual void abort() noexcept = 0;
};

// file:PATH as a source: random access through read_fd().
std::unique_ptr<Source> open_file_source(const std::string& path);
// fd:N / stdin: as a source: sequential, unknown size. `owned` closes the fd on destruction.
std::unique_ptr<Source> open_fd_source(int fd, bool owned, std::string name);
// emu:… as a source: generated content of `size` bytes.
std::unique_ptr<Source> open_emu_source(const ContentGenerator& gen, uint64_t size);

// file:PATH as a sink: writes PATH.partial (created exclusively, mode 0644), skips zero runs (holes), and at
// commit truncates to the final size, fsyncs and renames to PATH. abort() unlinks PATH.partial (or PATH,
// after the commit).
std::unique_ptr<Sink> open_file_sink(const std::string& path);
// fd:N / stdout: as a sink: bytes written in order; abort() closes the fd so the reader sees the stream end
// (the engine also never writes unverified bytes). `owned` closes it on destruction.
std::unique_ptr<Sink> open_fd_sink(int fd, bool owned, std::string name);
// null: decodes and discards.
std::unique_ptr<Sink> open_null_sink();
// emu:… as a sink: checks every byte against the generator and `size` at commit; a mismatch throws naming the
// first differing offset.
std::unique_ptr<Sink> open_emu_sink(const ContentGenerator& gen, uint64_t size);

}  // namespace dstx::io
