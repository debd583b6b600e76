// Argument checks of the PQ kernels: every shape, dtype, stride and index the kernels rely on.
#include "ann/cpu.h"

namespace hotops {
namespace {

// Contiguity, except for empty arrays, whose strides DLPack producers leave arbitrary.
void check_dense(const View& v, const char* what) {
  if (v.numel() > 0) check_contiguous(v, what);
}
void check_rows_dense(const View& v, const char* what) {
  if (v.numel() > 0) check_rows_contiguous(v, what);
}

void check_codebooks(const AnnCodebooks& cb) {
  check_view(cb.ct, "codebooks", 3, {DType::f32});
  check_dense(cb.ct, "codebooks");
  HOTOPS_CHECK(cb.m() >= 1 && cb.dsub() >= 1 && cb.ksub() >= 1, "codebooks must be non-empty, got (", cb.m(),
               ", ", cb.dsub(), ", ", cb.ksub(), ")");
  if (cb.metric == AnnMetric::l2) {
    check_view(cb.cterm, "codebook norms", 2, {DType::f32});
    check_dense(cb.cterm, "codebook norms");
    HOTOPS_CHECK(cb.cterm.size(0) == cb.m() && cb.cterm.size(1) == cb.ksub(), "codebook norms must be (",
                 cb.m(), ", ", cb.ksub(), ")");
  }
  HOTOPS_CHECK(cb.metric == AnnMetric::l2 || cb.metric == AnnMetric::ip, "metric must be l2 or ip");
}

void check_rows(const View& x, const char* what, int64_t dim) {
  check_view(x, what, 2, {DType::f32});
  check_rows_dense(x, what);
  HOTOPS_CHECK(x.size(1) == dim, what, " has ", x.size(1), " columns, expected ", dim);
}

void check_out(const View& v, const char* what, int ndim, DType t, const int64_t* sizes) {
  check_view(v, what, ndim, {t});
  check_dense(v, what);
  for (int d = 0; d < ndim; ++d)
    HOTOPS_CHECK(v.size(d) == sizes[d], what, " has size ", v.size(d), " in dimension ", d, ", expected ",
                 sizes[d]);
}

void check_results(const View& score, const View& row, int64_t nq) {
  check_view(score, "result scores", 2, {DType::f32});
  const int64_t sizes[2] = {nq, score.size(1)};
  HOTOPS_CHECK(sizes[1] >= 1, "k must be at least 1");
  check_out(score, "result scores", 2, DType::f32, sizes);
  check_out(row, "result rows", 2, DType::i64, sizes);
}

void check_codes(const View& codes, int64_t m) {
  check_view(codes, "codes", 2, {DType::u8});
  check_dense(codes, "codes");
  HOTOPS_CHECK(codes.size(1) == m, "codes have ", codes.size(1), " bytes per vector, expected m = ", m);
}

void check_allow(const View& allow, int64_t n) {
  if (!allow.present) return;
  check_view(allow, "allow mask", 1, {DType::u8, DType::boolean});
  check_dense(allow, "allow mask");
  HOTOPS_CHECK(allow.size(0) == n, "allow mask has ", allow.size(0),
               " entries, expected one per stored vector (", n, ")");
}

}  // namespace

void check(const AnnTables& a) {
  check_codebooks(a.cb);
  check_rows(a.x, "vectors", a.cb.m() * a.cb.dsub());
  check_view(a.out, "tables", 3, {DType::f32});
  HOTOPS_CHECK(a.out.size(2) >= a.cb.ksub(), "tables need at least ksub = ", a.cb.ksub(),
               " entries per sub-space");
  const int64_t sizes[3] = {a.x.size(0), a.cb.m(), a.out.size(2)};
  check_out(a.out, "tables", 3, DType::f32, sizes);
}

void check(const AnnNearest& a) {
  check_codebooks(a.cb);
  check_rows(a.x, "vectors", a.cb.m() * a.cb.dsub());
  check_view(a.out_idx, "nearest indices", 3, {DType::i64});
  const int64_t k = a.out_idx.size(2);
  HOTOPS_CHECK(k >= 1 && k <= a.cb.ksub(), "k = ", k, " nearest centroids asked, expected 1..", a.cb.ksub());
  const int64_t sizes[3] = {a.x.size(0), a.cb.m(), k};
  check_out(a.out_idx, "nearest indices", 3, DType::i64, sizes);
  check_out(a.out_score, "nearest scores", 3, DType::f32, sizes);
}

void check(const AnnPqScan& a) {
  check_view(a.tables, "tables", 3, {DType::f32});
  check_dense(a.tables, "tables");
  HOTOPS_CHECK(a.tables.size(2) == 256, "tables must have 256 entries per sub-space (+inf past ksub), got ",
               a.tables.size(2));
  check_codes(a.codes, a.tables.size(1));
  check_allow(a.allow, a.codes.size(0));
  check_results(a.out_score, a.out_row, a.tables.size(0));
}

void check(const AnnIvfScan& a) {
  check_codebooks(a.cb);
  HOTOPS_CHECK(a.cb.ksub() <= 256, "8-bit codes index at most 256 centroids, codebooks have ", a.cb.ksub());
  const int64_t d = a.cb.m() * a.cb.dsub();
  check_rows(a.q, "queries", d);
  check_rows(a.coarse, "coarse centroids", d);
  const int64_t nlist = a.coarse.size(0);
  check_codes(a.codes, a.cb.m());
  const int64_t N = a.codes.size(0);
  check_view(a.offsets, "list offsets", 1, {DType::i64});
  check_dense(a.offsets, "list offsets");
  HOTOPS_CHECK(a.offsets.size(0) == nlist + 1, "list offsets have ", a.offsets.size(0),
               " entries, expected nlist + 1 = ", nlist + 1);
  const int64_t* off = a.offsets.ptr<int64_t>();
  HOTOPS_CHECK(off[0] == 0 && off[nlist] == N, "list offsets must run from 0 to the number of codes (", N,
               ")");
  for (int64_t l = 0; l < nlist; ++l)
    HOTOPS_CHECK(off[l] <= off[l + 1], "list offsets must be non-decreasing (list ", l, ")");
  check_view(a.probes, "probes", 2, {DType::i64});
  check_dense(a.probes, "probes");
  HOTOPS_CHECK(a.probes.size(0) == a.q.size(0), "probes have ", a.probes.size(0),
               " rows, expected one per query");
  const int64_t* p = a.probes.ptr<int64_t>();
  for (int64_t i = 0; i < a.probes.numel(); ++i)
    HOTOPS_CHECK(p[i] >= -1 && p[i] < nlist, "probe ", p[i], " is not a list (0..", nlist - 1, " or -1)");
  check_allow(a.allow, N);
  if (a.list_tables.present) {
    HOTOPS_CHECK(a.cb.metric == AnnMetric::l2, "list tables serve the l2 metric only");
    check_view(a.list_tables, "list tables", 3, {DType::f32});
    const int64_t sizes[3] = {nlist, a.cb.m(), a.cb.ksub()};
    check_out(a.list_tables, "list tables", 3, DType::f32, sizes);
  }
  check_results(a.out_score, a.out_row, a.q.size(0));
}

void check(const AnnFastScan& a) {
  check_codebooks(a.cb);
  HOTOPS_CHECK(a.cb.ksub() == 16, "fast-scan needs 4-bit codebooks (16 centroids), got ", a.cb.ksub());
  HOTOPS_CHECK(a.cb.m() <= 128, "fast-scan supports at most 128 sub-spaces, got ", a.cb.m());
  const int64_t d = a.cb.m() * a.cb.dsub(), mp = (a.cb.m() + 3) / 4 * 4;
  check_rows(a.q, "queries", d);
  check_rows(a.coarse, "coarse centroids", d);
  const int64_t nlist = a.coarse.size(0);
  if (a.cb.metric == AnnMetric::l2) {
    check_view(a.list_tables, "list tables", 3, {DType::f32});
    const int64_t sizes[3] = {nlist, a.cb.m(), 16};
    check_out(a.list_tables, "list tables", 3, DType::f32, sizes);
  }
  check_view(a.packed, "packed codes", 2, {DType::u8});
  check_dense(a.packed, "packed codes");
  HOTOPS_CHECK(a.packed.size(1) == mp * 16, "packed codes have ", a.packed.size(1),
               " bytes per block, expected ", mp * 16);
  for (const View* v : {&a.offsets, &a.block_offsets}) {
    check_view(*v, "list offsets", 1, {DType::i64});
    check_dense(*v, "list offsets");
    HOTOPS_CHECK(v->size(0) == nlist + 1, "list offsets must have nlist + 1 = ", nlist + 1, " entries");
  }
  const int64_t* off = a.offsets.ptr<int64_t>();
  const int64_t* boff = a.block_offsets.ptr<int64_t>();
  HOTOPS_CHECK(off[0] == 0 && boff[0] == 0 && boff[nlist] == a.packed.size(0),
               "list offsets must start at 0 and ", "block offsets end at the number of blocks (",
               a.packed.size(0), ")");
  for (int64_t l = 0; l < nlist; ++l)
    HOTOPS_CHECK(off[l] <= off[l + 1] && boff[l + 1] - boff[l] == (off[l + 1] - off[l] + 31) / 32, "list ", l,
                 ": row and block offsets disagree (blocks of 32 rows)");
  check_view(a.probes, "probes", 2, {DType::i64});
  check_dense(a.probes, "probes");
  HOTOPS_CHECK(a.probes.size(0) == a.q.size(0), "probes have ", a.probes.size(0),
               " rows, expected one per query");
  const int64_t* p = a.probes.ptr<int64_t>();
  for (int64_t i = 0; i < a.probes.numel(); ++i)
    HOTOPS_CHECK(p[i] >= -1 && p[i] < nlist, "probe ", p[i], " is not a list (0..", nlist - 1, " or -1)");
  check_allow(a.allow, off[nlist]);
  check_results(a.out_score, a.out_row, a.q.size(0));
}

void check(const AnnRerank& a) {
  check_view(a.base, "stored vectors", 2, {DType::f32, DType::f16});
  check_rows_dense(a.base, "stored vectors");
  check_rows(a.q, "queries", a.base.size(1));
  check_view(a.cand, "candidates", 2, {DType::i64});
  check_dense(a.cand, "candidates");
  HOTOPS_CHECK(a.cand.size(0) == a.q.size(0), "candidates have ", a.cand.size(0),
               " rows, expected one per query");
  const int64_t N = a.base.size(0);
  const int64_t* c = a.cand.ptr<int64_t>();
  for (int64_t i = 0; i < a.cand.numel(); ++i)
    HOTOPS_CHECK(c[i] >= -1 && c[i] < N, "candidate ", c[i], " is not a stored row (0..", N - 1, " or -1)");
  if (a.cand_score.present) {
    const int64_t sizes[2] = {a.cand.size(0), a.cand.size(1)};
    check_out(a.cand_score, "candidate scores", 2, DType::f32, sizes);
  }
  HOTOPS_CHECK(a.metric == AnnMetric::l2 || a.metric == AnnMetric::ip, "metric must be l2 or ip");
  check_results(a.out_score, a.out_row, a.q.size(0));
}

}  // namespace hotops
