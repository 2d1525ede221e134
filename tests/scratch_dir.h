// A test's scratch directory: fresh and unique (mkdtemp under the temporary directory, so parallel test
// processes and repeated tests never share one), and removed with everything in it when the object goes,
// also when a failed assertion ends the test early.
#pragma once

#include <stdlib.h>

#include <cerrno>
#include <filesystem>
#include <string>
#include <system_error>

namespace dstx::test {

class ScratchDir {
 public:
  // `tag` starts the directory's name (dstx-transfer-Ab12Cd), to tell whose it is when one is left behind;
  // `under` is where it goes (default: the temporary directory).
  explicit ScratchDir(const std::string& tag = "dstx-test", const std::filesystem::path& under = {}) {
    const std::filesystem::path base = under.empty() ? std::filesystem::temp_directory_path() : under;
    std::string name = (base / (tag + "-XXXXXX")).string();
    if (::mkdtemp(name.data()) == nullptr) {
      throw std::system_error(errno, std::generic_category(), "mkdtemp " + name);
    }
    path_ = name;
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace dstx::test
