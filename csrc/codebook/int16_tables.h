// Quantized lookup tables of the batch-1 (GEMV) path, AVX-512BW builds only: int16 tables held in
// registers and looked up by vpermi2w, or with AVX512_VBMI (run-time check) the same entries as two
// byte planes looked up by vpermi2b (see cpu.cpp's header). Included by cpu.cpp alone.
#pragma once
#include <cstdint>

#include "codebook/tables.h"

#if defined(__AVX512BW__)
namespace hotops {
namespace HOTOPS_ISA {
namespace codebook_kernel {

constexpr int64_t kTileI16 = 32;  // int16 tables per tile: 32 x 512 bytes, L1-resident

// The largest |T[i]| of i < count, or -1 when one is not finite.
inline float table_max(const float* T, int64_t count) {
  __m512 mx = _mm512_setzero_ps(), nonfinite = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 k = count - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(k, T + i);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    nonfinite = _mm512_add_ps(nonfinite, _mm512_mul_ps(v, zero));  // NaN once any entry is NaN/Inf
  }
  return _mm512_reduce_add_ps(nonfinite) != 0.0f ? -1.0f : _mm512_reduce_max_ps(mx);
}

// Quantizes n slots of float tables (C entries each) to int16 tables of 256 entries (zeros past
// C), entry = round(T * 32767 / max|T|). Returns the scale max|T| / 32767, or -1 when a table
// entry is not finite (the caller then keeps the float tables).
inline float quantize_tables(const float* T, int64_t C, int64_t n, int16_t* Tq) {
  const float m = table_max(T, n * C);
  if (m < 0.0f) return -1.0f;
  const __m512 inv = _mm512_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    int16_t* q = Tq + i * 256;
    for (int64_t c = 0; c < 256; c += 16) {
      const int64_t left = C - c;
      const __mmask16 k = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(k, T + i * C + c);
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + c),
                         _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv))));
    }
  }
  return m / 32767.0f;
}

// The entries of one 256-entry int16 table (8 registers) at 32 indices (codes widened to 16 bits).
inline __m512i lookup32(const __m512i* t, __m512i idx) {
  const __m512i q0 = _mm512_permutex2var_epi16(t[0], idx, t[1]);  // entries 0..63 (bits 0-5)
  const __m512i q1 = _mm512_permutex2var_epi16(t[2], idx, t[3]);
  const __m512i q2 = _mm512_permutex2var_epi16(t[4], idx, t[5]);
  const __m512i q3 = _mm512_permutex2var_epi16(t[6], idx, t[7]);
  const __mmask32 b6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
  const __mmask32 b7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
  return _mm512_mask_blend_epi16(b7, _mm512_mask_blend_epi16(b6, q0, q1),
                                 _mm512_mask_blend_epi16(b6, q2, q3));
}

// At slot i of a tile, prefetches the cache lines of the NB blocks next[h] (n * RB bytes each)
// whose turn it is, NB / 4 a slot, so that all are asked for within the tile's n slots: the
// hardware prefetchers miss runs this short (512 bytes a block, L * RB apart), and the lookup
// loops stalled on them.
template <int NB>
inline void prefetch_codes(const uint8_t* const* next, int64_t i, int64_t n) {
  constexpr int per_slot = NB >= 4 ? NB / 4 : 1;
  for (int k = 0; k < per_slot; ++k) {
    const int64_t q = i * per_slot + k, line = q / NB;  // next[q % NB]'s line q / NB
    if (line * 64 < n * RB)
      _mm_prefetch(reinterpret_cast<const char*>(next[q % NB] + line * 64), _MM_HINT_T0);
  }
}

