#include "common/cpu_features.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
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

// HOTOPS_ISA (any case, whitespace ignored) forces a variant; one this CPU or build cannot
// run, or a name that is none, is an error at every kernel call, not a silent fallback.
Isa initial_isa() {
  const char* forced = std::getenv("HOTOPS_ISA");
  std::string name;
  for (const char* c = forced ? forced : ""; *c; ++c)
    if (!std::isspace(static_cast<unsigned char>(*c))) name += static_cast<char>(std::tolower(*c));
  if (name.empty()) return best_isa();
  HOTOPS_CHECK(name == "scalar" || name == "avx2" || name == "avx512", "HOTOPS_ISA='", forced,
               "' names no ISA: expected scalar, avx2 or avx512 (or unset: the best this CPU runs)");
  const Isa isa = parse_isa(name.c_str());
  HOTOPS_CHECK(cpu_runs(isa), "HOTOPS_ISA=", name, ": this CPU or build cannot run the ", name,
               " kernels; best available is ", isa_name(best_isa()));
  return isa;
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

constexpr const char* kFeatureNames[kFeatureCount] = {"vbmi", "avx512_bf16", "avx512_fp16", "amx_bf16",
                                                      "fast_bf16_dot"};

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
// Linux enables AMX tile data per process: ask once (arch_prctl ARCH_REQ_XCOMP_PERM, feature 18).
bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool amx_permitted() { return false; }
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && HOTOPS_HAVE_AVX512
// Seconds for `rounds` x 12 independent vdpbf16ps (bf16) or vfmadd231ps (float32), 512-bit: twelve
// chains cover either instruction's latency, so the time is its issue rate.
#define HOTOPS_X12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define HOTOPS_ACC(i) __m512 a##i = _mm512_set1_ps(static_cast<float>(i));
#define HOTOPS_SUM(i) s = _mm512_add_ps(s, a##i);
template <bool BF16>
__attribute__((target("avx512bf16,avx512bw,avx512vl,avx512f,fma"), noinline)) double issue_time(int rounds) {
  HOTOPS_X12(HOTOPS_ACC)
  const __m512i one = _mm512_set1_epi32(0x3f803f80);  // a pair of bf16 ones
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < rounds; ++r) {
    if constexpr (BF16) {
#define HOTOPS_DOT(i) a##i = _mm512_dpbf16_ps(a##i, (__m512bh)one, (__m512bh)one);
      HOTOPS_X12(HOTOPS_DOT)
    } else {
#define HOTOPS_FMA(i) a##i = _mm512_fmadd_ps(_mm512_castsi512_ps(one), _mm512_castsi512_ps(one), a##i);
      HOTOPS_X12(HOTOPS_FMA)
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512 s = _mm512_setzero_ps();
  HOTOPS_X12(HOTOPS_SUM)
  volatile float sink = _mm512_reduce_add_ps(s);  // keeps the chains alive
  (void)sink;
  return std::chrono::duration<double>(t1 - t0).count();
}

// vdpbf16ps at no worse than 1.5 x float32 FMA's time per instruction (1.0 on Zen 4, 2.0 where it
// has one port to FMA's two). About 0.1 ms; each side's best of five alternated runs, so a
// preempted run does not decide.
bool bf16_dot_issues_fast() {
  double dot = 1e9, fma = 1e9;
  for (int i = 0; i < 5; ++i) {
    dot = std::min(dot, issue_time<true>(1000));
    fma = std::min(fma, issue_time<false>(1000));
  }
  return dot <= 1.5 * fma;
}
#undef HOTOPS_X12
#undef HOTOPS_ACC
#undef HOTOPS_SUM
#undef HOTOPS_DOT
#undef HOTOPS_FMA
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
    case Feature::fast_bf16_dot:
      return __builtin_cpu_supports("avx512bf16");
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
#if (defined(__x86_64__) || defined(_M_X64)) && HOTOPS_HAVE_AVX512
    const int fast = static_cast<int>(Feature::fast_bf16_dot);
    if (on[fast]) on[fast] = bf16_dot_issues_fast();
#endif
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
  fail("unknown CPU feature '", name,
       "': expected vbmi, avx512_bf16, avx512_fp16, amx_bf16 or fast_bf16_dot");
}

bool cpu_has(Feature f) { return features().has[static_cast<int>(f)]; }

bool feature_on(Feature f) { return features().on[static_cast<int>(f)].load(std::memory_order_relaxed); }

void set_feature(Feature f, bool on) {
  HOTOPS_CHECK(!on || cpu_has(f), "this CPU, OS or build has no ", feature_name(f));
  features().on[static_cast<int>(f)].store(on);
}

Bf16Products bf16_products() {
  if (!feature_on(Feature::avx512_bf16)) return Bf16Products::none;
  if (feature_on(Feature::amx_bf16)) return Bf16Products::amx;
  return feature_on(Feature::fast_bf16_dot) ? Bf16Products::vdp : Bf16Products::none;
}

}  // namespace hotops
