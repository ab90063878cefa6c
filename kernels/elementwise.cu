// Elementwise ops: scaled add, scale, SwiGLU forward/backward, dtype casts.
// CPU reference: src/ops/elementwise.rs (add_scaled, scale, swiglu, SwigluBack) and
// src/tensor/mod.rs (to_dtype). Wrapper: src/backend/cuda/elementwise.rs.
// Test: tests/gpu_kernels.rs (add_scaled, swiglu, cast).
#include "common.cuh"

// y = a + alpha * b (y may alias a or b).
template <typename T> __device__ void add_scaled(const T *a, const T *b, T *y, long long n, float alpha) {
  GRID_STRIDE(i, n) y[i] = from_f32<T>(to_f32(a[i]) + alpha * to_f32(b[i]));
}
extern "C" __global__ void add_scaled_bf16(const bf16 *a, const bf16 *b, bf16 *y, long long n, float alpha) {
  add_scaled(a, b, y, n, alpha);
}
extern "C" __global__ void add_scaled_f32(const float *a, const float *b, float *y, long long n, float alpha) {
  add_scaled(a, b, y, n, alpha);
}

// y = s * a (y may alias a).
template <typename T> __device__ void scale(const T *a, T *y, long long n, float s) {
  GRID_STRIDE(i, n) y[i] = from_f32<T>(to_f32(a[i]) * s);
}
extern "C" __global__ void scale_bf16(const bf16 *a, bf16 *y, long long n, float s) { scale(a, y, n, s); }
extern "C" __global__ void scale_f32(const float *a, float *y, long long n, float s) { scale(a, y, n, s); }

// Accurate sigmoid (expf, not __expf), as the CPU's 1 / (1 + exp(-x)).
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// y = silu(gate) * up = gate * sigmoid(gate) * up.
extern "C" __global__ void swiglu_fwd_bf16(const bf16 *gate, const bf16 *up, bf16 *y, long long n) {
  GRID_STRIDE(i, n) {
    const float g = to_f32(gate[i]);
    y[i] = from_f32<bf16>(g * sigmoidf(g) * to_f32(up[i]));
  }
}

// dgate = dy * up * s * (1 + g (1 - s)), dup = dy * g * s, s = sigmoid(g).
extern "C" __global__ void swiglu_bwd_bf16(const bf16 *gate, const bf16 *up, const bf16 *dy, bf16 *dgate, bf16 *dup,
                                           long long n) {
  GRID_STRIDE(i, n) {
    const float g = to_f32(gate[i]), u = to_f32(up[i]), gy = to_f32(dy[i]);
    const float s = sigmoidf(g);
    dgate[i] = from_f32<bf16>(gy * u * s * (1.0f + g * (1.0f - s)));
    dup[i] = from_f32<bf16>(gy * g * s);
  }
}

extern "C" __global__ void cast_f32_bf16(const float *x, bf16 *y, long long n) {
  GRID_STRIDE(i, n) y[i] = __float2bfloat16_rn(x[i]);
}
extern "C" __global__ void cast_bf16_f32(const bf16 *x, float *y, long long n) {
  GRID_STRIDE(i, n) y[i] = __bfloat162float(x[i]);
}
