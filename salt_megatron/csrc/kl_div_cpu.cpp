// Fused KL(softmax(t/τ) ‖ softmax(s/τ)) row statistics and student gradient on the CPU.  No torch header.
//
// One streaming pass per row: the row is read in chunks of kChunk columns (bf16/fp16 converted to fp32 into
// L1-sized buffers).  For each chunk: its maxima of s and t, then its exp-sums and partial Σ p̃·(a_t - a_s)
// relative to them (a = (x - max)/τ), merged into the row's running statistics with the online-softmax rescale
// (the same formula salt_megatron/kd/vocab_parallel.py uses across TP shards), so a growing maximum costs one
// rescale per chunk, not per element.  With the CE sum (τ != 1) the same read also sums exp(s - max_s), the
// student's softmax at τ = 1: one more exp per element, or at τ = 2 the square of the exp already taken
// (exp((s - m)/2)² = exp(s - m)), a multiply.  The grad is one more pass that writes each element once.
// OpenMP over rows, `#pragma omp simd` inner loops with a branch-free exp so the compiler vectorises them, compiled
// once per CPU level (cpu_common.h).
#include "salt_kl.h"

#include <type_traits>

#include "cpu_common.h"

namespace {

using namespace salt_cpu;

constexpr int64_t kChunk = 1024;  // columns per chunk: 2 x 4 KiB of fp32 buffers, in L1

// ---- one row ----
template <typename T>
SALT_INLINE const float* load_chunk(const T* src, int64_t len, float* buf, float& chunk_max) {
  float m = -kInf;
  if constexpr (std::is_same<T, float>::value) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) m = src[j] > m ? src[j] : m;
    chunk_max = m;
    return src;
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) {
      const float v = to_float(src[j]);
      buf[j] = v;
      m = v > m ? v : m;
    }
    chunk_max = m;
    return buf;
  }
}

// Statistics of one piece of a row, relative to its own maxima (raw logits, not divided by τ):
// ms, Σ exp((s - ms)/τ), mt, Σ exp((t - mt)/τ), Σ exp((t - mt)/τ)·((t - mt) - (s - ms))/τ, and s1 = Σ exp(s - ms)
// (the CE sum at τ = 1; kept 0 when not asked for).
struct RowStats {
  float ms, ss, mt, st, acc, s1;
};

SALT_INLINE RowStats empty_stats() { return RowStats{-kInf, 0.0f, -kInf, 0.0f, 0.0f, 0.0f}; }

// Shift of statistics taken relative to `old_max` onto `new_max` >= old_max, in units of 1/τ (<= 0).  A part
// whose maximum is -inf has nothing to shift (its sums are 0 and its partial KL is 0 or +inf).
SALT_INLINE float max_shift(float old_max, float new_max, float inv_t) {
  return old_max == -kInf ? 0.0f : (old_max - new_max) * inv_t;
}

// A partial KL taken relative to old maxima, moved onto new ones: S_t·(shift_t - shift_s) is added, then the
// teacher's rescale applies.  A piece with no teacher mass left (S_t = 0, or rescaled to 0) contributes 0, as
// the 0·inf terms do in the PyTorch path.
SALT_INLINE float shift_partial(float acc, float st, float shift_t, float shift_s, float scale_t) {
  return (st == 0.0f || scale_t == 0.0f) ? 0.0f : scale_t * (acc + st * (shift_t - shift_s));
}

// Merge two pieces of a row (the same formula salt_megatron/kd/vocab_parallel.py uses across TP shards).
SALT_INLINE RowStats merge(const RowStats& a, const RowStats& b, float inv_t) {
  RowStats r;
  r.ms = a.ms > b.ms ? a.ms : b.ms;
  r.mt = a.mt > b.mt ? a.mt : b.mt;
  const float as = max_shift(a.ms, r.ms, inv_t), at = max_shift(a.mt, r.mt, inv_t);
  const float bs = max_shift(b.ms, r.ms, inv_t), bt = max_shift(b.mt, r.mt, inv_t);
  const float a_scale_t = exp_approx(at), b_scale_t = exp_approx(bt);
  r.ss = a.ss * exp_approx(as) + b.ss * exp_approx(bs);
  r.st = a.st * a_scale_t + b.st * b_scale_t;
  r.acc = shift_partial(a.acc, a.st, at, as, a_scale_t) + shift_partial(b.acc, b.st, bt, bs, b_scale_t);
  r.s1 = a.s1 * exp_approx(max_shift(a.ms, r.ms, 1.0f)) + b.s1 * exp_approx(max_shift(b.ms, r.ms, 1.0f));
  return r;
}

// How the CE sum's exp(s - m) is had: not at all, by its own exp, or (τ = 2) as the square of exp((s - m)/τ).
enum CeMode { kNoCe = 0, kCeExp = 1, kCeSquare = 2 };

template <int kCe, typename TS, typename TT>
SALT_INLINE void stats_row(const TS* s, const TT* t, int64_t width, float inv_t, float* out) {
  alignas(64) float buf_s[kChunk];
  alignas(64) float buf_t[kChunk];
  RowStats run = empty_stats();
  for (int64_t c0 = 0; c0 < width; c0 += kChunk) {
    const int64_t len = std::min<int64_t>(kChunk, width - c0);
    RowStats c;
    const float* xs = load_chunk(s + c0, len, buf_s, c.ms);
    const float* xt = load_chunk(t + c0, len, buf_t, c.mt);
    // a -inf maximum means every entry is -inf: shifting by 0 gives exp(-inf) = 0 terms (and +inf partial KL
    // where the teacher has mass and the student none), with no inf - inf
    const float ms = c.ms == -kInf ? 0.0f : c.ms;
    const float mt = c.mt == -kInf ? 0.0f : c.mt;
    float ss = 0.0f, st = 0.0f, acc = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : ss, st, acc, s1)
    for (int64_t j = 0; j < len; ++j) {
      const float a_s = (xs[j] - ms) * inv_t;  // log of the unnormalised probabilities, <= 0
      const float a_t = (xt[j] - mt) * inv_t;
      const float q = exp_approx(a_s);
      const float p = exp_approx(a_t);
      ss += q;
      st += p;
      acc += p > 0.0f ? p * (a_t - a_s) : 0.0f;  // p = 0 (teacher -inf or underflow): no contribution (nansum)
      if constexpr (kCe == kCeExp) s1 += exp_approx(xs[j] - ms);
      if constexpr (kCe == kCeSquare) s1 += q * q;
    }
    c.ss = ss;
    c.st = st;
    c.acc = acc;
    c.s1 = s1;
    run = c0 == 0 ? c : merge(run, c, inv_t);
  }
  out[0] = run.ms;
  out[1] = run.ss;
  out[2] = run.mt;
  out[3] = run.st;
  out[4] = run.acc;
  if constexpr (kCe != kNoCe) out[5] = run.s1;
}

// (q·g - p·g_t)/τ, plus q1·g_ce with kCe (q1 = softmax(s) at τ = 1 from its own log-sum, ce_log_sum; at τ = 2
// q1 = q²·exp(2·log_sum_s - ce_log_sum), the exponent in [0, log V])
template <int kCe, typename TS, typename TT>
SALT_INLINE void grad_row(const TS* s, const TT* t, int64_t width, float inv_t, float max_s, float log_sum_s,
                          float max_t, float log_sum_t, float g, float g_teacher, float ce_log_sum, float g_ce,
                          TS* out) {
  const float gq = g * inv_t;
  const float gp = g_teacher * inv_t;
  const float ce_shift = max_s + ce_log_sum;
  const float g_ce_square = kCe == kCeSquare ? g_ce * expf(2.0f * log_sum_s - ce_log_sum) : 0.0f;
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const float x = to_float(s[j]);
    const float q = exp_approx((x - max_s) * inv_t - log_sum_s);
    const float p = exp_approx((to_float(t[j]) - max_t) * inv_t - log_sum_t);
    float y = q * gq - p * gp;
    if constexpr (kCe == kCeExp) y += exp_approx(x - ce_shift) * g_ce;
    if constexpr (kCe == kCeSquare) y += q * q * g_ce_square;
    out[j] = from_float<TS>(y);
  }
}

