// The chunked passes.  A work item is at most kChunk elements of one block of one tensor.
//
//   one_pass_kernel      masks "none" and "skip", every item: the whole step in one pass, dense
//                        moments and the update ("skip": scaled by 1/keep_prob, kept blocks only).
//   moments_sums_kernel  mask "magma", first pass, every item: dense moments, and the item's
//                        sums <m,g>, |m|^2, |g|^2 (deterministic) into the item-sum buffer.
//   finalize_kernel      mask "magma", every block, in up to two parts:
//                          sums:  add its items' sums in a fixed order into the block's row of a
//                                 block-sum buffer (or, without item sums, read that row: the
//                                 caller may have all-reduced it across ranks);
//                          score: score EMA, mask draw and the scale of the block (kMaskedBlock
//                                 for a masked block).
//                        The whole step runs both parts in one launch; the split step
//                        (moments_partials, finalize_apply) runs one in each op.
//   apply_kernel         mask "magma", second pass, every item of a kept block: read weights and
//                        moments, write weights.  A fixed grid of resident CTAs strides over the
//                        items and steps over those of masked blocks, whose weights are never
//                        touched: launching one CTA per item would spend most of a low keep_prob
//                        step starting CTAs that do nothing.
//
// The kernels that touch the moments are templated on their storage types M and V (float or
// __nv_bfloat16); update_moments gives a moment's new value as its state stores it, and the
// apply pass reads it back from there.
#pragma once

#include <cstdint>
#include <type_traits>

#include "element_access.cuh"
#include "magma_math.cuh"
#include "philox.cuh"

namespace magma {

constexpr int kChunkThreads = 512;
constexpr int kFinalizeThreads = 256;
static_assert(kChunkThreads % 32 == 0 && kChunkThreads / 32 <= kSum3MaxWarps &&
                  kFinalizeThreads % 32 == 0 && kFinalizeThreads / 32 <= kSum3MaxWarps,
              "block_sum3 takes up to 32 whole warps");

// The scale finalize_kernel writes for a masked block (a score is never negative).
constexpr float kMaskedBlock = -1.f;

// Elements [begin, end) of one item, kILP per thread per iteration: new moments, then with SUMS
// the alignment sums added to `sums`, and with `apply` the update (scaled by `scale`).  VEC:
// consecutive elements with vector accesses (the range must be a whole number of vectors).
// Else scalar accesses: to elements blockDim.x apart for float32 state, to runs of kILP
// consecutive elements where a moment is rounded (one Philox block of the rounding stream
// serves a run, NOTE: [the rounding stream]).
template <bool SUMS, bool VEC, typename P, typename G, typename M, typename V>
__device__ __forceinline__ void moments_range(const TensorPtrs<P, G, M, V>& t, const StepHyper& h,
                                              const Coeffs& c, const RoundingStream& stream,
                                              int64_t begin, int64_t end, bool apply, float scale,
                                              float3& sums) {
  constexpr bool kRound = kRounded<M> || kRounded<V>;
  constexpr bool kRuns = VEC || kRound;
  const int64_t stride = kRuns ? 1 : blockDim.x;
  const int64_t first = begin + (kRuns ? kILP : 1) * static_cast<int64_t>(threadIdx.x);
  for (int64_t i = first; i < end; i += static_cast<int64_t>(kILP) * blockDim.x) {
    float g[kILP], m[kILP], v[kILP], theta[kILP];
    uint32_t words[kILP] = {};
    load_ilp<VEC>(t.grad, i, stride, end, g);
    load_ilp<VEC>(t.exp_avg, i, stride, end, m);
    load_ilp<VEC>(t.exp_avg_sq, i, stride, end, v);
    if (apply) {
      if (t.master) load_ilp<VEC>(t.master, i, stride, end, theta);
      else load_ilp<VEC>(t.param, i, stride, end, theta);
    }
    if constexpr (kRound) stream.words4(i, words);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      g[k] = unscale_grad(g[k], h);
      const float direction = update_moments<M, V>(h, c, g[k], m[k], v[k], words[k]);
      if (SUMS && (VEC || i + k * stride < end)) {
        sums.x += m[k] * g[k];
        sums.y += m[k] * m[k];
        sums.z += g[k] * g[k];
      }
      if (apply) theta[k] = updated_theta(h, c, theta[k], direction, scale);
    }
    store_ilp<VEC>(t.exp_avg, i, stride, end, m);
    store_ilp<VEC>(t.exp_avg_sq, i, stride, end, v);
    if (apply) {
      if (t.master) store_ilp<VEC>(t.master, i, stride, end, theta);
      store_ilp<VEC>(t.param, i, stride, end, theta);
    }
  }
}

// Runs `body<VEC>(begin, end)` over an item: the bulk with vector accesses when every pointer
// is aligned there, the rest with strided scalar accesses.
template <typename P, typename G, typename M, typename V, typename Body>
__device__ __forceinline__ void for_item(const TensorPtrs<P, G, M, V>& t, const Span& s, Body body) {
  const int64_t end = s.begin + s.length;
  if (t.vectorizable(s.begin)) {
    const int64_t bulk_end = s.begin + (s.length / kILP) * kILP;
    body(std::true_type{}, s.begin, bulk_end);
    body(std::false_type{}, bulk_end, end);
  } else {
    body(std::false_type{}, s.begin, end);
  }
}

