// Grouped expert GEMMs of the MoE block: ONE launch runs the GEMM of every expert over its
// contiguous token segment of the expert-permuted layout (kernels/moe.cu moe_permute: expert e's
// rows are [offsets[e], offsets[e+1]), empty for an expert that received no tokens), on bf16
// tensor cores (mma.sync m16n8k16, f32 accumulation, sm_80+) with a STAGES-deep cp.async pipeline
// of shared-memory tiles.
//
// CPU reference: per expert, src/model/mod.rs swiglu_ffn, i.e. src/ops/linear.rs (linear,
// LinearBack) + src/ops/elementwise.rs (swiglu, SwigluBack) on the rows src/ops/moe.rs
// gather_rows picks (src/ops/router.rs Routing::expert_tokens).
// Wrapper: src/backend/cuda/grouped.rs. Test: tests/gpu_grouped.rs.
//
// Kernels (H hidden, I intermediate, E experts, M rows of the permuted layout, seg = expert e's rows):
//   grouped_gateup_fwd_bf16     act = silu(X Wg_e^T) * (X Wu_e^T) (bf16), and optionally the
//                               pre-activations gate, up (bf16) that the backward needs
//   grouped_nt_bf16             Y = A W_e^T                     (down forward: A [M,I], Wd [E,H,I])
//   grouped_nn_bf16             dX = dY W_e (+ dY2 W2_e)        (input gradients: dA = dY Wd_e, or
//                                                                dX = dG Wg_e + dU Wu_e in one pass)
//   grouped_nn_swiglu_bwd_bf16  dA = dY Wd_e with the SwiGLU backward in the epilogue: dG, dU (bf16)
//   grouped_wgrad_f32           dW_e = dY[seg]^T X[seg] (f32; the reduction runs over the segment,
//                               K = segment length); a second problem (dY2, dW2) with the same X
//                               in the same launch (gate and up); a per-expert train mask skips
//                               frozen experts (their dW is not touched); a trainable expert with
//                               no tokens gets zeros (or is left as is when accumulating)
// Layouts: activations row-major [M, width] bf16; weights stacked per expert in the HF layout
// [E, out, in] bf16 (gate/up [E, I, H], down [E, H, I]); weight gradients [E, out, in] f32.
// Requirements (the wrapper checks them): every width a multiple of 8 (16-byte cp.async chunks
// are then wholly inside or outside a row), base pointers 16-byte aligned, 1 <= E <= 64.
// Rows of the output outside [offsets[0], offsets[E]) are not written.
//
// Tile scheduler (forward and input-gradient kernels): warp 0 of every CTA reads the E+1 offsets
// and prefix-sums the per-expert m-tile counts ceil(rows_e / BM) into shared memory (E <= 64: two
// experts per lane, one warp scan). The host launches an upper bound of
// (ceil(M / BM) + E) * n_tiles CTAs (sum_e ceil(rows_e/BM) < M/BM + E) without reading the
// offsets back; CTA b finds its expert by binary search over the prefix sums, then its
// (m-tile, n-tile) inside the expert in GROUP_M-high column-major groups; CTAs past the last tile
// exit at once. The weight-gradient kernel has a fixed output per expert: grid
// (tiles of [out, in], E, problems).
#include "grouped_common.cuh"

