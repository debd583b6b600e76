// Per-ISA forward of the output-channel-blocked format (cpu.h, Blocked): blocks of B output rows
// stored over the union of their columns. Each stored column loads its source pixels once and
// does B fused multiply-adds with them, one per row of the block, into a B x NVB register tile;
// the CSR kernel (cpu.cpp) loads a source run for every non-zero. The tiling, the im2col /
// shifted-input paths and the output types are the CSR kernel's (kernel.h).
#include "sparse/kernel.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

using namespace sparse_kernel;

// Accumulator registers per tile: half of AVX-512's 32 and AVX2's 16 (the rest hold the source
// vectors and the broadcast value); the scalar build keeps a few chains for latency.
#if defined(__AVX512F__)
constexpr int ACC = 16;
#elif defined(__AVX2__)
constexpr int ACC = 8;
#else
constexpr int ACC = 16;
#endif

struct BlockPtrs {
  const int64_t* rowptr;
  const int32_t* col;
  const float* val;  // B per stored column
  int64_t blocks, bpg, Og, panels, ncols, b;
  BlockPtrs(const Blocked& m, const ConvGeom& g, int64_t b)
      : rowptr(m.rowptr.ptr<int64_t>()),
        col(m.colidx.ptr<int32_t>()),
        val(m.values.ptr<float>()),
        blocks(g.G * ((g.Og() + b - 1) / b)),
        bpg((g.Og() + b - 1) / b),
        Og(g.Og()),
        panels((m.rowptr.size(0) - 1) / blocks),
        ncols(g.K()),
        b(b) {}

  int64_t begin(int64_t j, int64_t q) const { return rowptr[q * blocks + j]; }
  int64_t end(int64_t j, int64_t q) const { return rowptr[q * blocks + j + 1]; }
  int64_t first_row(int64_t j) const { return (j / bpg) * Og + (j % bpg) * b; }
  int64_t rows(int64_t j) const {
    return std::min(b, Og - (j % bpg) * b);
  }  // a group's last block may be short

  void check_blocks(int64_t j0, int64_t j1) const {  // every column index the kernel reads
    bool ok = true;
    for (int64_t q = 0; q < panels; ++q) ok &= columns_in_range(col, begin(j0, q), begin(j1, q), ncols);
    HOTOPS_CHECK(ok, "column index out of range [0, ", ncols, ") in blocks ", j0, "..", j1 - 1,
                 " of the blocked sparse weight");
  }
};

// acc[i][j] += val[k * B + i] * src[col[k] * ld + j * W ...] over the stored columns [k, kend): one
// load of NVR source vectors per column, B * NVR independent FMA chains, on a local copy of acc
// (as cpu.cpp's accumulate: through the reference the results could go back to memory each time).
template <int B, int NVR, bool PARTIAL>
inline void block_accumulate(const BlockPtrs& m, int64_t k, int64_t kend, const float* src, int64_t ld,
                             int64_t last, VecF (&acc)[B][NVR]) {
  VecF a[B][NVR];
  for (int i = 0; i < B; ++i)
    for (int j = 0; j < NVR; ++j) a[i][j] = acc[i][j];
  for (; k < kend; ++k) {
    const float* s = src + m.col[k] * ld;
    const float* v = m.val + k * B;
    VecF x[NVR];
    for (int j = 0; j < NVR; ++j)
      x[j] = PARTIAL && j == NVR - 1 ? load_first(s + j * W, last) : VecF::load(s + j * W);
    for (int i = 0; i < B; ++i) {
      const VecF vi = VecF::set1(v[i]);
      for (int j = 0; j < NVR; ++j) a[i][j] = VecF::fma(vi, x[j], a[i][j]);
    }
  }
  for (int i = 0; i < B; ++i)
    for (int j = 0; j < NVR; ++j) acc[i][j] = a[i][j];
}

