// Hopper (sm_90a) path of the grouped expert GEMMs' forward: grouped_nt_sm90_bf16 (y[seg] =
// a[seg] w_e^T, the down projection, as grouped_gemm.cu's grouped_nt_bf16) and
// grouped_gateup_fwd_sm90_bf16 (act = silu(x wg_e^T) * (x wu_e^T), as grouped_gateup_fwd_bf16):
// TMA loads, wgmma from shared memory, a producer and two consumer warpgroups.
//
// CPU reference: per expert, src/ops/linear.rs (linear) on the rows src/ops/moe.rs gather_rows
// picks, as for grouped_gemm.cu. Wrapper: src/backend/cuda/grouped.rs (Device::grouped_nt and
// Device::grouped_gateup_fwd take this path on an sm_90 GPU when FLEXRUN_SM90=1; the *_on
// variants on request). Test: tests/gpu_grouped.rs (grouped_nt_sm90). Notes and measurements:
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

// The CTA's 128 x 256 f32 product over K, this consumer warpgroup's 64 rows in d: the producer
// loads A rows a_row0.. and B with load_b(dst, bar, k0) (BN rows). Every thread of the CTA calls
// it; the producer warpgroup returns false, the consumers true.
template <class LoadB>
__device__ __forceinline__ bool mainloop(float (&d)[BN / 2], int k, unsigned char *smem, const CUtensorMap *tm_a,
                                         int a_row0, LoadB load_b) {
  using namespace hopper;
  uint64_t *full = reinterpret_cast<uint64_t *>(smem + BAR_OFF), *empty = full + STAGES;
  const int ktiles = ceil_div(k, BK);
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    regs_dec<24>();
    if (threadIdx.x == 0) {
      Watchdog wd;
      tma_prefetch_map(tm_a);
      for (int kt = 0; kt < ktiles; ++kt) {
        const int s = kt % STAGES;
        if (kt >= STAGES) mbar_wait(&empty[s], ((kt / STAGES) - 1) & 1, wd);
        unsigned char *st = smem + s * STAGE_BYTES;
        mbar_arrive_expect_tx(&full[s], STAGE_BYTES);
        tma_load_2d(st, tm_a, &full[s], kt * BK, a_row0);
        load_b(st + A_BYTES, &full[s], kt * BK);
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
  for (int kt = 0; kt < ktiles; ++kt) {
    const int s = kt % STAGES;
    mbar_wait_warp(&full[s], (kt / STAGES) & 1, wd);
    const uint32_t a = base + s * STAGE_BYTES + c * 64 * ROW_BYTES;
    const uint32_t b = base + s * STAGE_BYTES + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      wgmma_ss_m64n256k16<0, 0>(d, desc_k(a + kk * 32), desc_k(b + kk * 32), kt > 0 || kk > 0);
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
  const int n0 = t.n_tile * BN;
  const int w_row0 = t.e * n + n0;
  const CUtensorMap *pw = &tm_w;
  auto load_b = [=](unsigned char *dst, uint64_t *bar, int k0) {
    hopper::tma_load_2d(dst, pw, bar, k0, w_row0);
  };
  float d[BN / 2];
  if (!mainloop(d, k, smem, &tm_a, t.row0, load_b)) return;

  // Accumulator ownership (m64nNk16, f32): warp w of the warpgroup holds rows 16w..16w+15;
  // d[4j + 2h + c] is row 16w + lane/4 + 8h, column 8j + 2(lane%4) + c.
  const int c = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int rows = t.rows;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = c * 64 + warp * 16 + (lane >> 2) + 8 * h;
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
// get the pre-activations. tm_x: x [M, H] (box 64 x 128); tm_wg / tm_wu: wg / wu as [E * I, H]
// (box 64 x 128). Grid: ((ceil(M/BM) + E) * ceil(I/128)). The B tile holds 128 gate rows then
// the 128 up rows of the same intermediate columns, so each thread holds gate (accumulator column c) and
// up (column 128 + c) of the same element and the SwiGLU runs on f32 accumulators, as
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
  const int n0 = t.n_tile * HALF;
  const int w_row0 = t.e * inter + n0;
  const CUtensorMap *pg = &tm_wg, *pu = &tm_wu;
  auto load_b = [=](unsigned char *dst, uint64_t *bar, int k0) {
    hopper::tma_load_2d(dst, pg, bar, k0, w_row0);
    hopper::tma_load_2d(dst + HALF * ROW_BYTES, pu, bar, k0, w_row0);
  };
  float d[BN / 2];
  if (!mainloop(d, h, smem, &tm_x, t.row0, load_b)) return;

  const int c = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int rows = t.rows;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = c * 64 + warp * 16 + (lane >> 2) + 8 * hh;
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
