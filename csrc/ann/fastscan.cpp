// Per-ISA 4-bit fast-scan (see AnnFastScan in cpu.h): uint8 tables held in SIMD registers, codes
// packed 32 vectors per block, sums in uint16 lanes, exact float re-scoring of the rows that pass.
#include "ann/cpu.h"
#include "ann/kernel.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

using namespace ann_kernel;

// ---- 4-bit fast-scan (see AnnFastScan in cpu.h)

constexpr int64_t kBlock = 32;  // vectors per packed block

// uint8 tables for fast-scan: per sub-space the float table minus its minimum, times one scale
// that maps the widest span to 255. Returns the sum of the minima; *inv_scale undoes the scale.
inline float quantize_tables(const float* T, int64_t m, uint8_t* lut, float* inv_scale) {
  constexpr int kV = 16 / W;  // vectors per 16-entry table
  float mins[128], span = 0.0f, offset = 0.0f;
  for (int64_t s = 0; s < m; ++s) {
    VecF lo = VecF::load(T + s * 16), hi = lo;
    for (int v = 1; v < kV; ++v) {
      lo = VecF::min(lo, VecF::load(T + s * 16 + v * W));
      hi = VecF::max(hi, VecF::load(T + s * 16 + v * W));
    }
    const float mn = -(VecF::set1(0.0f) - lo).hmax(), mx = hi.hmax();
    mins[s] = mn;
    offset += mn;
    span = mx - mn > span ? mx - mn : span;
  }
  const float scale = span > 0.0f ? 255.0f / span : 0.0f;
  *inv_scale = span > 0.0f ? span / 255.0f : 0.0f;
  const VecF vs = VecF::set1(scale);
  for (int64_t s = 0; s < m; ++s) {
    const VecF mn = VecF::set1(mins[s]);
    for (int v = 0; v < kV; ++v) {
      const VecF r = VecF::round((VecF::load(T + s * 16 + v * W) - mn) * vs);
      uint8_t* o = lut + s * 16 + v * W;
#if defined(__AVX512F__)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r.v)));
#elif defined(__AVX2__)
      const __m256i i32 = _mm256_cvttps_epi32(r.v);
      const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o), _mm_packus_epi16(i16, i16));
#else
      *o = static_cast<uint8_t>(r.v);
#endif
    }
  }
  return offset;
}

// sums[j] = sum_s lut[s][code of vector j in sub-space s] for the 32 vectors of one block.
inline void block_sums(const uint8_t* block, const uint8_t* lut, int64_t mp, uint16_t* sums) {
#if defined(__AVX512BW__)
  // Four sub-spaces per register (one per 128-bit lane); shuffles look up 64 nibbles at once.
  const __m512i nib = _mm512_set1_epi8(0x0f), low_byte = _mm512_set1_epi16(0x00ff);
  __m512i lo_even = _mm512_setzero_si512(), lo_odd = lo_even, hi_even = lo_even, hi_odd = lo_even;
  for (int64_t s = 0; s < mp; s += 4) {
    const __m512i c = _mm512_loadu_si512(block + s * 16), t = _mm512_loadu_si512(lut + s * 16);
    const __m512i rl = _mm512_shuffle_epi8(t, _mm512_and_si512(c, nib));
    const __m512i rh = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), nib));
    lo_even = _mm512_add_epi16(lo_even, _mm512_and_si512(rl, low_byte));
    lo_odd = _mm512_add_epi16(lo_odd, _mm512_srli_epi16(rl, 8));
    hi_even = _mm512_add_epi16(hi_even, _mm512_and_si512(rh, low_byte));
    hi_odd = _mm512_add_epi16(hi_odd, _mm512_srli_epi16(rh, 8));
  }
  auto fold = [](__m512i v) {
    const __m256i h = _mm256_add_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return _mm_add_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  };
  const __m128i le = fold(lo_even), lo = fold(lo_odd), he = fold(hi_even), ho = fold(hi_odd);
#elif defined(__AVX2__)
  const __m256i nib = _mm256_set1_epi8(0x0f), low_byte = _mm256_set1_epi16(0x00ff);
  __m256i lo_even = _mm256_setzero_si256(), lo_odd = lo_even, hi_even = lo_even, hi_odd = lo_even;
  for (int64_t s = 0; s < mp; s += 2) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + s * 16));
    const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + s * 16));
    const __m256i rl = _mm256_shuffle_epi8(t, _mm256_and_si256(c, nib));
    const __m256i rh = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), nib));
    lo_even = _mm256_add_epi16(lo_even, _mm256_and_si256(rl, low_byte));
    lo_odd = _mm256_add_epi16(lo_odd, _mm256_srli_epi16(rl, 8));
    hi_even = _mm256_add_epi16(hi_even, _mm256_and_si256(rh, low_byte));
    hi_odd = _mm256_add_epi16(hi_odd, _mm256_srli_epi16(rh, 8));
  }
  auto fold = [](__m256i v) {
    return _mm_add_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  };
  const __m128i le = fold(lo_even), lo = fold(lo_odd), he = fold(hi_even), ho = fold(hi_odd);
