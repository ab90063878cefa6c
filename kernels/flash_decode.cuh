// The per-row work of the Hopper split-KV decode (flash_attention_sm90.cu: one to four query rows,
// the heads that share a KV head, against a chunk of their KV cache, the keys staged in shared
// memory by TMA). It is flash_attention.cu's
// decode_split with the loads taken out of the key loop; that kernel keeps its own copy because
// it has run on GPUs as it is (routing it through this header changed its SASS and cost the
// generic s1 variant a register spill). CPU reference: src/ops/attention.rs (attention_forward);
// test: tests/gpu_flash.rs (decode_sm90).
//
// WARPS warps (the first NT threads of the CTA) run one to WARPS query rows over their keys
// (several rows: the query heads that share a KV head, each on WARPS / rows warps): each group of L lanes handles one key
// (VEC dims per lane per load, NCH loads per row: lane dims d = (cc L + sl) VEC + e), so a warp
// takes 32 / L keys per step; each lane group keeps an online softmax (log2 domain) over the keys
// it saw; finish() merges the groups of a warp, then the warps, and writes the row's partial
// (m, l) and unnormalised o for the combine pass (flash_decode_combine_bf16).
#pragma once
#include "common.cuh"

namespace fdec {

constexpr int WARPS = 4;  // 128 threads: enough keys in flight per CTA, many CTAs per SM
constexpr int NT = WARPS * 32;
constexpr int MAX_HD = 256;

template <int L, int VEC, int NCH> struct Row {
  static constexpr int G = 32 / L, DPL = NCH * VEC;  // key groups per warp, dims per lane
  static_assert(L * VEC * NCH <= MAX_HD && (L & (L - 1)) == 0, "lane groups are powers of two");
  float qr[DPL], acc[DPL];
  float m, l;
  int sl, kg;  // lane within its group, group within the warp

  // q row at qp (hd values), pre-scaled by log2(e) / sqrt(hd).
  __device__ __forceinline__ void init(const bf16 *__restrict__ qp, int hd, float scale_log2, int lane) {
    sl = lane & (L - 1);
    kg = lane / L;
#pragma unroll
    for (int cc = 0; cc < NCH; ++cc) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int d = (cc * L + sl) * VEC + e;
        qr[cc * VEC + e] = d < hd ? to_f32(qp[d]) * scale_log2 : 0.0f;
        acc[cc * VEC + e] = 0.0f;
      }
    }
    m = -INFINITY;
    l = 0.0f;
  }

  // This lane's dims of the row at p (nothing is read unless `ok`).
  __device__ __forceinline__ void load(const bf16 *p, bool valid, int hd, float (&x)[DPL]) const {
#pragma unroll
    for (int cc = 0; cc < NCH; ++cc) {
      const int d0 = (cc * L + sl) * VEC;
      const bool ok = valid && d0 < hd;
      if constexpr (VEC == 8) {
        uint4 u = make_uint4(0, 0, 0, 0);
        if (ok) u = *reinterpret_cast<const uint4 *>(p + d0);
        const __nv_bfloat162 *hp = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __bfloat1622float2(hp[e]);
          x[cc * 8 + 2 * e] = f.x;
          x[cc * 8 + 2 * e + 1] = f.y;
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[cc * VEC + e] = (ok && d0 + e < hd) ? to_f32(p[d0 + e]) : 0.0f;
      }
    }
  }

  // One key of this lane group: its K and V rows (16-byte aligned for VEC 8); an invalid key
  // (past the row's keys) reads nothing and counts for nothing. Every lane of the warp calls it
  // (the shuffles need the whole warp).
  __device__ __forceinline__ void step(const bf16 *krow, const bf16 *vrow, bool valid, int hd) {
    float x[DPL];
    load(krow, valid, hd, x);
    float sc = 0.0f;
#pragma unroll
    for (int d = 0; d < DPL; ++d) sc += qr[d] * x[d];
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o);
    if (!valid) sc = -INFINITY;
    const float m_new = fmaxf(m, sc);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float corr = exp2f(m - m_use), p = exp2f(sc - m_use);
    l = l * corr + p;
    m = m_new;
    load(vrow, valid, hd, x);
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = acc[d] * corr + p * x[d];
  }

  // Merge the warp's key groups, then the `wpr` warps of this row (warps row_w0..row_w0+wpr-1,
  // through s_o / s_m / s_l), and write the row's partial: po (hd floats) and pml = (m, l). The
  // row must have seen a visible key. Every consumer thread of the CTA calls it.
  __device__ __forceinline__ void finish(float *po, float *pml, int hd, float (&s_o)[WARPS][MAX_HD],
                                         float (&s_m)[WARPS], float (&s_l)[WARPS], int warp, int lane,
                                         int row_w0, int wpr) {
    // Lane sl of every group holds the same dims.
#pragma unroll
    for (int o = L; o < 32; o <<= 1) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m, o), l_o = __shfl_xor_sync(0xffffffffu, l, o);
      const float mm = fmaxf(m, m_o);
      const float wa = m == -INFINITY ? 0.0f : exp2f(m - mm), wb = m_o == -INFINITY ? 0.0f : exp2f(m_o - mm);
      l = l * wa + l_o * wb;
#pragma unroll
      for (int d = 0; d < DPL; ++d) acc[d] = acc[d] * wa + __shfl_xor_sync(0xffffffffu, acc[d], o) * wb;
      m = mm;
    }
    if (kg == 0) {
#pragma unroll
      for (int cc = 0; cc < NCH; ++cc) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int d = (cc * L + sl) * VEC + e;
          if (d < hd) s_o[warp][d] = acc[cc * VEC + e];
        }
      }
      if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
      }
    }
    // The NT consumer threads (a named barrier: a CTA may hold more threads, e.g. a producer
    // warp that has left).
    asm volatile("bar.sync 1, %0;\n" ::"n"(NT) : "memory");
    // Merge the row's warps; the chunk holds at least one visible key, so mm is finite.
    const auto mine = [&](int w) { return w >= row_w0 && w < row_w0 + wpr; };
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w)
      if (mine(w)) mm = fmaxf(mm, s_m[w]);
    float wt[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) wt[w] = mine(w) && s_m[w] != -INFINITY ? exp2f(s_m[w] - mm) : 0.0f;
    const int rt = (warp - row_w0) * 32 + lane;  // this thread's index among the row's
    for (int d = rt; d < hd; d += 32 * wpr) {
      float a = 0.0f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w)
        if (mine(w)) a += s_o[w][d] * wt[w];
      po[d] = a;
    }
    if (rt == 0) {
      float ls = 0.0f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w)
        if (mine(w)) ls += s_l[w] * wt[w];
      pml[0] = mm;
      pml[1] = ls;
    }
  }
};

// A row that sees no key of its chunk: an empty partial.
__device__ __forceinline__ void empty_partial(float *po, float *pml, int hd, int tid) {
  for (int d = tid; d < hd; d += NT) po[d] = 0.0f;
  if (tid == 0) {
    pml[0] = -INFINITY;
    pml[1] = 0.0f;
  }
}

}  // namespace fdec
