#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "chunked_kernels.cuh"
#include "dispatch.cuh"
#include "launch.h"

namespace magma {

static unsigned grid_of(int64_t units) { return static_cast<unsigned>(units); }

// CTAs of apply_kernel<P, G> that fit on the current device at once, at most `units`.
// The occupancy is asked once per instantiation; any grid size gives the same result.
template <typename P, typename G>
static unsigned apply_grid(int64_t units) {
  static const int per_sm = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, apply_kernel<P, G>, kChunkThreads, 0));
    return blocks > 0 ? blocks : 1;
  }();
  const int64_t resident = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * per_sm;
  return static_cast<unsigned>(units < resident ? units : resident);
}

void launch_one_pass(at::ScalarType param, at::ScalarType grad, Mask mask, const TensorArgs& args,
                     const StepHyper& hyper, cudaStream_t stream) {
  const unsigned grid = grid_of(args.work_start[args.count]);
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    if (mask == kSkip) one_pass_kernel<P, G, kSkip><<<grid, kChunkThreads, 0, stream>>>(args, hyper);
    else one_pass_kernel<P, G, kNone><<<grid, kChunkThreads, 0, stream>>>(args, hyper);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_moments_sums(at::ScalarType param, at::ScalarType grad, const TensorArgs& args,
                         const StepHyper& hyper, float* item_sums, cudaStream_t stream) {
  const unsigned grid = grid_of(args.work_start[args.count]);
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    moments_sums_kernel<P, G><<<grid, kChunkThreads, 0, stream>>>(args, hyper, item_sums);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_finalize(const TensorArgs& args, const StepHyper& hyper, const float* item_sums,
                     float* block_sums, float* block_scale, cudaStream_t stream) {
  finalize_kernel<<<grid_of(args.block_start[args.count]), kFinalizeThreads, 0, stream>>>(
      args, hyper, item_sums, block_sums, block_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_apply(at::ScalarType param, at::ScalarType grad, const TensorArgs& args,
                  const StepHyper& hyper, const float* block_scale, cudaStream_t stream) {
  const int64_t items = args.work_start[args.count];
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    const unsigned grid = apply_grid<P, G>(items);
    apply_kernel<P, G><<<grid, kChunkThreads, 0, stream>>>(args, hyper, block_scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace magma
