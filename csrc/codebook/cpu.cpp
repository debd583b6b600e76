// Per-ISA kernels for uint8 codes (see cpu.h). The float tables are in tables.h, the int16 and
// byte-plane tables of the batch-1 path in int16_tables.h, helpers shared with wide.cpp in kernel.h.
//
// matmul: the batch is taken 16 rows at a time (BC = batch rounded up to a power of two <= 16,
// so a table entry for all BC rows is one contiguous run of BC floats, 64 bytes at 16). The work
// is split into kparts ranges of code slots x nparts ranges of row blocks, one task each (split-K
// first: every table is then built once in all, by the one task that uses it). A task, for each
// row group and tile of its slots small enough for L1 (BC = 1) or L2:
//   1. tabulates T[i, c, b] = x[b, group j of slot i] . codebooks[o, m, c],
//   2. adds part[r, b] += T[i, code(r, i), b] over the tile's slots for its rows,
// and a last pass writes y[b, perm[r]] = scales[r] * sum over the kparts partial sums + bias.
// Work per output is one table lookup per code slot instead of in_group multiply-adds per weight;
// the weight is read once as uint8 codes.
//
// At BC = 1 with AVX-512BW the tables are quantized to int16 (one scale per tile, |entry| <= 32767)
// and held in registers: 256 entries = 8 zmm, looked up 32 rows at a time by 4 vpermi2w and 3
// blends on the top index bits, summed exactly in int32 (faiss fast-scan's idea with 16-bit
// entries, so the error stays ~4e-5 of the largest output instead of ~1e-2). With AVX512_VBMI
// (run-time check) the same entries are stored as two byte planes and looked up 64 rows at a time
// by vpermi2b, half the permutes. A tile whose tables are not finite (NaN/Inf in x) takes the
// float path, which propagates them. Every gather prefetches the codes of the blocks it reaches
// next: a tile reads each block's codes as one short run, which hardware prefetchers miss.
#include "codebook/cpu.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "codebook/amx_tiles.h"
#include "codebook/int16_tables.h"
#include "codebook/kernel.h"
#include "codebook/tables.h"
#include "common/cpu_features.h"
#include "common/parallel.h"
#include "common/simd.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace {

using namespace codebook_kernel;

constexpr int kMaxBatch = 16;
#if defined(__AVX512BW__)
constexpr bool kInt16Tables = true;
#else
constexpr bool kInt16Tables = false;
constexpr int64_t kTileI16 = 32;
#endif

// Largest code in codes[0, n): the range check that keeps every table read in bounds.
inline uint8_t max_code(const uint8_t* codes, int64_t n) {
  uint8_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = codes[i] > m ? codes[i] : m;
  return m;
}

// How a chunk of the batch is split into tasks: kparts ranges of slots x nparts of row blocks.
struct Plan {
  int64_t tile, kparts, nparts;
  bool byte_planes;  // BC = 1 on AVX512_VBMI: int16 tables as byte planes (else as int16 or float)
};

template <int BC>
Plan plan(const CodebookFormat& w, int threads) {
  const int64_t C = w.codebook_size(), L = w.slots(), blocks = (w.rows() + RB - 1) / RB;
  Plan p;
  // BC = 1: an L1-sized tile (16 KB float tables, or 32 int16 tables of 256 entries, 16 KB);
  // BC > 1: L2-sized (256 KB), each lookup being a whole vector whose latency the rows overlap.
  p.tile = BC == 1 ? (kInt16Tables ? kTileI16 : max64(1, 4096 / C)) : max64(1, (256 << 10) / (C * BC * 4));
  // At least 2 tiles per part. BC = 1 takes up to 4 parts per thread, claimed as threads come
  // free: a thread held up by another process on its core then takes fewer parts instead of
  // stalling the call (the partial sums are only N floats a part).
  const int64_t per_thread = BC == 1 && threads > 1 ? 4 : 1;
  p.kparts = max64(1, min64(per_thread * threads, L / (2 * p.tile)));
  p.nparts = max64(1, min64(threads / p.kparts, blocks));
  p.byte_planes = BC == 1 && kInt16Tables && feature_on(Feature::vbmi);
  return p;
}

