// The bfloat16 forward of direct layers (the op passes bf16 x^T for linear layers) with
// AVX512_BF16, included by cpu.cpp's AVX-512 build only and run where feature_on(avx512_bf16).
//
// vdpbf16ps multiplies pairs of bfloat16 and adds both products to one float32 lane, so each
// output row takes its non-zeros two at a time: the pair's values (rounded to bfloat16 on the fly,
// as torch's bf16 dense layer rounds its weight) broadcast as one 32-bit lane, and its two source
// rows interleaved lane by lane (vpunpck{l,h}wd within each 128-bit lane: the accumulators then
// hold the pixels in the order (0-3, 8-11, 16-19, 24-27) and (4-7, ...), put back in order once
// per row). A row's odd last non-zero pairs its source row with zeros, never with another column
// (0 * inf would make a NaN the weight does not have). Accumulation is float32.
//
// What it saves is the float32 copy of x and half the source bytes; what it costs is the
// interleave: one shuffle per vdpbf16ps, so an unstructured mask (arbitrary column pairs) issues
// as many vector instructions as the float32 kernel's FMAs. Measured on a shared 2-core Xeon with
// AMX (docs/sparse.md), it runs at the float32 kernel's speed, not faster.
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/amx.h"
#include "sparse/kernel.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace sparse_kernel {

// n (<= 16) float32 values -> bfloat16 (round to nearest even) at dst
HOTOPS_BF16 inline void values_to_bf16(const float* v, int64_t n, uint16_t* dst) {
  const __mmask16 m = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
  const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, v));
  _mm256_mask_storeu_epi16(dst, m, reinterpret_cast<const __m256i&>(h));
}

// acc[2t], acc[2t + 1] += the pair (a, b) of source rows times the pair of values w, for NT
// 32-pixel vectors (the last one masked to `mask` lanes)
template <int NT>
HOTOPS_BF16 inline void dp_pair(const uint16_t* a, const uint16_t* b, __m512 w, __mmask32 last,
                                __m512 (&acc)[4]) {
  for (int t = 0; t < NT; ++t) {
    const __mmask32 m = t == NT - 1 ? last : ~__mmask32(0);
    const __m512i x0 = _mm512_maskz_loadu_epi16(m, a + 32 * t), x1 = _mm512_maskz_loadu_epi16(m, b + 32 * t);
    acc[2 * t] = _mm512_dpbf16_ps(acc[2 * t], (__m512bh)_mm512_unpacklo_epi16(x0, x1), (__m512bh)w);
    acc[2 * t + 1] = _mm512_dpbf16_ps(acc[2 * t + 1], (__m512bh)_mm512_unpackhi_epi16(x0, x1), (__m512bh)w);
  }
}

