// MoE token permutation: gather rows, group token copies by expert (stable: tokens ascending
// within an expert), permute/unpermute, and the weighted combine of the experts' outputs.
// CPU reference: src/ops/moe.rs (gather_rows, GatherBack, moe_combine, CombineBack) and the
// grouping in src/ops/router.rs (route_values: expert_tokens, row_of).
// Wrapper: src/backend/cuda/moe.rs. Test: tests/gpu_kernels.rs (gather_rows, moe_permute_combine).
//
// Permuted layout: the copies of all experts stacked in expert order, [n*k, h]; copy (t, s)
// sits at pos[t*k+s] = offsets[e] + row_of[t*k+s], e = indices[t*k+s]. Expert e's batch is
// rows offsets[e]..offsets[e+1] (empty for an expert that received no tokens).
#include "common.cuh"

// y [m, h] = x[rows[i]] (x [n, h]).
extern "C" __global__ void gather_rows_bf16(const bf16 *x, const unsigned *rows, bf16 *y, int m, int h) {
  GRID_STRIDE(i, (long long)m * h) {
    const long long r = i / h, j = i % h;
    y[i] = x[(size_t)rows[r] * h + j];
  }
}

// Backward of gather_rows: dx[uniq[u]] = sum of dy rows positions[offsets[u]..offsets[u+1]]
// (ascending, as the CPU loop). dx [n, h] is zeroed by the wrapper first. Grid
// (ceil(h / blockDim.x), min(n_uniq, 65535)).
extern "C" __global__ void gather_rows_bwd_bf16(const bf16 *dy, const unsigned *uniq, const unsigned *offsets,
                                                const unsigned *positions, bf16 *dx, int n_uniq, int h) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= h) return;
  for (int u = blockIdx.y; u < n_uniq; u += gridDim.y) {
    float acc = 0.0f;
    for (unsigned p = offsets[u]; p < offsets[u + 1]; ++p) acc += to_f32(dy[(size_t)positions[p] * h + j]);
    dx[(size_t)uniq[u] * h + j] = from_f32<bf16>(acc);
  }
}

// counts[e] = number of copies routed to expert e. One block per expert (grid-stride).
extern "C" __global__ void moe_count(const unsigned *indices, unsigned *counts, long long nk, int e) {
  for (int ex = blockIdx.x; ex < e; ex += gridDim.x) {
    unsigned c = 0;
    for (long long i0 = 0; i0 < nk; i0 += blockDim.x) {
      const long long i = i0 + threadIdx.x;
      int total;
      block_exclusive_count(i < nk && indices[i] == (unsigned)ex, &total);
      c += total;
    }
    if (threadIdx.x == 0) counts[ex] = c;
  }
}

// From counts: offsets [e+1], and for every copy i = t*k+s its row within its expert
// (row_of[i]), its position in the permuted layout (pos[i]) and sorted_tokens[pos[i]] = t.
// One block per expert, scanning the copies in order (so tokens ascend within an expert).
extern "C" __global__ void moe_permute_index(const unsigned *indices, const unsigned *counts, unsigned *offsets,
                                             unsigned *row_of, unsigned *pos, unsigned *sorted_tokens, long long nk,
                                             int k, int e) {
  for (int ex = blockIdx.x; ex < e; ex += gridDim.x) {
    unsigned off = 0;
    for (int j = 0; j < ex; ++j) off += counts[j];
    if (threadIdx.x == 0) {
      offsets[ex] = off;
      if (ex == e - 1) offsets[e] = off + counts[ex];
    }
    unsigned base = 0;
    for (long long i0 = 0; i0 < nk; i0 += blockDim.x) {
      const long long i = i0 + threadIdx.x;
      const bool mine = i < nk && indices[i] == (unsigned)ex;
      int total;
      const int r = block_exclusive_count(mine, &total);
      if (mine) {
        row_of[i] = base + r;
        pos[i] = off + base + r;
        sorted_tokens[off + base + r] = (unsigned)(i / k);
      }
      base += total;
    }
  }
}

// xp[pos[t*k+s]] = x[t]: x [n, h] -> xp [n*k, h].
extern "C" __global__ void moe_permute_fwd_bf16(const bf16 *x, const unsigned *pos, bf16 *xp, int n, int k, int h) {
  GRID_STRIDE(i, (long long)n * k * h) {
    const long long c = i / h, j = i % h;
    xp[(size_t)pos[c] * h + j] = x[(size_t)(c / k) * h + j];
  }
}

// dx[t] = sum_s dxp[pos[t*k+s]] (slots in order, f32 sum): dxp [n*k, h] -> dx [n, h].
extern "C" __global__ void moe_permute_bwd_bf16(const bf16 *dxp, const unsigned *pos, bf16 *dx, int n, int k, int h) {
  GRID_STRIDE(i, (long long)n * h) {
    const long long t = i / h, j = i % h;
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) acc += to_f32(dxp[(size_t)pos[t * k + s] * h + j]);
    dx[i] = from_f32<bf16>(acc);
  }
}

// y[t] = sum_s w[t,s] * outs[pos[t*k+s]]: outs [n*k, h] bf16, w [n, k] f32 -> y [n, h] bf16.
extern "C" __global__ void moe_combine_fwd_bf16(const bf16 *outs, const float *w, const unsigned *pos, bf16 *y, int n,
                                                int k, int h) {
  GRID_STRIDE(i, (long long)n * h) {
    const long long t = i / h, j = i % h;
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) acc += w[t * k + s] * to_f32(outs[(size_t)pos[t * k + s] * h + j]);
    y[i] = from_f32<bf16>(acc);
  }
}

// Backward of the combine, one block per token: douts[pos[t,s]] = w[t,s] * dy[t] (bf16) and
// dw[t,s] = dy[t] . outs[pos[t,s]] (f32, block reduction in a fixed order).
extern "C" __global__ void moe_combine_bwd_bf16(const bf16 *dy, const bf16 *outs, const float *w, const unsigned *pos,
                                                bf16 *douts, float *dw, int n, int k, int h) {
  for (int t = blockIdx.x; t < n; t += gridDim.x) {
    const bf16 *g = dy + (size_t)t * h;
    for (int s = 0; s < k; ++s) {
      const size_t row = (size_t)pos[(size_t)t * k + s] * h;
      const float ws = w[(size_t)t * k + s];
      float acc = 0.0f;
      for (int j = threadIdx.x; j < h; j += blockDim.x) {
        const float gj = to_f32(g[j]);
        douts[row + j] = from_f32<bf16>(ws * gj);
        acc += gj * to_f32(outs[row + j]);
      }
      acc = block_sum(acc);
      if (threadIdx.x == 0) dw[(size_t)t * k + s] = acc;
    }
  }
}
