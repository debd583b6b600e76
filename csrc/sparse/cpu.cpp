// Per-ISA sparse x dense kernels (see cpu.h).
//
// Work items are (image, pixel tile, group, block of rows). A tile's im2col rows live in a
// per-thread scratch buffer sized to stay in L2 while every output row of the group streams over
// it; each non-zero w[o, k] is then one broadcast and NV fused multiply-adds over 64 pixels held
// in registers, so the arithmetic is proportional to the non-zeros, never to the dense weight.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_features.h"
#include "sparse/bf16.h"
#include "sparse/kernel.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

using namespace sparse_kernel;

// Adds the non-zeros [k, kend) of one row into acc over NVR vectors of pixels, the last holding
// `last` (1..W) valid pixels: two sets of accumulators (even and odd non-zeros), so 2 * NVR
// independent FMA chains hide the FMA latency. The loop runs on a local copy of acc: through the
// reference, where this is not inlined, every FMA's result went back to memory (a vector type may
// alias the float loads), which cost the forward 20 % at 4096 x 4096.
template <int NVR, bool PARTIAL>
inline void accumulate(const CsrPtrs& m, int64_t k, int64_t kend, const float* src, int64_t ld, int64_t last,
                       VecF (&acc)[2][NV]) {
  VecF a[2][NVR];
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < NVR; ++j) a[u][j] = acc[u][j];
  auto step = [&](int u, int64_t at) {
    const VecF v = VecF::set1(m.val[at]);
    const float* s = src + m.col[at] * ld;
    for (int j = 0; j < NVR; ++j) {
      const VecF x = PARTIAL && j == NVR - 1 ? load_first(s + j * W, last) : VecF::load(s + j * W);
      a[u][j] = VecF::fma(v, x, a[u][j]);
    }
  };
  for (; k + 1 < kend; k += 2) {
    step(0, k);
    step(1, k + 1);
  }
  if (k < kend) step(0, k);
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < NVR; ++j) acc[u][j] = a[u][j];
}

// sum_k val[k] * src[col[k] * ld] over one row's non-zeros [k, kend), left spread over the lanes
// (the caller adds up a row's panels before one horizontal sum): a sparse dot product that gathers
// its operands 16 (AVX-512) or 8 (AVX2) at a time where offsets fit int32, the last 1 .. W - 1 as
// one masked vector (no branch on how many: a row's panels end at random counts).
inline VecF gather_dot(const CsrPtrs& m, int64_t k, int64_t kend, const float* src, int64_t ld) {
  const VecF zero = VecF::set1(0.0f);
#if defined(__AVX512F__) || defined(__AVX2__)
  if (ld * m.ncols <= INT32_MAX) {
#if defined(__AVX512F__)
    using I = __m512i;
    auto index = [&](I c) {
      return ld == 1 ? c : _mm512_mullo_epi32(c, _mm512_set1_epi32(static_cast<int32_t>(ld)));
    };
    auto gather = [&](int64_t at) {
      return VecF(_mm512_i32gather_ps(index(_mm512_loadu_si512(m.col + at)), src, 4));
    };
    auto gather_first = [&](int64_t at, int64_t count) {
      const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
      const I c = index(_mm512_maskz_loadu_epi32(mask, m.col + at));
      return VecF(_mm512_mask_i32gather_ps(zero.v, mask, c, src, 4));
    };
#else
    // Eight scalar loads put together, not vgatherdps: on Zen 3 the gather instruction took 1.3x
    // the CPU time of this on a 4096 x 4096 batch-1 product at 90 % (1.6x in the loop alone).
    auto load8 = [&](const int32_t* c) {
      const auto x = [&](int i) { return src[static_cast<int64_t>(c[i]) * ld]; };
      return _mm256_set_m128(_mm_setr_ps(x(4), x(5), x(6), x(7)), _mm_setr_ps(x(0), x(1), x(2), x(3)));
    };
    auto gather = [&](int64_t at) { return VecF(load8(m.col + at)); };
    auto gather_first = [&](int64_t at, int64_t count) {  // the lanes past count read src[0], then drop it
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      alignas(32) int32_t c[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(c), _mm256_maskload_epi32(m.col + at, mask));
      return VecF(_mm256_and_ps(load8(c), _mm256_castsi256_ps(mask)));
    };
#endif
    VecF s0 = zero, s1 = zero;
    for (; k + 2 * W <= kend; k += 2 * W) {
      s0 = VecF::fma(VecF::load(m.val + k), gather(k), s0);
      s1 = VecF::fma(VecF::load(m.val + k + W), gather(k + W), s1);
    }
    if (k + W <= kend) s0 = VecF::fma(VecF::load(m.val + k), gather(k), s0), k += W;
    if (k < kend) s1 = VecF::fma(load_first(m.val + k, kend - k), gather_first(k, kend - k), s1);
    return s0 + s1;
  }
#endif
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains for latency
  for (; k + 4 <= kend; k += 4)
    for (int u = 0; u < 4; ++u) s[u] += m.val[k + u] * src[m.col[k + u] * ld];
  for (; k < kend; ++k) s[0] += m.val[k] * src[m.col[k] * ld];
  const float total = (s[0] + s[1]) + (s[2] + s[3]);
  return load_first(&total, 1);
}

