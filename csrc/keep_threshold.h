// The mask threshold of the random-number contract (docs/ALGORITHM.md section 4), for host code.
#pragma once

#include <cstdint>

namespace magma {

// round(keep_prob * 2^32), half away from zero; a block is kept when its word is below it.
// magma_ext/philox.py computes the same number.
inline uint64_t keep_threshold(double keep_prob) {
  return static_cast<uint64_t>(keep_prob * 4294967296.0 + 0.5);
}

}  // namespace magma
