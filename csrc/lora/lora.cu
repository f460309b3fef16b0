// Host side of the LoRA rank-R ops (CUDA dispatch key only), schemas in csrc/pyfastpeft_C.cpp:
//
//   lora_shrink(x, a) -> u                 u = x @ a.T         x (M, K), a (R, K) -> u (M, R)
//   lora_expand_add_(y, u, b, scale)       y += scale * u @ b.T  y (M, N), u (M, R), b (N, R)
//
// dtypes: float32, float16, bfloat16; all tensors share x's / y's dtype and device; fp32
// accumulation, output rounded once (expand_add also adds y in fp32 before rounding).
// Layouts: x may have any strides (copied to a contiguous K dimension only when stride(1) != 1);
// y must have stride(1) == 1 (it is written in place, so it is never copied) and must not overlap
// u or b; a, u, b are made contiguous (they are small: R columns). M, K, N may be 0; any R >= 0.
// The big GEMMs of LoRA (x @ W.T) are not done here: cuBLAS runs them through ATen in Python.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "lora/lora_kernels.cuh"

namespace pyfastpeft_C {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, int RT>
void launch_shrink(const at::Tensor& x, const at::Tensor& a, at::Tensor& u, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  const int64_t grid_m = ceil_div(M, kShrinkRows);
  const int64_t grid_r = ceil_div(R, RT);
  TORCH_CHECK(grid_m <= std::numeric_limits<int32_t>::max() && grid_r <= 65535,
              "lora_shrink: problem too large for one launch (M=", M, ", R=", R, ")");
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_r));
  lora_shrink_kernel<scalar_t, RT><<<grid, kShrinkThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), x.stride(0), a.const_data_ptr<scalar_t>(),
      u.mutable_data_ptr<scalar_t>(), M, K, R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& a_in) {
  PFP_CHECK_CUDA("lora_shrink", x_in);
  PFP_CHECK_CUDA("lora_shrink", a_in);
  PFP_CHECK_SAME_DEVICE("lora_shrink", a_in, x_in);
  PFP_CHECK_FLOATING("lora_shrink", x_in);
  PFP_CHECK_SAME_DTYPE("lora_shrink", a_in, x_in);
  PFP_CHECK_DIM("lora_shrink", x_in, 2, "(M, K)");
  PFP_CHECK_DIM("lora_shrink", a_in, 2, "(R, K)");
  PFP_CHECK_SHAPE("lora_shrink", a_in, 1, x_in.size(1), "(R, K) with K = x.size(1)");

  const c10::cuda::CUDAGuard guard(x_in.device());
  // Any row stride is fine for the kernel; only K must be unit-stride.
  const at::Tensor x = (x_in.size(1) <= 1 || x_in.stride(1) == 1) ? x_in : x_in.contiguous();
  const at::Tensor a = a_in.contiguous();
  const int64_t M = x.size(0), R = a.size(0);
  at::Tensor u = at::empty({M, R}, x.options());
  if (M == 0 || R == 0) return u;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PFP_DISPATCH_FLOATING(x.scalar_type(), "lora_shrink", [&] {
    // The smallest rank chunk that covers R: fewer idle accumulators for the usual small ranks.
    if (R <= 4) {
      launch_shrink<scalar_t, 4>(x, a, u, stream);
    } else if (R <= 8) {
      launch_shrink<scalar_t, 8>(x, a, u, stream);
    } else if (R <= 16) {
      launch_shrink<scalar_t, 16>(x, a, u, stream);
    } else {
      launch_shrink<scalar_t, 32>(x, a, u, stream);
    }
  });
  return u;
}

void lora_expand_add_cuda(const at::Tensor& y, const at::Tensor& u_in, const at::Tensor& b_in,
                          double scale) {
  PFP_CHECK_CUDA("lora_expand_add_", y);
  PFP_CHECK_CUDA("lora_expand_add_", u_in);
  PFP_CHECK_CUDA("lora_expand_add_", b_in);
  PFP_CHECK_SAME_DEVICE("lora_expand_add_", u_in, y);
  PFP_CHECK_SAME_DEVICE("lora_expand_add_", b_in, y);
  PFP_CHECK_FLOATING("lora_expand_add_", y);
  PFP_CHECK_SAME_DTYPE("lora_expand_add_", u_in, y);
  PFP_CHECK_SAME_DTYPE("lora_expand_add_", b_in, y);
  PFP_CHECK_DIM("lora_expand_add_", y, 2, "(M, N)");
  PFP_CHECK_DIM("lora_expand_add_", u_in, 2, "(M, R)");
  PFP_CHECK_DIM("lora_expand_add_", b_in, 2, "(N, R)");
  PFP_CHECK_SHAPE("lora_expand_add_", u_in, 0, y.size(0), "(M, R) with M = y.size(0)");
  PFP_CHECK_SHAPE("lora_expand_add_", b_in, 0, y.size(1), "(N, R) with N = y.size(1)");
  PFP_CHECK_SHAPE("lora_expand_add_", b_in, 1, u_in.size(1), "(N, R) with R = u.size(1)");
  PFP_CHECK_LASTDIM_CONTIG("lora_expand_add_", y);
  at::assert_no_internal_overlap(y);
  at::assert_no_overlap(y, u_in);
  at::assert_no_overlap(y, b_in);

  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const int64_t M = y.size(0), N = y.size(1), R = u.size(1);
  if (M == 0 || N == 0 || R == 0) return;  // y += scale * (empty sum) leaves y unchanged

  const int64_t grid_m = ceil_div(M, kExpandRows);
  const int64_t grid_n = ceil_div(N, kExpandThreads);
  TORCH_CHECK(grid_m <= std::numeric_limits<int32_t>::max() && grid_n <= 65535,
              "lora_expand_add_: problem too large for one launch (M=", M, ", N=", N, ")");
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PFP_DISPATCH_FLOATING(y.scalar_type(), "lora_expand_add_", [&] {
    lora_expand_add_kernel<scalar_t, false><<<grid, kExpandThreads, 0, stream>>>(
        y.mutable_data_ptr<scalar_t>(), y.stride(0), u.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(), static_cast<float>(scale), M, N, R, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace pyfastpeft_C

// Schemas of this file's ops (the extension's namespace is created in csrc/pyfastpeft_C.cpp).
TORCH_LIBRARY_FRAGMENT(pyfastpeft_C, m) {
  // u = x @ a.T; x (M, K), a (R, K) -> u (M, R) in x.dtype, fp32 accumulation.
  m.def("lora_shrink(Tensor x, Tensor a) -> Tensor");
  // y += scale * u @ b.T, in place; y (M, N), u (M, R), b (N, R), fp32 accumulation.
  m.def("lora_expand_add_(Tensor(a!) y, Tensor u, Tensor b, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(pyfastpeft_C, CUDA, m) {
  m.impl("lora_shrink", TORCH_FN(pyfastpeft_C::lora_shrink_cuda));
  m.impl("lora_expand_add_", TORCH_FN(pyfastpeft_C::lora_expand_add_cuda));
}
