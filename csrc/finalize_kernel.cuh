// finalize_kernel, the chunked passes' per-block step between the moments pass and the apply
// pass (chunked_kernels.cuh lists the passes).  Not a template: included by launch.cu alone.
#pragma once

#include <cstdint>

#include "chunked_kernels.cuh"
#include "magma_math.cuh"
#include "philox.cuh"

namespace magma {

// One CTA per block (launch_finalize in launch.h says what each mode does).  The block's row
// of block_sums is sum_row[t] + j; its entry of block_scale is block_start[t] + j.
__global__ void __launch_bounds__(kFinalizeThreads)
finalize_kernel(const __grid_constant__ TensorArgs a, const StepHyper h, const float* item_sums,
                float* block_sums, float* block_scale) {
  if (step_skipped(h)) return;
  __shared__ float scratch[kSum3Scratch];
  const int64_t b = blockIdx.x;
  const int t = find_tensor(a.block_start, a.count, b);
  const int64_t j = b - a.block_start[t];
  const int64_t row = a.sum_row[t] + j;
  float3 total;
  if (item_sums != nullptr) {
    const Piece& p = a.piece[t];
    const int64_t first = a.work_start[t] + first_item(p, j);
    const int64_t count = items_per_block(block_length(p, j));
    float3 sums = make_float3(0.f, 0.f, 0.f);
    for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
      sums.x += item_sums[3 * (first + k)];
      sums.y += item_sums[3 * (first + k) + 1];
      sums.z += item_sums[3 * (first + k) + 2];
    }
    total = block_sum3(sums.x, sums.y, sums.z, scratch);
    if (threadIdx.x == 0) store_sums(block_sums, row, total);
  } else if (threadIdx.x == 0) {
    total = load_sums(block_sums, row);
  }
  if (block_scale == nullptr || threadIdx.x != 0) return;
  float* score = a.score[t] + j;
  const float updated = new_score(h, *score, total.x, total.y, total.z);
  *score = updated;
  const bool kept = keep_block(h.seed, a.tensor_index[t], a.first_block[t] + j,
                               step_count(a.step[t]), h.keep_threshold);
  block_scale[b] = kept ? updated : kMaskedBlock;
}

}  // namespace magma
