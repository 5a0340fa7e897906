// Moments stored in bfloat16: the rounding stream and the stochastic rounding of
// docs/ALGORITHM.md section 6, in one place (magma_ext/rounding.py computes the same numbers).
//
// NOTE: [the rounding stream]
// Element e of logical tensor i at step t rounds with word (e & 3) of Philox4x32-10 under the
// key seed ^ kRoundingKey at the counter (t, q, i mod 2**32, (i >> 32) | ((q >> 32) << 30)),
// q = e >> 2: the low half of the word for exp_avg, the high half for exp_avg_sq.  One Philox
// block serves four consecutive elements, so the kernels hand each thread runs of four.  The
// host checks t < 2**32 (the masks' limit too), i < 2**62 and e < 2**36.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

namespace magma {

constexpr uint64_t kRoundingKey = 0x9E3779B97F4A7C15ull;

// Whether a moment stored as S is rounded stochastically (bfloat16) or kept as computed (float).
template <typename S>
constexpr bool kRounded = std::is_same_v<S, __nv_bfloat16>;

// Random123's Philox4x32-10 block function: ten rounds over the counter, the key bumped by the
// Weyl constants between rounds (magma_ext/philox.py states the same rounds).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t high0 = __umulhi(0xD2511F53u, c.x), low0 = 0xD2511F53u * c.x;
    const uint32_t high1 = __umulhi(0xCD9E8D57u, c.z), low1 = 0xCD9E8D57u * c.z;
    c = make_uint4(high1 ^ c.y ^ k0, low1, high0 ^ c.w ^ k1, low0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

__device__ __forceinline__ uint32_t word_of(const uint4& words, int w) {
  return w == 0 ? words.x : w == 1 ? words.y : w == 2 ? words.z : words.w;
}

// The rounding stream of one piece at one step (NOTE: [the rounding stream]).
struct RoundingStream {
  uint64_t key;
  uint64_t tensor_index;
  uint64_t step;
  int64_t offset;  // the piece's first element in its logical tensor

  // The four words of elements 4q .. 4q + 3 of the logical tensor.
  __device__ __forceinline__ uint4 quad(uint64_t q) const {
    const uint32_t high = static_cast<uint32_t>(tensor_index >> 32) | (static_cast<uint32_t>(q >> 32) << 30);
    return philox4x32_10(make_uint4(static_cast<uint32_t>(step), static_cast<uint32_t>(q),
                                    static_cast<uint32_t>(tensor_index), high), key);
  }

  // The word of element i of the piece.
  __device__ __forceinline__ uint32_t word(int64_t i) const {
    const uint64_t e = static_cast<uint64_t>(offset + i);
    return word_of(quad(e >> 2), static_cast<int>(e & 3));
  }

  // The words of elements i .. i + 3 of the piece: one Philox block where they are one quad of
  // the logical tensor, two where they straddle two.
  __device__ __forceinline__ void words4(int64_t i, uint32_t* out) const {
    const uint64_t e = static_cast<uint64_t>(offset + i);
    const int shift = static_cast<int>(e & 3);
    const uint4 first = quad(e >> 2);
    if (shift == 0) {
      out[0] = first.x, out[1] = first.y, out[2] = first.z, out[3] = first.w;
      return;
    }
    const uint4 second = quad((e >> 2) + 1);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int w = shift + k;
      out[k] = w < 4 ? word_of(first, w) : word_of(second, w - 4);
    }
  }
};

// x rounded to bfloat16 with the 16-bit random number `noise`: the high half of bits(x) + noise
// (returned as a float).  Non-finite values round to nearest, so inf and NaN stay what they are.
__device__ __forceinline__ float round_stochastic(float x, uint32_t noise) {
  if (!isfinite(x)) return __bfloat162float(__float2bfloat16_rn(x));
  return __uint_as_float((__float_as_uint(x) + noise) & 0xFFFF0000u);
}

// A new moment value as its state stores it: unchanged in float32, rounded in bfloat16.
template <typename S>
__device__ __forceinline__ float as_stored(float x, uint32_t noise) {
  if constexpr (kRounded<S>) return round_stochastic(x, noise);
  else return x;
}

}  // namespace magma
