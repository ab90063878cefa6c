// Hopper (sm_90a) path of flash attention: the forward (flash_fwd_sm90_hd{64,128}_bf16), the
// backward (flash_bwd_dkdv_sm90_* and flash_bwd_dq_sm90_*) and the decode's first pass
// (flash_decode_sm90_*), the same outputs as flash_attention.cu's (causal, GQA, out and the
// natural-log logsumexp; dq, dk, dv without atomics) with wgmma, TMA and warp specialisation.
//
// CPU reference: src/ops/attention.rs (attention_forward; the tape's attention backward).
// Wrapper: src/backend/cuda/flash_sm90.rs (Device::flash_attention_fwd / _bwd / _decode take this
// path on a compute capability 9.0 GPU when FLEXRUN_SM90=1, for head dims 64 and 128 with 16-byte
// aligned rows; every other case runs flash_attention.cu). Tests: tests/gpu_flash.rs
// (forward_sm90, backward_sm90, decode_sm90: every shape on both paths). Notes and measurements:
// flash_attention_sm90.md.
//
// Layout and meaning as the CPU reference: q [B, Tq, nh, hd], k/v [B, Tk_stride, nkv, hd] (the
// first Tk positions read), out like q, lse [B, nh, Tq]. Query i sits at position Tk - Tq + i and
// sees keys 0..=Tk - Tq + i; head h reads kv head h / (nh / nkv).
//
// Forward: a CTA computes BM = 128 query rows of one head with three warpgroups:
// - warpgroup 0, the producer (24 registers after setmaxnreg): one thread issues the TMA loads,
//   Q once, then K and V tiles of BN = 128 keys into a ring of 3 stages,
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
#include "flash_decode.cuh"
#include "hopper.cuh"

#include <cuda.h>