// Rows [r0, r1) over NVR vectors of pixels from p, the last holding `last` (1..W) of them:
// out[r - r0, p + i] = act(bias[r] + sum_k val[k] * src[col[k] * ld + p + i]).
//
// With several column panels, the panels run one after another over all the rows (the order the
// non-zeros are stored in, so the weight streams), parking each row's partial sums in `park`
// ((r1 - r0) x NVR * W floats) between panels: the source rows one panel reads (512 x 256 B at
// 64 pixels) stay in cache, where a whole row of non-zeros would fetch random 256 B rows of a
// source that does not fit (1 MB for 4096 features x 64 pixels).
template <int NVR, bool PARTIAL>
void rows_tile(const CsrPtrs& m, int64_t r0, int64_t r1, const float* src, int64_t ld, int64_t p,
               int64_t last, Out out, const float* bias, Act act, float* park) {
  const VecF zero = VecF::set1(0.0f);
  const int64_t last_q = m.panels - 1;
  auto start = [&](int64_t r, int64_t q, VecF(&acc)[2][NV]) {
    const float* parked = park + (r - r0) * NVR * W;
    for (int j = 0; j < NVR; ++j) acc[0][j] = q ? VecF::load(parked + j * W) : zero, acc[1][j] = zero;
    accumulate<NVR, PARTIAL>(m, m.begin(r, q), m.end(r, q), src + p, ld, last, acc);
  };
  for (int64_t q = 0; q < last_q; ++q)
    for (int64_t r = r0; r < r1; ++r) {
      VecF acc[2][NV];
      start(r, q, acc);
      for (int j = 0; j < NVR; ++j) (acc[0][j] + acc[1][j]).store(park + (r - r0) * NVR * W + j * W);
    }
  // A strided output (linear: y is (batch, out), so pixels are O apart) is staged ROWS rows at a
  // time and written pixel-major: one cache line per pixel instead of one per row and pixel, all
  // of them 4 KB-aliased.
  constexpr int64_t ROWS = 16;
  const int64_t width = (NVR - 1) * W + last;
  float stage[ROWS][NVR * W];
  for (int64_t rb = r0; rb < r1; rb += ROWS) {
    const int64_t re = std::min(r1, rb + ROWS);
    for (int64_t r = rb; r < re; ++r) {
      VecF acc[2][NV];
      start(r, last_q, acc);
      const VecF b = VecF::set1(bias ? bias[r] : 0.0f);
      for (int j = 0; j < NVR; ++j) {
        const VecF y = epilogue(acc[0][j] + acc[1][j], b, act);
        if (out.ps == 1)
          out.put(r - r0, p + j * W, y, j == NVR - 1 ? last : W);
        else
          y.store(stage[r - rb] + j * W);
      }
    }
    if (out.ps == 1) continue;
    for (int64_t i = 0; i < width; ++i) {
      for (int64_t r = 0; r < re - rb; ++r) out.set(rb - r0 + r, p + i, stage[r][i]);
    }
  }
}

