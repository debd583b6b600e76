// Codebook-quantized matrix products (JLCM format). A weight of N output rows and K inputs is
// stored as uint8 codes: row r, input group j (in_group consecutive inputs), codebook m has a
// code into codebooks[o, m] (C codewords of in_group floats), o being the row group that holds r.
// Row r of the dense weight is scales[r] * concat_j sum_m codebooks[o, m, code(r, j * M + m)].
// Stored rows are ordered by group; stored row r is output feature perm[r].
//
// Codes are interleaved by blocks of kRowBlock = 16 rows: code(r, i) = codes[r / 16, i, r % 16].
// One slot of a block is then 16 contiguous bytes, half the indices of one 32-lane int16 table
// lookup (vpermi2w) or 16 independent float lookups, and a block's slots stream contiguously.
// (16, not 32: a layer's codes are padded to whole blocks, which small layers pay in bits.)
#pragma once
#include "common/dispatch.h"
#include "common/view.h"

namespace hotops {

constexpr int64_t kRowBlock = 16;

struct CodebookFormat {
  View codes;      // (ceil(N / 16), L, 16) uint8, contiguous; L = K / in_group * M, slot j * M + m
  View codebooks;  // (O, M, C, in_group) float32, contiguous; C <= 256
  View scales;     // (N,) float32, per stored row
  View group_ptr;  // (O + 1,) int64: group o holds stored rows [group_ptr[o], group_ptr[o + 1])

  int64_t rows() const { return scales.size(0); }
  int64_t slots() const { return codes.size(1); }
  int64_t groups() const { return codebooks.size(0); }
  int64_t num_codebooks() const { return codebooks.size(1); }
  int64_t codebook_size() const { return codebooks.size(2); }
  int64_t in_group() const { return codebooks.size(3); }
  int64_t in_features() const { return slots() / num_codebooks() * in_group(); }
};

// y = x W^T + bias through lookup tables: for each input group, the products of x with every
// codeword are tabulated once, then each output is a gather-add of one table entry per code.
struct CodebookMatmul {
  CodebookFormat w;
  View x;     // (B, K) float32 | bfloat16, contiguous rows
  View perm;  // (N,) int64 output feature of each stored row, or absent (identity)
  View bias;  // (N,) float32 by output feature, or absent
  View out;   // (B, N) dtype of x, contiguous rows
  int threads = 1;
};

// The dense rows [row_begin, row_end) of the stored (grouped) order.
struct CodebookDequantize {
  CodebookFormat w;
  int64_t row_begin = 0, row_end = 0;
  View out;  // (row_end - row_begin, K) float32 | bfloat16, contiguous rows
  int threads = 1;
};

// Validate shapes, dtypes and group boundaries; throw hotops::Error.
void check(const CodebookMatmul& a);
void check(const CodebookDequantize& a);

// Both return false when a code is >= the codebook size (nothing useful was written then).
HOTOPS_FOR_EACH_ISA(bool codebook_matmul(const CodebookMatmul& a);
                    bool codebook_dequantize(const CodebookDequantize& a);)

}  // namespace hotops
