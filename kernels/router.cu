// MoE router: softmax over all experts of z + min(b, 0) in f32, top-k (descending, ties to the
// lower expert id), optional renormalisation of the k weights; backward for the logits and the
// per-expert bias (passes where b <= 0).
// CPU reference: src/ops/router.rs (route_values, softmax_biased, topk, RouteBack).
// Wrapper: src/backend/cuda/router.rs. Test: tests/gpu_kernels.rs (router).
//
// E is small (2..64 experts), so one thread handles one token's whole row, in the CPU's order.
// The token permutation (grouping copies by expert) is in moe.cu.
#include "common.cuh"

// z [n, e] f32, bias [e] f32 or null; writes probs [n, e], weights [n, k] f32, indices [n, k].
extern "C" __global__ void router_fwd_f32(const float *z, const float *bias, float *probs, float *weights,
                                          unsigned *indices, int n, int e, int k, int renorm) {
  GRID_STRIDE(t, n) {
    const float *zr = z + (size_t)t * e;
    float *p = probs + (size_t)t * e;
    float m = -INFINITY;
    for (int j = 0; j < e; ++j) {
      p[j] = zr[j] + (bias ? fminf(bias[j], 0.0f) : 0.0f);
      m = fmaxf(m, p[j]);
    }
    float s = 0.0f;
    for (int j = 0; j < e; ++j) {
      p[j] = expf(p[j] - m);
      s += p[j];
    }
    const float inv = 1.0f / s;
    for (int j = 0; j < e; ++j) p[j] *= inv;
    // Top-k by repeated selection: the next pick is the largest entry that comes after the
    // previous pick in (probability descending, index ascending) order.
    float *w = weights + (size_t)t * k;
    unsigned *idx = indices + (size_t)t * k;
    float prev_p = INFINITY;
    int prev_j = -1;
    for (int s_ = 0; s_ < k; ++s_) {
      int best = -1;
      float bp = 0.0f;
      for (int j = 0; j < e; ++j) {
        const float pj = p[j];
        const bool after_prev = pj < prev_p || (pj == prev_p && j > prev_j);
        if (after_prev && (best < 0 || pj > bp)) {
          best = j;
          bp = pj;
        }
      }
      idx[s_] = (unsigned)best;
      w[s_] = bp;
      prev_p = bp;
      prev_j = best;
    }
    if (renorm) {
      float sum = 0.0f;
      for (int s_ = 0; s_ < k; ++s_) sum += w[s_];
      for (int s_ = 0; s_ < k; ++s_) w[s_] /= sum;
    }
  }
}

// dL/dp of slot s: with renorm, (gw_s - sum(gw * w)) / sum_p; else gw_s.
__device__ __forceinline__ float slot_grad(const float *gw, int s, float gw_w, float sum_p, int renorm) {
  return renorm ? (gw[s] - gw_w) / sum_p : gw[s];
}

// probs [n, e], weights [n, k], indices [n, k], gw [n, k] (gradient of the weights); writes
// dz [n, e] = p * (dp - sum_j dp_j p_j).
extern "C" __global__ void router_bwd_f32(const float *probs, const float *weights, const unsigned *indices,
                                          const float *gw, float *dz, int n, int e, int k, int renorm) {
  GRID_STRIDE(t, n) {
    const float *p = probs + (size_t)t * e;
    const float *w = weights + (size_t)t * k;
    const float *g = gw + (size_t)t * k;
    const unsigned *idx = indices + (size_t)t * k;
    float sum_p = 0.0f, gw_w = 0.0f;
    if (renorm) {
      for (int s = 0; s < k; ++s) sum_p += p[idx[s]];
      for (int s = 0; s < k; ++s) gw_w += g[s] * w[s];
    }
    // dp is zero off the selected experts; sum over experts in ascending order like the CPU.
    float dot = 0.0f;
    for (int j = 0; j < e; ++j) {
      for (int s = 0; s < k; ++s)
        if (idx[s] == (unsigned)j) dot += slot_grad(g, s, gw_w, sum_p, renorm) * p[j];
    }
    float *d = dz + (size_t)t * e;
    for (int j = 0; j < e; ++j) {
      float dpj = 0.0f;
      for (int s = 0; s < k; ++s)
        if (idx[s] == (unsigned)j) dpj = slot_grad(g, s, gw_w, sum_p, renorm);
      d[j] = p[j] * (dpj - dot);
    }
  }
}

// Bias gradient pass 1: partial column sums of dz [n, e]. Grid (ceil(e / blockDim.x), chunks).
extern "C" __global__ void router_bias_grad_partial_f32(const float *dz, float *partial, int n, int e,
                                                        int rows_per_chunk) {
  colsum_partial([&](int r, int j) { return dz[(size_t)r * e + j]; }, n, e, rows_per_chunk, partial);
}

// Pass 2: db[j] = sum of the partials, zeroed where bias[j] > 0 (the gradient of min(b, 0)).
extern "C" __global__ void router_bias_grad_finish_f32(const float *partial, const float *bias, float *db, int chunks,
                                                       int e) {
  GRID_STRIDE(j, e) {
    const float acc = colsum_finish_at(partial, chunks, e, (int)j);
    db[j] = bias[j] > 0.0f ? 0.0f : acc;
  }
}
