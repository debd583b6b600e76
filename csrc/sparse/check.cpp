#include <string>

#include "sparse/cpu.h"

namespace hotops {
namespace {

void check_geometry(const ConvGeom& g) {
  HOTOPS_CHECK(g.N >= 0 && g.C >= 1 && g.H >= 1 && g.W >= 1 && g.O >= 1, "sparse conv: bad sizes N=", g.N,
               " C=", g.C, " H=", g.H, " W=", g.W, " O=", g.O, " (need N >= 0 and the rest >= 1)");
  HOTOPS_CHECK(g.G >= 1 && g.C % g.G == 0 && g.O % g.G == 0, "groups (", g.G,
               ") must divide both the input channels (", g.C, ") and the output channels (", g.O, ")");
  HOTOPS_CHECK(g.kh >= 1 && g.kw >= 1, "kernel size must be positive, got ", g.kh, "x", g.kw);
  HOTOPS_CHECK(g.sh >= 1 && g.sw >= 1, "stride must be positive, got ", g.sh, "x", g.sw);
  HOTOPS_CHECK(g.dh >= 1 && g.dw >= 1, "dilation must be positive, got ", g.dh, "x", g.dw);
  HOTOPS_CHECK(g.ph >= 0 && g.pw >= 0, "padding must be non-negative, got ", g.ph, "x", g.pw);
  // memory safety: the last output's window ends inside the padded input (the caller derived
  // the output size, python/hotops/sparse/spec.py)
  const int64_t last_h = (g.Ho - 1) * g.sh + g.dh * (g.kh - 1),
                last_w = (g.Wo - 1) * g.sw + g.dw * (g.kw - 1);
  HOTOPS_CHECK(g.Ho >= 1 && g.Wo >= 1 && last_h < g.H + 2 * g.ph && last_w < g.W + 2 * g.pw, "output ", g.Ho,
               "x", g.Wo, " reads past the input ", g.H, "x", g.W, " padded by ", g.ph, "x", g.pw);
}

void check_csr(const Csr& m, int64_t rows, const char* what) {
  check_view(m.rowptr, "rowptr", 1, {DType::i64});
  check_view(m.colidx, "colidx", 1, {DType::i32});
  check_view(m.values, "values", 1, {DType::f32});
  check_contiguous(m.rowptr, "rowptr");
  check_contiguous(m.colidx, "colidx");
  check_contiguous(m.values, "values");
  const int64_t ranges = m.rowptr.size(0) - 1;  // rows x column panels
  HOTOPS_CHECK(ranges >= rows && ranges % rows == 0, what, ": rowptr has ", m.rowptr.size(0),
               " entries, expected rows * panels + 1 with ", rows,
               " rows (one per row and column panel, plus one)");
  const int64_t nnz = m.colidx.size(0);
  HOTOPS_CHECK(m.values.size(0) == nnz, what, ": ", m.values.size(0), " values but ", nnz, " column indices");
  const int64_t* rp = m.rowptr.ptr<int64_t>();
  HOTOPS_CHECK(rp[0] == 0 && rp[ranges] == nnz, what, ": rowptr must run from 0 to nnz = ", nnz, ", got ",
               rp[0], " .. ", rp[ranges]);
  for (int64_t r = 0; r < ranges; ++r)
    HOTOPS_CHECK(rp[r] <= rp[r + 1], what, ": rowptr decreases at row ", r);
  // column indices are range-checked by the kernels as they read them
}

void check_blocked(const SparseConvFwd& a) {
  const ConvGeom& g = a.g;
  HOTOPS_CHECK(a.block == 4 || a.block == 8, "block must be 4 or 8 (rows per block), got ", a.block);
  const Blocked& m = a.blocked;
  check_view(m.rowptr, "blocked rowptr", 1, {DType::i64});
  check_view(m.colidx, "blocked colidx", 1, {DType::i32});
  check_view(m.values, "blocked values", 1, {DType::f32});
  check_contiguous(m.rowptr, "blocked rowptr");
  check_contiguous(m.colidx, "blocked colidx");
  check_contiguous(m.values, "blocked values");
  const int64_t blocks = g.G * ((g.Og() + a.block - 1) / a.block), ranges = m.rowptr.size(0) - 1;
  HOTOPS_CHECK(ranges >= blocks && ranges % blocks == 0, "blocked rowptr has ", m.rowptr.size(0),
               " entries, expected blocks * panels + 1 with ", blocks, " blocks of ", a.block, " rows");
  const int64_t stored = m.colidx.size(0);
  HOTOPS_CHECK(m.values.size(0) == stored * a.block, "blocked values has ", m.values.size(0),
               " entries, expected ", a.block, " per stored column (", stored * a.block, ")");
  const int64_t* rp = m.rowptr.ptr<int64_t>();
  HOTOPS_CHECK(rp[0] == 0 && rp[ranges] == stored, "blocked rowptr must run from 0 to the ", stored,
               " stored columns, got ", rp[0], " .. ", rp[ranges]);
  for (int64_t r = 0; r < ranges; ++r)
    HOTOPS_CHECK(rp[r] <= rp[r + 1], "blocked rowptr decreases at block ", r);
}

void check_pixels(const View& v, const char* what, int64_t n, int64_t c, int64_t p, bool contiguous_pixels) {
  check_view(v, what, 3, {DType::f32});
  HOTOPS_CHECK(v.size(0) == n && v.size(1) == c && v.size(2) == p, what, " has shape (", v.size(0), ", ",
               v.size(1), ", ", v.size(2), "), expected (", n, ", ", c, ", ", p, ")");
  if (contiguous_pixels) check_rows_contiguous(v, what);
}

void check_used(const View& u, const ConvGeom& g) {
  check_view(u, "transposed rowptr", 1, {DType::i64});
  check_contiguous(u, "transposed rowptr");
  HOTOPS_CHECK(u.size(0) == g.G * g.K() + 1, "transposed rowptr has ", u.size(0), " entries, expected ",
               g.G * g.K() + 1);
}

// A product's input x (N, C, H*W): float32 with contiguous pixels, read in place (or, where
// bf16_in_place, bfloat16 too: the forward's bf16 kernel reads it, or widens it whole); or, for
// direct layers (linear), float32, bfloat16 or float16 with contiguous channels (a linear
// layer's input as it comes: kernel.h builds transposed tiles).
void check_input(const View& x, const ConvGeom& g, bool bf16_in_place) {
  check_view(x, "x", 3, {DType::f32, DType::bf16, DType::f16});
  HOTOPS_CHECK(x.dtype == DType::f32 || g.direct(), "x must be float32 for a convolution that is not 1x1 ",
               "stride 1 unpadded, got ", dtype_name(x.dtype));
  HOTOPS_CHECK(x.size(0) == g.N && x.size(1) == g.C && x.size(2) == g.H * g.W, "x has shape (", x.size(0),
               ", ", x.size(1), ", ", x.size(2), "), expected (", g.N, ", ", g.C, ", ", g.H * g.W, ")");
  const bool pixels = x.size(2) <= 1 || x.stride(2) == 1, channels = x.size(1) <= 1 || x.stride(1) == 1;
  const bool in_place = pixels && (x.dtype == DType::f32 || (bf16_in_place && x.dtype == DType::bf16));
  if (!in_place) {
    HOTOPS_CHECK(g.direct() && channels, "x must be float32 with contiguous pixels (stride 1 in its last ",
                 "dimension)", g.direct() ? ", or have contiguous channels (stride 1 in its second)" : "",
                 ", got strides (", x.stride(0), ", ", x.stride(1), ", ", x.stride(2), ") for ",
                 dtype_name(x.dtype));
  }
}

}  // namespace

Act act_from_name(const char* name) {
  if (name == nullptr) return Act::none;
  const std::string s = name;
  if (s == "relu") return Act::relu;
  if (s == "relu6") return Act::relu6;
  fail("activation must be None, 'relu' or 'relu6', got '", s, "'");
}

void check(SparseConvFwd& a) {
  check_geometry(a.g);
  check_csr(a.w, a.g.O, "weight");
  if (a.block) check_blocked(a);
  check_used(a.used_rowptr, a.g);
  check_input(a.x, a.g, true);
  check_view(a.y, "y", 3, {DType::f32, DType::bf16, DType::f16});
  HOTOPS_CHECK(a.y.size(0) == a.g.N && a.y.size(1) == a.g.O && a.y.size(2) == a.g.P(), "y has shape (",
               a.y.size(0), ", ", a.y.size(1), ", ", a.y.size(2), "), expected (", a.g.N, ", ", a.g.O, ", ",
               a.g.P(), ")");
  check_writable(a.y, "y");
  if (a.bias.present) {
    check_view(a.bias, "bias", 1, {DType::f32});
    check_contiguous(a.bias, "bias");
    HOTOPS_CHECK(a.bias.size(0) == a.g.O, "bias has ", a.bias.size(0), " entries, expected ", a.g.O);
  }
}

void check(SparseWiden& a) {
  check_view(a.src, "src", 2, {DType::f32, DType::bf16, DType::f16});
  check_rows_contiguous(a.src, "src");
  check_view(a.dst, "dst", 2, {DType::f32});
  check_rows_contiguous(a.dst, "dst");
  check_writable(a.dst, "dst");
  const int64_t R = a.src.size(0), C = a.src.size(1);
  const bool ok =
      a.transpose ? a.dst.size(0) == C && a.dst.size(1) == R : a.dst.size(0) == R && a.dst.size(1) == C;
  HOTOPS_CHECK(ok, "dst has shape (", a.dst.size(0), ", ", a.dst.size(1), "), expected src's (", R, ", ", C,
               ")", a.transpose ? " transposed" : "");
}

void check(SparseConvBwdInput& a) {
  check_geometry(a.g);
  check_csr(a.wt, a.g.G * a.g.K(), "transposed weight");
  check_view(a.perm, "t_perm", 1, {DType::i64});
  check_contiguous(a.perm, "t_perm");
  HOTOPS_CHECK(a.perm.size(0) == a.wt.colidx.size(0), "t_perm has ", a.perm.size(0), " entries for ",
               a.wt.colidx.size(0), " non-zeros");  // its entries are range-checked as they are read
  check_pixels(a.gy, "grad_output", a.g.N, a.g.O, a.g.P(), true);
  check_pixels(a.gx, "grad_input", a.g.N, a.g.C, a.g.H * a.g.W, !a.g.direct());
}

void check(SparseConvBwdValues& a) {
  check_geometry(a.g);
  check_csr(a.w, a.g.O, "weight");
  check_used(a.used_rowptr, a.g);
  check_input(a.x, a.g, false);
  check_pixels(a.gy, "grad_output", a.g.N, a.g.O, a.g.P(), true);
  check_view(a.gvalues, "grad_values", 1, {DType::f32});
  HOTOPS_CHECK(a.gvalues.size(0) == a.w.colidx.size(0), "grad_values has ", a.gvalues.size(0),
               " entries for ", a.w.colidx.size(0), " non-zeros");
  // a fully pruned layer (nnz = 0) has nothing to write: torch gives such a tensor any strides
  if (a.gvalues.size(0) > 0) check_contiguous(a.gvalues, "grad_values");
  check_writable(a.gvalues, "grad_values");
}

}  // namespace hotops