// Rows [r0, r1) of a direct layer for pixels [p, p + n), n <= 64, from the bfloat16 source rows
// src (row stride ld): like rows_tile, panel by panel with the partial sums parked in `park`
// ((r1 - r0) x 64 floats), `vals` a scratch of the weight's columns-per-row bfloat16 values.
template <int NT, typename Csr>
HOTOPS_BF16 void rows_tile_bf16(const Csr& m, int64_t r0, int64_t r1, const uint16_t* src, int64_t ld,
                                int64_t p, int64_t n, Out out, const float* bias, Act act, float* park,
                                uint16_t* vals) {
  const int64_t rem = n - 32 * (NT - 1);
  const __mmask32 last = rem >= 32 ? ~__mmask32(0) : (__mmask32(1) << rem) - 1u;
  // pixel order of the accumulators (see the top of this file): lanes of (lo, hi) -> pixels
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  constexpr int64_t ROWS = 16;
  float stage[ROWS][64];
  for (int64_t q = 0; q < m.panels; ++q) {
    const bool final_panel = q == m.panels - 1;
    for (int64_t rb = r0; rb < r1; rb += ROWS) {
      const int64_t re = std::min(r1, rb + ROWS);
      for (int64_t r = rb; r < re; ++r) {
        const int64_t k0 = m.begin(r, q), k1 = m.end(r, q), cnt = k1 - k0;
        for (int64_t i = 0; i < cnt; i += 16)
          values_to_bf16(m.val + k0 + i, std::min<int64_t>(16, cnt - i), vals + i);
        const uint32_t* pairs = reinterpret_cast<const uint32_t*>(vals);
        const int32_t* col = m.col + k0;
        __m512 acc[2][4];
        for (int u = 0; u < 2; ++u)
          for (int j = 0; j < 4; ++j) acc[u][j] = _mm512_setzero_ps();
        const uint16_t* s = src + p;
        int64_t k = 0;
        for (; k + 4 <= cnt; k += 4) {  // two pairs, two sets of accumulators (latency)
          dp_pair<NT>(s + col[k] * ld, s + col[k + 1] * ld,
                      _mm512_castsi512_ps(_mm512_set1_epi32(pairs[k / 2])), last, acc[0]);
          dp_pair<NT>(s + col[k + 2] * ld, s + col[k + 3] * ld,
                      _mm512_castsi512_ps(_mm512_set1_epi32(pairs[k / 2 + 1])), last, acc[1]);
        }
        if (k + 2 <= cnt) {
          dp_pair<NT>(s + col[k] * ld, s + col[k + 1] * ld,
                      _mm512_castsi512_ps(_mm512_set1_epi32(pairs[k / 2])), last, acc[0]);
          k += 2;
        }
        if (k < cnt) {  // the odd one: its source row paired with zeros (value pair (v, 0))
          const __m512 w = _mm512_castsi512_ps(_mm512_set1_epi32(vals[k]));
          for (int t = 0; t < NT; ++t) {
            const __mmask32 mk = t == NT - 1 ? last : ~__mmask32(0);
            const __m512i x0 = _mm512_maskz_loadu_epi16(mk, s + col[k] * ld + 32 * t),
                          z = _mm512_setzero_si512();
            acc[1][2 * t] =
                _mm512_dpbf16_ps(acc[1][2 * t], (__m512bh)_mm512_unpacklo_epi16(x0, z), (__m512bh)w);
            acc[1][2 * t + 1] =
                _mm512_dpbf16_ps(acc[1][2 * t + 1], (__m512bh)_mm512_unpackhi_epi16(x0, z), (__m512bh)w);
          }
        }
        float* parked = park + (r - r0) * 64;
        for (int t = 0; t < NT; ++t) {
          const __m512 lo = _mm512_add_ps(acc[0][2 * t], acc[1][2 * t]);
          const __m512 hi = _mm512_add_ps(acc[0][2 * t + 1], acc[1][2 * t + 1]);
          __m512 y0 = _mm512_permutex2var_ps(lo, first, hi), y1 = _mm512_permutex2var_ps(lo, second, hi);
          if (q) {
            y0 = _mm512_add_ps(y0, _mm512_loadu_ps(parked + 32 * t));
            y1 = _mm512_add_ps(y1, _mm512_loadu_ps(parked + 32 * t + 16));
          }
          if (!final_panel) {
            _mm512_storeu_ps(parked + 32 * t, y0);
            _mm512_storeu_ps(parked + 32 * t + 16, y1);
            continue;
          }
          const VecF b = VecF::set1(bias ? bias[r] : 0.0f);
          const VecF e0 = epilogue(VecF(y0), b, act), e1 = epilogue(VecF(y1), b, act);
          if (out.ps == 1) {
            const int64_t n0 = std::min<int64_t>(16, n - 32 * t), n1 = std::min<int64_t>(16, n - 32 * t - 16);
            if (n0 > 0) out.put(r - r0, p + 32 * t, e0, n0);
            if (n1 > 0) out.put(r - r0, p + 32 * t + 16, e1, n1);
          } else {
            e0.store(stage[r - rb] + 32 * t);
            e1.store(stage[r - rb] + 32 * t + 16);
          }
        }
      }
      if (!final_panel || out.ps == 1) continue;
      for (int64_t i = 0; i < n; ++i)  // a strided output (linear): pixel-major, as rows_tile does
        for (int64_t r = 0; r < re - rb; ++r) out.set(rb - r0 + r, p + i, stage[r][i]);
    }
  }
}

// The direct forward on bfloat16 x: work items (image, 64-pixel tile, group, block of rows).
template <typename Csr>
void direct_fwd_bf16(const SparseConvFwd& a, const Csr& w) {
  const ConvGeom& g = a.g;
  const int64_t P = g.P(), tiles = (P + 63) / 64, outer = g.N * tiles * g.G;
  const int64_t want = 8 * a.threads;  // row blocks enough for every thread to claim several
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(g.Og(), (want + outer - 1) / outer));
  const int64_t rbs = (g.Og() + rb - 1) / rb, items = outer * rb;
  const float* bias = a.bias.present ? a.bias.ptr<float>() : nullptr;
  w.check_rows(0, g.O);
  parallel_claim(items, a.threads, [&](auto claim) {
    Scratch<float> park(rbs * 64);
    Scratch<uint16_t> vals(g.K() + 16);
    for (int64_t it; (it = claim()) < items;) {
      const int64_t b = it % rb, grp = (it / rb) % g.G, t = (it / (rb * g.G)) % tiles,
                    n = it / (rb * g.G * tiles);
      const int64_t r0 = grp * g.Og() + b * rbs, r1 = std::min((grp + 1) * g.Og(), r0 + rbs);
      if (r0 >= r1) continue;
      const int64_t p0 = t * 64, len = std::min<int64_t>(64, P - p0);
      const uint16_t* src = a.x.ptr<uint16_t>() + n * a.x.stride(0) + grp * g.Cg() * a.x.stride(1);
      const Out out = Out::at(a.y, n, r0, 0);
      // the rows' non-zeros hold group-local columns; r indexes the CSR, out its own rows from r0
      if (len > 32)
        rows_tile_bf16<2, Csr>(w, r0, r1, src, a.x.stride(1), p0, len, out, bias, a.act, park.p, vals.p);
      else
        rows_tile_bf16<1, Csr>(w, r0, r1, src, a.x.stride(1), p0, len, out, bias, a.act, park.p, vals.p);
    }
  });
}

}  // namespace sparse_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops
#endif