namespace {

constexpr int BM = 128;       // CTA tile rows: 2 warp rows x 64, so each B tile is reused by 128 rows
constexpr int BN = 128;       // CTA tile columns: 4 warp columns x 32 (gate/up: 64 gate + 64 up)
constexpr int BK = 32;        // reduction step per stage: two k16 mma steps, 8 KiB per operand tile
constexpr int THREADS = 256;  // 8 warps (2 x 4): enough warps to hide ldmatrix/mma latency
constexpr int WARPS_N = 4;    // warp grid columns (rows = THREADS / 32 / WARPS_N = 2)
constexpr int WM = 64;        // warp tile rows: 4 m16 fragments
constexpr int WN = 32;        // warp tile columns: 4 n8 fragments (2 ldmatrix.x4 per k16 step)
constexpr int MI = WM / 16;
constexpr int NI = WN / 8;
constexpr int PAD = 8;        // bf16 per smem row of padding: rows stay 16-byte aligned for cp.async
                              // and ldmatrix, and 8 consecutive rows fall in 8 distinct 16-byte bank groups
constexpr int LDK = BK + PAD;            // pitch of a K-contiguous tile [128][BK] (80 bytes)
constexpr int LDR = BM + PAD;            // pitch of a row-contiguous tile [BK][128] (272 bytes)
constexpr int TILE_ELEMS = (BM * LDK > BK * LDR) ? BM * LDK : BK * LDR;  // one operand, one stage
constexpr int STAGES = 4;     // cp.async pipeline depth: tiles k+1..k+3 in flight while the tensor
                              // cores eat tile k (2 stages left the H100 waiting on global memory)
constexpr int GROUP_M = 8;    // m-tiles per raster group: 8 consecutive CTAs share one weight tile in L2
constexpr int GATEUP_BN = BN / 2;        // intermediate columns per gate/up CTA (64 gate + 64 up)
constexpr int CHUNKS_PER_THREAD = (128 * BK / 8) / THREADS;  // 16-byte copies per thread per tile

static_assert(BM == 128 && BN == 128, "the tile loaders fill 128 rows or columns");
static_assert(BM == 2 * WM && BN == WARPS_N * WN && THREADS == 2 * WARPS_N * 32, "warp grid");
static_assert(CHUNKS_PER_THREAD * THREADS == 128 * BK / 8, "tile copies divide over the threads");
static_assert(BK % 16 == 0 && STAGES >= 2, "k16 steps, at least double buffering");
// Dynamic shared memory of every GEMM kernel: STAGES stages of the A and B tiles (80 KiB; over the
// 48 KiB static limit, so the host opts in: src/backend/cuda/grouped.rs SMEM_BYTES).
constexpr int SMEM_BYTES = 2 * STAGES * TILE_ELEMS * (int)sizeof(bf16);

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const bf16 *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const bf16 *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c (16x8, f32) += a (16x16, bf16, row) * b (16x8, bf16, col).
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}


// Fill a K-contiguous tile [128][LDK]: smem row r gets elements k0..k0+BK of the global row
// row_ptr(r) (a row of K elements; nullptr: a row outside the operand, zeros). `any` is a valid
// global address passed for zero-filled chunks (never read).
template <class RowPtr>
__device__ __forceinline__ void load_kcontig(bf16 *s, RowPtr row_ptr, int k0, int K, const bf16 *any) {
#pragma unroll
  for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
    const int id = threadIdx.x + i * THREADS;
    const int r = id / (BK / 8), c = id % (BK / 8);
    const int k = k0 + c * 8;
    const bf16 *src = row_ptr(r);
    const bool ok = src != nullptr && k < K;
    cp_async16(s + r * LDK + c * 8, ok ? src + k : any, ok);
  }
}

// Fill a row-contiguous tile [BK][LDR]: smem row kr gets columns c0..c0+128 of global row k0 + kr
// of a row-major matrix with leading dimension ld; rows >= k_end and columns >= ncols are zeros.
__device__ __forceinline__ void load_rows(bf16 *s, const bf16 *base, int ld, int k0, int k_end, int c0, int ncols) {
#pragma unroll
  for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
    const int id = threadIdx.x + i * THREADS;
    const int kr = id / (128 / 8), c = id % (128 / 8);
    const int k = k0 + kr, col = c0 + c * 8;
    const bool ok = k < k_end && col < ncols;
    cp_async16(s + kr * LDR + c * 8, ok ? base + (size_t)k * ld + col : base, ok);
  }
}

