// Inline helpers shared by the sparse kernel TUs (cpu.cpp: CSR, depthwise.cpp: CSR depthwise
// convolutions, blocked.cpp: output-channel blocks), compiled per ISA like them: the CSR weight's
// pointers, tiles of output pixels, the im2col rows a tile reads, the zero-padded input of the
// stride-1 shifted path, the output's element types, and the two loops over a forward's work
// items, each calling the format's own product for a range of rows.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/parallel.h"
#include "common/simd.h"
#include "sparse/cpu.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace sparse_kernel {  // not anonymous (two TUs share it), so named apart from other families

constexpr int W = VecF::W;
constexpr int NV = 4;                      // vectors per register tile (x2 sets of accumulators)
constexpr int64_t CH = int64_t(NV) * W;    // pixels per register tile
constexpr int64_t TILE_FLOATS = 96 << 10;  // im2col tile budget (384 KB): L2-resident

struct Out {  // element (row, pixel) at base + row * rs + pixel * ps, of type t (f32, bf16, f16)
  void* base;
  int64_t rs, ps;
  DType t = DType::f32;

  static Out at(const View& v, int64_t n, int64_t r, int64_t p) {  // v (N, rows, pixels) from (n, r, p)
    const int64_t offset = n * v.stride(0) + r * v.stride(1) + p * v.stride(2);
    return Out{static_cast<char*>(v.data) + offset * dtype_size(v.dtype), v.stride(1), v.stride(2), v.dtype};
  }
  void set(int64_t r, int64_t p, float x) const {
    const int64_t i = r * rs + p * ps;
    if (t == DType::f32)
      static_cast<float*>(base)[i] = x;
    else
      static_cast<uint16_t*>(base)[i] = t == DType::f16 ? f32_to_f16(x) : f32_to_bf16(x);
  }
  void put(int64_t r, int64_t p, VecF v, int64_t n = W) const {
    if (ps == 1)
      return store_row(static_cast<char*>(base) + (r * rs + p) * (t == DType::f32 ? 4 : 2), t, 0, v, n);
    float buf[W];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) set(r, p + i, buf[i]);
  }
};

inline VecF epilogue(VecF acc, VecF bias, Act act) {
  acc = acc + bias;
  if (act == Act::none) return acc;
  acc = VecF::max(VecF::set1(0.0f), acc);  // max / min return their second operand for NaN:
  return act == Act::relu6 ? VecF::min(VecF::set1(6.0f), acc) : acc;  // NaN stays NaN, as in torch
}

// Whether every column index of the non-zeros [k0, k1) lies in [0, ncols) (a negative one reads
// as a huge unsigned). Run on every call, since the index tensors may change between calls: a
// max-reduction the compiler vectorizes, so the check costs a fraction of the product even at
// batch 1 (a compare-and-or per index was a quarter of a 4096 x 4096 GEMV).
inline bool columns_in_range(const int32_t* col, int64_t k0, int64_t k1, int64_t ncols) {
  uint32_t top = 0;
  for (int64_t k = k0; k < k1; ++k) top = std::max(top, static_cast<uint32_t>(col[k]));
  return k0 >= k1 || top < static_cast<uint64_t>(ncols);
}

// The first `count` (1..W) floats at p; the other lanes are 0 and their memory is not touched.
inline VecF load_first(const float* p, int64_t count) {
#if defined(__AVX512F__)
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
#elif defined(__AVX2__)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lane));
#else
  (void)count;
  return VecF::load(p);
#endif
}

// Stores the first `count` (1..W) lanes of v at p; the memory past them is not touched.
inline void store_first(float* p, VecF v, int64_t count) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1u), v.v);
#elif defined(__AVX2__)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lane), v.v);
#else
  (void)count;
  v.store(p);
#endif
}

// Calls f(t, hi, wi, len) for each run of tile positions t .. t+len-1 (pixels p0 + t) whose
// kernel tap (dy, dx) lands inside the input: input row hi, columns wi, wi + sw, ...
template <typename F>
inline void for_each_span(const ConvGeom& g, int64_t dy, int64_t dx, int64_t p0, int64_t n, F&& f) {
  const int64_t off_w = dx * g.dw - g.pw;
  const int64_t lo = off_w >= 0 ? 0 : (-off_w + g.sw - 1) / g.sw;  // first wo with wi >= 0
  const int64_t hi = std::min(g.Wo, g.W - 1 - off_w < 0 ? 0 : (g.W - 1 - off_w) / g.sw + 1);
  for (int64_t p = p0, end = p0 + n; p < end;) {
    const int64_t ho = p / g.Wo, wo0 = p - ho * g.Wo, wo1 = std::min(g.Wo, wo0 + (end - p));
    const int64_t hin = ho * g.sh - g.ph + dy * g.dh;
    if (hin >= 0 && hin < g.H) {
      const int64_t a = std::max(wo0, lo), b = std::min(wo1, hi);
      if (a < b) f(p - p0 + (a - wo0), hin, a * g.sw + off_w, b - a);
    }
    p += wo1 - wo0;
  }
}

inline void tap_of(const ConvGeom& g, int64_t k, int64_t& c, int64_t& dy, int64_t& dx) {
  c = k / (g.kh * g.kw);
  dy = (k / g.kw) % g.kh;
  dx = k % g.kw;
}

// im2col rows of group grp for pixels [p0, p0 + n) of one image (channel stride xcs) into buf
// (row stride n); rows with no non-zero in the weight (used[k] == used[k + 1]) are skipped.
inline void build_cols(const ConvGeom& g, const float* xn, int64_t xcs, int64_t grp, const int64_t* used,
                       int64_t p0, int64_t n, float* buf) {
  for (int64_t k = 0; k < g.K(); ++k) {
    if (used[k] == used[k + 1]) continue;
    int64_t c, dy, dx;
    tap_of(g, k, c, dy, dx);
    const float* plane = xn + (grp * g.Cg() + c) * xcs;
    float* row = buf + k * n;
    std::memset(row, 0, sizeof(float) * n);
    for_each_span(g, dy, dx, p0, n, [&](int64_t t, int64_t hin, int64_t wi, int64_t len) {
      const float* s = plane + hin * g.W + wi;
      if (g.sw == 1) {
        std::memcpy(row + t, s, sizeof(float) * len);
      } else {
        for (int64_t i = 0; i < len; ++i) row[t + i] = s[i * g.sw];
      }
    });
  }
}

// A direct layer's x is read in place when it is float32 with contiguous pixels (each channel a
// row of pixels: a 1x1 convolution's input, or x^T). Otherwise (a linear layer's x as it comes,
// one row of channels per pixel, in float32, bfloat16 or float16; check() refuses other layouts)
// each tile is built by transposition: the input is never copied whole, and the tile is widened
// to float32 on the way.
inline bool reads_in_place(const View& x) {
  return x.dtype == DType::f32 && (x.size(2) <= 1 || x.stride(2) == 1);
}

// Row stride of a built tile of len pixels: whole 64-byte lines, one more where they would be a
// multiple of 8 (512 bytes). Rows a multiple of 4 KB apart (a batch of 1,024 or 5,120 float32
// rows) would fall in the same few cache sets and evict each other; a stride of 4 lines already
// spreads over every set, and one more line would cost a quarter more memory traffic.
inline int64_t tile_ld(int64_t len) {
  const int64_t lines = (len + 15) / 16;
  return (lines % 8 ? lines : lines + 1) * 16;
}

