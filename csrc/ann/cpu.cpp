// Per-ISA PQ kernels (see cpu.h). Everything here is inline or has internal linkage (the ODR rule
// of docs/architecture.md): scratch buffers are plain new[] arrays, the top-k is a hand-written heap.
#include "ann/cpu.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

constexpr int W = VecF::W;

// The k lowest scores seen so far as a max-heap (root = worst kept), in caller-owned arrays.
struct TopK {
  float* s;
  int64_t* r;
  int64_t k, n = 0;
  TopK(float* s_, int64_t* r_, int64_t k_) : s(s_), r(r_), k(k_) {}

  float bound() const { return n < k ? INFINITY : s[0]; }

  void push(float x, int64_t row) {
    if (n < k) {  // sift up
      int64_t i = n++;
      while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!(s[p] < x)) break;
        s[i] = s[p];
        r[i] = r[p];
        i = p;
      }
      s[i] = x;
      r[i] = row;
    } else if (x < s[0]) {
      sift_down(x, row, n);
    }
  }
  void sift_down(float x, int64_t row, int64_t size) {
    int64_t i = 0;
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= size) break;
      if (c + 1 < size && s[c + 1] > s[c]) ++c;
      if (!(s[c] > x)) break;
      s[i] = s[c];
      r[i] = r[c];
      i = c;
    }
    s[i] = x;
    r[i] = row;
  }
  // Sorts ascending in place (heap sort) and pads the missing tail with (+inf, -1).
  void finish() {
    for (int64_t size = n; size > 1; --size) {
      float x = s[size - 1];
      int64_t row = r[size - 1];
      s[size - 1] = s[0];
      r[size - 1] = r[0];
      sift_down(x, row, size - 1);
    }
    for (int64_t i = n; i < k; ++i) {
      s[i] = INFINITY;
      r[i] = -1;
    }
  }
};

// Top-k for scans that meet many candidates: a reservoir of 2k entries below a threshold; when
// full, a quickselect keeps the k best and the k-th becomes the threshold. Pushes are O(1)
// amortised instead of a heap's O(log k); finish() sorts the survivors into (out_s, out_r).
struct Reservoir {
  float* s;
  int64_t* r;
  int64_t k, cap, n = 0;
  float thr = INFINITY;
  float* out_s;
  int64_t* out_r;

  float bound() const { return thr; }
  void push(float x, int64_t row) {
    if (!(x < thr)) return;
    s[n] = x;
    r[n] = row;
    if (++n == cap) shrink();
  }
  void swap(int64_t a, int64_t b) {
    const float t = s[a];
    s[a] = s[b];
    s[b] = t;
    const int64_t u = r[a];
    r[a] = r[b];
    r[b] = u;
  }
  // Moves the k smallest of s[0..n) to the front (quickselect, median-of-three pivots).
  void select_k() {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (s[mid] < s[lo]) swap(mid, lo);
      if (s[hi] < s[lo]) swap(hi, lo);
      if (s[hi] < s[mid]) swap(hi, mid);
      const float pivot = s[mid];
      int64_t i = lo, j = hi;
      while (i <= j) {
        while (s[i] < pivot) ++i;
        while (pivot < s[j]) --j;
        if (i <= j) {
          swap(i, j);
          ++i;
          --j;
        }
      }
      if (k - 1 <= j)
        hi = j;
      else if (k - 1 >= i)
        lo = i;
      else
        break;
    }
  }
  void shrink() {
    select_k();
    float mx = s[0];
    for (int64_t i = 1; i < k; ++i) mx = s[i] > mx ? s[i] : mx;
    thr = mx;
    n = k;
  }
  void finish() {
    TopK top(out_s, out_r, k);
    for (int64_t i = 0; i < n; ++i) top.push(s[i], r[i]);
    top.finish();
  }
};

inline float row_norm2(const float* x, int64_t d) {
  VecF acc = VecF::set1(0.0f);
  int64_t i = 0;
  for (; i + W <= d; i += W) {
    VecF v = VecF::load(x + i);
    acc = VecF::fma(v, v, acc);
  }
  float s = acc.sum();
  for (; i < d; ++i) s += x[i] * x[i];
  return s;
}

// Distance tables of R rows against one sub-space's ksub centroids, ct (dsub, ksub):
//   out[r][j] = base[r] + cterm[j] + alpha * <x[r], c_j>
// l2: alpha = -2, base = ||x||^2, cterm = ||c||^2; ip: alpha = -1, no base or cterm. A block of
// V vectors of centroids times R rows stays in registers, so each centroid load feeds R FMAs.
constexpr int kRows = 4;               // rows per register block
constexpr int kVecs = W == 8 ? 2 : 4;  // centroid vectors per block (AVX2 has 16 registers)

template <int R>
inline void table_rows(const float* const* x, const float* ct, const float* cterm, int64_t dsub, int64_t ksub,
                       float alpha, const float* base, float* const* out) {
  int64_t j = 0;
  for (; j + kVecs * W <= ksub; j += kVecs * W) {
    VecF acc[R][kVecs];
    for (int v = 0; v < kVecs; ++v) {
      const VecF c0 = cterm ? VecF::load(cterm + j + v * W) : VecF::set1(0.0f);
      for (int r = 0; r < R; ++r) acc[r][v] = c0 + VecF::set1(base[r]);
    }
    for (int64_t i = 0; i < dsub; ++i) {
      const float* c = ct + i * ksub + j;
      VecF cv[kVecs];
      for (int v = 0; v < kVecs; ++v) cv[v] = VecF::load(c + v * W);
      for (int r = 0; r < R; ++r) {
        const VecF xi = VecF::set1(alpha * x[r][i]);
        for (int v = 0; v < kVecs; ++v) acc[r][v] = VecF::fma(xi, cv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v) acc[r][v].store(out[r] + j + v * W);
  }
  for (; j + W <= ksub; j += W) {  // e.g. the 16 centroids of 4-bit codebooks
    VecF acc[R];
    const VecF c0 = cterm ? VecF::load(cterm + j) : VecF::set1(0.0f);
    for (int r = 0; r < R; ++r) acc[r] = c0 + VecF::set1(base[r]);
    for (int64_t i = 0; i < dsub; ++i) {
      const VecF cv = VecF::load(ct + i * ksub + j);
      for (int r = 0; r < R; ++r) acc[r] = VecF::fma(VecF::set1(alpha * x[r][i]), cv, acc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r].store(out[r] + j);
  }
  for (; j < ksub; ++j) {
    for (int r = 0; r < R; ++r) {
      float a = base[r] + (cterm ? cterm[j] : 0.0f);
      for (int64_t i = 0; i < dsub; ++i) a += alpha * x[r][i] * ct[i * ksub + j];
      out[r][j] = a;
    }
  }
}

// All m tables of R rows: out[r] is (m, stride), stride >= ksub.
template <int R>
inline void tables_of_rows(const float* const* x, const AnnCodebooks& cb, float* const* out, int64_t stride) {
  const int64_t m = cb.m(), dsub = cb.dsub(), ksub = cb.ksub();
  const bool l2 = cb.metric == AnnMetric::l2;
  const float* ct = cb.ct.ptr<float>();
  const float* cterm = cb.cterm.ptr<float>();
  for (int64_t s = 0; s < m; ++s) {
    const float* xs[R];
    float* os[R];
    float base[R];
    for (int r = 0; r < R; ++r) {
      xs[r] = x[r] + s * dsub;
      os[r] = out[r] + s * stride;
      base[r] = l2 ? row_norm2(xs[r], dsub) : 0.0f;
    }
    table_rows<R>(xs, ct + s * dsub * ksub, l2 ? cterm + s * ksub : nullptr, dsub, ksub, l2 ? -2.0f : -1.0f,
                  base, os);
  }
}

inline void tables_of_row(const float* x, const AnnCodebooks& cb, float* out, int64_t stride) {
  tables_of_rows<1>(&x, cb, &out, stride);
}

// Rows [b, e) of x, kRows at a time, handed to f(first_row, count, tables) with tables[r] the
// (m, stride) tables of row first_row + r.
template <typename F>
inline void for_row_tables(const View& x, const AnnCodebooks& cb, int64_t b, int64_t e, float* scratch,
                           int64_t stride, F&& f) {
  const int64_t per_row = cb.m() * stride;
  float* out[kRows];
  const float* rows[kRows];
  for (int r = 0; r < kRows; ++r) out[r] = scratch + r * per_row;
  int64_t i = b;
  for (; i + kRows <= e; i += kRows) {
    for (int r = 0; r < kRows; ++r) rows[r] = x.ptr<float>() + (i + r) * x.stride(0);
    tables_of_rows<kRows>(rows, cb, out, stride);
    f(i, kRows, out);
  }
  for (; i < e; ++i) {
    rows[0] = x.ptr<float>() + i * x.stride(0);
    tables_of_rows<1>(rows, cb, out, stride);
    f(i, 1, out);
  }
}

// Index of the first smallest of t[0..n): per lane, the running minimum and where it was seen
// (indices as floats, exact below 2^24), then the best lane.
inline int64_t argmin(const float* t, int64_t n) {
  int64_t best = 0, j = 0;
  if (n >= W) {
    float lane_idx[W];
    for (int l = 0; l < W; ++l) lane_idx[l] = static_cast<float>(l);
    const VecF step = VecF::set1(static_cast<float>(W));
    VecF at = VecF::load(lane_idx), mv = VecF::load(t), mi = at;
    for (j = W; j + W <= n; j += W) {
      at = at + step;
      const VecF v = VecF::load(t + j);
      mi = VecF::select_lt(v, mv, at, mi);
      mv = VecF::min(mv, v);
    }
    // the smallest value, then the smallest index among the lanes holding it: two reductions
    const VecF lowest = VecF::set1(-(VecF::set1(0.0f) - mv).hmax());
    const VecF where = VecF::select_lt(lowest, mv, VecF::set1(static_cast<float>(n)), mi);
    best = static_cast<int64_t>(-(VecF::set1(0.0f) - where).hmax());
  }
  for (; j < n; ++j) best = t[j] < t[best] ? j : best;
  return best;
}

// The ADC scan of rows [b, e): score = bias + sum_s T[s, codes[row, s]], pushed into the top-k.
// Four rows at a time keep four independent add chains in flight.
template <bool kFilter>
inline void scan_rows(const float* T, int64_t ksub, const uint8_t* codes, int64_t m, const uint8_t* allow,
                      int64_t b, int64_t e, float bias, TopK& top) {
  int64_t i = b;
  if (!kFilter) {
    for (; i + 4 <= e; i += 4) {
      const uint8_t* c = codes + i * m;
      float d0 = bias, d1 = bias, d2 = bias, d3 = bias;
      for (int64_t s = 0; s < m; ++s) {
        const float* t = T + s * ksub;
        d0 += t[c[s]];
        d1 += t[c[m + s]];
        d2 += t[c[2 * m + s]];
        d3 += t[c[3 * m + s]];
      }
      const float bound = top.bound();
      if (d0 < bound || d1 < bound || d2 < bound || d3 < bound) {
        top.push(d0, i);
        top.push(d1, i + 1);
        top.push(d2, i + 2);
        top.push(d3, i + 3);
      }
    }
  }
  for (; i < e; ++i) {
    if (kFilter && !allow[i]) continue;
    const uint8_t* c = codes + i * m;
    float d = bias;
    for (int64_t s = 0; s < m; ++s) d += T[s * ksub + c[s]];
    if (d < top.bound()) top.push(d, i);
  }
}

inline void scan(const float* T, int64_t ksub, const uint8_t* codes, int64_t m, const uint8_t* allow,
                 int64_t b, int64_t e, float bias, TopK& top) {
  if (allow)
    scan_rows<true>(T, ksub, codes, m, allow, b, e, bias, top);
  else
    scan_rows<false>(T, ksub, codes, m, allow, b, e, bias, top);
}

// Exact score of q against one stored row of any float dtype (lower is better). float32 rows
// finish with a scalar tail; float16 rows read the tail through load_row's padded buffer.
inline float exact_score(const float* q, const void* row, DType t, int64_t d, bool l2) {
  VecF acc = VecF::set1(0.0f);
  int64_t i = 0;
  for (; i + W <= d; i += W) {
    const VecF v = load_row(row, t, i), qv = VecF::load(q + i);
    acc = l2 ? VecF::fma(qv - v, qv - v, acc) : VecF::fma(qv, v, acc);
  }
  float s = acc.sum();
  if (i < d && t == DType::f32) {
    const float* r = static_cast<const float*>(row);
    for (; i < d; ++i) s += l2 ? (q[i] - r[i]) * (q[i] - r[i]) : q[i] * r[i];
  } else if (i < d) {
    const VecF v = load_row(row, t, i, d - i), qv = load_row(q, DType::f32, i, d - i);
    s += (l2 ? (qv - v) * (qv - v) : qv * v).sum();
  }
  return l2 ? s : -s;
}

template <typename T>
inline T* row_ptr(const View& v, int64_t i) {
  return v.ptr<T>() + i * v.stride(0);
}

// Scans read tables with 256 entries per sub-space, whatever ksub is: entries past ksub hold +inf,
// so any uint8 code is a valid index and codes need no range check.
constexpr int64_t kTableStride = 256;

// Queries per database block in the flat scan: the block's codes are read from memory once and
// stay in cache while the queries of the group scan them.
constexpr int64_t kQueryGroup = 4;
constexpr int64_t kBlockRows = 4096;

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

void ann_tables(const AnnTables& a) {
  const int64_t n = a.x.size(0), stride = a.out.size(2);
  parallel_for(n, 16, a.threads, [&](int64_t b, int64_t e) {
    float* out[kRows];
    const float* rows[kRows];
    int64_t i = b;
    for (; i + kRows <= e; i += kRows) {
      for (int r = 0; r < kRows; ++r) {
        rows[r] = row_ptr<float>(a.x, i + r);
        out[r] = row_ptr<float>(a.out, i + r);
      }
      tables_of_rows<kRows>(rows, a.cb, out, stride);
    }
    for (; i < e; ++i) tables_of_row(row_ptr<float>(a.x, i), a.cb, row_ptr<float>(a.out, i), stride);
  });
}

void ann_nearest(const AnnNearest& a) {
  const int64_t n = a.x.size(0), m = a.cb.m(), ksub = a.cb.ksub(), k = a.out_idx.size(2);
  parallel_for(n, 16, a.threads, [&](int64_t b, int64_t e) {
    Scratch<float> scratch(kRows * m * ksub);
    for_row_tables(a.x, a.cb, b, e, scratch.p, ksub, [&](int64_t i0, int count, float* const* tables) {
      for (int r = 0; r < count; ++r) {
        int64_t* idx = row_ptr<int64_t>(a.out_idx, i0 + r);
        float* score = row_ptr<float>(a.out_score, i0 + r);
        for (int64_t s = 0; s < m; ++s) {
          const float* t = tables[r] + s * ksub;
          if (k == 1) {  // encoding and k-means
            idx[s] = argmin(t, ksub);
            score[s] = t[idx[s]];
            continue;
          }
          TopK top(score + s * k, idx + s * k, k);
          for (int64_t j = 0; j < ksub; ++j) top.push(t[j], j);
          top.finish();
        }
      }
    });
  });
}

void ann_pq_scan(const AnnPqScan& a) {
  const int64_t nq = a.tables.size(0), m = a.tables.size(1);
  const int64_t N = a.codes.size(0), k = a.out_score.size(1);
  const uint8_t* codes = a.codes.ptr<uint8_t>();
  const uint8_t* allow = a.allow.present ? a.allow.ptr<uint8_t>() : nullptr;
  if (nq < a.threads && N >= 2 * kBlockRows) {
    // Too few queries to busy every thread: split the codes instead, one top-k per slice, then
    // merge the slices' results.
    const int64_t slices = a.threads;
    Scratch<float> part_s(slices * k);
    Scratch<int64_t> part_r(slices * k);
    for (int64_t q = 0; q < nq; ++q) {
      const float* T = row_ptr<float>(a.tables, q);
      parallel_for(slices, 1, a.threads, [&](int64_t sb, int64_t se) {
        for (int64_t sl = sb; sl < se; ++sl) {
          TopK top(part_s.p + sl * k, part_r.p + sl * k, k);
          scan(T, kTableStride, codes, m, allow, N * sl / slices, N * (sl + 1) / slices, 0.0f, top);
          top.finish();
        }
      });
      TopK top(row_ptr<float>(a.out_score, q), row_ptr<int64_t>(a.out_row, q), k);
      for (int64_t i = 0; i < slices * k; ++i)
        if (part_r.p[i] >= 0) top.push(part_s.p[i], part_r.p[i]);
      top.finish();
    }
    return;
  }
  const int64_t groups = (nq + kQueryGroup - 1) / kQueryGroup;
  parallel_for(groups, 1, a.threads, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t q0 = g * kQueryGroup, q1 = q0 + kQueryGroup < nq ? q0 + kQueryGroup : nq;
      TopK tops[kQueryGroup] = {
          {nullptr, nullptr, k}, {nullptr, nullptr, k}, {nullptr, nullptr, k}, {nullptr, nullptr, k}};
      for (int64_t q = q0; q < q1; ++q)
        tops[q - q0] = TopK(row_ptr<float>(a.out_score, q), row_ptr<int64_t>(a.out_row, q), k);
      for (int64_t b = 0; b < N; b += kBlockRows) {
        const int64_t e = b + kBlockRows < N ? b + kBlockRows : N;
        for (int64_t q = q0; q < q1; ++q)
          scan(row_ptr<float>(a.tables, q), kTableStride, codes, m, allow, b, e, 0.0f, tops[q - q0]);
      }
      for (int64_t q = q0; q < q1; ++q) tops[q - q0].finish();
    }
  });
}

constexpr int64_t kSplitRows = 1 << 15;  // codes a query must scan before its lists are split across threads

void ann_ivf_scan(const AnnIvfScan& a) {
  const int64_t nq = a.q.size(0), d = a.q.size(1), nprobe = a.probes.size(1);
  const int64_t m = a.cb.m(), k = a.out_score.size(1);
  const bool l2 = a.cb.metric == AnnMetric::l2;
  const uint8_t* codes = a.codes.ptr<uint8_t>();
  const uint8_t* allow = a.allow.present ? a.allow.ptr<uint8_t>() : nullptr;
  const int64_t* offsets = a.offsets.ptr<int64_t>();
  const float* list_tables = a.list_tables.present ? a.list_tables.ptr<float>() : nullptr;
  const int64_t ksub = a.cb.ksub();
  // Probes [pb, pe) of query qi into top; table (m, 256) is +inf past ksub; scratch holds d floats,
  // or the query's own (m, 256) table when list tables are given.
  auto scan_probes = [&](int64_t qi, int64_t pb, int64_t pe, float* table, float* scratch, TopK& top) {
    const float* q = row_ptr<float>(a.q, qi);
    // ip: <q, c + r> = <q, c> + <q, r>, so one table serves every list and <q, c> is a bias.
    // l2 with list tables: ||q - c - r||^2 = [sum_s T_q(s, j_s)] + 2 <c, r> + ||c||^2 - 2 <q, c>,
    // where T_q is the query's own table; the middle term is the list's table, the rest a bias.
    if (!l2) tables_of_row(q, a.cb, table, kTableStride);
    if (l2 && list_tables) tables_of_row(q, a.cb, scratch, kTableStride);
    const int64_t* probe = row_ptr<int64_t>(a.probes, qi);
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t l = probe[p];
      if (l < 0 || offsets[l] == offsets[l + 1]) continue;
      const float* c = row_ptr<float>(a.coarse, l);
      float bias = 0.0f;
      if (l2 && list_tables) {
        const float* lt = list_tables + l * m * ksub;
        for (int64_t s = 0; s < m; ++s)
          for (int64_t j = 0; j < ksub; ++j)
            table[s * kTableStride + j] = scratch[s * kTableStride + j] + lt[s * ksub + j];
        bias = row_norm2(c, d) - 2.0f * dot(q, c, d);
      } else if (l2) {  // ||q - c - r||^2: tables of the query's residual to this list's centroid
        for (int64_t i = 0; i < d; ++i) scratch[i] = q[i] - c[i];
        tables_of_row(scratch, a.cb, table, kTableStride);
      } else {
        bias = -dot(q, c, d);
      }
      scan(table, kTableStride, codes, m, allow, offsets[l], offsets[l + 1], bias, top);
    }
  };
  const int64_t scratch_floats = list_tables ? m * kTableStride : d;
  auto inf_table = [&](Scratch<float>& t) {
    for (int64_t i = 0; i < m * kTableStride; ++i) t.p[i] = INFINITY;
  };
  if (nq < a.threads && nprobe > 1) {
    // Too few queries to busy every thread: each thread scans a share of a query's lists into
    // its own top-k, then the shares are merged.
    const int64_t slices = a.threads < nprobe ? a.threads : nprobe;
    Scratch<float> part_s(slices * k);
    Scratch<int64_t> part_r(slices * k);
    for (int64_t qi = 0; qi < nq; ++qi) {
      const int64_t* probe = row_ptr<int64_t>(a.probes, qi);
      int64_t rows = 0;
      for (int64_t p = 0; p < nprobe; ++p)
        rows += probe[p] < 0 ? 0 : offsets[probe[p] + 1] - offsets[probe[p]];
      // below this many codes, waking threads costs more than the scan they would share
      const int64_t busy = rows < kSplitRows ? 1 : slices;
      parallel_for(busy, 1, a.threads, [&](int64_t sb, int64_t se) {
        Scratch<float> table(m * kTableStride), scratch(scratch_floats);
        inf_table(table);
        for (int64_t sl = sb; sl < se; ++sl) {
          TopK top(part_s.p + sl * k, part_r.p + sl * k, k);
          scan_probes(qi, nprobe * sl / busy, nprobe * (sl + 1) / busy, table.p, scratch.p, top);
          top.finish();
        }
      });
      TopK top(row_ptr<float>(a.out_score, qi), row_ptr<int64_t>(a.out_row, qi), k);
      for (int64_t i = 0; i < busy * k; ++i)
        if (part_r.p[i] >= 0) top.push(part_s.p[i], part_r.p[i]);
      top.finish();
    }
    return;
  }
  parallel_for(nq, 1, a.threads, [&](int64_t qb, int64_t qe) {
    Scratch<float> table(m * kTableStride), scratch(scratch_floats);
    inf_table(table);
    for (int64_t qi = qb; qi < qe; ++qi) {
      TopK top(row_ptr<float>(a.out_score, qi), row_ptr<int64_t>(a.out_row, qi), k);
      scan_probes(qi, 0, nprobe, table.p, scratch.p, top);
      top.finish();
    }
  });
}

void ann_rerank(const AnnRerank& a) {
  const int64_t nq = a.q.size(0), d = a.q.size(1), C = a.cand.size(1), k = a.out_score.size(1);
  const bool l2 = a.metric == AnnMetric::l2;
  const int esz = dtype_size(a.base.dtype);
  const char* base = static_cast<const char*>(a.base.data);
  parallel_for(nq, 1, a.threads, [&](int64_t qb, int64_t qe) {
    for (int64_t qi = qb; qi < qe; ++qi) {
      const float* q = row_ptr<float>(a.q, qi);
      const int64_t* cand = row_ptr<int64_t>(a.cand, qi);
      const float* first = a.cand_score.present ? row_ptr<float>(a.cand_score, qi) : nullptr;
      TopK top(row_ptr<float>(a.out_score, qi), row_ptr<int64_t>(a.out_row, qi), k);
      for (int64_t j = 0; j < C; ++j) {
        const int64_t r = cand[j];
        if (r < 0) continue;
        float s = exact_score(q, base + r * a.base.stride(0) * esz, a.base.dtype, d, l2);
        if (first && a.fusion != 0.0f) s += a.fusion * first[j];
        top.push(s, r);
      }
      top.finish();
    }
  });
}

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