// out[r - r0, p] for rows [r0, r1), p < n: 64 pixels at a time in registers, then the remainder as
// up to four vectors (the last masked), or a gathered dot product for a single pixel (all of
// batch-1 linear). `park` holds (r1 - r0) x 64 floats when the weight has several panels.
void spmm_rows(const CsrPtrs& m, int64_t r0, int64_t r1, const float* src, int64_t ld, int64_t n, Out out,
               const float* bias, Act act, float* park) {
  if (n > 1) m.check_rows(r0, r1);
  int64_t p = 0;
  for (; p + CH <= n; p += CH) rows_tile<NV, false>(m, r0, r1, src, ld, p, W, out, bias, act, park);
  const int64_t rem = n - p;
  if (rem > 1) {  // fewer than 64 pixels left: as many vectors as they need, the last one masked
    const int64_t nv = (rem + W - 1) / W, last = rem - (nv - 1) * W;
    switch (nv) {
      case 1:
        return rows_tile<1, true>(m, r0, r1, src, ld, p, last, out, bias, act, park);
      case 2:
        return rows_tile<2, true>(m, r0, r1, src, ld, p, last, out, bias, act, park);
      case 3:
        return rows_tile<3, true>(m, r0, r1, src, ld, p, last, out, bias, act, park);
      default:
        return rows_tile<NV, true>(m, r0, r1, src, ld, p, last, out, bias, act, park);
    }
  }
  if (rem == 1) {  // one pixel (all of batch-1 linear): gathered sparse dot products, panel by panel
    constexpr int64_t ROWS = 64;  // indices checked just before use, so the product reads them from L1
    for (int64_t q = 0; q < m.panels; ++q)
      for (int64_t rb = r0; rb < r1; rb += ROWS) {
        const int64_t re = std::min(r1, rb + ROWS);
        m.check_rows(rb, re, q, q + 1);
        for (int64_t r = rb; r < re; ++r) {
          const VecF s = gather_dot(m, m.begin(r, q), m.end(r, q), src + p, ld);
          (q ? VecF::load(park + (r - r0) * W) + s : s).store(park + (r - r0) * W);
        }
      }
    for (int64_t r = r0; r < r1; ++r) {
      const float dot = VecF::load(park + (r - r0) * W).sum();
      out.put(r - r0, p, epilogue(VecF::set1(dot), VecF::set1(bias ? bias[r] : 0.0f), act), 1);
    }
  }
}

// The stride-1 path (kernel.h, Shifted): the column indices become offsets into the padded input.
bool conv_fwd_shifted(const SparseConvFwd& a, const CsrPtrs& w) {
  const ConvGeom& g = a.g;
  if (!Shifted::applies(g)) return false;
  const Shifted s(g);
  Scratch<int32_t> offset(a.w.colidx.size(0));
  s.offsets(g, w.col, a.w.colidx.size(0), offset.p);
  CsrPtrs shifted = w;
  shifted.col = offset.p;
  shifted.ncols = s.span;  // every offset lies inside the group's padded input
  const float* bias = a.bias.present ? a.bias.ptr<float>() : nullptr;
  s.run(a, 1, [&](int64_t r0, int64_t r1, const float* src, int64_t ld, int64_t len, Out out, float* park) {
    spmm_rows(shifted, r0, r1, src, ld, len, out, bias, a.act, park);
  });
  return true;
}

}  // namespace

void sparse_conv_fwd(const SparseConvFwd& a) {
#if defined(__AVX512F__)
  // bf16.h: bf16 x^T on vdpbf16ps over 16+ pixels (fewer, such as batch-1 linear, gather instead)
  if (a.x.dtype == DType::bf16 && !a.block && a.g.P() >= 16 && feature_on(Feature::avx512_bf16)) {
    if (a.x.size(2) <= 1 || a.x.stride(2) == 1) return direct_fwd_bf16(a, CsrPtrs(a.w, a.g.O, a.g.K()));
    // a pixel-major x (a linear layer's input as it comes): its x^T, still bfloat16, for the kernel
    const ConvGeom& g = a.g;
    const int64_t ld = tile_ld(g.P());
    Scratch<uint16_t> xt(g.N * g.C * ld);
    for (int64_t n = 0; n < g.N; ++n)
      transpose_halfwords(a.x.ptr<uint16_t>() + n * a.x.stride(0), a.x.stride(2), g.P(), g.C,
                          xt.p + n * g.C * ld, ld, a.threads);
    SparseConvFwd b = a;
    b.x.data = xt.p;
    b.x.strides[0] = g.C * ld, b.x.strides[1] = ld, b.x.strides[2] = 1;
    return direct_fwd_bf16(b, CsrPtrs(b.w, g.O, g.K()));
  }
#endif
  if (a.g.direct() && copies_input(a.x, Plan(a.g, a.g.Og(), true, a.threads, a.block ? a.block : 1))) {
    Scratch<float> xs(a.g.N * a.g.C * tile_ld(a.g.P()));
    SparseConvFwd b = a;
    b.x = float_pixels(a.x, a.g, xs.p, a.threads);
    return sparse_conv_fwd(b);
  }
  if (a.block) return sparse_conv_fwd_blocked(a);
  const ConvGeom& g = a.g;
  const CsrPtrs w(a.w, g.O, g.K());
  if (conv_fwd_depthwise(a, w) || conv_fwd_shifted(a, w)) return;
  const float* bias = a.bias.present ? a.bias.ptr<float>() : nullptr;
  im2col_tiles(a, 1,
               [&](int64_t r0, int64_t r1, const float* src, int64_t ld, int64_t len, Out out, float* park) {
                 spmm_rows(w, r0, r1, src, ld, len, out, bias, a.act, park);
               });
}