// One task: slots [s_begin, s_end) of the row blocks [blk_begin, blk_end) into part (N', BC),
// which it zeroes first. Returns false on a code >= C.
template <int G, int BC>
bool run_task(const CodebookMatmul& a, const Plan& p, int64_t s_begin, int64_t s_end, int64_t blk_begin,
              int64_t blk_end, const float* cbT_all, const float* xT, float* part) {
  const CodebookFormat& w = a.w;
  const int64_t N = w.rows(), L = w.slots(), M = w.num_codebooks(), C = w.codebook_size();
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  for (int64_t i = blk_begin * RB * BC; i < blk_end * RB * BC; ++i) part[i] = 0.0f;
  const int64_t r_begin = blk_begin * RB, r_end = min64(N, blk_end * RB);
  Scratch<float> T(p.tile * C * BC);
  Scratch<int16_t> Tq(BC == 1 && kInt16Tables ? p.tile * 256 : 1);
  for (int64_t o = 0; o < w.groups(); ++o) {
    const BlockRange rows{max64(gp[o], r_begin), min64(gp[o + 1], r_end)};
    if (rows.r0 >= rows.r1) continue;
    const float* cbT = cbT_all + o * M * G * C;
    for (int64_t i0 = s_begin; i0 < s_end; i0 += p.tile) {
      const int64_t n = min64(s_end, i0 + p.tile) - i0;
      if (C < 256)
        for (int64_t blk = rows.first(); blk < rows.end(); ++blk)
          if (max_code(codes + (blk * L + i0) * RB, n * RB) >= C) return false;
      build_tables<G, BC>(xT, cbT, M, C, i0, i0 + n, T.p);
      if constexpr (BC > 1) {
        gather_vec<BC>(T.p, C, codes, L, i0, n, rows, part);
      } else {
#if defined(__AVX512BW__)
        uint8_t* Tp = reinterpret_cast<uint8_t*>(Tq.p);  // as many bytes as the int16 tables
        const float scale = p.byte_planes ? quantize_planes(T.p, C, n, Tp) : quantize_tables(T.p, C, n, Tq.p);
        if (scale >= 0.0f) {
          if (p.byte_planes)
            gather_planes(Tp, scale, codes, L, i0, n, rows, part);
          else
            gather_i16(Tq.p, scale, codes, L, i0, n, rows, part);
          continue;
        }
#endif
        gather_f32(T.p, C, codes, L, i0, n, rows, part);
      }
    }
  }
  return true;
}

// One chunk of Bc <= BC batch rows starting at b0 (xT: those rows in float32, transposed to
// (K, BC), zeros past Bc).
template <int G, int BC>
bool matmul_chunk(const CodebookMatmul& a, int64_t b0, int64_t Bc, const float* cbT, const float* xT) {
  const CodebookFormat& w = a.w;
  const int64_t N = w.rows(), L = w.slots(), blocks = (N + RB - 1) / RB, padded = blocks * RB * BC;
  const Plan p = plan<BC>(w, a.threads);
  Scratch<float> parts(p.kparts * padded);
  const int64_t* perm = a.perm.present ? a.perm.ptr<const int64_t>() : nullptr;
  const float* bias = a.bias.present ? a.bias.ptr<const float>() : nullptr;
  const float* scales = w.scales.ptr<const float>();
  const int64_t ldo = a.out.stride(0);
  const auto finish = [&] {  // y[b0 + b, perm[r]] = scales[r] * (sum of the kparts partials) + bias
    float* sum = parts.p;
    for (int64_t kp = 1; kp < p.kparts; ++kp)
      for (int64_t i = 0; i < N * BC; ++i) sum[i] += parts.p[kp * padded + i];
    for (int64_t r = 0; r < N; ++r) {
      const int64_t col = perm ? perm[r] : r;
      const float add = bias ? bias[col] : 0.0f;
      for (int64_t b = 0; b < Bc; ++b)
        store(a.out.data, a.out.dtype, (b0 + b) * ldo + col, scales[r] * sum[r * BC + b] + add);
    }
  };
  // One parallel region: the thread that completes the last task writes the output (a few
  // microseconds), so no second fork and join waits for a thread another process holds up.
  int ok = 1;
  const int64_t tasks = p.kparts * p.nparts;
  int64_t done = 0;
  parallel_claim(tasks, a.threads, [&](auto claim) {
    for (int64_t t; (t = claim()) < tasks;) {
      const int64_t kp = t / p.nparts, np = t % p.nparts;
      if (!run_task<G, BC>(a, p, L * kp / p.kparts, L * (kp + 1) / p.kparts, blocks * np / p.nparts,
                           blocks * (np + 1) / p.nparts, cbT, xT, parts.p + kp * padded))
        __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
      // acq_rel: the last one sees every task's partial sums
      if (__atomic_add_fetch(&done, int64_t(1), __ATOMIC_ACQ_REL) == tasks &&
          __atomic_load_n(&ok, __ATOMIC_RELAXED))
        finish();
    }
  });
  return ok != 0;
}

