// Argument checks shared by every host function in csrc/.
//
// Each macro names the offending argument and what was expected, so a failing call reads like
//   "lora_shrink: a must have shape (R, K=120) to match x (M, K), got [3, 64]"
// All macros throw c10::Error (RuntimeError in Python) through TORCH_CHECK.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// `t` lives on a CUDA device (the ops are registered for the CUDA dispatch key only, but a call
// mixing CPU and CUDA tensors still reaches the CUDA kernel).
#define PFP_CHECK_CUDA(op, t)                                                                   \
  TORCH_CHECK((t).is_cuda(), op ": " #t " must be a CUDA tensor, got a tensor on device ", \
              (t).device())

// `t` is on the same device as `ref` (same CUDA ordinal).
#define PFP_CHECK_SAME_DEVICE(op, t, ref)                                                  \
  TORCH_CHECK((t).device() == (ref).device(), op ": " #t " must be on the same device as " #ref \
              " (", (ref).device(), "), got ", (t).device())

// `t` has the same dtype as `ref`.
#define PFP_CHECK_SAME_DTYPE(op, t, ref)                                                        \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), op ": " #t " must have the dtype of " #ref \
              " (", (ref).scalar_type(), "), got ", (t).scalar_type())

// `t` is float32, float16 or bfloat16 (the dtypes every pyfastpeft kernel is instantiated for).
#define PFP_CHECK_FLOATING(op, t)                                                                 \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||               \
                  (t).scalar_type() == at::kBFloat16,                                             \
              op ": " #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())

// `t` has exactly `nd` dimensions; `desc` spells them with the dimension letters, e.g. "(M, K)".
#define PFP_CHECK_DIM(op, t, nd, desc)                                                     \
  TORCH_CHECK((t).dim() == (nd), op ": " #t " must be " #nd "-D " desc ", got shape ", \
              (t).sizes())

// size(dim) of `t` equals `expected`; `desc` is the full expected shape, e.g. "(N, R) with R = u.size(1)".
#define PFP_CHECK_SHAPE(op, t, dim, expected, desc)                                                \
  TORCH_CHECK((t).size(dim) == (expected), op ": " #t " must have shape " desc " (size(", dim, \
              ") = ", (expected), "), got shape ", (t).sizes())

// The last dimension of `t` is contiguous (stride 1, or size <= 1 where the stride is irrelevant).
#define PFP_CHECK_LASTDIM_CONTIG(op, t)                                                        \
  TORCH_CHECK((t).size(-1) <= 1 || (t).stride(-1) == 1,                                        \
              op ": " #t " must be contiguous in its last dimension (stride(-1) == 1), got strides ", \
              (t).strides())
