// Per-ISA codebook kernels (see cpu.h).
//
// matmul: the batch is taken 16 rows at a time (BC = batch rounded up to a power of two <= 16,
// so a table entry for all BC rows is one contiguous run of BC floats, 64 bytes at 16). Threads
// take blocks of rows; for each tile of code slots small enough for L1/L2, a thread
//   1. tabulates T[i, c, b] = x[b, group j of slot i] . codebooks[o, m, c]  (its own copy),
//   2. adds acc[r, b] += T[i, codes[r, i], b] over the tile's slots for its rows,
// then writes y[b, perm[r]] = scales[r] * acc[r, b] + bias. Work per output is one load+add per code
// slot instead of in_group multiply-adds per weight; the weight is read once as uint8 codes.
#include <cstdlib>
#include <new>

#include "codebook/cpu.h"
#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

constexpr int kMaxBatch = 16;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Aligned float scratch freed on scope exit (kernel TUs avoid std::vector: see the ODR rule).
class Floats {
 public:
  explicit Floats(int64_t n) {
    const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * 4 + 63) / 64 * 64;
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
  }
  ~Floats() { std::free(p_); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  float* get() const { return p_; }

 private:
  float* p_;
};

inline float to_f32(const void* p, DType t, int64_t i) {
  return t == DType::f32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
inline void store(void* p, DType t, int64_t i, float v) {
  if (t == DType::f32) static_cast<float*>(p)[i] = v;
  else static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

// Largest code in codes[0, n): the range check that keeps every table read in bounds.
inline uint8_t max_code(const uint8_t* codes, int64_t n) {
  uint8_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = codes[i] > m ? codes[i] : m;
  return m;
}

// T[(i - i0) * C + c) * BC + b] for slots [s0, s1) of the tile starting at i0.
// xb is (BC, K) float32, cbT is (M, G, C): codewords transposed so the BC = 1 loop runs over c.
template <int G, int BC>
void build_table(const float* xb, int64_t K, const float* cbT, int64_t M, int64_t C, int64_t i0,
                 int64_t s0, int64_t s1, float* T) {
  for (int64_t i = s0; i < s1; ++i) {
    const int64_t j = i / M, m = i % M;
    float xs[G][BC];
    for (int t = 0; t < G; ++t)
      for (int b = 0; b < BC; ++b) xs[t][b] = xb[b * K + j * G + t];
    const float* cb = cbT + m * G * C;
    float* Ti = T + (i - i0) * C * BC;
    for (int64_t c = 0; c < C; ++c) {
      float s[BC] = {};  // the inner loop runs over the batch: one vector FMA per (c, t)
      for (int t = 0; t < G; ++t) {
        const float word = cb[t * C + c];
        for (int b = 0; b < BC; ++b) s[b] += xs[t][b] * word;
      }
      for (int b = 0; b < BC; ++b) Ti[c * BC + b] = s[b];
    }
  }
}

// Block-local row lanes [lo, hi) of acc += sum over the tile's n slots of T[i, codes[i, lane]],
// for one block of 16 rows whose codes are interleaved (slot-major, 16 bytes per slot).
inline void gather_block(const float* T, int64_t C, const uint8_t* codes, int64_t n, int lo, int hi,
                         float* acc) {
  // Plain loads, 16 independent sums: on Zen 4 this beats vgatherdps (measured 1.2 vs 1.9 ms
  // for 4096 x 4096 at 2 bits, one thread), and the compiler vectorises the adds.
  float s[16] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int l = 0; l < 16; ++l) s[l] += T[i * C + codes[i * 16 + l]];
  for (int l = lo; l < hi; ++l) acc[l] += s[l];
}

// N floats as one GCC vector (never wider than the ISA's registers: wider ones spill).
template <int N> struct Lanes;
template <> struct Lanes<1> { typedef float type; };
template <> struct Lanes<2> { typedef float type __attribute__((vector_size(8))); };
template <> struct Lanes<4> { typedef float type __attribute__((vector_size(16))); };
template <> struct Lanes<8> { typedef float type __attribute__((vector_size(32))); };
template <> struct Lanes<16> { typedef float type __attribute__((vector_size(64))); };

// acc[r - base, :] += sum over the tile's slots [i0, i1) of T[i, code(r, i), :] for rows
// [r0, r1) of one group (acc holds the thread's rows from `base`, a multiple of 16).
// Returns false (leaving acc alone) if a code in those blocks is >= C.
template <int BC>
bool gather_rows(const float* T, int64_t C, const uint8_t* codes, int64_t L, int64_t i0, int64_t i1,
                 int64_t r0, int64_t r1, int64_t base, float* acc) {
  const int64_t n = i1 - i0;
  for (int64_t blk = r0 / 16; blk * 16 < r1; ++blk) {
    const uint8_t* cb = codes + (blk * L + i0) * 16;
    if (C < 256 && max_code(cb, n * 16) >= C) return false;
    const int lo = static_cast<int>(max64(r0, blk * 16) - blk * 16);
    const int hi = static_cast<int>(min64(r1, blk * 16 + 16) - blk * 16);
    float* ab = acc + (blk * 16 - base) * BC;
    if constexpr (BC == 1) {
      gather_block(T, C, cb, n, lo, hi, ab);
    } else {
      constexpr int VW = BC < VecF::W ? BC : VecF::W, NV = BC / VW;
      using V = typename Lanes<VW>::type;
      for (int l = lo; l < hi; ++l) {
        V s[NV];
        for (int v = 0; v < NV; ++v) s[v] = reinterpret_cast<const V*>(ab + l * BC)[v];
        for (int64_t i = 0; i < n; ++i) {
          const V* t = reinterpret_cast<const V*>(T + (i * C + cb[i * 16 + l]) * BC);
          for (int v = 0; v < NV; ++v) s[v] += t[v];
        }
        for (int v = 0; v < NV; ++v) reinterpret_cast<V*>(ab + l * BC)[v] = s[v];
      }
    }
  }
  return true;
}

// Per-thread table tile: small enough for L1 when one code's entry is a single float (the
// gathers then hit L1), L2-sized when it is a whole vector (one load per code, latency hidden).
template <int BC>
constexpr int64_t table_tile_bytes() { return BC == 1 ? 16 << 10 : 192 << 10; }

// One chunk of Bc <= BC batch rows starting at b0. Threads take blocks of rows; each builds its
// own table tiles (no barriers between tiles: rebuilding a tile costs far less than a sync).
// Returns false on an out-of-range code.
template <int G, int BC>
bool matmul_chunk(const CodebookMatmul& a, int64_t b0, int64_t Bc, const float* cbT_all, const float* xb) {
  const CodebookFormat& w = a.w;
  const int64_t K = w.in_features(), N = w.rows(), L = w.slots(), M = w.num_codebooks(),
                C = w.codebook_size();
  const int64_t tile = max64(1, table_tile_bytes<BC>() / (C * BC * 4));
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const int64_t* perm = a.perm.present ? a.perm.ptr<const int64_t>() : nullptr;
  const float* bias = a.bias.present ? a.bias.ptr<const float>() : nullptr;
  const float* scales = w.scales.ptr<const float>();
  const int64_t ldo = a.out.stride(0);
  int ok = 1;
  parallel_for((N + 15) / 16, 4, a.threads, [&](int64_t blk0, int64_t blk1) {
    const int64_t s0 = blk0 * 16, s1 = min64(N, blk1 * 16);
    Floats T(tile * C * BC), acc((blk1 - blk0) * 16 * BC);
    for (int64_t i = 0; i < (blk1 - blk0) * 16 * BC; ++i) acc.get()[i] = 0.0f;
    int64_t o = 0;
    for (int64_t r0 = s0; r0 < s1; r0 = min64(s1, gp[o + 1])) {  // the rows of one group at a time
      while (gp[o + 1] <= r0) ++o;
      const int64_t r1 = min64(s1, gp[o + 1]);
      const float* cbT = cbT_all + o * M * G * C;
      for (int64_t i0 = 0; i0 < L; i0 += tile) {
        const int64_t i1 = min64(L, i0 + tile);
        build_table<G, BC>(xb, K, cbT, M, C, i0, i0, i1, T.get());
        if (!gather_rows<BC>(T.get(), C, codes, L, i0, i1, r0, r1, s0, acc.get())) {
          __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
          return;
        }
      }
    }
    for (int64_t r = s0; r < s1; ++r) {
      const int64_t col = perm ? perm[r] : r;
      const float add = bias ? bias[col] : 0.0f;
      for (int64_t b = 0; b < Bc; ++b)
        store(a.out.data, a.out.dtype, (b0 + b) * ldo + col, scales[r] * acc.get()[(r - s0) * BC + b] + add);
    }
  });
  return ok != 0;
}

template <int G>
bool matmul_chunk_bc(const CodebookMatmul& a, int64_t b0, int64_t Bc, const float* cbT, const float* xb) {
  if (Bc <= 1) return matmul_chunk<G, 1>(a, b0, Bc, cbT, xb);
  if (Bc <= 2) return matmul_chunk<G, 2>(a, b0, Bc, cbT, xb);
  if (Bc <= 4) return matmul_chunk<G, 4>(a, b0, Bc, cbT, xb);
  if (Bc <= 8) return matmul_chunk<G, 8>(a, b0, Bc, cbT, xb);
  return matmul_chunk<G, 16>(a, b0, Bc, cbT, xb);
}

template <int G>
void dequantize_rows(const CodebookDequantize& a, int64_t r0, int64_t r1, int& ok) {
  const CodebookFormat& w = a.w;
  const int64_t L = w.slots(), M = w.num_codebooks(), C = w.codebook_size(), J = L / M;
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const float* cbs = w.codebooks.ptr<const float>();
  int64_t o = 0;
  while (gp[o + 1] <= r0) ++o;
  for (int64_t r = r0; r < r1; ++r) {
    while (gp[o + 1] <= r) ++o;
    const uint8_t* cr = codes + (r / 16) * L * 16 + r % 16;  // code of slot i: cr[i * 16]
    const float* cb = cbs + o * M * C * G;
    const float s = w.scales.ptr<const float>()[r];
    const int64_t row_out = (r - a.row_begin) * a.out.stride(0);
    for (int64_t j = 0; j < J; ++j) {
      float v[G] = {};
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t code = cr[(j * M + m) * 16];
        if (code >= C) {
          __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
          return;
        }
        const float* word = cb + (m * C + code) * G;
        for (int t = 0; t < G; ++t) v[t] += word[t];
      }
      for (int t = 0; t < G; ++t) store(a.out.data, a.out.dtype, row_out + j * G + t, s * v[t]);
    }
  }
}

}  // namespace