template <int G>
bool matmul_chunk_bc(const CodebookMatmul& a, int64_t b0, int64_t Bc, const float* cbT, const float* xT) {
  if (Bc <= 1) return matmul_chunk<G, 1>(a, b0, Bc, cbT, xT);
  if (Bc <= 2) return matmul_chunk<G, 2>(a, b0, Bc, cbT, xT);
  if (Bc <= 4) return matmul_chunk<G, 4>(a, b0, Bc, cbT, xT);
  if (Bc <= 8) return matmul_chunk<G, 8>(a, b0, Bc, cbT, xT);
  return matmul_chunk<G, 16>(a, b0, Bc, cbT, xT);
}

// Dense rows [r0, r1) of the stored order into a.out (Out: float, or uint16_t bf16 bits through the
// float32 row f32row).
template <int G, typename Out>
void dequantize_rows(const CodebookDequantize& a, int64_t r0, int64_t r1, float* f32row, int& ok) {
  const CodebookFormat& w = a.w;
  const int64_t L = w.slots(), M = w.num_codebooks(), C = w.codebook_size(), J = L / M;
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const float* cbs = w.codebooks.ptr<const float>();
  const float* scales = w.scales.ptr<const float>();
  int64_t o = 0;
  for (int64_t r = r0; r < r1; ++r) {
    while (gp[o + 1] <= r) ++o;
    const uint8_t* cr = codes + (r / RB) * L * RB + r % RB;  // code of slot i: cr[i * RB]
    uint8_t top = 0;
    for (int64_t i = 0; i < L; ++i) top = cr[i * RB] > top ? cr[i * RB] : top;
    if (top >= C) {
      __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
      return;
    }
    const float* cb = cbs + o * M * C * G;
    const float s = scales[r];
    Out* row = static_cast<Out*>(a.out.data) + (r - a.row_begin) * a.out.stride(0);
    float* dense = sizeof(Out) == 4 ? reinterpret_cast<float*>(row) : f32row;
    using V = typename Lanes<G>::type;  // one codeword as one vector
    for (int64_t j = 0; j < J; ++j) {
      V v, u;
      std::memcpy(&v, cb + cr[j * M * RB] * G, sizeof(V));
      for (int64_t m = 1; m < M; ++m) {
        std::memcpy(&u, cb + (m * C + cr[(j * M + m) * RB]) * G, sizeof(V));
        v += u;
      }
      v *= s;
      std::memcpy(dense + j * G, &v, sizeof(V));
    }
    if constexpr (sizeof(Out) == 2) {  // bf16: the row rounded a vector at a time
      const int64_t K = J * G;
      int64_t k = 0;
      for (; k + VecF::W <= K; k += VecF::W) VecF::load(dense + k).store(row + k, DType::bf16);
      for (; k < K; ++k) row[k] = f32_to_bf16(dense[k]);
    }
  }
}

template <int G>
void dequantize_rows(const CodebookDequantize& a, int64_t r0, int64_t r1, int& ok) {
  if (a.out.dtype == DType::f32) {
    dequantize_rows<G, float>(a, r0, r1, nullptr, ok);
  } else {
    Scratch<float> f32row(a.w.in_features());
    dequantize_rows<G, uint16_t>(a, r0, r1, f32row.p, ok);
  }
}

