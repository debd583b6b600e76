// Float lookup tables of the uint8-code kernel (cpu.cpp), per ISA: building T[i, c, b] =
// x[b, group of slot i] . codeword c for a tile of slots, and the gathers that add the entries the
// codes address into the rows' partial sums (GEMV: BC = 1, one float per entry; GEMM: BC batch rows
// per entry, one vector). Included by cpu.cpp alone.
#pragma once
#include <cstdint>
#include <cstring>

#include "codebook/cpu.h"
#include "codebook/kernel.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace codebook_kernel {

constexpr int64_t RB = kRowBlock;

// The rows [r0, r1) of one row group, seen block by block: lanes [lo, hi) of block blk.
struct BlockRange {
  int64_t r0, r1;
  int64_t first() const { return r0 / RB; }
  int64_t end() const { return (r1 + RB - 1) / RB; }
  int lo(int64_t blk) const { return static_cast<int>(max64(r0, blk * RB) - blk * RB); }
  int hi(int64_t blk) const { return static_cast<int>(min64(r1, blk * RB + RB) - blk * RB); }
};

// BC floats as NV vectors of VW lanes.
template <int BC>
struct Batch {
  static constexpr int VW = BC < VecF::W ? BC : VecF::W, NV = BC / VW;
  using V = typename Lanes<VW>::type;
};

// T[((i - i0) * C + c) * BC + b] for slots [i0, i1). xT is the chunk (K, BC) float32; cbT is the
// row group's (M, G, C) codewords, transposed so that the BC = 1 loop runs over c.
template <int G, int BC>
inline void build_tables(const float* xT, const float* cbT, int64_t M, int64_t C, int64_t i0, int64_t i1,
                         float* T) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t j = i / M, m = i % M;
    const float* cb = cbT + m * G * C;
    float* Ti = T + (i - i0) * C * BC;
    if constexpr (BC == 1) {  // vectorised over the codewords, 64 sums at a time in registers
      constexpr int64_t CW = 64;
      int64_t c = 0;
      for (; c + CW <= C; c += CW) {
        float s[CW] = {};
        for (int t = 0; t < G; ++t)
          for (int64_t k = 0; k < CW; ++k) s[k] += xT[j * G + t] * cb[t * C + c + k];
        std::memcpy(Ti + c, s, sizeof(s));
      }
      for (; c < C; ++c) {
        float s = 0.0f;
        for (int t = 0; t < G; ++t) s += xT[j * G + t] * cb[t * C + c];
        Ti[c] = s;
      }
    } else {  // vectorised over the batch: one FMA with a broadcast codeword per (c, t, vector)
      using B = Batch<BC>;
      typename B::V xv[G][B::NV];
      for (int t = 0; t < G; ++t)
        for (int v = 0; v < B::NV; ++v)
          std::memcpy(&xv[t][v], xT + (j * G + t) * BC + v * B::VW, sizeof(typename B::V));
      for (int64_t c = 0; c < C; ++c) {
        typename B::V s[B::NV] = {};
        for (int t = 0; t < G; ++t)
          for (int v = 0; v < B::NV; ++v) s[v] += xv[t][v] * cb[t * C + c];
        std::memcpy(Ti + c * BC, s, sizeof(s));
      }
    }
  }
}

// Prefetches the codes of block blk + kAhead at the tile's slots [i0, i0 + n), if in `rows`: the
// hardware prefetchers miss runs this short (n * RB bytes a block, L * RB apart), and the gathers
// stalled on them (the tall Llama shapes ran at half the rate of 4096 x 4096).
constexpr int64_t kAhead = 4;
inline void prefetch_ahead(const uint8_t* codes, int64_t L, int64_t i0, int64_t n, int64_t blk,
                           BlockRange rows) {
  if (blk + kAhead >= rows.end()) return;
  const uint8_t* p = codes + ((blk + kAhead) * L + i0) * RB;
  for (int64_t off = 0; off < n * RB; off += 64) __builtin_prefetch(p + off);
}

// part[r] += sum over n slots of T[i, code(r, i)] for the rows `rows` (BC = 1, float tables).
inline void gather_f32(const float* T, int64_t C, const uint8_t* codes, int64_t L, int64_t i0, int64_t n,
                       BlockRange rows, float* part) {
  for (int64_t blk = rows.first(); blk < rows.end(); ++blk) {
    prefetch_ahead(codes, L, i0, n, blk, rows);
    const uint8_t* cb = codes + (blk * L + i0) * RB;
    float s[RB] = {};  // 16 independent sums of plain loads: on Zen 4 faster than vgatherdps
    for (int64_t i = 0; i < n; ++i)
      for (int l = 0; l < RB; ++l) s[l] += T[i * C + cb[i * RB + l]];
    for (int l = rows.lo(blk); l < rows.hi(blk); ++l) part[blk * RB + l] += s[l];
  }
}

// R rows at once (independent sums, so the table loads overlap), BC floats per table entry.
template <int BC, int R>
inline void gather_rows(const float* T, int64_t C, const uint8_t* cb, int64_t n, float* part) {
  constexpr int NV = Batch<BC>::NV;
  using V = typename Batch<BC>::V;
  V s[R][NV];
  for (int k = 0; k < R; ++k)
    for (int v = 0; v < NV; ++v) s[k][v] = reinterpret_cast<const V*>(part + k * BC)[v];
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < R; ++k) {
      const V* t = reinterpret_cast<const V*>(T + (i * C + cb[i * RB + k]) * BC);
      for (int v = 0; v < NV; ++v) s[k][v] += t[v];
    }
  for (int k = 0; k < R; ++k)
    for (int v = 0; v < NV; ++v) reinterpret_cast<V*>(part + k * BC)[v] = s[k][v];
}

// part[r, :] += sum over n slots of T[i, code(r, i), :] for the rows `rows` (BC > 1).
template <int BC>
inline void gather_vec(const float* T, int64_t C, const uint8_t* codes, int64_t L, int64_t i0, int64_t n,
                       BlockRange rows, float* part) {
  constexpr int R = BC > VecF::W ? 4 : 8;  // accumulators in registers: R x (BC / W) vectors
  for (int64_t blk = rows.first(); blk < rows.end(); ++blk) {
    prefetch_ahead(codes, L, i0, n, blk, rows);
    const uint8_t* cb = codes + (blk * L + i0) * RB;
    int l = rows.lo(blk);
    const int hi = rows.hi(blk);
    for (; l + R <= hi; l += R) gather_rows<BC, R>(T, C, cb + l, n, part + (blk * RB + l) * BC);
    for (; l < hi; ++l) gather_rows<BC, 1>(T, C, cb + l, n, part + (blk * RB + l) * BC);
  }
}

}  // namespace codebook_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops
