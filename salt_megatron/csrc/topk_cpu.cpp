// The teacher's top-k and log-sum-exp of each logits row (for `cache-teacher`).  No torch header.
//
// Per row, three vectorised passes and a small sort, all on one fp32 copy of the row (scaled by 1/τ; bf16/fp16
// converted) that stays in L1/L2:
//   1. the copy, with the row's log-sum-exp merged chunk by chunk (online softmax);
//   2. a bar: the row is cut into S >= 4k disjoint sets (lanes of a vector over a run of vectors: maxima by plain
//      vertical max instructions), and the bar is the k-th largest set maximum.  k disjoint sets each hold an entry
//      at or above it, so the k-th largest entry is at or above it too: no entry of the top k is below the bar;
//   3. the entries at or above the bar (for random logits about k to 2k of them), 16 tested at a time;
// then the k best of those (nth_element) sorted best first, ties to the lower column (torch.topk's order).  The
// entries are sorted as one 64-bit integer each, the value's order-preserving bits over the complemented column,
// so that every comparison is a single branch-free integer compare.
#include "salt_kl.h"

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

SALT_INLINE float block_max(const float* x, int64_t n) {
  float m = -kInf;
  if (n == kBlock) {
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < kBlock; ++t) m = x[t] > m ? x[t] : m;
  } else {
    for (int64_t t = 0; t < n; ++t) m = x[t] > m ? x[t] : m;
  }
  return m;
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
SALT_INLINE float bar_below_kth(const float* buf, int64_t width, int64_t k, uint32_t* set_max) {
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
    for (int64_t t = 0; t < kBlock; ++t) set_max[g * kBlock + t] = order_key(m[t]);
  }
  std::nth_element(set_max, set_max + (k - 1), set_max + sets, std::greater<uint32_t>());
  return key_value(set_max[k - 1]);
}

// One row: the k best of x/τ (values, columns; best first) and log Σ exp(x/τ).  1 <= k <= width.
template <typename T>
SALT_INLINE void topk_row(const T* x, int64_t width, int64_t k, float inv_t, float* buf, uint32_t* set_max,
                          uint64_t* candidates, float* values, int64_t* columns, float* log_sum_exp) {
  *log_sum_exp = scale_row(x, width, inv_t, buf);
  const float bar = bar_below_kth(buf, width, k, set_max);
  int64_t n = 0;
  for (int64_t j = 0; j < width; j += kBlock) {
    const int64_t len = std::min<int64_t>(kBlock, width - j);
    if (!(block_max(buf + j, len) >= bar)) continue;
    for (int64_t t = 0; t < len; ++t) {  // branch-free append: written always, kept when at or above the bar
      candidates[n] = entry_key(buf[j + t], j + t);
      n += buf[j + t] >= bar;
    }
  }
  // fewer than k only when nan entries failed every comparison: the rest are nan (column 0), like the row's lse
  const uint64_t nan_entry = entry_key(std::numeric_limits<float>::quiet_NaN(), 0);
  while (n < k) candidates[n++] = nan_entry;
  if (n > k) std::nth_element(candidates, candidates + (k - 1), candidates + n, std::greater<uint64_t>());
  std::sort(candidates, candidates + k, std::greater<uint64_t>());
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
  std::vector<uint32_t> set_max(4 * a.k + kBlock);
  std::vector<uint64_t> candidates(a.width);  // at worst every entry (a row of equal values)
  const T* x = static_cast<const T*>(a.logits);
  for (int64_t r = lo; r < hi; ++r)
    topk_row(x + r * a.row_stride, a.width, a.k, a.inv_t, buf.data(), set_max.data(), candidates.data(),
             a.values + r * a.k, a.columns + r * a.k, a.log_sum_exp + r);
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