// P pairs of 16-row blocks, half[h] = the codes of block h at the tile's first slot (slot i at
// half[h] + i * RB): acc[h] += the int16 table entries of block h's rows, summed over n slots,
// while the codes of the next 2P blocks (next[h]) are prefetched.
template <int P>
inline void gather_i16_pairs(const int16_t* Tq, int64_t n, const uint8_t* const* half,
                             const uint8_t* const* next, __m512i* acc) {
  for (int64_t i = 0; i < n; ++i) {
    prefetch_codes<2 * P>(next, i, n);
    __m512i t[8];
    for (int q = 0; q < 8; ++q) t[q] = _mm512_load_si512(Tq + i * 256 + q * 32);
    for (int k = 0; k < P; ++k) {
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(half[2 * k] + i * RB));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(half[2 * k + 1] + i * RB));
      const __m512i v =
          lookup32(t, _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1)));
      acc[2 * k] = _mm512_add_epi32(acc[2 * k], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
      acc[2 * k + 1] =
          _mm512_add_epi32(acc[2 * k + 1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
    }
  }
}

// part[r] += scale * sum over n <= kTileI16 slots of Tq[i, code(r, i)] for the rows `rows`.
inline void gather_i16(const int16_t* Tq, float scale, const uint8_t* codes, int64_t L, int64_t i0, int64_t n,
                       BlockRange rows, float* part) {
  constexpr int P = 2;                                         // pairs of blocks per table load
  alignas(64) static const uint8_t zeros[kTileI16 * RB] = {};  // the codes of blocks past the end
  const auto at = [&](int64_t blk) { return blk < rows.end() ? codes + (blk * L + i0) * RB : zeros; };
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t blk = rows.first(); blk < rows.end();) {
    const int64_t nb = min64(2 * P, rows.end() - blk);
    const uint8_t *half[2 * P], *next[2 * P];
    __m512i acc[2 * P];
    for (int h = 0; h < 2 * P; ++h) {
      half[h] = at(blk + h), next[h] = at(blk + 2 * P + h);
      acc[h] = _mm512_setzero_si512();
    }
    if (nb > 2)
      gather_i16_pairs<P>(Tq, n, half, next, acc);
    else
      gather_i16_pairs<1>(Tq, n, half, next, acc);
    for (int h = 0; h < nb; ++h, ++blk) {
      const __mmask16 lanes = static_cast<__mmask16>((1u << rows.hi(blk)) - (1u << rows.lo(blk)));
      float* p = part + blk * RB;
      _mm512_mask_storeu_ps(p, lanes,
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h]), s, _mm512_maskz_loadu_ps(lanes, p)));
    }
  }
}

// With AVX512_VBMI (checked at run time, hence the target attribute): the same int16 entries as
// two byte planes, looked up 64 rows at a time by vpermi2b, 2 per plane. Per 64 lookups that is
// 4 permutes instead of 8 vpermi2w, and the sums stay in 16-bit lanes (no widening per slot).
#define HOTOPS_VBMI __attribute__((target("avx512vbmi")))
constexpr int64_t kPlanes = 512;  // bytes per slot: the low bytes of u = q + 32768, then the high

// Quantizes like quantize_tables, into planes: Tp[i * 512 + c] = low byte of u(i, c),
// Tp[i * 512 + 256 + c] = high byte (u in 1..65535: both planes unsigned).
HOTOPS_VBMI inline float quantize_planes(const float* T, int64_t C, int64_t n, uint8_t* Tp) {
  const float m = table_max(T, n * C);
  if (m < 0.0f) return -1.0f;
  const __m512 inv = _mm512_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f), offset = _mm512_set1_ps(32768.0f);
  alignas(64) uint8_t split[64];  // from 32 dwords: their byte 0, then their byte 1
  for (int j = 0; j < 32; ++j)
    split[j] = static_cast<uint8_t>(4 * j), split[32 + j] = static_cast<uint8_t>(4 * j + 1);
  const __m512i by_byte = _mm512_load_si512(split);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < 256; c += 64) {
      __m512i u[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t left = C - c - 16 * q;
        const __mmask16 k = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
        u[q] = _mm512_cvtps_epi32(
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, T + i * C + c + 16 * q), inv, offset));
      }
      const __m512i a = _mm512_permutex2var_epi8(u[0], by_byte, u[1]);  // entries c.. c + 31
      const __m512i b = _mm512_permutex2var_epi8(u[2], by_byte, u[3]);  // entries c + 32.. c + 63
      _mm512_store_si512(Tp + i * kPlanes + c, _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(1, 0, 1, 0)));
      _mm512_store_si512(Tp + i * kPlanes + 256 + c, _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    }
  }
  return m / 32767.0f;
}

