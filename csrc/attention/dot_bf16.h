// AVX512_BF16 tile products of subsampled attention (included by attention/cpu.cpp, avx512 only).
// vdpbf16ps multiplies 16 pairs of bf16 and adds each pair's two products into one float32 lane,
// so an operand is stored as pairs along the reduction dimension ("pair-packed"): a uint32 holds
// (x[k], x[k + 1]) for even k; AMX tiles read the same layout. Accumulation is float32; P and dS are
// rounded to bf16 before their products (as flash attention does in bf16). Chosen at run time
// (cpu.cpp, bf16_path): AMX tiles where amx_bf16 is on, vdpbf16ps alone where fast_bf16_dot is.
#pragma once
#if defined(__AVX512F__)

#include <cstdint>
#include <cstring>

#include "common/amx.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace bf16dot {

// vdp_product() on AMX tiles (configured by common/amx.h), K2 a multiple of 16. A2 rows up to M
// rounded up to 16 are read (their results are dropped). With ldc > 0 the C rows are evenly
// spaced (C[r] = C[0] + r * ldc) and the tiles load and store them in place, rows up to M rounded
// up to 16 included (they must be writable scratch); otherwise (scattered rows) the results go
// through ctmp, 16 x 64 floats.
template <bool ADD>
HOTOPS_AMX void amx_product(int64_t M, const uint32_t* A2, int64_t lda2, const uint32_t* B2, int64_t ldb2,
                            float* const* C, int64_t ldc, int64_t N, int64_t K2, float* ctmp) {
  const int64_t sa = lda2 * 4, sb = ldb2 * 4, sc = ldc * 4;
  for (int64_t r0 = 0; r0 < M; r0 += 16) {
    const int64_t mr = M - r0 < 16 ? M - r0 : 16;
    for (int64_t c0 = 0; c0 < N; c0 += 64) {
      const int64_t nt = (N - c0) / 16 < 4 ? (N - c0) / 16 : 4;
      float* c = ldc > 0 ? C[0] + r0 * ldc + c0 : nullptr;
      if (ADD && ldc > 0) {
        _tile_loadd(0, c, sc);
        if (nt > 1) _tile_loadd(1, c + 16, sc);
        if (nt > 2) _tile_loadd(2, c + 32, sc);
        if (nt > 3) _tile_loadd(3, c + 48, sc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k = 0; k < K2; k += 16) {
        const uint32_t* b = B2 + k * ldb2 + c0;
        _tile_loadd(4, A2 + r0 * lda2 + k, sa);
        _tile_loadd(5, b, sb);
        _tile_dpbf16ps(0, 4, 5);
        if (nt > 1) {
          _tile_loadd(6, b + 16, sb);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (nt > 2) {
          _tile_loadd(7, b + 32, sb);
          _tile_dpbf16ps(2, 4, 7);
        }
        if (nt > 3) {
          _tile_loadd(5, b + 48, sb);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      const int64_t ld = ldc > 0 ? sc : 256;
      float* out = ldc > 0 ? c : ctmp;
      _tile_stored(0, out, ld);
      if (nt > 1) _tile_stored(1, out + 16, ld);
      if (nt > 2) _tile_stored(2, out + 32, ld);
      if (nt > 3) _tile_stored(3, out + 48, ld);
      if (ldc > 0) continue;
      for (int64_t r = 0; r < mr; ++r)
        for (int64_t v = 0; v < nt; ++v) {
          float* cr = C[r0 + r] + c0 + 16 * v;
          const __m512 x = _mm512_loadu_ps(ctmp + r * 64 + 16 * v);
          _mm512_storeu_ps(cr, ADD ? _mm512_add_ps(_mm512_loadu_ps(cr), x) : x);
        }
    }
  }
}

// n floats -> bf16 (round to nearest even), zero-padded to n_pad (both multiples of 2).
HOTOPS_BF16 inline void to_bf16(const float* src, int64_t n, uint16_t* dst, int64_t n_pad) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
  for (; j < n; ++j) dst[j] = f32_to_bf16(src[j]);
  for (; j < n_pad; ++j) dst[j] = 0;
}

// Two float32 vectors -> 16 words (lo[j] as bf16, hi[j] as bf16 << 16).
HOTOPS_BF16 inline __m512i pair_words(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// A rows x Dp float32 tile pair-packed along its rows for the B operand of a product that
// reduces over the rows: out[s2 * Dp + d] = (x[2 s2][d], x[2 s2 + 1][d]), s2 < rows / 2.
HOTOPS_BF16 inline void pack_pairs_of_rows(const float* x, int64_t rows, int64_t Dp, uint32_t* out) {
  for (int64_t s2 = 0; s2 < rows / 2; ++s2)
    for (int64_t d = 0; d < Dp; d += 16)
      _mm512_storeu_si512(out + s2 * Dp + d, pair_words(_mm512_loadu_ps(x + 2 * s2 * Dp + d),
                                                        _mm512_loadu_ps(x + (2 * s2 + 1) * Dp + d)));
}

// A rows x Dp bf16 tile pair-packed along its rows, as pack_pairs_of_rows does from float32.
HOTOPS_BF16 inline void interleave_rows(const uint16_t* x, int64_t rows, int64_t Dp, uint32_t* out) {
  const auto load = [](const uint16_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  for (int64_t s2 = 0; s2 < rows / 2; ++s2)
    for (int64_t d = 0; d < Dp; d += 16) {
      const __m512i lo = load(x + 2 * s2 * Dp + d), hi = load(x + (2 * s2 + 1) * Dp + d);
      _mm512_storeu_si512(out + s2 * Dp + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

// The transpose of a rows x cols float32 block (row stride ld) pair-packed along its rows:
// out[c * ldo + r2] = (x[2 r2][c], x[2 r2 + 1][c]) for c < cols, r2 < ceil(rows / 2) rounded up
// to 16 (missing rows read 0). Used for P^T and dS^T, whose products reduce over query rows.
// tmp holds ceil(rows / 32) * 16 x cols words.
HOTOPS_BF16 inline void pack_transposed(const float* x, int64_t ld, int64_t rows, int64_t cols, uint32_t* out,
                                        int64_t ldo, uint32_t* tmp) {
  const int64_t R2 = (rows + 31) / 32 * 16;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r2 = 0; r2 < R2; ++r2)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512 lo = 2 * r2 < rows ? _mm512_loadu_ps(x + 2 * r2 * ld + c) : zero;
      const __m512 hi = 2 * r2 + 1 < rows ? _mm512_loadu_ps(x + (2 * r2 + 1) * ld + c) : zero;
      _mm512_storeu_si512(tmp + r2 * cols + c, pair_words(lo, hi));
    }
  transpose_pairs(reinterpret_cast<const uint16_t*>(tmp), 2 * cols, R2, R2, cols, out, ldo);
}

// The per-thread buffers and the tile products of one forward or backward task. A block of up to
// TQ query rows is packed once (rows(): Q, dO), each key tile of TK rows once per product.
template <int TQ, int TK>
struct Tiles {
  int64_t Dp;
  bool amx;
  Scratch<uint32_t> a_rows, b_rows, a_pairs, b_pairs, kt, vt, kp, vp, p2, pt, tmp;
  Scratch<float> ctmp;
  AmxScope tiles;  // last: configured once the buffers exist, released before they go
  float* crow[TQ > TK ? TQ : TK];
  Tiles(int64_t dp, bool use_amx)
      : Dp(dp),
        amx(use_amx),
        a_rows(TQ * dp / 2),
        b_rows(TQ * dp / 2),
        a_pairs(TQ / 2 * dp),
        b_pairs(TQ / 2 * dp),
        kt(dp / 2 * TK),
        vt(dp / 2 * TK),
        kp(TK / 2 * dp),
        vp(TK / 2 * dp),
        p2(TQ * TK / 2),
        pt(TK * TQ / 2),
        tmp(TQ / 2 * TK),
        ctmp(16 * 64),
        tiles(use_amx) {}
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;

  // C rows as pointers; ldc > 0 says they are C[0] + r * ldc (see amx_product).
  template <bool ADD>
  HOTOPS_BF16 void prod(int64_t M, const uint32_t* A2, int64_t lda2, const uint32_t* B2, int64_t ldb2,
                        float* const* C, int64_t ldc, int64_t N, int64_t K2) {
    if (amx && K2 % 16 == 0)
      amx_product<ADD>(M, A2, lda2, B2, ldb2, C, ldc, N, K2, ctmp.p);
    else
      vdp_product<ADD>(M, A2, lda2, B2, ldb2, C, N, K2);
  }
  // The block's mq rows of x as row pairs (B operand over queries), zero up to the pair count
  // rounded up to 16 (x's row mq must be zero when mq is odd).
  HOTOPS_BF16 void block_pairs(const float* x, int64_t mq, uint32_t* out) const {
    const int64_t pairs = (mq + 1) / 2, padded = (pairs + 15) / 16 * 16;
    pack_pairs_of_rows(x, 2 * pairs, Dp, out);
    std::memset(out + pairs * Dp, 0, (padded - pairs) * Dp * sizeof(uint32_t));
  }

  // M float32 rows of Dp -> bf16 rows (pairs along d) into dst.
  HOTOPS_BF16 void rows(const float* x, int64_t M, uint32_t* dst) const {
    for (int64_t i = 0; i < M; ++i)
      to_bf16(x + i * Dp, Dp, reinterpret_cast<uint16_t*>(dst + i * Dp / 2), Dp);
  }
  // A TK x Dp bf16 key or value tile packed for scores() (xt) and for times_tile() (xp).
  // xt[d2 * TK + s] = (x[s][2 d2], x[s][2 d2 + 1]): pairs along d, the B operand of a product
  // that reduces over d.
  HOTOPS_BF16 void pack_for_scores(const uint16_t* x, uint32_t* xt) const {
    transpose_pairs(x, Dp, TK, TK, Dp / 2, xt, TK);
  }
  HOTOPS_BF16 void pack_for_times(const uint16_t* x, uint32_t* xp) const { interleave_rows(x, TK, Dp, xp); }

  // C[i * TK ..] = (A2 row i · X tile^T) * scale, i < M, X packed by pack_for_scores into xt; C has
  // rows up to M rounded up to 16.
  HOTOPS_BF16 void scores(int64_t M, const uint32_t* A2, const uint32_t* xt, float* C, float scale) {
    for (int64_t i = 0; i < M; ++i) crow[i] = C + i * TK;
    prod<false>(M, A2, Dp / 2, xt, TK, crow, TK, TK, Dp / 2);
    if (scale != 1.0f) {
      const __m512 vm = _mm512_set1_ps(scale);
      for (int64_t i = 0; i < M * TK; i += 16)
        _mm512_storeu_ps(C + i, _mm512_mul_ps(_mm512_loadu_ps(C + i), vm));
    }
  }
  // C[i * Dp ..] += P row i (TK floats) · X tile, i < M, X packed by pack_for_times into xp; C has
  // rows up to M rounded up to 16.
  HOTOPS_BF16 void times_tile(int64_t M, const float* P, const uint32_t* xp, float* C) {
    for (int64_t i = 0; i < M; ++i) {
      to_bf16(P + i * TK, TK, reinterpret_cast<uint16_t*>(p2.p + i * TK / 2), TK);
      crow[i] = C + i * Dp;
    }
    prod<true>(M, p2.p, TK / 2, xp, Dp, crow, Dp, Dp, TK / 2);
  }
  // C[s] += P^T row s · Y for s < cnt: P is mq x TK float32, Y the block's rows packed by
  // pack_pairs_of_rows (mq rounded up to even, the odd row zero).
  HOTOPS_BF16 void transposed_times(int64_t cnt, int64_t mq, const float* P, const uint32_t* Y2,
                                    float* const* C) {
    pack_transposed(P, TK, mq, TK, pt.p, TQ / 2, tmp.p);
    prod<true>(cnt, pt.p, TQ / 2, Y2, Dp, C, 0, Dp, (mq + 31) / 32 * 16);  // zero-padded pairs
  }
};

}  // namespace bf16dot
}  // namespace HOTOPS_ISA
}  // namespace hotops

#endif  // __AVX512F__
