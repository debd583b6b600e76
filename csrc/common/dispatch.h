// Run-time choice between the per-ISA builds of a kernel (see CMakeLists.txt). A family header
// declares its kernels once per ISA with HOTOPS_FOR_EACH_ISA; callers in baseline-compiled code
// (each family's bind.cpp) call HOTOPS_DISPATCH(name)(args...).
#pragma once
#include "common/cpu_features.h"

#define HOTOPS_FOR_EACH_ISA(DECLARE) \
  namespace scalar {                 \
  DECLARE                            \
  }                                  \
  namespace avx2 {                   \
  DECLARE                            \
  }                                  \
  namespace avx512 {                 \
  DECLARE                            \
  }

#if HOTOPS_HAVE_AVX512
#define HOTOPS_PICK_AVX512(fn) \
  if (isa == ::hotops::Isa::avx512) return &::hotops::avx512::fn;
#else
#define HOTOPS_PICK_AVX512(fn)
#endif
#if HOTOPS_HAVE_AVX2
#define HOTOPS_PICK_AVX2(fn) \
  if (isa == ::hotops::Isa::avx2) return &::hotops::avx2::fn;
#else
#define HOTOPS_PICK_AVX2(fn)
#endif

#define HOTOPS_DISPATCH(fn)                           \
  ([] {                                               \
    const ::hotops::Isa isa = ::hotops::active_isa(); \
    (void)isa;                                        \
    HOTOPS_PICK_AVX512(fn)                            \
    HOTOPS_PICK_AVX2(fn)                              \
    return &::hotops::scalar::fn;                     \
  }())
