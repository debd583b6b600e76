#include "common/view.h"

#include <initializer_list>

namespace hotops {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "float32";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
    case DType::f64:
      return "float64";
    case DType::i64:
      return "int64";
    case DType::i32:
      return "int32";
    case DType::u8:
      return "uint8";
    case DType::u16:
      return "uint16";
    case DType::i8:
      return "int8";
    case DType::boolean:
      return "bool";
  }
  return "unknown";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::f64:
    case DType::i64:
      return 8;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f16:
    case DType::bf16:
    case DType::u16:
      return 2;
    default:
      return 1;
  }
}

void check_view(const View& v, const char* what, int ndim, std::initializer_list<DType> dtypes) {
  HOTOPS_CHECK(v.present, what, " is required");
  HOTOPS_CHECK(v.ndim == ndim, what, " must have ", ndim, " dimensions, got ", v.ndim);
  bool ok = false;
  for (DType t : dtypes) ok = ok || t == v.dtype;
  if (!ok) {
    std::string allowed;
    for (DType t : dtypes) allowed += std::string(allowed.empty() ? "" : ", ") + dtype_name(t);
    fail(what, " has dtype ", dtype_name(v.dtype), ", expected one of: ", allowed);
  }
  for (int d = 0; d < v.ndim; ++d) HOTOPS_CHECK(v.sizes[d] >= 0, what, " has a negative size");
  HOTOPS_CHECK(v.numel() == 0 || v.data != nullptr, what, " has a null data pointer");
}

void check_rows_contiguous(const View& v, const char* what) {
  HOTOPS_CHECK(v.ndim == 0 || v.sizes[v.ndim - 1] <= 1 || v.strides[v.ndim - 1] == 1, what,
               " must have a contiguous last dimension (stride 1), got stride ", v.strides[v.ndim - 1]);
}

void check_contiguous(const View& v, const char* what) {
  int64_t expect = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    HOTOPS_CHECK(v.sizes[d] <= 1 || v.strides[d] == expect, what, " must be contiguous");
    expect *= v.sizes[d];
  }
}

void check_writable(const View& v, const char* what) {
  HOTOPS_CHECK(!v.readonly, what, " is read-only, but the kernel writes to it");
}

}  // namespace hotops
