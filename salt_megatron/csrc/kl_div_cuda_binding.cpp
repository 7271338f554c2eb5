// Thin torch binding of the CUDA kernel (csrc/kl_div_cuda.cu): checks the tensors and calls the extern "C"
// launchers with data pointers, strides and the current stream, which Python passes as an integer
// (torch.cuda.current_stream().cuda_stream) inside a device guard.  Only torch/extension.h: no CUDA header.
#include "binding_common.h"  // first: it checks the build flags before the long parse of torch's headers
#include <torch/extension.h>

#include "salt_kl.h"

namespace {

using salt_kl_binding::dtype_code;

void check_logits(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), name, " must be on ", like.device(), ", got ", x.device());
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [rows, width], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, "'s last dimension must be contiguous");
}

const int64_t* row_index_ptr(const c10::optional<at::Tensor>& row_index, at::Tensor& holder,
                             const at::Tensor& like) {
  if (!row_index.has_value()) return nullptr;
  holder = row_index->contiguous();
  TORCH_CHECK(holder.device() == like.device() && holder.scalar_type() == at::kLong && holder.dim() == 1,
              "row_index must be a 1-D int64 tensor on ", like.device());
  return holder.data_ptr<int64_t>();
}

void check_rc(int rc, const char* what) {
  TORCH_CHECK(rc == 0, what, " failed: ", salt_kl_cuda_error_string(rc));
}

at::Tensor row_stats(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                     const c10::optional<at::Tensor>& row_index, bool with_ce_sum, int64_t stream) {
  check_logits(student, student, "student");
  check_logits(teacher, student, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student and teacher must have the same shape");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  at::Tensor index_holder;
  const int64_t* index = row_index_ptr(row_index, index_holder, student);
  const int64_t rows = index ? index_holder.numel() : student.size(0);
  at::Tensor stats = at::empty({rows, with_ce_sum ? 6 : 5}, student.options().dtype(at::kFloat));
  check_rc(salt_kl_row_stats_cuda(student.data_ptr(), student.stride(0), dtype_code(student, "student"),
                                  teacher.data_ptr(), teacher.stride(0), dtype_code(teacher, "teacher"), rows,
                                  student.size(1), index, static_cast<float>(1.0 / temperature),
                                  with_ce_sum ? 1 : 0, stats.data_ptr<float>(), stream),
           "salt_kl_row_stats_cuda");
  return stats;
}

void student_grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& max_s,
                  const at::Tensor& log_sum_s, const at::Tensor& max_t, const at::Tensor& log_sum_t,
                  const at::Tensor& grad_rows, double temperature, at::Tensor& out,
                  const c10::optional<at::Tensor>& row_index, const c10::optional<at::Tensor>& teacher_grad_rows,
                  const c10::optional<at::Tensor>& ce_log_sum_s, const c10::optional<at::Tensor>& ce_grad_rows,
                  int64_t stream) {
  check_logits(student, student, "student");
  check_logits(teacher, student, "teacher");
  check_logits(out, student, "out");
  TORCH_CHECK(student.sizes() == teacher.sizes() && student.sizes() == out.sizes(),
              "student, teacher and out must have the same shape");
  TORCH_CHECK(out.scalar_type() == student.scalar_type(), "out must have the student's dtype");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  at::Tensor index_holder;
  const int64_t* index = row_index_ptr(row_index, index_holder, student);
  const int64_t rows = index ? index_holder.numel() : student.size(0);
  // O(rows) vectors: fp32 and contiguous (the upstream gradient is often an expanded scalar)
  // (teacher_grad_rows absent: grad_rows weights both terms, and the kernel gets NULL for it)
  // (ce_log_sum_s/ce_grad_rows absent: no CE term at τ = 1, NULLs for both)
  TORCH_CHECK(ce_log_sum_s.has_value() == ce_grad_rows.has_value(), "ce_log_sum_s and ce_grad_rows go together");
  const bool split = teacher_grad_rows.has_value(), ce = ce_grad_rows.has_value();
  at::Tensor vec[8] = {max_s, log_sum_s, max_t, log_sum_t, grad_rows, split ? *teacher_grad_rows : at::Tensor(),
                       ce ? *ce_log_sum_s : at::Tensor(), ce ? *ce_grad_rows : at::Tensor()};
  for (int k = 0; k < 8; ++k) {
    at::Tensor& v = vec[k];
    if (!v.defined()) continue;
    TORCH_CHECK(v.device() == student.device() && v.numel() == rows,
                "max_s, log_sum_s, max_t, log_sum_t and grad_rows (and teacher_grad_rows, ce_log_sum_s, "
                "ce_grad_rows) must be vectors on ", student.device(), " with one entry per processed row (", rows,
                ")");
    v = v.to(at::kFloat).contiguous();
  }
  check_rc(salt_kl_student_grad_cuda(student.data_ptr(), student.stride(0), dtype_code(student, "student"),
                                     teacher.data_ptr(), teacher.stride(0), dtype_code(teacher, "teacher"), rows,
                                     student.size(1), index, vec[0].data_ptr<float>(), vec[1].data_ptr<float>(),
                                     vec[2].data_ptr<float>(), vec[3].data_ptr<float>(), vec[4].data_ptr<float>(),
                                     split ? vec[5].data_ptr<float>() : nullptr,
                                     ce ? vec[6].data_ptr<float>() : nullptr, ce ? vec[7].data_ptr<float>() : nullptr,
                                     static_cast<float>(1.0 / temperature), out.data_ptr(), out.stride(0), stream),
           "salt_kl_student_grad_cuda");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "salt_megatron fused KL-divergence kernels (CUDA)";
  m.attr("CONTRACT_VERSION") = SALT_KL_CONTRACT_VERSION;
  m.def("row_stats", &row_stats,
        "per-row [max_s, sum_s, max_t, sum_t, partial KL(, sum_s at τ = 1)] of one vocabulary shard (fp32 [rows, 5 "
        "or 6]), on `stream`",
        py::arg("student"), py::arg("teacher"), py::arg("temperature"), py::arg("row_index"), py::arg("with_ce_sum"),
        py::arg("stream"));
  m.def("student_grad", &student_grad,
        "write (softmax(s/τ)·grad_rows - softmax(t/τ)·teacher_grad_rows)/τ (+ softmax(s)·ce_grad_rows) into out "
        "(teacher_grad_rows None: = grad_rows), on `stream`",
        py::arg("student"), py::arg("teacher"), py::arg("max_s"), py::arg("log_sum_s"), py::arg("max_t"),
        py::arg("log_sum_t"), py::arg("grad_rows"), py::arg("temperature"), py::arg("out"), py::arg("row_index"),
        py::arg("teacher_grad_rows"), py::arg("ce_log_sum_s"), py::arg("ce_grad_rows"), py::arg("stream"));
}
