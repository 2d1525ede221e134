#include "io/endpoints.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <system_error>
#include <utility>

namespace dstx::io {

namespace {

// Shared by every zero run: sinks that must emit zeros write from it, the emu sink compares against it.
// Static so a zero run of any length costs no allocation.
constexpr size_t kZeroBytes = 64 * 1024;
constexpr std::array<std::byte, kZeroBytes> kZeros{};

[[noreturn]] void throw_errno(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), what);
}

std::string hex_byte(std::byte b) {
  char text[8];
  std::snprintf(text, sizeof text, "0x%02x", static_cast<unsigned>(b));
  return text;
}

std::string stream_error_text(const std::string& name, const char* verb, uint64_t offset, int err) {
  std::string text = name + ": " + verb + " after " + std::to_string(offset) + " bytes";
  if (err == EPIPE) text += " (the reader went away)";
  return text;
}

// --- sources ---------------------------------------------------------------------------------------------

class FileSource final : public Source {
 public:
  explicit FileSource(const std::string& path) : name_("file:" + path) {
    // O_NONBLOCK only so that a FIFO named by mistake fails below instead of blocking here until a writer
    // appears; it is cleared again because io_uring honours it on regular files and would return -EAGAIN.
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd_ < 0) throw_errno(errno, name_ + ": cannot open");
    try {
      struct stat st {};
      if (::fstat(fd_, &st) != 0) throw_errno(errno, name_ + ": fstat");
      if (S_ISREG(st.st_mode)) {
        size_ = static_cast<uint64_t>(st.st_size);
      } else if (S_ISBLK(st.st_mode)) {
        if (::ioctl(fd_, BLKGETSIZE64, &size_) != 0) throw_errno(errno, name_ + ": BLKGETSIZE64");
      } else if (S_ISDIR(st.st_mode)) {
        throw std::runtime_error(name_ + ": is a directory");
      } else {
        throw std::runtime_error(name_ + ": not a regular file or block device (use fd: for a stream)");
      }
      struct statfs fs {};
      memory_ = S_ISREG(st.st_mode) && ::fstatfs(fd_, &fs) == 0 &&
                (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC);
      int flags = ::fcntl(fd_, F_GETFL);
      if (flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_NONBLOCK) != 0) throw_errno(errno, name_ + ": fcntl");
    } catch (...) {
      ::close(fd_);
      throw;
    }
  }
  ~FileSource() override { ::close(fd_); }

  std::string describe() const override { return name_; }
  std::optional<uint64_t> size() const override { return size_; }
  bool random_access() const override { return true; }
  int read_fd() const override { return fd_; }
  bool reads_from_memory() const override { return memory_; }

  void read_at(Ring& ring, uint64_t offset, std::span<std::byte> out) override {
    if (offset > size_ || out.size() > size_ - offset) {
      throw std::out_of_range(name_ + ": read of " + std::to_string(out.size()) + " bytes at offset " +
                              std::to_string(offset) + " lies beyond the size " + std::to_string(size_));
    }
    const int64_t got = memory_ ? pread_full(fd_, out.data(), out.size(), static_cast<int64_t>(offset))
                                : read_full(ring, fd_, out.data(), out.size(), static_cast<int64_t>(offset));
    if (got < 0) throw_errno(static_cast<int>(-got), name_ + ": read at offset " + std::to_string(offset));
    if (static_cast<size_t>(got) < out.size()) {
      throw std::runtime_error(name_ + ": short read at offset " +
                               std::to_string(offset + static_cast<uint64_t>(got)) +
                               " (file changed during transfer?)");
    }
  }

 private:
  std::string name_;
  int fd_ = -1;
  uint64_t size_ = 0;
  bool memory_ = false;  // tmpfs or ramfs
};

class FdSource final : public Source {
 public:
  static constexpr int kWaitSliceMs = 100;
  FdSource(int fd, bool owned, std::string name) : name_(std::move(name)), fd_(fd), owned_(owned) {}
  ~FdSource() override {
    if (owned_) ::close(fd_);
  }

