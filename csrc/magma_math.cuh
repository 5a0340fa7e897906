// Device code shared by every kernel: the per-element math of the Magma step
// (docs/ALGORITHM.md sections 1, 2, 5, 6), the score, the CTA-wide sum of the alignment sums and
// the lookup of a work unit's tensor.  The math follows magma_ext/reference.py's order of
// operations with every rounding spelled out (__fmul_rn, __fadd_rn, fmaf), so that nvcc cannot
// contract one instantiation (parameter, gradient and state dtypes) differently from another:
// the float32 moments a bfloat16 state rounds are the ones a float32 state keeps.  The moments
// take the foreach ops' forms (x * beta + alpha * y as one fused multiply-add); the reference
// run on CPU, or block sums reduced in another order, still differ by a few float32 roundings
// (tests/cuda_helpers.py states the tolerances).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "rounding.cuh"
#include "tensor_args.h"

namespace magma {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Per-tensor constants of a step: bias corrections from the tensor's step count, and the lr.
struct Coeffs {
  float bias1, bias2, lr;
  uint64_t step;
};

// The step count t of a tensor (held as a float, like torch's fused Adam).
__device__ __forceinline__ uint64_t step_count(const float* step_ptr) {
  return static_cast<uint64_t>(*step_ptr);
}

__device__ __forceinline__ Coeffs coeffs_for(const StepHyper& h, const float* step_ptr) {
  const float step = *step_ptr;
  Coeffs c;
  c.bias1 = 1.f - powf(h.beta1, step);
  c.bias2 = 1.f - powf(h.beta2, step);
  c.lr = h.lr_ptr ? *h.lr_ptr : h.lr;
  c.step = static_cast<uint64_t>(step);
  return c;
}

__device__ __forceinline__ bool step_skipped(const StepHyper& h) {
  return h.found_inf != nullptr && *h.found_inf > 0.f;
}

// The gradient without AMP's loss scale.
__device__ __forceinline__ float unscale_grad(float g, const StepHyper& h) {
  return h.grad_scale ? g / *h.grad_scale : g;
}

template <typename G>
__device__ __forceinline__ float load_grad(const G* grad, int64_t i, const StepHyper& h) {
  return unscale_grad(to_float(grad[i]), h);
}

// Updates the moments of one element in place, as their state (M, V: float or __nv_bfloat16)
// stores them, and returns its direction D (section 2).  Each new moment is taken as stored
// before anything uses it (section 6): v, then m (LaProp's m reads the stored v), then D.
// `word`: the element's word of the rounding stream (unused for float32 state).
template <typename M, typename V>
__device__ __forceinline__ float update_moments(const StepHyper& h, const Coeffs& c, float g,
                                                float& m, float& v, uint32_t word) {
  v = as_stored<V>(fmaf(h.one_minus_beta2, __fmul_rn(g, g), __fmul_rn(v, h.beta2)), word >> 16);
  const float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(v, c.bias2)), h.eps);
  if (h.base == kLaprop) {
    m = as_stored<M>(fmaf(h.one_minus_beta1, __fdiv_rn(g, denom), __fmul_rn(m, h.beta1)), word & 0xFFFFu);
    return __fdiv_rn(m, c.bias1);
  }
  m = as_stored<M>(fmaf(h.one_minus_beta1, g, __fmul_rn(m, h.beta1)), word & 0xFFFFu);
  return h.base == kAdam ? __fdiv_rn(__fdiv_rn(m, c.bias1), denom) : __fdiv_rn(g, denom);
}

// The rounding stream of tensor t of a launch at this step.
__device__ __forceinline__ RoundingStream rounding_stream(const StepHyper& h, const TensorArgs& a,
                                                          int t, const Coeffs& c) {
  return RoundingStream{h.seed ^ kRoundingKey, a.tensor_index[t], c.step, a.offset[t]};
}

