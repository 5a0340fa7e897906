// The random-number contract of docs/ALGORITHM.md section 4, in one place.
#pragma once

#include <cstdint>
#include <curand_kernel.h>

#include "keep_threshold.h"

namespace magma {

// z_t of block `block` of tensor `tensor_index` (< 2**62) at step `step` (< 2**32): the first
// word of curand() after curand_init(seed, (low << 32) | block, 4 * ((high << 32) + step)), where
// low and high are the tensor index's low 32 and high 30 bits, compared with the threshold.
// An index below 2**32 (high = 0) draws what the first version of this contract drew.
__device__ __forceinline__ bool keep_block(uint64_t seed, uint64_t tensor_index, uint64_t block,
                                           uint64_t step, uint64_t threshold) {
  curandStatePhilox4_32_10_t state;
  const uint64_t low = tensor_index & 0xFFFFFFFFull, high = tensor_index >> 32;
  curand_init(seed, (low << 32) | block, 4 * ((high << 32) + step), &state);
  return static_cast<uint64_t>(curand(&state)) < threshold;
}

}  // namespace magma
