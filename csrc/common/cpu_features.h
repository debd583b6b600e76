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

// AVX512_VBMI (64-lane byte permutes), an extension some avx512 kernels take when it is on: on
// where the CPU has it, unless HOTOPS_VBMI=0 is in the environment; set_vbmi() switches it so
// tests cover those kernels with and without it. It never changes which Isa runs.
bool cpu_has_vbmi();
bool vbmi_enabled();
void set_vbmi(bool on);  // refuses true where the CPU or the build lacks it

}  // namespace hotops
