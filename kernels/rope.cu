// Rotary position embedding, rotate-half (NeoX) layout, on [B*T, heads*hd] activations.
// CPU reference: src/ops/rope.rs (rope, apply, RopeBack). Wrapper: src/backend/cuda/rope.rs.
// Test: tests/gpu_kernels.rs (rope).
//
// Row r is position offset + r % t_len. For each head and i < hd/2, with c = cos[p, i],
// s = sign * sin[p, i]:  y[i] = x[i] c - x[i+half] s,  y[i+half] = x[i+half] c + x[i] s.
// sign = +1 forward, -1 backward (the rotation's transpose). cos/sin are the f32 tables of
// RopeTable ([max_pos, hd/2]). x and y may be the same buffer (each thread reads its pair
// before writing it).
#include "common.cuh"

extern "C" __global__ void rope_bf16(const bf16 *x, bf16 *y, const float *cos_t, const float *sin_t, int rows,
                                     int width, int hd, int t_len, int offset, float sign) {
  const int half = hd / 2;
  const int pairs_per_row = width / 2;
  GRID_STRIDE(idx, (long long)rows * pairs_per_row) {
    const int r = (int)(idx / pairs_per_row);
    const int q = (int)(idx % pairs_per_row);
    const int head = q / half, i = q % half;
    const int p = offset + r % t_len;
    const float c = cos_t[(size_t)p * half + i];
    const float s = sign * sin_t[(size_t)p * half + i];
    const size_t base = (size_t)r * width + (size_t)head * hd;
    const float x1 = to_f32(x[base + i]), x2 = to_f32(x[base + i + half]);
    y[base + i] = from_f32<bf16>(x1 * c - x2 * s);
    y[base + i + half] = from_f32<bf16>(x2 * c + x1 * s);
  }
}