// Blocks [j0, j1) over NVR vectors of pixels from p, the last holding `last` (1..W): out's row
// (first_row(j) - first_row(j0) + i) gets act(bias + the block's row i). Column panels run one
// after another over all the blocks, the partial sums parked between them (as rows_tile does).
template <int B, int NVR, bool PARTIAL>
void blocks_tile(const BlockPtrs& m, int64_t j0, int64_t j1, const float* src, int64_t ld, int64_t p,
                 int64_t last, Out out, const float* bias, Act act, float* park) {
  const VecF zero = VecF::set1(0.0f);
  const int64_t last_q = m.panels - 1, r0 = m.first_row(j0);
  auto start = [&](int64_t j, int64_t q, VecF(&acc)[B][NVR]) {
    const float* parked = park + (j - j0) * B * NVR * W;
    for (int i = 0; i < B; ++i)
      for (int jj = 0; jj < NVR; ++jj) acc[i][jj] = q ? VecF::load(parked + (i * NVR + jj) * W) : zero;
    block_accumulate<B, NVR, PARTIAL>(m, m.begin(j, q), m.end(j, q), src + p, ld, last, acc);
  };
  for (int64_t q = 0; q < last_q; ++q)
    for (int64_t j = j0; j < j1; ++j) {
      VecF acc[B][NVR];
      start(j, q, acc);
      for (int i = 0; i < B; ++i)
        for (int jj = 0; jj < NVR; ++jj) acc[i][jj].store(park + (j - j0) * B * NVR * W + (i * NVR + jj) * W);
    }
  const int64_t width = (NVR - 1) * W + last;
  for (int64_t j = j0; j < j1; ++j) {
    VecF acc[B][NVR];
    start(j, last_q, acc);
    const int64_t row0 = m.first_row(j) - r0, rows = m.rows(j);
    // a strided output (linear: pixels are O apart, rows adjacent) is staged and written pixel by
    // pixel, each pixel's B rows together
    float stage[B][NVR * W];
    for (int64_t i = 0; i < rows; ++i) {
      const VecF b = VecF::set1(bias ? bias[r0 + row0 + i] : 0.0f);
      for (int jj = 0; jj < NVR; ++jj) {
        const VecF y = epilogue(acc[i][jj], b, act);
        if (out.ps == 1)
          out.put(row0 + i, p + jj * W, y, jj == NVR - 1 ? last : W);
        else
          y.store(stage[i] + jj * W);
      }
    }
    if (out.ps != 1)
      for (int64_t t = 0; t < width; ++t)
        for (int64_t i = 0; i < rows; ++i) out.set(row0 + i, p + t, stage[i][t]);
  }
}

// B floats, the values of one stored column: an SSE / AVX register where B is 4 / 8 (the AVX2 and
// AVX-512 builds), else an array. acc += v * x per stored column is then one short FMA.
template <int B>
struct Lanes {
  float f[B];
  static Lanes zero() { return Lanes{}; }
  static Lanes load(const float* p) {
    Lanes l;
    for (int i = 0; i < B; ++i) l.f[i] = p[i];
    return l;
  }
  void store(float* p) const {
    for (int i = 0; i < B; ++i) p[i] = f[i];
  }
  static Lanes fma(Lanes v, float x, Lanes acc) {
    for (int i = 0; i < B; ++i) acc.f[i] += v.f[i] * x;
    return acc;
  }
  friend Lanes operator+(Lanes a, Lanes b) {
    for (int i = 0; i < B; ++i) a.f[i] += b.f[i];
    return a;
  }
};
#if defined(__AVX512F__) || defined(__AVX2__)
template <>
struct Lanes<4> {
  __m128 v;
  static Lanes zero() { return {_mm_setzero_ps()}; }
  static Lanes load(const float* p) { return {_mm_loadu_ps(p)}; }
  void store(float* p) const { _mm_storeu_ps(p, v); }
  static Lanes fma(Lanes a, float x, Lanes acc) { return {_mm_fmadd_ps(a.v, _mm_set1_ps(x), acc.v)}; }
  friend Lanes operator+(Lanes a, Lanes b) { return {_mm_add_ps(a.v, b.v)}; }
};
template <>
struct Lanes<8> {
  __m256 v;
  static Lanes zero() { return {_mm256_setzero_ps()}; }
  static Lanes load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  static Lanes fma(Lanes a, float x, Lanes acc) { return {_mm256_fmadd_ps(a.v, _mm256_set1_ps(x), acc.v)}; }
  friend Lanes operator+(Lanes a, Lanes b) { return {_mm256_add_ps(a.v, b.v)}; }
};
#endif

