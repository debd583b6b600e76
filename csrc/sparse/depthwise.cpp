// Per-ISA forward of sparse depthwise convolutions (one input channel per group) with the CSR
// weight of cpu.cpp (kernel.h, CsrPtrs), one (image, output channel) plane at a time.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "sparse/kernel.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace sparse_kernel {
namespace {

#if defined(__AVX512F__) || defined(__AVX2__)
// The lanes of p whose `lanes` entry is negative, the others 0; masked-off lanes are not read (no
// fault even past the ends of an array).
inline VecF load_lanes(const float* p, const int32_t* lanes) {
#if defined(__AVX512F__)
  const __m512i m = _mm512_loadu_si512(lanes);
  return _mm512_maskz_loadu_ps(_mm512_cmplt_epi32_mask(m, _mm512_setzero_si512()), p);
#else
  return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes)));
#endif
}
#endif

// Where tap (dy, dx) of a kernel lands for every output pixel: output rows [ho0, ho1) and columns
// [wo0, wo1) read the input inside its borders, at row ho * sh + oy and column wo * sw + ox.
struct TapRange {
  int64_t ho0, ho1, wo0, wo1, oy, ox;
  static TapRange of(const ConvGeom& g, int64_t dy, int64_t dx) {
    auto range = [](int64_t off, int64_t s, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
      lo = off >= 0 ? 0 : (-off + s - 1) / s;  // first output with off + o * s >= 0
      hi = in - 1 - off < 0 ? 0 : std::min(out, (in - 1 - off) / s + 1);  // last one with it < in, + 1
      lo = std::min(lo, hi);
    };
    TapRange t;
    t.oy = dy * g.dh - g.ph;
    t.ox = dx * g.dw - g.pw;
    range(t.oy, g.sh, g.H, g.Ho, t.ho0, t.ho1);
    range(t.ox, g.sw, g.W, g.Wo, t.wo0, t.wo1);
    return t;
  }
};

}  // namespace

// Convolutions with one input channel per group (depthwise, with any channel multiplier): output
// channel o is input channel o / Og's plane times o's own taps, so a work item is one (image,
// output channel) plane, accumulated in a scratch buffer from each non-zero tap as shifted
// multiply-adds over the input rows it reaches, then bias + activation on the way out. At 90 %
// sparsity that is ~1 tap per channel where the dense convolution does kh * kw; a channel with no
// tap writes act(bias). Where each tap lands is worked out once per call (no division per row:
// the layers are small, 4x4 to 32x32 pixels in a CIFAR MobileNetV2). The generic paths would run
// every (image, channel) as its own one-row sparse product with the bookkeeping of a large layer.
bool conv_fwd_depthwise(const SparseConvFwd& a, const CsrPtrs& w) {
  const ConvGeom& g = a.g;
  if (g.Cg() != 1 || !reads_in_place(a.x)) return false;
  const int64_t P = g.P(), taps = g.kh * g.kw;
  const float* bias = a.bias.present ? a.bias.ptr<float>() : nullptr;
  w.check_rows(0, g.O);
  Scratch<TapRange> where(taps);
  for (int64_t k = 0; k < taps; ++k) where.p[k] = TapRange::of(g, k / g.kw, k % g.kw);
  const int64_t grain = std::max<int64_t>(1, 4096 / P);  // ~4K outputs a chunk
  auto input_plane = [&](int64_t n, int64_t o) {
    return a.x.ptr<float>() + n * a.x.stride(0) + (g.Og() == 1 ? o : o / g.Og()) * a.x.stride(1);
  };
#if defined(__AVX512F__) || defined(__AVX2__)
  // Stride 1 with the output as wide as the input (padding (kw - 1) * dw / 2: every stride-1
  // depthwise layer of a MobileNet): output pixel p of tap k reads input pixel p + shift[k], one
  // uniform shift, so a vector of W outputs is one masked load of the input plane at that shift
  // (lanes whose tap falls in the padding masked off) and one FMA, in registers, with no
  // per-row bookkeeping and no accumulator buffer: a 4x4 plane costs ~9 ns instead of ~40.
  const int64_t nvec = (P + W - 1) / W;
  if (g.sh == 1 && g.sw == 1 && g.Wo == g.W && P <= 4096) {
    Scratch<int64_t> shift(taps);
    Scratch<int32_t> lanes(taps * nvec * W);  // -1: the lane reads the input, 0: padding
    for (int64_t k = 0; k < taps; ++k) {
      const TapRange& t = where.p[k];
      shift.p[k] = t.oy * g.W + t.ox;
      for (int64_t p = 0; p < nvec * W; ++p) {
        const int64_t ho = p / g.Wo, wo = p % g.Wo;
        const bool in = p < P && ho >= t.ho0 && ho < t.ho1 && wo >= t.wo0 && wo < t.wo1;
        lanes.p[k * nvec * W + p] = in ? -1 : 0;
      }
    }
    parallel_for(g.N * g.O, grain, a.threads, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0, n = i0 / g.O, o = i0 % g.O; i < i1;
           ++i, o = o + 1 == g.O ? 0 : o + 1, n += o == 0) {
        // addresses as integers: a masked load's window may start before the plane
        const uintptr_t plane = reinterpret_cast<uintptr_t>(input_plane(n, o));
        const Out out = Out::at(a.y, n, o, 0);
        const VecF b = VecF::set1(bias ? bias[o] : 0.0f);
        for (int64_t j = 0; j < nvec; ++j) {
          VecF acc = VecF::set1(0.0f);
          for (int64_t q = 0; q < w.panels; ++q)
            for (int64_t k = w.begin(o, q); k < w.end(o, q); ++k) {
              const int64_t tap = w.col[k];
              const float* src =
                  reinterpret_cast<const float*>(plane + sizeof(float) * (j * W + shift.p[tap]));
              acc = VecF::fma(VecF::set1(w.val[k]), load_lanes(src, lanes.p + (tap * nvec + j) * W), acc);
            }
          out.put(0, j * W, epilogue(acc, b, a.act), std::min<int64_t>(W, P - j * W));
        }
      }
    });
    return true;
  }
