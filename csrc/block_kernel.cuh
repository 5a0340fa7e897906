// The single-pass kernel for blocks small enough for one CTA (mask "magma", whole blocks).
//
// One CTA owns one block: it draws the block's mask first (the mask does not depend on the
// data), loads gradient and moments into registers, writes the new moments, reduces the
// block's sums (and writes them to the block's row of block_sums when the split step asks for
// them), updates the score and, only if the block is kept, reads and writes its weights.
// Traffic: 20 B/param for float32 plus 8 B/param for kept blocks.
#pragma once

#include <cstdint>

#include "magma_math.cuh"
#include "philox.cuh"

namespace magma {

// THREADS x ELEMS elements per CTA: the largest block a configuration holds.
template <int THREADS, int ELEMS>
struct BlockConfig {
  static constexpr int kThreads = THREADS;
  static constexpr int kElems = ELEMS;
  static constexpr int64_t kCapacity = static_cast<int64_t>(THREADS) * ELEMS;
};

// block_sums: nullptr, or the split step's buffer (TensorArgs::sum_row) for the block's sums.
template <typename P, typename G, int THREADS, int ELEMS>
__global__ void __launch_bounds__(THREADS)
block_kernel(const __grid_constant__ TensorArgs a, const StepHyper h, float* block_sums) {
  static_assert(THREADS % 32 == 0 && THREADS / 32 <= kSum3MaxWarps, "block_sum3 takes up to 32 whole warps");
  if (step_skipped(h)) return;
  __shared__ float scratch[kSum3Scratch];
  __shared__ float shared_scale;
  const int64_t unit = blockIdx.x;
  const int t = find_tensor(a.work_start, a.count, unit);
  const int64_t j = unit - a.work_start[t];
  const Piece& piece = a.piece[t];
  const int64_t begin = block_begin(piece, j);
  const int length = static_cast<int>(block_length(piece, j));
  float* score = a.score[t] + j;
  const float old_score = threadIdx.x == 0 ? *score : 0.f;  // loaded early: off the critical path
  const Coeffs c = coeffs_for(h, a.step[t]);
  const bool keep = keep_block(h.seed, a.tensor_index[t], a.first_block[t] + j, c.step, h.keep_threshold);

  P* param = static_cast<P*>(a.param[t]) + begin;
  const G* grad = static_cast<const G*>(a.grad[t]) + begin;
  float* exp_avg = a.exp_avg[t] + begin;
  float* exp_avg_sq = a.exp_avg_sq[t] + begin;
  float* master = a.master[t] ? a.master[t] + begin : nullptr;

  float g[ELEMS], m[ELEMS], v[ELEMS], theta[ELEMS], direction[ELEMS];
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) {
    const int i = threadIdx.x + k * THREADS;
    if (i < length) {
      g[k] = load_grad(grad, i, h);
      m[k] = exp_avg[i];
      v[k] = exp_avg_sq[i];
      if (keep) theta[k] = load_theta(param, master, i);
    }
  }
  float dot = 0.f, m_sq = 0.f, g_sq = 0.f;
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) {
    const int i = threadIdx.x + k * THREADS;
    if (i < length) {
      direction[k] = update_moments(h, c, g[k], m[k], v[k]);
      exp_avg[i] = m[k];
      exp_avg_sq[i] = v[k];
      dot += m[k] * g[k];
      m_sq += m[k] * m[k];
      g_sq += g[k] * g[k];
    }
  }
  const float3 total = block_sum3(dot, m_sq, g_sq, scratch);
  if (threadIdx.x == 0) {
    if (block_sums != nullptr) store_sums(block_sums, a.sum_row[t] + j, total);
    shared_scale = new_score(h, old_score, total.x, total.y, total.z);
    *score = shared_scale;
  }
  if (!keep) return;  // uniform over the CTA
  __syncthreads();
  const float scale = shared_scale;
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) {
    const int i = threadIdx.x + k * THREADS;
    if (i < length) store_theta(param, master, i, updated_theta(h, c, theta[k], direction[k], scale));
  }
}

}  // namespace magma