  std::string describe() const override { return name_; }
  std::optional<uint64_t> size() const override { return std::nullopt; }
  bool random_access() const override { return false; }

  // A pipe, socket or tty: each read takes what is there once poll says so, and the wait for more is in
  // slices, so that a writer that stalls without closing cannot hold the transfer past its failure. A chunk
  // ends short once its first bytes have waited kWaitSliceMs for the rest: a slow writer's bytes go out as
  // they come, not once a whole chunk has gathered (which could take longer than the idle time-out).
  size_t read_next(Ring&, std::span<std::byte> out, ReadInfo* /*info*/) override {
    // Once a stream has ended we never read again: a tty would otherwise hand out more bytes after Ctrl-D.
    if (eof_ || out.empty()) return 0;
    size_t done = 0;
    std::chrono::steady_clock::time_point flush_at;  // set with the chunk's first bytes
    while (done < out.size()) {
      int wait_ms = kWaitSliceMs;
      if (done > 0) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            flush_at - std::chrono::steady_clock::now());
        if (left.count() <= 0) break;
        wait_ms = int(left.count());
      }
      pollfd p{.fd = fd_, .events = POLLIN, .revents = 0};
      const int ready = ::poll(&p, 1, wait_ms);
      if (ready == 0 && done > 0) break;
      if (ready == 0 || (ready < 0 && errno == EINTR)) {
        if (stop_requested()) {
          throw std::runtime_error(name_ + ": gave up waiting for input after byte " +
                                   std::to_string(consumed_ + done) + " (the transfer ended)");
        }
        continue;
      }
      const ssize_t got = ready < 0 ? -1 : ::read(fd_, out.data() + done, out.size() - done);
      if (got < 0) {
        const int err = errno;
        if (err == EINTR || err == EAGAIN) continue;
        throw_errno(err, stream_error_text(name_, "read", consumed_ + done, err));
      }
      if (got == 0) {
        eof_ = true;
        break;
      }
      if (done == 0) flush_at = std::chrono::steady_clock::now() + std::chrono::milliseconds(kWaitSliceMs);
      done += size_t(got);
    }
    consumed_ += done;
    return done;
  }

 private:
  std::string name_;
  int fd_;
  bool owned_;
  bool eof_ = false;
  uint64_t consumed_ = 0;
};

class EmuSource final : public Source {
 public:
  EmuSource(const ContentGenerator& gen, uint64_t size) : gen_(gen), size_(size) {}

  std::string describe() const override {
    return "emu:" + std::string(profile_name(gen_.profile())) + ",seed=" + std::to_string(gen_.seed()) +
           ",size=" + std::to_string(size_);
  }
  std::optional<uint64_t> size() const override { return size_; }
  bool random_access() const override { return true; }

  void read_at(Ring&, uint64_t offset, std::span<std::byte> out) override {
    if (offset > size_ || out.size() > size_ - offset) {
      throw std::out_of_range(describe() + ": read of " + std::to_string(out.size()) + " bytes at offset " +
                              std::to_string(offset) + " lies beyond the size");
    }
    gen_.fill(offset, out);
  }

 private:
  ContentGenerator gen_;
  uint64_t size_;
};

// --- sinks -----------------------------------------------------------------------------------------------

