// Launchers of the kernels, one per pass; each takes the tensors of one launch.
#pragma once

#include <ATen/core/ScalarType.h>
#include <cuda_runtime.h>

#include "tensor_args.h"

namespace magma {

// The largest block the single-pass kernel takes; larger blocks go through the chunked passes.
constexpr int64_t kMaxSinglePassBlock = 8192;

// Which single-pass configuration holds blocks of `block_size` elements (-1: none does).
int block_config_for(int64_t block_size);

void launch_moments(at::ScalarType param, at::ScalarType grad, int mask, const TensorArgs& args,
                    const StepHyper& hyper, float* item_sums, cudaStream_t stream);
void launch_finalize(const TensorArgs& args, const StepHyper& hyper, const float* item_sums,
                     float* block_sums, float* block_scale, cudaStream_t stream);
void launch_apply(at::ScalarType param, at::ScalarType grad, const TensorArgs& args,
                  const StepHyper& hyper, const float* block_scale, cudaStream_t stream);
void launch_block(at::ScalarType param, at::ScalarType grad, int config, const TensorArgs& args,
                  const StepHyper& hyper, cudaStream_t stream);

}  // namespace magma
