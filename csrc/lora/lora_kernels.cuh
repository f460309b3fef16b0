// CUDA kernels for the rank-R pieces of LoRA (no torch headers; scalar_t is float, c10::Half or
// c10::BFloat16, converted through static_cast<float> / static_cast<scalar_t>).
//
//   shrink:      u[m, r]  = sum_k x[m, k] * a[r, k]          x (M, K), a (R, K) -> u (M, R)
//   expand_add:  y[m, n] += scale * sum_r u[m, r] * b[n, r]   y (M, N), u (M, R), b (N, R)
//
// Layouts: x rows may have any stride (stride_x_m) but stride 1 along K; a, u and b are
// contiguous; y rows may have any stride (stride_y_m) but stride 1 along N. All index arithmetic
// that can exceed 2^31 is int64. Products and sums are fp32; each output is rounded once.
//
// shrink: a block of 256 threads (8 warps) owns 16 rows of x (2 per warp) and one chunk of RT
// ranks (grid.y walks ceil(R / RT) chunks, so any R works; R <= 32 is a single pass over x, larger
// R re-reads x once per extra chunk of 32, mostly from L2). K is walked in tiles of 128: the
// (RT x 128) slice of a is staged in shared memory as fp32, each lane keeps 4 x values per row in
// registers (lane-consecutive, so global loads are coalesced and shared reads conflict-free) and
// accumulates 2 x RT partial sums; a butterfly warp reduction finishes each dot product.
//
// expand_add: a block of 128 threads owns a 32-row x 128-column tile of y, one column per thread
// (GATHER: 32 rows of a compacted list of row indices, for token-selective LoRA).
// R is walked in tiles of 32: the (128 x 32) slice of b is staged transposed (padded by one column,
// so the transposing stores are conflict-free) and the (32 x 32) slice of u is read as float4
// broadcasts; each thread keeps 32 fp32 accumulators and finally does y = y + scale * acc with
// coalesced row-wise loads/stores. Any R works in one pass over y.
#pragma once

#include <cstdint>

