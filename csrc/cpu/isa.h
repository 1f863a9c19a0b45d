// Run-time choice of the instruction set for the CPU kernels: every kernel file compiles its hot
// row functions for AVX-512, AVX2+FMA and the baseline ISA (FUSEDRL_ISA_VARIANTS) and calls the
// widest one this CPU supports. No -march=native: one binary runs everywhere.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace fusedrl {
namespace cpu {

enum IsaLevel : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

// The widest level this CPU supports, lowered by the environment variable FUSEDRL_CPU_ISA
// (baseline | avx2 | avx512), read once at the first kernel call (tests run every variant).
inline int isa_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int level = [] {
    __builtin_cpu_init();
    int best = kIsaBaseline;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      best = kIsaAvx512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = kIsaAvx2;
    const char* want = std::getenv("FUSEDRL_CPU_ISA");
    if (want && std::strcmp(want, "baseline") == 0) return int(kIsaBaseline);
    if (want && std::strcmp(want, "avx2") == 0) return best < kIsaAvx2 ? best : int(kIsaAvx2);
    return best;
  }();
  return level;
#else
  return kIsaBaseline;
#endif
}

inline const char* isa_name() {
  switch (isa_level()) {
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace fusedrl

// Defines NAME() returning the variant of `void NAME_xxx(const ARGS& a, int64_t r0, int64_t r1)`
// (each calling BODY<T>(a, r0, r1)) for this CPU: the same body compiled for AVX-512, AVX2+FMA and
// the baseline ISA. Keep OpenMP regions outside BODY, so the hot loops are in the chosen variant.
#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDRL_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define FUSEDRL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FUSEDRL_ISA_VARIANTS(NAME, ARGS, BODY, T)                                                     \
  FUSEDRL_TARGET_AVX512 void NAME##_avx512(const ARGS& a, int64_t r0, int64_t r1) { BODY<T>(a, r0, r1); } \
  FUSEDRL_TARGET_AVX2 void NAME##_avx2(const ARGS& a, int64_t r0, int64_t r1) {                    \
    BODY<T>(a, r0, r1);                                                                            \
  }                                                                                                \
  void NAME##_base(const ARGS& a, int64_t r0, int64_t r1) { BODY<T>(a, r0, r1); }                  \
  auto NAME() -> void (*)(const ARGS&, int64_t, int64_t) {                                         \
    switch (::fusedrl::cpu::isa_level()) {                                                         \
      case ::fusedrl::cpu::kIsaAvx512: return NAME##_avx512;                                       \
      case ::fusedrl::cpu::kIsaAvx2: return NAME##_avx2;                                           \
      default: return NAME##_base;                                                                 \
    }                                                                                              \
  }
#else
#define FUSEDRL_TARGET_AVX512
#define FUSEDRL_TARGET_AVX2
#define FUSEDRL_ISA_VARIANTS(NAME, ARGS, BODY, T)                                       \
  void NAME##_base(const ARGS& a, int64_t r0, int64_t r1) { BODY<T>(a, r0, r1); }     \
  auto NAME() -> void (*)(const ARGS&, int64_t, int64_t) { return NAME##_base; }
#endif