// One pixel (batch-1 linear, a blocked GEMV): per stored column one source value times the
// column's B values, four accumulators for the FMA latency. Where the CSR GEMV gathers a source
// value per non-zero, this reads one per B rows. Panels add up in `park` (B floats per block).
template <int B>
void blocks_gemv(const BlockPtrs& m, int64_t j0, int64_t j1, const float* src, int64_t ld, int64_t p, Out out,
                 const float* bias, Act act, float* park) {
  using L = Lanes<B>;
  const int64_t r0 = m.first_row(j0);
  src += p;
  for (int64_t q = 0; q < m.panels; ++q)
    for (int64_t j = j0; j < j1; ++j) {
      int64_t k = m.begin(j, q);
      const int64_t kend = m.end(j, q);
      L acc[4] = {q ? L::load(park + (j - j0) * B) : L::zero(), L::zero(), L::zero(), L::zero()};
      for (; k + 4 <= kend; k += 4)
        for (int u = 0; u < 4; ++u)
          acc[u] = L::fma(L::load(m.val + (k + u) * B), src[m.col[k + u] * ld], acc[u]);
      for (; k < kend; ++k) acc[0] = L::fma(L::load(m.val + k * B), src[m.col[k] * ld], acc[0]);
      ((acc[0] + acc[1]) + (acc[2] + acc[3])).store(park + (j - j0) * B);
    }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t row0 = m.first_row(j) - r0;
    for (int64_t i = 0; i < m.rows(j); ++i) {
      const float b = bias ? bias[r0 + row0 + i] : 0.0f;
      out.put(row0 + i, p, epilogue(VecF::set1(park[(j - j0) * B + i]), VecF::set1(b), act), 1);
    }
  }
}

template <int B>
void spmm_blocks(const BlockPtrs& m, int64_t j0, int64_t j1, const float* src, int64_t ld, int64_t n, Out out,
                 const float* bias, Act act, float* park) {
  constexpr int NVB = ACC / B >= 1 ? ACC / B : 1;  // vectors of pixels per register tile
  constexpr int64_t CHB = int64_t(NVB) * W;
  m.check_blocks(j0, j1);
  int64_t p = 0;
  for (; p + CHB <= n; p += CHB) blocks_tile<B, NVB, false>(m, j0, j1, src, ld, p, W, out, bias, act, park);
  const int64_t rem = n - p;
  if (rem == 1) return blocks_gemv<B>(m, j0, j1, src, ld, p, out, bias, act, park);
  if (rem > 0) {
    const int64_t nv = (rem + W - 1) / W, last = rem - (nv - 1) * W;
    if constexpr (NVB >= 2) {
      if (nv == 1) return blocks_tile<B, 1, true>(m, j0, j1, src, ld, p, last, out, bias, act, park);
    }
    if constexpr (NVB >= 3) {
      if (nv == 2) return blocks_tile<B, 2, true>(m, j0, j1, src, ld, p, last, out, bias, act, park);
    }
    if constexpr (NVB >= 4) {
      if (nv == 3) return blocks_tile<B, 3, true>(m, j0, j1, src, ld, p, last, out, bias, act, park);
    }
    return blocks_tile<B, NVB, true>(m, j0, j1, src, ld, p, last, out, bias, act, park);
  }
}

template <int B>
void conv_fwd_blocked(const SparseConvFwd& a) {
  const ConvGeom& g = a.g;
  const BlockPtrs m(a.blocked, g, B);
  const float* bias = a.bias.present ? a.bias.ptr<float>() : nullptr;
  // rows [r0, r1) of one group, r0 at a block's start: its blocks
  auto product = [&](const BlockPtrs& w) {
    return [&, w](int64_t r0, int64_t r1, const float* src, int64_t ld, int64_t len, Out out, float* park) {
      const int64_t grp = r0 / g.Og(), base = grp * w.bpg;
      const int64_t j0 = base + (r0 - grp * g.Og()) / B, j1 = base + (r1 - grp * g.Og() + B - 1) / B;
      spmm_blocks<B>(w, j0, j1, src, ld, len, out, bias, a.act, park);
    };
  };
  if (Shifted::applies(g)) {
    const Shifted s(g);
    const int64_t stored = a.blocked.colidx.size(0);
    Scratch<int32_t> offset(stored);
    s.offsets(g, m.col, stored, offset.p);
    BlockPtrs shifted = m;
    shifted.col = offset.p;
    shifted.ncols = s.span;  // every offset lies inside the group's padded input
    return s.run(a, B, product(shifted));
  }
  im2col_tiles(a, B, product(m));
}

}  // namespace

void sparse_conv_fwd_blocked(const SparseConvFwd& a) {
  switch (a.block) {
    case 4:
      return conv_fwd_blocked<4>(a);
    case 8:
      return conv_fwd_blocked<8>(a);
    default:
      HOTOPS_CHECK(false, "block must be 4 or 8, got ", a.block);
  }
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
