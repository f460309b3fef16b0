// Exact batched Cayley transform (CUDA dispatch key only); schema in csrc/pyfastpeft_C.cpp:
//
//   cayley_exact(v, block_size, minus) -> R
//     v (G, n) fp32, n = b(b-1)/2: the strict upper triangle of each skew-symmetric Q_g in the row-major
//     order of torch.triu_indices(b, b, 1); R (G, b, b) fp32:
//       minus: R = (I - Q)(I + Q)^-1      plus: R = (I + Q)(I - Q)^-1
//
// One thread block per b x b block, the whole matrix in shared memory (b <= 128: 66 KB, opted in above
// the 48 KB default). With N = I + sigma Q (sigma = +1 minus, -1 plus), R = 2 N^-1 - I, and N^-1 comes
// from an in-place Gauss-Jordan inversion without pivoting: N's symmetric part is I and so is every
// Schur complement's, hence every pivot is >= 1 and cond(N) <= 1 + |Q|_2. fp32 throughout (PEFT #3087
// came from half-precision solves; callers upcast fp16/bf16 parameters). The backward needs only R
// (dQ = -/+ 1/2 (R^T + I) dR (R^T + I)) and runs as two batched GEMMs in ATen.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"

namespace pyfastpeft_C {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlock = 128;

__global__ void cayley_exact_kernel(const float* __restrict__ v, float* __restrict__ out, int b, int64_t n,
                                    float sigma) {
  extern __shared__ float smem[];
  const int ld = b + 1;  // +1 column: row and column sweeps hit different banks
  float* A = smem;                  // b x ld
  float* rowk = smem + b * ld;      // b
  float* colk = rowk + b;           // b
  const int64_t g = blockIdx.x;
  const float* vg = v + g * n;
  const int bb = b * b;

  // N = I + sigma * Q, gathered from the packed triangle
  for (int e = threadIdx.x; e < bb; e += blockDim.x) {
    const int i = e / b, j = e % b;
    float q = 0.f;
    if (i != j) {
      const int lo = i < j ? i : j, hi = i < j ? j : i;
      const int64_t idx = (int64_t)lo * b - (int64_t)lo * (lo + 1) / 2 + (hi - lo - 1);
      q = i < j ? vg[idx] : -vg[idx];
    }
    A[i * ld + j] = (i == j ? 1.f : 0.f) + sigma * q;
  }
  __syncthreads();

  for (int k = 0; k < b; ++k) {
    const float inv_p = 1.f / A[k * ld + k];  // pivot >= 1
    for (int t = threadIdx.x; t < b; t += blockDim.x) {
      rowk[t] = (t == k ? 1.f : A[k * ld + t]) * inv_p;
      colk[t] = A[t * ld + k];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < bb; e += blockDim.x) {
      const int i = e / b, j = e % b;
      A[i * ld + j] = (i == k) ? rowk[j] : ((j == k ? 0.f : A[i * ld + j]) - colk[i] * rowk[j]);
    }
    __syncthreads();
  }

  float* og = out + g * bb;
  for (int e = threadIdx.x; e < bb; e += blockDim.x) {
    const int i = e / b, j = e % b;
    og[e] = 2.f * A[i * ld + j] - (i == j ? 1.f : 0.f);
  }
}

at::Tensor cayley_exact_cuda(const at::Tensor& v_in, int64_t block_size, bool minus) {
  PFP_CHECK_CUDA("cayley_exact", v_in);
  PFP_CHECK_DIM("cayley_exact", v_in, 2, "(G, b(b-1)/2)");
  TORCH_CHECK(v_in.scalar_type() == at::kFloat, "cayley_exact: v must be float32 (the solve runs in fp32), got ",
              v_in.scalar_type());
  TORCH_CHECK(block_size >= 2 && block_size <= kMaxBlock, "cayley_exact: block_size must be in 2..", kMaxBlock,
              ", got ", block_size);
  const int64_t b = block_size, n = b * (b - 1) / 2;
  PFP_CHECK_SHAPE("cayley_exact", v_in, 1, n, "(G, b(b-1)/2)");
  const c10::cuda::CUDAGuard guard(v_in.device());
  const at::Tensor v = v_in.contiguous();
  const int64_t G = v.size(0);
  at::Tensor out = at::empty({G, b, b}, v.options());
  if (G == 0) return out;
  TORCH_CHECK(G <= 2147483647, "cayley_exact: too many blocks for one launch (G=", G, ")");
  const size_t smem = sizeof(float) * (b * (b + 1) + 2 * b);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(cayley_exact_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cayley_exact_kernel<<<static_cast<unsigned>(G), kThreads, smem, stream>>>(
      v.const_data_ptr<float>(), out.mutable_data_ptr<float>(), static_cast<int>(b), n, minus ? 1.f : -1.f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace pyfastpeft_C

// Schemas of this file's ops (the extension's namespace is created in csrc/pyfastpeft_C.cpp).
TORCH_LIBRARY_FRAGMENT(pyfastpeft_C, m) {
  // Exact batched Cayley (csrc/orthogonal/cayley.cu): v (G, b(b-1)/2) fp32 packed upper triangles ->
  // R (G, b, b) fp32, (I - Q)(I + Q)^-1 if minus else (I + Q)(I - Q)^-1; 2 <= b <= 128.
  m.def("cayley_exact(Tensor v, int block_size, bool minus) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfastpeft_C, CUDA, m) {
  m.impl("cayley_exact", TORCH_FN(pyfastpeft_C::cayley_exact_cuda));
}
