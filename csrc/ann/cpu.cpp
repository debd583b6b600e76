// Per-ISA PQ kernels (see cpu.h): query tables, encoding, the flat and IVF 8-bit scans, the exact
// re-rank; the 4-bit fast-scan is in fastscan.cpp. Shared inline helpers: kernel.h.
#include "ann/cpu.h"

#include "ann/kernel.h"

namespace hotops {
namespace HOTOPS_ISA {

using namespace ann_kernel;

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

}  // namespace HOTOPS_ISA
}  // namespace hotops
