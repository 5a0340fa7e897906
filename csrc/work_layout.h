// How a piece of a tensor is cut into blocks (docs/ALGORITHM.md section 3) and into the work items
// of the chunked kernels.  Plain C++ usable from host code (and the ctest) and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MAGMA_HD __host__ __device__ __forceinline__
#else
#define MAGMA_HD inline
#endif

namespace magma {

// Elements per work item of the chunked passes.  An item never crosses a block boundary, so
// every item adds to exactly one block's partial sums.
constexpr int64_t kChunk = 8192;

MAGMA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MAGMA_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A piece of `numel` elements whose first block holds `head` of them (head == block_size when the
// piece starts on a block boundary); the other blocks hold block_size elements, the last fewer.
struct Piece {
  int64_t numel;
  int64_t block_size;
  int64_t head;
};

MAGMA_HD Piece make_piece(int64_t numel, int64_t block_size, int64_t offset) {
  return Piece{numel, block_size, min64(numel, block_size - offset % block_size)};
}

MAGMA_HD int64_t num_blocks(const Piece& p) {
  return p.numel == 0 ? 0 : 1 + ceil_div(p.numel - p.head, p.block_size);
}

// First element and length of local block j.
MAGMA_HD int64_t block_begin(const Piece& p, int64_t j) {
  return j == 0 ? 0 : p.head + (j - 1) * p.block_size;
}
MAGMA_HD int64_t block_length(const Piece& p, int64_t j) {
  return j == 0 ? p.head : min64(p.block_size, p.numel - block_begin(p, j));
}

MAGMA_HD int64_t items_per_block(int64_t length) { return ceil_div(length, kChunk); }

// Work items of the piece: every block is cut into chunks of kChunk elements.
MAGMA_HD int64_t num_items(const Piece& p) {
  if (p.numel == 0) return 0;
  const int64_t rest = p.numel - p.head;
  const int64_t tail = rest % p.block_size;
  return items_per_block(p.head) + (rest / p.block_size) * items_per_block(p.block_size) +
         (tail ? items_per_block(tail) : 0);
}

// Index of the first item of local block j.
MAGMA_HD int64_t first_item(const Piece& p, int64_t j) {
  return j == 0 ? 0 : items_per_block(p.head) + (j - 1) * items_per_block(p.block_size);
}

struct Span {
  int64_t begin;   // first element (inside the piece)
  int64_t length;  // elements
  int64_t block;   // local block index
};

MAGMA_HD Span item_span(const Piece& p, int64_t item) {
  const int64_t head_items = items_per_block(p.head);
  int64_t block = 0, chunk = item;
  if (item >= head_items) {
    const int64_t per_block = items_per_block(p.block_size);
    block = 1 + (item - head_items) / per_block;
    chunk = (item - head_items) % per_block;
  }
  const int64_t begin = chunk * kChunk;
  return Span{block_begin(p, block) + begin, min64(kChunk, block_length(p, block) - begin), block};
}

}  // namespace magma
