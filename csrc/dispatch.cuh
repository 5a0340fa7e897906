// Dispatch on the (parameter, gradient) dtype pair: gradients are float32 or the params' dtype.
#pragma once

#include <ATen/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "check_message.h"

namespace magma {

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_param_grad(at::ScalarType param, at::ScalarType grad, F&& f) {
  auto with_grad = [&](auto param_tag) {
    using P = typename decltype(param_tag)::type;
    if (grad == at::kFloat) return f(Tag<P>{}, Tag<float>{});
    MAGMA_CHECK(grad == param, "magma_ext: gradients must be float32 or the parameters' dtype (",
                param, "), got ", grad);
    return f(Tag<P>{}, Tag<P>{});
  };
  switch (param) {
    case at::kFloat: return with_grad(Tag<float>{});
    case at::kBFloat16: return with_grad(Tag<__nv_bfloat16>{});
    case at::kHalf: return with_grad(Tag<__half>{});
    default: MAGMA_CHECK(false, "magma_ext: parameters must be float32, bfloat16 or float16, got ", param);
  }
}

}  // namespace magma
