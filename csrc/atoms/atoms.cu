// Host side and kernel of the filter-atom gradient (CUDA dispatch key only); schema in csrc/pyfastpeft_C.cpp:
//
//   atom_grad_conv2d(dy, x, coeff, kh, kw, stride, padding, dilation, groups) -> dD (C_in, m, kh, kw) fp32
//
//   g[n,i,j,h,w] = sum_{o in group(i)} coeff[o, i mod C_in/g, j] * dy[n,o,h,w]     (never stored)
//   dD[i,j,p,q]  = sum_{n,h,w} g[n,i,j,h,w] * x[n, i, h*s - pad + p*d, w*s - pad + q*d]   (zero outside)
//
// docs/atoms.md section 1: the atom gradient without the full weight gradient. One block owns one input
// channel i and a chunk of output pixels; each thread forms g for its pixel in m registers (the 1x1
// contraction over the group's C_out/g outputs), then for every tap multiplies by the matching x value,
// sums over the warp's 32 pixels with shuffles and adds the warp's sum into a (m, kh*kw) fp32 accumulator
// in shared memory; at the end the block adds its accumulator into dD with fp32 atomics (so the summation
// order, and the last bits of dD, vary from run to run). The caller sums dD over groups (and channels for
// shared atoms).
//
// dtypes: dy and x fp32, fp16 or bf16 (same dtype); coeff any float dtype (converted to fp32 once, it is
// weight-sized); fp32 accumulation. Layouts: any strides for dy and x (NCHW and channels_last alike, no
// copy). Limits: m <= 16 (g lives in registers), kh*kw <= 64.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/dispatch.h"

namespace pyfastpeft_C {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kPixelsPerBlock = kThreads * 16;  // 16 rounds per block: amortises the final atomics
constexpr int kMaxAtoms = 16;
constexpr int kMaxTaps = 64;

struct GradGeom {
  int64_t N, H, W, Ho, Wo, cin_g, cout_g;
  int m, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw;
};

template <typename scalar_t, int MMAX>
__global__ void atom_grad_conv2d_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                        const float* __restrict__ coeff, float* __restrict__ out,
                                        const GradGeom geo) {
  __shared__ float acc[kMaxAtoms * kMaxTaps];
  const int kk = geo.kh * geo.kw;
  const int m = geo.m;
  const int64_t i = blockIdx.y;  // global input channel
  const int64_t grp = i / geo.cin_g, il = i % geo.cin_g;
  for (int e = threadIdx.x; e < m * kk; e += blockDim.x) acc[e] = 0.f;
  __syncthreads();
  const int64_t hw = geo.Ho * geo.Wo;
  const int64_t P = geo.N * hw;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock;
  const int64_t end = start + kPixelsPerBlock < P ? start + kPixelsPerBlock : P;
  const int lane = threadIdx.x & 31;
  // Every thread runs the same number of rounds (start/end are per block), so whole warps shuffle.
  for (int64_t base = start; base < end; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    const bool valid = p < end;
    float g[MMAX];
#pragma unroll
    for (int j = 0; j < MMAX; ++j) g[j] = 0.f;
    int64_t n = 0, ho = 0, wo = 0;
    if (valid) {
      n = p / hw;
      const int64_t r = p - n * hw;
      ho = r / geo.Wo;
      wo = r - ho * geo.Wo;
      const scalar_t* dyp = dy + n * geo.s_dyn + ho * geo.s_dyh + wo * geo.s_dyw;
      for (int64_t ol = 0; ol < geo.cout_g; ++ol) {
        const int64_t o = grp * geo.cout_g + ol;
        const float d = static_cast<float>(dyp[o * geo.s_dyc]);
        const float* c = coeff + (o * geo.cin_g + il) * m;
#pragma unroll
        for (int j = 0; j < MMAX; ++j) {
          if (j < m) g[j] += d * __ldg(c + j);
        }
      }
    }
    const scalar_t* xp = x + n * geo.s_xn + i * geo.s_xc;
    for (int t = 0; t < kk; ++t) {
      float xv = 0.f;
      if (valid) {
        const int64_t hi = ho * geo.sh - geo.ph + (t / geo.kw) * geo.dh;
        const int64_t wi = wo * geo.sw - geo.pw + (t % geo.kw) * geo.dw;
        if (hi >= 0 && hi < geo.H && wi >= 0 && wi < geo.W) xv = static_cast<float>(xp[hi * geo.s_xh + wi * geo.s_xw]);
      }
#pragma unroll
      for (int j = 0; j < MMAX; ++j) {
        if (j < m) {  // m is uniform across the block: no divergent shuffle
          float v = g[j] * xv;
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
          if (lane == 0) atomicAdd(&acc[j * kk + t], v);
        }
      }
    }
  }
  __syncthreads();
  float* o = out + i * m * kk;
  for (int e = threadIdx.x; e < m * kk; e += blockDim.x) atomicAdd(o + e, acc[e]);
}

template <typename scalar_t, int MMAX>
void launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& coeff, at::Tensor& out,
            const GradGeom& geo, int64_t cin, cudaStream_t stream) {
  const int64_t P = geo.N * geo.Ho * geo.Wo;
  const int64_t blocks = (P + kPixelsPerBlock - 1) / kPixelsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max() && cin <= 65535,
              "atom_grad_conv2d: problem too large for one launch (pixels=", P, ", C_in=", cin, ")");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(cin));
  atom_grad_conv2d_kernel<scalar_t, MMAX><<<grid, kThreads, 0, stream>>>(
      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), coeff.const_data_ptr<float>(),
      out.mutable_data_ptr<float>(), geo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor atom_grad_conv2d_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& coeff_in, int64_t kh,
                                 int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "atom_grad_conv2d";
  PFP_CHECK_CUDA("atom_grad_conv2d", dy);
  PFP_CHECK_CUDA("atom_grad_conv2d", x);
  PFP_CHECK_CUDA("atom_grad_conv2d", coeff_in);
  PFP_CHECK_SAME_DEVICE("atom_grad_conv2d", x, dy);
  PFP_CHECK_SAME_DEVICE("atom_grad_conv2d", coeff_in, dy);
  PFP_CHECK_FLOATING("atom_grad_conv2d", dy);
  PFP_CHECK_SAME_DTYPE("atom_grad_conv2d", x, dy);
  PFP_CHECK_DIM("atom_grad_conv2d", dy, 4, "(N, C_out, H_out, W_out)");
  PFP_CHECK_DIM("atom_grad_conv2d", x, 4, "(N, C_in, H, W)");
  PFP_CHECK_DIM("atom_grad_conv2d", coeff_in, 3, "(C_out, C_in/groups, m)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && dy.size(1) % groups == 0, op, ": groups=", groups,
              " must divide C_in=", x.size(1), " and C_out=", dy.size(1));
  PFP_CHECK_SHAPE("atom_grad_conv2d", coeff_in, 0, dy.size(1), "(C_out, C_in/groups, m) with C_out = dy.size(1)");
  PFP_CHECK_SHAPE("atom_grad_conv2d", coeff_in, 1, x.size(1) / groups, "(C_out, C_in/groups, m)");
  PFP_CHECK_SHAPE("atom_grad_conv2d", dy, 0, x.size(0), "(N, C_out, H_out, W_out) with N = x.size(0)");
  const int64_t m = coeff_in.size(2);
  TORCH_CHECK(m >= 1 && m <= kMaxAtoms, op, ": num_atoms m must be in [1, ", kMaxAtoms, "], got ", m);
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= kMaxTaps, op, ": kernel ", kh, "x", kw, " must have 1..", kMaxTaps,
              " taps");
  const int64_t ho = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t wo = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(dy.size(2) == ho && dy.size(3) == wo, op, ": dy must have spatial size (", ho, ", ", wo,
              ") for this x, kernel, stride, padding and dilation, got ", dy.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor coeff = coeff_in.to(at::kFloat).contiguous();
  at::Tensor out = at::zeros({x.size(1), m, kh, kw}, x.options().dtype(at::kFloat));
  if (dy.numel() == 0 || x.numel() == 0) return out;
  GradGeom geo{x.size(0), x.size(2), x.size(3), ho, wo, x.size(1) / groups, dy.size(1) / groups,
               static_cast<int>(m), static_cast<int>(kh), static_cast<int>(kw),
               static_cast<int>(stride[0]), static_cast<int>(stride[1]), static_cast<int>(padding[0]),
               static_cast<int>(padding[1]), static_cast<int>(dilation[0]), static_cast<int>(dilation[1]),
               dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3), x.stride(0), x.stride(1), x.stride(2),
               x.stride(3)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PFP_DISPATCH_FLOATING(x.scalar_type(), "atom_grad_conv2d", [&] {
    if (m <= 4) {
      launch<scalar_t, 4>(dy, x, coeff, out, geo, x.size(1), stream);
    } else if (m <= 8) {
      launch<scalar_t, 8>(dy, x, coeff, out, geo, x.size(1), stream);
    } else {
      launch<scalar_t, 16>(dy, x, coeff, out, geo, x.size(1), stream);
    }
  });
  return out;
}

}  // namespace
}  // namespace pyfastpeft_C

// Schemas of this file's ops (the extension's namespace is created in csrc/pyfastpeft_C.cpp).
TORCH_LIBRARY_FRAGMENT(pyfastpeft_C, m) {
  // Filter atoms (csrc/atoms/atoms.cu): dD (C_in, m, kh, kw) fp32 of atom_conv2d without the weight gradient;
  // dy (N, C_out, Ho, Wo), x (N, C_in, H, W) any strides, coeff (C_out, C_in/groups, m), m <= 16, kh*kw <= 64.
  m.def("atom_grad_conv2d(Tensor dy, Tensor x, Tensor coeff, int kh, int kw, int[] stride, int[] padding,"
        " int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfastpeft_C, CUDA, m) {
  m.impl("atom_grad_conv2d", TORCH_FN(pyfastpeft_C::atom_grad_conv2d_cuda));
}
