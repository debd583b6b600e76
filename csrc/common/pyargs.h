// The one bridge from Python arrays to Views: torch tensors through their accessors, anything
// else with __dlpack__ (NumPy arrays, ...) through a DLPack capsule that stays alive as long as
// the ViewArgs holding it.
// Included only by the per-family bind.cpp files (pybind11 is not needed by the kernels).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "common/dlpack.h"
#include "common/view.h"

namespace hotops {

namespace detail {

inline DType dtype_of(const dlpack::DataType& t, const char* what) {
  HOTOPS_CHECK(t.lanes == 1, what, ": vector dtypes are not supported");
  switch (t.code) {
    case dlpack::kFloat:
      if (t.bits == 32) return DType::f32;
      if (t.bits == 16) return DType::f16;
      if (t.bits == 64) return DType::f64;
      break;
    case dlpack::kBfloat:
      if (t.bits == 16) return DType::bf16;
      break;
    case dlpack::kInt:
      if (t.bits == 64) return DType::i64;
      if (t.bits == 32) return DType::i32;
      if (t.bits == 8) return DType::i8;
      break;
    case dlpack::kUInt:
      if (t.bits == 8) return DType::u8;
      if (t.bits == 16) return DType::u16;
      break;
    case dlpack::kBool:
      return DType::boolean;
  }
  fail(what, ": unsupported dtype (code ", int(t.code), ", ", int(t.bits), " bits)");
}

}  // namespace detail

// Holds the DLPack capsules of one call alive while its Views are in use:
//   ViewArgs view; View x = view(obj, "x");
class ViewArgs {
 public:
  View operator()(const pybind11::object& obj, const char* what) {
    View v;
    if (obj.is_none()) {
      v.present = false;
      return v;
    }
    if (pybind11::hasattr(obj, "data_ptr") && pybind11::hasattr(obj, "is_cpu")) return torch_view(obj, what);
    HOTOPS_CHECK(pybind11::hasattr(obj, "__dlpack__"), what, " must be a torch tensor or NumPy array");
    pybind11::capsule cap;
    try {  // DLPack 1.0 carries a read-only flag (e.g. NumPy memory maps opened with mode "r")
      cap = obj.attr("__dlpack__")(pybind11::arg("max_version") = pybind11::make_tuple(1, 0));
    } catch (pybind11::error_already_set& e) {
      if (!e.matches(PyExc_TypeError)) throw;
      try {  // a producer older than DLPack 1.0
        cap = obj.attr("__dlpack__")();
      } catch (pybind11::error_already_set& e2) {
        if (!e2.matches(PyExc_BufferError)) throw;
        fail(what,
             " is read-only and its library cannot export read-only memory through DLPack "
             "(NumPy < 2.1); pass a writable array");
      }
    }
    const std::string name = cap.name();
    const dlpack::Tensor* tp;
    if (name == "dltensor_versioned") {
      const auto* mt = cap.get_pointer<dlpack::ManagedTensorVersioned>();
      HOTOPS_CHECK(mt->version.major == 1, what, ": unsupported DLPack major version ", mt->version.major);
      tp = &mt->dl_tensor;
      v.readonly = (mt->flags & dlpack::kFlagReadOnly) != 0;
    } else {
      HOTOPS_CHECK(name == "dltensor", what, ": not a DLPack capsule (", name, ")");
      tp = &cap.get_pointer<dlpack::ManagedTensor>()->dl_tensor;
    }
    const dlpack::Tensor& t = *tp;
    HOTOPS_CHECK(t.device.device_type == dlpack::kCPU || t.device.device_type == dlpack::kCUDAHost, what,
                 " must be in CPU memory for the C++ kernels");
    HOTOPS_CHECK(t.ndim <= 4, what, " has ", t.ndim, " dimensions; at most 4 are supported");
    v.dtype = detail::dtype_of(t.dtype, what);
    v.ndim = t.ndim;
    v.data = static_cast<char*>(t.data) + t.byte_offset;
    int64_t compact = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      v.sizes[d] = t.shape[d];
      v.strides[d] = t.strides ? t.strides[d] : compact;
      compact *= t.shape[d];
    }
    keep_.push_back(std::move(cap));
    return v;
  }

 private:
  // torch tensors are read through their own accessors (data_ptr, shape, stride, dtype): about a
  // third of the cost of __dlpack__, which matters for small layers called many times. The
  // caller keeps the tensor alive for the duration of the call.
  static View torch_view(const pybind11::object& obj, const char* what) {
    HOTOPS_CHECK(obj.attr("is_cpu").cast<bool>(), what, " must be a CPU tensor for the C++ kernels");
    View v;
    const std::string dt = pybind11::str(obj.attr("dtype"));
    static const std::pair<const char*, DType> names[] = {
        {"torch.float32", DType::f32}, {"torch.float16", DType::f16}, {"torch.bfloat16", DType::bf16},
        {"torch.float64", DType::f64}, {"torch.int64", DType::i64},   {"torch.int32", DType::i32},
        {"torch.uint8", DType::u8},    {"torch.uint16", DType::u16},  {"torch.int8", DType::i8},
        {"torch.bool", DType::boolean}};
    bool known = false;
    for (const auto& [name, t] : names) {
      if (dt == name) {
        v.dtype = t;
        known = true;
      }
    }
    HOTOPS_CHECK(known, what, ": unsupported dtype ", dt);
    const auto shape = obj.attr("shape").cast<std::vector<int64_t>>();
    const auto strides = obj.attr("stride")().cast<std::vector<int64_t>>();
    HOTOPS_CHECK(shape.size() <= 4, what, " has ", shape.size(), " dimensions; at most 4 are supported");
    v.ndim = static_cast<int>(shape.size());
    for (int d = 0; d < v.ndim; ++d) {
      v.sizes[d] = shape[d];
      v.strides[d] = strides[d];
    }
    v.data = reinterpret_cast<void*>(obj.attr("data_ptr")().cast<uintptr_t>());
    return v;
  }

  std::vector<pybind11::capsule> keep_;
};

// The one shape of a kernel call from Python: validate the argument struct, release the GIL, run
// the kernel (HOTOPS_DISPATCH(name)). The validator is the family's `check` overload for Args
// unless one is passed (attention checks one struct two ways).
template <typename Args, typename Check, typename Kernel>
decltype(auto) launch(Args& a, Check validate, Kernel kernel) {
  validate(a);
  pybind11::gil_scoped_release nogil;
  return kernel(a);
}
template <typename Args, typename Kernel>
decltype(auto) launch(Args& a, Kernel kernel) {
  return launch(a, [](Args& x) { check(x); }, kernel);
}

}  // namespace hotops