// True when none of v[0, n) is NaN or +-Inf (|v| <= FLT_MAX is false for all three).
inline bool all_finite(const float* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::fabs(v[i]) <= 3.40282347e38f;
  return ok;
}

// Batch row b of y from the dense weight, as F.linear computes it: sum_k x[k] * W[r, k] with
// W[r, k] = scales[r] * sum_m codeword_m[k] (rounded to x's dtype). The tables sum x . codeword
// of each codebook on its own, so with NaN/Inf in x (or in the weight) they can meet inf - inf
// where the dense weight's sum of codewords is finite: such rows take this path, which
// propagates NaN and Inf exactly as the dense product does. Returns false on a code >= C.
bool dense_row(const CodebookMatmul& a, const float* cb, int64_t b) {
  const CodebookFormat& w = a.w;
  const int64_t N = w.rows(), L = w.slots(), M = w.num_codebooks(), C = w.codebook_size(), G = w.in_group(),
                J = L / M;
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const float* scales = w.scales.ptr<const float>();
  const int64_t* perm = a.perm.present ? a.perm.ptr<const int64_t>() : nullptr;
  const float* bias = a.bias.present ? a.bias.ptr<const float>() : nullptr;
  const int64_t xoff = b * a.x.stride(0), ldo = a.out.stride(0);
  int ok = 1;
  parallel_for(N, 16, a.threads, [&](int64_t r0, int64_t r1) {
    int64_t o = 0;
    for (int64_t r = r0; r < r1; ++r) {
      while (gp[o + 1] <= r) ++o;
      const uint8_t* cr = codes + (r / RB) * L * RB + r % RB;  // code of slot i: cr[i * RB]
      float acc = 0.0f;
      for (int64_t j = 0; j < J; ++j) {
        for (int64_t t = 0; t < G; ++t) {
          float wt = 0.0f;
          for (int64_t m = 0; m < M; ++m) {
            const uint8_t code = cr[(j * M + m) * RB];
            if (code >= C) {
              __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
              return;
            }
            wt = m == 0 ? cb[((o * M + m) * C + code) * G + t] : wt + cb[((o * M + m) * C + code) * G + t];
          }
          wt *= scales[r];
          wt = round_to(a.x.dtype, wt);
          acc += to_f32(a.x.data, a.x.dtype, xoff + j * G + t) * wt;
        }
      }
      const int64_t col = perm ? perm[r] : r;
      store(a.out.data, a.out.dtype, b * ldo + col, acc + (bias ? bias[col] : 0.0f));
    }
  });
  return ok != 0;
}

#if defined(__AVX512F__)
// Which bf16 product runs a (amx_tiles.h): bf16 x of 2 rows or more (one row: the int16 tables are
// faster), 4 or 8 inputs per codeword, whole 32-input tiles; AMX tiles where bf16_products() has
// them, vdpbf16ps from vdp_min_batch rows where it has that; else none (the float32 tables).
// vdpbf16ps pads the batch to 16 columns and decodes every weight once per pass, a cost that does
// not shrink with the batch. On Zen 4 that costs what the tables cost at 12 to 16 rows at 4096 x
// 4096 and 11008 x 4096, but less from 2 rows at all-MiniLM-L6-v2's 1536 and 384 rows, where the
// tables' 256 entries per slot are shared by few rows (docs/codebook.md).
inline int64_t vdp_min_batch(int64_t rows) { return rows < 2048 ? 2 : 17; }
Bf16Products bf16_kernel(const CodebookMatmul& a) {
  const int64_t G = a.w.in_group();
  if (a.x.dtype != DType::bf16 || a.x.size(0) < 2 || (G != 4 && G != 8) || a.w.num_codebooks() > 2 ||
      a.w.in_features() % kTileK != 0)
    return Bf16Products::none;
  const Bf16Products p = bf16_products();
  return p == Bf16Products::vdp && a.x.size(0) < vdp_min_batch(a.w.rows()) ? Bf16Products::none : p;
}