// The codes of four 16-row blocks at one slot: block h's (at blk[h] + off) in bytes 16h.. 16h + 15.
HOTOPS_VBMI inline __m512i codes64(const uint8_t* const* blk, int64_t off) {
  const auto at = [&](int h) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[h] + off)); };
  __m512i v = _mm512_castsi128_si512(at(0));
  v = _mm512_inserti32x4(v, at(1), 1);
  v = _mm512_inserti32x4(v, at(2), 2);
  return _mm512_inserti32x4(v, at(3), 3);
}

// A 256-byte plane (4 registers) at 64 indices; top = the indices' bit 7.
HOTOPS_VBMI inline __m512i lookup64(const __m512i* t, __m512i idx, __mmask64 top) {
  return _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t[0], idx, t[1]),
                                _mm512_permutex2var_epi8(t[2], idx, t[3]));
}

// Sums of 64 unsigned bytes (one per row) over up to 128 slots, in 16-bit lanes: `words` adds
// them as words (wrapping), `odd` adds the odd bytes alone; the even bytes' sum is words - (odd
// << 8) modulo 2^16, exact since neither sum reaches 2^15 (255 * 128). Two adds and a shift per
// 64 lookups instead of widening to 32 bits.
struct ByteSums {
  __m512i words, odd;
};

HOTOPS_VBMI inline void add_bytes(ByteSums& s, __m512i v) {
  s.words = _mm512_add_epi16(s.words, v);
  s.odd = _mm512_add_epi16(s.odd, _mm512_srli_epi16(v, 8));
}

// P groups of four 16-row blocks (group k: blk[4k.. 4k + 3], slot i at blk[h] + i * RB):
// acc[k][0] and acc[k][1] sum the low and high planes over n slots, while the codes of the next
// 4P blocks (next[h]) are prefetched.
template <int P>
HOTOPS_VBMI inline void gather_plane_groups(const uint8_t* Tp, int64_t n, const uint8_t* const* blk,
                                            const uint8_t* const* next, ByteSums (*acc)[2]) {
  for (int64_t i = 0; i < n; ++i) {
    prefetch_codes<4 * P>(next, i, n);
    const __m512i* t = reinterpret_cast<const __m512i*>(Tp + i * kPlanes);
    __m512i lo[4], hi[4];
    for (int q = 0; q < 4; ++q) lo[q] = _mm512_load_si512(t + q), hi[q] = _mm512_load_si512(t + 4 + q);
    for (int k = 0; k < P; ++k) {
      const __m512i idx = codes64(blk + 4 * k, i * RB);
      const __mmask64 top = _mm512_movepi8_mask(idx);
      add_bytes(acc[k][0], lookup64(lo, idx, top));
      add_bytes(acc[k][1], lookup64(hi, idx, top));
    }
  }
}

