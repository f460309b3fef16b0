// Token-selective LoRA (docs/token_selective.md): the gate with the stable compaction of the selected
// rows, and the expand on those rows only. CUDA dispatch key only; schemas in csrc/pyfastpeft_C.cpp.
//
//   gated_gate(u, gram, hsq, tau, scale) -> (ratio, selected, index, count)
//       u (M, R) fp32/fp16/bf16, gram = BᵀB (R, R) fp32, hsq (G, M) fp32 partial row sums of h² (any
//       G >= 1: the Triton base GEMM writes one row per program group, torch one row), tau 0-dim fp32.
//       ratio_i = scale·sqrt(u_iᵀ gram u_i) / max(sqrt(Σ_g hsq[g, i]), 1e-6)  (fp32)
//       selected_i = ratio_i >= max(tau, 0)                                     (bool; ties select)
//       NaN propagates through both maxima: a NaN ratio is reported NaN and never selected (as torch).
//       index[:count] = the selected rows in increasing order (int32), count (1,) int32 on the device.
//   gated_expand_add_(y, u, b, index, count, scale)
//       y[index[j]] += scale · u[index[j]] bᵀ for j < count, in place (the LoRA expand kernel with a
//       gather; blocks past the count return at once).
//
// Two launches for the gate: one warp per row computes ratio and flag (u_iᵀ gram u_i with lanes over
// the Gram's rows; gram and u are tiny and stay in L1/L2), then one block of 1024 threads scans the
// flags chunk by chunk (cub::BlockScan) and appends the indices: a stable compaction that reads one
// byte per row. Nothing of size M x N is read or written by the gate.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "lora/lora_kernels.cuh"

namespace pyfastpeft_C {
namespace {

constexpr int kGateThreads = 256;  // 8 warps, one row each per step
constexpr int kCompactThreads = 1024;
constexpr float kNormEps = 1e-6f;  // floor of ‖h_i‖ (spec §1)

// max(a, b) that returns NaN when a is NaN. fmaxf returns the other operand for a NaN, which would give a row
// with a NaN in u or h the ratio 0 (selected for tau <= 0) where torch computes NaN (never selected).
__device__ __forceinline__ float nan_max(float a, float b) { return isnan(a) ? a : fmaxf(a, b); }

template <typename scalar_t>
__global__ void __launch_bounds__(kGateThreads)
    gated_gate_kernel(const scalar_t* __restrict__ u, const float* __restrict__ gram,
                      const float* __restrict__ hsq, const float* __restrict__ tau,
                      float* __restrict__ ratio, bool* __restrict__ selected, float scale, int64_t M,
                      int64_t R, int64_t G) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kGateThreads / kWarp);
  const float t = nan_max(*tau, 0.f);  // a NaN tau selects nothing, as torch's clamp
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * (kGateThreads / kWarp) + threadIdx.x / kWarp; m < M;
       m += warps) {
    const scalar_t* um = u + m * R;
    float q = 0.f;  // lane j sums u_j (gram_j · u) over j = lane, lane + 32, ...
    for (int64_t j = lane; j < R; j += kWarp) {
      const float* gj = gram + j * R;
      float v = 0.f;
      for (int64_t k = 0; k < R; ++k) v = fmaf(gj[k], static_cast<float>(um[k]), v);
      q = fmaf(static_cast<float>(um[j]), v, q);
    }
    float ss = 0.f;
    for (int64_t g = lane; g < G; g += kWarp) ss += hsq[g * M + m];
    q = warp_sum(q);
    ss = warp_sum(ss);
    if (lane == 0) {
      const float r = sqrtf(nan_max(scale * scale * q, 0.f)) / nan_max(sqrtf(ss), kNormEps);
      ratio[m] = r;
      selected[m] = r >= t;  // false for a NaN ratio
    }
  }
}

