// Per-ISA codebook kernels (see cpu.h).
//
// matmul: the batch is taken 16 rows at a time (BC = batch rounded up to a power of two <= 16,
// so a table entry for all BC rows is one contiguous run of BC floats, 64 bytes at 16). The work
// is split into kparts ranges of code slots x nparts ranges of row blocks, one task each (split-K
// first: every table is then built once in all, by the one task that uses it). A task, for each
// row group and tile of its slots small enough for L1 (BC = 1) or L2:
//   1. tabulates T[i, c, b] = x[b, group j of slot i] . codebooks[o, m, c],
//   2. adds part[r, b] += T[i, code(r, i), b] over the tile's slots for its rows,
// and a last pass writes y[b, perm[r]] = scales[r] * sum over the kparts partial sums + bias.
// Work per output is one table lookup per code slot instead of in_group multiply-adds per weight;
// the weight is read once as uint8 codes.
//
// At BC = 1 with AVX-512BW the tables are quantized to int16 (one scale per tile, |entry| <= 32767)
// and held in registers: 256 entries = 8 zmm, looked up 32 rows at a time by 4 vpermi2w and 3
// blends on the top index bits, summed exactly in int32 (faiss fast-scan's idea with 16-bit
// entries, so the error stays ~4e-5 of the largest output instead of ~1e-2). With AVX512_VBMI
// (run-time check) the same entries are stored as two byte planes and looked up 64 rows at a time
// by vpermi2b, half the permutes. A tile whose tables are not finite (NaN/Inf in x) takes the
// float path, which propagates them. Every gather prefetches the codes of the blocks it reaches
// next: a tile reads each block's codes as one short run, which hardware prefetchers miss.
#include "codebook/cpu.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

constexpr int kMaxBatch = 16;
constexpr int64_t RB = kRowBlock;
#if defined(__AVX512BW__)
constexpr bool kInt16Tables = true;
#else
constexpr bool kInt16Tables = false;
#endif
constexpr int64_t kTileI16 = 32;  // int16 tables per tile: 32 x 512 bytes, L1-resident

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