// part[rows of blocks blk.. blk + nb - 1] += scale * (256 * high + low - 32768 n), from the plane
// sums of one group (s[0] low, s[1] high) over n slots.
HOTOPS_VBMI inline void flush_group(const ByteSums* s, int64_t n, __m512 scale, int64_t blk, int64_t nb,
                                    BlockRange rows, float* part) {
  const __m512i lo_even = _mm512_sub_epi16(s[0].words, _mm512_slli_epi16(s[0].odd, 8));
  const __m512i hi_even = _mm512_sub_epi16(s[1].words, _mm512_slli_epi16(s[1].odd, 8));
  const __m512i low_plus_256_high = _mm512_set1_epi32(256 << 16 | 1);
  // lane k (block k) of e0: rows 16k + 0, 2, 4, 6; e1: 8, 10, 12, 14; o0: 1, 3, 5, 7; o1: 9.. 15
  const __m512i e0 = _mm512_madd_epi16(_mm512_unpacklo_epi16(lo_even, hi_even), low_plus_256_high);
  const __m512i e1 = _mm512_madd_epi16(_mm512_unpackhi_epi16(lo_even, hi_even), low_plus_256_high);
  const __m512i o0 = _mm512_madd_epi16(_mm512_unpacklo_epi16(s[0].odd, s[1].odd), low_plus_256_high);
  const __m512i o1 = _mm512_madd_epi16(_mm512_unpackhi_epi16(s[0].odd, s[1].odd), low_plus_256_high);
  // lane k of a, b, c, d: rows 16k + 0.. 3, 4.. 7, 8.. 11, 12.. 15; then a 4 x 4 transpose of lanes
  const __m512i a = _mm512_unpacklo_epi32(e0, o0), b = _mm512_unpackhi_epi32(e0, o0);
  const __m512i c = _mm512_unpacklo_epi32(e1, o1), d = _mm512_unpackhi_epi32(e1, o1);
  const __m512i ab0 = _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                ab1 = _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i cd0 = _mm512_shuffle_i32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                cd1 = _mm512_shuffle_i32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i block[4] = {_mm512_shuffle_i32x4(ab0, cd0, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(ab0, cd0, _MM_SHUFFLE(3, 1, 3, 1)),
                            _mm512_shuffle_i32x4(ab1, cd1, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(ab1, cd1, _MM_SHUFFLE(3, 1, 3, 1))};
  const __m512i offset = _mm512_set1_epi32(static_cast<int>(32768 * n));
  for (int64_t h = 0; h < nb; ++h) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << rows.hi(blk + h)) - (1u << rows.lo(blk + h)));
    float* p = part + (blk + h) * RB;
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(block[h], offset));
    _mm512_mask_storeu_ps(p, lanes, _mm512_fmadd_ps(v, scale, _mm512_maskz_loadu_ps(lanes, p)));
  }
}

// gather_i16 on byte planes (Tp from quantize_planes, n <= kTileI16 slots).
HOTOPS_VBMI inline void gather_planes(const uint8_t* Tp, float scale, const uint8_t* codes, int64_t L,
                                      int64_t i0, int64_t n, BlockRange rows, float* part) {
  constexpr int P = 2;  // groups of 4 blocks per table load
  static_assert(kTileI16 <= 128, "16-bit plane sums must stay below 2^15");
  alignas(64) static const uint8_t zeros[kTileI16 * RB] = {};  // the codes of blocks past the end
  const __m512 s = _mm512_set1_ps(scale);
  const auto at = [&](int64_t blk) { return blk < rows.end() ? codes + (blk * L + i0) * RB : zeros; };
  for (int64_t blk = rows.first(); blk < rows.end();) {
    const int64_t nb = min64(4 * P, rows.end() - blk);
    const uint8_t *b[4 * P], *next[4 * P];
    ByteSums acc[P][2];
    for (int h = 0; h < 4 * P; ++h) b[h] = at(blk + h), next[h] = at(blk + 4 * P + h);
    for (int k = 0; k < P; ++k)
      acc[k][0] = acc[k][1] = ByteSums{_mm512_setzero_si512(), _mm512_setzero_si512()};
    if (nb > 4)
      gather_plane_groups<P>(Tp, n, b, next, acc);
    else
      gather_plane_groups<1>(Tp, n, b, next, acc);
    for (int k = 0; 4 * k < nb; ++k) flush_group(acc[k], n, s, blk + 4 * k, min64(4, nb - 4 * k), rows, part);
    blk += nb;
  }
}

}  // namespace codebook_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops
#endif
