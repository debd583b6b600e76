// Python bindings of the codebook kernels (csrc/codebook/cpu.h): one product and one
// dequantization per code width, bound by the same two wrappers.
#include "codebook/cpu.h"
#include "common/pyargs.h"

namespace py = pybind11;

namespace hotops {
namespace {

template <typename Format>
Format format(ViewArgs& view, py::object codes, py::object codebooks, py::object scales,
              py::object group_ptr) {
  Format w;
  w.codes = view(codes, "codes");
  w.codebooks = view(codebooks, "codebooks");
  w.scales = view(scales, "scales");
  w.group_ptr = view(group_ptr, "group_ptr");
  return w;
}

// out = x W^T + bias: Product is CodebookMatmul or WideMatmul, kernel its HOTOPS_DISPATCH.
template <typename Product, typename Kernel>
void def_product(py::module_& m, const char* name, Kernel kernel, const char* doc) {
  m.def(
      name,
      [kernel](py::object x, py::object codes, py::object codebooks, py::object scales, py::object group_ptr,
               py::object perm, py::object bias, py::object out, int threads) {
        ViewArgs view;
        Product a;
        a.w = format<decltype(a.w)>(view, codes, codebooks, scales, group_ptr);
        a.x = view(x, "x");
        a.perm = view(perm, "perm");
        a.bias = view(bias, "bias");
        a.out = view(out, "out");
        a.threads = threads;
        launch(a, kernel);
      },
      py::arg("x"), py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("group_ptr"),
      py::arg("perm"), py::arg("bias"), py::arg("out"), py::arg("threads"), doc);
}

// Dense rows [row_begin, row_end) of the stored order into out.
template <typename Dequantize, typename Kernel>
void def_dequantize(py::module_& m, const char* name, Kernel kernel, const char* doc) {
  m.def(
      name,
      [kernel](py::object codes, py::object codebooks, py::object scales, py::object group_ptr,
               int64_t row_begin, int64_t row_end, py::object out, int threads) {
        ViewArgs view;
        Dequantize a;
        a.w = format<decltype(a.w)>(view, codes, codebooks, scales, group_ptr);
        a.row_begin = row_begin;
        a.row_end = row_end;
        a.out = view(out, "out");
        a.threads = threads;
        launch(a, kernel);
      },
      py::arg("codes"), py::arg("codebooks"), py::arg("scales"), py::arg("group_ptr"), py::arg("row_begin"),
      py::arg("row_end"), py::arg("out"), py::arg("threads"), doc);
}

}  // namespace

void bind_codebook(py::module_& m) {
  def_product<CodebookMatmul>(
      m, "codebook_matmul", [](const CodebookMatmul& a) { HOTOPS_DISPATCH(codebook_matmul)(a); },
      "out = x W^T + bias for a codebook-quantized W (uint8 codes), by lookup tables; see "
      "csrc/codebook/cpu.h.");
  def_dequantize<CodebookDequantize>(
      m, "codebook_dequantize", [](const CodebookDequantize& a) { HOTOPS_DISPATCH(codebook_dequantize)(a); },
      "Dense rows [row_begin, row_end) of the stored (grouped) order into out.");
  def_product<WideMatmul>(
      m, "codebook_wide_matmul", [](const WideMatmul& a) { HOTOPS_DISPATCH(codebook_wide_matmul)(a); },
      "out = x W^T + bias for W in 16-bit codes (uint16 (N, J, M)), by codeword gathers; see "
      "csrc/codebook/cpu.h.");
  def_dequantize<WideDequantize>(
      m, "codebook_wide_dequantize",
      [](const WideDequantize& a) { HOTOPS_DISPATCH(codebook_wide_dequantize)(a); },
      "Dense rows [row_begin, row_end) of a 16-bit-code weight (stored order) into out.");
}

}  // namespace hotops