#endif
  parallel_for(g.N * g.O, grain, a.threads, [&](int64_t i0, int64_t i1) {
    Scratch<float> acc(P);
    for (int64_t i = i0, n = i0 / g.O, o = i0 % g.O; i < i1; ++i, o = o + 1 == g.O ? 0 : o + 1, n += o == 0) {
      const float* plane = input_plane(n, o);
      std::memset(acc.p, 0, sizeof(float) * P);
      for (int64_t q = 0; q < w.panels; ++q)
        for (int64_t k = w.begin(o, q); k < w.end(o, q); ++k) {
          const TapRange& t = where.p[w.col[k]];
          const float v = w.val[k];
          const VecF vv = VecF::set1(v);
          const int64_t len = t.wo1 - t.wo0;
          for (int64_t ho = t.ho0; ho < t.ho1; ++ho) {
            const float* src = plane + (ho * g.sh + t.oy) * g.W + t.wo0 * g.sw + t.ox;
            float* dst = acc.p + ho * g.Wo + t.wo0;
            if (g.sw != 1) {
              for (int64_t j = 0; j < len; ++j) dst[j] += v * src[j * g.sw];
              continue;
            }
            int64_t j = 0;
            for (; j + W <= len; j += W)
              VecF::fma(vv, VecF::load(src + j), VecF::load(dst + j)).store(dst + j);
            if (j < len)
              store_first(dst + j, VecF::fma(vv, load_first(src + j, len - j), load_first(dst + j, len - j)),
                          len - j);
          }
        }
      const Out out = Out::at(a.y, n, o, 0);
      const VecF b = VecF::set1(bias ? bias[o] : 0.0f);
      for (int64_t j = 0; j < P; j += W) {
        const int64_t m = std::min<int64_t>(W, P - j);
        out.put(0, j, epilogue(m == W ? VecF::load(acc.p + j) : load_first(acc.p + j, m), b, a.act), m);
      }
    }
  });
  return true;
}

}  // namespace sparse_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops
