// Codebook-quantized products with 16-bit codes (AQLM's "1x16": one codebook of 65536 codewords
// over 8 inputs). Codebooks that large do not fit lookup tables (a table per input group would be
// 65536 entries), so the kernel gathers codewords instead: it streams each row's 2-byte codes, loads
// the addressed codeword (8 floats, or 8 fp16/bf16 values: 32 or 16 bytes) from the codebook, which
// stays in L2 (65536 x 8 x 4 B = 2 MiB in fp32, 1 MiB in fp16), and multiplies it with x. At
// batch > 1 each gathered codeword serves the whole chunk of up to 16 batch rows.
//
// A weight of N rows and K = 8 J inputs: row r, input group j, codebook m has the code
// codes[r, j, m] into codebooks[o, m] (o: the row group holding r); row r of the dense weight is
// scales[r] * concat_j sum_m codebooks[o, m, codes[r, j, m]]. Stored row r is output feature
// perm[r] (the identity when perm is absent).
#pragma once
#include "common/dispatch.h"
#include "common/view.h"

namespace hotops {

constexpr int64_t kWideGroup = 8;  // inputs per codeword

struct WideFormat {
  View codes;      // (N, J, M) uint16, contiguous
  View codebooks;  // (O, M, C, 8) float32 | float16 | bfloat16, contiguous; C <= 65536
  View scales;     // (N,) float32, per stored row
  View group_ptr;  // (O + 1,) int64: group o holds stored rows [group_ptr[o], group_ptr[o + 1])

  int64_t rows() const { return codes.size(0); }
  int64_t in_groups() const { return codes.size(1); }
  int64_t num_codebooks() const { return codes.size(2); }
  int64_t groups() const { return codebooks.size(0); }
  int64_t codebook_size() const { return codebooks.size(2); }
  int64_t in_features() const { return in_groups() * kWideGroup; }
};

// out = x W^T + bias.
struct WideMatmul {
  WideFormat w;
  View x;     // (B, K) float32 | bfloat16, contiguous rows
  View perm;  // (N,) int64 output feature of each stored row, or absent (identity)
  View bias;  // (N,) float32 by output feature, or absent
  View out;   // (B, N) dtype of x, contiguous rows
  int threads = 1;
};

// The dense rows [row_begin, row_end) of the stored order.
struct WideDequantize {
  WideFormat w;
  int64_t row_begin = 0, row_end = 0;
  View out;  // (row_end - row_begin, K) float32 | bfloat16, contiguous rows
  int threads = 1;
};

// Validate shapes, dtypes, group boundaries and perm; throw hotops::Error.
void check(const WideMatmul& a);
void check(const WideDequantize& a);

// Both return false when a code is >= the codebook size (nothing useful was written then).
HOTOPS_FOR_EACH_ISA(bool wide_matmul(const WideMatmul& a); bool wide_dequantize(const WideDequantize& a);)

}  // namespace hotops
