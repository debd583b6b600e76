// Which SIMD variant of the kernels runs. Detected once from CPUID (with OS support for the
// register state); HOTOPS_ISA=scalar|avx2|avx512 in the environment, or set_isa(), forces a
// variant so tests can cover every path the machine supports.
#pragma once

namespace hotops {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
Isa best_isa();            // the widest variant this CPU runs and this build contains
Isa active_isa();          // the variant kernels dispatch to now
void set_isa(Isa isa);     // refuses variants the CPU or the build lacks
Isa parse_isa(const char* name);

}  // namespace hotops
