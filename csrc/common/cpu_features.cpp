#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace hotops {
namespace {

bool cpu_runs(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512:
#if HOTOPS_HAVE_AVX512
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
      return false;
#endif
    case Isa::avx2:
#if HOTOPS_HAVE_AVX2
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
#else
      return false;
#endif
    case Isa::scalar:
      return true;
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

Isa initial_isa() {
  if (const char* forced = std::getenv("HOTOPS_ISA")) {
    if (*forced) {
      Isa isa = parse_isa(forced);
      if (cpu_runs(isa)) return isa;
    }
  }
  return best_isa();
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa parse_isa(const char* name) {
  if (std::strcmp(name, "avx512") == 0) return Isa::avx512;
  if (std::strcmp(name, "avx2") == 0) return Isa::avx2;
  if (std::strcmp(name, "scalar") == 0) return Isa::scalar;
  fail("unknown ISA '", name, "': expected scalar, avx2 or avx512");
}

Isa best_isa() {
  if (cpu_runs(Isa::avx512)) return Isa::avx512;
  if (cpu_runs(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  HOTOPS_CHECK(cpu_runs(isa), "this CPU or build cannot run the ", isa_name(isa),
               " kernels; best available is ", isa_name(best_isa()));
  current().store(static_cast<int>(isa));
}

namespace {

std::atomic<bool>& vbmi_on() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("HOTOPS_VBMI");
    return cpu_has_vbmi() && !(env && std::strcmp(env, "0") == 0);
  }()};
  return on;
}

}  // namespace

bool cpu_has_vbmi() {
#if (defined(__x86_64__) || defined(_M_X64)) && HOTOPS_HAVE_AVX512
  __builtin_cpu_init();
  return cpu_runs(Isa::avx512) && __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

bool vbmi_enabled() { return vbmi_on().load(std::memory_order_relaxed); }

void set_vbmi(bool on) {
  HOTOPS_CHECK(!on || cpu_has_vbmi(), "this CPU or build has no AVX512_VBMI");
  vbmi_on().store(on);
}

}  // namespace hotops
