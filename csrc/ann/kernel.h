// Inline helpers shared by the ANN kernel TUs (cpu.cpp: tables, encoding, PQ / IVF scans, re-rank;
// fastscan.cpp: the 4-bit fast-scan), compiled per ISA like them: the top-k heap and reservoir, the
// query tables, the 8-bit scan loop, exact scores. Inline only, no shared templates with
// non-trivial bodies (the ODR rule of docs/architecture.md): scratch buffers are plain new[] arrays,
// the top-k is a hand-written heap.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "ann/cpu.h"
#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace ann_kernel {  // not anonymous (two TUs share it), so named apart from other families

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

}  // namespace ann_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops
