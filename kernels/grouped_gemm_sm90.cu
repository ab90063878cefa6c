// Hopper (sm_90a) path of the grouped expert GEMMs: the forward, grouped_nt_sm90_bf16 (y[seg] =
// a[seg] w_e^T, the down projection) and grouped_gateup_fwd_sm90_bf16 (act = silu(x wg_e^T) *
// (x wu_e^T)), and the input gradients, grouped_nn_sm90_bf16 (dx[seg] = dy[seg] w_e (+ dy2[seg]
// w2_e)) and grouped_nn_swiglu_bwd_sm90_bf16 (dA = dy wd_e with the SwiGLU backward in the
// epilogue), and the weight gradients, grouped_wgrad_sm90_f32 (dw_e = dy[seg]^T x[seg]), each as
// grouped_gemm.cu's kernel of the same name without _sm90: TMA loads, wgmma from shared memory,
// a producer and two consumer warpgroups.
//
// CPU reference: per expert, src/ops/linear.rs (linear, LinearBack) and src/ops/elementwise.rs
// (swiglu, SwigluBack) on the rows src/ops/moe.rs gather_rows picks, as for grouped_gemm.cu.
// Wrapper: src/backend/cuda/grouped.rs (Device::grouped_nt, grouped_gateup_fwd, grouped_nn,
// grouped_nn_swiglu_bwd and grouped_wgrad take this path on an sm_90 GPU when FLEXRUN_SM90=1; the *_on variants on
// request). Test: tests/gpu_grouped.rs (grouped_sm90). Notes and measurements:
// grouped_gemm_sm90.md.
//
// Compiled for sm_90a only (build.rs: files named *_sm90.cu); the module is loaded only on a
// compute-capability 9.0 device.
//
// A CTA computes a 128 x 256 tile of one expert's segment (the tile scheduler over the ragged
// segments is grouped_common.cuh's, shared with the sm_80 kernels) with three warpgroups:
// - warpgroup 0, the producer (setmaxnreg down to 24): one thread issues, per BK = 64 slice of
//   K, the TMA loads of the A rows (16 KiB) and the B rows (32 KiB) into a STAGES-deep ring,
//   each stage with a "full" mbarrier (transaction bytes) and an "empty" one the consumers
//   release;
// - warpgroups 1 and 2, the consumers (setmaxnreg up to 240: 128 accumulators a thread), rows
//   0-63 and 64-127: per stage four m64n256k16 wgmma with both operands from shared memory,
//   keeping one stage's wgmma in flight (wait_group 1) and releasing the stage before it.
// The A map covers all m rows and the B map all e * n weight rows: a tile's rows past its
// segment read the next expert's rows (their outputs are not stored), columns past K read zeros.
//
// The NN kernels' B operand is BK rows of w_e [K, N] (N contiguous): an MN-major operand, stored
// as four 64-column blocks of [BK rows][128 bytes] (TMA boxes of 64 x 64 x 1 over [E, K, N]) and read with the
// descriptor's transpose bit (LBO 8 KiB between the blocks, SBO 1024 per 8 rows of K, a k16 step
// 16 rows = 2048 bytes).
//
// Shared-memory layout: per stage the A tile (128 rows) then the B tile (256 rows), rows of 128
// bytes (64 bf16) as TMA writes them with the 128-byte swizzle (8-row atoms of 1024 bytes), then the mbarriers;
// the base is aligned to 1024 bytes. Descriptors: K-major, 128-byte swizzle, SBO 1024; a k16
// step advances the start address by 32 bytes inside the row.
#include "grouped_common.cuh"
#include "hopper.cuh"

#include <cuda.h>
#include <stdint.h>

