// Shared helpers of the flexrun kernels: bf16 <-> f32 loads and stores, warp and block
// reductions, grid-stride loops and the deterministic two-pass column sum.
//
// Conventions (see src/backend/cuda/mod.rs for the launch side):
// - every kernel is `extern "C"` and named `<op>_<pass>_<dtype>`; its arguments are device
//   pointers, then sizes, then scalars, in the order of the Rust wrapper;
// - sizes of whole tensors are `long long`, row and column counts `int`;
// - activations are bf16 in memory, arithmetic and statistics are f32 (f64 for the final sum of
//   a loss or norm); parameter gradients and optimizer state are f32;
// - no floating-point atomics: reductions run in a fixed order, so results are deterministic.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// Target id of a row that contributes no loss (src/ops/loss.rs IGNORE = u32::MAX).
#define FLEX_IGNORE 0xffffffffu

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

// Round-to-nearest-even, like half::bf16::from_f32 on the CPU side.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Linear thread index and total thread count of a 1-d grid, for grid-stride loops.
__device__ __forceinline__ long long gtid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long gstride() { return (long long)gridDim.x * blockDim.x; }
#define GRID_STRIDE(i, n) for (long long i = gtid(); i < (long long)(n); i += gstride())

// Butterfly reductions: every lane ends with the same bits (IEEE addition is commutative, so lane
// L and lane L^m add the same pair at each level).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Block-wide reductions; blockDim.x must be a multiple of 32 (<= 1024). Every thread gets the
// result. Safe to call repeatedly (the leading barrier protects the scratch of the last call).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float sh_sum[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh_sum[wid] = v;
  __syncthreads();
  return warp_sum(lane < nw ? sh_sum[lane] : 0.0f);
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float sh_max[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh_max[wid] = v;
  __syncthreads();
  return warp_max(lane < nw ? sh_max[lane] : -INFINITY);
}
__device__ __forceinline__ double block_sum_f64(double v) {
  __shared__ double sh_sum64[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_f64(v);
  __syncthreads();
  if (lane == 0) sh_sum64[wid] = v;
  __syncthreads();
  return warp_sum_f64(lane < nw ? sh_sum64[lane] : 0.0);
}

// Exclusive prefix count of `flag` over the block (in thread order); `total` gets the block's
// count. blockDim.x must be a multiple of 32.
__device__ __forceinline__ int block_exclusive_count(bool flag, int *total) {
  __shared__ int sh_cnt[33];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) sh_cnt[wid] = __popc(ballot);
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int w = 0; w < nw; ++w) {
      const int c = sh_cnt[w];
      sh_cnt[w] = acc;
      acc += c;
    }
    sh_cnt[32] = acc;
  }
  __syncthreads();
  *total = sh_cnt[32];
  return sh_cnt[wid] + in_warp;
}

// Deterministic column sums of a row-major [rows, cols] f32 matrix, pass 1: chunk c of
// `rows_per_chunk` rows writes partial[c, j] (rows summed in ascending order). Launch with
// grid (ceil(cols / blockDim.x), n_chunks). Pass 2 is colsum_finish.
template <typename F>
__device__ __forceinline__ void colsum_partial(F value, int rows, int cols, int rows_per_chunk, float *partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  for (int c = blockIdx.y; (long long)c * rows_per_chunk < rows; c += gridDim.y) {
    const int r0 = c * rows_per_chunk;
    const int r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r) acc += value(r, j);
    partial[(size_t)c * cols + j] = acc;
  }
}

// Pass 2: out[j] = sum over chunks (ascending) of partial[c, j]. Grid-stride over columns.
__device__ __forceinline__ float colsum_finish_at(const float *partial, int chunks, int cols, int j) {
  float acc = 0.0f;
  for (int c = 0; c < chunks; ++c) acc += partial[(size_t)c * cols + j];
  return acc;
}