std::string parent_dir(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Writes go to PATH.partial and become PATH only at commit, so no reader ever sees a half-written file under
// the final name. An existing PATH is replaced at commit (rename is atomic): its old content stays intact
// until the new one is complete and durable, and is gone afterwards. A transfer that fails after the commit
// (before the sender could learn of it) removes PATH again.
class FileSink final : public Sink {
 public:
  explicit FileSink(const std::string& path)
      : path_(path), partial_(path + ".partial"), name_("file:" + path) {
    // Renaming onto a device node or a symlink to one would replace the node, not write the device.
    struct stat st {};
    if (::stat(path_.c_str(), &st) == 0) {
      if (S_ISDIR(st.st_mode)) throw std::runtime_error(name_ + ": is a directory");
      if (!S_ISREG(st.st_mode)) {
        throw std::runtime_error(name_ +
                                 ": exists and is not a regular file (a file sink replaces PATH with a new "
                                 "file at commit; use fd: to write into a device or pipe)");
      }
    }
    fd_ = ::open(partial_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      int err = errno;
      // Never clobber it: it may belong to a transfer that is still running, and if its run died, only the
      // user knows whether its bytes are worth keeping.
      if (err == EEXIST) {
        throw std::runtime_error(name_ + ": " + partial_ +
                                 " already exists (left by an interrupted transfer, or another transfer is "
                                 "writing it); remove it and retry");
      }
      throw_errno(err, name_ + ": cannot create " + partial_);
    }
    partial_exists_ = true;
  }
  ~FileSink() override {
    if (!committed_) abort();
  }

  std::string describe() const override { return name_; }

  void write(Ring& ring, uint64_t offset, std::span<const std::byte> data) override {
    check_next(offset);
    int64_t got = write_full(ring, fd_, data.data(), data.size(), static_cast<int64_t>(offset));
    if (got < 0) throw_errno(static_cast<int>(-got), name_ + ": write at offset " + std::to_string(offset));
    end_ = offset + data.size();
  }

  // The file is new, so an unwritten range already reads as zeros: leaving a hole saves the write and the
  // disk space. A trailing hole gets its size from the ftruncate at commit.
  void write_zero(Ring&, uint64_t offset, uint64_t len) override {
    check_next(offset);
    end_ = offset + len;
  }

  void commit(Ring&, uint64_t total_bytes) override {
    if (fd_ < 0 || !partial_exists_) throw std::logic_error(name_ + ": commit after abort or commit");
    if (total_bytes != end_) {
      throw std::runtime_error(name_ + ": commit of " + std::to_string(total_bytes) + " bytes, but " +
                               std::to_string(end_) + " were written");
    }
    if (::ftruncate(fd_, static_cast<off_t>(total_bytes)) != 0) {
      throw_errno(errno, name_ + ": ftruncate " + partial_);
    }
    if (::fdatasync(fd_) != 0) throw_errno(errno, name_ + ": fdatasync " + partial_);
    int rc = ::close(fd_);
    fd_ = -1;
    // A failed close can be the first report of a lost write (NFS, quotas).
    if (rc != 0) throw_errno(errno, name_ + ": close " + partial_);
    // Opened before the rename, so that a failure here still leaves nothing under the final name.
    std::string dir = parent_dir(path_);
    int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd < 0) throw_errno(errno, name_ + ": cannot open directory " + dir);
    if (::rename(partial_.c_str(), path_.c_str()) != 0) {
      int err = errno;
      ::close(dir_fd);
      throw_errno(err, name_ + ": rename " + partial_);
    }
    partial_exists_ = false;
    if (::fsync(dir_fd) != 0) {
      int err = errno;
      ::close(dir_fd);
      // Without the directory on disk the new name may vanish at a crash; a commit that throws must leave
      // nothing that looks complete, so the file goes too.
      ::unlink(path_.c_str());
      throw_errno(err, name_ + ": fsync of directory " + dir + " failed; " + path_ + " removed");
    }
    ::close(dir_fd);
    committed_ = true;
  }

  void abort() noexcept override {
    if (committed_) {
      // The transfer failed after the commit (the sender never learnt of it): nothing may look complete,
      // after a crash either (best effort: nothing can be done about a failure here).
      ::unlink(path_.c_str());
      const int dir_fd = ::open(parent_dir(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (dir_fd >= 0) {
        (void)::fsync(dir_fd);
        ::close(dir_fd);
      }
      committed_ = false;
      return;
    }
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
    }
    if (partial_exists_) {
      // Nothing useful can be done about a failure here (ENOENT: someone removed it already).
      ::unlink(partial_.c_str());
      partial_exists_ = false;
    }
  }

 private:
  void check_next(uint64_t offset) const {
    if (fd_ < 0) throw std::logic_error(name_ + ": write after abort or commit");
    if (offset != end_) {
      throw std::logic_error(name_ + ": write at offset " + std::to_string(offset) + ", expected offset " +
                             std::to_string(end_));
    }
  }

  std::string path_;
  std::string partial_;
  std::string name_;
  int fd_ = -1;
  bool partial_exists_ = false;
  bool committed_ = false;
  uint64_t end_ = 0;  // bytes accounted for so far, written or left as holes
};

class FdSink final : public Sink {
 public:
  FdSink(int fd, bool owned, std::string name) : name_(std::move(name)), fd_(fd), owned_(owned) {}
  ~FdSink() override {
    if (owned_ && fd_ >= 0) ::close(fd_);
  }

  std::string describe() const override { return name_; }

  void write(Ring& ring, uint64_t offset, std::span<const std::byte> data) override {
    if (aborted_ || committed_) throw std::logic_error(name_ + ": write after abort or commit");
    if (offset != written_) {
      throw std::logic_error(name_ + ": write at offset " + std::to_string(offset) + ", expected offset " +
                             std::to_string(written_));
    }
    int64_t got = write_full(ring, fd_, data.data(), data.size(), -1);
    if (got < 0) {
      int err = static_cast<int>(-got);
      throw_errno(err, stream_error_text(name_, "write", written_, err));
    }
    written_ += data.size();
  }

  void commit(Ring&, uint64_t total_bytes) override {
    if (aborted_) throw std::logic_error(name_ + ": commit after abort");
    if (total_bytes != written_) {
      throw std::runtime_error(name_ + ": commit of " + std::to_string(total_bytes) + " bytes, but " +
                               std::to_string(written_) + " were written");
    }
    committed_ = true;
  }

  // The reader must not wait forever for bytes that will never come, so the stream is ended now. Its limit: a
  // pipe or socket reader sees the same end of stream as after a complete transfer, and can tell the two
  // apart only if the stream has its own framing or the reader checks the exit status; what it has read is
  // never unverified data, because the engine writes only verified bytes, in order.
  void abort() noexcept override {
    if (aborted_ || committed_) return;
    aborted_ = true;
    if (owned_) {
      ::close(fd_);
      fd_ = -1;
      return;
    }
    struct stat st {};
    // shutdown ends a socket stream even when other processes hold the same socket, which a close would not.
    if (::fstat(fd_, &st) == 0 && S_ISSOCK(st.st_mode) && ::shutdown(fd_, SHUT_WR) == 0) return;
    // The fd number is not ours: closing it would let the next open() reuse it (for stdout, any stray print
    // would then land in that file). Pointing it at /dev/null drops our reference to the stream and keeps the
    // number taken.
    int null_fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null_fd >= 0) {
      ::dup2(null_fd, fd_);
      ::close(null_fd);
    } else {
      ::close(fd_);
    }
  }

 private:
  std::string name_;
  int fd_;
  bool owned_;
  bool aborted_ = false;
  bool committed_ = false;
  uint64_t written_ = 0;
};

class NullSink final : public Sink {
 public:
  std::string describe() const override { return "null:"; }
  void write(Ring&, uint64_t offset, std::span<const std::byte> data) override {
    advance(offset, data.size());
  }
  void write_zero(Ring&, uint64_t offset, uint64_t len) override { advance(offset, len); }
  bool takes_pieces() const override { return true; }
  void commit(Ring&, uint64_t total_bytes) override {
    // Counting costs nothing and keeps "null:" a faithful stand-in for the other sinks in tests and benches.
    if (total_bytes != seen_) {
      throw std::runtime_error("null: commit of " + std::to_string(total_bytes) + " bytes, but " +
                               std::to_string(seen_) + " were written");
    }
  }
  void abort() noexcept override {}

 private:
  void advance(uint64_t offset, uint64_t len) {
    if (offset != seen_) {
      throw std::logic_error("null: write at offset " + std::to_string(offset) + ", expected offset " +
                             std::to_string(seen_));
    }
    seen_ += len;
  }
  uint64_t seen_ = 0;
};

class EmuSink final : public Sink {
 public:
  EmuSink(const ContentGenerator& gen, uint64_t size) : gen_(gen), size_(size) {}

  std::string describe() const override {
    return "emu:" + std::string(profile_name(gen_.profile())) + ",seed=" + std::to_string(gen_.seed()) +
           ",size=" + std::to_string(size_);
  }

