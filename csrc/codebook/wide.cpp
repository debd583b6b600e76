// Per-ISA kernels for 16-bit codes (see cpu.h). A second kernel TU of the codebook family,
// compiled once per ISA like cpu.cpp; its helpers live in namespace `wide` inside the ISA
// namespace, so they cannot meet cpu.cpp's of the same name.
//
// Batch 1: a task takes a run of rows; per row it streams the J * M codes, gathers each codeword
// (8 values, converted to float32), adds the M codewords of an input group and multiplies them
// with x's 8 inputs into four independent 8-lane sums (so four gathers are in flight), then
// reduces them. The codeword of code j + kAhead is prefetched while code j is used: with a 2 MiB
// fp32 codebook not every gather hits L2.
// Batch 2..16 (a chunk of BC rows, x transposed to (K, BC)): per row and input group, the codeword
// is gathered once and each of its 8 values is broadcast into an FMA with the 8 BC-wide columns
// of x, R rows at a time (x's columns are loaded once per R rows).
#include <cstdlib>
#include <cstring>
#include <new>

#include "codebook/cpu.h"
#include "codebook/kernel.h"
#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace wide {

typedef float V8 __attribute__((vector_size(32)));

using namespace codebook_kernel;

// Codeword c of a codebook in storage type CT, as 8 floats.
template <DType CT>
inline V8 word(const void* cb, int64_t c) {
  V8 v;
  if constexpr (CT == DType::f32) {
    std::memcpy(&v, static_cast<const float*>(cb) + c * 8, sizeof(v));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(cb) + c * 8;
#if defined(__AVX2__)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h));
    __m256 f;
    if constexpr (CT == DType::f16)
      f = _mm256_cvtph_ps(raw);
    else
      f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    std::memcpy(&v, &f, sizeof(v));
#else
    float f[8];
    for (int t = 0; t < 8; ++t) f[t] = CT == DType::f16 ? f16_to_f32(h[t]) : bf16_to_f32(h[t]);
    std::memcpy(&v, f, sizeof(v));
#endif
  }
  return v;
}

template <DType CT>
constexpr int64_t elem_bytes() {
  return CT == DType::f32 ? 4 : 2;
}

inline float hsum(V8 v) {
  float f[8];
  std::memcpy(f, &v, sizeof(f));
  return ((f[0] + f[4]) + (f[1] + f[5])) + ((f[2] + f[6]) + (f[3] + f[7]));
}

// Whether every code of rows [r0, r1) is below C (C = 65536 needs no check).
inline bool codes_in_range(const uint16_t* codes, int64_t per_row, int64_t r0, int64_t r1, int64_t C) {
  if (C >= 65536) return true;
  uint16_t top = 0;
  for (int64_t i = r0 * per_row; i < r1 * per_row; ++i) top = codes[i] > top ? codes[i] : top;
  return top < C;
}

// The row group of stored row r, moving forward from *o.
inline int64_t group_of(const int64_t* gp, int64_t r, int64_t o) {
  while (gp[o + 1] <= r) ++o;
  return o;
}

constexpr int64_t kAhead = 32;  // codes between a codeword's prefetch and its use

