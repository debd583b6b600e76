// A torch-free view of a strided array (at most 4 dimensions): pointer, dtype, sizes and strides
// (in elements). Built by ViewArgs (common/pyargs.h) in each family's bind.cpp: torch tensors
// through their accessors, NumPy arrays and other __dlpack__ producers through a DLPack capsule.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/error.h"

namespace hotops {

enum class DType : uint8_t { f32, f16, bf16, f64, i64, i32, u8, u16, i8, boolean };

const char* dtype_name(DType t);
int dtype_size(DType t);

struct View {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t sizes[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};
  bool present = true;    // false for an optional argument passed as None
  bool readonly = false;  // the producer marked the memory read-only (DLPack 1.0 flag)

  int64_t size(int d) const { return sizes[d]; }
  int64_t stride(int d) const { return strides[d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
  }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// Checks shared by every entry point; `what` names the argument in the message.
void check_view(const View& v, const char* what, int ndim, std::initializer_list<DType> dtypes);
void check_rows_contiguous(const View& v, const char* what);  // last dim has stride 1
void check_contiguous(const View& v, const char* what);
void check_writable(const View& v, const char* what);  // for outputs and in-place arguments

}  // namespace hotops