__global__ void __launch_bounds__(kCompactThreads)
    gated_compact_kernel(const bool* __restrict__ selected, int32_t* __restrict__ index,
                         int32_t* __restrict__ count, int64_t M) {
  using Scan = cub::BlockScan<int32_t, kCompactThreads>;
  __shared__ typename Scan::TempStorage scan_s;
  int32_t base = 0;
  for (int64_t m0 = 0; m0 < M; m0 += kCompactThreads) {
    const int64_t m = m0 + threadIdx.x;
    const int32_t s = (m < M && selected[m]) ? 1 : 0;
    int32_t pos, total;
    Scan(scan_s).ExclusiveSum(s, pos, total);
    if (s) index[base + pos] = static_cast<int32_t>(m);
    base += total;
    __syncthreads();  // scan_s is reused by the next chunk
  }
  if (threadIdx.x == 0) *count = base;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_gate_cuda(
    const at::Tensor& u_in, const at::Tensor& gram_in, const at::Tensor& hsq_in, const at::Tensor& tau,
    double scale) {
  constexpr const char* op = "gated_gate";
  PFP_CHECK_CUDA("gated_gate", u_in);
  PFP_CHECK_CUDA("gated_gate", gram_in);
  PFP_CHECK_CUDA("gated_gate", hsq_in);
  PFP_CHECK_CUDA("gated_gate", tau);
  PFP_CHECK_SAME_DEVICE("gated_gate", gram_in, u_in);
  PFP_CHECK_SAME_DEVICE("gated_gate", hsq_in, u_in);
  PFP_CHECK_SAME_DEVICE("gated_gate", tau, u_in);
  PFP_CHECK_FLOATING("gated_gate", u_in);
  PFP_CHECK_DIM("gated_gate", u_in, 2, "(M, R)");
  PFP_CHECK_DIM("gated_gate", gram_in, 2, "(R, R)");
  PFP_CHECK_DIM("gated_gate", hsq_in, 2, "(G, M)");
  PFP_CHECK_SHAPE("gated_gate", gram_in, 0, u_in.size(1), "(R, R) with R = u.size(1)");
  PFP_CHECK_SHAPE("gated_gate", gram_in, 1, u_in.size(1), "(R, R) with R = u.size(1)");
  PFP_CHECK_SHAPE("gated_gate", hsq_in, 1, u_in.size(0), "(G, M) with M = u.size(0)");
  TORCH_CHECK(gram_in.scalar_type() == at::kFloat && hsq_in.scalar_type() == at::kFloat &&
                  tau.scalar_type() == at::kFloat,
              op, ": gram, hsq and tau must be float32, got ", gram_in.scalar_type(), ", ",
              hsq_in.scalar_type(), ", ", tau.scalar_type());
  TORCH_CHECK(tau.numel() == 1, op, ": tau must hold one value, got shape ", tau.sizes());
  TORCH_CHECK(hsq_in.size(0) >= 1, op, ": hsq must have at least one row (G >= 1)");

  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor gram = gram_in.contiguous();
  const at::Tensor hsq = hsq_in.contiguous();
  const int64_t M = u.size(0), R = u.size(1), G = hsq.size(0);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(), op, ": M = ", M, " rows exceed int32 indices");
  at::Tensor ratio = at::empty({M}, u.options().dtype(at::kFloat));
  at::Tensor selected = at::empty({M}, u.options().dtype(at::kBool));
  at::Tensor index = at::empty({M}, u.options().dtype(at::kInt));
  at::Tensor count = at::empty({1}, u.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (M > 0) {
    const int64_t blocks = std::min<int64_t>((M + kGateThreads / kWarp - 1) / (kGateThreads / kWarp), 65535);
    PFP_DISPATCH_FLOATING(u.scalar_type(), "gated_gate", [&] {
      gated_gate_kernel<scalar_t><<<static_cast<unsigned>(blocks), kGateThreads, 0, stream>>>(
          u.const_data_ptr<scalar_t>(), gram.const_data_ptr<float>(), hsq.const_data_ptr<float>(),
          tau.const_data_ptr<float>(), ratio.mutable_data_ptr<float>(), selected.mutable_data_ptr<bool>(),
          static_cast<float>(scale), M, R, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  gated_compact_kernel<<<1, kCompactThreads, 0, stream>>>(selected.const_data_ptr<bool>(),
                                                           index.mutable_data_ptr<int32_t>(),
                                                           count.mutable_data_ptr<int32_t>(), M);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ratio, selected, index, count};
}

void gated_expand_add_cuda(const at::Tensor& y, const at::Tensor& u_in, const at::Tensor& b_in,
                           const at::Tensor& index, const at::Tensor& count, double scale) {
  PFP_CHECK_CUDA("gated_expand_add_", y);
  PFP_CHECK_CUDA("gated_expand_add_", u_in);
  PFP_CHECK_CUDA("gated_expand_add_", b_in);
  PFP_CHECK_CUDA("gated_expand_add_", index);
  PFP_CHECK_CUDA("gated_expand_add_", count);
  PFP_CHECK_SAME_DEVICE("gated_expand_add_", u_in, y);
  PFP_CHECK_SAME_DEVICE("gated_expand_add_", b_in, y);
  PFP_CHECK_SAME_DEVICE("gated_expand_add_", index, y);
  PFP_CHECK_SAME_DEVICE("gated_expand_add_", count, y);
  PFP_CHECK_FLOATING("gated_expand_add_", y);
  PFP_CHECK_SAME_DTYPE("gated_expand_add_", u_in, y);
  PFP_CHECK_SAME_DTYPE("gated_expand_add_", b_in, y);
  PFP_CHECK_DIM("gated_expand_add_", y, 2, "(M, N)");
  PFP_CHECK_DIM("gated_expand_add_", u_in, 2, "(M, R)");
  PFP_CHECK_DIM("gated_expand_add_", b_in, 2, "(N, R)");
  PFP_CHECK_DIM("gated_expand_add_", index, 1, "(M,)");
  PFP_CHECK_SHAPE("gated_expand_add_", u_in, 0, y.size(0), "(M, R) with M = y.size(0)");
  PFP_CHECK_SHAPE("gated_expand_add_", b_in, 0, y.size(1), "(N, R) with N = y.size(1)");
  PFP_CHECK_SHAPE("gated_expand_add_", b_in, 1, u_in.size(1), "(N, R) with R = u.size(1)");
  PFP_CHECK_SHAPE("gated_expand_add_", index, 0, y.size(0), "(M,) with M = y.size(0)");
  TORCH_CHECK(index.scalar_type() == at::kInt && count.scalar_type() == at::kInt && count.numel() == 1,
              "gated_expand_add_: index must be int32 (M,) and count one int32, got ", index.scalar_type(),
              " and ", count.scalar_type(), count.sizes());
  PFP_CHECK_LASTDIM_CONTIG("gated_expand_add_", y);
  at::assert_no_internal_overlap(y);
  at::assert_no_overlap(y, u_in);
  at::assert_no_overlap(y, b_in);

  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t M = y.size(0), N = y.size(1), R = u.size(1);
  if (M == 0 || N == 0 || R == 0) return;
  const int64_t grid_m = (M + kExpandRows - 1) / kExpandRows;  // an upper bound: count <= M
  const int64_t grid_n = (N + kExpandThreads - 1) / kExpandThreads;
  TORCH_CHECK(grid_m <= std::numeric_limits<int32_t>::max() && grid_n <= 65535,
              "gated_expand_add_: problem too large for one launch (M=", M, ", N=", N, ")");
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PFP_DISPATCH_FLOATING(y.scalar_type(), "gated_expand_add_", [&] {
    lora_expand_add_kernel<scalar_t, true><<<grid, kExpandThreads, 0, stream>>>(
        y.mutable_data_ptr<scalar_t>(), y.stride(0), u.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(), static_cast<float>(scale), M, N, R, idx.const_data_ptr<int32_t>(),
        count.const_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace pyfastpeft_C

// Schemas of this file's ops (the extension's namespace is created in csrc/pyfastpeft_C.cpp).
TORCH_LIBRARY_FRAGMENT(pyfastpeft_C, m) {
  // Token-selective LoRA. ratio_i = scale*sqrt(u_i^T gram u_i) / max(sqrt(sum_g hsq[g, i]), 1e-6),
  // selected_i = ratio_i >= max(tau, 0); index[:count] the selected rows in increasing order (int32).
  // u (M, R), gram (R, R) fp32, hsq (G, M) fp32, tau 0-dim fp32.
  m.def("gated_gate(Tensor u, Tensor gram, Tensor hsq, Tensor tau, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // y[index[j]] += scale * u[index[j]] @ b.T for j < count[0], in place.
  m.def("gated_expand_add_(Tensor(a!) y, Tensor u, Tensor b, Tensor index, Tensor count, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(pyfastpeft_C, CUDA, m) {
  m.impl("gated_gate", TORCH_FN(pyfastpeft_C::gated_gate_cuda));
  m.impl("gated_expand_add_", TORCH_FN(pyfastpeft_C::gated_expand_add_cuda));
}
