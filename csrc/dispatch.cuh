// Dispatch on the (parameter, gradient) dtype pair, gradients float32 or the params' dtype, and
// on the (exp_avg, exp_avg_sq) pair, each float32 or bfloat16.
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

template <typename F>
void dispatch_moments(at::ScalarType exp_avg, at::ScalarType exp_avg_sq, F&& f) {
  auto with_exp_avg_sq = [&](auto exp_avg_tag) {
    switch (exp_avg_sq) {
      case at::kFloat: return f(exp_avg_tag, Tag<float>{});
      case at::kBFloat16: return f(exp_avg_tag, Tag<__nv_bfloat16>{});
      default: MAGMA_CHECK(false, "magma_ext: exp_avg_sqs must be float32 or bfloat16, got ", exp_avg_sq);
    }
  };
  switch (exp_avg) {
    case at::kFloat: return with_exp_avg_sq(Tag<float>{});
    case at::kBFloat16: return with_exp_avg_sq(Tag<__nv_bfloat16>{});
    default: MAGMA_CHECK(false, "magma_ext: exp_avgs must be float32 or bfloat16, got ", exp_avg);
  }
}

}  // namespace magma
