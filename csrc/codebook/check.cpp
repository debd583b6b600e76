// Argument checks of the codebook kernels (csrc/codebook/cpu.h), both code widths: the parts of a
// weight, then a product's x, out, perm and bias, or a dequantization's rows and out.
#include <cstdint>
#include <vector>

#include "codebook/cpu.h"

namespace hotops {
namespace {

void check_parts(const View& codes, DType code_type, const View& codebooks,
                 std::initializer_list<DType> codebook_types, const View& scales, const View& group_ptr) {
  check_view(codes, "codes", 3, {code_type});
  check_contiguous(codes, "codes");
  check_view(codebooks, "codebooks", 4, codebook_types);
  check_contiguous(codebooks, "codebooks");
  check_view(scales, "scales", 1, {DType::f32});
  check_contiguous(scales, "scales");
  check_view(group_ptr, "group_ptr", 1, {DType::i64});
  check_contiguous(group_ptr, "group_ptr");
}

// group_ptr splits the N rows into codebooks.size(0) groups; scales has one entry per row.
void check_groups(const View& group_ptr, const View& scales, int64_t O, int64_t N) {
  HOTOPS_CHECK(scales.size(0) == N, "scales must have one entry per row (", N, "), got ", scales.size(0));
  HOTOPS_CHECK(O >= 1 && group_ptr.size(0) == O + 1, "group_ptr must have ", O + 1,
               " entries (groups + 1), got ", group_ptr.size(0));
  const int64_t* gp = group_ptr.ptr<const int64_t>();
  HOTOPS_CHECK(gp[0] == 0 && gp[O] == N, "group_ptr must run from 0 to ", N, ", got ", gp[0], " .. ", gp[O]);
  for (int64_t o = 0; o < O; ++o)
    HOTOPS_CHECK(gp[o] <= gp[o + 1], "group_ptr must be non-decreasing (entry ", o, ")");
}

void check_format(const CodebookFormat& w) {
  check_parts(w.codes, DType::u8, w.codebooks, {DType::f32}, w.scales, w.group_ptr);
  const int64_t N = w.rows(), M = w.num_codebooks(), C = w.codebook_size(), G = w.in_group();
  HOTOPS_CHECK(G == 1 || G == 2 || G == 4 || G == 8, "in_group must be 1, 2, 4 or 8, got ", G);
  HOTOPS_CHECK(M >= 1, "codebooks must hold at least one codebook per group");
  HOTOPS_CHECK(C >= 1 && C <= 256, "uint8 codes address 1..256 codewords, got codebooks of ", C);
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  HOTOPS_CHECK(w.codes.size(0) == blocks && w.codes.size(2) == kRowBlock, "codes must be (", blocks,
               ", slots, ", kRowBlock, "): blocks of ", kRowBlock, " rows for ", N, " rows");
  HOTOPS_CHECK(w.slots() % M == 0, "codes have ", w.slots(), " slots per row, not a multiple of ", M,
               " codebooks");
  check_groups(w.group_ptr, w.scales, w.groups(), N);
}

void check_format(const WideFormat& w) {
  check_parts(w.codes, DType::u16, w.codebooks, {DType::f32, DType::f16, DType::bf16}, w.scales, w.group_ptr);
  const int64_t M = w.num_codebooks(), C = w.codebook_size();
  HOTOPS_CHECK(w.codebooks.size(3) == kWideGroup, "codebooks must hold codewords of ", kWideGroup,
               " inputs (in_group 8), got ", w.codebooks.size(3));
  HOTOPS_CHECK(M >= 1 && w.codebooks.size(1) == M, "codes address ", M,
               " codebooks per group, codebooks hold ", w.codebooks.size(1));
  HOTOPS_CHECK(C >= 1 && C <= 65536, "16-bit codes address 1..65536 codewords, got codebooks of ", C);
  check_groups(w.group_ptr, w.scales, w.groups(), w.rows());
}

// out (B, N) = x (B, K) W^T + bias, written at perm's columns: perm must be a permutation, or
// outputs would stay unwritten.
template <typename Product>
void check_product(const Product& a) {
  check_format(a.w);
  const int64_t N = a.w.rows(), K = a.w.in_features();
  check_view(a.x, "x", 2, {DType::f32, DType::bf16, DType::f16});
  check_rows_contiguous(a.x, "x");
  HOTOPS_CHECK(a.x.size(1) == K, "x has ", a.x.size(1), " features, the weight expects ", K);
  check_view(a.out, "out", 2, {a.x.dtype});
  check_rows_contiguous(a.out, "out");
  check_writable(a.out, "out");
  HOTOPS_CHECK(a.out.size(0) == a.x.size(0) && a.out.size(1) == N, "out must be (", a.x.size(0), ", ", N,
               ")");
  if (a.perm.present) {
    check_view(a.perm, "perm", 1, {DType::i64});
    check_contiguous(a.perm, "perm");
    HOTOPS_CHECK(a.perm.size(0) == N, "perm must have ", N, " entries");
    const int64_t* p = a.perm.template ptr<const int64_t>();
    std::vector<uint8_t> seen(static_cast<size_t>(N), 0);
    for (int64_t r = 0; r < N; ++r) {
      HOTOPS_CHECK(p[r] >= 0 && p[r] < N, "perm[", r, "] = ", p[r], " is outside [0, ", N, ")");
      HOTOPS_CHECK(!seen[p[r]], "perm is not a permutation: output feature ", p[r], " appears twice");
      seen[p[r]] = 1;
    }
  }
  if (a.bias.present) {
    check_view(a.bias, "bias", 1, {DType::f32});
    check_contiguous(a.bias, "bias");
    HOTOPS_CHECK(a.bias.size(0) == N, "bias must have ", N, " entries, got ", a.bias.size(0));
  }
  HOTOPS_CHECK(a.threads >= 1, "threads must be at least 1");
}

// The dense rows [row_begin, row_end) of the stored order into out.
template <typename Dequantize>
void check_rows(const Dequantize& a) {
  check_format(a.w);
  HOTOPS_CHECK(a.row_begin >= 0 && a.row_begin <= a.row_end && a.row_end <= a.w.rows(), "rows [", a.row_begin,
               ", ", a.row_end, ") fall outside the ", a.w.rows(), " rows");
  check_view(a.out, "out", 2, {DType::f32, DType::bf16});
  check_rows_contiguous(a.out, "out");
  check_writable(a.out, "out");
  HOTOPS_CHECK(a.out.size(0) == a.row_end - a.row_begin && a.out.size(1) == a.w.in_features(),
               "out must be (", a.row_end - a.row_begin, ", ", a.w.in_features(), ")");
  HOTOPS_CHECK(a.threads >= 1, "threads must be at least 1");
}

}  // namespace

void check(const CodebookMatmul& a) { check_product(a); }
void check(const CodebookDequantize& a) { check_rows(a); }
void check(const WideMatmul& a) { check_product(a); }
void check(const WideDequantize& a) { check_rows(a); }

void refuse_codes(int64_t codebook_size) {
  fail("codes must be smaller than the codebook size (", codebook_size, "); found a larger one");
}

}  // namespace hotops