namespace pyfastpeft_C {

constexpr int kWarp = 32;

// shrink tiling
constexpr int kShrinkThreads = 256;
constexpr int kShrinkRowsPerWarp = 2;
constexpr int kShrinkRows = (kShrinkThreads / kWarp) * kShrinkRowsPerWarp;  // 16 rows per block
constexpr int kShrinkKTile = 128;                                           // 4 K values per lane
constexpr int kShrinkKPerLane = kShrinkKTile / kWarp;

// expand tiling
constexpr int kExpandThreads = 128;  // = columns of y per block
constexpr int kExpandRows = 32;      // rows of y per block (accumulators per thread)
constexpr int kExpandRTile = 32;     // ranks staged per step (multiple of 4: float4 reads of u)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t, int RT>
__global__ void __launch_bounds__(kShrinkThreads)
    lora_shrink_kernel(const scalar_t* __restrict__ x, int64_t stride_x_m,
                       const scalar_t* __restrict__ a, scalar_t* __restrict__ u, int64_t M,
                       int64_t K, int64_t R) {
  static_assert(RT >= 1 && RT <= kWarp, "one lane writes one rank of the chunk");
  __shared__ float a_s[RT][kShrinkKTile];  // RT = 32: 16 KiB

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * RT;
  const int64_t m_first = static_cast<int64_t>(blockIdx.x) * kShrinkRows + warp * kShrinkRowsPerWarp;

  float acc[kShrinkRowsPerWarp][RT];
#pragma unroll
  for (int i = 0; i < kShrinkRowsPerWarp; ++i) {
#pragma unroll
    for (int r = 0; r < RT; ++r) acc[i][r] = 0.f;
  }

  for (int64_t k0 = 0; k0 < K; k0 += kShrinkKTile) {
    // Stage a[r0 : r0+RT, k0 : k0+128] as fp32, zero-padded past R and K.
    for (int idx = threadIdx.x; idx < RT * kShrinkKTile; idx += kShrinkThreads) {
      const int r = idx / kShrinkKTile;
      const int kk = idx % kShrinkKTile;
      const int64_t gr = r0 + r;
      const int64_t gk = k0 + kk;
      a_s[r][kk] = (gr < R && gk < K) ? static_cast<float>(a[gr * K + gk]) : 0.f;
    }
    // This warp's rows of x for the tile: lane l holds k = k0 + l + 32 j (coalesced per j).
    float xv[kShrinkRowsPerWarp][kShrinkKPerLane];
#pragma unroll
    for (int i = 0; i < kShrinkRowsPerWarp; ++i) {
      const int64_t m = m_first + i;
#pragma unroll
      for (int j = 0; j < kShrinkKPerLane; ++j) {
        const int64_t gk = k0 + lane + j * kWarp;
        xv[i][j] = (m < M && gk < K) ? static_cast<float>(x[m * stride_x_m + gk]) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < RT; ++r) {
#pragma unroll
      for (int j = 0; j < kShrinkKPerLane; ++j) {
        const float av = a_s[r][lane + j * kWarp];
#pragma unroll
        for (int i = 0; i < kShrinkRowsPerWarp; ++i) acc[i][r] = fmaf(xv[i][j], av, acc[i][r]);
      }
    }
    __syncthreads();  // a_s is overwritten by the next tile
  }

  // Every lane ends with the full sums; lane r writes rank r0 + r (one store per lane and row).
#pragma unroll
  for (int i = 0; i < kShrinkRowsPerWarp; ++i) {
    const int64_t m = m_first + i;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const float s = warp_sum(acc[i][r]);
      if (m < M && lane == r && r0 + r < R) u[m * R + r0 + r] = static_cast<scalar_t>(s);
    }
  }
}

// GATHER (token-selective LoRA): block rows are positions j of a compacted row list; row j is
// index[j] of y and u, and only j < *count is computed (count read on the device: no host sync; blocks
// past it return at once, so the work is proportional to the selected rows).
template <typename scalar_t, bool GATHER>
__global__ void __launch_bounds__(kExpandThreads)
    lora_expand_add_kernel(scalar_t* __restrict__ y, int64_t stride_y_m,
                           const scalar_t* __restrict__ u, const scalar_t* __restrict__ b,
                           float scale, int64_t M, int64_t N, int64_t R,
                           const int32_t* __restrict__ index, const int32_t* __restrict__ count) {
  __shared__ float b_s[kExpandRTile][kExpandThreads + 1];         // +1: conflict-free transpose
  __shared__ __align__(16) float u_s[kExpandRows][kExpandRTile];  // rows read as float4
  __shared__ int64_t row_s[kExpandRows];                          // row of y / u for each block row

  const int t = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kExpandRows;
  if (GATHER) M = *count;  // every thread reads the same value: a uniform early exit
  if (m0 >= M) return;
  for (int i = t; i < kExpandRows; i += kExpandThreads) {
    row_s[i] = (m0 + i < M) ? (GATHER ? static_cast<int64_t>(index[m0 + i]) : m0 + i) : 0;
  }
  __syncthreads();
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kExpandThreads;
  const int64_t n = n0 + t;

  float acc[kExpandRows];
#pragma unroll
  for (int i = 0; i < kExpandRows; ++i) acc[i] = 0.f;

  for (int64_t rb = 0; rb < R; rb += kExpandRTile) {
    // b[n0 : n0+128, rb : rb+32] -> b_s[r][n] (loads run along R, which is contiguous).
    for (int idx = t; idx < kExpandThreads * kExpandRTile; idx += kExpandThreads) {
      const int nn = idx / kExpandRTile;
      const int r = idx % kExpandRTile;
      const int64_t gn = n0 + nn;
      const int64_t gr = rb + r;
      b_s[r][nn] = (gn < N && gr < R) ? static_cast<float>(b[gn * R + gr]) : 0.f;
    }
    // u[m0 : m0+32, rb : rb+32] -> u_s[m][r]
    for (int idx = t; idx < kExpandRows * kExpandRTile; idx += kExpandThreads) {
      const int mm = idx / kExpandRTile;
      const int r = idx % kExpandRTile;
      const int64_t gm = m0 + mm;
      const int64_t gr = rb + r;
      u_s[mm][r] = (gm < M && gr < R) ? static_cast<float>(u[row_s[mm] * R + gr]) : 0.f;
    }
    __syncthreads();
#pragma unroll 2
    for (int r = 0; r < kExpandRTile; r += 4) {
      const float b0 = b_s[r][t];
      const float b1 = b_s[r + 1][t];
      const float b2 = b_s[r + 2][t];
      const float b3 = b_s[r + 3][t];
#pragma unroll
      for (int i = 0; i < kExpandRows; ++i) {
        const float4 uv = *reinterpret_cast<const float4*>(&u_s[i][r]);  // broadcast read
        acc[i] = fmaf(uv.x, b0, acc[i]);
        acc[i] = fmaf(uv.y, b1, acc[i]);
        acc[i] = fmaf(uv.z, b2, acc[i]);
        acc[i] = fmaf(uv.w, b3, acc[i]);
      }
    }
    __syncthreads();  // b_s / u_s are overwritten by the next rank tile
  }

  if (n < N) {
#pragma unroll
    for (int i = 0; i < kExpandRows; ++i) {
      if (m0 + i < M) {
        scalar_t* p = y + row_s[i] * stride_y_m + n;
        *p = static_cast<scalar_t>(static_cast<float>(*p) + scale * acc[i]);
      }
    }
  }
}

}  // namespace pyfastpeft_C
