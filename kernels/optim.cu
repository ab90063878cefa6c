// Fused multi-tensor AdamW (decoupled weight decay, PyTorch semantics) and the global gradient
// norm with clipping coefficient (deterministic two-pass reduction, no float atomics).
// CPU reference: src/train/optim.rs (AdamW::update, grad_norm, clip_grad_norm).
// Wrapper: src/backend/cuda/optim.rs. Test: tests/gpu_kernels.rs (adamw, grad_norm).
//
// Multi-tensor launch: the wrapper uploads one descriptor per tensor and one span per block
// (tensor index, first element); a block handles elements [start, min(start + chunk, n)) of its
// tensor. Master weights, gradients and moments are f32; an optional bf16 copy of the updated
// weight is written for the forward pass. Weight decay pulls toward zero, or toward a per-tensor
// target (the CPU's `Param::decay_to`).
#include "common.cuh"

// Layouts mirrored by #[repr(C)] structs in src/backend/cuda/optim.rs.
struct AdamWTensor {
  float *p;
  const float *g;
  float *m;
  float *v;
  bf16 *p_bf16;    // null: no bf16 copy
  const float *t;  // null: decay toward 0; else toward t (an expert's copy of the public FFN)
  unsigned long long n;
  float wd;
  unsigned pad;
};
struct GradTensor {
  const float *g;
  unsigned long long n;
};
struct Span {
  unsigned long long tensor;
  unsigned long long start;
};

// grad_scale: null, or a device scalar multiplying every gradient (the clipping coefficient
// written by grad_norm_finish, 1.0 when no clipping is needed). bc1/bc2 = 1 - beta^step.
extern "C" __global__ void adamw_f32(const AdamWTensor *ts, const Span *spans, int n_spans, long long chunk, float lr,
                                     float beta1, float beta2, float eps, float bc1, float bc2,
                                     const float *grad_scale) {
  const float gs = grad_scale ? grad_scale[0] : 1.0f;
  for (int b = blockIdx.x; b < n_spans; b += gridDim.x) {
    const Span sp = spans[b];
    const AdamWTensor t = ts[sp.tensor];
    const unsigned long long end = min(sp.start + (unsigned long long)chunk, t.n);
    for (unsigned long long i = sp.start + threadIdx.x; i < end; i += blockDim.x) {
      const float g = grad_scale ? t.g[i] * gs : t.g[i];
      const float m = beta1 * t.m[i] + (1.0f - beta1) * g;
      const float v = beta2 * t.v[i] + (1.0f - beta2) * g * g;
      const float mh = m / bc1;
      const float vh = v / bc2;
      float w = t.p[i];
      w -= lr * t.wd * (t.t ? w - t.t[i] : w);
      w -= lr * mh / (sqrtf(vh) + eps);
      t.m[i] = m;
      t.v[i] = v;
      t.p[i] = w;
      if (t.p_bf16) t.p_bf16[i] = __float2bfloat16_rn(w);
    }
  }
}

// Pass 1: partial[b] = sum of g^2 over block b's span (f32 per thread, f64 across the block).
extern "C" __global__ void grad_norm_partial_f32(const GradTensor *ts, const Span *spans, int n_spans, long long chunk,
                                                 double *partial) {
  for (int b = blockIdx.x; b < n_spans; b += gridDim.x) {
    const Span sp = spans[b];
    const GradTensor t = ts[sp.tensor];
    const unsigned long long end = min(sp.start + (unsigned long long)chunk, t.n);
    float acc = 0.0f;
    for (unsigned long long i = sp.start + threadIdx.x; i < end; i += blockDim.x) acc += t.g[i] * t.g[i];
    const double s = block_sum_f64((double)acc);
    if (threadIdx.x == 0) partial[b] = s;
  }
}

// Pass 2 (one block): out[0] = sqrt(sum partial) as f32, out[1] = the clipping coefficient
// max_norm / (norm + 1e-6) when max_norm > 0 and norm > max_norm, else 1.
extern "C" __global__ void grad_norm_finish(const double *partial, float *out, int n, float max_norm) {
  double a = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) a += partial[i];
  a = block_sum_f64(a);
  if (threadIdx.x == 0) {
    const float norm = (float)sqrt(a);
    out[0] = norm;
    out[1] = (max_norm > 0.0f && norm > max_norm) ? max_norm / (norm + 1e-6f) : 1.0f;
  }
}
