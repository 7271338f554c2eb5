// Thin torch binding of the CPU kernel (csrc/kl_div_cpu.cpp): checks the tensors, passes pointers and strides.
#include "binding_common.h"  // first: it checks the build flags before the long parse of torch's headers
#include <torch/extension.h>

#include "salt_kl.h"

namespace {

using salt_kl_binding::dtype_code;

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [rows, width], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, "'s last dimension must be contiguous");
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= 0, name, " must have a non-negative row stride");
}

// Indices of the rows to process (int64, contiguous, in range), or nullptr for all rows.
const int64_t* row_index_ptr(const c10::optional<at::Tensor>& row_index, at::Tensor& holder, int64_t num_rows) {
  if (!row_index.has_value()) return nullptr;
  holder = row_index->contiguous();
  TORCH_CHECK(holder.device().is_cpu() && holder.scalar_type() == at::kLong && holder.dim() == 1,
              "row_index must be a 1-D int64 CPU tensor");
  const int64_t* p = holder.data_ptr<int64_t>();
  for (int64_t i = 0; i < holder.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < num_rows, "row_index[", i, "] = ", p[i], " is out of range [0, ", num_rows, ")");
  return p;
}

at::Tensor row_stats(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                     const c10::optional<at::Tensor>& row_index, bool with_ce_sum) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student and teacher must have the same shape");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  at::Tensor index_holder;
  const int64_t* index = row_index_ptr(row_index, index_holder, student.size(0));
  const int64_t rows = index ? index_holder.numel() : student.size(0);
  at::Tensor stats = at::empty({rows, with_ce_sum ? 6 : 5}, student.options().dtype(at::kFloat));
  const int rc = salt_kl_row_stats_cpu(student.data_ptr(), student.stride(0), dtype_code(student, "student"),
                                       teacher.data_ptr(), teacher.stride(0), dtype_code(teacher, "teacher"), rows,
                                       student.size(1), index, static_cast<float>(1.0 / temperature),
                                       with_ce_sum ? 1 : 0, stats.data_ptr<float>(), at::get_num_threads());
  TORCH_CHECK(rc == 0, "salt_kl_row_stats_cpu failed (", rc, ")");
  return stats;
}

void student_grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& max_s,
                  const at::Tensor& log_sum_s, const at::Tensor& max_t, const at::Tensor& log_sum_t,
                  const at::Tensor& grad_rows, double temperature, at::Tensor& out,
                  const c10::optional<at::Tensor>& row_index, const c10::optional<at::Tensor>& teacher_grad_rows,
                  const c10::optional<at::Tensor>& ce_log_sum_s, const c10::optional<at::Tensor>& ce_grad_rows) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  check_logits(out, "out");
  TORCH_CHECK(student.sizes() == teacher.sizes() && student.sizes() == out.sizes(),
              "student, teacher and out must have the same shape");
  TORCH_CHECK(out.scalar_type() == student.scalar_type(), "out must have the student's dtype");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  at::Tensor index_holder;
  const int64_t* index = row_index_ptr(row_index, index_holder, student.size(0));
  const int64_t rows = index ? index_holder.numel() : student.size(0);
  // O(rows) vectors: fp32 and contiguous (the upstream gradient is often an expanded scalar)
  TORCH_CHECK(ce_log_sum_s.has_value() == ce_grad_rows.has_value(), "ce_log_sum_s and ce_grad_rows go together");
  const bool ce = ce_grad_rows.has_value();
  at::Tensor vec[8] = {max_s, log_sum_s, max_t, log_sum_t, grad_rows,
                       teacher_grad_rows.has_value() ? *teacher_grad_rows : grad_rows,
                       ce ? *ce_log_sum_s : grad_rows, ce ? *ce_grad_rows : grad_rows};
  for (auto& v : vec) {
    TORCH_CHECK(v.device().is_cpu() && v.numel() == rows,
                "max_s, log_sum_s, max_t, log_sum_t and grad_rows (and teacher_grad_rows, ce_log_sum_s, "
                "ce_grad_rows) must be CPU vectors of one entry per processed row (",
                rows, ")");
    v = v.to(at::kFloat).contiguous();
  }
  const int rc = salt_kl_student_grad_cpu(
      student.data_ptr(), student.stride(0), dtype_code(student, "student"), teacher.data_ptr(), teacher.stride(0),
      dtype_code(teacher, "teacher"), rows, student.size(1), index, vec[0].data_ptr<float>(),
      vec[1].data_ptr<float>(), vec[2].data_ptr<float>(), vec[3].data_ptr<float>(), vec[4].data_ptr<float>(),
      vec[5].data_ptr<float>(), ce ? vec[6].data_ptr<float>() : nullptr, ce ? vec[7].data_ptr<float>() : nullptr,
      static_cast<float>(1.0 / temperature), out.data_ptr(), out.stride(0), at::get_num_threads());
  TORCH_CHECK(rc == 0, "salt_kl_student_grad_cpu failed (", rc, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_logsumexp(const at::Tensor& logits, int64_t k,
                                                              double temperature) {
  check_logits(logits, "logits");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  TORCH_CHECK(k >= 1 && k <= logits.size(1), "k must be in [1, ", logits.size(1), "], got ", k);
  const int64_t rows = logits.size(0);
  at::Tensor values = at::empty({rows, k}, logits.options().dtype(at::kFloat));
  at::Tensor columns = at::empty({rows, k}, logits.options().dtype(at::kLong));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  const int rc = salt_topk_logsumexp_cpu(logits.data_ptr(), logits.stride(0), dtype_code(logits, "logits"), rows,
                                         logits.size(1), k, static_cast<float>(1.0 / temperature),
                                         values.data_ptr<float>(), columns.data_ptr<int64_t>(),
                                         lse.data_ptr<float>(), at::get_num_threads());
  TORCH_CHECK(rc == 0, "salt_topk_logsumexp_cpu failed (", rc, ")");
  return {values, columns, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "salt_megatron fused KL-divergence kernels (CPU)";
  m.attr("CONTRACT_VERSION") = SALT_KL_CONTRACT_VERSION;
  m.def("row_stats", &row_stats,
        "per-row [max_s, sum_s, max_t, sum_t, partial KL(, sum_s at τ = 1)] of one vocabulary shard "
        "(fp32 [rows, 5 or 6])",
        py::arg("student"), py::arg("teacher"), py::arg("temperature"), py::arg("row_index") = py::none(),
        py::arg("with_ce_sum") = false);
  m.def("student_grad", &student_grad,
        "write (softmax(s/τ)·g - softmax(t/τ)·g_t)/τ (+ softmax(s)·g_ce) into out",
        py::arg("student"), py::arg("teacher"), py::arg("max_s"), py::arg("log_sum_s"), py::arg("max_t"),
        py::arg("log_sum_t"), py::arg("grad_rows"), py::arg("temperature"), py::arg("out"),
        py::arg("row_index") = py::none(), py::arg("teacher_grad_rows") = py::none(),
        py::arg("ce_log_sum_s") = py::none(), py::arg("ce_grad_rows") = py::none());
  m.def("topk_logsumexp", &topk_logsumexp,
        "the k largest of logits/τ per row (fp32 values, int64 columns; best first) and log Σ exp(logits/τ)",
        py::arg("logits"), py::arg("k"), py::arg("temperature"));
}
