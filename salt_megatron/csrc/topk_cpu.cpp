// The teacher's top-k and log-sum-exp of each logits row (for `cache-teacher`).  No torch header.
//
// Per row, three vectorised passes and a small sort, all on one fp32 copy of the row (scaled by 1/τ; bf16/fp16
// converted) that stays in L1/L2:
//   1. the copy, with the row's log-sum-exp merged chunk by chunk (online softmax);
//   2. a bar: the row is cut into S >= 4k disjoint sets (lanes of a vector over a run of vectors: maxima by plain
//      vertical max instructions), and the bar is a value that at least k set maxima reach (from a histogram of
//      the maxima).  k disjoint sets each hold an entry at or above it, so the k-th largest entry is at or above
//      it too: no entry of the top k is below the bar;
//   3. the entries at or above the bar (for random logits about k to 1.2k of them), found 16 at a time as the bits
//      of a vector compare;
// then the k best of those sorted best first, ties to the lower column (torch.topk's order): nth_element and sort
// for a few, a radix sort for more.  The entries are sorted as one 64-bit integer each, the value's order-preserving
// bits over the complemented column, so that every comparison is a single branch-free integer compare.
#include "salt_kl.h"

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace salt_cpu;

constexpr int64_t kChunk = 1024;  // columns per log-sum-exp chunk
constexpr int64_t kBlock = 16;    // one AVX-512 register of fp32

// fp32 bits -> an unsigned integer of the same order (nan aside): negatives reversed below the positives
SALT_INLINE uint32_t order_key(float v) {
  const uint32_t u = float_to_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
SALT_INLINE float key_value(uint32_t key) { return bits_to_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key); }

// (value, column) as one integer: larger = better; equal values rank the lower column first
SALT_INLINE uint64_t entry_key(float v, int64_t column) {
  // + 0: -0 becomes +0, so the two tie as in torch
  return (static_cast<uint64_t>(order_key(v + 0.0f)) << 32) | (0xffffffffu - static_cast<uint32_t>(column));
}

// bit t set where x[t] >= bar (nan: never), t < n <= kBlock
SALT_INLINE uint32_t at_or_above(const float* x, int64_t n, float bar) {
  uint32_t bits = 0;
  if (n == kBlock) {
#pragma omp simd reduction(| : bits)
    for (int64_t t = 0; t < kBlock; ++t) bits |= static_cast<uint32_t>(x[t] >= bar) << t;
  } else {
    for (int64_t t = 0; t < n; ++t) bits |= static_cast<uint32_t>(x[t] >= bar) << t;
  }
  return bits;
}

SALT_INLINE int lowest_bit(uint32_t bits) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(bits);
#else
  int t = 0;
  while (!(bits & 1u)) bits >>= 1, ++t;
  return t;
#endif
}

// Pass 1: buf = x/τ, and the row's log Σ exp(x/τ).
template <typename T>
SALT_INLINE float scale_row(const T* x, int64_t width, float inv_t, float* buf) {
  float run_max = -kInf, run_sum = 0.0f;
  for (int64_t c0 = 0; c0 < width; c0 += kChunk) {
    const int64_t len = std::min<int64_t>(kChunk, width - c0);
    float* b = buf + c0;
    float m = -kInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) {
      const float v = to_float(x[c0 + j]) * inv_t;
      b[j] = v;
      m = v > m ? v : m;
    }
    if (m == -kInf) continue;  // a chunk of -inf adds nothing (and would give -inf - -inf)
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) s += exp_approx(b[j] - m);
    if (m > run_max) {
      run_sum = (run_max == -kInf ? 0.0f : run_sum * exp_approx(run_max - m)) + s;
      run_max = m;
    } else {
      run_sum += s * exp_approx(m - run_max);
    }
  }
  return run_max == -kInf ? -kInf : run_max + logf(run_sum);  // a nan entry makes run_sum nan, as in torch
}

