// Writes emulated device state to a file: make_state PROFILE SIZE SEED OUT.
// "binary-real" concatenates real executables and libraries found on this machine instead.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "io/content.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: make_state PROFILE|binary-real SIZE_BYTES SEED OUT\n");
    return 2;
  }
  const std::string profile_name = argv[1];
  const uint64_t size = std::strtoull(argv[2], nullptr, 10);
  const uint64_t seed = std::strtoull(argv[3], nullptr, 10);
  std::ofstream out(argv[4], std::ios::binary | std::ios::trunc);
  if (!out) {
    std::perror(argv[4]);
    return 1;
  }
  std::vector<char> buf(1 << 20);
  uint64_t written = 0;
  if (profile_name == "binary-real") {
    // Real machine code: /usr/bin and /usr/lib files, in a stable order, until `size` bytes.
    std::vector<std::filesystem::path> files;
    for (const char* dir : {"/usr/bin", "/usr/lib/x86_64-linux-gnu"}) {
      std::error_code ec;
      for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
        if (e.is_regular_file(ec) && e.file_size(ec) > 4096) files.push_back(e.path());
      }
    }
    std::sort(files.begin(), files.end());
    while (written < size && !files.empty()) {
      for (const auto& f : files) {
        std::ifstream in(f, std::ios::binary);
        while (written < size && in) {
          in.read(buf.data(), std::streamsize(std::min<uint64_t>(buf.size(), size - written)));
          out.write(buf.data(), in.gcount());
          written += uint64_t(in.gcount());
        }
        if (written >= size) break;
      }
    }
    return written == size ? 0 : 1;
  }
  dstx::io::Profile profile;
  if (!dstx::io::profile_from_name(profile_name, &profile)) {
    std::fprintf(stderr, "make_state: unknown profile '%s' (%s, binary-real)\n", profile_name.c_str(),
                 std::string(dstx::io::profile_names()).c_str());
    return 2;
  }
  const dstx::io::ContentGenerator gen(profile, seed);
  while (written < size) {
    const size_t n = size_t(std::min<uint64_t>(buf.size(), size - written));
    gen.fill(written, std::span(reinterpret_cast<std::byte*>(buf.data()), n));
    out.write(buf.data(), std::streamsize(n));
    written += n;
  }
  return 0;
}
