// Codebook-quantized matrix products, in two code widths.
//
// uint8 codes (JLCM format, cpu.cpp: lookup tables). A weight of N output rows and K inputs is
// stored as uint8 codes: row r, input group j (in_group consecutive inputs), codebook m has a
// code into codebooks[o, m] (C codewords of in_group floats), o being the row group that holds r.
// Row r of the dense weight is scales[r] * concat_j sum_m codebooks[o, m, code(r, j * M + m)].
// Stored rows are ordered by group; stored row r is output feature perm[r].
// Codes are interleaved by blocks of kRowBlock = 16 rows: code(r, i) = codes[r / 16, i, r % 16].
// One slot of a block is then 16 contiguous bytes, half the indices of one 32-lane int16 table
// lookup (vpermi2w) or 16 independent float lookups, and a block's slots stream contiguously.
// (16, not 32: a layer's codes are padded to whole blocks, which small layers pay in bits.)
// The product tabulates, for each input group, x times every codeword once; each output is then
// a gather-add of one table entry per code.
//
// 16-bit codes (AQLM's "1x16", wide.cpp: codeword gathers). Codebooks of up to 65536 codewords over
// 8 inputs do not fit lookup tables, so the kernel streams each row's 2-byte codes, loads the
// addressed codeword (8 floats, or 8 fp16/bf16 values) from the codebook, which stays in L2
// (65536 x 8 x 4 B = 2 MiB in fp32), and multiplies it with x; at batch > 1 each gathered codeword
// serves the whole chunk of up to 16 batch rows. Row r of the dense weight is
// scales[r] * concat_j sum_m codebooks[o, m, codes[r, j, m]], stored row r is output feature perm[r].
#pragma once
#include "common/dispatch.h"
#include "common/view.h"

namespace hotops {

constexpr int64_t kRowBlock = 16;
constexpr int64_t kWideGroup = 8;  // inputs per codeword of 16-bit codes

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

// out = x W^T + bias for a weight in Format.
template <typename Format>
struct Product {
  Format w;
  View x;     // (B, K) float32 | bfloat16 | float16, contiguous rows
  View perm;  // (N,) int64 output feature of each stored row (a permutation), or absent (identity)
  View bias;  // (N,) float32 by output feature, or absent
  View out;   // (B, N) dtype of x, contiguous rows
  int threads = 1;
};

// The dense rows [row_begin, row_end) of the stored (grouped) order.
template <typename Format>
struct DequantizeRows {
  Format w;
  int64_t row_begin = 0, row_end = 0;
  View out;  // (row_end - row_begin, K) float32 | bfloat16, contiguous rows
  int threads = 1;
};

using CodebookMatmul = Product<CodebookFormat>;
using CodebookDequantize = DequantizeRows<CodebookFormat>;
using WideMatmul = Product<WideFormat>;
using WideDequantize = DequantizeRows<WideFormat>;

// Validate shapes, dtypes, group boundaries and perm; throw hotops::Error naming the argument.
void check(const CodebookMatmul& a);
void check(const CodebookDequantize& a);
void check(const WideMatmul& a);
void check(const WideDequantize& a);

// The kernels (cpu.cpp, wide.cpp); they throw hotops::Error (refuse_codes) on a code >= the
// codebook size.
HOTOPS_FOR_EACH_ISA(void codebook_matmul(const CodebookMatmul& a);
                    void codebook_dequantize(const CodebookDequantize& a);
                    void codebook_wide_matmul(const WideMatmul& a);
                    void codebook_wide_dequantize(const WideDequantize& a);)

// Throws the hotops::Error of a code past the codebook (>= codebook_size). Out of line, in the
// baseline check.cpp: kernel TUs call it once their parallel region is over (the ODR rule of
// docs/architecture.md keeps the message formatting out of the per-ISA TUs).
[[noreturn]] void refuse_codes(int64_t codebook_size);

}  // namespace hotops
