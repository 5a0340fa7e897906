// Kernel arguments: the hyperparameters of a step and the tensors of one launch.
//
// NOTE: [tensor lists in kernel parameters]
// Like multi-tensor-apply in PyTorch and apex, the addresses of a launch's tensors travel in
// the kernel's parameter block, so a launch needs no host-to-device copy and can be captured
// in a CUDA graph.  Volta and later take up to 32 KB of parameters (CUDA 12.1+), which lets
// one launch cover kMaxTensors tensors.  Each CTA finds its tensor by binary search over the
// prefix sums of work units (`work_start`).
#pragma once

#include <cstdint>

#include "work_layout.h"

namespace magma {

constexpr int kMaxTensors = 256;  // 27 KB of kernel parameters

enum Base : int { kAdam = 0, kRmsprop = 1, kLaprop = 2 };
enum Mask : int { kMagma = 0, kSkip = 1, kNone = 2 };

struct StepHyper {
  float lr;
  const float* lr_ptr;      // device lr (capturable); overrides lr when set
  float beta1, beta2, eps, weight_decay;
  int base;
  float inv_keep_prob;      // the "skip" mask's 1 / keep_prob
  uint64_t keep_threshold;  // see philox.cuh
  float tau, score_ema;
  uint64_t seed;
  const float* grad_scale;  // optional: grads are divided by it
  const float* found_inf;   // optional: the whole step is skipped when it is > 0
};

struct TensorArgs {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  float* master[kMaxTensors];  // nullptr without master weights
  float* score[kMaxTensors];
  const float* step[kMaxTensors];
  Piece piece[kMaxTensors];
  int64_t first_block[kMaxTensors];  // global index of the piece's first block
  uint32_t tensor_index[kMaxTensors];
  int64_t work_start[kMaxTensors + 1];   // prefix sums of work units (items or blocks)
  int64_t block_start[kMaxTensors + 1];  // prefix sums of blocks
  int count;
};

}  // namespace magma
