// MAGMA_CHECK: TORCH_CHECK with a message built without std::ostream's number formatting.
//
// NOTE: [error messages without ostream numbers]
// On the GPU machine's image (H100, 2026-11-25) streaming an integer into a std::ostream from
// this extension crashed inside the locale's num_put (a segfault in TORCH_CHECK's message,
// never reached before the op's error-input test): the libstdc++ the process runs and the one
// the extension was compiled against disagree there.  Messages are therefore put together
// here: numbers with std::to_string, torch's types through functions compiled into libc10,
// and TORCH_CHECK gets one finished string.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <type_traits>

namespace magma {

inline std::string to_text(const char* text) { return text; }
inline std::string to_text(std::string_view text) { return std::string(text); }
inline std::string to_text(const std::string& text) { return text; }
inline std::string to_text(const c10::Device& device) { return device.str(); }
inline std::string to_text(at::ScalarType type) { return c10::toString(type); }
inline std::string to_text(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
std::string to_text(T number) {
  return std::to_string(number);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string text;
  ((text += to_text(parts)), ...);
  return text;
}

}  // namespace magma

#define MAGMA_CHECK(cond, ...) TORCH_CHECK(cond, ::magma::message(__VA_ARGS__))
