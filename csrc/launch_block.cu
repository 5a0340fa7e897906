#include <c10/cuda/CUDAException.h>

#include "block_kernel.cuh"
#include "dispatch.cuh"
#include "launch.h"

namespace magma {

// Configurations of the single-pass kernel, smallest first.
using Config0 = BlockConfig<32, 4>;
using Config1 = BlockConfig<128, 4>;
using Config2 = BlockConfig<256, 8>;
using Config3 = BlockConfig<512, 16>;
static_assert(Config3::kCapacity == kMaxSinglePassBlock, "the largest configuration sets the limit");

int block_config_for(int64_t block_size) {
  if (block_size <= Config0::kCapacity) return 0;
  if (block_size <= Config1::kCapacity) return 1;
  if (block_size <= Config2::kCapacity) return 2;
  if (block_size <= Config3::kCapacity) return 3;
  return -1;
}

template <typename P, typename G, typename C>
static void launch_config(const TensorArgs& args, const StepHyper& hyper, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(args.work_start[args.count]);
  block_kernel<P, G, C::kThreads, C::kElems><<<grid, C::kThreads, 0, stream>>>(args, hyper);
}

void launch_block(at::ScalarType param, at::ScalarType grad, int config, const TensorArgs& args,
                  const StepHyper& hyper, cudaStream_t stream) {
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    switch (config) {
      case 0: launch_config<P, G, Config0>(args, hyper, stream); break;
      case 1: launch_config<P, G, Config1>(args, hyper, stream); break;
      case 2: launch_config<P, G, Config2>(args, hyper, stream); break;
      default: launch_config<P, G, Config3>(args, hyper, stream); break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace magma
