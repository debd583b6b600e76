#include "attention/cpu.h"
#include "common/pyargs.h"

namespace py = pybind11;

namespace hotops {

// The arguments forward and backward share (internal to this file).
static SsaArgs common_args(ViewArgs& view, const py::object& q, const py::object& k, const py::object& v,
                           const py::object& idx, const py::object& kpos, const py::object& qpos,
                           const py::object& out, const py::object& lse, float scale, bool causal,
                           int threads) {
  SsaArgs a;
  a.q = view(q, "q");
  a.k = view(k, "k");
  a.v = view(v, "v");
  a.idx = view(idx, "indices");
  a.kpos = view(kpos, "key positions");
  a.qpos = view(qpos, "query positions");
  a.out = view(out, "out");
  a.lse = view(lse, "lse");
  a.scale = scale;
  a.causal = causal;
  a.threads = threads;
  return a;
}

void bind_attention(py::module_& m) {
  m.def(
      "ssa_forward",
      [](py::object q, py::object k, py::object v, py::object idx, py::object kpos, py::object qpos,
         py::object out, py::object lse, float scale, bool causal, int threads) {
        ViewArgs view;
        SsaArgs a = common_args(view, q, k, v, idx, kpos, qpos, out, lse, scale, causal, threads);
        launch(a, check_forward, HOTOPS_DISPATCH(ssa_forward));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("idx"), py::arg("kpos"), py::arg("qpos"),
      py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("causal"), py::arg("threads"),
      "Subsampled attention forward into out and lse; see csrc/attention/cpu.h.");
  m.def(
      "ssa_backward",
      [](py::object q, py::object k, py::object v, py::object idx, py::object kpos, py::object qpos,
         py::object out, py::object lse, py::object dout, py::object dq, py::object dk, py::object dv,
         float scale, bool causal, int threads) {
        ViewArgs view;
        SsaArgs a = common_args(view, q, k, v, idx, kpos, qpos, out, lse, scale, causal, threads);
        a.dout = view(dout, "grad_out");
        a.dq = view(dq, "dq");
        a.dk = view(dk, "dk");
        a.dv = view(dv, "dv");
        launch(a, check_backward, HOTOPS_DISPATCH(ssa_backward));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("idx"), py::arg("kpos"), py::arg("qpos"),
      py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("scale"), py::arg("causal"), py::arg("threads"),
      "Subsampled attention backward (recomputes the scores) into dq, dk, dv; see csrc/attention/cpu.h.");
}

}  // namespace hotops
