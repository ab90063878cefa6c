// Hopper (sm_90a) path of the flash attention forward: flash_fwd_sm90_hd64_bf16 and
// flash_fwd_sm90_hd128_bf16, the same outputs as flash_attention.cu's forward (causal, GQA, out
// and the natural-log logsumexp the backward reads) with wgmma, TMA and warp specialisation.
//
// CPU reference: src/ops/attention.rs (attention_forward). Wrapper: src/backend/cuda/flash_sm90.rs
// (Device::flash_attention_fwd takes this path on a compute capability 9.0 GPU when
// FLEXRUN_SM90=1, for head dims 64 and 128 with 16-byte aligned rows; every other case runs
// flash_attention.cu). Test: tests/gpu_flash.rs (forward_sm90: every forward shape on both
// paths). Notes and measurements: flash_attention_sm90.md.
//
// Layout and meaning as the CPU reference: q [B, Tq, nh, hd], k/v [B, Tk_stride, nkv, hd] (the
// first Tk positions read), out like q, lse [B, nh, Tq]. Query i sits at position Tk - Tq + i and
// sees keys 0..=Tk - Tq + i; head h reads kv head h / (nh / nkv).
//
// A CTA computes BM = 128 query rows of one head with three warpgroups:
// - warpgroup 0, the producer (24 registers after setmaxnreg): one thread issues the TMA loads,
//   Q once, then K and V tiles of BN = 128 keys into a ring of 3 (hd 64) or 2 (hd 128) stages,
//   each stage guarded by a "full" mbarrier per operand (transaction bytes) and an "empty" one
//   the consumers release;
// - warpgroups 1 and 2, the consumers (240 registers), 64 query rows each: per key tile, S = Q K^T
//   by wgmma from shared memory (m64n128k16, hd/16 instructions), the online softmax on the f32
//   accumulators in registers, then O += P V by wgmma with P straight from registers (the
//   accumulator layout is the A-operand layout) and V from shared memory as an MN-major operand.
//   The two consumers run the same loop on different rows, so one's softmax overlaps the other's
//   GEMMs on the tensor cores.
//
// Shared memory (1024-byte aligned): tiles as TMA writes them with the 128-byte swizzle, each
// 64-column block of a tile stored as rows of 128 bytes: Q [hd/64][128 rows][128 B], then per
// stage K and V [hd/64][BN rows][128 B], then the mbarriers. Descriptors (hopper.cuh): Q and K
// are K-major (SBO 1024, a k16 step advances the start address by 32 bytes inside the 128-byte
// row), V is MN-major (the keys are the reduction dimension: SBO 1024 per 8 keys, LBO the
// 64-column block stride BN * 128, a k16 step advances by 16 rows = 2048 bytes).
#include "common.cuh"
#include "hopper.cuh"

#include <cuda.h>

