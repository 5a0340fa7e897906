// The fused Magma step over one list of tensors (see ops.cpp for the schema).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace magma {

void fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList scores, at::TensorList master_params,
                at::TensorList steps, at::IntArrayRef tensor_indices, at::IntArrayRef block_sizes,
                at::IntArrayRef offsets, at::IntArrayRef logical_numels, double lr,
                const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                double weight_decay, int64_t base, int64_t mask, double keep_prob, double tau,
                double score_ema, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf);

}  // namespace magma
