// The random-number contract of docs/ALGORITHM.md section 4, in one place.
#pragma once

#include <cstdint>
#include <curand_kernel.h>

#include "keep_threshold.h"

namespace magma {

// z_t of block `block` of tensor `tensor_index` at step `step`: the first word of curand()
// after curand_init(seed, (tensor_index << 32) | block, 4 * step), compared with the threshold.
__device__ __forceinline__ bool keep_block(uint64_t seed, uint32_t tensor_index, uint64_t block,
                                           uint64_t step, uint64_t threshold) {
  curandStatePhilox4_32_10_t state;
  curand_init(seed, (static_cast<uint64_t>(tensor_index) << 32) | block, 4 * step, &state);
  return static_cast<uint64_t>(curand(&state)) < threshold;
}

}  // namespace magma
