#include <pybind11/stl.h>

#include <vector>

#include "common/pyargs.h"
#include "sparse/cpu.h"

namespace py = pybind11;

namespace hotops {
namespace {

// geometry = [N, C, H, W, O, G, kh, kw, sh, sw, ph, pw, dh, dw]
ConvGeom geometry(const std::vector<int64_t>& v) {
  HOTOPS_CHECK(v.size() == 14,
               "geometry must have 14 entries (N, C, H, W, O, G, kh, kw, sh, sw, ph, pw, dh, dw)");
  ConvGeom g;
  g.N = v[0], g.C = v[1], g.H = v[2], g.W = v[3], g.O = v[4], g.G = v[5];
  g.kh = v[6], g.kw = v[7], g.sh = v[8], g.sw = v[9], g.ph = v[10], g.pw = v[11], g.dh = v[12], g.dw = v[13];
  return g;
}

Csr csr(ViewArgs& view, py::object rowptr, py::object colidx, py::object values) {
  return Csr{view(rowptr, "rowptr"), view(colidx, "colidx"), view(values, "values")};
}

// One layer's sparse_conv_fwd arguments but x and y, converted once: a prepared inference call
// converts two tensors instead of seven (each costs ~1.5 us through torch's accessors, as much as
// a small layer's whole kernel).
struct SparseConvPlan {
  SparseConvFwd a;
  py::tuple keep;  // the tensors a's Views point into
};

// The blocked form, when given (block > 0), replaces the CSR in the forward.
void set_blocked(SparseConvFwd& a, ViewArgs& view, int block, py::object b_rowptr, py::object b_colidx,
                 py::object b_values) {
  a.block = block;
  if (block)
    a.blocked = Blocked{view(b_rowptr, "blocked rowptr"), view(b_colidx, "blocked colidx"),
                        view(b_values, "blocked values")};
}

}  // namespace

void bind_sparse(py::module_& m) {
  py::class_<SparseConvPlan>(m, "SparseConvPlan",
                             "sparse_conv_fwd with the weight, bias, geometry and activation bound once")
      .def(py::init([](const std::vector<int64_t>& geom, py::object rowptr, py::object colidx,
                       py::object values, py::object t_rowptr, py::object bias, int activation, int block,
                       py::object b_rowptr, py::object b_colidx, py::object b_values) {
             HOTOPS_CHECK(activation >= 0 && activation <= 2,
                          "activation must be 0 (none), 1 (relu) or 2 (relu6), got ", activation);
             ViewArgs view;  // torch tensors: the Views borrow their memory, kept alive by `keep`
             SparseConvPlan p;
             p.a.g = geometry(geom);
             p.a.w = csr(view, rowptr, colidx, values);
             p.a.used_rowptr = view(t_rowptr, "transposed rowptr");
             p.a.bias = view(bias, "bias");
             p.a.act = static_cast<Act>(activation);
             set_blocked(p.a, view, block, b_rowptr, b_colidx, b_values);
             p.keep = py::make_tuple(rowptr, colidx, values, t_rowptr, bias, b_rowptr, b_colidx, b_values);
             return p;
           }),
           py::arg("geometry"), py::arg("rowptr"), py::arg("colidx"), py::arg("values"), py::arg("t_rowptr"),
           py::arg("bias"), py::arg("activation"), py::arg("block") = 0, py::arg("b_rowptr") = py::none(),
           py::arg("b_colidx") = py::none(), py::arg("b_values") = py::none())
      .def(
          "forward",
          [](const SparseConvPlan& p, py::object x, py::object y, int threads) {
            ViewArgs view;
            SparseConvFwd a = p.a;
            a.x = view(x, "x");
            a.y = view(y, "y");
            a.threads = threads;
            launch(a, HOTOPS_DISPATCH(sparse_conv_fwd));
          },
          py::arg("x"), py::arg("y"), py::arg("threads"),
          "sparse_conv_fwd(geometry, ..., x, bias, y, activation, threads)");

  m.def(
      "sparse_conv_fwd",
      [](const std::vector<int64_t>& geom, py::object rowptr, py::object colidx, py::object values,
         py::object t_rowptr, py::object x, py::object bias, py::object y, int activation, int threads,
         int block, py::object b_rowptr, py::object b_colidx, py::object b_values) {
        ViewArgs view;
        SparseConvFwd a;
        a.g = geometry(geom);
        a.w = csr(view, rowptr, colidx, values);
        a.used_rowptr = view(t_rowptr, "transposed rowptr");
        a.x = view(x, "x");
        a.bias = view(bias, "bias");
        a.y = view(y, "y");
        HOTOPS_CHECK(activation >= 0 && activation <= 2,
                     "activation must be 0 (none), 1 (relu) or 2 (relu6), got ", activation);
        a.act = static_cast<Act>(activation);
        a.threads = threads;
        set_blocked(a, view, block, b_rowptr, b_colidx, b_values);
        launch(a, HOTOPS_DISPATCH(sparse_conv_fwd));
      },
      py::arg("geometry"), py::arg("rowptr"), py::arg("colidx"), py::arg("values"), py::arg("t_rowptr"),
      py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("activation"), py::arg("threads"),
      py::arg("block") = 0, py::arg("b_rowptr") = py::none(), py::arg("b_colidx") = py::none(),
      py::arg("b_values") = py::none(),
      "y = act(sparse W * im2col(x) + bias), on the blocked form when block > 0; see csrc/sparse/cpu.h.");
  m.def(
      "sparse_widen",
      [](py::object src, py::object dst, bool transpose, int threads) {
        ViewArgs view;
        SparseWiden a;
        a.src = view(src, "src");
        a.dst = view(dst, "dst");
        a.transpose = transpose;
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(sparse_widen));
      },
      py::arg("src"), py::arg("dst"), py::arg("transpose"), py::arg("threads"),
      "dst = src or src^T widened to float32 (the sparse kernels' input layout).");
  m.def(
      "sparse_conv_bwd_input",
      [](const std::vector<int64_t>& geom, py::object t_rowptr, py::object t_colidx, py::object t_values,
         py::object gy, py::object gx, int threads) {
        ViewArgs view;
        SparseConvBwdInput a;
        a.g = geometry(geom);
        a.wt = csr(view, t_rowptr, t_colidx, t_values);
        a.gy = view(gy, "grad_output");
        a.gx = view(gx, "grad_input");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(sparse_conv_bwd_input));
      },
      py::arg("geometry"), py::arg("t_rowptr"), py::arg("t_colidx"), py::arg("t_values"), py::arg("gy"),
      py::arg("gx"), py::arg("threads"), "grad_input = col2im(W^T gy); see csrc/sparse/cpu.h.");
  m.def(
      "sparse_conv_bwd_values",
      [](const std::vector<int64_t>& geom, py::object rowptr, py::object colidx, py::object values,
         py::object t_rowptr, py::object x, py::object gy, py::object partial, int threads) {
        ViewArgs view;
        SparseConvBwdValues a;
        a.g = geometry(geom);
        a.w = csr(view, rowptr, colidx, values);
        a.used_rowptr = view(t_rowptr, "transposed rowptr");
        a.x = view(x, "x");
        a.gy = view(gy, "grad_output");
        a.partial = view(partial, "partial");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(sparse_conv_bwd_values));
      },
      py::arg("geometry"), py::arg("rowptr"), py::arg("colidx"), py::arg("values"), py::arg("t_rowptr"),
      py::arg("x"), py::arg("gy"), py::arg("partial"), py::arg("threads"),
      "gradient of the non-zero values: gy . im2col(x) sampled at W's non-zeros, per lane.");
}

}  // namespace hotops