// The direction D from moments that are already updated (the apply pass of two-pass blocks).
__device__ __forceinline__ float direction_from_moments(const StepHyper& h, const Coeffs& c,
                                                        float g, float m, float v) {
  if (h.base == kLaprop) return __fdiv_rn(m, c.bias1);
  const float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(v, c.bias2)), h.eps);
  return h.base == kAdam ? __fdiv_rn(__fdiv_rn(m, c.bias1), denom) : __fdiv_rn(g, denom);
}

// theta - lr * scale * (D + weight_decay * theta)   (sections 1.4 and 1.5)
__device__ __forceinline__ float updated_theta(const StepHyper& h, const Coeffs& c, float theta,
                                               float direction, float scale) {
  const float update = __fmul_rn(__fadd_rn(direction, __fmul_rn(theta, h.weight_decay)), scale);
  return __fsub_rn(theta, __fmul_rn(update, c.lr));
}

// The weights an update reads: the float32 master copy if there is one, else the parameter.
template <typename P>
__device__ __forceinline__ float load_theta(const P* param, const float* master, int64_t i) {
  return master ? master[i] : to_float(param[i]);
}

template <typename P>
__device__ __forceinline__ void store_theta(P* param, float* master, int64_t i, float theta) {
  if (master) master[i] = theta;
  param[i] = from_float<P>(theta);
}

// New score of a block from its sums <m, g>, ||m||^2, ||g||^2 (section 1.2).
// A block whose sums are not all finite keeps its score (docs/ALGORITHM.md section 7).
__device__ __forceinline__ float new_score(const StepHyper& h, float old_score, float dot,
                                           float m_sq, float g_sq) {
  if (!(isfinite(dot) && isfinite(m_sq) && isfinite(g_sq))) return old_score;
  const float cosine = (m_sq > 0.f && g_sq > 0.f) ? dot / (sqrtf(m_sq) * sqrtf(g_sq)) : 0.f;
  const float instant = 1.f / (1.f + expf(-(cosine / h.tau)));
  return h.score_ema * old_score + (1.f - h.score_ema) * instant;
}

// block_sum3's shared-memory scratch: three floats per warp of a CTA of up to 1024 threads.
constexpr int kSum3MaxWarps = 32;
constexpr int kSum3Scratch = 3 * kSum3MaxWarps;

// Deterministic sum of three values over a CTA of whole warps; the result is valid in thread 0.
__device__ __forceinline__ float3 block_sum3(float a, float b, float c, float (&shared)[kSum3Scratch]) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
    c += __shfl_xor_sync(0xffffffffu, c, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = (blockDim.x + 31) / 32;
  if (warps == 1) return make_float3(a, b, c);
  if (lane == 0) {
    shared[3 * warp] = a;
    shared[3 * warp + 1] = b;
    shared[3 * warp + 2] = c;
  }
  __syncthreads();
  float3 sum = make_float3(0.f, 0.f, 0.f);
  if (warp == 0) {
    if (lane < warps) sum = make_float3(shared[3 * lane], shared[3 * lane + 1], shared[3 * lane + 2]);
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum.x += __shfl_xor_sync(0xffffffffu, sum.x, offset);
      sum.y += __shfl_xor_sync(0xffffffffu, sum.y, offset);
      sum.z += __shfl_xor_sync(0xffffffffu, sum.z, offset);
    }
  }
  return sum;
}

// Row `row` of a block-sum buffer: <m, g>, ||m||^2, ||g||^2 of one block.
__device__ __forceinline__ void store_sums(float* block_sums, int64_t row, float3 sums) {
  block_sums[3 * row] = sums.x;
  block_sums[3 * row + 1] = sums.y;
  block_sums[3 * row + 2] = sums.z;
}

__device__ __forceinline__ float3 load_sums(const float* block_sums, int64_t row) {
  return make_float3(block_sums[3 * row], block_sums[3 * row + 1], block_sums[3 * row + 2]);
}

// The tensor of a launch that work unit `unit` belongs to.
__device__ __forceinline__ int find_tensor(const int64_t* starts, int count, int64_t unit) {
  int low = 0, high = count - 1;
  while (low < high) {
    const int mid = (low + high + 1) / 2;
    if (starts[mid] <= unit) low = mid; else high = mid - 1;
  }
  return low;
}

}  // namespace magma
