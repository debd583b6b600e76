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
