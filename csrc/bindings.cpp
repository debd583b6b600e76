// The pybind11 module hotops._C. Each family registers its functions from its own bind.cpp;
// this file lists them and adds the module-wide switches (ISA, CPU extensions, OpenMP runtime). No kernel
// logic lives here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/cpu_features.h"
#include "common/error.h"
#include "common/parallel.h"

namespace py = pybind11;

namespace hotops {
void bind_infonce(py::module_& m);
void bind_sparse(py::module_& m);
void bind_attention(py::module_& m);
void bind_ann(py::module_& m);
void bind_codebook(py::module_& m);
}  // namespace hotops

PYBIND11_MODULE(_C, m) {
  using namespace hotops;
  m.doc() = "hotops compiled CPU kernels (torch-free; arrays arrive through DLPack)";
  py::register_exception<Error>(m, "Error", PyExc_ValueError);

  m.def(
      "isa", [] { return std::string(isa_name(active_isa())); },
      "The SIMD variant the kernels dispatch to now: scalar, avx2 or avx512.");
  m.def(
      "best_isa", [] { return std::string(isa_name(best_isa())); },
      "The widest SIMD variant this CPU runs and this build contains.");
  m.def(
      "set_isa", [](const std::string& name) { set_isa(parse_isa(name.c_str())); }, py::arg("name"),
      "Force a SIMD variant (for tests); refuses one this CPU cannot run.");
  m.def(
      "cpu_has", [](const std::string& name) { return cpu_has(parse_feature(name.c_str())); },
      py::arg("feature"),
      "Whether this CPU, OS and build have an extension: vbmi, avx512_bf16, avx512_fp16 or amx_bf16.");
  m.def(
      "feature", [](const std::string& name) { return feature_on(parse_feature(name.c_str())); },
      py::arg("feature"), "Whether avx512 kernels may use an extension now.");
  m.def(
      "set_feature", [](const std::string& name, bool on) { set_feature(parse_feature(name.c_str()), on); },
      py::arg("feature"), py::arg("on"), "Lets avx512 kernels use an extension, or not (for tests).");

  m.def(
      "set_openmp_parallel", [](uintptr_t fn) { set_openmp_parallel(reinterpret_cast<void*>(fn)); },
      py::arg("gomp_parallel"),
      "Run kernels' threads on the OpenMP runtime whose GOMP_parallel is at this address (0: "
      "hotops' own pool). hotops._backend does this at import for the runtime torch uses.");
  m.def("uses_openmp", &uses_openmp, "Whether kernels run on an OpenMP team (else hotops' own pool).");

  bind_infonce(m);
  bind_sparse(m);
  bind_attention(m);
  bind_ann(m);
  bind_codebook(m);
}
