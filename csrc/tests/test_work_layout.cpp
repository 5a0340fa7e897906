// Exhaustive host test of work_layout.h: for many (numel, block_size, offset) pieces, the work
// items must tile the piece in order, each inside one block, with the counts and indices that
// the kernels rely on.  Every answer is compared with a naive element -> block computation.
//
// Plain C++17, no torch or CUDA.  Prints "work_layout: N checks passed" and exits 0, or prints
// each failure (the first few) and exits 1.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../work_layout.h"

namespace {

using magma::kChunk;

int64_t g_checks = 0;
int64_t g_failures = 0;

// Counts one check; on failure prints where and which piece (first 20 failures only).
void expect(bool ok, const char* what, int64_t numel, int64_t block_size, int64_t offset, int64_t index) {
  ++g_checks;
  if (ok) return;
  if (++g_failures <= 20) {
    std::printf("FAIL %s: numel=%lld block_size=%lld offset=%lld index=%lld\n", what,
                static_cast<long long>(numel), static_cast<long long>(block_size),
                static_cast<long long>(offset), static_cast<long long>(index));
  }
}

// Local block of element e of a piece that starts at element `offset` of its tensor.
int64_t naive_block(int64_t e, int64_t block_size, int64_t offset) {
  return (offset + e) / block_size - offset / block_size;
}

// Blocks the piece touches, counted from its first and last element.
int64_t naive_num_blocks(int64_t numel, int64_t block_size, int64_t offset) {
  return numel == 0 ? 0 : naive_block(numel - 1, block_size, offset) + 1;
}

// Checks every function of work_layout.h on one piece.
void check_piece(int64_t numel, int64_t block_size, int64_t offset) {
  const magma::Piece p = magma::make_piece(numel, block_size, offset);
  auto check = [&](bool ok, const char* what, int64_t index) {
    expect(ok, what, numel, block_size, offset, index);
  };

  const int64_t blocks = magma::num_blocks(p);
  check(blocks == naive_num_blocks(numel, block_size, offset), "num_blocks", -1);
  if (blocks != naive_num_blocks(numel, block_size, offset)) return;  // the rest would index wrongly

  // Blocks against the naive mapping: block j is exactly the elements whose naive block is j.
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t begin = magma::block_begin(p, j);
    const int64_t end = begin + magma::block_length(p, j);
    check(magma::block_length(p, j) >= 1 && end <= numel, "block inside the piece", j);
    if (!(begin >= 0 && begin < end && end <= numel)) continue;
    check(naive_block(begin, block_size, offset) == j, "block_begin in block j", j);
    check(begin == 0 || naive_block(begin - 1, block_size, offset) == j - 1, "block_begin is first", j);
    check(naive_block(end - 1, block_size, offset) == j, "block end in block j", j);
    check(end == numel || naive_block(end, block_size, offset) == j + 1, "block_length is full", j);
  }

  // Items: walk them in order, tracking where the next one must begin.
  const int64_t items = magma::num_items(p);
  std::vector<int64_t> items_of_block(static_cast<size_t>(blocks), 0);
  std::vector<int64_t> first_of_block(static_cast<size_t>(blocks), -1);
  int64_t next = 0;
  for (int64_t i = 0; i < items; ++i) {
    const magma::Span s = magma::item_span(p, i);
    check(s.begin == next, "items contiguous and in order", i);
    check(s.length >= 1 && s.length <= kChunk, "1 <= item length <= kChunk", i);
    check(s.block >= 0 && s.block < blocks, "item block in range", i);
    if (s.length < 1 || s.block < 0 || s.block >= blocks || s.begin < 0 || s.begin + s.length > numel) {
      check(false, "item inside the piece", i);
      return;
    }
    // The naive block is monotone in e, so first and last element in s.block means all are.
    check(naive_block(s.begin, block_size, offset) == s.block, "item starts in its block", i);
    check(naive_block(s.begin + s.length - 1, block_size, offset) == s.block, "item ends in its block", i);
    // Items cut their block into kChunk pieces from the block's start; only the last is shorter.
    const int64_t chunk = items_of_block[s.block]++;
    check(s.begin == magma::block_begin(p, s.block) + chunk * kChunk, "item at its chunk of the block", i);
    const int64_t block_end = magma::block_begin(p, s.block) + magma::block_length(p, s.block);
    check(s.length == kChunk || s.begin + s.length == block_end, "only a block's last item is short", i);
    if (first_of_block[s.block] < 0) first_of_block[s.block] = i;
    next = s.begin + s.length;
  }
  check(next == numel, "items cover the whole piece", items);

  for (int64_t j = 0; j < blocks; ++j) {
    check(first_of_block[j] == magma::first_item(p, j), "first_item(j) is j's first item", j);
    check(items_of_block[j] == magma::items_per_block(magma::block_length(p, j)), "items_per_block", j);
  }
}

// Offsets worth trying for a block size: every phase of the first two blocks when small, else
// the block edges and a few later starts.
std::vector<int64_t> offsets_for(int64_t block_size) {
  std::vector<int64_t> offsets;
  if (block_size <= 40) {
    for (int64_t o = 0; o <= 2 * block_size + 1; ++o) offsets.push_back(o);
  } else {
    for (int64_t o : {int64_t{0}, int64_t{1}, block_size / 2, block_size - 1, block_size, block_size + 1,
                      7 * block_size - 3, int64_t{kChunk} + 3}) {
      offsets.push_back(o);
    }
  }
  return offsets;
}

}  // namespace

int main() {
  // Small sizes exhaustively, then sizes around multiples of kChunk.
  std::vector<int64_t> numels, block_sizes;
  for (int64_t n = 0; n <= 40; ++n) numels.push_back(n);
  for (int64_t n : {kChunk - 1, kChunk, kChunk + 1, 2 * kChunk - 1, 2 * kChunk + 1, 3 * kChunk + 5,
                    5 * kChunk + 777}) {
    numels.push_back(n);
  }
  for (int64_t b = 1; b <= 40; ++b) block_sizes.push_back(b);
  for (int64_t b : {int64_t{64}, int64_t{1000}, int64_t{4096}, kChunk - 1, kChunk, kChunk + 1,
                    2 * kChunk, 3 * kChunk + 5, int64_t{100000}}) {
    block_sizes.push_back(b);
  }

  for (int64_t block_size : block_sizes) {
    for (int64_t offset : offsets_for(block_size)) {
      for (int64_t numel : numels) check_piece(numel, block_size, offset);
    }
  }
  // Blocks and pieces past 2**31 elements: the index arithmetic must stay 64-bit.
  const int64_t big = int64_t{1} << 31;
  check_piece(3 * big + 7, big, 0);
  check_piece(3 * big + 7, big, big - 5);
  check_piece(2 * big, big + 1, 5 * big + 11);

  if (g_failures > 0) {
    std::printf("work_layout: %lld of %lld checks FAILED\n", static_cast<long long>(g_failures),
                static_cast<long long>(g_checks));
    return 1;
  }
  std::printf("work_layout: %lld checks passed\n", static_cast<long long>(g_checks));
  return 0;
}
