#include "codebook/cpu.h"
#include "common/pyargs.h"

namespace py = pybind11;

namespace hotops {

void bind_codebook_wide(py::module_& m);  // wide_bind.cpp: 16-bit codes

namespace {

CodebookFormat format(ViewArgs& view, py::object codes, py::object codebooks, py::object scales,
                      py::object group_ptr) {
  CodebookFormat w;
  w.codes = view(codes, "codes");
  w.codebooks = view(codebooks, "codebooks");
  w.scales = view(scales, "scales");
  w.group_ptr = view(group_ptr, "group_ptr");
  return w;
}

void refuse_codes(bool ok, const CodebookFormat& w) {
  HOTOPS_CHECK(ok, "codes must be smaller than the codebook size (", w.codebook_size(),
               "); found a larger one");
}

}  // namespace

void bind_codebook(py::module_& m) {
  m.def(
      "codebook_matmul",
      [](py::object x, py::object codes, py::object codebooks, py::object scales, py::object group_ptr,
         py::object perm, py::object bias, py::object out, int threads) {
        ViewArgs view;
        CodebookMatmul a;
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
          ok = HOTOPS_DISPATCH(codebook_matmul)(a);
        }
        refuse_codes(ok, a.w);
      },
      py::arg("x"), py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("group_ptr"),
      py::arg("perm"), py::arg("bias"), py::arg("out"), py::arg("threads"),
      "out = x W^T + bias for a codebook-quantized W, by lookup tables; see csrc/codebook/cpu.h.");
  m.def(
      "codebook_dequantize",
      [](py::object codes, py::object codebooks, py::object scales, py::object group_ptr, int64_t row_begin,
         int64_t row_end, py::object out, int threads) {
        ViewArgs view;
        CodebookDequantize a;
        a.w = format(view, codes, codebooks, scales, group_ptr);
        a.row_begin = row_begin;
        a.row_end = row_end;
        a.out = view(out, "out");
        a.threads = threads;
        check(a);
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = HOTOPS_DISPATCH(codebook_dequantize)(a);
        }
        refuse_codes(ok, a.w);
      },
      py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("group_ptr"), py::arg("row_begin"),
      py::arg("row_end"), py::arg("out"), py::arg("threads"),
      "Dense rows [row_begin, row_end) of the stored (grouped) order into out.");
  bind_codebook_wide(m);
}

}  // namespace hotops