namespace {

using namespace hopper;

constexpr int BM = 128;       // query rows per CTA
constexpr int THREADS = 384;  // producer + two consumer warpgroups
constexpr int ROW_BYTES = 128;  // one swizzled row: 64 bf16
constexpr float LN2 = 0.6931471805599453f;

template <int HD> struct Layout {
  static_assert(HD == 64 || HD == 128, "head dims 64 and 128");
  static constexpr int BN = 128;                     // keys per tile
  static constexpr int STAGES = HD == 64 ? 3 : 2;    // K/V ring depth (shared memory)
  static constexpr int BLOCKS = HD / 64;                 // 64-column blocks of a row
  static constexpr int Q_BYTES = BLOCKS * BM * ROW_BYTES;
  static constexpr int KV_BYTES = BLOCKS * BN * ROW_BYTES;  // one K or V tile
  static constexpr int K_OFF = Q_BYTES;
  static constexpr int V_OFF = K_OFF + STAGES * KV_BYTES;
  static constexpr int BAR_OFF = V_OFF + STAGES * KV_BYTES;
  static constexpr int BARS = 1 + 3 * STAGES;  // q_full, k_full[S], v_full[S], empty[S]
  // Requested dynamic shared memory: the layout plus slack to align its base to 1024 bytes
  // (src/backend/cuda/flash_sm90.rs mirrors it).
  static constexpr int SMEM = BAR_OFF + BARS * 8 + 1024;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

template <int HD>
__device__ __forceinline__ void fwd(const CUtensorMap *tm_q, const CUtensorMap *tm_k, const CUtensorMap *tm_v,
                                    bf16 *__restrict__ out, float *__restrict__ lse, int tq, int tk, int nh,
                                    int nkv, float scale_log2) {
  using L = Layout<HD>;
  constexpr int BN = L::BN, STAGES = L::STAGES;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  {
    unsigned dyn;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
    if (dyn < (unsigned)L::SMEM) __trap();
  }
  const uint32_t raw = smem_u32(smem_raw);
  unsigned char *smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
  unsigned char *sQ = smem;
  unsigned char *sK = smem + L::K_OFF;
  unsigned char *sV = smem + L::V_OFF;
  uint64_t *bars = reinterpret_cast<uint64_t *>(smem + L::BAR_OFF);
  uint64_t *q_full = bars, *k_full = bars + 1, *v_full = bars + 1 + STAGES, *empty = bars + 1 + 2 * STAGES;

  // Heaviest (last, under the causal mask) query blocks first.
  const int mb = gridDim.x - 1 - blockIdx.x;
  const int m0 = mb * BM, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (nh / nkv);
  const int off = tk - tq;  // position of query 0
  // Keys the CTA's last query row sees, in tiles.
  const int last_row = min(m0 + BM, tq) - 1;
  const int ntiles = (min(off + last_row + 1, tk) + BN - 1) / BN;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // Producer.
    regs_dec<24>();
    if (threadIdx.x == 0) {
      Watchdog wd;
      tma_prefetch_map(tm_q);
      tma_prefetch_map(tm_k);
      tma_prefetch_map(tm_v);
      mbar_arrive_expect_tx(q_full, L::Q_BYTES);
#pragma unroll
      for (int c = 0; c < L::BLOCKS; ++c) tma_load_4d(sQ + c * BM * ROW_BYTES, tm_q, q_full, c * 64, m0, h, b);
      for (int j = 0; j < ntiles; ++j) {
        const int s = j % STAGES;
        if (j >= STAGES) mbar_wait(&empty[s], ((j / STAGES) - 1) & 1, wd);
        mbar_arrive_expect_tx(&k_full[s], L::KV_BYTES);
#pragma unroll
        for (int c = 0; c < L::BLOCKS; ++c)
          tma_load_4d(sK + s * L::KV_BYTES + c * BN * ROW_BYTES, tm_k, &k_full[s], c * 64, j * BN, kvh, b);
        mbar_arrive_expect_tx(&v_full[s], L::KV_BYTES);
#pragma unroll
        for (int c = 0; c < L::BLOCKS; ++c)
          tma_load_4d(sV + s * L::KV_BYTES + c * BN * ROW_BYTES, tm_v, &v_full[s], c * 64, j * BN, kvh, b);
      }
      wd.check();
    }
    return;
  }

  // Consumers: warpgroup c = wg - 1 owns query rows m0 + 64c .. + 63.
  regs_inc<240>();
  const int c = wg - 1;
  const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // This thread's two rows (h = 0, 1: rows g and g + 8 of its warp's 16).
  const int row0 = m0 + 64 * c + 16 * warp + g;
  // A tile needs the mask when some key in it lies past a row's position or past tk.
  const int first_pos = off + m0 + 64 * c;
  const float NEG_INF = -__int_as_float(0x7f800000);

  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.0f;
  float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f};
  float sc[BN / 2];
  uint32_t p[BN / 16][4];

  const uint32_t q_base = smem_u32(sQ) + 64 * c * ROW_BYTES;
  Watchdog wd;
  mbar_wait(q_full, 0, wd);

  for (int j = 0; j < ntiles; ++j) {
    const int s = j % STAGES;
    const unsigned parity = (j / STAGES) & 1;
    const uint32_t k_base = smem_u32(sK + s * L::KV_BYTES);
    const uint32_t v_base = smem_u32(sV + s * L::KV_BYTES);

    // S = Q K^T (64 x BN per warpgroup).
    mbar_wait(&k_full[s], parity, wd);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      const uint32_t step = (kk % 4) * 32;  // 16 bf16 = 32 bytes into the 128-byte row
      const uint64_t da = smem_desc(q_base + (kk / 4) * BM * ROW_BYTES + step, 16, 1024, SWIZZLE_128B);
      const uint64_t db = smem_desc(k_base + (kk / 4) * BN * ROW_BYTES + step, 16, 1024, SWIZZLE_128B);
      if constexpr (BN == 128)
        wgmma_ss_m64n128k16<0, 0>(sc, da, db, kk > 0);
      else
        wgmma_ss_m64n64k16<0, 0>(sc, da, db, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(sc);

    // Online softmax in the log2 domain on the rows this thread holds.
    const bool masked = (j + 1) * BN > min(first_pos + 1, tk);
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int jj = 0; jj < BN / 8; ++jj) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = sc[4 * jj + 2 * hh + e] * scale_log2;
          if (masked) {
            const int key = j * BN + 8 * jj + 2 * t + e;
            const int limit = min(off + row0 + 8 * hh, tk - 1);
            if (key > limit) v = NEG_INF;
          }
          sc[4 * jj + 2 * hh + e] = v;
          mx[hh] = fmaxf(mx[hh], v);
        }
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
      base[hh] = mx[hh] == NEG_INF ? 0.0f : mx[hh];
      alpha[hh] = exp2f(m_run[hh] - base[hh]);
      m_run[hh] = mx[hh];
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int jj = 0; jj < BN / 8; ++jj) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(sc[4 * jj + 2 * hh + e] - base[hh]);
          sc[4 * jj + 2 * hh + e] = pv;
          rs[hh] += pv;
        }
      }
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) l_run[hh] = l_run[hh] * alpha[hh] + rs[hh];
#pragma unroll
    for (int jj = 0; jj < HD / 8; ++jj) {
      o[4 * jj + 0] *= alpha[0];
      o[4 * jj + 1] *= alpha[0];
      o[4 * jj + 2] *= alpha[1];
      o[4 * jj + 3] *= alpha[1];
    }
    // P as bf16 A fragments, one per 16 keys.
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      p[ks][0] = pack_bf16(sc[8 * ks + 0], sc[8 * ks + 1]);
      p[ks][1] = pack_bf16(sc[8 * ks + 2], sc[8 * ks + 3]);
      p[ks][2] = pack_bf16(sc[8 * ks + 4], sc[8 * ks + 5]);
      p[ks][3] = pack_bf16(sc[8 * ks + 6], sc[8 * ks + 7]);
    }

    // O += P V.
    mbar_wait(&v_full[s], parity, wd);
    fence_operands(o);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      const uint64_t dv = smem_desc(v_base + ks * 16 * ROW_BYTES, BN * ROW_BYTES, 1024, SWIZZLE_128B);
      if constexpr (HD == 128)
        wgmma_rs_m64n128k16<1>(o, p[ks], dv);
      else
        wgmma_rs_m64n64k16<1>(o, p[ks], dv);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
    // This warp is done with stage s.
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }

  wd.check();
  // Normalise, write out and the logsumexp.
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_run[hh] += __shfl_xor_sync(0xffffffffu, l_run[hh], 1);
    l_run[hh] += __shfl_xor_sync(0xffffffffu, l_run[hh], 2);
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + 8 * hh;
    if (row >= tq) continue;
    const float inv = 1.0f / l_run[hh];
    bf16 *orow = out + (((size_t)b * tq + row) * nh + h) * HD;
#pragma unroll
    for (int jj = 0; jj < HD / 8; ++jj) {
      const uint32_t v = pack_bf16(o[4 * jj + 2 * hh] * inv, o[4 * jj + 2 * hh + 1] * inv);
      *reinterpret_cast<uint32_t *>(orow + 8 * jj + 2 * t) = v;
    }
    if (t == 0) lse[((size_t)b * nh + h) * tq + row] = (m_run[hh] + log2f(l_run[hh])) * LN2;
  }
}

}  // namespace

// Grid (ceil(Tq / 128), nh, B), 384 threads, Layout<HD>::SMEM bytes of dynamic shared memory.
// tm_q / tm_k / tm_v: 4-d tensor maps (hd, T, heads, B) of q, k and v (k and v with T = Tk, so
// that positions past Tk read as zeros), boxes (64, 128, 1, 1), 128-byte swizzle.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    flash_fwd_sm90_hd64_bf16(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                             const __grid_constant__ CUtensorMap tm_v, bf16 *__restrict__ out,
                             float *__restrict__ lse, int tq, int tk, int nh, int nkv, float scale_log2) {
  fwd<64>(&tm_q, &tm_k, &tm_v, out, lse, tq, tk, nh, nkv, scale_log2);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    flash_fwd_sm90_hd128_bf16(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                              const __grid_constant__ CUtensorMap tm_v, bf16 *__restrict__ out,
                              float *__restrict__ lse, int tq, int tk, int nh, int nkv, float scale_log2) {
  fwd<128>(&tm_q, &tm_k, &tm_v, out, lse, tq, tk, nh, nkv, scale_log2);
}