// The bf16 product, cb the float32 codebooks; false on a code >= C. Each pass of up to 64 batch
// rows packs x once (NB column tiles); threads claim groups of 4 / NB row blocks.
template <int G, int M, int NB>
bool bf16_pass(const CodebookMatmul& a, const float* cb, int64_t b0, int64_t Bc, uint32_t* xp, bool amx) {
  const CodebookFormat& w = a.w;
  constexpr int64_t R = 4 / NB;
  const int64_t K = w.in_features(), N = w.rows(), L = w.slots(), C = w.codebook_size(),
                blocks = (N + RB - 1) / RB, units = (blocks + R - 1) / R, ldx = a.x.stride(0),
                ldo = a.out.stride(0);
  const auto* codes = w.codes.ptr<const uint8_t>();
  const int64_t* gp = w.group_ptr.ptr<const int64_t>();
  const float* scales = w.scales.ptr<const float>();
  const int64_t* perm = a.perm.present ? a.perm.ptr<const int64_t>() : nullptr;
  const float* bias = a.bias.present ? a.bias.ptr<const float>() : nullptr;
  transpose_pairs(static_cast<const uint16_t*>(a.x.data) + b0 * ldx, ldx, Bc, 16 * NB, K / 2, xp, 16 * NB);
  int ok = 1;
  parallel_claim(units, a.threads, [&](auto claim) {
    Scratch<float> acc(R * kTileRows * kPassRows);
    Scratch<uint16_t> tiles(amx ? 4 * kTileRows * kTileK : kTileRows * K);  // vdp: a block's rows, whole
    const float* cbr[R * kTileRows];
    const uint8_t* bcodes[R];
    AmxScope scope(amx);
    for (int64_t u; (u = claim()) < units;) {
      const int64_t blk0 = u * R, rb = min64(R, blocks - blk0);
      int64_t o = 0;
      for (int64_t r = 0; r < rb; ++r) {
        bcodes[r] = codes + (blk0 + r) * L * RB;
        if (C < 256 && max_code(bcodes[r], L * RB) >= C) {
          __atomic_store_n(&ok, 0, __ATOMIC_RELAXED);
          return;
        }
        for (int64_t t = 0; t < kTileRows; ++t) {  // rows past N (the last block's padding) reuse row N - 1's
          const int64_t row = min64((blk0 + r) * RB + t, N - 1);
          while (gp[o + 1] <= row) ++o;
          cbr[r * kTileRows + t] = cb + o * M * C * G;
        }
      }
      if (amx)
        blocks_product<G, M, NB>(cbr, bcodes, rb, C, K, xp, 16 * NB, tiles.p, acc.p);
      else
        dot_blocks_product<G, M, NB>(cbr, bcodes, rb, C, K, xp, 16 * NB, tiles.p, acc.p);
      for (int64_t r = 0; r < rb; ++r) {
        const int64_t row0 = (blk0 + r) * RB;
        write_block(acc.p + r * kTileRows * kPassRows, min64(kTileRows, N - row0), Bc, row0, scales, perm,
                    bias, static_cast<uint16_t*>(a.out.data) + b0 * ldo, ldo);
      }
    }
  });
  return ok != 0;
}

template <int G, int M>
bool bf16_matmul(const CodebookMatmul& a, const float* cb, bool amx) {
  const int64_t B = a.x.size(0);
  Scratch<uint32_t> xp(a.w.in_features() / 2 * kPassRows);
  for (int64_t b0 = 0; b0 < B; b0 += kPassRows) {
    const int64_t Bc = min64(kPassRows, B - b0);
    const bool ok = Bc <= 16   ? bf16_pass<G, M, 1>(a, cb, b0, Bc, xp.p, amx)
                    : Bc <= 32 ? bf16_pass<G, M, 2>(a, cb, b0, Bc, xp.p, amx)
                               : bf16_pass<G, M, 4>(a, cb, b0, Bc, xp.p, amx);
    if (!ok) return false;
  }
  return true;
}
#endif

