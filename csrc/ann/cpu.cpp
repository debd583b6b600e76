// Per-ISA PQ kernels (see cpu.h). Everything here is inline or has internal linkage (the ODR rule
// of docs/architecture.md): scratch buffers are plain new[] arrays, the top-k is a hand-written heap.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "ann/cpu.h"
#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

constexpr int W = VecF::W;

template <typename T>
struct Scratch {  // a per-thread buffer (no std::vector in kernel TUs)
  T* p;
  explicit Scratch(int64_t n) : p(new T[n > 0 ? n : 1]) {}
  ~Scratch() { delete[] p; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

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
        s[i] = s[p]; r[i] = r[p]; i = p;
      }
      s[i] = x; r[i] = row;
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
      s[i] = s[c]; r[i] = r[c]; i = c;
    }
    s[i] = x; r[i] = row;
  }
  // Sorts ascending in place (heap sort) and pads the missing tail with (+inf, -1).
  void finish() {
    for (int64_t size = n; size > 1; --size) {
      float x = s[size - 1];
      int64_t row = r[size - 1];
      s[size - 1] = s[0]; r[size - 1] = r[0];
      sift_down(x, row, size - 1);
    }
    for (int64_t i = n; i < k; ++i) { s[i] = INFINITY; r[i] = -1; }
  }
};

inline float row_norm2(const float* x, int64_t d) {
  VecF acc = VecF::set1(0.0f);
  int64_t i = 0;
  for (; i + W <= d; i += W) { VecF v = VecF::load(x + i); acc = VecF::fma(v, v, acc); }
  float s = acc.sum();
  for (; i < d; ++i) s += x[i] * x[i];
  return s;
}

// Distance tables of R rows against one sub-space's ksub centroids, ct (dsub, ksub):
//   out[r][j] = base[r] + cterm[j] + alpha * <x[r], c_j>
// l2: alpha = -2, base = ||x||^2, cterm = ||c||^2; ip: alpha = -1, no base or cterm. A block of
// V vectors of centroids times R rows stays in registers, so each centroid load feeds R FMAs.
constexpr int kRows = 4;                  // rows per register block
constexpr int kVecs = W == 8 ? 2 : 4;     // centroid vectors per block (AVX2 has 16 registers)

template <int R>
inline void table_rows(const float* const* x, const float* ct, const float* cterm, int64_t dsub,
                       int64_t ksub, float alpha, const float* base, float* const* out) {
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
    float lane_idx[W], lane_min[W];
    for (int l = 0; l < W; ++l) lane_idx[l] = static_cast<float>(l);
    const VecF step = VecF::set1(static_cast<float>(W));
    VecF at = VecF::load(lane_idx), mv = VecF::load(t), mi = at;
    for (j = W; j + W <= n; j += W) {
      at = at + step;
      const VecF v = VecF::load(t + j);
      mi = VecF::select_lt(v, mv, at, mi);
      mv = VecF::min(mv, v);
    }
    mv.store(lane_min);
    mi.store(lane_idx);
    for (int l = 0; l < W; ++l) {
      const int64_t i = static_cast<int64_t>(lane_idx[l]);
      if (lane_min[l] < t[best] || (lane_min[l] == t[best] && i < best)) best = i;
    }
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
        d0 += t[c[s]]; d1 += t[c[m + s]]; d2 += t[c[2 * m + s]]; d3 += t[c[3 * m + s]];
      }
      const float bound = top.bound();
      if (d0 < bound || d1 < bound || d2 < bound || d3 < bound) {
        top.push(d0, i); top.push(d1, i + 1); top.push(d2, i + 2); top.push(d3, i + 3);
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
  if (allow) scan_rows<true>(T, ksub, codes, m, allow, b, e, bias, top);
  else scan_rows<false>(T, ksub, codes, m, allow, b, e, bias, top);
}

inline float dot(const float* a, const float* b, int64_t d) {
  VecF acc = VecF::set1(0.0f);
  int64_t i = 0;
  for (; i + W <= d; i += W) acc = VecF::fma(VecF::load(a + i), VecF::load(b + i), acc);
  float s = acc.sum();
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// Exact score of q against one stored row of any float dtype (lower is better).
inline float exact_score(const float* q, const void* row, DType t, int64_t d, bool l2) {
  VecF acc = VecF::set1(0.0f);
  for (int64_t i = 0; i < d; i += W) {
    const int64_t n = d - i < W ? d - i : W;
    VecF v = load_row(row, t, i, n), qv = load_row(q, DType::f32, i, n);
    acc = l2 ? VecF::fma(qv - v, qv - v, acc) : VecF::fma(qv, v, acc);
  }
  return l2 ? acc.sum() : -acc.sum();
}

template <typename T>
inline T* row_ptr(const View& v, int64_t i) { return v.ptr<T>() + i * v.stride(0); }

// Scans read tables with 256 entries per sub-space, whatever ksub is: entries past ksub hold +inf,
// so any uint8 code is a valid index and codes need no range check.
constexpr int64_t kTableStride = 256;

// Queries per database block in the flat scan: the block's codes are read from memory once and
// stay in cache while the queries of the group scan them.
constexpr int64_t kQueryGroup = 4;
constexpr int64_t kBlockRows = 4096;

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
  const int64_t groups = (nq + kQueryGroup - 1) / kQueryGroup;
  parallel_for(groups, 1, a.threads, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t q0 = g * kQueryGroup, q1 = q0 + kQueryGroup < nq ? q0 + kQueryGroup : nq;
      TopK tops[kQueryGroup] = {
          {nullptr, nullptr, k}, {nullptr, nullptr, k}, {nullptr, nullptr, k}, {nullptr, nullptr, k}};
      for (int64_t q = q0; q < q1; ++q) tops[q - q0] = TopK(row_ptr<float>(a.out_score, q), row_ptr<int64_t>(a.out_row, q), k);
      for (int64_t b = 0; b < N; b += kBlockRows) {
        const int64_t e = b + kBlockRows < N ? b + kBlockRows : N;
        for (int64_t q = q0; q < q1; ++q) scan(row_ptr<float>(a.tables, q), kTableStride, codes, m, allow, b, e, 0.0f, tops[q - q0]);
      }
      for (int64_t q = q0; q < q1; ++q) tops[q - q0].finish();
    }
  });
}

void ann_ivf_scan(const AnnIvfScan& a) {
  const int64_t nq = a.q.size(0), d = a.q.size(1), nprobe = a.probes.size(1);
  const int64_t m = a.cb.m(), k = a.out_score.size(1);
  const bool l2 = a.cb.metric == AnnMetric::l2;
  const uint8_t* codes = a.codes.ptr<uint8_t>();
  const uint8_t* allow = a.allow.present ? a.allow.ptr<uint8_t>() : nullptr;
  const int64_t* offsets = a.offsets.ptr<int64_t>();
  parallel_for(nq, 1, a.threads, [&](int64_t qb, int64_t qe) {
    Scratch<float> table(m * kTableStride), residual(d);
    for (int64_t i = 0; i < m * kTableStride; ++i) table.p[i] = INFINITY;
    for (int64_t qi = qb; qi < qe; ++qi) {
      const float* q = row_ptr<float>(a.q, qi);
      TopK top(row_ptr<float>(a.out_score, qi), row_ptr<int64_t>(a.out_row, qi), k);
      // ip: <q, c + r> = <q, c> + <q, r>, so one table serves every list and <q, c> is a bias.
      if (!l2) tables_of_row(q, a.cb, table.p, kTableStride);
      const int64_t* probe = row_ptr<int64_t>(a.probes, qi);
      for (int64_t p = 0; p < nprobe; ++p) {
        const int64_t l = probe[p];
        if (l < 0 || offsets[l] == offsets[l + 1]) continue;
        const float* c = row_ptr<float>(a.coarse, l);
        float bias = 0.0f;
        if (l2) {  // ||q - c - r||^2: tables of the query's residual to this list's centroid
          for (int64_t i = 0; i < d; ++i) residual.p[i] = q[i] - c[i];
          tables_of_row(residual.p, a.cb, table.p, kTableStride);
        } else {
          bias = -dot(q, c, d);
        }
        scan(table.p, kTableStride, codes, m, allow, offsets[l], offsets[l + 1], bias, top);
      }
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

}  // namespace HOTOPS_ISA
}  // namespace hotops
