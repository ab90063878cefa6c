// Fused softmax cross-entropy with LM z-loss (forward, backward), the router z-loss, and expert
// training's extra terms: the router cross-entropy and the public anchor's relative error.
// CPU reference: src/ops/loss.rs (cross_entropy, CeBack, logsumexp_sq_mean, ZBack, rel_sq_err).
// Wrapper: src/backend/cuda/loss.rs. Test: tests/gpu_kernels.rs (cross_entropy, router_zloss,
// router_ce, rel_sq_err).
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

// Router cross-entropy (expert training's own-text and public-text router losses): z [n, e]
// f32, targets [n] (IGNORE: the row takes no part). One thread per row: ce[i] = lse - z[t]
// (0 when ignored), and dz[i, :] += scale * (softmax(z_i) - onehot(t)), scale = coef / n_valid.
extern "C" __global__ void router_ce_f32(const float *z, const unsigned *targets, float *ce, float *dz, int n, int e,
                                         float scale) {
  GRID_STRIDE(i, n) {
    const unsigned t = targets[i];
    if (t >= (unsigned)e) {
      ce[i] = 0.0f;
      continue;
    }
    const float *r = z + (size_t)i * e;
    float m = -INFINITY;
    for (int j = 0; j < e; ++j) m = fmaxf(m, r[j]);
    float s = 0.0f;
    for (int j = 0; j < e; ++j) s += expf(r[j] - m);
    const float lse = m + logf(s);
    ce[i] = lse - r[t];
    float *d = dz + (size_t)i * e;
    for (int j = 0; j < e; ++j) d[j] += scale * (expf(r[j] - lse) - (j == (int)t ? 1.0f : 0.0f));
  }
}

// One block: out[0] = sum x (f64, a fixed order).
extern "C" __global__ void sum_reduce_f32(const float *x, double *out, int n) {
  double a = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) a += (double)x[i];
  a = block_sum_f64(a);
  if (threadIdx.x == 0) out[0] = a;
}

// Relative squared error of a against b ([n, h] bf16 each) over the rows with mask[row] != 0
// (the public anchor): per row, s[row] = |a - b|^2 and t[row] = |b|^2 (0 for unmarked rows).
// One block per row.
extern "C" __global__ void rel_err_rows_bf16(const bf16 *a, const bf16 *b, const unsigned *mask, float *s, float *t,
                                             int n, int h) {
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    float ss = 0.0f, tt = 0.0f;
    if (mask[row]) {
      const bf16 *x = a + (size_t)row * h, *y = b + (size_t)row * h;
      for (int j = threadIdx.x; j < h; j += blockDim.x) {
        const float d = to_f32(x[j]) - to_f32(y[j]), v = to_f32(y[j]);
        ss += d * d;
        tt += v * v;
      }
    }
    ss = block_sum(ss);
    tt = block_sum(tt);
    if (threadIdx.x == 0) {
      s[row] = ss;
      t[row] = tt;
    }
  }
}

// One block: out[0] = sum s, out[1] = sum t (f64).
extern "C" __global__ void pair_sum_reduce_f32(const float *s, const float *t, double *out, int n) {
  double a = 0.0, b = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    a += (double)s[i];
    b += (double)t[i];
  }
  a = block_sum_f64(a);
  b = block_sum_f64(b);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
  }
}

// Backward of coef * S / T (S = sum |a - b|^2, T = sum |b|^2 over the marked rows; sums[0..2]
// from pair_sum_reduce_f32, read on the device): da += coef * 2 (a - b) / T (f32, accumulated),
// db = -coef * 2 (a - b) / T - coef * 2 S / T^2 * b (bf16); both 0 on unmarked rows or T = 0.
extern "C" __global__ void rel_err_bwd_bf16(const bf16 *a, const bf16 *b, const unsigned *mask, const double *sums,
                                            float *da, bf16 *db, int n, int h, float coef) {
  const double S = sums[0], T = sums[1];
  const float ca = T > 0.0 ? (float)(2.0 * coef / T) : 0.0f;
  const float cb = T > 0.0 ? (float)(2.0 * coef * S / (T * T)) : 0.0f;
  GRID_STRIDE(i, (long long)n * h) {
    const long long row = i / h;
    if (!mask[row] || T <= 0.0) {
      db[i] = from_f32<bf16>(0.0f);
      continue;
    }
    const float x = to_f32(a[i]), y = to_f32(b[i]);
    da[i] += ca * (x - y);
    db[i] = from_f32<bf16>(-ca * (x - y) - cb * y);
  }
}