// out[k] = values[perm[k]] for the n non-zeros: W's values in W^T's order, gathered on hotops'
// threads (torch's values[t_perm] took as long as the product itself at 4096 x 4096, batch 64).
void permuted_values(const float* values, const int64_t* perm, int64_t n, float* out, int threads) {
  parallel_for(n, 16384, threads, [&](int64_t k0, int64_t k1) {
    bool ok = true;
    for (int64_t k = k0; k < k1; ++k) {
      // W^T's order visits W's values nearly at random: ask for them 64 entries ahead (the
      // batch-1 input gradient of 4096 x 4096 at 90 %: 7.9 -> 4.9-5.7 ms; 16 ahead: no gain)
      if (k + 64 < k1)
        __builtin_prefetch(values + std::min<uint64_t>(static_cast<uint64_t>(perm[k + 64]), n - 1));
      const uint64_t p = static_cast<uint64_t>(perm[k]);
      ok &= p < static_cast<uint64_t>(n);
      out[k] = values[p < static_cast<uint64_t>(n) ? p : 0];
    }
    HOTOPS_CHECK(ok, "t_perm holds an index outside [0, ", n, ") in entries ", k0, "..", k1 - 1);
  });
}

void sparse_conv_bwd_input(const SparseConvBwdInput& a) {
  const ConvGeom& g = a.g;
  const int64_t nnz = a.wt.colidx.size(0);
  Scratch<float> values(nnz);
  permuted_values(a.wt.values.ptr<float>(), a.perm.ptr<int64_t>(), nnz, values.p, a.threads);
  CsrPtrs wt(a.wt, g.G * g.K(), g.Og());
  wt.val = values.p;
  const float* gy = a.gy.ptr<float>();
  float* gx = a.gx.ptr<float>();
  if (g.direct()) {  // cols are grad_input itself: write it in place, rows split freely
    const Plan plan(g, g.K(), true, a.threads, 1, g.Og());  // tiles sized for grad_y's Og rows
    parallel_claim(plan.items, a.threads, [&](auto claim) {
      Scratch<float> park(plan.rbs * CH);
      for (int64_t it; (it = claim()) < plan.items;) {
        const Plan::Item i = plan.item(it, g);
        if (i.r0 >= i.r1) continue;
        const float* src = gy + i.n * a.gy.stride(0) + i.grp * g.Og() * a.gy.stride(1) + i.p0;
        const Out out = Out::at(a.gx, i.n, i.r0, i.p0);
        spmm_rows(wt, i.r0, i.r1, src, a.gy.stride(1), i.len, out, nullptr, Act::none, park.p);
      }
    });
    return;
  }
  // col2im adds overlapping windows, so work items own whole input channels: (image, group,
  // block of channels), each running its channels' kh * kw rows of W^T over every tile.
  const Plan plan(g, g.K(), false, 1);
  const int64_t taps = g.kh * g.kw, outer = g.N * g.G;
  const int64_t cb = std::min(g.Cg(), (4 * a.threads + outer - 1) / outer);  // channel blocks
  const int64_t cbs = (g.Cg() + cb - 1) / cb;
  parallel_claim(outer * cb, a.threads, [&](auto claim) {
    Scratch<float> buf(cbs * taps * plan.pt), park(cbs * taps * CH);
    for (int64_t it; (it = claim()) < outer * cb;) {
      const int64_t n = it / (g.G * cb), grp = (it / cb) % g.G, c0 = (it % cb) * cbs;
      const int64_t c1 = std::min(g.Cg(), c0 + cbs);
      if (c0 >= c1) continue;
      const int64_t r0 = grp * g.K() + c0 * taps, r1 = grp * g.K() + c1 * taps;
      const float* gyn = gy + n * a.gy.stride(0) + grp * g.Og() * a.gy.stride(1);
      float* gxn = gx + n * a.gx.stride(0);
      for (int64_t t = 0; t < plan.tiles; ++t) {
        const int64_t p0 = t * plan.pt, len = std::min(plan.pt, g.P() - p0);
        spmm_rows(wt, r0, r1, gyn + p0, a.gy.stride(1), len, Out{buf.p, len, 1}, nullptr, Act::none, park.p);
        for (int64_t r = r0; r < r1; ++r) {
          if (wt.rowptr[r] == wt.rowptr[r + 1]) continue;
          int64_t c, dy, dx;
          tap_of(g, r - grp * g.K(), c, dy, dx);
          float* plane = gxn + (grp * g.Cg() + c) * a.gx.stride(1);
          const float* row = buf.p + (r - r0) * len;
          for_each_span(g, dy, dx, p0, len, [&](int64_t tt, int64_t hin, int64_t wi, int64_t l) {
            float* d = plane + hin * g.W + wi;
            for (int64_t i = 0; i < l; ++i) d[i * g.sw] += row[tt + i];
          });
        }
      }
    }
  });
}

