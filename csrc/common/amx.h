// AVX512_BF16 and AMX-BF16 for the avx512 build's kernels: the function attributes that enable them
// (the TU is compiled for AVX-512 only; these run where feature_on() says so) and the AMX tile
// configuration the kernels share.
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

#include "common/simd.h"

#define HOTOPS_BF16 __attribute__((target("avx512bf16,avx512bw,avx512vl,avx512f")))
#define HOTOPS_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512bw,avx512vl,avx512f")))

namespace hotops {
namespace HOTOPS_ISA {

// C[r][c0 + 16 v + j] (+)= sum_{k2 < K2} dot(A2[r * lda2 + k2], B2[k2 * ldb2 + c0 + 16 v + j]) for
// r < MR, v < NV: MR x NV accumulators, a broadcast A word and NV B vectors per vdpbf16ps round.
template <int MR, int NV, bool ADD>
HOTOPS_BF16 inline void vdp_block(const uint32_t* A2, int64_t lda2, const uint32_t* B2, int64_t ldb2,
                                  float* const* C, int64_t c0, int64_t K2) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B2 + k2 * ldb2 + c0 + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A2[r * lda2 + k2]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = C[r] + c0 + 16 * v;
      _mm512_storeu_ps(c, ADD ? _mm512_add_ps(_mm512_loadu_ps(c), acc[r][v]) : acc[r][v]);
    }
}

template <int MR, bool ADD>
HOTOPS_BF16 inline void vdp_rows(const uint32_t* A2, int64_t lda2, const uint32_t* B2, int64_t ldb2,
                                 float* const* C, int64_t N, int64_t K2) {
  int64_t c0 = 0;
  for (; c0 + 64 <= N; c0 += 64) vdp_block<MR, 4, ADD>(A2, lda2, B2, ldb2, C, c0, K2);
  const int64_t nv = (N - c0) / 16;
  if (nv == 3) vdp_block<MR, 3, ADD>(A2, lda2, B2, ldb2, C, c0, K2);
  if (nv == 2) vdp_block<MR, 2, ADD>(A2, lda2, B2, ldb2, C, c0, K2);
  if (nv == 1) vdp_block<MR, 1, ADD>(A2, lda2, B2, ldb2, C, c0, K2);
}

// C[r][0..N) (+)= A2 row r . B2 for r < M on vdpbf16ps: A2 rows of K2 bf16 pairs (pairs along the
// reduction), B2 K2 rows of N pair words (N a multiple of 16), C rows given as pointers. Narrow
// products (N < 48) take 8 rows at a time, so that at least 8 sums are in flight (the
// instruction's latency is 6 cycles on Zen 4); the summation order is the same either way.
template <bool ADD>
HOTOPS_BF16 void vdp_product(int64_t M, const uint32_t* A2, int64_t lda2, const uint32_t* B2, int64_t ldb2,
                             float* const* C, int64_t N, int64_t K2) {
  int64_t r = 0;
  if (N < 48)
    for (; r + 8 <= M; r += 8) vdp_rows<8, ADD>(A2 + r * lda2, lda2, B2, ldb2, C + r, N, K2);
  for (; r + 4 <= M; r += 4) vdp_rows<4, ADD>(A2 + r * lda2, lda2, B2, ldb2, C + r, N, K2);
  for (; r < M; ++r) vdp_rows<1, ADD>(A2 + r * lda2, lda2, B2, ldb2, C + r, N, K2);
}

// r[0..16) as the 16 x 16 matrix of 32-bit words they hold, transposed in place (simd.h's
// transpose on the same bits).
HOTOPS_BF16 inline void transpose_words(__m512i r[16]) {
  VecF f[16];
  for (int i = 0; i < 16; ++i) f[i] = _mm512_castsi512_ps(r[i]);
  transpose(f);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(f[i].v);
}

// The bf16 pairs (32-bit words) of rows [0, live) of a row-major bf16 matrix x (row stride ldx
// elements), transposed into the layout of a tile's B operand: out[k2 * ldo + r] = (x[r][2 k2],
// x[r][2 k2 + 1]) for k2 < pairs and r < R (a multiple of 16), zero for rows from live on. 16 x 16
// word blocks through registers (shuffles: a 16-lane gather per output vector is about twice
// slower on Zen 4 and Sapphire Rapids).
HOTOPS_BF16 inline void transpose_pairs(const uint16_t* x, int64_t ldx, int64_t live, int64_t R,
                                        int64_t pairs, uint32_t* out, int64_t ldo) {
  __m512i r[16];
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const int64_t n = live - r0 <= 0 ? 0 : live - r0 >= 16 ? 16 : live - r0;
    for (int64_t k0 = 0; k0 < pairs; k0 += 16) {
      const int64_t w = pairs - k0 < 16 ? pairs - k0 : 16;
      const __mmask16 mask = static_cast<__mmask16>((1u << w) - 1u);
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < n ? _mm512_maskz_loadu_epi32(mask, x + (r0 + i) * ldx + 2 * k0) : _mm512_setzero_si512();
      transpose_words(r);
      for (int64_t j = 0; j < w; ++j) _mm512_storeu_si512(out + (k0 + j) * ldo + r0, r[j]);
    }
  }
}

// All eight tiles 16 rows x 64 bytes: C is 16 x 16 float32, A 16 rows x 16 bf16 pairs, B 16 pair
// rows x 16 columns (tdpbf16ps: C[i][j] += sum_k A[i][2k, 2k+1] . B[k][j][0, 1]).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Loaded by each thread before its first tile instruction, released after its last.
HOTOPS_AMX inline void amx_begin() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}
HOTOPS_AMX inline void amx_end() { _tile_release(); }

// The tile configuration for one thread's scope (released on the way out, exceptions included).
struct AmxScope {
  explicit AmxScope(bool on = true) : on_(on) {
    if (on_) amx_begin();
  }
  ~AmxScope() {
    if (on_) amx_end();
  }
  AmxScope(const AmxScope&) = delete;
  AmxScope& operator=(const AmxScope&) = delete;

 private:
  bool on_;
};

}  // namespace HOTOPS_ISA
}  // namespace hotops

#endif  // __AVX512F__