// Pass 2: a value at or below the k-th largest entry of buf (-inf when the row is too short to cut into sets).
// Not the k-th largest set maximum itself (a selection over 4k keys cost as much as the rest of the row at k = 256)
// but the smallest maximum of the top buckets of a histogram of the maxima that hold k of them: k sets have an
// entry at or above it, so no entry of the top k is below it.
SALT_INLINE float bar_below_kth(const float* buf, int64_t width, int64_t k, float* set_max) {
  int64_t sets = (4 * k + kBlock - 1) / kBlock * kBlock;  // S >= 4k, whole vectors
  if (sets > width / kBlock * kBlock) sets = width / kBlock * kBlock;
  if (sets < k) return -kInf;
  const int64_t groups = sets / kBlock, run = width / sets;  // set (g, lane): buf[(g*run + i)*16 + lane], i < run
  for (int64_t g = 0; g < groups; ++g) {
    float m[kBlock];
    for (int64_t t = 0; t < kBlock; ++t) m[t] = -kInf;
    const float* p = buf + g * run * kBlock;
    for (int64_t i = 0; i < run; ++i) {
#pragma omp simd
      for (int64_t t = 0; t < kBlock; ++t) m[t] = p[i * kBlock + t] > m[t] ? p[i * kBlock + t] : m[t];
    }
    std::copy(m, m + kBlock, set_max + g * kBlock);
  }
  // the maxima's range (nan entries never win a max; a set of -inf has -inf, left out of the low end)
  float hi = -kInf, lo = kInf;
#pragma omp simd reduction(max : hi) reduction(min : lo)
  for (int64_t j = 0; j < sets; ++j) {
    hi = set_max[j] > hi ? set_max[j] : hi;
    lo = (set_max[j] > -kInf && set_max[j] < lo) ? set_max[j] : lo;
  }
  constexpr int kBuckets = 256;
  const float scale = (kBuckets - 1) / (hi - lo);
  // all equal, all -inf, an infinite range or one too narrow to divide by (subnormal): select exactly
  if (!(hi > lo) || !(hi - lo < kInf) || !(scale < kInf)) {
    std::nth_element(set_max, set_max + (k - 1), set_max + sets, std::greater<float>());
    return set_max[k - 1];
  }
  const auto bucket_of = [lo, scale](float m) {  // monotone in the maximum; -inf and rounding clamped into range
    const float t = (m - lo) * scale;
    return static_cast<int>(t < 0.0f ? 0.0f : (t > kBuckets - 1 ? kBuckets - 1 : t));
  };
  uint32_t count[kBuckets] = {0};
  for (int64_t j = 0; j < sets; ++j) ++count[bucket_of(set_max[j])];
  int bucket = kBuckets - 1;
  for (int64_t held = count[bucket]; held < k;) held += count[--bucket];
  float bar = kInf;
  for (int64_t j = 0; j < sets; ++j)
    if (bucket_of(set_max[j]) >= bucket && set_max[j] < bar) bar = set_max[j];
  return bar;
}

