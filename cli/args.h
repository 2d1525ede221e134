// A small command-line parser: "--name value", "--name=value" and flags; unknown options are usage errors.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace dstx::cli {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Args {
 public:
  // `with_value`: options that take a value; `flags`: options that do not.
  Args(const std::vector<std::string>& argv, const std::set<std::string>& with_value,
       const std::set<std::string>& flags);
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::optional<std::string> get(const std::string& name) const;
  std::string require(const std::string& name) const;  // throws UsageError("missing --name")
  unsigned get_unsigned(const std::string& name, unsigned fallback, unsigned min, unsigned max) const;
  int get_int(const std::string& name, int fallback, int min, int max) const;
  uint64_t get_size(const std::string& name, uint64_t fallback) const;  // K/M/G suffixes

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace dstx::cli
