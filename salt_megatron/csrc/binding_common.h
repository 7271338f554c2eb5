// Shared by the two thin torch bindings (CPU and CUDA): torch dtype -> the kernels' dtype code.
#pragma once

#ifndef SALT_KL_CONTRACT_VERSION
#error "SALT_KL_CONTRACT_VERSION is not defined: build with setup.py or salt_megatron.kd.build (flags in salt_megatron/kd/kernel_flags.py)"
#endif

#include <torch/extension.h>

#include "salt_kl.h"

namespace salt_kl_binding {

inline int dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return SALT_KL_FLOAT32;
    case at::kBFloat16:
      return SALT_KL_BFLOAT16;
    case at::kHalf:
      return SALT_KL_FLOAT16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return -1;
}

}  // namespace salt_kl_binding