bool codebook_matmul(const CodebookMatmul& a) {
  const CodebookFormat& w = a.w;
  const int64_t B = a.x.size(0), K = w.in_features(), N = w.rows(), M = w.num_codebooks(),
                C = w.codebook_size(), G = w.in_group(), O = w.groups();
  if (B == 0 || N == 0) return true;
  Floats cbT(O * M * G * C), xb(kMaxBatch * K);
  const float* cb = w.codebooks.ptr<const float>();
  for (int64_t om = 0; om < O * M; ++om)  // (O, M, C, G) -> (O, M, G, C)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < G; ++t) cbT.get()[(om * G + t) * C + c] = cb[(om * C + c) * G + t];
  for (int64_t b0 = 0; b0 < B; b0 += kMaxBatch) {
    const int64_t Bc = min64(kMaxBatch, B - b0), BC = Bc <= 1 ? 1 : Bc <= 2 ? 2 : Bc <= 4 ? 4 : Bc <= 8 ? 8 : 16;
    for (int64_t b = 0; b < BC; ++b)  // the chunk in float32, zero rows up to BC
      for (int64_t k = 0; k < K; ++k)
        xb.get()[b * K + k] = b < Bc ? to_f32(a.x.data, a.x.dtype, (b0 + b) * a.x.stride(0) + k) : 0.0f;
    bool ok;
    switch (G) {
      case 1: ok = matmul_chunk_bc<1>(a, b0, Bc, cbT.get(), xb.get()); break;
      case 2: ok = matmul_chunk_bc<2>(a, b0, Bc, cbT.get(), xb.get()); break;
      case 4: ok = matmul_chunk_bc<4>(a, b0, Bc, cbT.get(), xb.get()); break;
      default: ok = matmul_chunk_bc<8>(a, b0, Bc, cbT.get(), xb.get()); break;
    }
    if (!ok) return false;
  }
  return true;
}

bool codebook_dequantize(const CodebookDequantize& a) {
  int ok = 1;
  parallel_for(a.row_end - a.row_begin, 16, a.threads, [&](int64_t s0, int64_t s1) {
    const int64_t r0 = a.row_begin + s0, r1 = a.row_begin + s1;
    switch (a.w.in_group()) {
      case 1: dequantize_rows<1>(a, r0, r1, ok); break;
      case 2: dequantize_rows<2>(a, r0, r1, ok); break;
      case 4: dequantize_rows<4>(a, r0, r1, ok); break;
      default: dequantize_rows<8>(a, r0, r1, ok); break;
    }
  });
  return ok != 0;
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