namespace {

using namespace hopper;

constexpr int BM = 128;       // query rows per CTA
constexpr int THREADS = 384;  // producer + two consumer warpgroups
constexpr int ROW_BYTES = 128;  // one swizzled row: 64 bf16
constexpr float LN2 = 0.6931471805599453f;
constexpr float LOG2E_F = 1.4426950408889634f;

template <int HD> struct Layout {
  static_assert(HD == 64 || HD == 128, "head dims 64 and 128");
  static constexpr int BN = 128;                     // keys per tile
  static constexpr int STAGES = 3;                   // K/V ring depth (hd 128: 225 KiB in all)
  static constexpr int BLOCKS = HD / 64;                 // 64-column blocks of a row
  static constexpr int Q_BYTES = BLOCKS * BM * ROW_BYTES;
  static constexpr int KV_BYTES = BLOCKS * BN * ROW_BYTES;  // one K or V tile
  static constexpr int K_OFF = Q_BYTES;
  static constexpr int V_OFF = K_OFF + STAGES * KV_BYTES;
  static constexpr int BAR_OFF = V_OFF + STAGES * KV_BYTES;
  static constexpr int BARS = 1 + 3 * STAGES;  // q_full, k_full[S], v_full[S], empty[S]
  // One float per consumer warp: the softmax's row sums are stored there before the wait for the
  // P V product, which keeps ptxas from hoisting that wait above the softmax (see the loop).
  static constexpr int SCRATCH_OFF = BAR_OFF + BARS * 8;
  // Requested dynamic shared memory: the layout plus slack to align its base to 1024 bytes
  // (src/backend/cuda/flash_sm90.rs mirrors it).
  static constexpr int SMEM = SCRATCH_OFF + 8 * 4 + 1024;
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

  ring_init(bars, 1 + 2 * STAGES, empty, STAGES, 8);  // q_full, k_full[S], v_full[S]; empty[S]

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
  mbar_wait_warp(q_full, 0, wd);

  // S = Q K_j^T, issued (not waited for).
  auto issue_s = [&](int j) {
    const uint32_t k_base = smem_u32(sK + (j % STAGES) * L::KV_BYTES);
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      const uint32_t step = (kk % 4) * 32;  // 16 bf16 = 32 bytes into the 128-byte row
      const uint64_t da = smem_desc(q_base + (kk / 4) * BM * ROW_BYTES + step, 16, 1024, SWIZZLE_128B);
      const uint64_t db = smem_desc(k_base + (kk / 4) * BN * ROW_BYTES + step, 16, 1024, SWIZZLE_128B);
      wgmma_ss_m64n128k16<0, 0>(sc, da, db, kk > 0);
    }
    wgmma_commit();
  };
  // O += P V_j, issued (not waited for).
  auto issue_pv = [&](int j) {
    const uint32_t v_base = smem_u32(sV + (j % STAGES) * L::KV_BYTES);
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      const uint64_t dv = smem_desc(v_base + ks * 16 * ROW_BYTES, BN * ROW_BYTES, 1024, SWIZZLE_128B);
      if constexpr (HD == 128)
        wgmma_rs_m64n128k16<1>(o, p[ks], dv);
      else
        wgmma_rs_m64n64k16<1>(o, p[ks], dv);
    }
    wgmma_commit();
  };
  // The online softmax of S_j in the log2 domain on the rows this thread holds: sc becomes the
  // unnormalised probabilities, m_run and l_run advance, and alpha is the factor O must take.
  auto softmax = [&](int j, float (&alpha)[2]) {
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
    float base[2];
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
  };
  // P as bf16 A fragments, one per 16 keys.
  auto pack = [&]() {
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      p[ks][0] = pack_bf16(sc[8 * ks + 0], sc[8 * ks + 1]);
      p[ks][1] = pack_bf16(sc[8 * ks + 2], sc[8 * ks + 3]);
      p[ks][2] = pack_bf16(sc[8 * ks + 4], sc[8 * ks + 5]);
      p[ks][3] = pack_bf16(sc[8 * ks + 6], sc[8 * ks + 7]);
    }
  };
  auto release = [&](int j) {
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[j % STAGES]);
  };
  auto parity = [&](int j) { return (unsigned)((j / STAGES) & 1); };

  // Tile 0: S, softmax, P (O is still zero: no rescale).
  float alpha[2];
  mbar_wait_warp(&k_full[0], 0, wd);
  fence_operands(sc);
  wgmma_fence();
  issue_s(0);
  wgmma_wait<0>();
  fence_operands(sc);
  softmax(0, alpha);
  pack();
  // Tile j: S_j = Q K_j^T and O += P_{j-1} V_{j-1} go to the tensor cores together; the softmax
  // of S_j runs while the P V product is still in flight, and O takes its rescale once that
  // product is done.
  float *scratch = reinterpret_cast<float *>(smem + L::SCRATCH_OFF) + 4 * c + warp;
  for (int j = 1; j < ntiles; ++j) {
    mbar_wait_warp(&k_full[j % STAGES], parity(j), wd);
    mbar_wait_warp(&v_full[(j - 1) % STAGES], parity(j - 1), wd);
    fence_operands(sc);
    fence_operands(o);
    fence_operands(p);
    wgmma_fence();
    issue_s(j);
    issue_pv(j - 1);
    wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run
    fence_operands(sc);
    softmax(j, alpha);
    // A store that depends on the whole softmax: without it ptxas hoists the next wait above the
    // exponentials, and they no longer overlap the P V product.
    if (lane == 0) *scratch = l_run[0] + l_run[1];
    wgmma_wait<0>();
    fence_operands(o);
    fence_operands(p);
    release(j - 1);
#pragma unroll
    for (int jj = 0; jj < HD / 8; ++jj) {
      o[4 * jj + 0] *= alpha[0];
      o[4 * jj + 1] *= alpha[0];
      o[4 * jj + 2] *= alpha[1];
      o[4 * jj + 3] *= alpha[1];
    }
    pack();
  }
  // The last P V.
  mbar_wait_warp(&v_full[(ntiles - 1) % STAGES], parity(ntiles - 1), wd);
  fence_operands(o);
  fence_operands(p);
  wgmma_fence();
  issue_pv(ntiles - 1);
  wgmma_wait<0>();
  fence_operands(o);
  fence_operands(p);
  release(ntiles - 1);

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

// ---------------------------------------------------------------------------------------------
// Backward: D = rowsum(dO * O) (flash_attention.cu's flash_bwd_delta_bf16), then dK/dV per key
// tile and dQ per query tile, both without atomics (deterministic), as flash_attention.cu.
//
// dK/dV: a CTA owns 128 keys of one (kv head, batch), 64 per consumer warpgroup, K and V loaded
// once; the producer streams (Q, dO) tiles of 64 queries for every query head of the group and
// every query tile that sees the keys. Per tile a consumer computes S^T = K Q^T (SS, keys x
// queries), P^T = exp2(S^T log2e / sqrt(hd) - lse2) masked, dV += P^T dO (RS, dO MN-major),
// dP^T = V dO^T (SS), dS^T = P^T (dP^T - D), dK += dS^T Q (RS, Q MN-major); dK is scaled by
// 1/sqrt(hd) at the end. Rows past Tk (to Tk_stride) get zeros.
//
// dQ: a CTA owns 128 queries of one head (64 per consumer), Q and dO loaded once; the producer
// streams K and V tiles of 64 keys. Per tile: S = Q K^T, P, dP = dO V^T, dS = P (dP - D),
// dQ += dS K (RS, K MN-major); dQ scaled at the end.

template <int HD> struct BwdLayout {
  static_assert(HD == 64 || HD == 128, "head dims 64 and 128");
  static constexpr int BLOCKS = HD / 64;
  static constexpr int OWN = 128;  // rows a CTA owns (keys for dK/dV, queries for dQ)
  static constexpr int STREAM = 64;  // rows of each streamed tile
  static constexpr int STAGES = 2;
  static constexpr int OWN_BYTES = BLOCKS * OWN * ROW_BYTES;      // one owned operand
  static constexpr int TILE_BYTES = BLOCKS * STREAM * ROW_BYTES;  // one streamed operand
  static constexpr int A_OFF = 0;                                 // K (dK/dV) or Q (dQ)
  static constexpr int B_OFF = OWN_BYTES;                         // V (dK/dV) or dO (dQ)
  static constexpr int S_OFF = 2 * OWN_BYTES;                     // stages of two streamed tiles
  static constexpr int BAR_OFF = S_OFF + STAGES * 2 * TILE_BYTES;
  static constexpr int BARS = 1 + 2 * STAGES;  // own_full, full[S], empty[S]
  static constexpr int SMEM = BAR_OFF + BARS * 8 + 1024;
};

__device__ __forceinline__ unsigned char *aligned_smem(unsigned need) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned dyn;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
  if (dyn < need) __trap();
  const uint32_t raw = smem_u32(smem_raw);
  return smem_raw + (((raw + 1023) & ~1023u) - raw);
}

// Shared memory descriptors of a tile written by TMA (blocks of 64 columns, rows of 128 bytes):
// K-major (the reduction runs over the head dim) at k16 step kk, and MN-major (the reduction runs
// over the rows) at k16 step ks, for a tile of `rows` rows.
__device__ __forceinline__ uint64_t desc_kmajor(uint32_t tile, int rows, int kk) {
  return smem_desc(tile + (kk / 4) * rows * ROW_BYTES + (kk % 4) * 32, 16, 1024, SWIZZLE_128B);
}
__device__ __forceinline__ uint64_t desc_mnmajor(uint32_t tile, int rows, int ks) {
  return smem_desc(tile + ks * 16 * ROW_BYTES, rows * ROW_BYTES, 1024, SWIZZLE_128B);
}

// Issue (no fence, commit or wait) c (64 x 64 f32) = a (64 rows at a_tile + a_row0 rows, K-major
// over HD) b^T (64 rows of b_tile).
template <int HD>
__device__ __forceinline__ void issue_nt_64x64(float (&c)[32], uint32_t a_tile, int a_rows, int a_row0,
                                               uint32_t b_tile, int b_rows) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk)
    wgmma_ss_m64n64k16<0, 0>(c, desc_kmajor(a_tile + a_row0 * ROW_BYTES, a_rows, kk), desc_kmajor(b_tile, b_rows, kk),
                             kk > 0);
}

// c = a b^T as issue_nt_64x64, waited for.
template <int HD>
__device__ __forceinline__ void gemm_nt_64x64(float (&c)[32], uint32_t a_tile, int a_rows, int a_row0,
                                              uint32_t b_tile, int b_rows) {
  wgmma_fence();
  issue_nt_64x64<HD>(c, a_tile, a_rows, a_row0, b_tile, b_rows);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(c);
}

// Issue (no fence, commit or wait) acc (64 x HD f32) += p (64 x 64 bf16 fragments in registers)
// b (64 rows of b_tile x HD, MN-major).
template <int HD>
__device__ __forceinline__ void issue_rs(float (&acc)[HD / 2], const uint32_t (&p)[4][4], uint32_t b_tile,
                                         int b_rows) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    if constexpr (HD == 128)
      wgmma_rs_m64n128k16<1>(acc, p[ks], desc_mnmajor(b_tile, b_rows, ks));
    else
      wgmma_rs_m64n64k16<1>(acc, p[ks], desc_mnmajor(b_tile, b_rows, ks));
  }
}

// acc += p b as issue_rs, waited for.
template <int HD>
__device__ __forceinline__ void gemm_rs_acc(float (&acc)[HD / 2], uint32_t (&p)[4][4], uint32_t b_tile,
                                            int b_rows) {
  fence_operands(acc);
  wgmma_fence();
  issue_rs<HD>(acc, p, b_tile, b_rows);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc);
  fence_operands(p);
}

// 64 x 64 f32 accumulators as bf16 A fragments.
__device__ __forceinline__ void to_frags(const float (&x)[32], uint32_t (&p)[4][4]) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    p[ks][0] = pack_bf16(x[8 * ks + 0], x[8 * ks + 1]);
    p[ks][1] = pack_bf16(x[8 * ks + 2], x[8 * ks + 3]);
    p[ks][2] = pack_bf16(x[8 * ks + 4], x[8 * ks + 5]);
    p[ks][3] = pack_bf16(x[8 * ks + 6], x[8 * ks + 7]);
  }
}

// Store 64 x HD f32 accumulators (this warpgroup's rows row0.., scaled) as bf16 rows of `dst`
// with `stride` elements between rows; rows >= limit are skipped.
template <int HD>
__device__ __forceinline__ void store_rows(bf16 *dst, long long stride, const float (&acc)[HD / 2], int row0,
                                           int limit, float scale) {
  const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = row0 + 16 * warp + g + 8 * hh;
    if (r >= limit) continue;
    bf16 *p = dst + (long long)r * stride;
#pragma unroll
    for (int jj = 0; jj < HD / 8; ++jj)
      *reinterpret_cast<uint32_t *>(p + 8 * jj + 2 * t) =
          pack_bf16(acc[4 * jj + 2 * hh] * scale, acc[4 * jj + 2 * hh + 1] * scale);
  }
}

// The backward kernels' producer (one thread): the two owned operands (maps own_a, own_b; rows
// own_row.. of head own_h), then for every tile j the two streamed operands (maps str_a, str_b)
// at the (row, head) at(j) gives, into the ring. Nothing when there are no tiles (the consumers
// then wait for nothing).
template <int HD, class At>
__device__ __forceinline__ void bwd_produce(unsigned char *smem, const CUtensorMap *own_a, const CUtensorMap *own_b,
                                            int own_row, int own_h, const CUtensorMap *str_a,
                                            const CUtensorMap *str_b, int b, int ntiles, At at) {
  using L = BwdLayout<HD>;
  if (ntiles == 0) return;
  uint64_t *bars = reinterpret_cast<uint64_t *>(smem + L::BAR_OFF);
  uint64_t *own_full = bars, *full = bars + 1, *empty = bars + 1 + L::STAGES;
  Watchdog wd;
  mbar_arrive_expect_tx(own_full, 2 * L::OWN_BYTES);
#pragma unroll
  for (int c = 0; c < L::BLOCKS; ++c) {
    tma_load_4d(smem + L::A_OFF + c * L::OWN * ROW_BYTES, own_a, own_full, c * 64, own_row, own_h, b);
    tma_load_4d(smem + L::B_OFF + c * L::OWN * ROW_BYTES, own_b, own_full, c * 64, own_row, own_h, b);
  }
  for (int j = 0; j < ntiles; ++j) {
    const int s = j % L::STAGES;
    if (j >= L::STAGES) mbar_wait(&empty[s], ((j / L::STAGES) - 1) & 1, wd);
    const int2 rh = at(j);
    unsigned char *st = smem + L::S_OFF + s * 2 * L::TILE_BYTES;
    mbar_arrive_expect_tx(&full[s], 2 * L::TILE_BYTES);
#pragma unroll
    for (int c = 0; c < L::BLOCKS; ++c) {
      tma_load_4d(st + c * L::STREAM * ROW_BYTES, str_a, &full[s], c * 64, rh.x, rh.y, b);
      tma_load_4d(st + L::TILE_BYTES + c * L::STREAM * ROW_BYTES, str_b, &full[s], c * 64, rh.x, rh.y, b);
    }
  }
  wd.check();
}

template <int HD>
__device__ __forceinline__ void bwd_dkdv(const CUtensorMap *tm_q, const CUtensorMap *tm_k, const CUtensorMap *tm_v,
                                         const CUtensorMap *tm_do, const float *__restrict__ lse,
                                         const float *__restrict__ delta, bf16 *__restrict__ dk,
                                         bf16 *__restrict__ dv, int tq, int tk, int tk_stride, int nh, int nkv,
                                         float scale) {
  using L = BwdLayout<HD>;
  constexpr int BQ = L::STREAM, STAGES = L::STAGES;
  unsigned char *smem = aligned_smem(L::SMEM);
  uint64_t *bars = reinterpret_cast<uint64_t *>(smem + L::BAR_OFF);
  uint64_t *own_full = bars, *full = bars + 1, *empty = bars + 1 + STAGES;
  const int k0 = blockIdx.x * L::OWN, kvh = blockIdx.y, b = blockIdx.z;
  const int group = nh / nkv, off = tk - tq;
  // Query tiles that see some key of the CTA: queries q with off + q >= k0.
  const int qt0 = k0 < tk ? max(0, k0 - off) / BQ : 0;
  const int nqt = k0 < tk ? (tq + BQ - 1) / BQ - qt0 : 0;
  const int ntiles = nqt * group;

  ring_init(bars, 1 + STAGES, empty, STAGES, 8);
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    regs_dec<24>();
    if (threadIdx.x == 0)
      bwd_produce<HD>(smem, tm_k, tm_v, k0, kvh, tm_q, tm_do, b, ntiles, [=](int j) {
        return make_int2((qt0 + j % nqt) * BQ, kvh * group + j / nqt);
      });
    return;
  }

  regs_inc<240>();
  const int c = wg - 1;
  const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int key_base = k0 + 64 * c;  // this warpgroup's first key
  const float NEG_INF = -__int_as_float(0x7f800000);
  const float scale_log2 = scale * LOG2E_F;
  float dkacc[HD / 2], dvacc[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) dkacc[i] = dvacc[i] = 0.0f;
  const uint32_t sk = smem_u32(smem + L::A_OFF), sv = smem_u32(smem + L::B_OFF);
  Watchdog wd;
  if (ntiles > 0) mbar_wait_warp(own_full, 0, wd);
  for (int j = 0; j < ntiles; ++j) {
    const int s = j % STAGES;
    const int h = kvh * group + j / nqt, q0 = (qt0 + j % nqt) * BQ;
    const uint32_t sq = smem_u32(smem + L::S_OFF + s * 2 * L::TILE_BYTES), sdo = sq + L::TILE_BYTES;
    mbar_wait_warp(&full[s], (j / STAGES) & 1, wd);
    // This thread's columns (queries q0 + 8jj + 2t + e): lse in the log2 domain and D.
    const float *lrow = lse + ((long long)b * nh + h) * tq, *drow = delta + ((long long)b * nh + h) * tq;
    float p[32];
    gemm_nt_64x64<HD>(p, sk, L::OWN, 64 * c, sq, BQ);  // S^T
    const bool masked = off + q0 < key_base + 63 || q0 + BQ > tq || key_base + 64 > tk;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = q0 + 8 * jj + 2 * t + e;
        const float l2 = q < tq ? lrow[q] * LOG2E_F : 0.0f;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float v = p[4 * jj + 2 * hh + e] * scale_log2 - l2;
          if (masked) {
            const int key = key_base + 16 * warp + g + 8 * hh;
            if (q >= tq || key >= tk || key > off + q) v = NEG_INF;
          }
          p[4 * jj + 2 * hh + e] = exp2f(v);
        }
      }
    }
    uint32_t pf[4][4];
    to_frags(p, pf);
    // dV += P^T dO and dP^T = V dO^T are independent: both go to the tensor cores at once.
    float ds[32];
    fence_operands(dvacc);
    wgmma_fence();
    issue_rs<HD>(dvacc, pf, sdo, BQ);
    issue_nt_64x64<HD>(ds, sv, L::OWN, 64 * c, sdo, BQ);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dvacc);
    fence_operands(ds);
    fence_operands(pf);
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = q0 + 8 * jj + 2 * t + e;
        const float dq = q < tq ? drow[q] : 0.0f;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = 4 * jj + 2 * hh + e;
          ds[i] = p[i] * (ds[i] - dq);
        }
      }
    }
    to_frags(ds, pf);
    gemm_rs_acc<HD>(dkacc, pf, sq, BQ);  // dK += dS^T Q
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
  wd.check();
  const long long stride = (long long)nkv * HD;
  const long long base = (long long)b * tk_stride * stride + (long long)kvh * HD;
  store_rows<HD>(dk + base, stride, dkacc, key_base, tk_stride, scale);
  store_rows<HD>(dv + base, stride, dvacc, key_base, tk_stride, 1.0f);
}

