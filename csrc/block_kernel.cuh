// The single-pass kernel for blocks small enough for one CTA (mask "magma", whole blocks).
//
// One CTA owns one block: it draws the block's mask first (the mask does not depend on the
// data), loads gradient and moments into registers, writes the new moments, reduces the
// block's sums (and writes them to the block's row of block_sums when the split step asks for
// them), updates the score and, only if the block is kept, reads and writes its weights.
// Traffic: 20 B/param for float32 plus 8 B/param for kept blocks.
//
// A thread's ELEMS elements are THREADS apart for float32 moments; where a moment is rounded
// they are runs of kILP consecutive elements (NOTE: [the rounding stream]), loaded with vector
// accesses where every pointer is aligned.
#pragma once

#include <cstdint>

#include "element_access.cuh"
#include "launch.h"
#include "magma_math.cuh"
#include "philox.cuh"

namespace magma {

// THREADS x ELEMS elements per CTA: the largest block a configuration holds.
template <int THREADS, int ELEMS>
struct BlockConfig {
  static_assert(ELEMS % kILP == 0, "a thread's elements are whole runs of kILP");
  static constexpr int kThreads = THREADS;
  static constexpr int kElems = ELEMS;
  static constexpr int64_t kCapacity = static_cast<int64_t>(THREADS) * ELEMS;
};

// The configurations of the single-pass kernel, smallest first (launch.h names them).
using BlocksUpTo128 = BlockConfig<32, 4>;
using BlocksUpTo512 = BlockConfig<128, 4>;
using BlocksUpTo2048 = BlockConfig<256, 8>;
using BlocksUpTo8192 = BlockConfig<512, 16>;
static_assert(BlocksUpTo128::kCapacity == 128 && BlocksUpTo512::kCapacity == 512 &&
                  BlocksUpTo2048::kCapacity == 2048 && BlocksUpTo8192::kCapacity == 8192,
              "each configuration holds the blocks its name says");
static_assert(BlocksUpTo8192::kCapacity == kMaxSinglePassBlock, "the largest configuration sets the limit");

// The element of the block that a thread's k-th slot holds: strided (RUNS false) or in runs of
// kILP consecutive elements (RUNS true).
template <bool RUNS, int THREADS>
__device__ __forceinline__ int block_element(int k) {
  return RUNS ? kILP * (threadIdx.x + (k / kILP) * THREADS) + k % kILP : threadIdx.x + k * THREADS;
}

// Loads a thread's ELEMS elements of a block of `length` (in runs: `vec` where aligned).
template <bool RUNS, int THREADS, int ELEMS, typename T>
__device__ __forceinline__ void load_block(const T* p, int length, bool vec, float* out) {
#pragma unroll
  for (int k = 0; k < ELEMS; k += RUNS ? kILP : 1) {
    const int i = block_element<RUNS, THREADS>(k);
    if (!RUNS) {
      if (i < length) out[k] = to_float(p[i]);
    } else if (vec && i + kILP <= length) {
      load_ilp<true>(p, i, 1, length, out + k);
    } else {
      load_ilp<false>(p, i, 1, length, out + k);
    }
  }
}

template <bool RUNS, int THREADS, int ELEMS, typename T>
__device__ __forceinline__ void store_block(T* p, int length, bool vec, const float* in) {
#pragma unroll
  for (int k = 0; k < ELEMS; k += RUNS ? kILP : 1) {
    const int i = block_element<RUNS, THREADS>(k);
    if (!RUNS) {
      if (i < length) p[i] = from_float<T>(in[k]);
    } else if (vec && i + kILP <= length) {
      store_ilp<true>(p, i, 1, length, in + k);
    } else {
      store_ilp<false>(p, i, 1, length, in + k);
    }
  }
}

// The CTAs of THREADS threads that each SM must hold at once: four of 256 threads (64 registers
// each; left to itself ptxas for sm_90 gives this configuration 71 registers in float32 and
// about 104 where the rounding stream runs, so three or two CTAs), else what the registers allow.
template <int THREADS>
constexpr int kBlockMinCtas = THREADS == 256 ? 4 : 1;

// block_sums: nullptr, or the split step's buffer (TensorArgs::sum_row) for the block's sums.
template <typename P, typename G, typename M, typename V, int THREADS, int ELEMS>
__global__ void __launch_bounds__(THREADS, kBlockMinCtas<THREADS>)
block_kernel(const __grid_constant__ TensorArgs a, const StepHyper h, float* block_sums) {
  static_assert(THREADS % 32 == 0 && THREADS / 32 <= kSum3MaxWarps, "block_sum3 takes up to 32 whole warps");
  constexpr bool kRound = kRounded<M> || kRounded<V>;
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

  const TensorPtrs<P, G, M, V> all(a, t);
  P* param = all.param + begin;
  const G* grad = all.grad + begin;
  M* exp_avg = all.exp_avg + begin;
  V* exp_avg_sq = all.exp_avg_sq + begin;
  float* master = all.master ? all.master + begin : nullptr;
  const bool vec = kRound && all.vectorizable(begin);  // uniform over the CTA

  float g[ELEMS], m[ELEMS], v[ELEMS], theta[ELEMS], direction[ELEMS];
  load_block<kRound, THREADS, ELEMS>(grad, length, vec, g);
  load_block<kRound, THREADS, ELEMS>(exp_avg, length, vec, m);
  load_block<kRound, THREADS, ELEMS>(exp_avg_sq, length, vec, v);
  if (keep) {
    if (master) load_block<kRound, THREADS, ELEMS>(master, length, vec, theta);
    else load_block<kRound, THREADS, ELEMS>(param, length, vec, theta);
  }
  const RoundingStream stream = rounding_stream(h, a, t, c);
  uint32_t words[kILP] = {};  // of the current run
  float dot = 0.f, m_sq = 0.f, g_sq = 0.f;
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) {
    const int i = block_element<kRound, THREADS>(k);
    if (kRound && k % kILP == 0 && i < length) stream.words4(begin + i, words);
    if (i < length) {
      g[k] = unscale_grad(g[k], h);
      direction[k] = update_moments<M, V>(h, c, g[k], m[k], v[k], words[k % kILP]);
      dot += m[k] * g[k];
      m_sq += m[k] * m[k];
      g_sq += g[k] * g[k];
    }
  }
  store_block<kRound, THREADS, ELEMS>(exp_avg, length, vec, m);
  store_block<kRound, THREADS, ELEMS>(exp_avg_sq, length, vec, v);
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
    if (block_element<kRound, THREADS>(k) < length) theta[k] = updated_theta(h, c, theta[k], direction[k], scale);
  }
  if (master) store_block<kRound, THREADS, ELEMS>(master, length, vec, theta);
  store_block<kRound, THREADS, ELEMS>(param, length, vec, theta);
}

}  // namespace magma