// The CTA's [128 x 128] f32 product over `ktiles` reduction tiles. A_ROWS: the A tile is
// row-contiguous [BK][BM] (A^T in memory, the weight gradient) instead of K-contiguous
// [BM][BK]; B_ROWS likewise for B ([BK][BN], a [K, N] row-major operand, vs [BN][BK], an
// [N, K] one). load_a(tile, kt) / load_b(tile, kt) issue this thread's cp.async copies.
// Fragment ownership (mma.sync m16n8k16): acc[mi][ni][c] is row wm*WM + mi*16 + lane/4 + 8*(c/2),
// column wn*WN + ni*8 + 2*(lane%4) + c%2 of the CTA tile.
template <bool A_ROWS, bool B_ROWS, class LoadA, class LoadB>
__device__ __forceinline__ void mainloop(float (&acc)[MI][NI][4], int ktiles, bf16 (*sA)[TILE_ELEMS],
                                         bf16 (*sB)[TILE_ELEMS], LoadA load_a, LoadB load_b) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;
  if (ktiles <= 0) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int q = lane >> 3, r8 = lane & 7;  // ldmatrix: lane provides row r8 of matrix q

  // Prologue: tiles 0..STAGES-2 in flight (one commit group per tile, empty past the end, so that
  // wait_group<STAGES-2> below always means "tile kt has landed").
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) {
      load_a(sA[s], s);
      load_b(sB[s], s);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    // Every thread's copies of tile kt are visible, and every warp is done with tile kt-1, whose
    // stage the prefetch below overwrites.
    __syncthreads();
    const int nk = kt + STAGES - 1;
    if (nk < ktiles) {
      load_a(sA[nk % STAGES], nk);
      load_b(sB[nk % STAGES], nk);
    }
    cp_async_commit();
    const bf16 *A = sA[kt % STAGES], *B = sB[kt % STAGES];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned a[MI][4], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int m = wm * WM + mi * 16;
        // Matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
        if (!A_ROWS)
          ldsm_x4(a[mi], A + (m + (q & 1) * 8 + r8) * LDK + kk + (q >> 1) * 8);
        else
          ldsm_x4_trans(a[mi], A + (kk + (q >> 1) * 8 + r8) * LDR + m + (q & 1) * 8);
      }
#pragma unroll
      for (int p = 0; p < NI / 2; ++p) {
        const int n = wn * WN + p * 16;
        unsigned t[4];
        // Matrices 0..3 = (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
        if (!B_ROWS)
          ldsm_x4(t, B + (n + (q >> 1) * 8 + r8) * LDK + kk + (q & 1) * 8);
        else
          ldsm_x4_trans(t, B + (kk + (q & 1) * 8 + r8) * LDR + n + (q >> 1) * 8);
        b[2 * p][0] = t[0];
        b[2 * p][1] = t[1];
        b[2 * p + 1][0] = t[2];
        b[2 * p + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_bf16_16816(acc[mi][ni], a[mi], b[ni]);
    }
  }
  // No copy left in flight and every warp done with the tiles before the caller reuses them.
  cp_async_wait<0>();
  __syncthreads();
}

// The STAGES A tiles and STAGES B tiles in the kernel's dynamic shared memory.
struct Stages {
  bf16 (*a)[TILE_ELEMS];
  bf16 (*b)[TILE_ELEMS];
};
// Traps when the launch gave less than SMEM_BYTES (the wrapper mirrors the constant), which would
// otherwise read and write out of shared-memory bounds silently.
__device__ __forceinline__ Stages stages() {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  unsigned dyn;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
  if (dyn < (unsigned)SMEM_BYTES) __trap();
  bf16 *base = reinterpret_cast<bf16 *>(dyn_smem);
  return {reinterpret_cast<bf16 (*)[TILE_ELEMS]>(base), reinterpret_cast<bf16 (*)[TILE_ELEMS]>(base + STAGES * TILE_ELEMS)};
}

}  // namespace