// Channels [c0, c0 + C) of pixels [p0, p0 + len) of image n of a pixel-major x (channels
// contiguous), transposed into buf (row stride ld >= len) as float32: W x W blocks of W pixels'
// rows through registers, W pixels at a time, so x is read row after row as it lies in memory
// (the tile's first read of it; buf stays in cache). Nothing past len is written in a row.
inline void transpose_pixels(const View& x, int64_t n, int64_t c0, int64_t C, int64_t p0, int64_t len,
                             float* buf, int64_t ld) {
  const int64_t es = dtype_size(x.dtype);
  const char* base = static_cast<const char*>(x.data) + (n * x.stride(0) + c0 * x.stride(1)) * es;
  for (int64_t p = 0; p < len; p += W) {
    const int64_t np = std::min<int64_t>(W, len - p);
    for (int64_t c = 0; c < C; c += W) {
      const int64_t nc = std::min<int64_t>(W, C - c);
      VecF v[W];
      for (int64_t i = 0; i < W; ++i)
        v[i] = i < np ? load_row(base + (p0 + p + i) * x.stride(2) * es, x.dtype, c, nc) : VecF::set1(0.0f);
      transpose(v);
      for (int64_t i = 0; i < nc; ++i) store_row(buf + (c + i) * ld, DType::f32, p, v[i], np);
    }
  }
}

// dst[j * ld + r] = element j of src row r (row stride src_ld elements) for r < R, j < C: 16-bit
// elements (bfloat16) transposed as they are, 64 columns per task.
inline void transpose_halfwords(const uint16_t* src, int64_t src_ld, int64_t R, int64_t C, uint16_t* dst,
                                int64_t ld, int threads) {
  parallel_for((C + 63) / 64, 1, threads, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = b * 64, e = std::min<int64_t>(C, j + 64); j < e; ++j)
          dst[j * ld + r] = src[r * src_ld + j];
  });
}

// Floats of the per-task buffer input_tile builds tiles of up to pt pixels in (0: none needed).
inline int64_t tile_floats(const ConvGeom& g, const View& x, int64_t pt) {
  if (!g.direct()) return g.K() * pt;
  return reads_in_place(x) ? 0 : g.Cg() * tile_ld(pt);
}

// The im2col tile of image n, group grp, pixels [p0, p0 + len): for direct layers the input
// itself (row stride = its channel stride) or its transposed tile; else built into buf (row
// stride len). Returns the rows.
inline const float* input_tile(const ConvGeom& g, const View& x, const int64_t* used, int64_t n, int64_t grp,
                               int64_t p0, int64_t len, float* buf, int64_t& ld) {
  if (g.direct() && !reads_in_place(x)) {
    ld = tile_ld(len);
    transpose_pixels(x, n, grp * g.Cg(), g.Cg(), p0, len, buf, ld);
    return buf;
  }
  const float* xn = x.ptr<float>() + n * x.stride(0);
  if (g.direct()) {
    ld = x.stride(1);
    return xn + grp * g.Cg() * x.stride(1) + p0;
  }
  build_cols(g, xn, x.stride(1), grp, used + grp * g.K(), p0, len, buf);
  ld = len;
  return buf;
}

// Tiling shared by the passes: tiles of `pt` output pixels, rows split into `rb` blocks of `rbs`.
struct Plan {
  int64_t pt, tiles, rb, rbs, items, rows_per_group;
  // unit: row blocks are whole multiples of it (the blocked format's b rows); src_rows: the rows
  // of a tile's source (default the im2col rows K)
  Plan(const ConvGeom& g, int64_t rows_per_group, bool split_rows_freely, int threads, int64_t unit = 1,
       int64_t src_rows = 0)
      : rows_per_group(rows_per_group) {
    const int64_t P = g.P();
    const int64_t tile_rows = std::max<int64_t>(1, src_rows ? src_rows : g.K());
    pt = std::max<int64_t>(CH, TILE_FLOATS / tile_rows / CH * CH);
    pt = std::max<int64_t>(1, std::min(P, pt));
    tiles = P == 0 ? 0 : (P + pt - 1) / pt;
    const int64_t outer = g.N * tiles * g.G;
    // rows are split when reading the input in place (free) or when there are too few tiles
    const int64_t want = split_rows_freely ? 4 * threads : threads;
    rb = outer >= want ? 1
                       : std::min<int64_t>(rows_per_group, (want + outer - 1) / std::max<int64_t>(1, outer));
    rb = std::max<int64_t>(1, rb);
    rbs = ((rows_per_group + rb - 1) / rb + unit - 1) / unit * unit;
    items = outer * rb;
  }
  // Work item `it`: image n, group grp, pixels [p0, p0 + len), rows [r0, r1) (none: r0 >= r1).
  struct Item {
    int64_t n, grp, p0, len, r0, r1;
  };
  Item item(int64_t it, const ConvGeom& g) const {
    const int64_t b = it % rb, grp = (it / rb) % g.G, t = (it / rb / g.G) % tiles, n = it / rb / g.G / tiles;
    const int64_t r0 = grp * rows_per_group + b * rbs;
    return {n, grp, t * pt, std::min(pt, g.P() - t * pt), r0, std::min((grp + 1) * rows_per_group, r0 + rbs)};
  }
};

// x (a direct layer's input, N x C x P) copied whole into buf (N * C rows of tile_ld(P) floats)
// as float32 with contiguous pixels; returns the view of the copy. For the inputs the kernels do
// not read in place where building tiles would not do: bfloat16 with contiguous pixels (widened
// row by row) on the convert path, and a pixel-major x with so few tiles that the work is shared
// out by splitting rows, each split transposing the same tile again (transposed whole instead).
inline View float_pixels(const View& x, const ConvGeom& g, float* buf, int threads) {
  const int64_t P = g.P(), ld = tile_ld(P), es = dtype_size(x.dtype);
  const bool pixels = P <= 1 || x.stride(2) == 1;
  const int64_t chunks = pixels ? g.N * g.C : g.N * ((P + CH - 1) / CH);
  parallel_for(chunks, 1, threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (pixels) {  // one channel row: pixels widened W at a time
        const char* src =
            static_cast<const char*>(x.data) + ((i / g.C) * x.stride(0) + (i % g.C) * x.stride(1)) * es;
        for (int64_t j = 0; j < P; j += W)
          store_row(buf + i * ld, DType::f32, j, load_row(src, x.dtype, j, std::min<int64_t>(W, P - j)),
                    std::min<int64_t>(W, P - j));
      } else {  // CH pixels of one image, every channel
        const int64_t tiles = (P + CH - 1) / CH, n = i / tiles, p0 = (i % tiles) * CH;
        transpose_pixels(x, n, 0, g.C, p0, std::min(CH, P - p0), buf + n * g.C * ld + p0, ld);
      }
    }
  });
  View v = x;
  v.data = buf;
  v.dtype = DType::f32;
  v.strides[0] = g.C * ld, v.strides[1] = ld, v.strides[2] = 1;
  return v;
}

// Whether x must be copied whole (float_pixels) before a pass that plans its tiles with `plan`:
// bfloat16 with contiguous pixels, or a pixel-major x whose rows the plan splits.
inline bool copies_input(const View& x, const Plan& plan) {
  if (reads_in_place(x)) return false;
  return (x.dtype == DType::bf16 && (x.size(2) <= 1 || x.stride(2) == 1)) || plan.rb > 1;
}

// A forward's product over output rows [r0, r1) (a whole number of the format's row units but at
// a group's end) for `len` pixels of src (row stride ld), written through out; `park` holds the
// partial sums between column panels ((r1 - r0) x CH floats).
//   product(r0, r1, src, ld, len, out, park)

