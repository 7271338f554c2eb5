// Fused KL(softmax(t/τ) ‖ softmax(s/τ)) row statistics and student gradient on the GPU.
//
// No torch header: the launchers below take raw device pointers, sizes, row strides (elements), dtype codes and
// the stream as an integer (csrc/salt_kl.h); csrc/kl_div_cuda_binding.cpp is the thin torch binding.
//
// Forward: one block of 256 threads per row.  Each thread streams over its share of the row in groups of 8
// columns (16-byte loads when the row is 16-byte aligned), keeping an online maximum of s and t, the sums
// Σ exp((x - max)/τ) and the partial Σ p̃·((t - max_t) - (s - max_s))/τ, rescaled when a maximum grows.  The
// block then merges the threads' statistics (warp shuffles, then shared memory).  Reads each logit once; writes
// 5 floats per row (6 with the CE sum Σ exp(s - max_s), for a next-token CE at τ != 1).  Backward: one block per
// row, reads s and t once, writes the gradient (q·g - p·g_t)/τ [+ q1·g_ce] once (fp32 math, cast to the student's
// dtype; g = grad_rows[i], g_t = teacher_grad_rows[i], or g when that is NULL; q1 = softmax(s) at τ = 1).
// Sized for rows of up to a few hundred thousand columns (V = 256k: 1k per thread).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "salt_kl.h"

namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;  // columns per thread step: one 16-byte load of bf16/fp16, two of fp32
constexpr float kLog2e = 1.4426950408889634f;
#define SALT_INF __int_as_float(0x7f800000)

// exp(x) through the SFU's ex2 (relative error about 2^-22 for the |x| < 30 that matter here; exp(-inf) = 0).
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
  return y;
}

// ---- loads and stores of one element / one group of 8 ----
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