// act [M, I] = silu(X Wg_e^T) * (X Wu_e^T) over each expert's rows; gate_out / up_out (nullable)
// get the pre-activations. x [M, H], wg / wu [E, I, H]. Grid: ((ceil(M/BM) + E) * ceil(I/64)).
// The B tile stacks, per warp column wn, 16 gate rows then the 16 up rows of the same outputs, so
// each thread holds gate and up of the same element and the SwiGLU runs on f32 accumulators.
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    grouped_gateup_fwd_bf16(const bf16 *__restrict__ x, const bf16 *__restrict__ wg, const bf16 *__restrict__ wu,
                            const unsigned *__restrict__ offsets, bf16 *__restrict__ act, bf16 *__restrict__ gate_out,
                            bf16 *__restrict__ up_out, int m_total, int n_experts, int h, int inter) {
  const Stages st = stages();
  bf16 (*sA)[TILE_ELEMS] = st.a, (*sB)[TILE_ELEMS] = st.b;
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(inter, GATEUP_BN), t)) return;
  const int n0 = t.n_tile * GATEUP_BN;
  const bf16 *xs = x + (size_t)t.row0 * h;
  const size_t woff = (size_t)t.e * inter * h;
  const bf16 *wge = wg + woff, *wue = wu + woff;
  const int rows = t.rows;
  auto a_row = [=](int r) -> const bf16 * { return r < rows ? xs + (size_t)r * h : nullptr; };
  auto b_row = [=](int r) -> const bf16 * {
    const int n = n0 + (r >> 5) * 16 + (r & 15);
    if (n >= inter) return nullptr;
    return ((r & 16) ? wue : wge) + (size_t)n * h;
  };
  float acc[MI][NI][4];
  mainloop<false, false>(
      acc, ceil_div(h, BK), sA, sB, [&](bf16 *s, int kt) { load_kcontig(s, a_row, kt * BK, h, x); },
      [&](bf16 *s, int kt) { load_kcontig(s, b_row, kt * BK, h, wg); });

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * WM + mi * 16 + (lane >> 2) + half * 8;
      if (r >= rows) continue;
      const size_t row = (size_t)(t.row0 + r) * inter;
#pragma unroll
      for (int ni = 0; ni < NI / 2; ++ni) {
        const int col = n0 + wn * (WN / 2) + ni * 8 + 2 * (lane & 3);
        if (col >= inter) continue;  // inter % 8 == 0: a column pair is wholly in or out
        const float g0 = acc[mi][ni][2 * half], g1 = acc[mi][ni][2 * half + 1];
        const float u0 = acc[mi][ni + NI / 2][2 * half], u1 = acc[mi][ni + NI / 2][2 * half + 1];
        store_bf16x2(act + row + col, g0 * sigmoid_acc(g0) * u0, g1 * sigmoid_acc(g1) * u1);
        if (gate_out) store_bf16x2(gate_out + row + col, g0, g1);
        if (up_out) store_bf16x2(up_out + row + col, u0, u1);
      }
    }
}

// y [M, N] = a[seg] [rows, K] @ w_e^T over each expert's rows; w [E, N, K]. Grid:
// ((ceil(M/BM) + E) * ceil(N/BN)).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    grouped_nt_bf16(const bf16 *__restrict__ a, const bf16 *__restrict__ w, const unsigned *__restrict__ offsets,
                    bf16 *__restrict__ y, int m_total, int n_experts, int k, int n) {
  const Stages st = stages();
  bf16 (*sA)[TILE_ELEMS] = st.a, (*sB)[TILE_ELEMS] = st.b;
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(n, BN), t)) return;
  const int n0 = t.n_tile * BN;
  const bf16 *as = a + (size_t)t.row0 * k;
  const bf16 *we = w + (size_t)t.e * n * k;
  const int rows = t.rows;
  auto a_row = [=](int r) -> const bf16 * { return r < rows ? as + (size_t)r * k : nullptr; };
  auto b_row = [=](int r) -> const bf16 * { return n0 + r < n ? we + (size_t)(n0 + r) * k : nullptr; };
  float acc[MI][NI][4];
  mainloop<false, false>(
      acc, ceil_div(k, BK), sA, sB, [&](bf16 *s, int kt) { load_kcontig(s, a_row, kt * BK, k, a); },
      [&](bf16 *s, int kt) { load_kcontig(s, b_row, kt * BK, k, w); });

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * WM + mi * 16 + (lane >> 2) + half * 8;
      if (r >= rows) continue;
      const size_t row = (size_t)(t.row0 + r) * n;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * WN + ni * 8 + 2 * (lane & 3);
        if (col < n) store_bf16x2(y + row + col, acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
      }
    }
}