template <int HD>
__device__ __forceinline__ void bwd_dq(const CUtensorMap *tm_q, const CUtensorMap *tm_k, const CUtensorMap *tm_v,
                                       const CUtensorMap *tm_do, const float *__restrict__ lse,
                                       const float *__restrict__ delta, bf16 *__restrict__ dq, int tq, int tk,
                                       int nh, int nkv, float scale) {
  using L = BwdLayout<HD>;
  constexpr int BN = L::STREAM, STAGES = L::STAGES;
  unsigned char *smem = aligned_smem(L::SMEM);
  uint64_t *bars = reinterpret_cast<uint64_t *>(smem + L::BAR_OFF);
  uint64_t *own_full = bars, *full = bars + 1, *empty = bars + 1 + STAGES;
  const int mb = gridDim.x - 1 - blockIdx.x;
  const int m0 = mb * L::OWN, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (nh / nkv), off = tk - tq;
  const int last_row = min(m0 + L::OWN, tq) - 1;
  const int ntiles = (min(off + last_row + 1, tk) + BN - 1) / BN;

  ring_init(bars, 1 + STAGES, empty, STAGES, 8);
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    regs_dec<24>();
    if (threadIdx.x == 0)
      bwd_produce<HD>(smem, tm_q, tm_do, m0, h, tm_k, tm_v, b, ntiles,
                      [=](int j) { return make_int2(j * BN, kvh); });
    return;
  }

  regs_inc<240>();
  const int c = wg - 1;
  const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row_base = m0 + 64 * c;
  const float NEG_INF = -__int_as_float(0x7f800000);
  const float scale_log2 = scale * LOG2E_F;
  // This thread's two rows: lse (log2 domain) and D.
  float l2[2], dd[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int q = row_base + 16 * warp + g + 8 * hh;
    const long long i = ((long long)b * nh + h) * tq + q;
    l2[hh] = q < tq ? lse[i] * LOG2E_F : 0.0f;
    dd[hh] = q < tq ? delta[i] : 0.0f;
  }
  float dqacc[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) dqacc[i] = 0.0f;
  const uint32_t sq = smem_u32(smem + L::A_OFF), sdo = smem_u32(smem + L::B_OFF);
  const int first_pos = off + row_base;
  Watchdog wd;
  mbar_wait_warp(own_full, 0, wd);
  for (int j = 0; j < ntiles; ++j) {
    const int s = j % STAGES;
    const uint32_t skt = smem_u32(smem + L::S_OFF + s * 2 * L::TILE_BYTES), svt = skt + L::TILE_BYTES;
    mbar_wait_warp(&full[s], (j / STAGES) & 1, wd);
    float p[32];
    gemm_nt_64x64<HD>(p, sq, L::OWN, 64 * c, skt, BN);  // S = Q K^T
    const bool masked = (j + 1) * BN > min(first_pos + 1, tk);
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = p[4 * jj + 2 * hh + e] * scale_log2 - l2[hh];
          if (masked) {
            const int key = j * BN + 8 * jj + 2 * t + e;
            const int q = row_base + 16 * warp + g + 8 * hh;
            if (key > min(off + q, tk - 1)) v = NEG_INF;
          }
          p[4 * jj + 2 * hh + e] = exp2f(v);
        }
      }
    }
    float ds[32];
    gemm_nt_64x64<HD>(ds, sdo, L::OWN, 64 * c, svt, BN);  // dP = dO V^T
