// Per-ISA subsampled attention (see cpu.h). Forward: one task per (batch, head, block of TQ
// queries); it walks the sampled keys in tiles of TK, gathering and converting each tile to
// float32 (K transposed for the score micro-kernel, V row-major for the P·V one; on the bf16 tile
// path they stay bf16 and are pair-packed for the tiles instead), and keeps a
// running max / sum / output per query row (online softmax). Backward: one task per
// (batch, KV head) owns the dK/dV of that head outright (fp32 accumulators over all Lk rows),
// so the scatter-add needs no atomics and its summation order never depends on the thread count;
// dQ for a query block is finished inside the same task.
#include "attention/cpu.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "common/simd.h"
#if defined(__AVX512F__)
#include "attention/dot_bf16.h"
#define HOTOPS_ATTN_BF16 1
#else
#define HOTOPS_ATTN_BF16 0
#endif

namespace hotops {
namespace HOTOPS_ISA {
namespace {

constexpr int W = VecF::W;
constexpr int TQ = 128;                  // query rows per block: amortises gathering each key tile
constexpr int TK = 64;                   // sampled keys per tile; a multiple of 2W for every ISA
constexpr int NV_MAX = W >= 16 ? 4 : 2;  // vectors per row in the rank-k update (register budget)

inline void* row_of(const View& t, int esz, int64_t b, int64_t h, int64_t i) {
  return static_cast<char*>(t.data) + (b * t.stride(0) + h * t.stride(1) + i * t.stride(2)) * esz;
}
inline int64_t at3(const View& t, int64_t b, int64_t h, int64_t i) {
  return t.ptr<const int64_t>()[b * t.stride(0) + h * t.stride(1) + i * t.stride(2)];
}

// dst[0..Dp) = src[0..D) * mul in float32, zero-padded to Dp = D rounded up to W.
inline void load_f32(float* dst, const void* src, DType t, int64_t D, float mul = 1.0f) {
  const VecF vm = VecF::set1(mul);
  int64_t j = 0;
  for (; j + W <= D; j += W) (load_row(src, t, j) * vm).store(dst + j);
  if (j < D) (load_row(src, t, j, D - j) * vm).store(dst + j);
}
inline void store_out(void* dst, DType t, const float* src, int64_t D, float mul) {
  const VecF vm = VecF::set1(mul);
  int64_t j = 0;
  for (; j + W <= D; j += W) store_row(dst, t, j, VecF::load(src + j) * vm);
  if (j < D) store_row(dst, t, j, VecF::load(src + j) * vm, D - j);
}
inline void fill(float* p, int64_t n, float x) {
  for (int64_t i = 0; i < n; ++i) p[i] = x;
}

// C[i, n] = sum_{d < D} A[i, d] * Bt[d, n] for i < M, n < TK: scores of M rows against a tile.
template <int MR>
inline void abt_rows(const float* A, int64_t lda, const float* Bt, float* C, int64_t D) {
  for (int n = 0; n < TK; n += 2 * W) {
    VecF acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = VecF::set1(0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const VecF b0 = VecF::load(Bt + d * TK + n), b1 = VecF::load(Bt + d * TK + n + W);
      for (int r = 0; r < MR; ++r) {
        const VecF a = VecF::set1(A[r * lda + d]);
        acc[r][0] = VecF::fma(a, b0, acc[r][0]);
        acc[r][1] = VecF::fma(a, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      acc[r][0].store(C + r * TK + n);
      acc[r][1].store(C + r * TK + n + W);
    }
  }
}
inline void abt(int64_t M, const float* A, int64_t lda, const float* Bt, float* C, int64_t D) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) abt_rows<4>(A + i * lda, lda, Bt, C + i * TK, D);
  switch (M - i) {
    case 3:
      abt_rows<3>(A + i * lda, lda, Bt, C + i * TK, D);
      break;
    case 2:
      abt_rows<2>(A + i * lda, lda, Bt, C + i * TK, D);
      break;
    case 1:
      abt_rows<1>(A + i * lda, lda, Bt, C + i * TK, D);
      break;
  }
}

// C[r][c0 .. c0 + NV*W) += sum_{k < K} A(r, k) * B[k, c0 ..] for r < MR, with A(r, k) at
// A[r * ars + k * acs]. C rows are pointers (scattered dK/dV rows); they are updated one after
// another, so repeated indices (aliasing rows) still add up.
template <int MR, int NV>
inline void ab_rows(const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* const* C,
                    int64_t K, int64_t c0) {
  VecF acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = VecF::set1(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    VecF b[NV];
    for (int v = 0; v < NV; ++v) b[v] = VecF::load(B + k * ldb + c0 + v * W);
    for (int r = 0; r < MR; ++r) {
      const VecF a = VecF::set1(A[r * ars + k * acs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = VecF::fma(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) (VecF::load(C[r] + c0 + v * W) + acc[r][v]).store(C[r] + c0 + v * W);
}
template <int MR>
inline void ab_cols(const float* A, int64_t ars, int64_t acs, const float* B, int64_t Dp, float* const* C,
                    int64_t K) {
  int64_t c0 = 0;
  for (; c0 + NV_MAX * W <= Dp; c0 += NV_MAX * W) ab_rows<MR, NV_MAX>(A, ars, acs, B, Dp, C, K, c0);
  for (; c0 < Dp; c0 += W) ab_rows<MR, 1>(A, ars, acs, B, Dp, C, K, c0);
}
// C[r] += A(r, :) · B for r < M; B is K × Dp row-major.
inline void ab(int64_t M, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t Dp,
               float* const* C) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) ab_cols<4>(A + r * ars, ars, acs, B, Dp, C + r, K);
  switch (M - r) {
    case 3:
      ab_cols<3>(A + r * ars, ars, acs, B, Dp, C + r, K);
      break;
    case 2:
      ab_cols<2>(A + r * ars, ars, acs, B, Dp, C + r, K);
      break;
    case 1:
      ab_cols<1>(A + r * ars, ars, acs, B, Dp, C + r, K);
      break;
  }
}

inline void transpose_tile(const float* rows, int64_t Dp, float* t) {  // TK × Dp -> Dp × TK
  for (int s = 0; s < TK; ++s)
    for (int64_t d = 0; d < Dp; ++d) t[d * TK + s] = rows[s * Dp + d];
}

// Shapes and the head mapping of one call.
struct Geometry {
  int64_t B, H, Hkv, Hi, Lq, Lk, S, D, Dp, group;
  int esz;
  explicit Geometry(const SsaArgs& a)
      : B(a.q.size(0)),
        H(a.q.size(1)),
        Hkv(a.k.size(1)),
        Hi(a.idx.size(1)),
        Lq(a.q.size(2)),
        Lk(a.k.size(2)),
        S(a.idx.size(2)),
        D(a.q.size(3)),
        Dp((a.q.size(3) + W - 1) / W * W),
        group(a.q.size(1) / (a.k.size(1) ? a.k.size(1) : 1)),
        esz(a.q.dtype == DType::f32 ? 4 : 2) {}
  int64_t idx_head(int64_t h) const { return Hi == H ? h : h / group; }
};

// One key tile's gathered rows and visibility. kp[s] < 0 marks a hidden (or padding) slot.
struct Tile {
  int64_t cnt = 0, kmin = 0, kmax = 0;
  bool any_hidden = false;
  int64_t kp[TK];
  int64_t row[TK];
};

inline void tile_positions(const SsaArgs& a, int64_t b, int64_t hi, int64_t t0, int64_t S, Tile& t) {
  t.cnt = S - t0 < TK ? S - t0 : TK;
  t.any_hidden = t.cnt < TK;
  t.kmin = INT64_MAX;
  t.kmax = -1;
  for (int s = 0; s < TK; ++s) {
    if (s >= t.cnt) {
      t.kp[s] = -1;
      continue;
    }
    t.row[s] = at3(a.idx, b, hi, t0 + s);
    const int64_t p = a.kpos.present ? at3(a.kpos, b, hi, t0 + s) : t.row[s];
    t.kp[s] = p;
    if (p < 0) {
      t.any_hidden = true;
    } else {
      t.kmin = p < t.kmin ? p : t.kmin;
      t.kmax = p > t.kmax ? p : t.kmax;
    }
  }
}

// Gathers the tile's rows of a (B, Hkv, Lk, D) tensor into TK × Dp float32: zero rows past cnt
// and for hidden slots (padding), so NaN in a key no query sees stays out of P·V (0 · NaN).
inline void gather_rows(const View& src, const Geometry& g, int64_t b, int64_t hk, const Tile& t,
                        float* dst) {
  for (int s = 0; s < TK; ++s) {
    if (s < t.cnt && t.kp[s] >= 0)
      load_f32(dst + s * g.Dp, row_of(src, g.esz, b, hk, t.row[s]), src.dtype, g.D);
    else
      fill(dst + s * g.Dp, g.Dp, 0.0f);
  }
}

// The same rows of a bf16 tensor as TK x Dp bf16, for the bf16 tile products.
inline void gather_bf16(const View& src, const Geometry& g, int64_t b, int64_t hk, const Tile& t,
                        uint16_t* dst) {
  for (int s = 0; s < TK; ++s) {
    uint16_t* d = dst + s * g.Dp;
    const bool seen = s < t.cnt && t.kp[s] >= 0;
    if (seen) std::memcpy(d, row_of(src, 2, b, hk, t.row[s]), g.D * sizeof(uint16_t));
    std::memset(d + (seen ? g.D : 0), 0, (g.Dp - (seen ? g.D : 0)) * sizeof(uint16_t));
  }
}

// True when some (query, slot) pair of this block against this tile is hidden.
inline bool needs_mask(const Tile& t, bool causal, int64_t qmin) {
  return t.any_hidden || (causal && t.kmax > qmin);
}
// Scores of hidden pairs -> -inf (forward) or probabilities -> 0 (backward): x = hidden ? fill : x.
inline void mask_block(float* Sb, int64_t mq, const Tile& t, bool causal, const int64_t* qp, float fillv) {
  for (int64_t i = 0; i < mq; ++i) {
    float* srow = Sb + i * TK;
    for (int s = 0; s < TK; ++s)
      if (t.kp[s] < 0 || (causal && t.kp[s] > qp[i])) srow[s] = fillv;
  }
}
// Tiles whose every visible key lies after every query of a causal block contribute nothing.
inline bool tile_dead(const Tile& t, bool causal, int64_t qmax) {
  return t.kmax < 0 || (causal && t.kmin > qmax);
}

// bf16 inputs take bf16 products (dot_bf16.h) where bf16_products() says the CPU has a fast
// unit: AMX tiles (their odd sizes on vdpbf16ps), or vdpbf16ps alone where it issues at float32
// FMA's rate (Zen 4). Where it issues at half that rate (Sapphire Rapids without AMX) it does the
// float32 kernel's products per cycle and adds packing: float32 there.
inline Bf16Products bf16_path(DType t) {
  return HOTOPS_ATTN_BF16 && t == DType::bf16 ? bf16_products() : Bf16Products::none;
}

// The factor the softmax applies to the raw scores: bf16 scores come unscaled (Q is not
// prescaled there), and a positive scale commutes with the row maximum, so it rides on the
// exponent's argument instead of a pass over the scores; a non-positive scale is applied to them.
inline float softmax_scale(bool bf, float scale) { return bf && scale > 0.0f ? scale : 1.0f; }

// False when x[0..n) (n a multiple of W) holds an inf or a NaN: x - x is 0 only for finite x.
inline bool all_finite(const float* x, int64_t n) {
  VecF acc = VecF::set1(0.0f);
  for (int64_t j = 0; j < n; j += W) {
    const VecF v = VecF::load(x + j);
    acc = acc + (v - v);
  }
  return !std::isnan(acc.sum());
}

// Rows whose float32 scores left float32's range. A finite float32 score is the rounded true one
// (a partial sum or a prescaled q that overflows leaves the score inf or NaN), and a score that
// overflowed to -inf is below every finite one, so P = 0 is its right weight. What float32 cannot
// say is which of several +inf scores is largest, nor which of a row's all -inf ones: such a row
// is computed again here in double, whose range holds any scale · q·k of float32, bfloat16 or
// float16 inputs (at most D · FLT_MAX³ in magnitude), over the row's visible slots, as torch
// computes it in float64: a softmax that is one-hot on the largest score where the scores are
// that large. Rows with a NaN score come here too (a NaN input): they stay NaN; rows whose scores
// are -inf in double as well (Inf inputs) get zeros.
struct ExactRow {
  std::vector<double> s;     // scale · q·k per slot
  std::vector<int64_t> row;  // the slot's key row, or -1 where the slot is hidden from the query
  std::vector<float> q, x;   // the query row and one key or value row, as float32 (Dp floats)
  std::vector<double> acc;
  double m = 0.0, l = 0.0;  // max over the visible scores (NaN if one is NaN) and sum exp(s - m)
  bool seen = false;

  // Scores, max and sum of query row i of head h (position qpos) over its visible slots.
  void scores(const SsaArgs& a, const Geometry& g, int64_t b, int64_t h, int64_t i, int64_t qpos) {
    const int64_t hk = h / g.group, hi = g.idx_head(h);
    s.resize(g.S);
    row.resize(g.S);
    q.resize(g.Dp);
    x.resize(g.Dp);
    acc.assign(g.D, 0.0);
    load_f32(q.data(), row_of(a.q, g.esz, b, h, i), a.q.dtype, g.D);
    m = -INFINITY;
    seen = false;
    bool nan = false;
    for (int64_t t = 0; t < g.S; ++t) {
      const int64_t r = at3(a.idx, b, hi, t), p = a.kpos.present ? at3(a.kpos, b, hi, t) : r;
      row[t] = p >= 0 && !(a.causal && p > qpos) ? r : -1;
      if (row[t] < 0) continue;
      seen = true;
      load_f32(x.data(), row_of(a.k, g.esz, b, hk, r), a.k.dtype, g.D);
      double d = 0.0;
      for (int64_t j = 0; j < g.D; ++j) d += static_cast<double>(q[j]) * x[j];
      s[t] = d * a.scale;
      nan |= std::isnan(s[t]);
      m = s[t] > m ? s[t] : m;
    }
    if (nan) m = NAN;
    // -inf in double too: an Inf in q or k, not an overflow. Such a row gets the zeros of a row
    // that sees nothing, as every other row whose visible scores are all -inf (docs/reliability.md)
    if (m == -INFINITY) seen = false;
    l = 0.0;
    for (int64_t t = 0; t < g.S; ++t)
      if (row[t] >= 0) l += std::exp(s[t] - m);
  }

  // Forward: writes the output row (zeros if the query sees no key); returns its lse for the
  // float32 lse tensor: +inf where it is a number (the backward's cue to take this path too).
  float forward(const SsaArgs& a, const Geometry& g, int64_t b, int64_t h, int64_t i, int64_t qpos) {
    scores(a, g, b, h, i, qpos);
    const int64_t hk = h / g.group;
    for (int64_t t = 0; seen && t < g.S; ++t) {
      if (row[t] < 0) continue;
      const double p = std::exp(s[t] - m) / l;
      load_f32(x.data(), row_of(a.v, g.esz, b, hk, row[t]), a.v.dtype, g.D);
      for (int64_t j = 0; j < g.D; ++j) acc[j] += p * x[j];
    }
    for (int64_t j = 0; j < g.Dp; ++j) x[j] = j < g.D ? static_cast<float>(acc[j]) : 0.0f;
    store_out(row_of(a.out, g.esz, b, h, i), a.out.dtype, x.data(), g.D, 1.0f);
    if (!seen) return -INFINITY;
    return std::isnan(m + std::log(l)) ? NAN : INFINITY;
  }

  // Backward of the same row: dv[r] += P dO, dk[r] += dS · kmul · q, dq += dS k (unscaled) for
  // every visible slot, on the float32 accumulators of the caller (kmul is the scale where its dk
  // rows hold dS^T (scale Q)). D_i is sum_s P dP here, not dO · O: O was rounded to the output's
  // dtype, and scales this large would multiply that rounding into the gradients.
  void backward(const SsaArgs& a, const Geometry& g, int64_t b, int64_t h, int64_t i, int64_t qpos,
                float kmul, float* dk, float* dv, float* dq) {
    scores(a, g, b, h, i, qpos);
    const int64_t hk = h / g.group;
    std::vector<float> dout(g.Dp);
    std::vector<double> dp(g.S);
    load_f32(dout.data(), row_of(a.dout, g.esz, b, h, i), a.dout.dtype, g.D);
    double di = 0.0;
    for (int64_t t = 0; seen && t < g.S; ++t) {
      if (row[t] < 0) continue;
      load_f32(x.data(), row_of(a.v, g.esz, b, hk, row[t]), a.v.dtype, g.D);
      dp[t] = 0.0;
      for (int64_t j = 0; j < g.D; ++j) dp[t] += static_cast<double>(dout[j]) * x[j];
      s[t] = std::exp(s[t] - m) / l;  // P
      di += s[t] * dp[t];
    }
    for (int64_t t = 0; seen && t < g.S; ++t) {
      const int64_t r = row[t];
      if (r < 0) continue;
      const double p = s[t], ds = p * (dp[t] - di);
      load_f32(x.data(), row_of(a.k, g.esz, b, hk, r), a.k.dtype, g.D);
      for (int64_t j = 0; j < g.D; ++j) {
        dv[r * g.Dp + j] += static_cast<float>(p * dout[j]);
        dk[r * g.Dp + j] += static_cast<float>(ds * kmul * q[j]);
        acc[j] += ds * x[j];
      }
    }
    for (int64_t j = 0; j < g.D; ++j) dq[j] += static_cast<float>(acc[j]);
  }
};

}  // namespace

void ssa_forward(const SsaArgs& a) {
  const Geometry g(a);
  const int64_t nqb = (g.Lq + TQ - 1) / TQ;
  const DType dt = a.q.dtype;
  const int64_t tasks = g.B * g.H * nqb;
  const Bf16Products path = bf16_path(dt);     // read once: every thread takes one path
  const bool bf = path != Bf16Products::none;  // Q unscaled in bf16: the scale joins the softmax
  [[maybe_unused]] const bool amx = path == Bf16Products::amx;
  const float post = softmax_scale(bf, a.scale);
  parallel_claim(tasks, a.threads, [&](auto claim) {
    const int64_t f32_tile = bf ? 0 : TK * g.Dp, bf16_tile = bf ? TK * g.Dp : 0;  // key and value tiles
    Scratch<float> qs(TQ * g.Dp), o(TQ * g.Dp), sb(TQ * TK), kbuf(f32_tile), kt(f32_tile), vp(f32_tile);
    Scratch<uint16_t> k16(bf16_tile), v16(bf16_tile);
#if HOTOPS_ATTN_BF16
    bf16dot::Tiles<TQ, TK> T(bf ? g.Dp : 0, amx);
#endif
    float m[TQ], l[TQ];
    int64_t qp[TQ];
    float* orow[TQ];
    bool exact[TQ];  // rows whose scores left float32's range: computed again in double (ExactRow)
    ExactRow ex;
    Tile tile;
    for (int64_t task; (task = claim()) < tasks;) {
      const int64_t b = task / (g.H * nqb), h = task / nqb % g.H, i0 = task % nqb * TQ;
      const int64_t hk = h / g.group, hi = g.idx_head(h);
      const int64_t mq = g.Lq - i0 < TQ ? g.Lq - i0 : TQ;
      int64_t qmin = INT64_MAX, qmax = INT64_MIN;
      for (int64_t i = 0; i < mq; ++i) {
        load_f32(qs.p + i * g.Dp, row_of(a.q, g.esz, b, h, i0 + i), dt, g.D, bf ? 1.0f : a.scale);
        exact[i] = !all_finite(qs.p + i * g.Dp, g.Dp);  // scale · q overflowed (or q holds NaN)
        fill(o.p + i * g.Dp, g.Dp, 0.0f);
        orow[i] = o.p + i * g.Dp;
        m[i] = -INFINITY;
        l[i] = 0.0f;
        qp[i] = a.qpos.present ? at3(a.qpos, b, h, i0 + i) : i0 + i;
        qmin = qp[i] < qmin ? qp[i] : qmin;
        qmax = qp[i] > qmax ? qp[i] : qmax;
      }
#if HOTOPS_ATTN_BF16
      if (bf) T.rows(qs.p, mq, T.a_rows.p);
#endif
      for (int64_t s0 = 0; s0 < g.S; s0 += TK) {
        tile_positions(a, b, hi, s0, g.S, tile);
        if (tile_dead(tile, a.causal, qmax)) continue;
#if HOTOPS_ATTN_BF16
        if (bf) {  // both tiles packed before the first tile load (it waits for stores to drain)
          gather_bf16(a.k, g, b, hk, tile, k16.p);
          gather_bf16(a.v, g, b, hk, tile, v16.p);
          T.pack_for_scores(k16.p, T.kt.p);
          T.pack_for_times(v16.p, T.vp.p);
          T.scores(mq, T.a_rows.p, T.kt.p, sb.p, a.scale / post);
        }
#endif
        if (!bf) {
          gather_rows(a.k, g, b, hk, tile, kbuf.p);
          gather_rows(a.v, g, b, hk, tile, vp.p);
          transpose_tile(kbuf.p, g.Dp, kt.p);
          abt(mq, qs.p, g.Dp, kt.p, sb.p, g.D);
        }
        if (needs_mask(tile, a.causal, qmin)) mask_block(sb.p, mq, tile, a.causal, qp, -INFINITY);
        for (int64_t i = 0; i < mq; ++i) {  // online softmax: rescale the running row, add the tile
          float* srow = sb.p + i * TK;
          VecF vmax = VecF::set1(-INFINITY);
          for (int s = 0; s < TK; s += W) vmax = VecF::max(vmax, VecF::load(srow + s));
          const float tmax = vmax.hmax() * post;
          float mnew = tmax > m[i] || std::isnan(tmax) ? tmax : m[i];
          if (mnew == -INFINITY) {  // nothing visible yet: P = 0, unless a visible score is NaN
            bool nan = false;       // (the max may have skipped it; a NaN q makes every score NaN)
            bool shown = false;     // or -inf: then it overflowed (only hidden slots are -inf here)
            for (int s = 0; s < TK; ++s) {
              nan |= std::isnan(srow[s]);
              shown |= tile.kp[s] >= 0 && !(a.causal && tile.kp[s] > qp[i]);
            }
            exact[i] |= shown;
            if (!nan) {
              fill(srow, TK, 0.0f);
              continue;
            }
            mnew = NAN;  // p, l and the output row all become NaN
          }
          const VecF vm = VecF::set1(mnew), vpost = VecF::set1(post);
          VecF vsum = VecF::set1(0.0f);
          for (int s = 0; s < TK; s += W) {
            const VecF p =
                exp_nonpositive(VecF::load(srow + s) * vpost - vm);  // as the scores pass rounded them
            p.store(srow + s);
            vsum = vsum + p;
          }
          const float alpha = std::exp(m[i] - mnew);
          if (alpha != 1.0f) {
            const VecF va = VecF::set1(alpha);
            for (int64_t d = 0; d < g.Dp; d += W) (VecF::load(orow[i] + d) * va).store(orow[i] + d);
          }
          l[i] = l[i] * alpha + vsum.sum();
          m[i] = mnew;
        }
#if HOTOPS_ATTN_BF16
        if (bf) T.times_tile(mq, sb.p, T.vp.p, o.p);
#endif
        if (!bf) ab(mq, tile.cnt, sb.p, TK, 1, vp.p, g.Dp, orow);
      }
      float* lse = a.lse.ptr<float>() + (b * g.H + h) * g.Lq + i0;
      for (int64_t i = 0; i < mq; ++i) {
        if (exact[i] || std::isnan(l[i]) || m[i] == INFINITY) {  // a +inf score makes l NaN
          lse[i] = ex.forward(a, g, b, h, i0 + i, qp[i]);
          continue;
        }
        const bool seen = l[i] > 0.0f || std::isnan(l[i]);
        if (!seen) fill(orow[i], g.Dp, 0.0f);  // zeros, even where P·V met a NaN value with P = 0
        store_out(row_of(a.out, g.esz, b, h, i0 + i), dt, orow[i], g.D, seen ? 1.0f / l[i] : 0.0f);
        lse[i] = seen ? m[i] + std::log(l[i]) : -INFINITY;
      }
    }
  });
}

void ssa_backward(const SsaArgs& a) {
  const Geometry g(a);
  const DType dt = a.q.dtype;
  const int64_t tasks = g.B * g.Hkv;
  const Bf16Products path = bf16_path(dt);
  const bool bf = path != Bf16Products::none;  // Q unscaled in bf16: the scale joins the softmax and dK
  [[maybe_unused]] const bool amx = path == Bf16Products::amx;
  const float post = softmax_scale(bf, a.scale);
  parallel_claim(tasks, a.threads, [&](auto claim) {
    Scratch<float> dk(g.Lk * g.Dp), dv(g.Lk * g.Dp);
    Scratch<float> qs(TQ * g.Dp), dob(TQ * g.Dp), dqb(TQ * g.Dp), tmp(g.Dp);
    const int64_t f32_tile = bf ? 0 : TK * g.Dp, bf16_tile = bf ? TK * g.Dp : 0;
    Scratch<float> pb(TQ * TK), ds(TQ * TK), kbuf(f32_tile), kt(f32_tile), vbuf(f32_tile), vt(f32_tile);
    Scratch<uint16_t> k16(bf16_tile), v16(bf16_tile);
#if HOTOPS_ATTN_BF16
    bf16dot::Tiles<TQ, TK> T(bf ? g.Dp : 0, amx);
#endif
    float lse[TQ], di[TQ];
    int64_t qp[TQ];
    float* dqrow[TQ];
    float* dkrow[TK];
    float* dvrow[TK];
    ExactRow ex;
    Tile tile;
    for (int64_t task; (task = claim()) < tasks;) {
      const int64_t b = task / g.Hkv, hk = task % g.Hkv;
      fill(dk.p, g.Lk * g.Dp, 0.0f);
      fill(dv.p, g.Lk * g.Dp, 0.0f);
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        const int64_t hi = g.idx_head(h);
        for (int64_t i0 = 0; i0 < g.Lq; i0 += TQ) {
          const int64_t mq = g.Lq - i0 < TQ ? g.Lq - i0 : TQ;
          int64_t qmin = INT64_MAX, qmax = INT64_MIN;
          const float* lse_src = a.lse.ptr<const float>() + (b * g.H + h) * g.Lq + i0;
          for (int64_t i = 0; i < mq; ++i) {
            float* q_i = qs.p + i * g.Dp;
            float* do_i = dob.p + i * g.Dp;
            load_f32(q_i, row_of(a.q, g.esz, b, h, i0 + i), dt, g.D, bf ? 1.0f : a.scale);
            load_f32(do_i, row_of(a.dout, g.esz, b, h, i0 + i), dt, g.D);
            load_f32(tmp.p, row_of(a.out, g.esz, b, h, i0 + i), dt, g.D);
            VecF acc = VecF::set1(0.0f);  // D_i = dO_i · O_i, the softmax backward's row term
            for (int64_t d = 0; d < g.Dp; d += W)
              acc = VecF::fma(VecF::load(do_i + d), VecF::load(tmp.p + d), acc);
            di[i] = acc.sum();
            lse[i] = lse_src[i];
            // a row that saw nothing (-inf) or an ExactRow (+inf) takes no part in the tiles: P = 0
            // there, and neither its q (scale · q may overflow) nor its dO and D_i (dO · Vᵀ and
            // dO · O may overflow) may meet that 0 in dK, dS or dQ (0 · inf = NaN); an ExactRow's
            // gradients come from ExactRow::backward, which reads dO itself
            if (std::isinf(lse[i])) {
              fill(q_i, g.Dp, 0.0f);
              fill(do_i, g.Dp, 0.0f);
              di[i] = 0.0f;
            }
            fill(dqb.p + i * g.Dp, g.Dp, 0.0f);
            dqrow[i] = dqb.p + i * g.Dp;
            qp[i] = a.qpos.present ? at3(a.qpos, b, h, i0 + i) : i0 + i;
            qmin = qp[i] < qmin ? qp[i] : qmin;
            qmax = qp[i] > qmax ? qp[i] : qmax;
          }
#if HOTOPS_ATTN_BF16
          if (bf) {  // Q and dO as bf16 rows (reduction over d) and row pairs (over queries)
            if (mq % 2) {
              fill(qs.p + mq * g.Dp, g.Dp, 0.0f);
              fill(dob.p + mq * g.Dp, g.Dp, 0.0f);
            }
            T.rows(qs.p, mq, T.a_rows.p);
            T.rows(dob.p, mq, T.b_rows.p);
            T.block_pairs(qs.p, mq, T.a_pairs.p);
            T.block_pairs(dob.p, mq, T.b_pairs.p);
          }
#endif
          for (int64_t s0 = 0; s0 < g.S; s0 += TK) {
            tile_positions(a, b, hi, s0, g.S, tile);
            if (tile_dead(tile, a.causal, qmax)) continue;
#if HOTOPS_ATTN_BF16
            if (bf) {
              gather_bf16(a.k, g, b, hk, tile, k16.p);
              gather_bf16(a.v, g, b, hk, tile, v16.p);
              T.pack_for_scores(k16.p, T.kt.p);
              T.pack_for_scores(v16.p, T.vt.p);
              T.pack_for_times(k16.p, T.kp.p);
              T.scores(mq, T.a_rows.p, T.kt.p, pb.p, a.scale / post);
            }
#endif
            if (!bf) {
              gather_rows(a.k, g, b, hk, tile, kbuf.p);
              gather_rows(a.v, g, b, hk, tile, vbuf.p);
              transpose_tile(kbuf.p, g.Dp, kt.p);
              transpose_tile(vbuf.p, g.Dp, vt.p);
              abt(mq, qs.p, g.Dp, kt.p, pb.p, g.D);
            }
            for (int64_t i = 0; i < mq; ++i) {  // P = exp(S - lse); rows that saw nothing stay 0
              float* prow = pb.p + i * TK;
              if (std::isinf(lse[i])) {  // -inf: saw nothing; +inf: an ExactRow (below)
                fill(prow, TK, 0.0f);
                continue;
              }
              const VecF vl = VecF::set1(lse[i]), vpost = VecF::set1(post);
              for (int s = 0; s < TK; s += W)
                exp_nonpositive(VecF::load(prow + s) * vpost - vl).store(prow + s);
            }
            if (needs_mask(tile, a.causal, qmin)) mask_block(pb.p, mq, tile, a.causal, qp, 0.0f);
#if HOTOPS_ATTN_BF16
            if (bf) T.scores(mq, T.b_rows.p, T.vt.p, ds.p, 1.0f);
#endif
            if (!bf) abt(mq, dob.p, g.Dp, vt.p, ds.p, g.D);  // dP = dO V^T
            for (int64_t i = 0; i < mq; ++i) {               // dS = P (dP - D_i)
              const VecF vd = VecF::set1(di[i]);
              float* srow = ds.p + i * TK;
              const float* prow = pb.p + i * TK;
              for (int s = 0; s < TK; s += W)
                (VecF::load(prow + s) * (VecF::load(srow + s) - vd)).store(srow + s);
            }
            for (int64_t s = 0; s < tile.cnt; ++s) {
              dkrow[s] = dk.p + tile.row[s] * g.Dp;
              dvrow[s] = dv.p + tile.row[s] * g.Dp;
            }
#if HOTOPS_ATTN_BF16
            if (bf) {
              T.transposed_times(tile.cnt, mq, pb.p, T.b_pairs.p, dvrow);
              T.transposed_times(tile.cnt, mq, ds.p, T.a_pairs.p, dkrow);
              T.times_tile(mq, ds.p, T.kp.p, dqb.p);
            }
#endif
            if (!bf) {
              ab(tile.cnt, mq, pb.p, 1, TK, dob.p, g.Dp, dvrow);   // dV[idx] += P^T dO
              ab(tile.cnt, mq, ds.p, 1, TK, qs.p, g.Dp, dkrow);    // dK[idx] += dS^T (scale Q)
              ab(mq, tile.cnt, ds.p, TK, 1, kbuf.p, g.Dp, dqrow);  // dQ += dS K
            }
          }
          for (int64_t i = 0; i < mq; ++i) {
            if (lse[i] == INFINITY)
              ex.backward(a, g, b, h, i0 + i, qp[i], bf ? 1.0f : a.scale, dk.p, dv.p, dqrow[i]);
            store_out(row_of(a.dq, g.esz, b, h, i0 + i), dt, dqrow[i], g.D, a.scale);
          }
        }
      }
      for (int64_t r = 0; r < g.Lk; ++r) {
        store_out(row_of(a.dk, g.esz, b, hk, r), dt, dk.p + r * g.Dp, g.D, bf ? a.scale : 1.0f);
        store_out(row_of(a.dv, g.esz, b, hk, r), dt, dv.p + r * g.Dp, g.D, 1.0f);
      }
    }
  });
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
