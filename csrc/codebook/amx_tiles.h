// bfloat16 activations in bf16 (cpu.cpp's AVX-512 build): y^T = W x^T with the weight decoded into
// bf16 rows and x^T pair-packed once per pass of up to 64 batch rows. On AMX tiles (amx_bf16 and
// avx512_bf16 on) the weight is decoded 16 rows x 32 inputs at a time into A tiles multiplied by
// tdpbf16ps; the four float32 C tiles hold 4 row blocks x 16 batch columns, 2 x 32 or 1 x 64
// (NB = 1, 2, 4 column tiles). On vdpbf16ps alone (fast_bf16_dot) a block's rows are decoded whole
// (dot_blocks_product).
//
// A row's codewords are summed in float32 and rounded to bf16 once, as torch's bf16 layer holds
// its weight; the per-row scale multiplies the float32 result. The tables (tables.h) cost a lookup
// per code and batch row; the decode costs M codeword loads per input group and row block, once
// per pass, whatever the batch, so it wins from a few rows up (cpu.cpp: bf16_kernel). x is
// multiplied as in F.linear (no per-codebook sums of x . codeword), so NaN and Inf in x propagate
// as in the dense product without the tables' second path.
#pragma once
#if defined(__AVX512F__)
#include <cstring>

#include "codebook/kernel.h"
#include "common/amx.h"

