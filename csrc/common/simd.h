// A small float-vector type for kernel translation units (csrc/<family>/cpu.cpp). Each such TU is
// compiled once per ISA with HOTOPS_ISA naming its namespace; this header picks the register width
// from the compiler's own target macros, so one kernel source yields the scalar, AVX2 and AVX-512
// variants. Everything here lives in that per-ISA namespace and is inline: no symbol compiled for
// one ISA can be linked into another's path.
#pragma once
#ifndef HOTOPS_ISA
#error "simd.h is for kernel TUs compiled per ISA (csrc/<family>/cpu.cpp)"
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/view.h"

namespace hotops {
namespace HOTOPS_ISA {

// ---- per-task scratch ----
// A 64-byte aligned buffer of n elements of a trivial type, freed on scope exit. One spare cache
// line follows the n elements (a full-vector load at any element stays inside), and p is never
// null, even for n <= 0. (Kernel TUs avoid std containers: the ODR
// rule of docs/architecture.md.)
template <typename T>
struct Scratch {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>,
                "Scratch holds plain data only");
  T* p;
  explicit Scratch(int64_t n) {
    const size_t bytes = (static_cast<size_t>(n > 0 ? n : 0) * sizeof(T) + 63) / 64 * 64 + 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---- scalar conversions (tails and the scalar build) ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: renormalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {  // round to nearest even, with overflow to inf
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (a < 0x38800000u) {                                               // result is subnormal or zero
    float af;
    std::memcpy(&af, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(af * 16777216.0f)));
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// ---- the vector type ----
#if defined(__AVX512F__)
struct VecF {
  static constexpr int W = 16;
  __m512 v;
  VecF() = default;
  VecF(__m512 x) : v(x) {}
  static VecF set1(float x) { return _mm512_set1_ps(x); }
  static VecF load(const float* p) { return _mm512_loadu_ps(p); }
  static VecF load(const uint16_t* p, DType t) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if (t == DType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(uint16_t* p, DType t) const {
    __m256i h;
    if (t == DType::f16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      __m512i u = _mm512_castps_si512(v);
      __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r =
          _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
      __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
  friend VecF operator+(VecF a, VecF b) { return _mm512_add_ps(a.v, b.v); }
  friend VecF operator-(VecF a, VecF b) { return _mm512_sub_ps(a.v, b.v); }
  friend VecF operator*(VecF a, VecF b) { return _mm512_mul_ps(a.v, b.v); }
  static VecF fma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
  // max(a, b) returns b where either is NaN, so callers put the running value first and
  // the data second: NaN in the data propagates.
  static VecF max(VecF a, VecF b) { return _mm512_max_ps(a.v, b.v); }
  static VecF min(VecF a, VecF b) { return _mm512_min_ps(a.v, b.v); }
  static VecF select_gt0(VecF m, VecF a, VecF b) {  // m > 0 ? a : b
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m.v, _mm512_setzero_ps(), _CMP_GT_OQ), b.v, a.v);
  }
  static VecF select_lt(VecF x, VecF t, VecF a, VecF b) {  // x < t ? a : b (false for NaN)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, t.v, _CMP_LT_OQ), b.v, a.v);
  }
  static VecF round(VecF x) {
    return _mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static VecF pow2i(VecF n) {  // 2^n for integral n in [-126, 127]
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
  }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float hmax() const { return _mm512_reduce_max_ps(v); }
};
#elif defined(__AVX2__)
struct VecF {
  static constexpr int W = 8;
  __m256 v;
  VecF() = default;
  VecF(__m256 x) : v(x) {}
  static VecF set1(float x) { return _mm256_set1_ps(x); }
  static VecF load(const float* p) { return _mm256_loadu_ps(p); }
  static VecF load(const uint16_t* p, DType t) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (t == DType::f16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(uint16_t* p, DType t) const {
    __m128i h;
    if (t == DType::f16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      __m256i u = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r =
          _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
      __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      r = _mm256_blendv_epi8(r, qnan, nan);
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  friend VecF operator+(VecF a, VecF b) { return _mm256_add_ps(a.v, b.v); }
  friend VecF operator-(VecF a, VecF b) { return _mm256_sub_ps(a.v, b.v); }
  friend VecF operator*(VecF a, VecF b) { return _mm256_mul_ps(a.v, b.v); }
  static VecF fma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  static VecF max(VecF a, VecF b) { return _mm256_max_ps(a.v, b.v); }
  static VecF min(VecF a, VecF b) { return _mm256_min_ps(a.v, b.v); }
  static VecF select_gt0(VecF m, VecF a, VecF b) {
    return _mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(m.v, _mm256_setzero_ps(), _CMP_GT_OQ));
  }
  static VecF select_lt(VecF x, VecF t, VecF a, VecF b) {
    return _mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, t.v, _CMP_LT_OQ));
  }
  static VecF round(VecF x) { return _mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static VecF pow2i(VecF n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
struct VecF {
  static constexpr int W = 1;
  float v;
  VecF() = default;
  VecF(float x) : v(x) {}
  static VecF set1(float x) { return x; }
  static VecF load(const float* p) { return *p; }
  static VecF load(const uint16_t* p, DType t) { return t == DType::f16 ? f16_to_f32(*p) : bf16_to_f32(*p); }
  void store(float* p) const { *p = v; }
  void store(uint16_t* p, DType t) const { *p = t == DType::f16 ? f32_to_f16(v) : f32_to_bf16(v); }
  friend VecF operator+(VecF a, VecF b) { return a.v + b.v; }
  friend VecF operator-(VecF a, VecF b) { return a.v - b.v; }
  friend VecF operator*(VecF a, VecF b) { return a.v * b.v; }
  static VecF fma(VecF a, VecF b, VecF c) { return a.v * b.v + c.v; }
  static VecF max(VecF a, VecF b) { return a.v > b.v ? a.v : b.v; }  // b when either is NaN
  static VecF min(VecF a, VecF b) { return a.v < b.v ? a.v : b.v; }
  static VecF select_gt0(VecF m, VecF a, VecF b) { return m.v > 0.0f ? a : b; }
  static VecF select_lt(VecF x, VecF t, VecF a, VecF b) { return x.v < t.v ? a : b; }
  static VecF round(VecF x) { return std::nearbyint(x.v); }
  static VecF pow2i(VecF n) {
    uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n.v) + 127) << 23;
    float f;
    std::memcpy(&f, &e, 4);
    return f;
  }
  float sum() const { return v; }
  float hmax() const { return v; }
};
#endif

// r[0..W) as the W x W matrix of the floats they hold, transposed in place (r[i] lane j <- r[j]
// lane i). AVX-512: two rounds of unpacks transpose the 4 x 4 blocks inside each 128-bit lane, two
// of lane shuffles move the blocks; AVX2: the same with one 128-bit lane swap.
inline void transpose(VecF (&r)[VecF::W]) {
#if defined(__AVX512F__)
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i].v, r[i + 1].v);
    t[i + 1] = _mm512_unpackhi_ps(r[i].v, r[i + 1].v);
  }
  auto lo64 = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi64 = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  __m512 u[16];
  for (int i = 0; i < 16; i += 4) {  // u[i + c], lane l: column 4 l + c of rows i .. i + 3
    u[i] = lo64(t[i], t[i + 2]);
    u[i + 1] = hi64(t[i], t[i + 2]);
    u[i + 2] = lo64(t[i + 1], t[i + 3]);
    u[i + 3] = hi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 even0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88),
                 odd0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 even1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88),
                 odd1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(even0, even1, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(even0, even1, 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(odd0, odd1, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(odd0, odd1, 0xdd);
  }
#elif defined(__AVX2__)
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i].v, r[i + 1].v);
    t[i + 1] = _mm256_unpackhi_ps(r[i].v, r[i + 1].v);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + c], lane l: column 4 l + c of rows i .. i + 3
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
#else
  (void)r;  // a 1 x 1 matrix is its own transpose
#endif
}

// exp(xc) for xc already within [-87.34, 88.38]: Cody-Waite reduction by ln 2 and a degree-7
// polynomial, max relative error ~2 ulp.
inline VecF exp_in_range(VecF xc) {
  VecF n = VecF::round(xc * VecF::set1(1.44269504088896341f));
  VecF r = VecF::fma(n, VecF::set1(-0.693359375f), xc);
  r = VecF::fma(n, VecF::set1(2.12194440e-4f), r);
  VecF p = VecF::set1(1.9875691500e-4f);
  p = VecF::fma(p, r, VecF::set1(1.3981999507e-3f));
  p = VecF::fma(p, r, VecF::set1(8.3334519073e-3f));
  p = VecF::fma(p, r, VecF::set1(4.1665795894e-2f));
  p = VecF::fma(p, r, VecF::set1(1.6666665459e-1f));
  p = VecF::fma(p, r, VecF::set1(5.0000001201e-1f));
  p = VecF::fma(p, r * r, r + VecF::set1(1.0f));
  return p * VecF::pow2i(n);
}

// exp(x) in float, max relative error ~2 ulp over the normal range; 0 below -87.3, inf above 88.7,
// NaN in -> NaN out (the clamps keep NaN because the data is the second operand of max/min).
inline VecF exp(VecF x) {
  const VecF lo = VecF::set1(-87.33654f), hi = VecF::set1(88.3762626647949f);
  const VecF y = VecF::select_lt(x, lo, VecF::set1(0.0f), exp_in_range(VecF::min(hi, VecF::max(lo, x))));
  return VecF::select_lt(hi, x, VecF::set1(INFINITY), y);
}

// exp(x) for x <= 0 (a score minus its row's maximum or log-sum-exp): exp() without the overflow
// side, which such arguments never reach. 0 below -87.3, NaN in -> NaN out.
inline VecF exp_nonpositive(VecF x) {
  const VecF lo = VecF::set1(-87.33654f);
  return VecF::select_lt(x, lo, VecF::set1(0.0f), exp_in_range(VecF::max(lo, x)));
}

// Dot product of two float32 rows (two accumulators to hide the FMA latency).
inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t W = VecF::W;
  VecF s0 = VecF::set1(0.0f), s1 = VecF::set1(0.0f);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 = VecF::fma(VecF::load(a + i), VecF::load(b + i), s0);
    s1 = VecF::fma(VecF::load(a + i + W), VecF::load(b + i + W), s1);
  }
  for (; i + W <= n; i += W) s0 = VecF::fma(VecF::load(a + i), VecF::load(b + i), s0);
  float s = (s0 + s1).sum();
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Loads/stores of W floats from a row of any float dtype; `n < W` reads a tail through a
// padded buffer, filling the missing lanes with `fill`.
inline VecF load_row(const void* row, DType t, int64_t j, int64_t n = VecF::W, float fill = 0.0f) {
  if (n >= VecF::W) {
    if (t == DType::f32) return VecF::load(static_cast<const float*>(row) + j);
    return VecF::load(static_cast<const uint16_t*>(row) + j, t);
  }
  float buf[VecF::W];
  for (int i = 0; i < VecF::W; ++i) {
    if (i >= n)
      buf[i] = fill;
    else if (t == DType::f32)
      buf[i] = static_cast<const float*>(row)[j + i];
    else if (t == DType::f16)
      buf[i] = f16_to_f32(static_cast<const uint16_t*>(row)[j + i]);
    else
      buf[i] = bf16_to_f32(static_cast<const uint16_t*>(row)[j + i]);
  }
  return VecF::load(buf);
}

inline void store_row(void* row, DType t, int64_t j, VecF v, int64_t n = VecF::W) {
  if (n >= VecF::W) {
    if (t == DType::f32)
      v.store(static_cast<float*>(row) + j);
    else
      v.store(static_cast<uint16_t*>(row) + j, t);
    return;
  }
  float buf[VecF::W];
  v.store(buf);
  for (int i = 0; i < n; ++i) {
    if (t == DType::f32)
      static_cast<float*>(row)[j + i] = buf[i];
    else if (t == DType::f16)
      static_cast<uint16_t*>(row)[j + i] = f32_to_f16(buf[i]);
    else
      static_cast<uint16_t*>(row)[j + i] = f32_to_bf16(buf[i]);
  }
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
