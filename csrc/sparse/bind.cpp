#include <pybind11/stl.h>

#include <string>

#include "common/pyargs.h"
#include "sparse/cpu.h"

namespace py = pybind11;

namespace hotops {
namespace {

// python/hotops/sparse/spec.py's ConvGeometry, read field by field
ConvGeom geometry(const py::handle& o) {
  const auto field = [&](const char* name) { return o.attr(name).cast<int64_t>(); };
  ConvGeom g;
  g.N = field("N"), g.C = field("C"), g.H = field("H"), g.W = field("W"), g.O = field("O"), g.G = field("G");
  g.kh = field("kh"), g.kw = field("kw"), g.sh = field("sh"), g.sw = field("sw");
  g.ph = field("ph"), g.pw = field("pw"), g.dh = field("dh"), g.dw = field("dw");
  g.Ho = field("Ho"), g.Wo = field("Wo");
  return g;
}

// None, "relu" or "relu6"
Act activation(const py::object& name) {
  if (name.is_none()) return act_from_name(nullptr);
  HOTOPS_CHECK(py::isinstance<py::str>(name), "activation must be None or a name, got ",
               std::string(py::str(py::type::handle_of(name).attr("__name__"))));
  return act_from_name(name.cast<std::string>().c_str());
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
      .def(py::init([](py::object geom, py::object rowptr, py::object colidx, py::object values,
                       py::object t_rowptr, py::object bias, py::object act, int block, py::object b_rowptr,
                       py::object b_colidx, py::object b_values) {
             ViewArgs view;  // torch tensors: the Views borrow their memory, kept alive by `keep`
             SparseConvPlan p;
             p.a.g = geometry(geom);
             p.a.w = csr(view, rowptr, colidx, values);
             p.a.used_rowptr = view(t_rowptr, "transposed rowptr");
             p.a.bias = view(bias, "bias");
             p.a.act = activation(act);
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
      [](py::object geom, py::object rowptr, py::object colidx, py::object values, py::object t_rowptr,
         py::object x, py::object bias, py::object y, py::object act, int threads, int block,
         py::object b_rowptr, py::object b_colidx, py::object b_values) {
        ViewArgs view;
        SparseConvFwd a;
        a.g = geometry(geom);
        a.w = csr(view, rowptr, colidx, values);
        a.used_rowptr = view(t_rowptr, "transposed rowptr");
        a.x = view(x, "x");
        a.bias = view(bias, "bias");
        a.y = view(y, "y");
        a.act = activation(act);
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
      [](py::object geom, py::object t_rowptr, py::object t_colidx, py::object values, py::object t_perm,
         py::object gy, py::object gx, int threads) {
        ViewArgs view;
        SparseConvBwdInput a;
        a.g = geometry(geom);
        a.wt = csr(view, t_rowptr, t_colidx, values);
        a.perm = view(t_perm, "t_perm");
        a.gy = view(gy, "grad_output");
        a.gx = view(gx, "grad_input");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(sparse_conv_bwd_input));
      },
      py::arg("geometry"), py::arg("t_rowptr"), py::arg("t_colidx"), py::arg("values"), py::arg("t_perm"),
      py::arg("gy"), py::arg("gx"), py::arg("threads"),
      "grad_input = col2im(W^T gy); see csrc/sparse/cpu.h.");
  m.def(
      "sparse_conv_bwd_values",
      [](py::object geom, py::object rowptr, py::object colidx, py::object values, py::object t_rowptr,
         py::object x, py::object gy, py::object gvalues, int threads) {
        ViewArgs view;
        SparseConvBwdValues a;
        a.g = geometry(geom);
        a.w = csr(view, rowptr, colidx, values);
        a.used_rowptr = view(t_rowptr, "transposed rowptr");
        a.x = view(x, "x");
        a.gy = view(gy, "grad_output");
        a.gvalues = view(gvalues, "grad_values");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(sparse_conv_bwd_values));
      },
      py::arg("geometry"), py::arg("rowptr"), py::arg("colidx"), py::arg("values"), py::arg("t_rowptr"),
      py::arg("x"), py::arg("gy"), py::arg("gvalues"), py::arg("threads"),
      "gradient of the non-zero values: gy . im2col(x) sampled at W's non-zeros.");
}

}  // namespace hotops
