// Fused softmax cross-entropy with LM z-loss (forward, backward) and the router z-loss.
// CPU reference: src/ops/loss.rs (cross_entropy, CeBack, logsumexp_sq_mean, ZBack).
// Wrapper: src/backend/cuda/loss.rs. Test: tests/gpu_kernels.rs (cross_entropy, router_zloss).
//
// Per row: lse = logsumexp(logits), ce = lse - logits[target]; rows whose target is IGNORE
// (u32::MAX) contribute nothing (lse and ce stored as 0). The loss is
// mean(ce) + z_coef * mean(lse^2) over the valid rows; the sums are f64 in a fixed order.
#include "common.cuh"

// logits [n, v] bf16, targets [n]; writes lse[n], ce[n] (f32). One block per row.
extern "C" __global__ void ce_fwd_bf16(const bf16 *logits, const unsigned *targets, float *lse, float *ce, int n,
                                       int v) {
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const unsigned t = targets[row];
    if (t == FLEX_IGNORE || t >= (unsigned)v) {
      // Out-of-range targets are rejected by the wrapper; NaN marks one that slipped through.
      if (threadIdx.x == 0) {
        lse[row] = 0.0f;
        ce[row] = t == FLEX_IGNORE ? 0.0f : __int_as_float(0x7fc00000);
      }
      continue;
    }
    const bf16 *x = logits + (size_t)row * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, to_f32(x[j]));
    m = block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(to_f32(x[j]) - m);
    s = block_sum(s);
    if (threadIdx.x == 0) {
      const float l = m + logf(s);
      lse[row] = l;
      ce[row] = l - to_f32(x[t]);
    }
  }
}

// One block: out[0] = sum ce, out[1] = sum lse^2, out[2] = number of valid rows (f64).
extern "C" __global__ void ce_reduce(const float *lse, const float *ce, const unsigned *targets, double *out, int n) {
  double a = 0.0, b = 0.0, c = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (targets[i] == FLEX_IGNORE) continue;
    a += (double)ce[i];
    b += (double)lse[i] * (double)lse[i];
    c += 1.0;
  }
  a = block_sum_f64(a);
  b = block_sum_f64(b);
  c = block_sum_f64(c);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
  }
}

// dlogits = scale * ((1 + 2 z_coef lse) softmax - onehot(target)), scale = dloss / n_valid;
// zero rows for IGNORE. One block per row.
extern "C" __global__ void ce_bwd_bf16(const bf16 *logits, const unsigned *targets, const float *lse, bf16 *dlogits,
                                       int n, int v, float scale, float z_coef) {
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const unsigned t = targets[row];
    bf16 *d = dlogits + (size_t)row * v;
    if (t >= (unsigned)v) {
      for (int j = threadIdx.x; j < v; j += blockDim.x) d[j] = from_f32<bf16>(0.0f);
      continue;
    }
    const bf16 *x = logits + (size_t)row * v;
    const float l = lse[row];
    const float f = scale * (1.0f + 2.0f * z_coef * l);
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
      float g = f * expf(to_f32(x[j]) - l);
      if (j == (int)t) g -= scale;
      d[j] = from_f32<bf16>(g);
    }
  }
}

// Router z-loss, z [n, e] f32 (e small): lse[i] = logsumexp(z_i), one thread per row, the CPU's
// sequential order (max, then sum of exp).
extern "C" __global__ void zloss_fwd_f32(const float *z, float *lse, int n, int e) {
  GRID_STRIDE(i, n) {
    const float *r = z + (size_t)i * e;
    float m = -INFINITY;
    for (int j = 0; j < e; ++j) m = fmaxf(m, r[j]);
    float s = 0.0f;
    for (int j = 0; j < e; ++j) s += expf(r[j] - m);
    lse[i] = m + logf(s);
  }
}

// One block: out[0] = sum lse^2 (f64).
extern "C" __global__ void zloss_reduce(const float *lse, double *out, int n) {
  double a = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) a += (double)lse[i] * (double)lse[i];
  a = block_sum_f64(a);
  if (threadIdx.x == 0) out[0] = a;
}

// dz = scale * lse * exp(z - lse), scale = dloss * 2 / n.
extern "C" __global__ void zloss_bwd_f32(const float *z, const float *lse, float *dz, int n, int e, float scale) {
  GRID_STRIDE(i, (long long)n * e) {
    const float l = lse[i / e];
    dz[i] = scale * l * expf(z[i] - l);
  }
}
