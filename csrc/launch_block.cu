#include <c10/cuda/CUDAException.h>

#include "block_kernel.cuh"
#include "dispatch.cuh"
#include "launch.h"

namespace magma {

// The configurations of the single-pass kernel, smallest first (THREADS x ELEMS elements).
using BlocksUpTo128 = BlockConfig<32, 4>;
using BlocksUpTo512 = BlockConfig<128, 4>;
using BlocksUpTo2048 = BlockConfig<256, 8>;
using BlocksUpTo8192 = BlockConfig<512, 16>;
static_assert(BlocksUpTo128::kCapacity == 128 && BlocksUpTo512::kCapacity == 512 &&
                  BlocksUpTo2048::kCapacity == 2048 && BlocksUpTo8192::kCapacity == 8192,
              "each configuration holds the blocks its name says");
static_assert(BlocksUpTo8192::kCapacity == kMaxSinglePassBlock, "the largest configuration sets the limit");

int block_config_for(int64_t block_size) {
  if (block_size <= BlocksUpTo128::kCapacity) return kBlocksUpTo128;
  if (block_size <= BlocksUpTo512::kCapacity) return kBlocksUpTo512;
  if (block_size <= BlocksUpTo2048::kCapacity) return kBlocksUpTo2048;
  if (block_size <= BlocksUpTo8192::kCapacity) return kBlocksUpTo8192;
  return -1;
}

template <typename P, typename G, typename C>
static void launch_config(const TensorArgs& args, const StepHyper& hyper, float* block_sums,
                          cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(args.work_start[args.count]);
  block_kernel<P, G, C::kThreads, C::kElems><<<grid, C::kThreads, 0, stream>>>(args, hyper, block_sums);
}

void launch_block(at::ScalarType param, at::ScalarType grad, BlockConfigId config,
                  const TensorArgs& args, const StepHyper& hyper, float* block_sums,
                  cudaStream_t stream) {
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    switch (config) {
      case kBlocksUpTo128: launch_config<P, G, BlocksUpTo128>(args, hyper, block_sums, stream); break;
      case kBlocksUpTo512: launch_config<P, G, BlocksUpTo512>(args, hyper, block_sums, stream); break;
      case kBlocksUpTo2048: launch_config<P, G, BlocksUpTo2048>(args, hyper, block_sums, stream); break;
      default: launch_config<P, G, BlocksUpTo8192>(args, hyper, block_sums, stream); break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace magma
