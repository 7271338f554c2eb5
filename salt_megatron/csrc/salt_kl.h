// salt_megatron fused KL-divergence kernels: the C interface shared by the CPU and CUDA kernels and their bindings.
//
// No torch header here (nor in the kernels): the kernels take raw pointers, sizes, row strides and a dtype code;
// the thin torch bindings (kl_div_cpu_binding.cpp, kl_div_cuda_binding.cpp) check tensors and pass them on.
//
// Contract (salt_megatron/kd/protocol.py; the PyTorch reference is salt_megatron/kd/torch_kernels.py):
//   row_stats:    for each of `rows` rows r (r = row_index[i] when row_index != NULL, else i), over the first
//                 `width` columns of student row r and teacher row r, write stats[i*n + 0..4] (fp32; n = 5, or 6
//                 with `with_ce_sum`), relative to the row maxima of the raw logits (τ > 0):
//                   max_s, Σ exp((s - max_s)/τ), max_t, Σ exp((t - max_t)/τ),
//                   Σ exp((t - max_t)/τ)·((t - max_t) - (s - max_s))/τ        (a 0·inf term counts as 0)
//                 and with `with_ce_sum` a sixth, Σ exp(s - max_s): the student's sum at τ = 1, for the next-token
//                 CE when τ != 1 (both sums from the same read of the row).  width == 0 gives -inf, 0, -inf, 0, 0
//                 (and 0).
//   student_grad: out[r, j] = (q · grad_rows[i] - p · teacher_grad_rows[i]) / τ  [+ q1 · ce_grad_rows[i]],
//                   q = exp((s - max_s[i])/τ - log_sum_s[i]),  p = exp((t - max_t[i])/τ - log_sum_t[i]),
//                   q1 = exp(s - max_s[i] - ce_log_sum_s[i])      (softmax(s) at τ = 1: CE's gradient, less the
//                                                                 one-hot the caller subtracts at the label)
//                 with the global (all-shard) row maxima and log-sums; fp32 math, cast to the student's dtype;
//                 rows not listed in row_index are not touched.  teacher_grad_rows NULL means teacher_grad_rows =
//                 grad_rows, i.e. (q - p)/τ · grad_rows[i], the KL gradient.  ce_log_sum_s and ce_grad_rows are
//                 both NULL (no q1 term) or both set.  Weighting the terms apart lets a next-token CE gradient be
//                 written in the same pass: at τ = 1 through teacher_grad_rows (q1 = q), at τ != 1 through q1.
// Strides are in elements; the last dimension is contiguous.  `inv_temperature` = 1/τ.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The contract's version, SALT_KL_CONTRACT_VERSION, is not defined here: the compiler gets it from the one home of
// the build flags, salt_megatron/kd/kernel_flags.py (setup.py and the JIT build both pass it).

// dtype codes (bindings map torch dtypes to them: binding_common.h)
enum salt_kl_dtype { SALT_KL_FLOAT32 = 0, SALT_KL_BFLOAT16 = 1, SALT_KL_FLOAT16 = 2 };

// ---- CPU (csrc/kl_div_cpu.cpp); return 0 on success, non-zero for a bad argument (unknown dtype) ----
int salt_kl_row_stats_cpu(const void* student, int64_t student_row_stride, int student_dtype,
                          const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                          int64_t rows, int64_t width, const int64_t* row_index, float inv_temperature,
                          int with_ce_sum, float* stats, int num_threads);

int salt_kl_student_grad_cpu(const void* student, int64_t student_row_stride, int student_dtype,
                             const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                             int64_t rows, int64_t width, const int64_t* row_index, const float* max_s,
                             const float* log_sum_s, const float* max_t, const float* log_sum_t,
                             const float* grad_rows, const float* teacher_grad_rows, const float* ce_log_sum_s,
                             const float* ce_grad_rows, float inv_temperature, void* out, int64_t out_row_stride,
                             int num_threads);

// ---- CPU (csrc/topk_cpu.cpp): for each of `rows` rows, the k largest of x/τ over the first `width` columns,
// best first (ties: the lower column first), as fp32 values[r*k + i] and columns[r*k + i], and the row's
// log Σ exp(x/τ) in log_sum_exp[r] (-inf for a row of -inf).  1 <= k <= width; 0 on success. ----
int salt_topk_logsumexp_cpu(const void* logits, int64_t row_stride, int dtype, int64_t rows, int64_t width,
                            int64_t k, float inv_temperature, float* values, int64_t* columns, float* log_sum_exp,
                            int num_threads);

// ---- CUDA (csrc/kl_div_cuda.cu); every pointer is device memory; `stream` is a cudaStream_t as an integer.
// Return a cudaError_t as int (0 = cudaSuccess; salt_kl_cuda_error_string() names it); -1 for a bad dtype. ----
int salt_kl_row_stats_cuda(const void* student, int64_t student_row_stride, int student_dtype,
                           const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                           int64_t rows, int64_t width, const int64_t* row_index, float inv_temperature,
                           int with_ce_sum, float* stats, int64_t stream);

int salt_kl_student_grad_cuda(const void* student, int64_t student_row_stride, int student_dtype,
                              const void* teacher, int64_t teacher_row_stride, int teacher_dtype,
                              int64_t rows, int64_t width, const int64_t* row_index, const float* max_s,
                              const float* log_sum_s, const float* max_t, const float* log_sum_t,
                              const float* grad_rows, const float* teacher_grad_rows, const float* ce_log_sum_s,
                              const float* ce_grad_rows, float inv_temperature, void* out, int64_t out_row_stride,
                              int64_t stream);

const char* salt_kl_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