// Convolutions that are not direct (1x1, stride 1, no padding: the input is its im2col) and not
// stride 1 build im2col tiles of the rows the weight uses; direct ones read x in place.
template <typename Product>
void im2col_tiles(const SparseConvFwd& a, int64_t unit, const Product& product) {
  const ConvGeom& g = a.g;
  // direct layers split rows freely: a pixel-major x is transposed tile by tile only where the
  // plan does not split them (sparse_conv_fwd copies it whole otherwise)
  const Plan plan(g, g.Og(), g.direct(), a.threads, unit);
  const int64_t* used = a.used_rowptr.ptr<int64_t>();
  parallel_claim(plan.items, a.threads, [&](auto claim) {
    Scratch<float> buf(tile_floats(g, a.x, plan.pt));
    Scratch<float> park(plan.rbs * CH);
    for (int64_t it; (it = claim()) < plan.items;) {
      const Plan::Item i = plan.item(it, g);
      if (i.r0 >= i.r1) continue;
      int64_t ld;
      const float* src = input_tile(g, a.x, used, i.n, i.grp, i.p0, i.len, buf.p, ld);
      product(i.r0, i.r1, src, ld, i.len, Out::at(a.y, i.n, i.r0, i.p0), park.p);
    }
  });
}

// Stride-1 k x k convolution without im2col. In a zero-padded copy of the input, the im2col row
// of tap (c, dy, dx) is the padded plane of c shifted by dy * dh * Wp + dx * dw, provided output
// pixels are numbered in padded-row coordinates p' = ho * Wp + wo (the Wp - Wo columns past each
// row's end are computed and dropped). Each non-zero then reads its shifted slice of the input in
// place: one offset per non-zero instead of a 9x larger im2col copy per tile, and the taps of a
// channel share cache lines.
struct Shifted {
  int64_t Hp, Wp, plane, tail, span;
  explicit Shifted(const ConvGeom& g)
      : Hp(g.H + 2 * g.ph),
        Wp(g.W + 2 * g.pw),
        plane(Hp * Wp),
        tail((g.kw - 1) * g.dw),        // the last row's dropped columns read this far past the end
        span(g.Cg() * plane + tail) {}  // a group's padded input, as far as offsets reach
  static bool applies(const ConvGeom& g) {
    const Shifted s(g);
    return g.sh == 1 && g.sw == 1 && !g.direct() && g.N * g.C * s.plane + s.tail <= INT32_MAX;
  }
  // im2col row k (c, dy, dx) of a group as an offset into its padded input
  int32_t offset(const ConvGeom& g, int64_t k) const {
    int64_t c, dy, dx;
    tap_of(g, k, c, dy, dx);
    return static_cast<int32_t>(c * plane + dy * g.dh * Wp + dx * g.dw);
  }
  // Offsets of the n column indices col (checked against [0, K)) into off.
  void offsets(const ConvGeom& g, const int32_t* col, int64_t n, int32_t* off) const {
    for (int64_t k = 0; k < n; ++k) {
      HOTOPS_CHECK(static_cast<uint32_t>(col[k]) < g.K(), "column index out of range [0, ", g.K(),
                   ") at entry ", k, " of the sparse weight");
      off[k] = offset(g, col[k]);
    }
  }