#pragma unroll
    for (int i = 0; i < 32; ++i) ds[i] = p[i] * (ds[i] - dd[(i >> 1) & 1]);
    uint32_t pf[4][4];
    to_frags(ds, pf);
    gemm_rs_acc<HD>(dqacc, pf, skt, BN);  // dQ += dS K
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
  wd.check();
  const long long stride = (long long)nh * HD;
  store_rows<HD>(dq + ((long long)b * tq) * stride + (long long)h * HD, stride, dqacc, row_base, tq, scale);
}


// ---------------------------------------------------------------------------------------------
// Decode: pass 1 of flash_attention.cu's split-KV decode (the same grid, chunks and partials; its
// flash_decode_combine_bf16 merges them) with the chunk's keys staged in shared memory by TMA. A
// producer warp loads K and V sub-tiles of DEC_KT keys (row-major, unswizzled: boxes of hd x 64)
// into a DEC_STAGES ring while the four consumer warps run flash_decode.cuh's rows over the
// sub-tile that has arrived: the next sub-tiles' bytes are in flight while one is computed,
// where the sm_80 kernel waits for each key's load. Under GQA a CTA takes up to four query heads
// of one KV head (a warp or more each), so their K and V are read once.

constexpr int DEC_KT = 64;      // keys per sub-tile
constexpr int DEC_STAGES = 2;   // 64 KiB at hd 128: three CTAs per SM
constexpr int DEC_THREADS = fdec::NT + 32;  // four consumer warps and a producer warp

template <int HD> struct DecLayout {
  static constexpr int TILE = DEC_KT * HD * 2;  // one K or V sub-tile
  static constexpr int BAR_OFF = 2 * DEC_STAGES * TILE;
  // src/backend/cuda/flash_sm90.rs sm90_decode_smem mirrors it.
  static constexpr int SMEM = BAR_OFF + 2 * DEC_STAGES * 8 + 1024;
};

