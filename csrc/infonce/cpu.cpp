// Per-ISA InfoNCE row pass (see cpu.h). Three sweeps over a row that stays in L1/L2:
//   1. m = max of the logits that have weight > 0, and sum of logits (label smoothing),
//   2. e_j = w_j exp(l_j - m): s = sum e, sum e*l (for d/dT); fp32 rows keep e in place,
//   3. G_j = (e_j / s - eps/C - (1-eps)[j == pos]) * scale, written over the logits.
#include "infonce/cpu.h"

#include <cmath>

#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

constexpr int W = VecF::W;

struct Segment {
  void* row;
  DType dtype;
  int64_t n;
  const float* w;   // weights for these columns, or nullptr
  int64_t col = 0;  // the segment's first column in the row's Na + K candidate columns
};

template <typename F>
inline void sweep(const Segment& seg, F&& f) {  // f(j, count) on full vectors, then the tail
  int64_t j = 0;
  for (; j + W <= seg.n; j += W) f(j, W);
  if (j < seg.n) f(j, seg.n - j);
}

inline float scalar_at(const Segment& seg, int64_t j) {
  float x;
  store_row(&x, DType::f32, 0, load_row(seg.row, seg.dtype, j, 1), 1);
  return x;
}

// w * e where w > 0. A column of weight 0 adds exp(l + log 0): 0, or NaN where its logit l is
// +inf or NaN (a zero-weight column above the max must not give 0 * inf = NaN from e's overflow);
// a NaN weight gives NaN (w * 0), so it does not drop out of the sum.
inline VecF weighted(VecF e, VecF l, const float* w, int64_t j, int64_t n) {
  if (!w) return e;
  const VecF wv = load_row(w, DType::f32, j, n), zero = VecF::set1(0.0f);
  const VecF dropped = wv * zero + VecF::select_lt(l, VecF::set1(INFINITY), zero, VecF::set1(NAN));
  return VecF::select_gt0(wv, e * wv, dropped);
}

// Columns [j0, j1) of a segment, as a segment of their own.
inline Segment slice(const Segment& seg, int64_t j0, int64_t j1) {
  return {static_cast<char*>(seg.row) + j0 * dtype_size(seg.dtype), seg.dtype, j1 - j0,
          seg.w ? seg.w + j0 : nullptr, seg.col + j0};
}

}  // namespace

void infonce_rows(const InfoNceRows& a) {
  const int64_t P = a.shared.size(0), Na = a.shared.size(1);
  const int64_t K = a.own.present ? a.own.size(1) : 0;
  const float C = static_cast<float>(Na + K);
  const float inv_t = a.inv_t, eps = a.smoothing;
  const float* weight = a.weight.present ? a.weight.ptr<float>() : nullptr;
  const int esz_s = dtype_size(a.shared.dtype), esz_o = a.own.present ? dtype_size(a.own.dtype) : 0;

  parallel_for(P, 1, a.threads, [&](int64_t r0, int64_t r1) {
    // 16-bit rows keep e in float32 here between sweeps 2 and 3 (fp32 rows keep it in place)
    Scratch<float> e_buf(a.want_grad && a.shared.dtype != DType::f32 ? Na + K : 0);
    const VecF vinv_t = VecF::set1(inv_t), neg_inf = VecF::set1(-INFINITY);
    for (int64_t r = r0; r < r1; ++r) {
      Segment segs[2] = {
          {static_cast<char*>(a.shared.data) + r * a.shared.stride(0) * esz_s, a.shared.dtype, Na, weight},
          {a.own.present ? static_cast<char*>(a.own.data) + r * a.own.stride(0) * esz_o : nullptr,
           a.own.dtype, K, weight ? weight + Na : nullptr, Na}};
      const int nseg = K > 0 ? 2 : 1;
      const int64_t pos = a.pos_col + r;
      const float l_pos = scalar_at(segs[0], pos) * inv_t;

      // 1. max over weighted columns, sum of logits
      VecF vmax = neg_inf, vsum = VecF::set1(0.0f);
      for (int s = 0; s < nseg; ++s) {
        const Segment& sg = segs[s];
        sweep(sg, [&](int64_t j, int64_t n) {
          VecF l = load_row(sg.row, sg.dtype, j, n) * vinv_t;  // tail lanes read 0
          vsum = vsum + l;
          if (n < W) l = load_row(sg.row, sg.dtype, j, n, -INFINITY) * vinv_t;
          if (sg.w) l = VecF::select_gt0(load_row(sg.w, DType::f32, j, n), l, neg_inf);
          vmax = VecF::max(vmax, l);
        });
      }
      float m = vmax.hmax();
      m = l_pos > m || std::isnan(l_pos) ? l_pos : m;  // the positive always counts (weight 1)
      // eps * (m - mean(l)) only with label smoothing: at eps = 0 an infinite logit must not give
      // 0 * inf. Loss and tdot are formed from differences to m, never from m itself: logits of
      // 1e6 (a small temperature on unnormalised embeddings) would leave only their rounding.
      const float smooth = eps > 0.0f ? eps * (m - vsum.sum() / C) : 0.0f;

      // 2. e = w exp(l - m); s = sum e; el = sum e*(l - m). With weights, the positive's own column
      // (weight 1 whatever neg_weight says) is left out of the sweep and added alone: adding
      // w e and then (1 - w) e loses e_pos to rounding once w is large.
      const VecF vm = VecF::set1(m);
      const bool keep_e = a.want_grad;  // e is kept for sweep 3: in place (fp32) or in e_buf
      VecF vs = VecF::set1(0.0f), vel = VecF::set1(0.0f);
      Segment parts[3] = {segs[0], segs[1], {}};
      int nparts = nseg;
      if (weight) {
        parts[0] = slice(segs[0], 0, pos);
        parts[nseg] = slice(segs[0], pos + 1, Na);
        nparts = nseg + 1;
      }
      for (int s = 0; s < nparts; ++s) {
        const Segment& sg = parts[s];
        sweep(sg, [&](int64_t j, int64_t n) {
          VecF l = load_row(sg.row, sg.dtype, j, n, -INFINITY) * vinv_t;  // tail lanes give e = 0
          VecF e = weighted(exp(l - vm), l, sg.w, j, n);
          vs = vs + e;
          vel = VecF::fma(e, VecF::select_lt(VecF::set1(-INFINITY), l, l - vm, VecF::set1(0.0f)), vel);
          if (keep_e && sg.dtype == DType::f32) store_row(sg.row, DType::f32, j, e, n);
          if (keep_e && sg.dtype != DType::f32) store_row(e_buf.p + sg.col, DType::f32, j, e, n);
        });
      }
      if (keep_e && weight && segs[0].dtype != DType::f32) e_buf.p[pos] = 0.0f;  // (set below)
      const float e_pos = std::exp(l_pos - m);
      const float s_sum = weight ? vs.sum() + e_pos : vs.sum();
      const float el = weight ? vel.sum() + (l_pos > -INFINITY ? e_pos * (l_pos - m) : 0.0f) : vel.sum();
      a.lse.ptr<float>()[r] = m + std::log(s_sum);
      a.loss.ptr<float>()[r] = (1.0f - eps) * (m - l_pos) + smooth + std::log(s_sum);
      a.tdot.ptr<float>()[r] = el / s_sum + smooth + (1.0f - eps) * (m - l_pos);
      if (!a.want_grad) continue;

      // 3. G = (e/s - eps/C - (1-eps)[pos]) * scale
      const float scale = a.grad_scale * inv_t * (a.row_scale.present ? a.row_scale.ptr<float>()[r] : 1.0f);
      const float inv_s = 1.0f / s_sum;
      const VecF vscale = VecF::set1(scale), vinv_s = VecF::set1(inv_s), vsmooth = VecF::set1(eps / C);
      for (int s = 0; s < nseg; ++s) {
        const Segment& sg = segs[s];
        sweep(sg, [&](int64_t j, int64_t n) {
          const VecF e = sg.dtype == DType::f32 ? load_row(sg.row, DType::f32, j, n)
                                                : load_row(e_buf.p + sg.col, DType::f32, j, n);
          store_row(sg.row, sg.dtype, j, (e * vinv_s - vsmooth) * vscale, n);
        });
      }
      const float g_pos = (e_pos * inv_s - eps / C - (1.0f - eps)) * scale;
      store_row(segs[0].row, segs[0].dtype, pos, VecF::set1(g_pos), 1);
    }
  });
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