// The shared body of the two NN kernels: acc = dy[seg] [rows, K] @ w_e [K, N] (+ dy2[seg] @ w2_e
// when dy2 != nullptr, the second K range following the first), w / w2 [E, K, N].
__device__ __forceinline__ void nn_product(float (&acc)[MI][NI][4], const Tile &t, const bf16 *dy, const bf16 *w,
                                           const bf16 *dy2, const bf16 *w2, int k, int n,
                                           bf16 (*sA)[TILE_ELEMS], bf16 (*sB)[TILE_ELEMS]) {
  const int n0 = t.n_tile * BN;
  const int kt_one = ceil_div(k, BK);
  const size_t woff = (size_t)t.e * k * n;
  const size_t aoff = (size_t)t.row0 * k;
  const int rows = t.rows;
  mainloop<false, true>(
      acc, dy2 ? 2 * kt_one : kt_one, sA, sB,
      [&](bf16 *s, int kt) {
        const bool second = kt >= kt_one;
        const bf16 *src = (second ? dy2 : dy) + aoff;
        auto row = [=](int r) -> const bf16 * { return r < rows ? src + (size_t)r * k : nullptr; };
        load_kcontig(s, row, (second ? kt - kt_one : kt) * BK, k, dy);
      },
      [&](bf16 *s, int kt) {
        const bool second = kt >= kt_one;
        load_rows(s, (second ? w2 : w) + woff, n, (second ? kt - kt_one : kt) * BK, k, n0, n);
      });
}

// dx [M, N] = dy[seg] [rows, K] @ w_e [K, N] (+ dy2[seg] @ w2_e; dy2 / w2 nullable) over each
// expert's rows; w, w2 [E, K, N]. Grid: ((ceil(M/BM) + E) * ceil(N/BN)).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    grouped_nn_bf16(const bf16 *__restrict__ dy, const bf16 *__restrict__ w, const bf16 *__restrict__ dy2,
                    const bf16 *__restrict__ w2, const unsigned *__restrict__ offsets, bf16 *__restrict__ dx,
                    int m_total, int n_experts, int k, int n) {
  const Stages st = stages();
  bf16 (*sA)[TILE_ELEMS] = st.a, (*sB)[TILE_ELEMS] = st.b;
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(n, BN), t)) return;
  float acc[MI][NI][4];
  nn_product(acc, t, dy, w, dy2, w2, k, n, sA, sB);

  const int n0 = t.n_tile * BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * WM + mi * 16 + (lane >> 2) + half * 8;
      if (r >= t.rows) continue;
      const size_t row = (size_t)(t.row0 + r) * n;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * WN + ni * 8 + 2 * (lane & 3);
        if (col < n) store_bf16x2(dx + row + col, acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
      }
    }
}

