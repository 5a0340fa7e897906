// The launchers of launch.h: those of the moments' kernels pick MomentLaunchers<M, V> by the
// moments' dtypes; the finalize kernel reads no moment.
#include <c10/cuda/CUDAException.h>

#include "block_kernel.cuh"
#include "finalize_kernel.cuh"
#include "dispatch.cuh"
#include "launch.h"

namespace magma {

int block_config_for(int64_t block_size) {
  if (block_size <= BlocksUpTo128::kCapacity) return kBlocksUpTo128;
  if (block_size <= BlocksUpTo512::kCapacity) return kBlocksUpTo512;
  if (block_size <= BlocksUpTo2048::kCapacity) return kBlocksUpTo2048;
  if (block_size <= BlocksUpTo8192::kCapacity) return kBlocksUpTo8192;
  return -1;
}

void launch_one_pass(const ListTypes& types, Mask mask, const TensorArgs& args,
                     const StepHyper& hyper, cudaStream_t stream) {
  dispatch_moments(types.exp_avg, types.exp_avg_sq, [&](auto m, auto v) {
    MomentLaunchers<typename decltype(m)::type, typename decltype(v)::type>::one_pass(
        types.param, types.grad, mask, args, hyper, stream);
  });
}

void launch_moments_sums(const ListTypes& types, const TensorArgs& args, const StepHyper& hyper,
                         float* item_sums, cudaStream_t stream) {
  dispatch_moments(types.exp_avg, types.exp_avg_sq, [&](auto m, auto v) {
    MomentLaunchers<typename decltype(m)::type, typename decltype(v)::type>::moments_sums(
        types.param, types.grad, args, hyper, item_sums, stream);
  });
}

void launch_finalize(const TensorArgs& args, const StepHyper& hyper, const float* item_sums,
                     float* block_sums, float* block_scale, cudaStream_t stream) {
  finalize_kernel<<<static_cast<unsigned>(args.block_start[args.count]), kFinalizeThreads, 0, stream>>>(
      args, hyper, item_sums, block_sums, block_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_apply(const ListTypes& types, const TensorArgs& args, const StepHyper& hyper,
                  const float* block_scale, cudaStream_t stream) {
  dispatch_moments(types.exp_avg, types.exp_avg_sq, [&](auto m, auto v) {
    MomentLaunchers<typename decltype(m)::type, typename decltype(v)::type>::apply(
        types.param, types.grad, args, hyper, block_scale, stream);
  });
}

void launch_block(const ListTypes& types, BlockConfigId config, const TensorArgs& args,
                  const StepHyper& hyper, float* block_sums, cudaStream_t stream) {
  dispatch_moments(types.exp_avg, types.exp_avg_sq, [&](auto m, auto v) {
    MomentLaunchers<typename decltype(m)::type, typename decltype(v)::type>::block(
        types.param, types.grad, config, args, hyper, block_sums, stream);
  });
}

}  // namespace magma
