// Loads and stores of four elements per thread, converted to and from float: one vector access
// where the four are consecutive and aligned, else scalar accesses (used by every kernel).
#pragma once

#include <cstdint>

#include "magma_math.cuh"

namespace magma {

// Elements a thread takes per iteration: one Vec4, and one Philox block of the rounding stream.
constexpr int kILP = 4;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T x[4];
};

template <typename T>
__device__ __forceinline__ bool aligned4(const T* p, int64_t i) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p + i) % sizeof(Vec4<T>) == 0;
}

// The pointers of tensor t of a launch, typed: parameters P, gradients G, moments M and V.
template <typename P, typename G, typename M, typename V>
struct TensorPtrs {
  P* param;
  const G* grad;
  M* exp_avg;
  V* exp_avg_sq;
  float* master;
  __device__ TensorPtrs(const TensorArgs& a, int t)
      : param(static_cast<P*>(a.param[t])), grad(static_cast<const G*>(a.grad[t])),
        exp_avg(static_cast<M*>(a.exp_avg[t])), exp_avg_sq(static_cast<V*>(a.exp_avg_sq[t])),
        master(a.master[t]) {}
  // Whether every pointer takes a vector access at element i.
  __device__ bool vectorizable(int64_t i) const {
    return aligned4(param, i) && aligned4(grad, i) && aligned4(exp_avg, i) &&
           aligned4(exp_avg_sq, i) && aligned4(master, i);
  }
};

// Loads kILP elements: consecutive ones with one vector access each (VEC), or elements
// `stride` apart, masked by `end` (0 past it).
template <bool VEC, typename T>
__device__ __forceinline__ void load_ilp(const T* p, int64_t i, int64_t stride, int64_t end, float* out) {
  if (VEC) {
    const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < kILP; ++k) out[k] = to_float(v.x[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) out[k] = i + k * stride < end ? to_float(p[i + k * stride]) : 0.f;
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_ilp(T* p, int64_t i, int64_t stride, int64_t end, const float* in) {
  if (VEC) {
    Vec4<T> v;
#pragma unroll
    for (int k = 0; k < kILP; ++k) v.x[k] = from_float<T>(in[k]);
    *reinterpret_cast<Vec4<T>*>(p + i) = v;
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      if (i + k * stride < end) p[i + k * stride] = from_float<T>(in[k]);
  }
}

}  // namespace magma