// ---- row ranges (the units of OpenMP work) ----
struct Args {
  const void* s;
  int64_t s_stride;
  const void* t;
  int64_t t_stride;
  int64_t width;
  const int64_t* row_index;
  float inv_t;
  bool with_ce_sum;
  float* stats;
  const float* max_s;
  const float* log_sum_s;
  const float* max_t;
  const float* log_sum_t;
  const float* grad_rows;
  const float* teacher_grad_rows;  // NULL: the same as grad_rows
  const float* ce_log_sum_s;       // NULL (and ce_grad_rows NULL): no CE term at τ = 1 in the gradient
  const float* ce_grad_rows;
  void* out;
  int64_t out_stride;
};

template <int kCe, typename TS, typename TT>
SALT_INLINE void stats_rows(const Args& a, int64_t lo, int64_t hi) {
  const TS* s = static_cast<const TS*>(a.s);
  const TT* t = static_cast<const TT*>(a.t);
  constexpr int64_t n = kCe != kNoCe ? 6 : 5;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t r = a.row_index ? a.row_index[i] : i;
    stats_row<kCe>(s + r * a.s_stride, t + r * a.t_stride, a.width, a.inv_t, a.stats + n * i);
  }
}

// Calls fn with the CE mode a call asks for as a compile-time constant: none, its own exp, or at τ = 2 the square.
template <typename Fn>
SALT_INLINE void with_ce_mode(bool with_ce, float inv_t, Fn&& fn) {
  if (!with_ce)
    fn(std::integral_constant<int, kNoCe>{});
  else if (inv_t == 0.5f)
    fn(std::integral_constant<int, kCeSquare>{});
  else
    fn(std::integral_constant<int, kCeExp>{});
}

template <typename TS, typename TT>
SALT_INLINE void stats_range(const Args& a, int64_t lo, int64_t hi) {
  with_ce_mode(a.with_ce_sum, a.inv_t, [&](auto mode) { stats_rows<decltype(mode)::value, TS, TT>(a, lo, hi); });
}

template <int kCe, typename TS, typename TT>
SALT_INLINE void grad_rows(const Args& a, int64_t lo, int64_t hi) {
  const TS* s = static_cast<const TS*>(a.s);
  const TT* t = static_cast<const TT*>(a.t);
  TS* out = static_cast<TS*>(a.out);
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t r = a.row_index ? a.row_index[i] : i;
    grad_row<kCe>(s + r * a.s_stride, t + r * a.t_stride, a.width, a.inv_t, a.max_s[i], a.log_sum_s[i], a.max_t[i],
                  a.log_sum_t[i], a.grad_rows[i], a.teacher_grad_rows ? a.teacher_grad_rows[i] : a.grad_rows[i],
                  kCe != kNoCe ? a.ce_log_sum_s[i] : 0.0f, kCe != kNoCe ? a.ce_grad_rows[i] : 0.0f,
                  out + r * a.out_stride);
  }
}

template <typename TS, typename TT>
SALT_INLINE void grad_range(const Args& a, int64_t lo, int64_t hi) {
  with_ce_mode(a.ce_grad_rows != nullptr, a.inv_t,
               [&](auto mode) { grad_rows<decltype(mode)::value, TS, TT>(a, lo, hi); });
}

using RangeFn = void (*)(const Args&, int64_t, int64_t);

// Non-template entry points (target_clones wants plain functions), one per (student, teacher) dtype pair.
#define SALT_KL_DEFINE(SN, TS, TN, TT)                                                                       \
  SALT_CLONES void stats_##SN##_##TN(const Args& a, int64_t lo, int64_t hi) { stats_range<TS, TT>(a, lo, hi); } \
  SALT_CLONES void grad_##SN##_##TN(const Args& a, int64_t lo, int64_t hi) { grad_range<TS, TT>(a, lo, hi); }

