// The definitions of MomentLaunchers<M, V> (launch.h): each dispatches on the (parameter,
// gradient) dtypes and launches its kernel on `stream`.  Included only by launch_moments_*.cu.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "block_kernel.cuh"
#include "chunked_kernels.cuh"
#include "dispatch.cuh"
#include "launch.h"

namespace magma {

inline unsigned grid_of(int64_t units) { return static_cast<unsigned>(units); }

// CTAs of apply_kernel<P, G, M, V> that fit on the current device at once, at most `units`.
// The occupancy is asked once per instantiation; any grid size gives the same result.
template <typename P, typename G, typename M, typename V>
unsigned apply_grid(int64_t units) {
  static const int per_sm = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, apply_kernel<P, G, M, V>,
                                                                 kChunkThreads, 0));
    return blocks > 0 ? blocks : 1;
  }();
  const int64_t resident = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * per_sm;
  return static_cast<unsigned>(units < resident ? units : resident);
}

template <typename M, typename V>
void MomentLaunchers<M, V>::one_pass(at::ScalarType param, at::ScalarType grad, Mask mask,
                                     const TensorArgs& args, const StepHyper& hyper, cudaStream_t stream) {
  const unsigned grid = grid_of(args.work_start[args.count]);
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    if (mask == kSkip) one_pass_kernel<P, G, M, V, kSkip><<<grid, kChunkThreads, 0, stream>>>(args, hyper);
    else one_pass_kernel<P, G, M, V, kNone><<<grid, kChunkThreads, 0, stream>>>(args, hyper);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename M, typename V>
void MomentLaunchers<M, V>::moments_sums(at::ScalarType param, at::ScalarType grad, const TensorArgs& args,
                                         const StepHyper& hyper, float* item_sums, cudaStream_t stream) {
  const unsigned grid = grid_of(args.work_start[args.count]);
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    moments_sums_kernel<P, G, M, V><<<grid, kChunkThreads, 0, stream>>>(args, hyper, item_sums);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename M, typename V>
void MomentLaunchers<M, V>::apply(at::ScalarType param, at::ScalarType grad, const TensorArgs& args,
                                  const StepHyper& hyper, const float* block_scale, cudaStream_t stream) {
  const int64_t items = args.work_start[args.count];
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    const unsigned grid = apply_grid<P, G, M, V>(items);
    apply_kernel<P, G, M, V><<<grid, kChunkThreads, 0, stream>>>(args, hyper, block_scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename P, typename G, typename M, typename V, typename C>
void launch_block_config(const TensorArgs& args, const StepHyper& hyper, float* block_sums, cudaStream_t stream) {
  const unsigned grid = grid_of(args.work_start[args.count]);
  block_kernel<P, G, M, V, C::kThreads, C::kElems><<<grid, C::kThreads, 0, stream>>>(args, hyper, block_sums);
}

template <typename M, typename V>
void MomentLaunchers<M, V>::block(at::ScalarType param, at::ScalarType grad, BlockConfigId config,
                                  const TensorArgs& args, const StepHyper& hyper, float* block_sums,
                                  cudaStream_t stream) {
  dispatch_param_grad(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    switch (config) {
      case kBlocksUpTo128: launch_block_config<P, G, M, V, BlocksUpTo128>(args, hyper, block_sums, stream); break;
      case kBlocksUpTo512: launch_block_config<P, G, M, V, BlocksUpTo512>(args, hyper, block_sums, stream); break;
      case kBlocksUpTo2048: launch_block_config<P, G, M, V, BlocksUpTo2048>(args, hyper, block_sums, stream); break;
      default: launch_block_config<P, G, M, V, BlocksUpTo8192>(args, hyper, block_sums, stream); break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace magma