namespace hotops {
namespace HOTOPS_ISA {
namespace codebook_kernel {

constexpr int64_t kTileK = 32;     // inputs per A tile: 16 bf16 pairs, 64 bytes a row
constexpr int64_t kTileRows = 16;  // weight rows per A tile: one block of codes (kRowBlock)
constexpr int64_t kPassRows = 64;  // batch rows per pass: four 16-column C tiles

// The A tile of inputs [32 kt, 32 kt + 32) of one row block: tile[t * ldt + i] = bf16(sum_m codeword) for
// its 16 rows t, whose codebooks start at cb[t] (the row's group) and whose codes are the block's
// (codes[i * 16 + t] for slot i), with G = 8 or 4 inputs per codeword and M = 1 or 2 codebooks.
// A codeword is one ymm or xmm load and a row's 32 inputs are assembled in registers (a row
// written in pieces and read back whole stalls on store forwarding: 4x slower).
template <int G, int M>
HOTOPS_BF16 inline void decode_tile(const float* const* cb, const uint8_t* codes, int64_t kt, int64_t C,
                                    uint16_t* tile, int64_t ldt = kTileK) {
  static_assert(G == 4 || G == 8, "AMX decode: 4 or 8 inputs per codeword");
  static_assert(M == 1 || M == 2, "one or two codebooks");
  constexpr int64_t J = kTileK / G, R = kTileRows;  // input groups per tile; code stride of a slot
  const uint8_t* s0 = codes + kt * J * M * R;
  for (int64_t t = 0; t < R; ++t) {
    const float* c0 = cb[t];
    const float* c1 = c0 + C * G;  // the second codebook (M = 2)
    const uint8_t* s = s0 + t;
    // codeword sum of input group j of the tile, as one vector
    const auto group = [&](int64_t j) {
      const uint8_t* sj = s + j * M * R;
      if constexpr (G == 8) {
        const __m256 v = _mm256_loadu_ps(c0 + sj[0] * 8);
        return M == 2 ? _mm256_add_ps(v, _mm256_loadu_ps(c1 + sj[R] * 8)) : v;
      } else {
        const __m128 v = _mm_loadu_ps(c0 + sj[0] * 4);
        return M == 2 ? _mm_add_ps(v, _mm_loadu_ps(c1 + sj[R] * 4)) : v;
      }
    };
    __m512 lo, hi;  // inputs [0, 16) and [16, 32)
    if constexpr (G == 8) {
      lo = _mm512_insertf32x8(_mm512_castps256_ps512(group(0)), group(1), 1);
      hi = _mm512_insertf32x8(_mm512_castps256_ps512(group(2)), group(3), 1);
    } else {
      lo = _mm512_insertf32x4(
          _mm512_insertf32x4(_mm512_insertf32x4(_mm512_castps128_ps512(group(0)), group(1), 1), group(2), 2),
          group(3), 3);
      hi = _mm512_insertf32x4(
          _mm512_insertf32x4(_mm512_insertf32x4(_mm512_castps128_ps512(group(4)), group(5), 1), group(6), 2),
          group(7), 3);
    }
    _mm512_storeu_si512(tile + t * ldt, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// The tile products of one round: S = NB k-tiles x R = 4 / NB row blocks, whose A tiles are
// decoded first (a[s * R + r]) and only then loaded: a tile load waits for the stores before it to
// drain, so loading four tiles after four decodes stalls once, not four times (1.9 -> 1.5 ms for
// 4096 x 4096 on one thread). C tile r * NB + v accumulates block r x batch columns [16 v, 16 v + 16);
// blocks r >= rb are not there. b: the B tiles of the round's first k-tile (row stride sb bytes,
// kTileK / 2 pair rows per k-tile).
template <int NB>
HOTOPS_AMX inline void round_products(const uint16_t* a, int64_t steps, int64_t rb, const uint32_t* b,
                                      int64_t ld) {
  constexpr int64_t R = 4 / NB, sa = kTileK * 2;
  const int64_t sb = ld * 4;
  for (int64_t s = 0; s < steps; ++s, b += kTileK / 2 * ld) {
    const uint16_t* as = a + s * R * kTileRows * kTileK;
    if constexpr (NB == 1) {  // four blocks x one column tile
      _tile_loadd(5, b, sb);
      _tile_loadd(4, as, sa);
      _tile_dpbf16ps(0, 4, 5);
      if (rb > 1) {
        _tile_loadd(4, as + kTileRows * kTileK, sa);
        _tile_dpbf16ps(1, 4, 5);
      }
      if (rb > 2) {
        _tile_loadd(4, as + 2 * kTileRows * kTileK, sa);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (rb > 3) {
        _tile_loadd(4, as + 3 * kTileRows * kTileK, sa);
        _tile_dpbf16ps(3, 4, 5);
      }
    } else if constexpr (NB == 2) {  // two blocks x two column tiles
      _tile_loadd(5, b, sb);
      _tile_loadd(6, b + 16, sb);
      _tile_loadd(4, as, sa);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      if (rb > 1) {
        _tile_loadd(4, as + kTileRows * kTileK, sa);
        _tile_dpbf16ps(2, 4, 5);
        _tile_dpbf16ps(3, 4, 6);
      }
    } else {  // one block x four column tiles
      _tile_loadd(4, as, sa);
      _tile_loadd(5, b, sb);
      _tile_loadd(6, b + 16, sb);
      _tile_loadd(7, b + 32, sb);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b + 48, sb);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
}

// acc[(r * 16 + t) * 64 + b] = sum_k W[t][k] x[b][k] for the rows t of rb <= R = 4 / NB row blocks
// r (cb: 16 R row codebook pointers, codes[r]: block r's codes, as in decode_tile) and the batch
// columns of NB B tiles (xp from transpose_pairs, ld = 16 NB). K a multiple of 32; the tile
// configuration (common/amx.h) is loaded. tiles: 4 x 16 x 32 bf16.
template <int G, int M, int NB>
HOTOPS_AMX void blocks_product(const float* const* cb, const uint8_t* const* codes, int64_t rb, int64_t C,
                               int64_t K, const uint32_t* xp, int64_t ld, uint16_t* tiles, float* acc) {
  constexpr int64_t R = 4 / NB, S = NB, tile = kTileRows * kTileK;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t KT = K / kTileK;
  for (int64_t kt = 0; kt < KT; kt += S) {
    const int64_t steps = KT - kt < S ? KT - kt : S;
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t r = 0; r < rb; ++r)
        decode_tile<G, M>(cb + r * kTileRows, codes[r], kt + s, C, tiles + (s * R + r) * tile);
    round_products<NB>(tiles, steps, rb, xp + kt * (kTileK / 2) * ld, ld);
  }
  constexpr int64_t sc = kPassRows * 4;  // acc's row stride in bytes
  _tile_stored(0, acc, sc);
  if constexpr (NB == 1) {
    _tile_stored(1, acc + 16 * kPassRows, sc);
    _tile_stored(2, acc + 32 * kPassRows, sc);
    _tile_stored(3, acc + 48 * kPassRows, sc);
  } else if constexpr (NB == 2) {
    _tile_stored(1, acc + 16, sc);
    _tile_stored(2, acc + 16 * kPassRows, sc);
    _tile_stored(3, acc + 16 * kPassRows + 16, sc);
  } else {
    _tile_stored(1, acc + 16, sc);
    _tile_stored(2, acc + 32, sc);
    _tile_stored(3, acc + 48, sc);
  }
}

// blocks_product() on vdpbf16ps (where fast_bf16_dot: no AMX, the instruction at FMA's rate): each
// row block's 16 rows are decoded whole (wrows: 16 x K bf16) and multiplied by x^T in one
// vdp_product. Same acc layout and rounding as the tiles.
template <int G, int M, int NB>
HOTOPS_BF16 void dot_blocks_product(const float* const* cb, const uint8_t* const* codes, int64_t rb,
                                    int64_t C, int64_t K, const uint32_t* xp, int64_t ld, uint16_t* wrows,
                                    float* acc) {
  float* crow[kTileRows];
  for (int64_t r = 0; r < rb; ++r) {
    for (int64_t kt = 0; kt < K / kTileK; ++kt)
      decode_tile<G, M>(cb + r * kTileRows, codes[r], kt, C, wrows + kt * kTileK, K);
    for (int64_t t = 0; t < kTileRows; ++t) crow[t] = acc + (r * kTileRows + t) * kPassRows;
    vdp_product<false>(kTileRows, reinterpret_cast<const uint32_t*>(wrows), K / 2, xp, ld, crow, 16 * NB,
                       K / 2);
  }
}

// out[b][col(row0 + t)] = bf16(scale[row0 + t] * acc[t * 64 + b] + bias[col]) for the n <= 16 rows
// of one block and batch rows b < Bc (out: bf16, row stride ldo); col = perm[row] (or the row).
// A gather reads one batch column of the block's 16 rows, so each batch row gets 16 outputs from
// one vector: one 32-byte store where the columns run in order, else 16 two-byte stores.
HOTOPS_BF16 inline void write_block(const float* acc, int64_t n, int64_t Bc, int64_t row0,
                                    const float* scales, const int64_t* perm, const float* bias,
                                    uint16_t* out, int64_t ldo) {
  const __mmask16 live = static_cast<__mmask16>((1u << n) - 1u);
  const __m512i cols_of_acc = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(kPassRows));
  int64_t col[16];
  bool in_order = n == 16;
  float add[16] = {};
  for (int64_t t = 0; t < n; ++t) {
    col[t] = perm ? perm[row0 + t] : row0 + t;
    in_order &= col[t] == col[0] + t;
    add[t] = bias ? bias[col[t]] : 0.0f;
  }
  const __m512 scale = _mm512_maskz_loadu_ps(live, scales + row0), shift = _mm512_loadu_ps(add);
  for (int64_t b = 0; b < Bc; ++b) {
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, cols_of_acc, acc + b, 4);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(v, scale, shift));
    uint16_t* o = out + b * ldo;
    if (in_order) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + col[0]), h);
    } else {
      alignas(32) uint16_t lanes[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), h);
      for (int64_t t = 0; t < n; ++t) o[col[t]] = lanes[t];
    }
  }
}

}  // namespace codebook_kernel
}  // namespace HOTOPS_ISA
}  // namespace hotops

#endif  // __AVX512F__