// Batch 1: sums[r - r0] = row r of the unscaled weight . x for rows [r0, r1).
template <DType CT>
void rows_b1(const WideFormat& w, const float* x, int64_t r0, int64_t r1, float* sums) {
  const int64_t J = w.in_groups(), M = w.num_codebooks(), C = w.codebook_size(), L = J * M;
  const auto* codes = w.codes.ptr<const uint16_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const char* cbs = static_cast<const char*>(w.codebooks.data);
  const int64_t cb_bytes = C * 8 * elem_bytes<CT>();  // one codebook
  int64_t o = 0;
  for (int64_t r = r0; r < r1; ++r) {
    o = group_of(gp, r, o);
    const char* cb = cbs + o * M * cb_bytes;
    const uint16_t* cr = codes + r * L;
    V8 s[4] = {};
    if (M == 1) {
      int64_t j = 0;
      for (; j + 4 <= J; j += 4) {
        if (j + kAhead + 4 <= J)
          for (int u = 0; u < 4; ++u) __builtin_prefetch(cb + cr[j + kAhead + u] * 8 * elem_bytes<CT>());
        for (int u = 0; u < 4; ++u) {
          V8 xv;
          std::memcpy(&xv, x + (j + u) * 8, sizeof(xv));
          s[u] += word<CT>(cb, cr[j + u]) * xv;
        }
      }
      for (; j < J; ++j) {
        V8 xv;
        std::memcpy(&xv, x + j * 8, sizeof(xv));
        s[0] += word<CT>(cb, cr[j]) * xv;
      }
    } else {
      for (int64_t j = 0; j < J; ++j) {
        if (j + kAhead < J)
          for (int64_t m = 0; m < M; ++m)
            __builtin_prefetch(cb + m * cb_bytes + cr[(j + kAhead) * M + m] * 8 * elem_bytes<CT>());
        V8 v = word<CT>(cb, cr[j * M]);
        for (int64_t m = 1; m < M; ++m) v += word<CT>(cb + m * cb_bytes, cr[j * M + m]);
        V8 xv;
        std::memcpy(&xv, x + j * 8, sizeof(xv));
        s[j & 3] += v * xv;
      }
    }
    sums[r - r0] = hsum((s[0] + s[1]) + (s[2] + s[3]));
  }
}

// Batch BC in 2..16: sums[(r - r0) * BC + b] = row r of the unscaled weight . x[b] for rows
// [r0, r1); xT is the chunk (K, BC) float32 (zeros past the batch). ONE: M == 1.
template <DType CT, int BC, bool ONE>
void rows_bc(const WideFormat& w, const float* xT, int64_t r0, int64_t r1, float* sums) {
  constexpr int VW = BC < VecF::W ? BC : (VecF::W < 2 ? 2 : VecF::W), NV = BC / VW;
  constexpr int R = NV == 1 ? 4 : 2;  // rows at once: R * NV sums and 8 * NV x vectors
  constexpr int64_t ahead = 8;        // input groups between a codeword's prefetch and its use
  using V = typename Lanes<VW>::type;
  const int64_t J = w.in_groups(), M = ONE ? 1 : w.num_codebooks(), C = w.codebook_size(), L = J * M;
  const auto* codes = w.codes.ptr<const uint16_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const char* cbs = static_cast<const char*>(w.codebooks.data);
  const int64_t cb_bytes = C * 8 * elem_bytes<CT>();
  int64_t o = 0;
  for (int64_t r = r0; r < r1; r += R) {
    const int nr = static_cast<int>(min64(R, r1 - r));
    const char* cb[R];
    const uint16_t* cr[R];
    for (int k = 0; k < R; ++k) {  // rows past r1 repeat the last one (their sums are dropped)
      const int64_t rk = r + (k < nr ? k : nr - 1);
      o = group_of(gp, rk, o);
      cb[k] = cbs + o * M * cb_bytes;
      cr[k] = codes + rk * L;
    }
    V s[R][NV] = {};
    for (int64_t j = 0; j < J; ++j) {
      if (j + ahead < J)
#pragma GCC unroll 4
        for (int k = 0; k < R; ++k)
          for (int64_t m = 0; m < M; ++m)
            __builtin_prefetch(cb[k] + m * cb_bytes + cr[k][(j + ahead) * M + m] * 8 * elem_bytes<CT>());
      V xv[8][NV];
      std::memcpy(xv, xT + j * 8 * BC, sizeof(xv));
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) {
        alignas(32) float wbuf[8];
        const float* wp = wbuf;
        if constexpr (CT == DType::f32 && ONE) {
          wp = reinterpret_cast<const float*>(cb[k]) + cr[k][j] * 8;
        } else {
          V8 v = word<CT>(cb[k], cr[k][j * M]);
          for (int64_t m = 1; m < M; ++m) v += word<CT>(cb[k] + m * cb_bytes, cr[k][j * M + m]);
          std::memcpy(wbuf, &v, sizeof(wbuf));
        }
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t)
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) s[k][v] += xv[t][v] * wp[t];
      }
    }
    for (int k = 0; k < nr; ++k) std::memcpy(sums + (r - r0 + k) * BC, s[k], sizeof(s[k]));
  }
}

constexpr int64_t kRowsPerTask = 32;
constexpr int64_t kWidenBatch = 4;  // half-precision codebooks are widened to float32 from here

// One chunk of Bc <= BC batch rows from b0: xc is (K,) float32 for BC = 1, else (K, BC).
template <DType CT, int BC>
bool chunk(const WideMatmul& a, int64_t b0, int64_t Bc, const float* xc) {
  const WideFormat& w = a.w;
  const int64_t N = w.rows(), L = w.in_groups() * w.num_codebooks(), C = w.codebook_size();
  const auto* codes = w.codes.ptr<const uint16_t>();
  const int64_t* perm = a.perm.present ? a.perm.ptr<const int64_t>() : nullptr;
  const float* bias = a.bias.present ? a.bias.ptr<const float>() : nullptr;
  const float* scales = w.scales.ptr<const float>();
  const int64_t ldo = a.out.stride(0), tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  int ok = 1;
  parallel_claim(tasks, a.threads, [&](auto claim) {
    alignas(64) float sums[kRowsPerTask * BC];
    for (int64_t t; (t = claim()) < tasks;) {
      const int64_t r0 = t * kRowsPerTask, r1 = min64(N, r0 + kRowsPerTask);
      if (!codes_in_range(codes, L, r0, r1, C)) {
        __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
        continue;
      }
      if constexpr (BC == 1)
        rows_b1<CT>(w, xc, r0, r1, sums);
      else if (w.num_codebooks() == 1)
        rows_bc<CT, BC, true>(w, xc, r0, r1, sums);
      else
        rows_bc<CT, BC, false>(w, xc, r0, r1, sums);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t col = perm ? perm[r] : r;
        const float add = bias ? bias[col] : 0.0f;
        for (int64_t b = 0; b < Bc; ++b)
          store(a.out.data, a.out.dtype, (b0 + b) * ldo + col, scales[r] * sums[(r - r0) * BC + b] + add);
      }
    }
  });
  return ok != 0;
}

template <DType CT>
bool matmul(const WideMatmul& a) {
  const int64_t B = a.x.size(0), K = a.w.in_features();
  Scratch<float> xc(K * 16);
  for (int64_t b0 = 0; b0 < B; b0 += 16) {
    const int64_t Bc = min64(16, B - b0), BC = Bc <= 1 ? 1 : Bc <= 2 ? 2 : Bc <= 4 ? 4 : Bc <= 8 ? 8 : 16;
    for (int64_t b = 0; b < BC; ++b)
      for (int64_t k = 0; k < K; ++k)
        xc.p[k * BC + b] = b < Bc ? to_f32(a.x.data, a.x.dtype, (b0 + b) * a.x.stride(0) + k) : 0.0f;
    bool ok;
    switch (BC) {
      case 1:
        ok = chunk<CT, 1>(a, b0, Bc, xc.p);
        break;
      case 2:
        ok = chunk<CT, 2>(a, b0, Bc, xc.p);
        break;
      case 4:
        ok = chunk<CT, 4>(a, b0, Bc, xc.p);
        break;
      case 8:
        ok = chunk<CT, 8>(a, b0, Bc, xc.p);
        break;
      default:
        ok = chunk<CT, 16>(a, b0, Bc, xc.p);
        break;
    }
    if (!ok) return false;
  }
  return true;
}

template <DType CT, typename Out>
bool dequantize_rows(const WideDequantize& a, int64_t r0, int64_t r1) {
  const WideFormat& w = a.w;
  const int64_t J = w.in_groups(), M = w.num_codebooks(), C = w.codebook_size(), L = J * M;
  const auto* codes = w.codes.ptr<const uint16_t>();
  if (!codes_in_range(codes, L, r0, r1, C)) return false;
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const char* cbs = static_cast<const char*>(w.codebooks.data);
  const int64_t cb_bytes = C * 8 * elem_bytes<CT>();
  const float* scales = w.scales.ptr<const float>();
  int64_t o = 0;
  for (int64_t r = r0; r < r1; ++r) {
    o = group_of(gp, r, o);
    const char* cb = cbs + o * M * cb_bytes;
    const uint16_t* cr = codes + r * L;
    Out* row = static_cast<Out*>(a.out.data) + (r - a.row_begin) * a.out.stride(0);
    const float s = scales[r];
    for (int64_t j = 0; j < J; ++j) {
      V8 v = word<CT>(cb, cr[j * M]);
      for (int64_t m = 1; m < M; ++m) v += word<CT>(cb + m * cb_bytes, cr[j * M + m]);
      v *= s;
      if constexpr (sizeof(Out) == 4) {
        std::memcpy(row + j * 8, &v, sizeof(v));
      } else {
        float f[8];
        std::memcpy(f, &v, sizeof(f));
        for (int t = 0; t < 8; ++t) row[j * 8 + t] = f32_to_bf16(f[t]);
      }
    }
  }
  return true;
}

template <DType CT>
bool dequantize(const WideDequantize& a) {
  int ok = 1;
  parallel_for(a.row_end - a.row_begin, 16, a.threads, [&](int64_t s0, int64_t s1) {
    const int64_t r0 = a.row_begin + s0, r1 = a.row_begin + s1;
    const bool done = a.out.dtype == DType::f32 ? dequantize_rows<CT, float>(a, r0, r1)
                                                : dequantize_rows<CT, uint16_t>(a, r0, r1);
    if (!done) __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
  });
  return ok != 0;
}

// n floats that stay allocated for this thread (grown as needed, freed at thread exit).
inline float* widened_buffer(int64_t n) {
  struct Buffer {
    float* p = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(p); }
  };
  static thread_local Buffer buf;
  if (buf.size < n) {
    std::free(buf.p);
    buf.p = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n * 4 + 63) / 64 * 64));
    buf.size = buf.p ? n : 0;
    if (!buf.p) throw std::bad_alloc();
  }
  return buf.p;
}

}  // namespace wide

namespace wide {
bool matmul_any(const WideMatmul& a) {
  if (a.x.size(0) == 0 || a.w.rows() == 0) return true;
  if (a.w.codebooks.dtype != DType::f32 && a.x.size(0) >= wide::kWidenBatch) {
    // Half-precision codebooks at batch >= 4: widened to float32 once per call (a few microseconds
    // per 65536 codewords), so the FMAs broadcast codeword values straight from memory.
    // The buffer is kept per calling thread: a fresh 2 MiB allocation each call costs as much
    // again in page faults as the conversion.
    const int64_t n = a.w.codebooks.numel();
    float* cb = widened_buffer(n);
    const auto* h = a.w.codebooks.ptr<const uint16_t>();
    int64_t i = 0;
    for (; i + VecF::W <= n; i += VecF::W) VecF::load(h + i, a.w.codebooks.dtype).store(cb + i);
    for (; i < n; ++i) cb[i] = a.w.codebooks.dtype == DType::f16 ? f16_to_f32(h[i]) : bf16_to_f32(h[i]);
    WideMatmul wide32 = a;
    wide32.w.codebooks.data = cb;
    wide32.w.codebooks.dtype = DType::f32;
    return matmul<DType::f32>(wide32);
  }
  switch (a.w.codebooks.dtype) {
    case DType::f32:
      return matmul<DType::f32>(a);
    case DType::f16:
      return matmul<DType::f16>(a);
    default:
      return matmul<DType::bf16>(a);
  }
}

bool dequantize_any(const WideDequantize& a) {
  if (a.row_end == a.row_begin) return true;
  switch (a.w.codebooks.dtype) {
    case DType::f32:
      return dequantize<DType::f32>(a);
    case DType::f16:
      return dequantize<DType::f16>(a);
    default:
      return dequantize<DType::bf16>(a);
  }
}
}  // namespace wide

void codebook_wide_matmul(const WideMatmul& a) {
  if (!wide::matmul_any(a)) refuse_codes(a.w.codebook_size());
}

void codebook_wide_dequantize(const WideDequantize& a) {
  if (!wide::dequantize_any(a)) refuse_codes(a.w.codebook_size());
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
