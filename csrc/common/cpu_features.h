// Which SIMD variant of the kernels runs. Detected once from CPUID (with OS support for the
// register state); HOTOPS_ISA=scalar|avx2|avx512 in the environment, or set_isa(), forces a
// variant so tests can cover every path the machine supports.
#pragma once

namespace hotops {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
Isa best_isa();         // the widest variant this CPU runs and this build contains
Isa active_isa();       // the variant kernels dispatch to now
void set_isa(Isa isa);  // refuses variants the CPU or the build lacks
Isa parse_isa(const char* name);

// Instruction-set extensions some avx512 kernels take when they are on (they never change which
// Isa runs): AVX512_VBMI (64-lane byte permutes), AVX512_BF16 (vdpbf16ps), AVX512_FP16 and AMX
// tiles (AMX-BF16; on Linux the tile-data permission is requested once, at detection). Each is on
// where the CPU, the OS and the build have it, unless HOTOPS_<NAME>=0 (HOTOPS_VBMI=0,
// HOTOPS_AVX512_BF16=0, ...) is in the environment; set_feature() switches it so tests cover the
// kernels with and without it.
//
// fast_bf16_dot is a rate, not an extension: the CPU has AVX512_BF16 (cpu_has), and vdpbf16ps
// was measured at detection to issue at float32 FMA's rate, so it does twice the products per
// cycle (Zen 4: yes; Sapphire Rapids: it issues on one port, FMA on two). Kernels whose bf16
// products only pay at that rate consult it; set_feature() may force it on for tests.
enum class Feature { vbmi = 0, avx512_bf16 = 1, avx512_fp16 = 2, amx_bf16 = 3, fast_bf16_dot = 4 };
constexpr int kFeatureCount = 5;

const char* feature_name(Feature f);  // "vbmi", "avx512_bf16", "avx512_fp16", "amx_bf16", "fast_bf16_dot"
Feature parse_feature(const char* name);
bool cpu_has(Feature f);               // the CPU, the OS and this build support it
bool feature_on(Feature f);            // kernels may use it now
void set_feature(Feature f, bool on);  // refuses true where cpu_has(f) is false

// Where bf16 products run now (avx512 kernels): AMX tiles (amx_bf16 and avx512_bf16 on),
// vdpbf16ps alone (avx512_bf16 and fast_bf16_dot on), or none (the inputs go to float32). A
// kernel reads it once per call, so all of its threads take one path.
enum class Bf16Products { none, amx, vdp };
Bf16Products bf16_products();

}  // namespace hotops
