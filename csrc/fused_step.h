// The Magma step ops over one list of tensors: the whole step, and the same step split in two
// halves for sharded training (see ops.cpp for the schemas and fused_step.cpp for the contract).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

// The parameters the three ops share, in schema order (ops.cpp), and their names for forwarding.
#define MAGMA_EXT_STEP_PARAMS                                                                     \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                           \
      at::TensorList exp_avg_sqs, at::TensorList scores, at::TensorList master_params,            \
      at::TensorList steps, at::IntArrayRef tensor_indices, at::IntArrayRef block_sizes,          \
      at::IntArrayRef offsets, at::IntArrayRef logical_numels, double lr,                         \
      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,         \
      double weight_decay, std::string_view base, std::string_view mask, double keep_prob,        \
      double tau, double score_ema, int64_t seed, const std::optional<at::Tensor>& grad_scale,    \
      const std::optional<at::Tensor>& found_inf
#define MAGMA_EXT_STEP_ARGS                                                                    \
  params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps, tensor_indices,          \
      block_sizes, offsets, logical_numels, lr, lr_tensor, beta1, beta2, eps, weight_decay,    \
      base, mask, keep_prob, tau, score_ema, seed, grad_scale, found_inf

namespace magma {

// The whole step.
void fused_step(MAGMA_EXT_STEP_PARAMS);
// The first half: everything up to the block sums, which go to block_sums (float32, (B, 3)).
void moments_partials(MAGMA_EXT_STEP_PARAMS, const at::Tensor& block_sums);
// The second half (mask "magma"): scores, masks and updates from block_sums.
void finalize_apply(MAGMA_EXT_STEP_PARAMS, const at::Tensor& block_sums);

}  // namespace magma