__device__ __forceinline__ void unpack2(uint32_t w, __nv_bfloat16*, float* out) {
  out[0] = __uint_as_float(w << 16);
  out[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack2(uint32_t w, __half*, float* out) {
  __half2 h;
  memcpy(&h, &w, sizeof(w));
  const float2 f = __half22float2(h);
  out[0] = f.x;
  out[1] = f.y;
}

// p must be 16-byte aligned
template <typename T>
__device__ __forceinline__ void load_group(const T* p, float (&x)[kGroup]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  unpack2(v.x, static_cast<T*>(nullptr), x + 0);
  unpack2(v.y, static_cast<T*>(nullptr), x + 2);
  unpack2(v.z, static_cast<T*>(nullptr), x + 4);
  unpack2(v.w, static_cast<T*>(nullptr), x + 6);
}
template <>
__device__ __forceinline__ void load_group<float>(const float* p, float (&x)[kGroup]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

// p must be 16-byte aligned
template <typename T>
__device__ __forceinline__ void store_group(T* p, const float (&x)[kGroup]) {
  uint4 v;
  v.x = pack2<T>(x[0], x[1]);
  v.y = pack2<T>(x[2], x[3]);
  v.z = pack2<T>(x[4], x[5]);
  v.w = pack2<T>(x[6], x[7]);
  *reinterpret_cast<uint4*>(p) = v;
}
template <>
__device__ __forceinline__ void store_group<float>(float* p, const float (&x)[kGroup]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- row statistics, relative to the maxima of the raw logits (see salt_kl.h) ----
struct Stats {
  float ms, ss, mt, st, acc, s1;  // s1 = Σ exp(s - ms), the CE sum at τ = 1 (0 when not asked for)
};

__device__ __forceinline__ float max_shift(float old_max, float new_max, float inv_t) {
  return old_max == -SALT_INF ? 0.0f : (old_max - new_max) * inv_t;  // a -inf part has nothing to shift
}

// A partial KL taken relative to old maxima, moved onto new ones: S_t·(shift_t - shift_s) is added, then the
// teacher's rescale applies.  A part with no teacher mass left (S_t = 0, or rescaled to 0) contributes 0, as
// the 0·inf terms do in the PyTorch path.
__device__ __forceinline__ float shift_partial(float acc, float st, float shift_t, float shift_s, float scale_t) {
  return (st == 0.0f || scale_t == 0.0f) ? 0.0f : scale_t * (acc + st * (shift_t - shift_s));
}

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b, float inv_t) {
  Stats r;
  r.ms = fmaxf(a.ms, b.ms);
  r.mt = fmaxf(a.mt, b.mt);
  const float as = max_shift(a.ms, r.ms, inv_t), at = max_shift(a.mt, r.mt, inv_t);
  const float bs = max_shift(b.ms, r.ms, inv_t), bt = max_shift(b.mt, r.mt, inv_t);
  const float a_scale_t = fast_exp(at), b_scale_t = fast_exp(bt);
  r.ss = a.ss * fast_exp(as) + b.ss * fast_exp(bs);
  r.st = a.st * a_scale_t + b.st * b_scale_t;
  r.acc = shift_partial(a.acc, a.st, at, as, a_scale_t) + shift_partial(b.acc, b.st, bt, bs, b_scale_t);
  r.s1 = a.s1 * fast_exp(max_shift(a.ms, r.ms, 1.0f)) + b.s1 * fast_exp(max_shift(b.ms, r.ms, 1.0f));
  return r;
}

// Fold n columns (values xs/xt) into a thread's running statistics (and the CE sum with kCe).
template <bool kCe, int N>
__device__ __forceinline__ void accumulate(Stats& r, const float* xs, const float* xt, float inv_t) {
  float gms = xs[0], gmt = xt[0];
#pragma unroll
  for (int k = 1; k < N; ++k) {
    gms = fmaxf(gms, xs[k]);
    gmt = fmaxf(gmt, xt[k]);
  }
  const float nms = fmaxf(r.ms, gms), nmt = fmaxf(r.mt, gmt);
  if (nms > r.ms || nmt > r.mt) {  // a running maximum grows: rescale what was summed so far
    const float sh_s = max_shift(r.ms, nms, inv_t), sh_t = max_shift(r.mt, nmt, inv_t);
    const float scale_t = fast_exp(sh_t);
    r.acc = shift_partial(r.acc, r.st, sh_t, sh_s, scale_t);
    r.ss *= fast_exp(sh_s);
    r.st *= scale_t;
    if (kCe) r.s1 *= fast_exp(max_shift(r.ms, nms, 1.0f));
    r.ms = nms;
    r.mt = nmt;
  }
  // a -inf maximum means every entry so far is -inf: shift by 0 (terms exp(-inf) = 0, no inf - inf)
  const float ms = r.ms == -SALT_INF ? 0.0f : r.ms;
  const float mt = r.mt == -SALT_INF ? 0.0f : r.mt;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float a_s = (xs[k] - ms) * inv_t;
    const float a_t = (xt[k] - mt) * inv_t;
    const float p = fast_exp(a_t);
    r.ss += fast_exp(a_s);
    r.st += p;
    r.acc = fmaf(p, p > 0.0f ? a_t - a_s : 0.0f, r.acc);  // p = 0: no contribution even if a_s = -inf (nansum)
    if (kCe) r.s1 += fast_exp(xs[k] - ms);
  }
}

__device__ __forceinline__ Stats shfl_xor(const Stats& a, int offset) {
  Stats b;
  b.ms = __shfl_xor_sync(0xffffffffu, a.ms, offset);
  b.ss = __shfl_xor_sync(0xffffffffu, a.ss, offset);
  b.mt = __shfl_xor_sync(0xffffffffu, a.mt, offset);
  b.st = __shfl_xor_sync(0xffffffffu, a.st, offset);
  b.acc = __shfl_xor_sync(0xffffffffu, a.acc, offset);
  b.s1 = __shfl_xor_sync(0xffffffffu, a.s1, offset);
  return b;
}

__device__ __forceinline__ Stats warp_merge(Stats a, float inv_t) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) a = merge(a, shfl_xor(a, offset), inv_t);
  return a;
}

