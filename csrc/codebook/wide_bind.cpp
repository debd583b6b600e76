// Argument checks and Python bindings of the 16-bit-code kernels (csrc/codebook/wide.h).
#include "codebook/wide.h"
#include "common/pyargs.h"

namespace py = pybind11;

namespace hotops {
namespace {

void check_format(const WideFormat& w) {
  check_view(w.codes, "codes", 3, {DType::u16});
  check_contiguous(w.codes, "codes");
  check_view(w.codebooks, "codebooks", 4, {DType::f32, DType::f16, DType::bf16});
  check_contiguous(w.codebooks, "codebooks");
  check_view(w.scales, "scales", 1, {DType::f32});
  check_contiguous(w.scales, "scales");
  check_view(w.group_ptr, "group_ptr", 1, {DType::i64});
  check_contiguous(w.group_ptr, "group_ptr");
  const int64_t N = w.rows(), O = w.groups(), M = w.num_codebooks(), C = w.codebook_size();
  HOTOPS_CHECK(w.codebooks.size(3) == kWideGroup, "codebooks must hold codewords of ", kWideGroup,
               " inputs (in_group 8), got ", w.codebooks.size(3));
  HOTOPS_CHECK(M >= 1 && w.codebooks.size(1) == M, "codes address ", M,
               " codebooks per group, codebooks hold ", w.codebooks.size(1));
  HOTOPS_CHECK(C >= 1 && C <= 65536, "16-bit codes address 1..65536 codewords, got codebooks of ", C);
  HOTOPS_CHECK(w.scales.size(0) == N, "scales must have one entry per row (", N, "), got ", w.scales.size(0));
  HOTOPS_CHECK(O >= 1 && w.group_ptr.size(0) == O + 1, "group_ptr must have ", O + 1,
               " entries (groups + 1), got ", w.group_ptr.size(0));
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  HOTOPS_CHECK(gp[0] == 0 && gp[O] == N, "group_ptr must run from 0 to ", N, ", got ", gp[0], " .. ", gp[O]);
  for (int64_t o = 0; o < O; ++o)
    HOTOPS_CHECK(gp[o] <= gp[o + 1], "group_ptr must be non-decreasing (entry ", o, ")");
}

void refuse_codes(bool ok, const WideFormat& w) {
  HOTOPS_CHECK(ok, "codes must be smaller than the codebook size (", w.codebook_size(),
               "); found a larger one");
}

}  // namespace

void check(const WideMatmul& a) {
  check_format(a.w);
  const int64_t N = a.w.rows(), K = a.w.in_features();
  check_view(a.x, "x", 2, {DType::f32, DType::bf16});
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
    const int64_t* p = a.perm.ptr<const int64_t>();
    for (int64_t r = 0; r < N; ++r)
      HOTOPS_CHECK(p[r] >= 0 && p[r] < N, "perm[", r, "] = ", p[r], " is outside [0, ", N, ")");
  }
  if (a.bias.present) {
    check_view(a.bias, "bias", 1, {DType::f32});
    check_contiguous(a.bias, "bias");
    HOTOPS_CHECK(a.bias.size(0) == N, "bias must have ", N, " entries, got ", a.bias.size(0));
  }
  HOTOPS_CHECK(a.threads >= 1, "threads must be at least 1");
}

void check(const WideDequantize& a) {
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

void bind_codebook_wide(py::module_& m) {
  const auto format = [](ViewArgs& view, py::object codes, py::object codebooks, py::object scales,
                         py::object group_ptr) {
    WideFormat w;
    w.codes = view(codes, "codes");
    w.codebooks = view(codebooks, "codebooks");
    w.scales = view(scales, "scales");
    w.group_ptr = view(group_ptr, "group_ptr");
    return w;
  };
  m.def(
      "codebook_wide_matmul",
      [format](py::object x, py::object codes, py::object codebooks, py::object scales, py::object group_ptr,
               py::object perm, py::object bias, py::object out, int threads) {
        ViewArgs view;
        WideMatmul a;
        a.w = format(view, codes, codebooks, scales, group_ptr);
        a.x = view(x, "x");
        a.perm = view(perm, "perm");
        a.bias = view(bias, "bias");
        a.out = view(out, "out");
        a.threads = threads;
        check(a);
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = HOTOPS_DISPATCH(wide_matmul)(a);
        }
        refuse_codes(ok, a.w);
      },
      py::arg("x"), py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("group_ptr"),
      py::arg("perm"), py::arg("bias"), py::arg("out"), py::arg("threads"),
      "out = x W^T + bias for W in 16-bit codes (uint16 (N, J, M)), by codeword gathers; see "
      "csrc/codebook/wide.h.");
  m.def(
      "codebook_wide_dequantize",
      [format](py::object codes, py::object codebooks, py::object scales, py::object group_ptr,
               int64_t row_begin, int64_t row_end, py::object out, int threads) {
        ViewArgs view;
        WideDequantize a;
        a.w = format(view, codes, codebooks, scales, group_ptr);
        a.row_begin = row_begin;
        a.row_end = row_end;
        a.out = view(out, "out");
        a.threads = threads;
        check(a);
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = HOTOPS_DISPATCH(wide_dequantize)(a);
        }
        refuse_codes(ok, a.w);
      },
      py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("group_ptr"), py::arg("row_begin"),
      py::arg("row_end"), py::arg("out"), py::arg("threads"),
      "Dense rows [row_begin, row_end) of a 16-bit-code weight (stored order) into out.");
}

}  // namespace hotops