namespace {

constexpr int BM = 128;
constexpr int BN = 256;
constexpr int BK = 64;
constexpr int STAGES = 4;
constexpr int THREADS = 384;  // producer + two consumer warpgroups
constexpr int GROUP_M = 8;
constexpr int ROW_BYTES = BK * 2;                    // one swizzled row: 64 bf16
constexpr int A_BYTES = BM * ROW_BYTES;              // A rows of one stage (16 KiB)
constexpr int STAGE_BYTES = A_BYTES + BN * ROW_BYTES;  // and B rows (32 KiB)
constexpr int BAR_OFF = STAGES * STAGE_BYTES;
// Requested dynamic shared memory (src/backend/cuda/grouped.rs SM90_SMEM_BYTES): the ring, the
// 2 x STAGES mbarriers and the slack to align the base to 1024 bytes.
constexpr int SMEM_BYTES = BAR_OFF + 2 * STAGES * 8 + 1024;

// The CTA's shared memory aligned to 1024 bytes, checked against what the launch gave (the
// wrapper mirrors SMEM_BYTES; less would read and write out of bounds silently).
__device__ __forceinline__ unsigned char *dyn_smem() {
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned dyn;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
  if (dyn < (unsigned)SMEM_BYTES) __trap();
  const unsigned raw = smem_addr(smem);
  return smem + (((raw + 1023) & ~1023u) - raw);
}

// The K-major, 128-byte-swizzled operand descriptor at shared address `addr`.
__device__ __forceinline__ uint64_t desc_k(uint32_t addr) {
  return hopper::smem_desc(addr, 16, 1024, hopper::SWIZZLE_128B);
}

// No consumer-side change to a stage (every kernel but the weight gradients).
struct NoFixup {
  __device__ __forceinline__ void operator()(unsigned char *, int) const {}
};

// The CTA's 128 x 256 f32 product over `ktiles` slices of BK, this consumer warpgroup's 64 rows
// in d. The producer fills stage buffers with load_stage(dst, bar, kt): the A tile at dst, the B
// tile after it, STAGE_BYTES in all. Operand layouts: K-major A is BM rows of BK; MN-major A
// (A_MN, the weight gradients) is BK rows of BM as two 64-column blocks [BK][128 bytes]; K-major
// B is BN rows of BK; MN-major B (B_MN) is BK rows of BN as four 64-column blocks. Consumers call
// fixup(stage, kt) once a stage has arrived (the weight gradients zero the rows past a segment
// there). Every thread of the CTA calls it; the producer warpgroup returns false, the consumers
// true.
template <bool A_MN, bool B_MN, class LoadStage, class Fixup = NoFixup>
__device__ __forceinline__ bool mainloop(float (&d)[BN / 2], int ktiles, unsigned char *smem, LoadStage load_stage,
                                         Fixup fixup = Fixup{}) {
  using namespace hopper;
  uint64_t *full = reinterpret_cast<uint64_t *>(smem + BAR_OFF), *empty = full + STAGES;
  ring_init(full, STAGES, empty, STAGES, 8);
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    regs_dec<24>();
    if (threadIdx.x == 0) {
      Watchdog wd;
      for (int kt = 0; kt < ktiles; ++kt) {
        const int s = kt % STAGES;
        if (kt >= STAGES) mbar_wait(&empty[s], ((kt / STAGES) - 1) & 1, wd);
        mbar_arrive_expect_tx(&full[s], STAGE_BYTES);
        load_stage(smem + s * STAGE_BYTES, &full[s], kt);
      }
      wd.check();
    }
    return false;
  }
  regs_inc<240>();
  const int c = wg - 1, lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;
  const uint32_t base = smem_u32(smem);
  Watchdog wd;
  // An MN-major operand: 16 rows of K per k16 step; its 64-column blocks are BK rows (8 KiB)
  // apart.
  auto desc_mn = [](uint32_t tile, int kk) {
    return hopper::smem_desc(tile + kk * 16 * ROW_BYTES, BK * ROW_BYTES, 1024, hopper::SWIZZLE_128B);
  };
  for (int kt = 0; kt < ktiles; ++kt) {
    const int s = kt % STAGES;
    mbar_wait_warp(&full[s], (kt / STAGES) & 1, wd);
    fixup(smem + s * STAGE_BYTES, kt);
    // This warpgroup's 64 rows of A: rows 64c.. (K-major) or the 64-column block c (MN-major),
    // 8 KiB in either layout.
    const uint32_t a = base + s * STAGE_BYTES + c * 64 * ROW_BYTES;
    const uint32_t b = base + s * STAGE_BYTES + A_BYTES;
    fence_operands(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const uint64_t da = A_MN ? desc_mn(a, kk) : desc_k(a + kk * 32);
      const uint64_t db = B_MN ? desc_mn(b, kk) : desc_k(b + kk * 32);
      wgmma_ss_m64n256k16<A_MN ? 1 : 0, B_MN ? 1 : 0>(d, da, db, kt > 0 || kk > 0);
    }
    wgmma_commit();
    // The previous stage's wgmma are done: release its buffers.
    wgmma_wait<1>();
    if (kt > 0) {
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[(kt - 1) % STAGES]);
    }
  }
  wgmma_wait<0>();
  fence_operands(d);
  wd.check();
  return true;
}

// Store this consumer warpgroup's 64 x BN accumulators as bf16 rows t.row0 + r (r < t.rows) of
// an [m, n] matrix, columns n0.. (< n).
__device__ __forceinline__ void store_tile(bf16 *__restrict__ y, const float (&d)[BN / 2], const Tile &t, int n0,
                                           int n) {
  // Accumulator ownership (m64nNk16, f32): warp w of the warpgroup holds rows 16w..16w+15;
  // d[4j + 2h + c] is row 16w + lane/4 + 8h, column 8j + 2(lane%4) + c.
  const int c = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = c * 64 + warp * 16 + (lane >> 2) + 8 * h;
    if (r >= t.rows) continue;
    bf16 *yr = y + (size_t)(t.row0 + r) * n;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + 8 * j + 2 * (lane & 3);
      if (col < n) store_bf16x2(yr + col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
    }
  }
}

}  // namespace

// y [M, N] = a [M, K] w_e^T over each expert's rows; w [E, N, K]. tm_a: the 2-d tensor map of a
// ([M, K], box 64 x 128), tm_w of w as [E * N, K] (box 64 x 256), both 128-byte swizzled.
// Grid: ((ceil(M/BM) + E) * ceil(N/BN)), 384 threads, SMEM_BYTES of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    grouped_nt_sm90_bf16(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_w,
                         const unsigned *__restrict__ offsets, bf16 *__restrict__ y, int m_total, int n_experts,
                         int k, int n) {
  unsigned char *smem = dyn_smem();
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(n, BN), t)) return;
  const int n0 = t.n_tile * BN, a_row0 = t.row0, w_row0 = t.e * n + n0;
  const CUtensorMap *pa = &tm_a, *pw = &tm_w;
  auto load = [=](unsigned char *dst, uint64_t *bar, int kt) {
    hopper::tma_load_2d(dst, pa, bar, kt * BK, a_row0);
    hopper::tma_load_2d(dst + A_BYTES, pw, bar, kt * BK, w_row0);
  };
  float d[BN / 2];
  if (!mainloop<false, false>(d, ceil_div(k, BK), smem, load)) return;
  store_tile(y, d, t, n0, n);
}

// act [M, I] = silu(X Wg_e^T) * (X Wu_e^T) over each expert's rows; gate_out / up_out (nullable)
// get the pre-activations. tm_x: x [M, H] (box 64 x 128); tm_wg / tm_wu: wg / wu as [E * I, H]
// (box 64 x 128). Grid: ((ceil(M/BM) + E) * ceil(I/128)). The B tile holds 128 gate rows then
// the 128 up rows of the same intermediate columns, so each thread holds gate (accumulator column
// c) and up (column 128 + c) of the same element and the SwiGLU runs on f32 accumulators, as
// grouped_gemm.cu's grouped_gateup_fwd_bf16.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    grouped_gateup_fwd_sm90_bf16(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_wg,
                                 const __grid_constant__ CUtensorMap tm_wu, const unsigned *__restrict__ offsets,
                                 bf16 *__restrict__ act, bf16 *__restrict__ gate_out, bf16 *__restrict__ up_out,
                                 int m_total, int n_experts, int h, int inter) {
  unsigned char *smem = dyn_smem();
  constexpr int HALF = BN / 2;
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(inter, HALF), t)) return;
  const int n0 = t.n_tile * HALF, x_row0 = t.row0, w_row0 = t.e * inter + n0;
  const CUtensorMap *px = &tm_x, *pg = &tm_wg, *pu = &tm_wu;
  auto load = [=](unsigned char *dst, uint64_t *bar, int kt) {
    hopper::tma_load_2d(dst, px, bar, kt * BK, x_row0);
    hopper::tma_load_2d(dst + A_BYTES, pg, bar, kt * BK, w_row0);
    hopper::tma_load_2d(dst + A_BYTES + HALF * ROW_BYTES, pu, bar, kt * BK, w_row0);
  };
  float d[BN / 2];
  if (!mainloop<false, false>(d, ceil_div(h, BK), smem, load)) return;

  const int c = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = c * 64 + warp * 16 + (lane >> 2) + 8 * hh;
    if (r >= t.rows) continue;
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

// The NN stage loader: the dy rows (K-major A, box 64 x 128) and BK rows of w_e as four 64-column
// blocks (MN-major B, boxes 64 x 64 x 1 from w as the 3-d [E, K, N], so that rows past K read
// zeros rather than the next expert's weights); slices past the first product's ktiles come from
// the second pair (dy2, w2), for dX = dG Wg + dU Wu in one accumulator.
struct NnLoad {
  const CUtensorMap *dy, *w, *dy2, *w2;
  int row0, e, n0, kt_one;
  __device__ __forceinline__ void operator()(unsigned char *dst, uint64_t *bar, int kt) const {
    const bool second = kt >= kt_one;
    const int k0 = (second ? kt - kt_one : kt) * BK;
    hopper::tma_load_2d(dst, second ? dy2 : dy, bar, k0, row0);
#pragma unroll
    for (int c = 0; c < BN / 64; ++c)
      hopper::tma_load_3d(dst + A_BYTES + c * BK * ROW_BYTES, second ? w2 : w, bar, n0 + 64 * c, k0, e);
  }
};

// dx [M, N] = dy[seg] [rows, K] @ w_e [K, N] (+ dy2[seg] @ w2_e when has_second) over each
// expert's rows; w, w2 [E, K, N]. tm_dy / tm_dy2: [M, K] (box 64 x 128); tm_w / tm_w2: the 3-d
// [E, K, N] (box 64 x 64 x 1). Grid: ((ceil(M/BM) + E) * ceil(N/BN)). Slices of K past the end
// read zeros from both operands.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    grouped_nn_sm90_bf16(const __grid_constant__ CUtensorMap tm_dy, const __grid_constant__ CUtensorMap tm_w,
                         const __grid_constant__ CUtensorMap tm_dy2, const __grid_constant__ CUtensorMap tm_w2,
                         int has_second, const unsigned *__restrict__ offsets, bf16 *__restrict__ dx, int m_total,
                         int n_experts, int k, int n) {
  unsigned char *smem = dyn_smem();
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(n, BN), t)) return;
  const int n0 = t.n_tile * BN, kt_one = ceil_div(k, BK);
  const NnLoad load{&tm_dy, &tm_w, &tm_dy2, &tm_w2, t.row0, t.e, n0, kt_one};
  float d[BN / 2];
  if (!mainloop<false, true>(d, has_second ? 2 * kt_one : kt_one, smem, load)) return;
  store_tile(dx, d, t, n0, n);
}

// The down projection's backward with the SwiGLU's in the epilogue: dA = dy[seg] [rows, H] @
// wd_e [H, I] (f32, never stored), then dgate = dA * up * s * (1 + gate (1 - s)), dup = dA *
// gate * s with s = sigmoid(gate), from the saved pre-activations gate / up [M, I], as
// grouped_gemm.cu's grouped_nn_swiglu_bwd_bf16. tm_dy: [M, H]; tm_wd: wd as the 3-d [E, H, I].
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    grouped_nn_swiglu_bwd_sm90_bf16(const __grid_constant__ CUtensorMap tm_dy, const __grid_constant__ CUtensorMap tm_wd,
                                    const bf16 *__restrict__ gate, const bf16 *__restrict__ up,
                                    const unsigned *__restrict__ offsets, bf16 *__restrict__ dgate,
                                    bf16 *__restrict__ dup, int m_total, int n_experts, int k, int n) {
  unsigned char *smem = dyn_smem();
  Tile t;
  if (!schedule<BM, GROUP_M>(offsets, m_total, n_experts, ceil_div(n, BN), t)) return;
  const int n0 = t.n_tile * BN, kt_one = ceil_div(k, BK);
  const NnLoad load{&tm_dy, &tm_wd, &tm_dy, &tm_wd, t.row0, t.e, n0, kt_one};
  float d[BN / 2];
  if (!mainloop<false, true>(d, kt_one, smem, load)) return;

  const int c = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = c * 64 + warp * 16 + (lane >> 2) + 8 * hh;
    if (r >= t.rows) continue;
    const size_t row = (size_t)(t.row0 + r) * n;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + 8 * j + 2 * (lane & 3);
      if (col >= n) continue;
      const __nv_bfloat162 g2 = *reinterpret_cast<const __nv_bfloat162 *>(gate + row + col);
      const __nv_bfloat162 u2 = *reinterpret_cast<const __nv_bfloat162 *>(up + row + col);
      const float g[2] = {__low2float(g2), __high2float(g2)}, u[2] = {__low2float(u2), __high2float(u2)};
      float dg[2], du[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) swiglu_bwd(d[4 * j + 2 * hh + e], g[e], u[e], dg[e], du[e]);
      store_bf16x2(dgate + row + col, dg[0], dg[1]);
      store_bf16x2(dup + row + col, du[0], du[1]);
    }
  }
}

// Weight gradients: dw[e] [N, K] (+)= dy[seg]^T @ x[seg] for every expert e with mask[e] != 0
// (mask nullable: all experts), dy [M, N], x [M, K]; blockIdx.z == 1 computes dw2 from dy2 with
// the same x; as grouped_gemm.cu's grouped_wgrad_f32. The reduction runs over the segment's rows
// in BK-row slices (deterministic); A = dy^T and B = x are both MN-major: per slice, two 64 x 64
// boxes of dy (columns m0..m0+127) and four of x (columns n0..n0+255) from 2-d maps with box rows
// 64. The last slice of a segment also holds the next expert's rows: the consumers zero them
// before its wgmma. A trainable expert with no rows writes zeros (nothing with `accumulate`); a
// masked expert is not touched. Grid: (ceil(N/128) * ceil(K/256), E, problems).
struct WgradFixup {
  int lo, hi;
  __device__ __forceinline__ void operator()(unsigned char *stage, int kt) const {
    const int valid = hi - (lo + kt * BK);  // rows of this slice inside the segment
    if (valid >= BK) return;
    // Rows valid..BK-1 of all six 64-column blocks (2 of A, 4 of B), 128 bytes each; the 128-byte
    // swizzle permutes 16-byte chunks inside a row, so a row stays whole.
    const int tid = threadIdx.x - 128, rows = BK - valid;
    const int chunks = 6 * rows * (ROW_BYTES / 16);
    for (int i = tid; i < chunks; i += 256) {
      const int blk = i / (rows * 8), rest = i % (rows * 8);
      const int r = valid + rest / 8, ch = rest % 8;
      *reinterpret_cast<uint4 *>(stage + blk * BK * ROW_BYTES + r * ROW_BYTES + ch * 16) = make_uint4(0, 0, 0, 0);
    }
    // The zeros come through the generic proxy, the tensor cores read through the async proxy;
    // both consumer warpgroups must see them.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
  }
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    grouped_wgrad_sm90_f32(const __grid_constant__ CUtensorMap tm_dy, const __grid_constant__ CUtensorMap tm_x,
                           const __grid_constant__ CUtensorMap tm_dy2, float *__restrict__ dw,
                           float *__restrict__ dw2, const unsigned *__restrict__ offsets,
                           const unsigned *__restrict__ mask, int m_total, int n_experts, int n, int k,
                           int accumulate) {
  const int e = blockIdx.y;
  if (e >= n_experts || (mask != nullptr && mask[e] == 0u)) return;
  unsigned char *smem = dyn_smem();
  const CUtensorMap *pa = blockIdx.z ? &tm_dy2 : &tm_dy, *px = &tm_x;
  float *C = (blockIdx.z ? dw2 : dw) + (size_t)e * n * k;
  const int tiles_m = ceil_div(n, BM);
  const int m0 = (blockIdx.x % tiles_m) * BM, n0 = (blockIdx.x / tiles_m) * BN;
  const int lo = (int)min(offsets[e], (unsigned)m_total);
  const int hi = (int)min(max(offsets[e + 1], (unsigned)lo), (unsigned)m_total);
  const int ktiles = ceil_div(hi - lo, BK);
  if (ktiles == 0 && accumulate) return;
  auto load = [=](unsigned char *dst, uint64_t *bar, int kt) {
    const int r0 = lo + kt * BK;
#pragma unroll
    for (int c = 0; c < BM / 64; ++c) hopper::tma_load_2d(dst + c * BK * ROW_BYTES, pa, bar, m0 + 64 * c, r0);
#pragma unroll
    for (int c = 0; c < BN / 64; ++c)
      hopper::tma_load_2d(dst + A_BYTES + c * BK * ROW_BYTES, px, bar, n0 + 64 * c, r0);
  };
  float d[BN / 2];
  if (!mainloop<true, true>(d, ktiles, smem, load, WgradFixup{lo, hi})) return;

  const int c = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m0 + c * 64 + warp * 16 + (lane >> 2) + 8 * h;
    if (r >= n) continue;
    float *cr = C + (size_t)r * k;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + 8 * j + 2 * (lane & 3);
      if (col >= k) continue;
      float2 v = make_float2(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
      if (accumulate) {
        const float2 old = *reinterpret_cast<const float2 *>(cr + col);
        v.x += old.x;
        v.y += old.y;
      }
      *reinterpret_cast<float2 *>(cr + col) = v;
    }
  }
}