// Backward of the down projection and the SwiGLU in one pass: dA = dy[seg] [rows, H] @ wd_e [H, I]
// (f32, never stored), then dgate = dA * up * s * (1 + gate (1 - s)), dup = dA * gate * s with
// s = sigmoid(gate), from the saved pre-activations gate / up [M, I]. wd [E, H, I] (k = H, n = I).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    grouped_nn_swiglu_bwd_bf16(const bf16 *__restrict__ dy, const bf16 *__restrict__ wd, const bf16 *__restrict__ gate,
                               const bf16 *__restrict__ up, const unsigned *__restrict__ offsets,
                               bf16 *__restrict__ dgate, bf16 *__restrict__ dup, int m_total, int n_experts, int k,
                               int n) {
  const Stages st = stages();
  bf16 (*sA)[TILE_ELEMS] = st.a, (*sB)[TILE_ELEMS] = st.b;
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(n, BN), t)) return;
  float acc[MI][NI][4];
  nn_product(acc, t, dy, wd, nullptr, nullptr, k, n, sA, sB);

  const int n0 = t.n_tile * BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * WM + mi * 16 + (lane >> 2) + half * 8;
      if (r >= t.rows) continue;
      const size_t row = (size_t)(t.row0 + r) * n;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * WN + ni * 8 + 2 * (lane & 3);
        if (col >= n) continue;
        const __nv_bfloat162 g2 = *reinterpret_cast<const __nv_bfloat162 *>(gate + row + col);
        const __nv_bfloat162 u2 = *reinterpret_cast<const __nv_bfloat162 *>(up + row + col);
        const float g[2] = {__low2float(g2), __high2float(g2)}, u[2] = {__low2float(u2), __high2float(u2)};
        float dg[2], du[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) swiglu_bwd(acc[mi][ni][2 * half + c], g[c], u[c], dg[c], du[c]);
        store_bf16x2(dgate + row + col, dg[0], dg[1]);
        store_bf16x2(dup + row + col, du[0], du[1]);
      }
    }
}

// Weight gradients: dw[e] [N, K] (+)= dy[seg]^T @ x[seg] for every expert e with mask[e] != 0
// (mask nullable: all experts), dy [M, N], x [M, K]; blockIdx.z == 1 computes dw2 from dy2 with
// the same x. f32 accumulation and output; the reduction runs over the segment's rows in order of
// BK-row tiles, so results are deterministic. A trainable expert with no rows writes zeros
// (nothing with `accumulate`); a masked expert is not touched at all.
// Grid: (ceil(N/BM) * ceil(K/BN), E, problems).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    grouped_wgrad_f32(const bf16 *__restrict__ dy, const bf16 *__restrict__ x, const bf16 *__restrict__ dy2,
                      float *__restrict__ dw, float *__restrict__ dw2, const unsigned *__restrict__ offsets,
                      const unsigned *__restrict__ mask, int m_total, int n_experts, int n, int k, int accumulate) {
  const Stages st = stages();
  bf16 (*sA)[TILE_ELEMS] = st.a, (*sB)[TILE_ELEMS] = st.b;
  const int e = blockIdx.y;
  if (e >= n_experts || (mask != nullptr && mask[e] == 0u)) return;
  const bf16 *A = blockIdx.z ? dy2 : dy;
  float *C = (blockIdx.z ? dw2 : dw) + (size_t)e * n * k;
  const int tiles_m = ceil_div(n, BM);
  const int m0 = (blockIdx.x % tiles_m) * BM, n0 = (blockIdx.x / tiles_m) * BN;
  const int lo = (int)min(offsets[e], (unsigned)m_total);
  const int hi = (int)min(max(offsets[e + 1], (unsigned)lo), (unsigned)m_total);
  const int ktiles = ceil_div(hi - lo, BK);
  if (ktiles == 0 && accumulate) return;
  float acc[MI][NI][4];
  mainloop<true, true>(
      acc, ktiles, sA, sB, [&](bf16 *s, int kt) { load_rows(s, A, n, lo + kt * BK, hi, m0, n); },
      [&](bf16 *s, int kt) { load_rows(s, x, k, lo + kt * BK, hi, n0, k); });

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = m0 + wm * WM + mi * 16 + (lane >> 2) + half * 8;
      if (r >= n) continue;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * WN + ni * 8 + 2 * (lane & 3);
        if (col >= k) continue;
        float2 *p = reinterpret_cast<float2 *>(C + (size_t)r * k + col);
        float2 v = make_float2(acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
        if (accumulate) {
          const float2 old = *p;
          v.x += old.x;
          v.y += old.y;
        }
        *p = v;
      }
    }
}