template <int HD>
__device__ __forceinline__ void decode_sm90(const bf16 *__restrict__ q, const CUtensorMap *tm_k,
                                            const CUtensorMap *tm_v, float *__restrict__ part_o,
                                            float *__restrict__ part_ml, int tq, int tk, int nh, int nkv,
                                            int hpc, int chunk, int nchunks, float scale_log2) {
  using L = DecLayout<HD>;
  using Row = fdec::Row<HD / 8, 8, 1>;
  __shared__ float s_o[fdec::WARPS][fdec::MAX_HD];
  __shared__ float s_m[fdec::WARPS], s_l[fdec::WARPS];
  unsigned char *smem = aligned_smem(L::SMEM);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // The CTA's hpc query heads h0.. share one KV head; each has WARPS / hpc consumer warps.
  const int c = blockIdx.x, h0 = (blockIdx.y / tq) * hpc, i = blockIdx.y % tq, b = blockIdx.z;
  const int kh = h0 / (nh / nkv), wpr = fdec::WARPS / hpc;
  const int jbeg = c * chunk, jend = min(jbeg + chunk, tk - tq + i + 1);
  auto partial = [&](int h, float *&po, float *&pml) {
    const long long row = ((long long)b * nh + h) * tq + i;
    po = part_o + (row * nchunks + c) * HD;
    pml = part_ml + (row * nchunks + c) * 2;
  };
  if (jbeg >= jend) {  // the rows see no key of this chunk
    if (tid < fdec::NT) {
      for (int hh = 0; hh < hpc; ++hh) {
        float *po, *pml;
        partial(h0 + hh, po, pml);
        fdec::empty_partial(po, pml, HD, tid);
      }
    }
    return;
  }
  uint64_t *full = reinterpret_cast<uint64_t *>(smem + L::BAR_OFF), *empty = full + DEC_STAGES;
  ring_init(full, DEC_STAGES, empty, DEC_STAGES, fdec::WARPS);
  const int nsub = (jend - jbeg + DEC_KT - 1) / DEC_KT;
  if (warp == fdec::WARPS) {
    // Producer: each K and V sub-tile is loaded once for all the CTA's heads.
    if (lane == 0) {
      Watchdog wd;
      tma_prefetch_map(tm_k);
      tma_prefetch_map(tm_v);
      for (int st = 0; st < nsub; ++st) {
        const int s = st % DEC_STAGES;
        if (st >= DEC_STAGES) mbar_wait(&empty[s], ((st / DEC_STAGES) - 1) & 1, wd);
        mbar_arrive_expect_tx(&full[s], 2 * L::TILE);
        tma_load_4d(smem + s * L::TILE, tm_k, &full[s], 0, jbeg + st * DEC_KT, kh, b);
        tma_load_4d(smem + (DEC_STAGES + s) * L::TILE, tm_v, &full[s], 0, jbeg + st * DEC_KT, kh, b);
      }
      wd.check();
    }
    return;
  }
  const int h = h0 + warp / wpr, ws = warp % wpr;  // this warp's head, and its place among its warps
  Row r;
  r.init(q + (((long long)b * tq + i) * nh + h) * HD, HD, scale_log2, lane);
  Watchdog wd;
  for (int st = 0; st < nsub; ++st) {
    const int s = st % DEC_STAGES;
    mbar_wait_warp(&full[s], (st / DEC_STAGES) & 1, wd);
    const bf16 *kt = reinterpret_cast<const bf16 *>(smem + s * L::TILE);
    const bf16 *vt = reinterpret_cast<const bf16 *>(smem + (DEC_STAGES + s) * L::TILE);
    const int j0 = jbeg + st * DEC_KT;
    // Every lane runs the same number of steps (the shuffles need the whole warp).
    for (int jl = ws * Row::G; jl < DEC_KT; jl += wpr * Row::G) {
      const int j = jl + r.kg;
      r.step(kt + j * HD, vt + j * HD, j0 + j < jend, HD);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
  wd.check();
  float *po, *pml;
  partial(h, po, pml);
  r.finish(po, pml, HD, s_o, s_m, s_l, warp, lane, warp - ws, wpr);
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

// Backward (after flash_attention.cu's flash_bwd_delta_bf16 has written D = rowsum(dO * O)).
// dK/dV: grid (ceil(Tk_stride / 128), nkv, B); tm_k / tm_v boxes (64, 128, 1, 1), tm_q / tm_do
// boxes (64, 64, 1, 1). dQ: grid (ceil(Tq / 128), nh, B); tm_q / tm_do boxes (64, 128, 1, 1), tm_k
// / tm_v boxes (64, 64, 1, 1). 384 threads, BwdLayout<HD>::SMEM bytes of dynamic shared memory;
// scale = 1 / sqrt(hd).
#define BWD_SM90(HD)                                                                                               \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) flash_bwd_dkdv_sm90_hd##HD##_bf16(                     \
      const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,                          \
      const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do, const float *lse,        \
      const float *delta, bf16 *dk, bf16 *dv, int tq, int tk, int tk_stride, int nh, int nkv, float scale) {        \
    bwd_dkdv<HD>(&tm_q, &tm_k, &tm_v, &tm_do, lse, delta, dk, dv, tq, tk, tk_stride, nh, nkv, scale);              \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) flash_bwd_dq_sm90_hd##HD##_bf16(                       \
      const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,                          \
      const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do, const float *lse,        \
      const float *delta, bf16 *dq, int tq, int tk, int nh, int nkv, float scale) {                                 \
    bwd_dq<HD>(&tm_q, &tm_k, &tm_v, &tm_do, lse, delta, dq, tq, tk, nh, nkv, scale);                                \
  }
BWD_SM90(64)
BWD_SM90(128)

// Decode pass 1: grid (nchunks, nh / hpc * Tq, B), DEC_THREADS threads, DecLayout<HD>::SMEM bytes
// of dynamic shared memory; hpc (1, 2 or 4, dividing nh / nkv) query heads of one KV head per
// CTA. tm_k / tm_v: 4-d maps (hd, Tk, nkv, B) of k and v, box (hd, 64, 1, 1),
// no swizzle. part_o [rows, nchunks, hd], part_ml [rows, nchunks, 2] as flash_attention.cu's.
#define DEC_SM90(HD)                                                                                             \
  extern "C" __global__ void __launch_bounds__(DEC_THREADS) flash_decode_sm90_hd##HD##_bf16(                     \
      const bf16 *q, const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,        \
      float *part_o, float *part_ml, int tq, int tk, int nh, int nkv, int hpc, int chunk, int nchunks,           \
      float scale_log2) {                                                                                        \
    decode_sm90<HD>(q, &tm_k, &tm_v, part_o, part_ml, tq, tk, nh, nkv, hpc, chunk, nchunks, scale_log2);        \
  }
DEC_SM90(64)
DEC_SM90(128)
