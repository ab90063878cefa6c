// Hopper (sm_90a) path of the grouped expert GEMMs' forward: grouped_nt_sm90_bf16 (y[seg] =
// a[seg] w_e^T, the down projection, as grouped_gemm.cu's grouped_nt_bf16) and
// grouped_gateup_fwd_sm90_bf16 (act = silu(x wg_e^T) * (x wu_e^T), as grouped_gateup_fwd_bf16):
// wgmma.mma_async with both operands in shared memory, f32 accumulators in registers.
//
// CPU reference: per expert, src/ops/linear.rs (linear) on the rows src/ops/moe.rs gather_rows
// picks, as for grouped_gemm.cu. Wrapper: src/backend/cuda/grouped.rs (Device::grouped_nt, which
// and Device::grouped_gateup_fwd take this path on an sm_90 GPU when FLEXRUN_SM90=1; the *_on
// variants on request).
// Test: tests/gpu_grouped.rs (grouped_nt_sm90). Notes and measurements: grouped_gemm_sm90.md.
//
// Compiled for sm_90a only (build.rs: files named *_sm90.cu); the module is loaded only on a
// compute-capability 9.0 device.
//
// Shape: a CTA computes a 128 x 128 tile of one expert's segment with two warpgroups (rows 0-63
// and 64-127), each issuing m64n128k16 wgmma over a BK = 64 slice per stage (4 instructions);
// all 256 threads fill a STAGES-deep cp.async pipeline (no TMA and no producer warpgroup yet:
// the first Hopper version; see the notes for the next steps). The tile scheduler over the
// ragged segments is grouped_common.cuh's, shared with the sm_80 kernels.
//
// Shared-memory layout (no swizzle, K-major, both operands): a tile of 128 rows x 64 k is 16 x 8
// core matrices of 8 rows x 16 bytes (128 contiguous bytes each); core matrix (row/8, k/8) sits
// at ((row/8) * 8 + k/8) * 128 bytes. In the wgmma descriptors the leading-dimension byte offset
// (between core matrices adjacent in K) is 128 and the stride-dimension byte offset (adjacent in
// M or N) is 8 * 128 = 1024.
#include "grouped_common.cuh"
#include "hopper.cuh"

#include <stdint.h>

namespace {

constexpr int BM = 128;
constexpr int BN = 128;
constexpr int BK = 64;
constexpr int STAGES = 4;
constexpr int THREADS = 256;  // two warpgroups
constexpr int GROUP_M = 8;
constexpr int CORE = 128;                 // bytes of a core matrix
constexpr int KCORES = BK / 8;            // core matrices along K
constexpr int LBO = CORE;                 // K-adjacent core matrices
constexpr int SBO = KCORES * CORE;        // M/N-adjacent core matrices (1024)
constexpr int TILE_BYTES = 128 * BK * 2;  // one operand, one stage (16 KiB)
constexpr int SMEM_BYTES = 2 * STAGES * TILE_BYTES;  // 128 KiB (src/backend/cuda/grouped.rs SM90_SMEM)
constexpr int CHUNKS_PER_THREAD = 128 * BK / 8 / THREADS;

static_assert(CHUNKS_PER_THREAD * THREADS * 8 == 128 * BK, "tile copies divide over the threads");

// Byte offset of row r, 16-byte k chunk c in a tile.
__device__ __forceinline__ int tile_off(int r, int c) { return ((r >> 3) * KCORES + c) * CORE + (r & 7) * 16; }

// Fill one operand tile (128 rows x BK, from k0): row r from row_ptr(r) (nullptr: zeros); chunks
// past K are zeros. Eight consecutive threads write the eight rows of one core matrix (128
// contiguous bytes: no bank conflicts), a warp reads 64 contiguous bytes of 8 global rows.
template <class RowPtr>
__device__ __forceinline__ void load_tile(unsigned char *s, RowPtr row_ptr, int k0, int K, const bf16 *any) {
#pragma unroll
  for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
    const int id = threadIdx.x + i * THREADS;
    const int r = (id / (8 * KCORES)) * 8 + (id & 7), c = (id >> 3) % KCORES;
    const int k = k0 + c * 8;
    const bf16 *src = row_ptr(r);
    const bool ok = src != nullptr && k < K;
    cp_async16(s + tile_off(r, c), ok ? src + k : any, ok);
  }
}

// The wgmma shared-memory matrix descriptor of the K-major, unswizzled operand at p.
__device__ __forceinline__ uint64_t smem_desc(const unsigned char *p) {
  return hopper::smem_desc(smem_addr(p), LBO, SBO, hopper::SWIZZLE_NONE);
}

// This warpgroup's 64 x 128 f32 share of the CTA's 128 x 128 product over K: A rows a_row(r),
// B rows b_row(r) (nullptr: zeros), both K-contiguous; any_a / any_b are valid addresses passed
// for zero-filled copies. Leaves no copy in flight; the caller may reuse shared memory after a
// barrier.
template <class ARow, class BRow>
__device__ __forceinline__ void mainloop(float (&d)[64], int k, unsigned char *smem, ARow a_row, BRow b_row,
                                         const bf16 *any_a, const bf16 *any_b) {
  unsigned char *sA = smem, *sB = smem + STAGES * TILE_BYTES;
  const int ktiles = ceil_div(k, BK);
  const int wg = threadIdx.x >> 7;
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.0f;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) {
      load_tile(sA + s * TILE_BYTES, a_row, s * BK, k, any_a);
      load_tile(sB + s * TILE_BYTES, b_row, s * BK, k, any_b);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    // The tile's bytes came through the generic proxy; the tensor cores read them through the
    // async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    const int nk = kt + STAGES - 1;
    if (nk < ktiles) {
      load_tile(sA + (nk % STAGES) * TILE_BYTES, a_row, nk * BK, k, any_a);
      load_tile(sB + (nk % STAGES) * TILE_BYTES, b_row, nk * BK, k, any_b);
    }
    cp_async_commit();
    const unsigned char *A = sA + (kt % STAGES) * TILE_BYTES + wg * (64 / 8) * SBO;
    const unsigned char *B = sB + (kt % STAGES) * TILE_BYTES;
    hopper::fence_operands(d);
    hopper::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      hopper::wgmma_ss_m64n128k16<0, 0>(d, smem_desc(A + kk * 2 * CORE), smem_desc(B + kk * 2 * CORE), kt > 0 || kk > 0);
    hopper::wgmma_commit();
    hopper::wgmma_wait<0>();
    hopper::fence_operands(d);
  }
  cp_async_wait<0>();

}

// The CTA's shared memory, checked against what the launch gave (the wrapper mirrors
// SMEM_BYTES; less would read and write out of bounds silently).
__device__ __forceinline__ unsigned char *dyn_smem() {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned dyn;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
  if (dyn < (unsigned)SMEM_BYTES) __trap();
  return smem;
}

}  // namespace

// y [M, N] = a [M, K] w_e^T over each expert's rows; w [E, N, K]. Grid: ((ceil(M/BM) + E) *
// ceil(N/BN)), 256 threads, SMEM_BYTES of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    grouped_nt_sm90_bf16(const bf16 *__restrict__ a, const bf16 *__restrict__ w, const unsigned *__restrict__ offsets,
                         bf16 *__restrict__ y, int m_total, int n_experts, int k, int n) {
  unsigned char *smem = dyn_smem();
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(n, BN), t)) return;
  const int n0 = t.n_tile * BN;
  const bf16 *as = a + (size_t)t.row0 * k;
  const bf16 *we = w + (size_t)t.e * n * k;
  const int rows = t.rows;
  auto a_row = [=](int r) -> const bf16 * { return r < rows ? as + (size_t)r * k : nullptr; };
  auto b_row = [=](int r) -> const bf16 * { return n0 + r < n ? we + (size_t)(n0 + r) * k : nullptr; };
  float d[64];
  mainloop(d, k, smem, a_row, b_row, a, w);

  // Accumulator ownership (m64nNk16, f32): warp w of the warpgroup holds rows 16w..16w+15;
  // d[4j + 2h + c] is row 16w + lane/4 + 8h, column 8j + 2(lane%4) + c.
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = wg * 64 + warp * 16 + (lane >> 2) + 8 * h;
    if (r >= rows) continue;
    bf16 *yr = y + (size_t)(t.row0 + r) * n;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + 8 * j + 2 * (lane & 3);
      if (col < n) store_bf16x2(yr + col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
    }
  }
}

// act [M, I] = silu(X Wg_e^T) * (X Wu_e^T) over each expert's rows; gate_out / up_out (nullable)
// get the pre-activations. x [M, H], wg / wu [E, I, H]. Grid: ((ceil(M/BM) + E) * ceil(I/64)).
// The B tile holds 64 gate rows then the 64 up rows of the same intermediate columns, so each
// thread holds gate (accumulator column c) and up (column 64 + c) of the same element and the
// SwiGLU runs on f32 accumulators, as grouped_gemm.cu's grouped_gateup_fwd_bf16.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    grouped_gateup_fwd_sm90_bf16(const bf16 *__restrict__ x, const bf16 *__restrict__ wg, const bf16 *__restrict__ wu,
                                 const unsigned *__restrict__ offsets, bf16 *__restrict__ act,
                                 bf16 *__restrict__ gate_out, bf16 *__restrict__ up_out, int m_total, int n_experts,
                                 int h, int inter) {
  unsigned char *smem = dyn_smem();
  constexpr int HALF = BN / 2;
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(inter, HALF), t)) return;
  const int n0 = t.n_tile * HALF;
  const bf16 *xs = x + (size_t)t.row0 * h;
  const size_t woff = (size_t)t.e * inter * h;
  const bf16 *wge = wg + woff, *wue = wu + woff;
  const int rows = t.rows;
  auto a_row = [=](int r) -> const bf16 * { return r < rows ? xs + (size_t)r * h : nullptr; };
  auto b_row = [=](int r) -> const bf16 * {
    const int c = n0 + (r & (HALF - 1));
    if (c >= inter) return nullptr;
    return (r < HALF ? wge : wue) + (size_t)c * h;
  };
  float d[64];
  mainloop(d, h, smem, a_row, b_row, x, wg);

  const int wgi = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = wgi * 64 + warp * 16 + (lane >> 2) + 8 * hh;
    if (r >= rows) continue;
    const size_t row = (size_t)(t.row0 + r) * inter;
#pragma unroll
    for (int j = 0; j < HALF / 8; ++j) {
      const int col = n0 + 8 * j + 2 * (lane & 3);
      if (col >= inter) continue;  // inter % 8 == 0: a column pair is wholly in or out
      const float g0 = d[4 * j + 2 * hh], g1 = d[4 * j + 2 * hh + 1];
      const float u0 = d[4 * (j + HALF / 8) + 2 * hh], u1 = d[4 * (j + HALF / 8) + 2 * hh + 1];
      store_bf16x2(act + row + col, g0 * sigmoid_acc(g0) * u0, g1 * sigmoid_acc(g1) * u1);
      if (gate_out) store_bf16x2(gate_out + row + col, g0, g1);
      if (up_out) store_bf16x2(up_out + row + col, u0, u1);
    }
  }
}
