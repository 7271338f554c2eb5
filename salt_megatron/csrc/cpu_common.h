// Shared by the CPU kernels (kl_div_cpu.cpp, topk_cpu.cpp): dtype conversions, a vectorisable exp, the
// per-CPU code variants (target_clones) and the OpenMP split of rows.  No torch header.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

// On x86-64 with GCC the row functions are compiled three times (x86-64-v4 = AVX-512, v3 = AVX2+FMA,
// baseline SSE2) and the best one for the running CPU is picked at load time: the build needs no -march.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11 && defined(__linux__) && \
    !defined(SALT_KL_NO_CLONES)
#define SALT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SALT_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SALT_INLINE inline __attribute__((always_inline))
#else
#define SALT_INLINE inline
#endif

namespace salt_cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

SALT_INLINE float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
SALT_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

// ---- conversions (branch-free, exact; the stores round to nearest even like c10's) ----
SALT_INLINE float to_float(float v) { return v; }
SALT_INLINE float to_float(bf16_t v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
SALT_INLINE float to_float(f16_t v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // normal and subnormal halves: shift into a float's mantissa and rescale by 2^(127-15) (exact)
  const float finite = bits_to_float(em << 13) * 0x1.0p+112f;
  const uint32_t special = (em << 13) | 0x7f800000u;  // inf / nan
  const uint32_t mag = em >= 0x7c00u ? special : float_to_bits(finite);
  return bits_to_float(mag | sign);
}

template <typename T>
SALT_INLINE T from_float(float f);
template <>
SALT_INLINE float from_float<float>(float f) {
  return f;
}
template <>
SALT_INLINE bf16_t from_float<bf16_t>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bf16_t r;
  r.x = static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
  return r;
}
template <>
SALT_INLINE f16_t from_float<f16_t>(float f) {
  // c10::detail::fp16_ieee_from_fp32_value (round to nearest even, overflow to inf, nan kept)
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  f16_t r;
  r.x = static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
  return r;
}

// ---- exp: Cody-Waite reduction + Cephes' degree-7 polynomial, about 1 ulp; exp(-inf) = 0, nan stays nan,
// results that underflow come out subnormal or 0 like expf.  Branch-free so `omp simd` loops vectorise it. ----
SALT_INLINE float exp_approx(float x) {
  x = x < -105.0f ? -105.0f : x;  // exp(-105) rounds to 0 (a nan fails both tests and stays nan)
  x = x > 88.72f ? 88.72f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  // 2^n as two normal powers of two, so that n down to -152 still gives a correctly underflowing product
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  const float s1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  return y * s1 * s2;
}


inline bool valid_dtype(int d) { return d >= 0 && d < 3; }

// fn(lo, hi) over equal contiguous ranges of `rows`, one per thread (rows cost the same); one thread for work too
// small to be worth waking a team.
template <typename Fn>
void parallel_rows(Fn&& fn, int64_t rows, int64_t width, int num_threads) {
  if (rows <= 0) return;
  const int64_t work = rows * std::max<int64_t>(width, 1);
  int threads = num_threads < 1 ? 1 : num_threads;
  if (threads > rows) threads = static_cast<int>(rows);
  if (work < (int64_t{1} << 15)) threads = 1;
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t nt = omp_get_num_threads();
      const int64_t id = omp_get_thread_num();
      const int64_t lo = rows * id / nt;
      const int64_t hi = rows * (id + 1) / nt;
      if (lo < hi) fn(lo, hi);
    }
    return;
  }
#endif
  fn(int64_t{0}, rows);
}

}  // namespace salt_cpu