#endif
#if defined(__AVX512BW__) || defined(__AVX2__)
  // 16-bit lane i of *_even holds vector 2i, of *_odd vector 2i + 1: interleave back to order.
  _mm_storeu_si128(reinterpret_cast<__m128i*>(sums), _mm_unpacklo_epi16(le, lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(sums + 8), _mm_unpackhi_epi16(le, lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(sums + 16), _mm_unpacklo_epi16(he, ho));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(sums + 24), _mm_unpackhi_epi16(he, ho));
#else
  for (int j = 0; j < 16; ++j) {
    uint32_t lo = 0, hi = 0;
    for (int64_t s = 0; s < mp; ++s) {
      const uint8_t b = block[s * 16 + j];
      lo += lut[s * 16 + (b & 15)];
      hi += lut[s * 16 + (b >> 4)];
    }
    sums[j] = static_cast<uint16_t>(lo);
    sums[16 + j] = static_cast<uint16_t>(hi);
  }
#endif
}

// Bit j set where sums[j] < limit (limit <= 65536), for the 32 sums of a block.
inline uint32_t below(const uint16_t* sums, uint32_t limit) {
  if (limit >= 65536u) return ~0u;
#if defined(__AVX512BW__)
  return _mm512_cmplt_epu16_mask(_mm512_loadu_si512(sums), _mm512_set1_epi16(static_cast<short>(limit)));
#else
  uint32_t bits = 0;
  for (int j = 0; j < kBlock; ++j) bits |= static_cast<uint32_t>(sums[j] < limit) << j;
  return bits;
#endif
}

}  // namespace

void ann_fastscan(const AnnFastScan& a) {
  const int64_t nq = a.q.size(0), d = a.q.size(1), nprobe = a.probes.size(1);
  const int64_t m = a.cb.m(), mp = (m + 3) / 4 * 4, k = a.out_score.size(1);
  const bool l2 = a.cb.metric == AnnMetric::l2;
  const uint8_t* packed = a.packed.ptr<uint8_t>();
  const uint8_t* allow = a.allow.present ? a.allow.ptr<uint8_t>() : nullptr;
  const int64_t* offsets = a.offsets.ptr<int64_t>();
  const int64_t* block_offsets = a.block_offsets.ptr<int64_t>();
  parallel_for(nq, 1, a.threads, [&](int64_t qb, int64_t qe) {
    Scratch<float> table(m * 16), qtable(m * 16);
    Scratch<uint8_t> lut(mp * 16);
    for (int64_t i = 0; i < mp * 16; ++i) lut.p[i] = 0;  // padded sub-spaces add nothing
    Scratch<float> res_s(2 * k);
    Scratch<int64_t> res_r(2 * k);
    alignas(16) uint16_t sums[kBlock];
    for (int64_t qi = qb; qi < qe; ++qi) {
      const float* q = row_ptr<float>(a.q, qi);
      Reservoir top{res_s.p,
                    res_r.p,
                    k,
                    2 * k,
                    0,
                    INFINITY,
                    row_ptr<float>(a.out_score, qi),
                    row_ptr<int64_t>(a.out_row, qi)};
      // Tables of the query itself (l2: ||q_s - b_j||^2; ip: -<q_s, b_j>). For l2, list l's table
      // ||q_s - c_s - b_j||^2 is that plus 2 <c_s, b_j> plus a constant per sub-space, which the
      // quantization's per-sub-space offset absorbs: the constants sum to ||c||^2 - 2 <q, c>.
      tables_of_row(q, a.cb, qtable.p, 16);
      float inv_scale = 0.0f, offset = 0.0f;
      if (!l2) offset = quantize_tables(qtable.p, m, lut.p, &inv_scale);
      const int64_t* probe = row_ptr<int64_t>(a.probes, qi);
      for (int64_t p = 0; p < nprobe; ++p) {
        const int64_t l = probe[p];
        if (l < 0 || offsets[l] == offsets[l + 1]) continue;
        const float* c = row_ptr<float>(a.coarse, l);
        float bias;
        if (l2) {
          const float* lt = a.list_tables.ptr<float>() + l * m * 16;
          for (int64_t i = 0; i < m * 16; i += W)
            (VecF::load(qtable.p + i) + VecF::load(lt + i)).store(table.p + i);
          bias = quantize_tables(table.p, m, lut.p, &inv_scale) + row_norm2(c, d) - 2.0f * dot(q, c, d);
        } else {
          bias = offset - dot(q, c, d);
        }
        for (int64_t b = block_offsets[l]; b < block_offsets[l + 1]; ++b) {
          const int64_t row0 = offsets[l] + (b - block_offsets[l]) * kBlock;
          const int64_t count = offsets[l + 1] - row0 < kBlock ? offsets[l + 1] - row0 : kBlock;
          block_sums(packed + b * mp * 16, lut.p, mp, sums);
          // sums at or above this cannot enter the top-k (up to rounding, which the float check settles)
          const float reach = (top.bound() - bias) / inv_scale + 1.0f;
          const uint32_t limit = !(reach < 65536.0f) || inv_scale == 0.0f ? 65536u
                                 : reach > 0.0f                           ? static_cast<uint32_t>(reach)
                                                                          : 0u;
          for (uint32_t hits = below(sums, limit) & (count == kBlock ? ~0u : (1u << count) - 1u); hits;
               hits &= hits - 1) {
            const int64_t j = __builtin_ctz(hits);
            if (allow && !allow[row0 + j]) continue;
            top.push(bias + static_cast<float>(sums[j]) * inv_scale, row0 + j);
          }
        }
      }
      top.finish();
    }
  });
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