template <bool kCe, typename TS, typename TT>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const TS* __restrict__ student, int64_t s_stride,
                                                             const TT* __restrict__ teacher, int64_t t_stride,
                                                             int64_t width, const int64_t* __restrict__ row_index,
                                                             float inv_t, float* __restrict__ stats) {
  const int64_t i = blockIdx.x;
  const int64_t row = row_index ? row_index[i] : i;
  const TS* s = student + row * s_stride;
  const TT* t = teacher + row * t_stride;
  Stats r{-SALT_INF, 0.0f, -SALT_INF, 0.0f, 0.0f, 0.0f};
  int64_t done = 0;
  if (aligned16(s) && aligned16(t)) {
    const int64_t groups = width / kGroup;
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
      float xs[kGroup], xt[kGroup];
      load_group(s + g * kGroup, xs);
      load_group(t + g * kGroup, xt);
      accumulate<kCe, kGroup>(r, xs, xt, inv_t);
    }
    done = groups * kGroup;
  }
  for (int64_t j = done + threadIdx.x; j < width; j += kThreads) {  // tail, or a misaligned row
    const float xs = to_float(s[j]), xt = to_float(t[j]);
    accumulate<kCe, 1>(r, &xs, &xt, inv_t);
  }

  __shared__ Stats partial[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  r = warp_merge(r, inv_t);
  if (lane == 0) partial[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = lane < kThreads / 32 ? partial[lane] : Stats{-SALT_INF, 0.0f, -SALT_INF, 0.0f, 0.0f, 0.0f};
    r = warp_merge(r, inv_t);
    if (lane == 0) {
      float* o = stats + (kCe ? 6 : 5) * i;
      o[0] = r.ms;
      o[1] = r.ss;
      o[2] = r.mt;
      o[3] = r.st;
      o[4] = r.acc;
      if (kCe) o[5] = r.s1;
    }
  }
}

// ---- gradient ----
template <bool kCe, typename TS, typename TT>
__global__ void __launch_bounds__(kThreads) student_grad_kernel(
    const TS* __restrict__ student, int64_t s_stride, const TT* __restrict__ teacher, int64_t t_stride,
    int64_t width, const int64_t* __restrict__ row_index, const float* __restrict__ max_s,
    const float* __restrict__ log_sum_s, const float* __restrict__ max_t, const float* __restrict__ log_sum_t,
    const float* __restrict__ grad_rows, const float* __restrict__ teacher_grad_rows,
    const float* __restrict__ ce_log_sum_s, const float* __restrict__ ce_grad_rows, float inv_t,
    TS* __restrict__ out, int64_t out_stride) {
  const int64_t i = blockIdx.x;
  const int64_t row = row_index ? row_index[i] : i;
  const TS* s = student + row * s_stride;
  const TT* t = teacher + row * t_stride;
  TS* o = out + row * out_stride;
  const float m_s = max_s[i], l_s = log_sum_s[i], m_t = max_t[i], l_t = log_sum_t[i];
  const float gs = grad_rows[i] * inv_t;  // weight of the student's term
  // minus the teacher's: q·g_s - p·g_t is then one multiply and one fma per element, as (q - p)·g was
  const float neg_gt = -(teacher_grad_rows ? teacher_grad_rows[i] : grad_rows[i]) * inv_t;
  // the CE term at τ = 1: softmax(s)·g_ce = exp(s - (max_s + ce_log_sum_s))·g_ce
  const float ce_shift = kCe ? m_s + ce_log_sum_s[i] : 0.0f, g_ce = kCe ? ce_grad_rows[i] : 0.0f;
  int64_t done = 0;
  if (aligned16(s) && aligned16(t) && aligned16(o)) {
    const int64_t groups = width / kGroup;
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
      float xs[kGroup], xt[kGroup], y[kGroup];
      load_group(s + g * kGroup, xs);
      load_group(t + g * kGroup, xt);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const float q = fast_exp(fmaf(xs[k] - m_s, inv_t, -l_s));
        const float p = fast_exp(fmaf(xt[k] - m_t, inv_t, -l_t));
        y[k] = fmaf(q, gs, p * neg_gt);
        if (kCe) y[k] = fmaf(fast_exp(xs[k] - ce_shift), g_ce, y[k]);
      }
      store_group(o + g * kGroup, y);
    }
    done = groups * kGroup;
  }
  for (int64_t j = done + threadIdx.x; j < width; j += kThreads) {
    const float x = to_float(s[j]);
    const float q = fast_exp(fmaf(x - m_s, inv_t, -l_s));
    const float p = fast_exp(fmaf(to_float(t[j]) - m_t, inv_t, -l_t));
    float y = fmaf(q, gs, p * neg_gt);
    if (kCe) y = fmaf(fast_exp(x - ce_shift), g_ce, y);
    o[j] = from_float<TS>(y);
  }
}

// ---- dtype dispatch ----
template <typename TS>
struct Teacher {
  template <template <typename, typename> class F, typename... Args>
  static int go(int td, Args... args) {
    switch (td) {
      case SALT_KL_FLOAT32:
        return F<TS, float>::run(args...);
      case SALT_KL_BFLOAT16:
        return F<TS, __nv_bfloat16>::run(args...);
      case SALT_KL_FLOAT16:
        return F<TS, __half>::run(args...);
      default:
        return -1;
    }
  }
};

