#include "common/pyargs.h"
#include "infonce/cpu.h"

namespace py = pybind11;

namespace hotops {

void bind_infonce(py::module_& m) {
  m.def(
      "infonce_rows",
      [](py::object shared, py::object own, py::object weight, py::object row_scale, py::object loss,
         py::object lse, py::object tdot, int64_t pos_col, float inv_t, float smoothing, float grad_scale,
         bool want_grad, int threads) {
        ViewArgs view;
        InfoNceRows a;
        a.shared = view(shared, "logits");
        a.own = view(own, "own-negative logits");
        a.weight = view(weight, "neg_weight");
        a.row_scale = view(row_scale, "row_scale");
        a.loss = view(loss, "loss");
        a.lse = view(lse, "lse");
        a.tdot = view(tdot, "tdot");
        a.pos_col = pos_col;
        a.inv_t = inv_t;
        a.smoothing = smoothing;
        a.grad_scale = grad_scale;
        a.want_grad = want_grad;
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(infonce_rows));
      },
      py::arg("shared"), py::arg("own"), py::arg("weight"), py::arg("row_scale"), py::arg("loss"),
      py::arg("lse"), py::arg("tdot"), py::arg("pos_col"), py::arg("inv_t"), py::arg("smoothing"),
      py::arg("grad_scale"), py::arg("want_grad"), py::arg("threads"),
      "InfoNCE row pass over a panel of logits; see csrc/infonce/cpu.h.");
}

}  // namespace hotops