SALT_KL_DEFINE(f32, float, f32, float)
SALT_KL_DEFINE(f32, float, bf16, bf16_t)
SALT_KL_DEFINE(f32, float, f16, f16_t)
SALT_KL_DEFINE(bf16, bf16_t, f32, float)
SALT_KL_DEFINE(bf16, bf16_t, bf16, bf16_t)
SALT_KL_DEFINE(bf16, bf16_t, f16, f16_t)
SALT_KL_DEFINE(f16, f16_t, f32, float)
SALT_KL_DEFINE(f16, f16_t, bf16, bf16_t)
SALT_KL_DEFINE(f16, f16_t, f16, f16_t)
#undef SALT_KL_DEFINE

const RangeFn kStats[3][3] = {{stats_f32_f32, stats_f32_bf16, stats_f32_f16},
                              {stats_bf16_f32, stats_bf16_bf16, stats_bf16_f16},
                              {stats_f16_f32, stats_f16_bf16, stats_f16_f16}};
const RangeFn kGrad[3][3] = {{grad_f32_f32, grad_f32_bf16, grad_f32_f16},
                             {grad_bf16_f32, grad_bf16_bf16, grad_bf16_f16},
                             {grad_f16_f32, grad_f16_bf16, grad_f16_f16}};

void run_rows(RangeFn fn, const Args& a, int64_t rows, int num_threads) {
  parallel_rows([&](int64_t lo, int64_t hi) { fn(a, lo, hi); }, rows, a.width, num_threads);
}

// The fields both entry points fill: the logits, their layout, the rows and 1/τ.
Args input_args(const void* student, int64_t student_row_stride, const void* teacher, int64_t teacher_row_stride,
                int64_t width, const int64_t* row_index, float inv_temperature) {
  Args a{};
  a.s = student;
  a.s_stride = student_row_stride;
  a.t = teacher;
  a.t_stride = teacher_row_stride;
  a.width = width;
  a.row_index = row_index;
  a.inv_t = inv_temperature;
  return a;
}

}  // namespace

extern "C" int salt_kl_row_stats_cpu(const void* student, int64_t student_row_stride, int student_dtype,
                                     const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                                     int64_t rows, int64_t width, const int64_t* row_index, float inv_temperature,
                                     int with_ce_sum, float* stats, int num_threads) {
  if (!valid_dtype(student_dtype) || !valid_dtype(teacher_dtype) || rows < 0 || width < 0) return 1;
  Args a = input_args(student, student_row_stride, teacher, teacher_row_stride, width, row_index, inv_temperature);
  a.with_ce_sum = with_ce_sum != 0;
  a.stats = stats;
  run_rows(kStats[student_dtype][teacher_dtype], a, rows, num_threads);
  return 0;
}

extern "C" int salt_kl_student_grad_cpu(const void* student, int64_t student_row_stride, int student_dtype,
                                        const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                                        int64_t rows, int64_t width, const int64_t* row_index, const float* max_s,
                                        const float* log_sum_s, const float* max_t, const float* log_sum_t,
                                        const float* grad_rows, const float* teacher_grad_rows,
                                        const float* ce_log_sum_s, const float* ce_grad_rows,
                                        float inv_temperature, void* out, int64_t out_row_stride,
                                        int num_threads) {
  if (!valid_dtype(student_dtype) || !valid_dtype(teacher_dtype) || rows < 0 || width < 0) return 1;
  if ((ce_log_sum_s == nullptr) != (ce_grad_rows == nullptr)) return 1;
  if (width == 0) return 0;
  Args a = input_args(student, student_row_stride, teacher, teacher_row_stride, width, row_index, inv_temperature);
  a.max_s = max_s;
  a.log_sum_s = log_sum_s;
  a.max_t = max_t;
  a.log_sum_t = log_sum_t;
  a.grad_rows = grad_rows;
  a.teacher_grad_rows = teacher_grad_rows;
  a.ce_log_sum_s = ce_log_sum_s;
  a.ce_grad_rows = ce_grad_rows;
  a.out = out;
  a.out_stride = out_row_stride;
  run_rows(kGrad[student_dtype][teacher_dtype], a, rows, num_threads);
  return 0;
}