  void write(Ring&, uint64_t offset, std::span<const std::byte> data) override {
    check_range(offset, data.size());
    int64_t bad = gen_.first_mismatch(offset, data);
    if (bad >= 0) mismatch(offset + static_cast<uint64_t>(bad), data[static_cast<size_t>(bad)]);
    received_ = offset + data.size();
  }

  void write_zero(Ring&, uint64_t offset, uint64_t len) override {
    check_range(offset, len);
    uint64_t done = 0;
    while (done < len) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, kZeroBytes));
      int64_t bad = gen_.first_mismatch(offset + done, std::span<const std::byte>(kZeros.data(), n));
      if (bad >= 0) mismatch(offset + done + static_cast<uint64_t>(bad), std::byte{0});
      done += n;
    }
    received_ = offset + len;
  }

  bool takes_pieces() const override { return true; }

  void commit(Ring&, uint64_t total_bytes) override {
    if (received_ != size_) {
      throw std::runtime_error("emu sink: received " + std::to_string(received_) + " bytes, expected " +
                               std::to_string(size_));
    }
    if (total_bytes != received_) {
      throw std::runtime_error("emu sink: commit of " + std::to_string(total_bytes) +
                               " bytes, but received " + std::to_string(received_));
    }
  }
  void abort() noexcept override {}

 private:
  void check_range(uint64_t offset, uint64_t len) const {
    if (offset != received_) {
      throw std::logic_error("emu sink: write at offset " + std::to_string(offset) + ", expected offset " +
                             std::to_string(received_));
    }
    if (len > size_ - offset) {
      throw std::runtime_error("emu sink: received " + std::to_string(offset + len) + " bytes, expected " +
                               std::to_string(size_));
    }
  }

  [[noreturn]] void mismatch(uint64_t at, std::byte got) const {
    std::byte want{};
    gen_.fill(at, std::span<std::byte>(&want, 1));
    throw std::runtime_error("emu sink: byte mismatch at offset " + std::to_string(at) + " (expected " +
                             hex_byte(want) + ", got " + hex_byte(got) + ")");
  }

  ContentGenerator gen_;
  uint64_t size_;
  uint64_t received_ = 0;
};

}  // namespace

void Source::read_at(Ring&, uint64_t, std::span<std::byte>) {
  throw std::logic_error(describe() + ": not a random-access source");
}

size_t Source::read_next(Ring&, std::span<std::byte>, ReadInfo*) {
  throw std::logic_error(describe() + ": not a sequential source");
}

void Source::release_view(uint64_t) {}

void Sink::end_transaction(Ring&) {}

void Sink::write_zero(Ring& ring, uint64_t offset, uint64_t len) {
  uint64_t done = 0;
  while (done < len) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, kZeroBytes));
    write(ring, offset + done, std::span<const std::byte>(kZeros.data(), n));
    done += n;
  }
}

std::unique_ptr<Source> open_file_source(const std::string& path) {
  return std::make_unique<FileSource>(path);
}

std::unique_ptr<Source> open_fd_source(int fd, bool owned, std::string name) {
  return std::make_unique<FdSource>(fd, owned, std::move(name));
}

std::unique_ptr<Source> open_emu_source(const ContentGenerator& gen, uint64_t size) {
  return std::make_unique<EmuSource>(gen, size);
}

std::unique_ptr<Sink> open_file_sink(const std::string& path) {
  return std::make_unique<FileSink>(path);
}

std::unique_ptr<Sink> open_fd_sink(int fd, bool owned, std::string name) {
  return std::make_unique<FdSink>(fd, owned, std::move(name));
}

std::unique_ptr<Sink> open_null_sink() {
  return std::make_unique<NullSink>();
}

std::unique_ptr<Sink> open_emu_sink(const ContentGenerator& gen, uint64_t size) {
  return std::make_unique<EmuSink>(gen, size);
}

}  // namespace dstx::io