inline float to_f32(const void* p, DType t, int64_t i) {
  return t == DType::f32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
inline void store(void* p, DType t, int64_t i, float v) {
  if (t == DType::f32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

// Largest code in codes[0, n): the range check that keeps every table read in bounds.
inline uint8_t max_code(const uint8_t* codes, int64_t n) {
  uint8_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = codes[i] > m ? codes[i] : m;
  return m;
}

// The rows [r0, r1) of one row group, seen block by block: lanes [lo, hi) of block blk.
struct BlockRange {
  int64_t r0, r1;
  int64_t first() const { return r0 / RB; }
  int64_t end() const { return (r1 + RB - 1) / RB; }
  int lo(int64_t blk) const { return static_cast<int>(max64(r0, blk * RB) - blk * RB); }
  int hi(int64_t blk) const { return static_cast<int>(min64(r1, blk * RB + RB) - blk * RB); }
};

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

// BC floats as NV vectors of VW lanes.
template <int BC>
struct Batch {
  static constexpr int VW = BC < VecF::W ? BC : VecF::W, NV = BC / VW;
  using V = typename Lanes<VW>::type;
};

// T[((i - i0) * C + c) * BC + b] for slots [i0, i1). xT is the chunk (K, BC) float32; cbT is the
// row group's (M, G, C) codewords, transposed so that the BC = 1 loop runs over c.
template <int G, int BC>
void build_tables(const float* xT, const float* cbT, int64_t M, int64_t C, int64_t i0, int64_t i1, float* T) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t j = i / M, m = i % M;
    const float* cb = cbT + m * G * C;
    float* Ti = T + (i - i0) * C * BC;
    if constexpr (BC == 1) {  // vectorised over the codewords, 64 sums at a time in registers
      constexpr int64_t CW = 64;
      int64_t c = 0;
      for (; c + CW <= C; c += CW) {
        float s[CW] = {};
        for (int t = 0; t < G; ++t)
          for (int64_t k = 0; k < CW; ++k) s[k] += xT[j * G + t] * cb[t * C + c + k];
        std::memcpy(Ti + c, s, sizeof(s));
      }
      for (; c < C; ++c) {
        float s = 0.0f;
        for (int t = 0; t < G; ++t) s += xT[j * G + t] * cb[t * C + c];
        Ti[c] = s;
      }
    } else {  // vectorised over the batch: one FMA with a broadcast codeword per (c, t, vector)
      using B = Batch<BC>;
      typename B::V xv[G][B::NV];
      for (int t = 0; t < G; ++t)
        for (int v = 0; v < B::NV; ++v)
          std::memcpy(&xv[t][v], xT + (j * G + t) * BC + v * B::VW, sizeof(typename B::V));
      for (int64_t c = 0; c < C; ++c) {
        typename B::V s[B::NV] = {};
        for (int t = 0; t < G; ++t)
          for (int v = 0; v < B::NV; ++v) s[v] += xv[t][v] * cb[t * C + c];
        std::memcpy(Ti + c * BC, s, sizeof(s));
      }
    }
  }
}

// Prefetches the codes of block blk + kAhead at the tile's slots [i0, i0 + n), if in `rows`: the
// hardware prefetchers miss runs this short (n * RB bytes a block, L * RB apart), and the gathers
// stalled on them (the tall Llama shapes ran at half the rate of 4096 x 4096).
constexpr int64_t kAhead = 4;
inline void prefetch_ahead(const uint8_t* codes, int64_t L, int64_t i0, int64_t n, int64_t blk,
                           BlockRange rows) {
  if (blk + kAhead >= rows.end()) return;
  const uint8_t* p = codes + ((blk + kAhead) * L + i0) * RB;
  for (int64_t off = 0; off < n * RB; off += 64) __builtin_prefetch(p + off);
}

// part[r] += sum over n slots of T[i, code(r, i)] for the rows `rows` (BC = 1, float tables).
void gather_f32(const float* T, int64_t C, const uint8_t* codes, int64_t L, int64_t i0, int64_t n,
                BlockRange rows, float* part) {
  for (int64_t blk = rows.first(); blk < rows.end(); ++blk) {
    prefetch_ahead(codes, L, i0, n, blk, rows);
    const uint8_t* cb = codes + (blk * L + i0) * RB;
    float s[RB] = {};  // 16 independent sums of plain loads: on Zen 4 faster than vgatherdps
    for (int64_t i = 0; i < n; ++i)
      for (int l = 0; l < RB; ++l) s[l] += T[i * C + cb[i * RB + l]];
    for (int l = rows.lo(blk); l < rows.hi(blk); ++l) part[blk * RB + l] += s[l];
  }
}

// R rows at once (independent sums, so the table loads overlap), BC floats per table entry.
template <int BC, int R>
inline void gather_rows(const float* T, int64_t C, const uint8_t* cb, int64_t n, float* part) {
  constexpr int NV = Batch<BC>::NV;
  using V = typename Batch<BC>::V;
  V s[R][NV];
  for (int k = 0; k < R; ++k)
    for (int v = 0; v < NV; ++v) s[k][v] = reinterpret_cast<const V*>(part + k * BC)[v];
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < R; ++k) {
      const V* t = reinterpret_cast<const V*>(T + (i * C + cb[i * RB + k]) * BC);
      for (int v = 0; v < NV; ++v) s[k][v] += t[v];
    }
  for (int k = 0; k < R; ++k)
    for (int v = 0; v < NV; ++v) reinterpret_cast<V*>(part + k * BC)[v] = s[k][v];
}

// part[r, :] += sum over n slots of T[i, code(r, i), :] for the rows `rows` (BC > 1).
template <int BC>
void gather_vec(const float* T, int64_t C, const uint8_t* codes, int64_t L, int64_t i0, int64_t n,
                BlockRange rows, float* part) {
  constexpr int R = BC > VecF::W ? 4 : 8;  // accumulators in registers: R x (BC / W) vectors
  for (int64_t blk = rows.first(); blk < rows.end(); ++blk) {
    prefetch_ahead(codes, L, i0, n, blk, rows);
    const uint8_t* cb = codes + (blk * L + i0) * RB;
    int l = rows.lo(blk);
    const int hi = rows.hi(blk);
    for (; l + R <= hi; l += R) gather_rows<BC, R>(T, C, cb + l, n, part + (blk * RB + l) * BC);
    for (; l < hi; ++l) gather_rows<BC, 1>(T, C, cb + l, n, part + (blk * RB + l) * BC);
  }
}