  // Runs product over every work item, with src the padded input (ld 1) and out a staging tile
  // that is copied into y without the dropped columns.
  template <typename Product>
  void run(const SparseConvFwd& a, int64_t unit, const Product& product) const {
    const ConvGeom& g = a.g;
    Scratch<float> xpad(g.N * g.C * plane + tail);
    std::memset(xpad.p + g.N * g.C * plane, 0, sizeof(float) * tail);
    parallel_for(g.N * g.C, 8, a.threads, [&](int64_t c0, int64_t c1) {
      for (int64_t nc = c0; nc < c1; ++nc) {
        const float* src = a.x.ptr<float>() + (nc / g.C) * a.x.stride(0) + (nc % g.C) * a.x.stride(1);
        float* dst = xpad.p + nc * plane;
        std::memset(dst, 0, sizeof(float) * g.ph * Wp);
        for (int64_t h = 0; h < g.H; ++h) {
          float* row = dst + (g.ph + h) * Wp;
          std::memset(row, 0, sizeof(float) * g.pw);
          std::memcpy(row + g.pw, src + h * g.W, sizeof(float) * g.W);
          std::memset(row + g.pw + g.W, 0, sizeof(float) * g.pw);
        }
        std::memset(dst + (g.ph + g.H) * Wp, 0, sizeof(float) * g.ph * Wp);
      }
    });
    // tiles of whole padded rows, enough of them to share out; rows split when there are few
    const int64_t rows_per_tile = std::max<int64_t>(1, std::min(g.Ho, (1024 + Wp - 1) / Wp));
    const int64_t tiles = (g.Ho + rows_per_tile - 1) / rows_per_tile, outer = g.N * g.G * tiles;
    const int64_t rb = std::max<int64_t>(1, std::min(g.Og(), (4 * a.threads + outer - 1) / outer));
    const int64_t rbs = ((g.Og() + rb - 1) / rb + unit - 1) / unit * unit;
    parallel_claim(outer * rb, a.threads, [&](auto claim) {
      Scratch<float> stage(rbs * rows_per_tile * Wp), park(rbs * CH);
      for (int64_t it; (it = claim()) < outer * rb;) {
        const int64_t b = it % rb, t = (it / rb) % tiles, grp = (it / rb / tiles) % g.G,
                      n = it / rb / tiles / g.G;
        const int64_t r0 = grp * g.Og() + b * rbs, r1 = std::min((grp + 1) * g.Og(), r0 + rbs);
        const int64_t ho0 = t * rows_per_tile, ho1 = std::min(g.Ho, ho0 + rows_per_tile);
        const int64_t len = (ho1 - ho0) * Wp;
        if (r0 >= r1) continue;
        const float* src = xpad.p + (n * g.C + grp * g.Cg()) * plane + ho0 * Wp;
        product(r0, r1, src, int64_t(1), len, Out{stage.p, len, 1}, park.p);
        const Out out = Out::at(a.y, n, r0, ho0 * g.Wo);
        for (int64_t r = 0; r < r1 - r0; ++r)
          for (int64_t h = 0; h < ho1 - ho0; ++h) {
            const float* row = stage.p + r * len + h * Wp;
            for (int64_t j = 0; j < g.Wo; j += W) {
              const int64_t m = std::min<int64_t>(W, g.Wo - j);
              out.put(r, h * g.Wo + j, load_row(row, DType::f32, j, m), m);
            }
          }
      }
    });
  }
};

// A CSR whose rows are (panel, row) pairs: row r's non-zeros in column panel q are
// [rowptr[q * rows + r], rowptr[q * rows + r + 1]) (see cpu.h; panels == 1 is plain CSR).
struct CsrPtrs {
  const int64_t* rowptr;
  const int32_t* col;
  const float* val;
  int64_t rows, panels, ncols;
  CsrPtrs(const Csr& m, int64_t rows, int64_t ncols)
      : rowptr(m.rowptr.ptr<int64_t>()),
        col(m.colidx.ptr<int32_t>()),
        val(m.values.ptr<float>()),
        rows(rows),
        panels((m.rowptr.size(0) - 1) / rows),
        ncols(ncols) {}

  int64_t begin(int64_t r, int64_t q) const { return rowptr[q * rows + r]; }
  int64_t end(int64_t r, int64_t q) const { return rowptr[q * rows + r + 1]; }

  // every column index the kernels read for rows [r0, r1) of panels [q0, q1), in storage order
  void check_rows(int64_t r0, int64_t r1, int64_t q0 = 0, int64_t q1 = -1) const {
    bool ok = true;
    for (int64_t q = q0; q < (q1 < 0 ? panels : q1); ++q)
      ok &= columns_in_range(col, begin(r0, q), begin(r1, q), ncols);
    HOTOPS_CHECK(ok, "column index out of range [0, ", ncols, ") in rows ", r0, "..", r1 - 1,
                 " of the sparse weight");
  }
};

// Depthwise convolutions (one input channel per group) in a loop of their own (depthwise.cpp);
// false where the layer is not one or its input is not read in place.
bool conv_fwd_depthwise(const SparseConvFwd& a, const CsrPtrs& w);

}  // namespace sparse_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops
