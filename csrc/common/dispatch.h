// PFP_DISPATCH_FLOATING(dtype, name, ...): run the lambda body with `scalar_t` bound to float,
// at::Half or at::BFloat16 -- exactly the three dtypes the kernels are instantiated for.
// Callers check the dtype first (PFP_CHECK_FLOATING) so the default branch is unreachable.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define PFP_DISPATCH_CASE_(enum_type, cpp_type, ...) \
  case enum_type: {                                  \
    using scalar_t = cpp_type;                       \
    __VA_ARGS__();                                   \
    break;                                           \
  }

#define PFP_DISPATCH_FLOATING(dtype, name, ...)                                   \
  [&] {                                                                           \
    switch (dtype) {                                                              \
      PFP_DISPATCH_CASE_(at::kFloat, float, __VA_ARGS__)                          \
      PFP_DISPATCH_CASE_(at::kHalf, at::Half, __VA_ARGS__)                        \
      PFP_DISPATCH_CASE_(at::kBFloat16, at::BFloat16, __VA_ARGS__)                \
      default:                                                                    \
        TORCH_CHECK(false, name ": unsupported dtype ", dtype,                    \
                    " (expected float32, float16 or bfloat16)");                 \
    }                                                                             \
  }()