// part[i] += dot(g, src + col[i] * ld) over len floats, for the m (1..W) non-zeros of one row at
// col: W dot products at once, so each vector of g is loaded once per W products, and the W sums
// are reduced together (a register transpose) instead of one horizontal sum per non-zero.
inline void add_dots(const float* g, const float* src, int64_t ld, int64_t len, const int32_t* col, int64_t m,
                     float* part) {
  const float* s[W];
  for (int64_t i = 0; i < W; ++i) s[i] = src + col[i < m ? i : 0] * ld;  // lanes past m repeat the first
  VecF acc[W];
  for (int64_t i = 0; i < W; ++i) acc[i] = VecF::set1(0.0f);
  int64_t p = 0;
  for (; p + W <= len; p += W) {
    const VecF gv = VecF::load(g + p);
    for (int64_t i = 0; i < W; ++i) acc[i] = VecF::fma(gv, VecF::load(s[i] + p), acc[i]);
  }
  if (p < len) {  // masked: the lanes past len are never read, so they hold 0, not whatever is there
    const VecF gv = load_first(g + p, len - p);
    for (int64_t i = 0; i < W; ++i) acc[i] = VecF::fma(gv, load_first(s[i] + p, len - p), acc[i]);
  }
  transpose(acc);
  VecF sum = acc[0];
  for (int64_t i = 1; i < W; ++i) sum = sum + acc[i];
  if (m == W)  // plain: AVX2's masked store is slow on AMD (it was the kernel's hottest instruction)
    (VecF::load(part) + sum).store(part);
  else
    store_first(part, load_first(part, m) + sum, m);
}

