// Inline helpers shared by the codebook kernel TUs (cpu.cpp: uint8 codes, wide.cpp: 16-bit
// codes), compiled per ISA like them: element access to x and out in float32, bfloat16 or float16, and GCC
// float vectors of 1..16 lanes. Namespace codebook_kernel (not anonymous: two TUs share it) keeps
// them apart from other families' helpers (the ODR rule of docs/architecture.md).
#pragma once
#include <cstdint>

#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace codebook_kernel {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Element i of x or out in its dtype: float32, bfloat16 or float16 (the latter two as uint16 bits).
inline float to_f32(const void* p, DType t, int64_t i) {
  if (t == DType::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return t == DType::f16 ? f16_to_f32(h) : bf16_to_f32(h);
}
inline void store(void* p, DType t, int64_t i, float v) {
  if (t == DType::f32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = t == DType::f16 ? f32_to_f16(v) : f32_to_bf16(v);
}
// v rounded to dtype t (float32: unchanged).
inline float round_to(DType t, float v) {
  return t == DType::f32 ? v : t == DType::f16 ? f16_to_f32(f32_to_f16(v)) : bf16_to_f32(f32_to_bf16(v));
}

// N floats as one GCC vector (never wider than the ISA's registers: wider ones spill).
template <int N>
struct Lanes;
template <>
struct Lanes<1> {
  typedef float type;
};
template <>
struct Lanes<2> {
  typedef float type __attribute__((vector_size(8)));
};
template <>
struct Lanes<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Lanes<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Lanes<16> {
  typedef float type __attribute__((vector_size(64)));
};

}  // namespace codebook_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops
