#include "common/cpu_features.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

constexpr const char* kFeatureNames[kFeatureCount] = {"vbmi", "avx512_bf16", "avx512_fp16", "amx_bf16"};

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
// Linux enables AMX tile data per process: ask once (arch_prctl ARCH_REQ_XCOMP_PERM, feature 18).
bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool amx_permitted() { return false; }
#endif

bool detect(Feature f) {
#if (defined(__x86_64__) || defined(_M_X64)) && HOTOPS_HAVE_AVX512
  if (!cpu_runs(Isa::avx512)) return false;
  switch (f) {
    case Feature::vbmi:
      return __builtin_cpu_supports("avx512vbmi");
    case Feature::avx512_bf16:
      return __builtin_cpu_supports("avx512bf16");
    case Feature::avx512_fp16:
      return __builtin_cpu_supports("avx512fp16");
    case Feature::amx_bf16:
      return __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile") && amx_permitted();
  }
#else
  (void)f;
#endif
  return false;
}

struct FeatureState {
  bool has[kFeatureCount];
  std::atomic<bool> on[kFeatureCount];
  FeatureState() {
    for (int i = 0; i < kFeatureCount; ++i) {
      has[i] = detect(static_cast<Feature>(i));
      std::string env = "HOTOPS_";
      for (const char* c = kFeatureNames[i]; *c; ++c) env += static_cast<char>(std::toupper(*c));
      const char* value = std::getenv(env.c_str());
      on[i] = has[i] && !(value && std::strcmp(value, "0") == 0);
    }
  }
};

FeatureState& features() {
  static FeatureState state;
  return state;
}

}  // namespace

const char* feature_name(Feature f) { return kFeatureNames[static_cast<int>(f)]; }

Feature parse_feature(const char* name) {
  for (int i = 0; i < kFeatureCount; ++i)
    if (std::strcmp(name, kFeatureNames[i]) == 0) return static_cast<Feature>(i);
  fail("unknown CPU feature '", name, "': expected vbmi, avx512_bf16, avx512_fp16 or amx_bf16");
}

bool cpu_has(Feature f) { return features().has[static_cast<int>(f)]; }

bool feature_on(Feature f) { return features().on[static_cast<int>(f)].load(std::memory_order_relaxed); }

void set_feature(Feature f, bool on) {
  HOTOPS_CHECK(!on || cpu_has(f), "this CPU, OS or build has no ", feature_name(f));
  features().on[static_cast<int>(f)].store(on);
}

}  // namespace hotops