void sparse_conv_bwd_values(const SparseConvBwdValues& a) {
  const ConvGeom& g = a.g;
  if (g.direct() && copies_input(a.x, Plan(g, g.Og(), true, a.threads))) {
    Scratch<float> xs(g.N * g.C * tile_ld(g.P()));
    SparseConvBwdValues b = a;
    b.x = float_pixels(a.x, g, xs.p, a.threads);
    return sparse_conv_bwd_values(b);
  }
  const CsrPtrs w(a.w, g.O, g.K());
  const Plan plan(g, g.Og(), g.direct(), a.threads);
  const int64_t nnz = a.gvalues.size(0);
  float* gv = a.gvalues.ptr<float>();
  if (plan.items == 0) {  // no pixels
    std::fill(gv, gv + nnz, 0.0f);
    return;
  }
  const float* gy = a.gy.ptr<float>();
  const int64_t* used = a.used_rowptr.ptr<int64_t>();
  // Adds work item it's products into part (whose entries of the item's rows start at 0 or, with
  // `zero`, are zeroed first).
  auto item = [&](int64_t it, float* part, float* buf, bool zero) {
    const Plan::Item i = plan.item(it, g);
    if (i.r0 >= i.r1) return;
    int64_t ld;
    const float* src = input_tile(g, a.x, used, i.n, i.grp, i.p0, i.len, buf, ld);
    w.check_rows(i.r0, i.r1);
    for (int64_t q = 0; q < w.panels; ++q) {  // in storage order
      if (zero) std::fill(part + w.begin(i.r0, q), part + w.begin(i.r1, q), 0.0f);
      for (int64_t r = i.r0; r < i.r1; ++r) {
        const float* gr = gy + i.n * a.gy.stride(0) + r * a.gy.stride(1) + i.p0;
        if (i.len == 1) {  // one pixel (batch-1 linear): each value's gradient is one product
          for (int64_t k = w.begin(r, q), end = w.end(r, q); k < end; ++k)
            part[k] += gr[0] * src[w.col[k] * ld];
          continue;
        }
        for (int64_t k = w.begin(r, q), end = w.end(r, q); k < end; k += W)
          add_dots(gr, src, ld, i.len, w.col + k, std::min<int64_t>(W, end - k), part + k);
      }
    }
  };
  if (g.N * plan.tiles == 1) {  // the items' rows are disjoint: each writes its own values, claimed
    parallel_claim(plan.items, a.threads, [&](auto claim) {
      Scratch<float> buf(tile_floats(g, a.x, plan.pt));
      for (int64_t it; (it = claim()) < plan.items;) item(it, gv, buf.p, true);
    });
    return;
  }
  // Items of several images or pixel tiles share rows: each lane (a fixed share of the items, so
  // the sums' order, and the result, never depends on timing) sums into grad_values (lane 0) or a
  // buffer of its own, and the lanes are added up at the end.
  const int64_t lanes = std::min<int64_t>(a.threads, plan.items);
  Scratch<float> extra((lanes - 1) * nnz);
  parallel_for(lanes, 1, a.threads, [&](int64_t l0, int64_t l1) {
    Scratch<float> buf(tile_floats(g, a.x, plan.pt));
    for (int64_t lane = l0; lane < l1; ++lane) {
      float* part = lane ? extra.p + (lane - 1) * nnz : gv;
      std::fill(part, part + nnz, 0.0f);
      for (int64_t it = lane; it < plan.items; it += lanes) item(it, part, buf.p, false);
    }
  });
  parallel_for(nnz, 16384, a.threads, [&](int64_t k0, int64_t k1) {
    for (int64_t lane = 1; lane < lanes; ++lane)
      for (int64_t k = k0; k < k1; ++k) gv[k] += extra.p[(lane - 1) * nnz + k];
  });
}

void sparse_widen(const SparseWiden& a) {
  const View &src = a.src, &dst = a.dst;
  const int64_t R = src.size(0), C = src.size(1), ld = dst.stride(0);
  const int64_t es = dtype_size(dst.dtype);
  char* d = static_cast<char*>(dst.data);
  auto row = [&](int64_t r) {
    return static_cast<const char*>(src.data) + r * src.stride(0) * dtype_size(src.dtype);
  };
  if (!a.transpose) {
    parallel_for(R, 16, a.threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < C; j += W) {
          const int64_t n = std::min<int64_t>(W, C - j);
          store_row(d + r * ld * es, dst.dtype, j, load_row(row(r), src.dtype, j, n), n);
        }
    });
    return;
  }
  // dst (C, R): src read as a pixel-major x (its rows the pixels), 16 columns (a cache line of each
  // source row) per task, transposed down every row (transpose_pixels)
  View x = src;
  x.ndim = 3;
  x.sizes[0] = 1, x.sizes[1] = C, x.sizes[2] = R;
  x.strides[0] = 0, x.strides[1] = 1, x.strides[2] = src.stride(0);
  constexpr int64_t LINE = 16;
  parallel_for((C + LINE - 1) / LINE, 1, a.threads, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      transpose_pixels(x, 0, b * LINE, std::min(LINE, C - b * LINE), 0, R, dst.ptr<float>() + b * LINE * ld,
                       ld);
  });
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
