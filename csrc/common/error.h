// Errors that cross into Python as ValueError (hotops::Error) with a message that says what was
// wrong and what was expected. Kernels never trust their caller: every entry point checks its views.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace hotops {

struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  detail::append(os, parts...);
  throw Error(os.str());
}

}  // namespace hotops

#define HOTOPS_CHECK(cond, ...)               \
  do {                                        \
    if (!(cond)) ::hotops::fail(__VA_ARGS__); \
  } while (0)