#if defined(__AVX512BW__)
// The largest |T[i]| of i < count, or -1 when one is not finite.
float table_max(const float* T, int64_t count) {
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
float quantize_tables(const float* T, int64_t C, int64_t n, int16_t* Tq) {
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
void gather_i16(const int16_t* Tq, float scale, const uint8_t* codes, int64_t L, int64_t i0, int64_t n,
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
HOTOPS_VBMI float quantize_planes(const float* T, int64_t C, int64_t n, uint8_t* Tp) {
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
HOTOPS_VBMI void gather_plane_groups(const uint8_t* Tp, int64_t n, const uint8_t* const* blk,
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
HOTOPS_VBMI void flush_group(const ByteSums* s, int64_t n, __m512 scale, int64_t blk, int64_t nb,
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
HOTOPS_VBMI void gather_planes(const uint8_t* Tp, float scale, const uint8_t* codes, int64_t L, int64_t i0,
                               int64_t n, BlockRange rows, float* part) {
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
#endif

// How a chunk of the batch is split into tasks: kparts ranges of slots x nparts of row blocks.
struct Plan {
  int64_t tile, kparts, nparts;
  bool byte_planes;  // BC = 1 on AVX512_VBMI: int16 tables as byte planes (else as int16 or float)
};

template <int BC>
Plan plan(const CodebookFormat& w, int threads) {
  const int64_t C = w.codebook_size(), L = w.slots(), blocks = (w.rows() + RB - 1) / RB;
  Plan p;
  // BC = 1: an L1-sized tile (16 KB float tables, or 32 int16 tables of 256 entries, 16 KB);
  // BC > 1: L2-sized (256 KB), each lookup being a whole vector whose latency the rows overlap.
  p.tile = BC == 1 ? (kInt16Tables ? kTileI16 : max64(1, 4096 / C)) : max64(1, (256 << 10) / (C * BC * 4));
  // At least 2 tiles per part. BC = 1 takes up to 4 parts per thread, claimed as threads come
  // free: a thread held up by another process on its core then takes fewer parts instead of
  // stalling the call (the partial sums are only N floats a part).
  const int64_t per_thread = BC == 1 && threads > 1 ? 4 : 1;
  p.kparts = max64(1, min64(per_thread * threads, L / (2 * p.tile)));
  p.nparts = max64(1, min64(threads / p.kparts, blocks));
  p.byte_planes = BC == 1 && kInt16Tables && feature_on(Feature::vbmi);
  return p;
}

// One task: slots [s_begin, s_end) of the row blocks [blk_begin, blk_end) into part (N', BC),
// which it zeroes first. Returns false on a code >= C.
template <int G, int BC>
bool run_task(const CodebookMatmul& a, const Plan& p, int64_t s_begin, int64_t s_end, int64_t blk_begin,
              int64_t blk_end, const float* cbT_all, const float* xT, float* part) {
  const CodebookFormat& w = a.w;
  const int64_t N = w.rows(), L = w.slots(), M = w.num_codebooks(), C = w.codebook_size();
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  for (int64_t i = blk_begin * RB * BC; i < blk_end * RB * BC; ++i) part[i] = 0.0f;
  const int64_t r_begin = blk_begin * RB, r_end = min64(N, blk_end * RB);
  Scratch<float> T(p.tile * C * BC);
  Scratch<int16_t> Tq(BC == 1 && kInt16Tables ? p.tile * 256 : 1);
  for (int64_t o = 0; o < w.groups(); ++o) {
    const BlockRange rows{max64(gp[o], r_begin), min64(gp[o + 1], r_end)};
    if (rows.r0 >= rows.r1) continue;
    const float* cbT = cbT_all + o * M * G * C;
    for (int64_t i0 = s_begin; i0 < s_end; i0 += p.tile) {
      const int64_t n = min64(s_end, i0 + p.tile) - i0;
      if (C < 256)
        for (int64_t blk = rows.first(); blk < rows.end(); ++blk)
          if (max_code(codes + (blk * L + i0) * RB, n * RB) >= C) return false;
      build_tables<G, BC>(xT, cbT, M, C, i0, i0 + n, T.p);
      if constexpr (BC > 1) {
        gather_vec<BC>(T.p, C, codes, L, i0, n, rows, part);
      } else {
#if defined(__AVX512BW__)
        uint8_t* Tp = reinterpret_cast<uint8_t*>(Tq.p);  // as many bytes as the int16 tables
        const float scale = p.byte_planes ? quantize_planes(T.p, C, n, Tp) : quantize_tables(T.p, C, n, Tq.p);
        if (scale >= 0.0f) {
          if (p.byte_planes)
            gather_planes(Tp, scale, codes, L, i0, n, rows, part);
          else
            gather_i16(Tq.p, scale, codes, L, i0, n, rows, part);
          continue;
        }
#endif
        gather_f32(T.p, C, codes, L, i0, n, rows, part);
      }
    }
  }
  return true;
}

// One chunk of Bc <= BC batch rows starting at b0 (xT: those rows in float32, transposed to
// (K, BC), zeros past Bc).
template <int G, int BC>
bool matmul_chunk(const CodebookMatmul& a, int64_t b0, int64_t Bc, const float* cbT, const float* xT) {
  const CodebookFormat& w = a.w;
  const int64_t N = w.rows(), L = w.slots(), blocks = (N + RB - 1) / RB, padded = blocks * RB * BC;
  const Plan p = plan<BC>(w, a.threads);
  Scratch<float> parts(p.kparts * padded);
  const int64_t* perm = a.perm.present ? a.perm.ptr<const int64_t>() : nullptr;
  const float* bias = a.bias.present ? a.bias.ptr<const float>() : nullptr;
  const float* scales = w.scales.ptr<const float>();
  const int64_t ldo = a.out.stride(0);
  const auto finish = [&] {  // y[b0 + b, perm[r]] = scales[r] * (sum of the kparts partials) + bias
    float* sum = parts.p;
    for (int64_t kp = 1; kp < p.kparts; ++kp)
      for (int64_t i = 0; i < N * BC; ++i) sum[i] += parts.p[kp * padded + i];
    for (int64_t r = 0; r < N; ++r) {
      const int64_t col = perm ? perm[r] : r;
      const float add = bias ? bias[col] : 0.0f;
      for (int64_t b = 0; b < Bc; ++b)
        store(a.out.data, a.out.dtype, (b0 + b) * ldo + col, scales[r] * sum[r * BC + b] + add);
    }
  };
  // One parallel region: the thread that completes the last task writes the output (a few
  // microseconds), so no second fork and join waits for a thread another process holds up.
  int ok = 1;
  const int64_t tasks = p.kparts * p.nparts;
  int64_t done = 0;
  parallel_claim(tasks, a.threads, [&](auto claim) {
    for (int64_t t; (t = claim()) < tasks;) {
      const int64_t kp = t / p.nparts, np = t % p.nparts;
      if (!run_task<G, BC>(a, p, L * kp / p.kparts, L * (kp + 1) / p.kparts, blocks * np / p.nparts,
                           blocks * (np + 1) / p.nparts, cbT, xT, parts.p + kp * padded))
        __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
      // acq_rel: the last one sees every task's partial sums
      if (__atomic_add_fetch(&done, int64_t(1), __ATOMIC_ACQ_REL) == tasks &&
          __atomic_load_n(&ok, __ATOMIC_RELAXED))
        finish();
    }
  });
  return ok != 0;
}

template <int G>
bool matmul_chunk_bc(const CodebookMatmul& a, int64_t b0, int64_t Bc, const float* cbT, const float* xT) {
  if (Bc <= 1) return matmul_chunk<G, 1>(a, b0, Bc, cbT, xT);
  if (Bc <= 2) return matmul_chunk<G, 2>(a, b0, Bc, cbT, xT);
  if (Bc <= 4) return matmul_chunk<G, 4>(a, b0, Bc, cbT, xT);
  if (Bc <= 8) return matmul_chunk<G, 8>(a, b0, Bc, cbT, xT);
  return matmul_chunk<G, 16>(a, b0, Bc, cbT, xT);
}

// Dense rows [r0, r1) of the stored order into a.out (Out: float or uint16_t bf16 bits).
template <int G, typename Out>
void dequantize_rows(const CodebookDequantize& a, int64_t r0, int64_t r1, int& ok) {
  const CodebookFormat& w = a.w;
  const int64_t L = w.slots(), M = w.num_codebooks(), C = w.codebook_size(), J = L / M;
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const float* cbs = w.codebooks.ptr<const float>();
  const float* scales = w.scales.ptr<const float>();
  int64_t o = 0;
  for (int64_t r = r0; r < r1; ++r) {
    while (gp[o + 1] <= r) ++o;
    const uint8_t* cr = codes + (r / RB) * L * RB + r % RB;  // code of slot i: cr[i * RB]
    uint8_t top = 0;
    for (int64_t i = 0; i < L; ++i) top = cr[i * RB] > top ? cr[i * RB] : top;
    if (top >= C) {
      __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
      return;
    }
    const float* cb = cbs + o * M * C * G;
    const float s = scales[r];
    Out* row = static_cast<Out*>(a.out.data) + (r - a.row_begin) * a.out.stride(0);
    using V = typename Lanes<G>::type;  // one codeword as one vector
    for (int64_t j = 0; j < J; ++j) {
      V v, u;
      std::memcpy(&v, cb + cr[j * M * RB] * G, sizeof(V));
      for (int64_t m = 1; m < M; ++m) {
        std::memcpy(&u, cb + (m * C + cr[(j * M + m) * RB]) * G, sizeof(V));
        v += u;
      }
      v *= s;
      if constexpr (sizeof(Out) == 4) {
        std::memcpy(row + j * G, &v, sizeof(V));
      } else {
        float f[G];
        std::memcpy(f, &v, sizeof(V));
        for (int t = 0; t < G; ++t) row[j * G + t] = f32_to_bf16(f[t]);
      }
    }
  }
}

template <int G>
void dequantize_rows(const CodebookDequantize& a, int64_t r0, int64_t r1, int& ok) {
  if (a.out.dtype == DType::f32)
    dequantize_rows<G, float>(a, r0, r1, ok);
  else
    dequantize_rows<G, uint16_t>(a, r0, r1, ok);
}

// True when none of v[0, n) is NaN or +-Inf (|v| <= FLT_MAX is false for all three).
inline bool all_finite(const float* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::fabs(v[i]) <= 3.40282347e38f;
  return ok;
}

// Batch row b of y from the dense weight, as F.linear computes it: sum_k x[k] * W[r, k] with
// W[r, k] = scales[r] * sum_m codeword_m[k] (rounded to bf16 for bf16 x). The tables sum x . codeword
// of each codebook on its own, so with NaN/Inf in x (or in the weight) they can meet inf - inf
// where the dense weight's sum of codewords is finite: such rows take this path, which
// propagates NaN and Inf exactly as the dense product does. Returns false on a code >= C.
bool dense_row(const CodebookMatmul& a, const float* cb, int64_t b) {
  const CodebookFormat& w = a.w;
  const int64_t N = w.rows(), L = w.slots(), M = w.num_codebooks(), C = w.codebook_size(), G = w.in_group(),
                J = L / M;
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const float* scales = w.scales.ptr<const float>();
  const int64_t* perm = a.perm.present ? a.perm.ptr<const int64_t>() : nullptr;
  const float* bias = a.bias.present ? a.bias.ptr<const float>() : nullptr;
  const bool bf16 = a.x.dtype != DType::f32;
  const int64_t xoff = b * a.x.stride(0), ldo = a.out.stride(0);
  int ok = 1;
  parallel_for(N, 16, a.threads, [&](int64_t r0, int64_t r1) {
    int64_t o = 0;
    for (int64_t r = r0; r < r1; ++r) {
      while (gp[o + 1] <= r) ++o;
      const uint8_t* cr = codes + (r / RB) * L * RB + r % RB;  // code of slot i: cr[i * RB]
      float acc = 0.0f;
      for (int64_t j = 0; j < J; ++j) {
        for (int64_t t = 0; t < G; ++t) {
          float wt = 0.0f;
          for (int64_t m = 0; m < M; ++m) {
            const uint8_t code = cr[(j * M + m) * RB];
            if (code >= C) {
              __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
              return;
            }
            wt = m == 0 ? cb[((o * M + m) * C + code) * G + t] : wt + cb[((o * M + m) * C + code) * G + t];
          }
          wt *= scales[r];
          if (bf16) wt = bf16_to_f32(f32_to_bf16(wt));
          acc += to_f32(a.x.data, a.x.dtype, xoff + j * G + t) * wt;
        }
      }
      const int64_t col = perm ? perm[r] : r;
      store(a.out.data, a.out.dtype, b * ldo + col, acc + (bias ? bias[col] : 0.0f));
    }
  });
  return ok != 0;
}

}  // namespace

bool codebook_matmul(const CodebookMatmul& a) {
  const CodebookFormat& w = a.w;
  const int64_t B = a.x.size(0), K = w.in_features(), N = w.rows(), M = w.num_codebooks(),
                C = w.codebook_size(), G = w.in_group(), O = w.groups();
  if (B == 0 || N == 0) return true;
  const float* cb = w.codebooks.ptr<const float>();
  if (!all_finite(cb, O * M * C * G) || !all_finite(w.scales.ptr<const float>(), N)) {
    for (int64_t b = 0; b < B; ++b)  // NaN/Inf in the weight: every row from the dense weight
      if (!dense_row(a, cb, b)) return false;
    return true;
  }
  Scratch<float> cbT(O * M * G * C), xT(K * kMaxBatch);
  for (int64_t om = 0; om < O * M; ++om)  // (O, M, C, G) -> (O, M, G, C)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < G; ++t) cbT.p[(om * G + t) * C + c] = cb[(om * C + c) * G + t];
  for (int64_t b0 = 0; b0 < B; b0 += kMaxBatch) {
    const int64_t Bc = min64(kMaxBatch, B - b0), BC = Bc <= 1   ? 1
                                                      : Bc <= 2 ? 2
                                                      : Bc <= 4 ? 4
                                                      : Bc <= 8 ? 8
                                                                : 16;
    for (int64_t b = 0; b < BC; ++b)  // the chunk in float32, (K, BC), zeros past Bc
      for (int64_t k = 0; k < K; ++k)
        xT.p[k * BC + b] = b < Bc ? to_f32(a.x.data, a.x.dtype, (b0 + b) * a.x.stride(0) + k) : 0.0f;
    bool ok;
    switch (G) {
      case 1:
        ok = matmul_chunk_bc<1>(a, b0, Bc, cbT.p, xT.p);
        break;
      case 2:
        ok = matmul_chunk_bc<2>(a, b0, Bc, cbT.p, xT.p);
        break;
      case 4:
        ok = matmul_chunk_bc<4>(a, b0, Bc, cbT.p, xT.p);
        break;
      default:
        ok = matmul_chunk_bc<8>(a, b0, Bc, cbT.p, xT.p);
        break;
    }
    if (!ok) return false;
    for (int64_t b = 0; b < Bc; ++b) {  // rows of x holding NaN/Inf: again, from the dense weight
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) finite &= std::fabs(xT.p[k * BC + b]) <= 3.40282347e38f;
      if (!finite && !dense_row(a, cb, b0 + b)) return false;
    }
  }
  return true;
}

bool codebook_dequantize(const CodebookDequantize& a) {
  int ok = 1;
  parallel_for(a.row_end - a.row_begin, 16, a.threads, [&](int64_t s0, int64_t s1) {
    const int64_t r0 = a.row_begin + s0, r1 = a.row_begin + s1;
    switch (a.w.in_group()) {
      case 1:
        dequantize_rows<1>(a, r0, r1, ok);
        break;
      case 2:
        dequantize_rows<2>(a, r0, r1, ok);
        break;
      case 4:
        dequantize_rows<4>(a, r0, r1, ok);
        break;
      default:
        dequantize_rows<8>(a, r0, r1, ok);
        break;
    }
  });
  return ok != 0;
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
