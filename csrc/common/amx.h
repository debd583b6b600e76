// AVX512_BF16 and AMX-BF16 for the avx512 build's kernels: the function attributes that enable them
// (the TU is compiled for AVX-512 only; these run where feature_on() says so) and the AMX tile
// configuration the kernels share.
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

#define HOTOPS_BF16 __attribute__((target("avx512bf16,avx512bw,avx512vl,avx512f")))
#define HOTOPS_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512bw,avx512vl,avx512f")))

namespace hotops {
namespace HOTOPS_ISA {

// The bf16 pairs (32-bit words) of rows [0, live) of a row-major bf16 matrix x (row stride ldx
// elements), transposed into the layout of a tile's B operand: out[k2 * ldo + r] = (x[r][2 k2],
// x[r][2 k2 + 1]) for k2 < pairs and r < R (a multiple of 16), zero for rows from live on. One
// masked 16-row gather per 16 rows and pair; 16 * ldx must fit in int32.
HOTOPS_BF16 inline void transpose_pairs(const uint16_t* x, int64_t ldx, int64_t live, int64_t R,
                                        int64_t pairs, uint32_t* out, int64_t ldo) {
  const __m512i rows =
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_epi32(static_cast<int>(ldx)));  // in bf16 elements
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const int64_t n = live - r0 <= 0 ? 0 : live - r0 >= 16 ? 16 : live - r0;
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    for (int64_t k2 = 0; k2 < pairs; ++k2)
      _mm512_storeu_si512(out + k2 * ldo + r0, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows,
                                                                           x + r0 * ldx + 2 * k2, 2));
  }
}

// All eight tiles 16 rows x 64 bytes: C is 16 x 16 float32, A 16 rows x 16 bf16 pairs, B 16 pair
// rows x 16 columns (tdpbf16ps: C[i][j] += sum_k A[i][2k, 2k+1] . B[k][j][0, 1]).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Loaded by each thread before its first tile instruction, released after its last.
HOTOPS_AMX inline void amx_begin() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}
HOTOPS_AMX inline void amx_end() { _tile_release(); }

// The tile configuration for one thread's scope (released on the way out, exceptions included).
struct AmxScope {
  explicit AmxScope(bool on = true) : on_(on) {
    if (on_) amx_begin();
  }
  ~AmxScope() {
    if (on_) amx_end();
  }
  AmxScope(const AmxScope&) = delete;
  AmxScope& operator=(const AmxScope&) = delete;

 private:
  bool on_;
};

}  // namespace HOTOPS_ISA
}  // namespace hotops

#endif  // __AVX512F__
