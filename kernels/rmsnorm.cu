// RMSNorm forward and backward over the last dimension.
// CPU reference: src/ops/rmsnorm.rs (rmsnorm, RmsBack). Wrapper: src/backend/cuda/rmsnorm.rs.
// Test: tests/gpu_kernels.rs (rmsnorm).
//
// y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), statistics in f32; x, y, dy, dx bf16;
// w bf16 (the compute copy of the f32 master weight); rstd and dw f32.
#include "common.cuh"

// One block per row (grid-stride over rows). Writes rstd[row] for the backward.
extern "C" __global__ void rmsnorm_fwd_bf16(const bf16 *x, const bf16 *w, bf16 *y, float *rstd, int n, int d,
                                            float eps) {
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const bf16 *xr = x + (size_t)row * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
      const float v = to_f32(xr[j]);
      ss += v * v;
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    bf16 *yr = y + (size_t)row * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = from_f32<bf16>(to_f32(w[j]) * (to_f32(xr[j]) * r));
  }
}

// dx = r * (w*g - x * c), c = sum_j(w_j g_j x_j) * r^2 / d. One block per row.
extern "C" __global__ void rmsnorm_bwd_dx_bf16(const bf16 *x, const bf16 *w, const bf16 *dy, const float *rstd,
                                               bf16 *dx, int n, int d) {
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const bf16 *xr = x + (size_t)row * d;
    const bf16 *gr = dy + (size_t)row * d;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += to_f32(w[j]) * to_f32(gr[j]) * to_f32(xr[j]);
    acc = block_sum(acc);
    const float r = rstd[row];
    const float c = acc * r * r / (float)d;
    bf16 *dxr = dx + (size_t)row * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
      dxr[j] = from_f32<bf16>(r * (to_f32(w[j]) * to_f32(gr[j]) - to_f32(xr[j]) * c));
  }
}

// dw[j] = sum_rows dy[r,j] * x[r,j] * rstd[r], pass 1: partial[chunk, j].
// Grid (ceil(d / blockDim.x), n_chunks).
extern "C" __global__ void rmsnorm_bwd_dw_partial_bf16(const bf16 *x, const bf16 *dy, const float *rstd,
                                                       float *partial, int n, int d, int rows_per_chunk) {
  colsum_partial(
      [&](int r, int j) {
        const size_t i = (size_t)r * d + j;
        return to_f32(dy[i]) * to_f32(x[i]) * rstd[r];
      },
      n, d, rows_per_chunk, partial);
}

// Pass 2: dw[j] = sum of partial[:, j] in chunk order.
extern "C" __global__ void rmsnorm_bwd_dw_finish(const float *partial, float *dw, int chunks, int d) {
  GRID_STRIDE(j, d) dw[j] = colsum_finish_at(partial, chunks, d, (int)j);
}
