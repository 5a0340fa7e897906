// Kernel arguments: the hyperparameters of a step and the tensors of one launch.
//
// NOTE: [tensor lists in kernel parameters]
// Like multi-tensor-apply in PyTorch and apex, the addresses of a launch's tensors travel in
// the kernel's parameter block, so a launch needs no host-to-device copy and can be captured
// in a CUDA graph.  Volta and later take up to 32,764 bytes of parameters (CUDA 12.1+), which
// lets one launch cover kMaxTensors tensors: sizeof(TensorArgs) is 31,768 bytes, and with
// StepHyper (88 bytes) and at most three pointers a kernel's parameters are 31,880 bytes
// (checked below).  Each CTA finds its tensor by binary search over the prefix sums of its
// work units (`work_start`, or `block_start` for one CTA per block).
#pragma once

#include <cstddef>
#include <cstdint>

#include "work_layout.h"

namespace magma {

constexpr int kMaxTensors = 256;

enum Base : int { kAdam = 0, kRmsprop = 1, kLaprop = 2 };
enum Mask : int { kMagma = 0, kSkip = 1, kNone = 2 };

struct StepHyper {
  float lr;
  const float* lr_ptr;      // device lr (capturable); overrides lr when set
  float beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2;  // 1 - beta in double, then float (as the foreach ops' alpha)
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
  void* exp_avg[kMaxTensors];     // float or __nv_bfloat16, one type per launch
  void* exp_avg_sq[kMaxTensors];  // float or __nv_bfloat16, one type per launch
  float* master[kMaxTensors];  // nullptr without master weights
  float* score[kMaxTensors];
  const float* step[kMaxTensors];
  Piece piece[kMaxTensors];
  // Row of the block-sum buffer that holds the piece's first block (its other blocks follow).
  // The split step's buffer has one row per block of the whole tensor list, so this is the
  // piece's row in the list, not in the launch; the whole step's own per-launch buffer uses
  // block_start.
  int64_t sum_row[kMaxTensors];
  // Global index of the piece's first block, < 2**32 (the host checks that every block index
  // of a piece fits the 32 bits of the Philox subsequence).
  uint32_t first_block[kMaxTensors];
  uint64_t tensor_index[kMaxTensors];  // < 2**62 (see philox.cuh)
  int64_t offset[kMaxTensors];  // the piece's first element in its logical tensor (rounding.cuh)
  int64_t work_start[kMaxTensors + 1];   // prefix sums of work units (items or blocks)
  int64_t block_start[kMaxTensors + 1];  // prefix sums of blocks
  int count;
};

// CUDA's limit on the parameters of one kernel (Volta and later, CUDA 12.1 and later).
constexpr size_t kMaxKernelParamBytes = 32764;
// The most any kernel passes beside TensorArgs and StepHyper: three pointers (finalize_kernel).
constexpr size_t kMaxExtraKernelParamBytes = 3 * sizeof(void*);
static_assert(sizeof(TensorArgs) == 31768 && sizeof(StepHyper) == 88,
              "update the sizes in NOTE: [tensor lists in kernel parameters]");
static_assert(sizeof(TensorArgs) + sizeof(StepHyper) + kMaxExtraKernelParamBytes <= kMaxKernelParamBytes,
              "a launch's kernel parameters must fit CUDA's limit: lower kMaxTensors");

}  // namespace magma
