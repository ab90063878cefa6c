// Causal scaled-dot-product attention with GQA: a simple, correct kernel (one warp per query
// row, online softmax over the keys), forward and backward. The fused flash kernel with tensor
// cores replaces it later; this one is the GPU reference for it.
// CPU reference: src/ops/attention.rs (attention_forward, attention_backward).
// Wrapper: src/backend/cuda/attention.rs. Test: tests/gpu_kernels.rs (attention).
//
// Layout as the CPU: q [B, Tq, nh, hd], k/v [B, Tk_stride, nkv, hd] (only the first Tk positions
// are read), out like q, lse [B, nh, Tq] f32. Query i sits at position Tk - Tq + i and sees keys
// 0..=Tk - Tq + i; head h reads kv head h / (nh / nkv). q, k, v, out and the gradients are bf16;
// scores, softmax statistics and accumulators f32. hd <= ATTN_MAX_HD.
#include "common.cuh"

#define ATTN_MAX_HD 256
#define PL (ATTN_MAX_HD / 32)  // head dims per lane

// Global warp index and count (blockDim.x is a multiple of 32).
__device__ __forceinline__ long long gwarp() { return gtid() >> 5; }
__device__ __forceinline__ long long gwarps() { return gstride() >> 5; }

__device__ __forceinline__ void load_row(const bf16 *p, int hd, int lane, float *r) {
#pragma unroll
  for (int c = 0; c < PL; ++c) {
    const int d = lane + 32 * c;
    r[c] = d < hd ? to_f32(p[d]) : 0.0f;
  }
}

// Dot product of a lane-distributed row with a row in memory, reduced over the warp.
__device__ __forceinline__ float dot_row(const float *r, const bf16 *p, int hd, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < PL; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) s += r[c] * to_f32(p[d]);
  }
  return warp_sum(s);
}

__device__ __forceinline__ void store_row(bf16 *p, int hd, int lane, const float *r, float mul) {
#pragma unroll
  for (int c = 0; c < PL; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) p[d] = from_f32<bf16>(r[c] * mul);
  }
}

extern "C" __global__ void attn_fwd_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int b,
                                         int tq, int tk, int tk_stride, int nh, int nkv, int hd, float scale) {
  const int lane = threadIdx.x & 31;
  const int grp = nh / nkv;
  for (long long w = gwarp(); w < (long long)b * nh * tq; w += gwarps()) {
    const int i = (int)(w % tq);
    const int h = (int)((w / tq) % nh);
    const int bb = (int)(w / ((long long)tq * nh));
    const int kh = h / grp;
    const size_t qoff = ((size_t)(bb * (size_t)tq + i) * nh + h) * hd;
    float qv[PL], acc[PL];
    load_row(q + qoff, hd, lane, qv);
#pragma unroll
    for (int c = 0; c < PL; ++c) acc[c] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int last = tk - tq + i;
    for (int j = 0; j <= last; ++j) {
      const size_t koff = ((size_t)(bb * (size_t)tk_stride + j) * nkv + kh) * hd;
      const float s = dot_row(qv, k + koff, hd, lane) * scale;
      const float m_new = fmaxf(m, s);
      const float corr = expf(m - m_new);
      const float p = expf(s - m_new);
      l = l * corr + p;
#pragma unroll
      for (int c = 0; c < PL; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) acc[c] = acc[c] * corr + p * to_f32(v[koff + d]);
      }
      m = m_new;
    }
    store_row(o + qoff, hd, lane, acc, 1.0f / l);
    if (lane == 0) lse[((size_t)bb * nh + h) * tq + i] = m + logf(l);
  }
}

// delta[b, h, i] = dO_i . O_i (f32), one warp per query row.
extern "C" __global__ void attn_bwd_delta_bf16(const bf16 *o, const bf16 *dout, float *delta, int b, int tq, int nh,
                                               int hd) {
  const int lane = threadIdx.x & 31;
  for (long long w = gwarp(); w < (long long)b * nh * tq; w += gwarps()) {
    const int i = (int)(w % tq);
    const int h = (int)((w / tq) % nh);
    const int bb = (int)(w / ((long long)tq * nh));
    const size_t qoff = ((size_t)(bb * (size_t)tq + i) * nh + h) * hd;
    float ov[PL];
    load_row(o + qoff, hd, lane, ov);
    const float dd = dot_row(ov, dout + qoff, hd, lane);
    if (lane == 0) delta[((size_t)bb * nh + h) * tq + i] = dd;
  }
}