// Masks "none" and "skip": one CTA per item does the whole step of its elements.
template <typename P, typename G, typename M, typename V, int MASK>
__global__ void __launch_bounds__(kChunkThreads)
one_pass_kernel(const __grid_constant__ TensorArgs a, const StepHyper h) {
  static_assert(MASK == kNone || MASK == kSkip, "mask \"magma\" takes moments_sums_kernel");
  if (step_skipped(h)) return;
  const int64_t item = blockIdx.x;
  const int t = find_tensor(a.work_start, a.count, item);
  const Span s = item_span(a.piece[t], item - a.work_start[t]);
  const Coeffs c = coeffs_for(h, a.step[t]);
  bool apply = true;
  float scale = 1.f;
  if (MASK == kSkip) {
    apply = keep_block(h.seed, a.tensor_index[t], a.first_block[t] + s.block, c.step, h.keep_threshold);
    scale = h.inv_keep_prob;
  }
  const TensorPtrs<P, G, M, V> ptrs(a, t);
  const RoundingStream stream = rounding_stream(h, a, t, c);
  float3 unused = make_float3(0.f, 0.f, 0.f);
  for_item(ptrs, s, [&](auto vec, int64_t begin, int64_t end) {
    moments_range<false, decltype(vec)::value>(ptrs, h, c, stream, begin, end, apply, scale, unused);
  });
}

// Mask "magma", first pass: one CTA per item writes the item's moments and its three sums.
template <typename P, typename G, typename M, typename V>
__global__ void __launch_bounds__(kChunkThreads)
moments_sums_kernel(const __grid_constant__ TensorArgs a, const StepHyper h, float* item_sums) {
  if (step_skipped(h)) return;
  __shared__ float scratch[kSum3Scratch];
  const int64_t item = blockIdx.x;
  const int t = find_tensor(a.work_start, a.count, item);
  const Span s = item_span(a.piece[t], item - a.work_start[t]);
  const Coeffs c = coeffs_for(h, a.step[t]);
  const TensorPtrs<P, G, M, V> ptrs(a, t);
  const RoundingStream stream = rounding_stream(h, a, t, c);
  float3 sums = make_float3(0.f, 0.f, 0.f);
  for_item(ptrs, s, [&](auto vec, int64_t begin, int64_t end) {
    moments_range<true, decltype(vec)::value>(ptrs, h, c, stream, begin, end, false, 1.f, sums);
  });
  const float3 total = block_sum3(sums.x, sums.y, sums.z, scratch);
  if (threadIdx.x == 0) store_sums(item_sums, item, total);
}

template <bool VEC, typename P, typename G, typename M, typename V>
__device__ __forceinline__ void apply_range(const TensorPtrs<P, G, M, V>& t, const StepHyper& h,
                                            const Coeffs& c, int64_t begin, int64_t end, float scale) {
  const int64_t stride = VEC ? 1 : blockDim.x;
  const int64_t first = begin + (VEC ? kILP : 1) * static_cast<int64_t>(threadIdx.x);
  for (int64_t i = first; i < end; i += static_cast<int64_t>(kILP) * blockDim.x) {
    float g[kILP] = {}, m[kILP], v[kILP], theta[kILP];
    if (h.base == kRmsprop) load_ilp<VEC>(t.grad, i, stride, end, g);
    load_ilp<VEC>(t.exp_avg, i, stride, end, m);
    if (h.base != kLaprop) load_ilp<VEC>(t.exp_avg_sq, i, stride, end, v);
    if (t.master) load_ilp<VEC>(t.master, i, stride, end, theta);
    else load_ilp<VEC>(t.param, i, stride, end, theta);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      g[k] = unscale_grad(g[k], h);
      const float direction = direction_from_moments(h, c, g[k], m[k], v[k]);
      theta[k] = updated_theta(h, c, theta[k], direction, scale);
    }
    if (t.master) store_ilp<VEC>(t.master, i, stride, end, theta);
    store_ilp<VEC>(t.param, i, stride, end, theta);
  }
}

// Items run in reverse order, so the first ones read the moments the moments pass wrote last,
// which are most likely still in L2.  The grid is what fits on the device at once; each CTA
// takes every gridDim.x-th item and steps over the rest of a masked block in one go.
template <typename P, typename G, typename M, typename V>
__global__ void __launch_bounds__(kChunkThreads)
apply_kernel(const __grid_constant__ TensorArgs a, const StepHyper h, const float* block_scale) {
  if (step_skipped(h)) return;
  const int64_t items = a.work_start[a.count];
  int t = a.count - 1;
  for (int64_t r = blockIdx.x; r < items; r += gridDim.x) {
    const int64_t item = items - 1 - r;
    while (a.work_start[t] > item) --t;  // items only decrease
    const Piece& piece = a.piece[t];
    const Span s = item_span(piece, item - a.work_start[t]);
    const float scale = block_scale[a.block_start[t] + s.block];
    if (scale == kMaskedBlock) {
      // The block's first item is the last of its items this loop would reach.
      const int64_t last_r = items - 1 - (a.work_start[t] + first_item(piece, s.block));
      r += (last_r - r) / gridDim.x * gridDim.x;
      continue;
    }
    const Coeffs c = coeffs_for(h, a.step[t]);
    const TensorPtrs<P, G, M, V> ptrs(a, t);
    for_item(ptrs, s, [&](auto vec, int64_t begin, int64_t end) {
      apply_range<decltype(vec)::value>(ptrs, h, c, begin, end, scale);
    });
  }
}

}  // namespace magma
