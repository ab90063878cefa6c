// Shared by the grouped expert GEMM kernels (grouped_gemm.cu, sm_80+, and grouped_gemm_sm90.cu,
// sm_90a): cp.async copies, bf16 pair stores, and the tile scheduler over the ragged expert
// segments (see grouped_gemm.cu's header for how the scheduler maps CTAs to tiles).
#pragma once
#include "common.cuh"

namespace {

constexpr int MAX_EXPERTS = 64;  // the scheduler's warp scan holds two experts per lane

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ unsigned smem_addr(const void *p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; with ok == false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(ok ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void store_bf16x2(bf16 *p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162 *>(p) = __floats2bfloat162_rn(a, b);
}

// Accurate sigmoid (expf), as kernels/elementwise.cu and the CPU's 1 / (1 + exp(-x)).
__device__ __forceinline__ float sigmoid_acc(float x) { return 1.0f / (1.0f + expf(-x)); }

// The SwiGLU backward of one element: from dA (the gradient of silu(g) * u) and the saved
// pre-activations g, u: dg = dA * u * s * (1 + g (1 - s)), du = dA * g * s with s = sigmoid(g).
__device__ __forceinline__ void swiglu_bwd(float da, float g, float u, float &dg, float &du) {
  const float s = sigmoid_acc(g);
  dg = da * u * s * (1.0f + g * (1.0f - s));
  du = da * g * s;
}

// One CTA's tile of the grouped problem.
struct Tile {
  int e;       // expert
  int row0;    // first row of the tile in the permuted layout
  int rows;    // rows of the tile (1..BM)
  int n_tile;  // column tile
};

// Map blockIdx.x to a tile of the grouped problem (see the header). Returns false for a CTA past
// the last tile (the whole CTA, uniformly). Rows are clamped to [0, m_total] so that corrupt
// offsets cannot index outside the operands.
template <int BM, int GROUP_M>
__device__ __forceinline__ bool schedule(const unsigned *__restrict__ offsets, int m_total, int n_experts,
                                         int n_tiles, Tile &t) {
  __shared__ int s_start[MAX_EXPERTS + 1];  // prefix sums of the m-tile counts
  __shared__ int s_lo[MAX_EXPERTS], s_hi[MAX_EXPERTS];
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int c[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int e = lane + 32 * j;
      int lo = m_total, hi = m_total;
      if (e < n_experts) {
        lo = (int)min(offsets[e], (unsigned)m_total);
        hi = (int)min(max(offsets[e + 1], (unsigned)lo), (unsigned)m_total);
      }
      s_lo[e] = lo;
      s_hi[e] = hi;
      c[j] = ceil_div(hi - lo, BM);
    }
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y0 = __shfl_up_sync(0xffffffffu, c[0], d), y1 = __shfl_up_sync(0xffffffffu, c[1], d);
      if (lane >= d) {
        c[0] += y0;
        c[1] += y1;
      }
    }
    const int first_half = __shfl_sync(0xffffffffu, c[0], 31);
    s_start[lane + 1] = c[0];
    s_start[lane + 33] = c[1] + first_half;
    if (lane == 0) s_start[0] = 0;
  }
  __syncthreads();
  const long long tile = blockIdx.x;
  if (tile >= (long long)s_start[n_experts] * n_tiles) return false;
  // Largest e with s_start[e] * n_tiles <= tile: an empty expert shares its start with the next
  // one, so the search lands on the expert that owns the tile.
  int lo = 0, hi = n_experts;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if ((long long)s_start[mid] * n_tiles <= tile) lo = mid; else hi = mid;
  }
  const int e = lo;
  const int local = (int)(tile - (long long)s_start[e] * n_tiles);
  const int m_tiles = s_start[e + 1] - s_start[e];
  // Column-major groups of GROUP_M m-tiles: consecutive CTAs walk down the rows of one weight tile.
  const int group = GROUP_M * n_tiles;
  const int first_m = (local / group) * GROUP_M;
  const int group_m = min(m_tiles - first_m, GROUP_M);
  const int in_group = local % group;
  const int m_tile = first_m + in_group % group_m;
  t.e = e;
  t.n_tile = in_group / group_m;
  t.row0 = s_lo[e] + m_tile * BM;
  t.rows = min(BM, s_hi[e] - t.row0);
  return true;
}

}  // namespace