// dq_i = sum_j ds_ij k_j, ds = p (dp - D_i) scale, p = exp(s - lse_i), dp = dO_i . v_j.
// One warp per query row.
extern "C" __global__ void attn_bwd_dq_bf16(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,
                                            const float *lse, const float *delta, bf16 *dq, int b, int tq, int tk,
                                            int tk_stride, int nh, int nkv, int hd, float scale) {
  const int lane = threadIdx.x & 31;
  const int grp = nh / nkv;
  for (long long w = gwarp(); w < (long long)b * nh * tq; w += gwarps()) {
    const int i = (int)(w % tq);
    const int h = (int)((w / tq) % nh);
    const int bb = (int)(w / ((long long)tq * nh));
    const int kh = h / grp;
    const size_t qoff = ((size_t)(bb * (size_t)tq + i) * nh + h) * hd;
    const size_t row = ((size_t)bb * nh + h) * tq + i;
    const float l = lse[row], dd = delta[row];
    float qv[PL], gv[PL], acc[PL];
    load_row(q + qoff, hd, lane, qv);
    load_row(dout + qoff, hd, lane, gv);
#pragma unroll
    for (int c = 0; c < PL; ++c) acc[c] = 0.0f;
    const int last = tk - tq + i;
    for (int j = 0; j <= last; ++j) {
      const size_t koff = ((size_t)(bb * (size_t)tk_stride + j) * nkv + kh) * hd;
      const float p = expf(dot_row(qv, k + koff, hd, lane) * scale - l);
      const float dp = dot_row(gv, v + koff, hd, lane);
      const float ds = p * ((dp - dd) * scale);
#pragma unroll
      for (int c = 0; c < PL; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) acc[c] += ds * to_f32(k[koff + d]);
      }
    }
    store_row(dq + qoff, hd, lane, acc, 1.0f);
  }
}

// dv_j = sum_{h in group, i sees j} p_ij dO_i, dk_j = sum ds_ij q_i. One warp per key row
// (b, kv head, j) for j < tk_stride; rows j >= tk get zeros.
extern "C" __global__ void attn_bwd_dkdv_bf16(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,
                                              const float *lse, const float *delta, bf16 *dk, bf16 *dv, int b, int tq,
                                              int tk, int tk_stride, int nh, int nkv, int hd, float scale) {
  const int lane = threadIdx.x & 31;
  const int grp = nh / nkv;
  const int off = tk - tq;
  for (long long w = gwarp(); w < (long long)b * nkv * tk_stride; w += gwarps()) {
    const int j = (int)(w % tk_stride);
    const int kh = (int)((w / tk_stride) % nkv);
    const int bb = (int)(w / ((long long)tk_stride * nkv));
    const size_t koff = ((size_t)(bb * (size_t)tk_stride + j) * nkv + kh) * hd;
    float kv[PL], vv[PL], ak[PL], av[PL];
    load_row(k + koff, hd, lane, kv);
    load_row(v + koff, hd, lane, vv);
#pragma unroll
    for (int c = 0; c < PL; ++c) ak[c] = av[c] = 0.0f;
    if (j < tk) {
      for (int hh = 0; hh < grp; ++hh) {
        const int h = kh * grp + hh;
        for (int i = max(0, j - off); i < tq; ++i) {
          const size_t qoff = ((size_t)(bb * (size_t)tq + i) * nh + h) * hd;
          const size_t row = ((size_t)bb * nh + h) * tq + i;
          const float p = expf(dot_row(kv, q + qoff, hd, lane) * scale - lse[row]);
          const float dp = dot_row(vv, dout + qoff, hd, lane);
          const float ds = p * ((dp - delta[row]) * scale);
#pragma unroll
          for (int c = 0; c < PL; ++c) {
            const int d = lane + 32 * c;
            if (d < hd) {
              av[c] += p * to_f32(dout[qoff + d]);
              ak[c] += ds * to_f32(q[qoff + d]);
            }
          }
        }
      }
    }
    store_row(dk + koff, hd, lane, ak, 1.0f);
    store_row(dv + koff, hd, lane, av, 1.0f);
  }
}
