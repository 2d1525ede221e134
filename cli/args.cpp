#include "cli/args.h"

#include <charconv>

#include "engine/spec.h"

namespace dstx::cli {

Args::Args(const std::vector<std::string>& argv, const std::set<std::string>& with_value,
           const std::set<std::string>& flags) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + a + "'");
    std::string name = a.substr(2);
    std::optional<std::string> value;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (flags.count(name)) {
      if (value) throw UsageError("--" + name + " takes no value");
      values_[name] = "";
    } else if (with_value.count(name)) {
      if (!value) {
        if (i + 1 >= argv.size()) throw UsageError("--" + name + " needs a value");
        value = argv[++i];
      }
      values_[name] = *value;
    } else {
      throw UsageError("unknown option --" + name);
    }
  }
}

std::optional<std::string> Args::get(const std::string& name) const {
  const auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::string Args::require(const std::string& name) const {
  auto v = get(name);
  if (!v || v->empty()) throw UsageError("missing --" + name);
  return *v;
}

int Args::get_int(const std::string& name, int fallback, int min, int max) const {
  const auto v = get(name);
  if (!v) return fallback;
  int n = 0;
  const auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
  if (ec != std::errc() || end != v->data() + v->size() || n < min || n > max) {
    throw UsageError("--" + name + " '" + *v + "': expected a whole number from " + std::to_string(min) +
                     " to " + std::to_string(max));
  }
  return n;
}

unsigned Args::get_unsigned(const std::string& name, unsigned fallback, unsigned min, unsigned max) const {
  return unsigned(get_int(name, int(fallback), int(min), int(max)));
}

uint64_t Args::get_size(const std::string& name, uint64_t fallback) const {
  const auto v = get(name);
  if (!v) return fallback;
  try {
    return engine::parse_size(*v);
  } catch (const std::exception& e) {
    throw UsageError("--" + name + ": " + e.what());
  }
}

}  // namespace dstx::cli