template <template <typename, typename> class F, typename... Args>
int dispatch(int sd, int td, Args... args) {
  switch (sd) {
    case SALT_KL_FLOAT32:
      return Teacher<float>::template go<F>(td, args...);
    case SALT_KL_BFLOAT16:
      return Teacher<__nv_bfloat16>::template go<F>(td, args...);
    case SALT_KL_FLOAT16:
      return Teacher<__half>::template go<F>(td, args...);
    default:
      return -1;
  }
}

template <typename TS, typename TT>
struct LaunchStats {
  static int run(const void* s, int64_t s_stride, const void* t, int64_t t_stride, int64_t rows, int64_t width,
                 const int64_t* row_index, float inv_t, int with_ce_sum, float* stats, cudaStream_t stream) {
    auto kernel = with_ce_sum ? row_stats_kernel<true, TS, TT> : row_stats_kernel<false, TS, TT>;
    kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        static_cast<const TS*>(s), s_stride, static_cast<const TT*>(t), t_stride, width, row_index, inv_t, stats);
    return static_cast<int>(cudaGetLastError());
  }
};

template <typename TS, typename TT>
struct LaunchGrad {
  static int run(const void* s, int64_t s_stride, const void* t, int64_t t_stride, int64_t rows, int64_t width,
                 const int64_t* row_index, const float* max_s, const float* log_sum_s, const float* max_t,
                 const float* log_sum_t, const float* grad_rows, const float* teacher_grad_rows,
                 const float* ce_log_sum_s, const float* ce_grad_rows, float inv_t, void* out, int64_t out_stride,
                 cudaStream_t stream) {
    auto kernel = ce_grad_rows ? student_grad_kernel<true, TS, TT> : student_grad_kernel<false, TS, TT>;
    kernel<<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        static_cast<const TS*>(s), s_stride, static_cast<const TT*>(t), t_stride, width, row_index, max_s,
        log_sum_s, max_t, log_sum_t, grad_rows, teacher_grad_rows, ce_log_sum_s, ce_grad_rows, inv_t,
        static_cast<TS*>(out), out_stride);
    return static_cast<int>(cudaGetLastError());
  }
};

constexpr int64_t kMaxRows = 2147483647;  // gridDim.x

}  // namespace

extern "C" int salt_kl_row_stats_cuda(const void* student, int64_t student_row_stride, int student_dtype,
                                      const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                                      int64_t rows, int64_t width, const int64_t* row_index, float inv_temperature,
                                      int with_ce_sum, float* stats, int64_t stream) {
  if (rows < 0 || width < 0 || rows > kMaxRows) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  return dispatch<LaunchStats>(student_dtype, teacher_dtype, student, student_row_stride, teacher,
                               teacher_row_stride, rows, width, row_index, inv_temperature, with_ce_sum, stats,
                               reinterpret_cast<cudaStream_t>(stream));
}

extern "C" int salt_kl_student_grad_cuda(const void* student, int64_t student_row_stride, int student_dtype,
                                         const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                                         int64_t rows, int64_t width, const int64_t* row_index, const float* max_s,
                                         const float* log_sum_s, const float* max_t, const float* log_sum_t,
                                         const float* grad_rows, const float* teacher_grad_rows,
                                         const float* ce_log_sum_s, const float* ce_grad_rows,
                                         float inv_temperature, void* out, int64_t out_row_stride,
                                         int64_t stream) {
  if (rows < 0 || width < 0 || rows > kMaxRows) return static_cast<int>(cudaErrorInvalidValue);
  if ((ce_log_sum_s == nullptr) != (ce_grad_rows == nullptr)) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || width == 0) return 0;
  return dispatch<LaunchGrad>(student_dtype, teacher_dtype, student, student_row_stride, teacher,
                              teacher_row_stride, rows, width, row_index, max_s, log_sum_s, max_t, log_sum_t,
                              grad_rows, teacher_grad_rows, ce_log_sum_s, ce_grad_rows, inv_temperature, out,
                              out_row_stride, reinterpret_cast<cudaStream_t>(stream));
}

extern "C" const char* salt_kl_cuda_error_string(int code) {
  if (code == -1) return "unsupported dtype code";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
