// Launchers of the kernels, one per kernel; each takes the tensors of one launch.
#pragma once

#include <ATen/core/ScalarType.h>
#include <cuda_runtime.h>

#include "tensor_args.h"

namespace magma {

// The largest block the single-pass kernel takes; larger blocks go through the chunked passes.
constexpr int64_t kMaxSinglePassBlock = 8192;

// The configurations of the single-pass kernel (block_kernel.cuh), by the largest block each
// holds.  A launch runs one configuration.
enum BlockConfigId : int {
  kBlocksUpTo128 = 0,
  kBlocksUpTo512 = 1,
  kBlocksUpTo2048 = 2,
  kBlocksUpTo8192 = 3,
  kNumBlockConfigs = 4,
};

// The smallest configuration that holds blocks of `block_size` elements (-1: none does).
int block_config_for(int64_t block_size);

// The dtypes of a launch's lists: one for all its parameters, gradients, exp_avgs, exp_avg_sqs.
struct ListTypes {
  at::ScalarType param, grad, exp_avg, exp_avg_sq;
};

// Masks "none" and "skip": the whole step of every item in one pass (moments and update).
void launch_one_pass(const ListTypes& types, Mask mask, const TensorArgs& args,
                     const StepHyper& hyper, cudaStream_t stream);
// Mask "magma", first of the two passes: moments of every item and the item's three sums,
// written to item_sums (3 floats per item).
void launch_moments_sums(const ListTypes& types, const TensorArgs& args, const StepHyper& hyper,
                         float* item_sums, cudaStream_t stream);
// Mask "magma", per block (see finalize_kernel): with item_sums, add the block's item sums
// into its row of block_sums; else read that row.  With block_scale, then update the score,
// draw the mask and write the block's scale for launch_apply; without, stop after the sums.
void launch_finalize(const TensorArgs& args, const StepHyper& hyper, const float* item_sums,
                     float* block_sums, float* block_scale, cudaStream_t stream);
// Mask "magma", second pass: the update of every item of a kept block.
void launch_apply(const ListTypes& types, const TensorArgs& args, const StepHyper& hyper,
                  const float* block_scale, cudaStream_t stream);
// Mask "magma", whole blocks of at most kMaxSinglePassBlock elements: the whole step in one
// pass.  With block_sums (not nullptr) each block's sums are also written to its row.
void launch_block(const ListTypes& types, BlockConfigId config, const TensorArgs& args,
                  const StepHyper& hyper, float* block_sums, cudaStream_t stream);

// The launchers of the kernels that read or write the moments, for moments stored as M and V
// (float or __nv_bfloat16): defined in launch_moments.cuh and instantiated once per pair, each
// in a file of its own (launch_moments_*.cu) so that the pairs compile in parallel.
template <typename M, typename V>
struct MomentLaunchers {
  static void one_pass(at::ScalarType param, at::ScalarType grad, Mask mask, const TensorArgs& args,
                       const StepHyper& hyper, cudaStream_t stream);
  static void moments_sums(at::ScalarType param, at::ScalarType grad, const TensorArgs& args,
                           const StepHyper& hyper, float* item_sums, cudaStream_t stream);
  static void apply(at::ScalarType param, at::ScalarType grad, const TensorArgs& args,
                    const StepHyper& hyper, const float* block_scale, cudaStream_t stream);
  static void block(at::ScalarType param, at::ScalarType grad, BlockConfigId config,
                    const TensorArgs& args, const StepHyper& hyper, float* block_sums,
                    cudaStream_t stream);
};

}  // namespace magma