// keys[0..n) in descending order: a least-significant-digit radix sort over the bytes in which they differ (stable
// passes, each placing the larger digit first); tmp holds n.  Cheaper than comparison sorting from ~64 keys.
SALT_INLINE void radix_sort_descending(uint64_t* keys, int64_t n, uint64_t* tmp) {
  uint64_t* src = keys;
  uint64_t* dst = tmp;
  for (int shift = 0; shift < 64; shift += 8) {
    uint32_t count[256] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[(src[i] >> shift) & 255u];
    if (count[(src[0] >> shift) & 255u] == static_cast<uint32_t>(n)) continue;  // one digit: nothing to order
    uint32_t offset[256];
    uint32_t at = 0;
    for (int d = 255; d >= 0; --d) {
      offset[d] = at;
      at += count[d];
    }
    for (int64_t i = 0; i < n; ++i) dst[offset[(src[i] >> shift) & 255u]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::copy(src, src + n, keys);
}

// One row: the k best of x/τ (values, columns; best first) and log Σ exp(x/τ).  1 <= k <= width.
template <typename T>
SALT_INLINE void topk_row(const T* x, int64_t width, int64_t k, float inv_t, float* buf, float* set_max,
                          uint64_t* candidates, uint64_t* scratch, float* values, int64_t* columns,
                          float* log_sum_exp) {
  *log_sum_exp = scale_row(x, width, inv_t, buf);
  const float bar = bar_below_kth(buf, width, k, set_max);
  int64_t n = 0;
  for (int64_t j = 0; j < width; j += kBlock) {
    // which of the block's entries are at or above the bar, as bits (a vector compare and a mask move); then
    // only those are made into keys
    for (uint32_t bits = at_or_above(buf + j, std::min<int64_t>(kBlock, width - j), bar); bits; bits &= bits - 1) {
      const int64_t c = j + lowest_bit(bits);
      candidates[n++] = entry_key(buf[c], c);
    }
  }
  // fewer than k only when nan entries failed every comparison: the rest are nan (column 0), like the row's lse
  const uint64_t nan_entry = entry_key(std::numeric_limits<float>::quiet_NaN(), 0);
  while (n < k) candidates[n++] = nan_entry;
  if (n > 64) {
    radix_sort_descending(candidates, n, scratch);
  } else {
    if (n > k) std::nth_element(candidates, candidates + (k - 1), candidates + n, std::greater<uint64_t>());
    std::sort(candidates, candidates + k, std::greater<uint64_t>());
  }
  for (int64_t i = 0; i < k; ++i) {
    values[i] = key_value(static_cast<uint32_t>(candidates[i] >> 32));
    columns[i] = 0xffffffffu - static_cast<uint32_t>(candidates[i]);
  }
}

struct TopkArgs {
  const void* logits;
  int64_t row_stride;
  int64_t width;
  int64_t k;
  float inv_t;
  float* values;
  int64_t* columns;
  float* log_sum_exp;
};

template <typename T>
SALT_INLINE void topk_range(const TopkArgs& a, int64_t lo, int64_t hi) {
  std::vector<float> buf(a.width);
  std::vector<float> set_max(4 * a.k + kBlock);
  std::vector<uint64_t> candidates(a.width + a.k), scratch(a.width + a.k);  // at worst every entry (equal values)
  const T* x = static_cast<const T*>(a.logits);
  for (int64_t r = lo; r < hi; ++r)
    topk_row(x + r * a.row_stride, a.width, a.k, a.inv_t, buf.data(), set_max.data(), candidates.data(),
             scratch.data(), a.values + r * a.k, a.columns + r * a.k, a.log_sum_exp + r);
}

// Non-template entry points (target_clones wants plain functions), one per dtype.
SALT_CLONES void topk_f32(const TopkArgs& a, int64_t lo, int64_t hi) { topk_range<float>(a, lo, hi); }
SALT_CLONES void topk_bf16(const TopkArgs& a, int64_t lo, int64_t hi) { topk_range<bf16_t>(a, lo, hi); }
SALT_CLONES void topk_f16(const TopkArgs& a, int64_t lo, int64_t hi) { topk_range<f16_t>(a, lo, hi); }

using TopkFn = void (*)(const TopkArgs&, int64_t, int64_t);
const TopkFn kTopk[3] = {topk_f32, topk_bf16, topk_f16};

}  // namespace

extern "C" int salt_topk_logsumexp_cpu(const void* logits, int64_t row_stride, int dtype, int64_t rows,
                                       int64_t width, int64_t k, float inv_temperature, float* values,
                                       int64_t* columns, float* log_sum_exp, int num_threads) {
  if (!valid_dtype(dtype) || rows < 0 || k < 1 || k > width || width > 0xffffffffLL) return 1;
  const TopkArgs a{logits, row_stride, width, k, inv_temperature, values, columns, log_sum_exp};
  const TopkFn fn = kTopk[dtype];
  parallel_rows([&](int64_t lo, int64_t hi) { fn(a, lo, hi); }, rows, width, num_threads);
  return 0;
}