// The whole product; false on a code >= C.
bool matmul(const CodebookMatmul& a) {
  const CodebookFormat& w = a.w;
  const int64_t B = a.x.size(0), K = w.in_features(), N = w.rows(), M = w.num_codebooks(),
                C = w.codebook_size(), G = w.in_group(), O = w.groups();
  if (B == 0 || N == 0) return true;
  const float* cb = w.codebooks.ptr<const float>();
  if (!all_finite(cb, O * M * C * G) || !all_finite(w.scales.ptr<const float>(), N)) {
    for (int64_t b = 0; b < B; ++b)  // NaN/Inf in the weight: every row from the dense weight
      if (!dense_row(a, cb, b)) return false;
    return true;
  }
#if defined(__AVX512F__)
  if (const Bf16Products k = bf16_kernel(a); k != Bf16Products::none) {
    const bool amx = k == Bf16Products::amx;
    if (G == 4) return M == 1 ? bf16_matmul<4, 1>(a, cb, amx) : bf16_matmul<4, 2>(a, cb, amx);
    return M == 1 ? bf16_matmul<8, 1>(a, cb, amx) : bf16_matmul<8, 2>(a, cb, amx);
  }
#endif
  Scratch<float> cbT(O * M * G * C), xT(K * kMaxBatch);
  for (int64_t om = 0; om < O * M; ++om)  // (O, M, C, G) -> (O, M, G, C)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < G; ++t) cbT.p[(om * G + t) * C + c] = cb[(om * C + c) * G + t];
  for (int64_t b0 = 0; b0 < B; b0 += kMaxBatch) {
    const int64_t Bc = min64(kMaxBatch, B - b0), BC = Bc <= 1   ? 1
                                                      : Bc <= 2 ? 2
                                                      : Bc <= 4 ? 4
                                                      : Bc <= 8 ? 8
                                                                : 16;
    for (int64_t b = 0; b < BC; ++b)  // the chunk in float32, (K, BC), zeros past Bc
      for (int64_t k = 0; k < K; ++k)
        xT.p[k * BC + b] = b < Bc ? to_f32(a.x.data, a.x.dtype, (b0 + b) * a.x.stride(0) + k) : 0.0f;
    bool ok;
    switch (G) {
      case 1:
        ok = matmul_chunk_bc<1>(a, b0, Bc, cbT.p, xT.p);
        break;
      case 2:
        ok = matmul_chunk_bc<2>(a, b0, Bc, cbT.p, xT.p);
        break;
      case 4:
        ok = matmul_chunk_bc<4>(a, b0, Bc, cbT.p, xT.p);
        break;
      default:
        ok = matmul_chunk_bc<8>(a, b0, Bc, cbT.p, xT.p);
        break;
    }
    if (!ok) return false;
    for (int64_t b = 0; b < Bc; ++b) {  // rows of x holding NaN/Inf: again, from the dense weight
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) finite &= std::fabs(xT.p[k * BC + b]) <= 3.40282347e38f;
      if (!finite && !dense_row(a, cb, b0 + b)) return false;
    }
  }
  return true;
}

// The rows of a; false on a code >= C.
bool dequantize(const CodebookDequantize& a) {
  int ok = 1;
  parallel_for(a.row_end - a.row_begin, 16, a.threads, [&](int64_t s0, int64_t s1) {
    const int64_t r0 = a.row_begin + s0, r1 = a.row_begin + s1;
    switch (a.w.in_group()) {
      case 1:
        dequantize_rows<1>(a, r0, r1, ok);
        break;
      case 2:
        dequantize_rows<2>(a, r0, r1, ok);
        break;
      case 4:
        dequantize_rows<4>(a, r0, r1, ok);
        break;
      default:
        dequantize_rows<8>(a, r0, r1, ok);
        break;
    }
  });
  return ok != 0;
}

}  // namespace

void codebook_matmul(const CodebookMatmul& a) {
  if (!matmul(a)) refuse_codes(a.w.codebook_size());
}

void codebook_dequantize(const CodebookDequantize& a) {
  if (!dequantize(a)) refuse_codes(a.w.codebook_size());
}

}  // namespace HOTOPS_ISA
}  // namespace hotops
