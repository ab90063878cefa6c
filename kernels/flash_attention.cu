// Flash attention on bf16 tensor cores (mma.sync.aligned.m16n8k16, f32 accumulation), causal
// with GQA: a forward with online softmax that saves the logsumexp, a FlashAttention-2 style
// backward (D = rowsum(dO * O), then dK/dV per key tile and dQ per query tile: deterministic, no
// atomics), and a split-K decode (new tokens against a KV cache) with a combine pass.
// CPU reference: src/ops/attention.rs (attention_forward, attention_backward, AttnShape).
// Wrapper: src/backend/cuda/flash.rs. Test: tests/gpu_flash.rs.
//
// Layout and meaning as the CPU reference: q [B, Tq, nh, hd], k/v [B, Tk_stride, nkv, hd] (only
// the first Tk positions are read), out like q, lse [B, nh, Tq] f32 (natural log). Query i sits at
// position Tk - Tq + i and sees keys 0..=Tk - Tq + i; head h reads kv head h / (nh / nkv).
// dk/dv are written for all Tk_stride positions (zero past Tk).
//
// Variants (the wrapper picks one; tile constants are mirrored in flash.rs and checked at run
// time by check_launch): head dims 64 and 128 take the exact kernels (hd == HD, 16-byte aligned
// rows, cp.async); every other head dim <= 256 runs the generic kernel of the next bucket (64,
// 128 or 256) with a run-time hd: columns past hd are zero-filled in shared memory and k-steps /
// n-blocks wholly past hd are skipped; rows whose length or address is not a multiple of 16 bytes
// are loaded with plain 2-byte loads instead of cp.async.
//
// Inside a warp, every GEMM is a sequence of m16n8k16 MMAs on fragments read with ldmatrix from
// shared memory (row pitch HD + PAD); the softmax probabilities P and dS go from the f32
// accumulators straight into A fragments (registers), never through shared memory.
#include "common.cuh"

namespace fa {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
// Shared-memory row padding in elements: a 16-byte shift per row puts the 8 row addresses of an
// ldmatrix phase (and the 16-byte cp.async writes) in distinct banks.
constexpr int PAD = 8;
// Largest head dimension of any variant.
constexpr int MAX_HD = 256;
// Unroll factor of the k-step loop of mma_sA_sBt: full unrolling lets the compiler hoist every
// ldmatrix of the loop and pushes the dK/dV kernel past 255 registers (spills); 2 does not.
constexpr int kSaUnroll = 2;

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+: cp.async, ldmatrix, mma.sync bf16).

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `full` false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(full ? 16 : 0)
               : "memory");
}
// 4-byte global -> shared copy; `full` false writes a zero.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool full) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(full ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, register m of every
// lane receives (row lane/4, columns 2(lane%4), +1) of matrix m (transposed with .trans).
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] b[16x8]; fragment layout (g = lane/4, t = lane%4):
//   a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}  b: {(k 2t..2t+1, n g), (k 2t+8.., n g)}
//   c: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 as a bf16x2 register (round to nearest even); `lo` is the lower column.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// Trap when the launch does not match the kernel's compile-time tile configuration (the wrapper
// mirrors it): a mismatch would otherwise read out of shared-memory bounds silently.
template <int NT, int SMEM> __device__ __forceinline__ void check_launch() {
  uint32_t dyn;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
  if (blockDim.x != NT || dyn < (uint32_t)SMEM) __trap();
}

// ---------------------------------------------------------------------------------------------
// Warp-level GEMMs on fragments. A warp owns 16 rows of the output; `ld` is the row pitch of every
// shared-memory operand (HD + PAD). The per-lane ldmatrix row addresses:
//   A row-major [16][16k]:      row lane%16,                 column 8 (lane/16)
//   B^T row-major [8n][16k]:    row lane%8 + 8 (lane/16),    column 8 ((lane/8)%2)   (no .trans)
//   B row-major [16k][8n]:      row lane%8 + 8 ((lane/8)%2), column 8 (lane/16)      (.trans)
// so that registers {0,1} are the b fragment of the first 8 columns and {2,3} of the next 8.

// The 16-row A fragments of all KS k-steps of a row-major shared tile.
template <int KS> __device__ __forceinline__ void load_afrags(uint32_t (&a)[KS][4], const bf16 *s, int ld, int lane) {
  const uint32_t pa = smem_addr(s + (lane & 15) * ld + (lane >> 4) * 8);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) ldsm_x4(pa + ks * 32, a[ks]);
}

// c[16 x 8NB] += A[16 x 16KS] B with A row-major in shared memory and B given as B^T [8NB][16KS]
// row-major in shared memory. k-steps >= ks_lim are skipped (zero columns of a generic head dim).
template <int NB, int KS>
__device__ __forceinline__ void mma_sA_sBt(float (&c)[NB][4], const bf16 *a, const bf16 *bt, int ld, int ks_lim,
                                           int lane) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs (one ldmatrix.x4)");
  const uint32_t pa = smem_addr(a + (lane & 15) * ld + (lane >> 4) * 8);
  const uint32_t pb = smem_addr(bt + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8);
#pragma unroll (kSaUnroll)
  for (int ks = 0; ks < KS; ++ks) {
    if (ks < ks_lim) {
      uint32_t af[4];
      ldsm_x4(pa + ks * 32, af);
#pragma unroll
      for (int nb = 0; nb < NB; nb += 2) {
        uint32_t bf[4];
        ldsm_x4(pb + (nb * 8 * ld + ks * 16) * 2, bf);
        mma16816(c[nb], af, bf[0], bf[1]);
        mma16816(c[nb + 1], af, bf[2], bf[3]);
      }
    }
  }
}

// As mma_sA_sBt with A already in registers.
template <int NB, int KS>
__device__ __forceinline__ void mma_rA_sBt(float (&c)[NB][4], const uint32_t (&a)[KS][4], const bf16 *bt, int ld,
                                           int ks_lim, int lane) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs (one ldmatrix.x4)");
  const uint32_t pb = smem_addr(bt + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    if (ks < ks_lim) {
#pragma unroll
      for (int nb = 0; nb < NB; nb += 2) {
        uint32_t bf[4];
        ldsm_x4(pb + (nb * 8 * ld + ks * 16) * 2, bf);
        mma16816(c[nb], a[ks], bf[0], bf[1]);
        mma16816(c[nb + 1], a[ks], bf[2], bf[3]);
      }
    }
  }
}

// c[16 x 8NB] += A[16 x 16KS] B with A in registers and B row-major [16KS][8NB] in shared memory.
// Pairs of n-blocks >= np_lim are skipped (output columns past a generic head dim).
template <int NB, int KS>
__device__ __forceinline__ void mma_rA_sB(float (&c)[NB][4], const uint32_t (&a)[KS][4], const bf16 *b, int ld,
                                          int np_lim, int lane) {
  static_assert(NB % 2 == 0, "n-blocks come in pairs (one ldmatrix.x4)");
  const uint32_t pb = smem_addr(b + ((lane & 7) + (((lane >> 3) & 1) << 3)) * ld + (lane >> 4) * 8);
#pragma unroll
  for (int np = 0; np < NB / 2; ++np) {
    if (np < np_lim) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t bf[4];
        ldsm_x4_t(pb + (ks * 16 * ld + np * 16) * 2, bf);
        mma16816(c[2 * np], a[ks], bf[0], bf[1]);
        mma16816(c[2 * np + 1], a[ks], bf[2], bf[3]);
      }
    }
  }
}

// f32 accumulators [16 x 8NB] as bf16 A fragments [16 x 16 (NB/2)] for the next GEMM.
template <int NB>
__device__ __forceinline__ void acc_to_afrags(const float (&c)[NB][4], uint32_t (&a)[NB / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    a[kk][0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Tiles between global and shared memory.

// Rows [0, ROWS) of a strided global matrix (row r at src + r * stride) into a shared tile of
// pitch HD + PAD: rows >= nrows and columns >= hd become zero. vec: 16-byte cp.async (the caller
// commits and waits; needs hd % 8 == 0 and 16-byte aligned rows), else plain 2-byte loads.
// `src` must point inside the tensor (rows past nrows are never addressed).
template <int ROWS, int HD, int NT>
__device__ __forceinline__ void load_tile(bf16 *dst, const bf16 *src, long long stride, int nrows, int hd, bool vec,
                                          int tid) {
  constexpr int LD = HD + PAD;
  if (vec) {
    constexpr int CH = HD / 8;  // 16-byte chunks per row
    constexpr int N = ROWS * CH;
#pragma unroll
    for (int it = 0; it < (N + NT - 1) / NT; ++it) {
      const int c = tid + it * NT;
      if (N % NT == 0 || c < N) {
        const int r = c / CH, ch = c % CH;
        const bool ok = r < nrows && ch * 8 < hd;
        cp_async16(smem_addr(dst + r * LD + ch * 8), ok ? src + r * stride + ch * 8 : src, ok);
      }
    }
  } else {
    for (int c = tid; c < ROWS * HD; c += NT) {
      const int r = c / HD, d = c % HD;
      dst[r * LD + d] = (r < nrows && d < hd) ? src[r * stride + d] : __ushort_as_bfloat16((unsigned short)0);
    }
  }
}

// Rows [0, nrows) x columns [0, hd) of a shared tile (pitch HD + PAD) to a strided global matrix,
// by the NT threads numbered `tid` (16-byte stores when vec).
template <int ROWS, int HD, int NT>
__device__ __forceinline__ void store_tile(bf16 *dst, long long stride, const bf16 *src, int nrows, int hd, bool vec,
                                           int tid) {
  constexpr int LD = HD + PAD;
  if (vec) {
    constexpr int CH = HD / 8;
    for (int c = tid; c < ROWS * CH; c += NT) {
      const int r = c / CH, ch = c % CH;
      if (r < nrows && ch * 8 < hd)
        *reinterpret_cast<uint4 *>(dst + r * stride + ch * 8) = *reinterpret_cast<const uint4 *>(src + r * LD + ch * 8);
    }
  } else {
    for (int c = tid; c < ROWS * HD; c += NT) {
      const int r = c / HD, d = c % HD;
      if (r < nrows && d < hd) dst[r * stride + d] = src[r * LD + d];
    }
  }
}

// A warp's f32 accumulator rows [16 x 8NB] as bf16 into shared memory (pitch ld), times `mul[r]`
// for the rows g (r = 0) and g + 8 (r = 1).
template <int NB>
__device__ __forceinline__ void stage_acc(bf16 *s, int ld, const float (&c)[NB][4], float mul0, float mul1,
                                          int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    *reinterpret_cast<__nv_bfloat162 *>(s + g * ld + nb * 8 + 2 * t4) =
        __floats2bfloat162_rn(c[nb][0] * mul0, c[nb][1] * mul0);
    *reinterpret_cast<__nv_bfloat162 *>(s + (g + 8) * ld + nb * 8 + 2 * t4) =
        __floats2bfloat162_rn(c[nb][2] * mul1, c[nb][3] * mul1);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward. A CTA per (query tile of BQ rows, head, batch); warp w owns query rows 16w..16w+15 of
// the tile. Key/value tiles of BK rows stream through a two-stage cp.async pipeline; per tile
// S = Q K^T (tensor cores), masked online softmax in registers, O += P V (tensor cores).

template <int HD_, int BQ_, int BK_, bool EXACT_, bool Q_REGS_, int MINB_> struct FwdCfg {
  static constexpr int HD = HD_, BQ = BQ_, BK = BK_, MINB = MINB_;
  static constexpr bool EXACT = EXACT_, Q_REGS = Q_REGS_;
  static constexpr int NW = BQ / 16, NT = NW * 32, LD = HD + PAD;
  // Two stages of (K tile, V tile); with Q_REGS the Q tile first occupies the second stage (its
  // fragments move to registers before the pipeline starts), else it has its own region.
  static constexpr int SMEM = (Q_REGS ? 4 * BK : BQ + 4 * BK) * LD * 2;
  static_assert(!Q_REGS || BQ <= 2 * BK, "the Q tile must fit in one K/V stage");
  static_assert(BQ <= 4 * BK, "the output staging uses the K/V stages");
};

template <class C>
__device__ __forceinline__ void flash_fwd(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                          const bf16 *__restrict__ v, bf16 *__restrict__ o, float *__restrict__ lse,
                                          int tq, int tk, int tk_stride, int nh, int nkv, int hd_rt,
                                          float scale_log2, int vec_rt) {
  constexpr int HD = C::HD, BQ = C::BQ, BK = C::BK, NT = C::NT, LD = C::LD;
  constexpr int KS = HD / 16, NBK = BK / 8, NBD = HD / 8;
  check_launch<NT, C::SMEM>();
  const int hd = C::EXACT ? HD : hd_rt;
  const bool vec = C::EXACT || vec_rt != 0;
  const int ks_lim = C::EXACT ? KS : (hd + 15) / 16;  // k-steps (and n-block pairs) holding head dims

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int qt = gridDim.x - 1 - blockIdx.x;  // latest (longest) query tiles first
  const int h = blockIdx.y, b = blockIdx.z, kh = h / (nh / nkv);
  const int off = tk - tq, i0 = qt * BQ;
  const int rows = min(BQ, tq - i0);
  const int kend = min(tk, off + i0 + rows);  // keys seen by the tile's last row (exclusive)
  const int ntiles = (kend + BK - 1) / BK;
  const long long qs = (long long)nh * hd, kvs = (long long)nkv * hd;  // row strides
  const bf16 *gq = q + ((long long)b * tq + i0) * qs + (long long)h * hd;
  const long long kvoff = (long long)b * tk_stride * kvs + (long long)kh * hd;
  const bf16 *gk = k + kvoff, *gv = v + kvoff;

  extern __shared__ uint4 smem_u4[];
  bf16 *sm = reinterpret_cast<bf16 *>(smem_u4);
  // Stage s: K tile at sm + 2s BK LD, V tile right after it.
  bf16 *sQ = C::Q_REGS ? sm + 2 * BK * LD : sm + 4 * BK * LD;

  load_tile<BQ, HD, NT>(sQ, gq, qs, rows, hd, vec, tid);
  load_tile<BK, HD, NT>(sm, gk, kvs, min(BK, tk), hd, vec, tid);
  load_tile<BK, HD, NT>(sm + BK * LD, gv, kvs, min(BK, tk), hd, vec, tid);
  cp_async_commit();

  const int wrow0 = i0 + warp * 16;  // first query row of this warp
  const bool active = wrow0 < tq;
  uint32_t qf[C::Q_REGS ? KS : 1][4];
  if constexpr (C::Q_REGS) {
    cp_async_wait<0>();
    __syncthreads();
    load_afrags<KS>(qf, sQ + warp * 16 * LD, LD, lane);
    __syncthreads();  // the Q tile's shared memory is the second stage, refilled next
  }

  float acc[NBD][4];
#pragma unroll
  for (int nd = 0; nd < NBD; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  for (int t = 0; t < ntiles; ++t) {
    const int j0 = t * BK;
    if (t + 1 < ntiles) {
      const int jn = j0 + BK;
      bf16 *st = sm + ((t + 1) & 1) * 2 * BK * LD;
      load_tile<BK, HD, NT>(st, gk + jn * kvs, kvs, min(BK, tk - jn), hd, vec, tid);
      load_tile<BK, HD, NT>(st + BK * LD, gv + jn * kvs, kvs, min(BK, tk - jn), hd, vec, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16 *cK = sm + (t & 1) * 2 * BK * LD, *cV = cK + BK * LD;
    // Warp-uniform: skip warps without query rows, and tiles wholly after the warp's last row.
    if (active && j0 <= off + wrow0 + 15) {
      float s[NBK][4];
#pragma unroll
      for (int nb = 0; nb < NBK; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
      if constexpr (C::Q_REGS) {
        mma_rA_sBt<NBK, KS>(s, qf, cK, LD, ks_lim, lane);
      } else {
        mma_sA_sBt<NBK, KS>(s, sQ + warp * 16 * LD, cK, LD, ks_lim, lane);
      }
      // Scores in the log2 domain; keys past Tk or after the row's position get -inf.
      const bool mask = (j0 + BK > tk) || (j0 + BK - 1 > off + wrow0);
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nb = 0; nb < NBK; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nb][e] * scale_log2;
          if (mask) {
            const int j = j0 + nb * 8 + 2 * t4 + (e & 1), i = wrow0 + g + (e >> 1) * 8;
            if (j >= tk || j > off + i) x = -INFINITY;
          }
          s[nb][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float m_new = fmaxf(m_run[r], mx[r]);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet stays at 0
        const float corr = exp2f(m_run[r] - m_use);
        m_run[r] = m_new;
        l_run[r] *= corr;
#pragma unroll
        for (int nd = 0; nd < NBD; ++nd) {
          acc[nd][2 * r] *= corr;
          acc[nd][2 * r + 1] *= corr;
        }
        mx[r] = m_use;
      }
#pragma unroll
      for (int nb = 0; nb < NBK; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[nb][e] - mx[e >> 1]);
          s[nb][e] = p;
          l_run[e >> 1] += p;
        }
      }
      uint32_t pf[NBK / 2][4];
      acc_to_afrags<NBK>(s, pf);
      mma_rA_sB<NBD, BK / 16>(acc, pf, cV, LD, ks_lim, lane);
    }
    __syncthreads();  // stage t & 1 is refilled by the next iteration
  }

  if (active) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
      const int i = wrow0 + g + 8 * r;
      if (t4 == 0 && i < tq) lse[((long long)b * nh + h) * tq + i] = (m_run[r] + log2f(l)) * LN2;
    }
    // After the loop's last barrier no warp reads shared memory: stage this warp's 16 rows in
    // rows 16w.. of the buffer and write them out as 16-byte rows.
    bf16 *so = sm + warp * 16 * LD;
    stage_acc<NBD>(so, LD, acc, inv[0], inv[1], lane);
    __syncwarp();
    store_tile<16, HD, 32>(o + ((long long)b * tq + wrow0) * qs + (long long)h * hd, qs, so, min(16, tq - wrow0), hd,
                           vec, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 1: delta[b, h, i] = dO_i . O_i (f32), one warp per query row (rows in memory
// order, so consecutive warps read consecutive rows).
extern "C" __global__ void flash_bwd_delta_bf16(const bf16 *o, const bf16 *dout, float *delta, int b, int tq, int nh,
                                                int hd) {
  const int lane = threadIdx.x & 31;
  const long long rows = (long long)b * tq * nh;
  for (long long w = gtid() >> 5; w < rows; w += gstride() >> 5) {
    const int h = (int)(w % nh);
    const long long bi = w / nh;  // b * tq + i
    const int i = (int)(bi % tq), bb = (int)(bi / tq);
    const bf16 *po = o + w * hd, *pd = dout + w * hd;
    float acc = 0.0f;
    for (int d = lane; d < hd; d += 32) acc += to_f32(po[d]) * to_f32(pd[d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[((long long)bb * nh + h) * tq + i] = acc;
  }
}

// Backward, pass 2: dK and dV. A CTA per (key tile of BKB rows, kv head, batch); warp w owns key
// rows 16 (w / DSPLIT).. and head dims [(w % DSPLIT) HD / DSPLIT, +HD / DSPLIT) of dK/dV (DSPLIT
// > 1 splits wide heads so the accumulators fit in registers; those warps recompute the same
// scores). The loop runs over the query heads of the group and their query tiles of BQB rows that
// see the key tile (two-stage cp.async pipeline of Q, dO, lse, D); per tile, transposed:
// S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - D) scale,
// dV += P^T dO, dK += dS^T Q. Key tiles at or past Tk only write zeros.
template <int HD_, int BKB_, int BQB_, int DSPLIT_, bool EXACT_, int MINB_> struct DkdvCfg {
  static constexpr int HD = HD_, BKB = BKB_, BQB = BQB_, DSPLIT = DSPLIT_, MINB = MINB_;
  static constexpr bool EXACT = EXACT_;
  static constexpr int NW = BKB / 16 * DSPLIT, NT = NW * 32, LD = HD + PAD;
  // K and V tiles, two stages of (Q, dO) tiles, two stages of (lse, D) rows.
  static constexpr int SMEM = (2 * BKB + 4 * BQB) * LD * 2 + 4 * BQB * 4;
  static_assert((HD / DSPLIT) % 16 == 0, "each head-dim part is whole n-block pairs");
  static_assert(BQB <= NT, "one thread per query row loads lse and D");
};

template <class C>
__device__ __forceinline__ void flash_bwd_dkdv(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                               const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                               const float *__restrict__ lse, const float *__restrict__ delta,
                                               bf16 *__restrict__ dk, bf16 *__restrict__ dv, int tq, int tk,
                                               int tk_stride, int nh, int nkv, int hd_rt, float scale, int vec_rt) {
  constexpr int HD = C::HD, BKB = C::BKB, BQB = C::BQB, NT = C::NT, LD = C::LD;
  constexpr int KS = HD / 16, NBQ = BQB / 8, DP = HD / C::DSPLIT, NBD = DP / 8;
  check_launch<NT, C::SMEM>();
  const int hd = C::EXACT ? HD : hd_rt;
  const bool vec = C::EXACT || vec_rt != 0;
  const int ks_lim = C::EXACT ? KS : (hd + 15) / 16;
  const float scale_log2 = scale * LOG2E;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int kb = warp / C::DSPLIT, dbase = (warp % C::DSPLIT) * DP;
  // n-block pairs of this warp's head-dim part that hold head dims
  const int np_lim = C::EXACT ? NBD / 2 : max(0, min(NBD / 2, (ks_lim * 16 - dbase) / 16));
  const int j0 = blockIdx.x * BKB, kh = blockIdx.y, b = blockIdx.z;
  const int off = tk - tq, grp = nh / nkv;
  const long long qs = (long long)nh * hd, kvs = (long long)nkv * hd;
  const long long kvoff = ((long long)b * tk_stride + j0) * kvs + (long long)kh * hd;
  const int nout = min(BKB, tk_stride - j0);

  if (j0 >= tk) {  // cache slots past Tk: zero gradient
    for (int c = tid; c < nout * hd; c += NT) {
      const int r = c / hd, d = c % hd;
      dk[kvoff + r * kvs + d] = __ushort_as_bfloat16((unsigned short)0);
      dv[kvoff + r * kvs + d] = __ushort_as_bfloat16((unsigned short)0);
    }
    return;
  }

  extern __shared__ uint4 smem_u4[];
  bf16 *sm = reinterpret_cast<bf16 *>(smem_u4);
  bf16 *sK = sm, *sV = sm + BKB * LD;
  bf16 *sQ0 = sm + 2 * BKB * LD;                                   // stage s: Q at sQ0 + 2s BQB LD, dO after it
  float *sL = reinterpret_cast<float *>(sm + (2 * BKB + 4 * BQB) * LD);  // [2][BQB] lse, then [2][BQB] D

  const int i_start = max(0, j0 - off);  // first query that sees a key of this tile
  const int nqt = (tq - i_start + BQB - 1) / BQB;
  const int niter = grp * nqt;

  // Issue the loads of iteration `it` (query head it / nqt, query tile it % nqt) into stage st.
  auto load_q = [&](int it, int st) {
    const int h = kh * grp + it / nqt;
    const int qi0 = i_start + (it % nqt) * BQB;
    const int nr = min(BQB, tq - qi0);
    const long long qoff = ((long long)b * tq + qi0) * qs + (long long)h * hd;
    bf16 *dq_ = sQ0 + st * 2 * BQB * LD;
    load_tile<BQB, HD, NT>(dq_, q + qoff, qs, nr, hd, vec, tid);
    load_tile<BQB, HD, NT>(dq_ + BQB * LD, dout + qoff, qs, nr, hd, vec, tid);
    const long long row = ((long long)b * nh + h) * tq + qi0;
    if (tid < BQB) {
      const bool ok = tid < nr;
      cp_async4(smem_addr(sL + st * BQB + tid), lse + row + (ok ? tid : 0), ok);
      cp_async4(smem_addr(sL + 2 * BQB + st * BQB + tid), delta + row + (ok ? tid : 0), ok);
    }
  };

  load_tile<BKB, HD, NT>(sK, k + kvoff, kvs, min(BKB, tk - j0), hd, vec, tid);
  load_tile<BKB, HD, NT>(sV, v + kvoff, kvs, min(BKB, tk - j0), hd, vec, tid);
  load_q(0, 0);
  cp_async_commit();

  float dK[NBD][4], dV[NBD][4];
#pragma unroll
  for (int nd = 0; nd < NBD; ++nd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dK[nd][e] = dV[nd][e] = 0.0f;
  }
  const int kr0 = j0 + kb * 16;  // first key row of this warp

  for (int it = 0; it < niter; ++it) {
    const int st = it & 1;
    if (it + 1 < niter) {
      load_q(it + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int qi0 = i_start + (it % nqt) * BQB;
    const bf16 *cQ = sQ0 + st * 2 * BQB * LD, *cO = cQ + BQB * LD;
    const float *cL = sL + st * BQB, *cD = sL + 2 * BQB + st * BQB;
    // Warp-uniform: skip when none of this warp's keys is seen by a query of the tile.
    if (kr0 < tk && kr0 <= off + min(tq, qi0 + BQB) - 1) {
      float sT[NBQ][4], dpT[NBQ][4];
#pragma unroll
      for (int nb = 0; nb < NBQ; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sT[nb][e] = dpT[nb][e] = 0.0f;
      }
      mma_sA_sBt<NBQ, KS>(sT, sK + kb * 16 * LD, cQ, LD, ks_lim, lane);
      mma_sA_sBt<NBQ, KS>(dpT, sV + kb * 16 * LD, cO, LD, ks_lim, lane);
      const bool mask = (kr0 + 15 > off + qi0) || (qi0 + BQB > tq) || (kr0 + 16 > tk);
#pragma unroll
      for (int nb = 0; nb < NBQ; ++nb) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = nb * 8 + 2 * t4 + c;  // query qi0 + col
          const float lse2 = cL[col] * LOG2E, dd = cD[col];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int e = 2 * r + c;
            float p = exp2f(sT[nb][e] * scale_log2 - lse2);
            if (mask) {
              const int i = qi0 + col, j = kr0 + g + 8 * r;
              if (i >= tq || j >= tk || j > off + i) p = 0.0f;
            }
            sT[nb][e] = p;
            dpT[nb][e] = p * (dpT[nb][e] - dd) * scale;
          }
        }
      }
      uint32_t pf[NBQ / 2][4], dsf[NBQ / 2][4];
      acc_to_afrags<NBQ>(sT, pf);
      acc_to_afrags<NBQ>(dpT, dsf);
      mma_rA_sB<NBD, BQB / 16>(dV, pf, cO + dbase, LD, np_lim, lane);
      mma_rA_sB<NBD, BQB / 16>(dK, dsf, cQ + dbase, LD, np_lim, lane);
    }
    __syncthreads();  // stage st is refilled by the next iteration
  }

  // Stage dK in the K tile and dV in the V tile (free after the loop's last barrier), then write.
  stage_acc<NBD>(sK + kb * 16 * LD + dbase, LD, dK, 1.0f, 1.0f, lane);
  stage_acc<NBD>(sV + kb * 16 * LD + dbase, LD, dV, 1.0f, 1.0f, lane);
  __syncthreads();
  store_tile<BKB, HD, NT>(dk + kvoff, kvs, sK, nout, hd, vec, tid);
  store_tile<BKB, HD, NT>(dv + kvoff, kvs, sV, nout, hd, vec, tid);
}

// Backward, pass 3: dQ. A CTA per (query tile of BQ rows, head, batch), warps as in the forward;
// K/V tiles stream through a two-stage pipeline; per tile S = Q K^T, dP = dO V^T,
// dS = P (dP - D) scale, dQ += dS K. Recomputing S and dP here (instead of accumulating dQ with
// atomics in pass 2) keeps the result deterministic.
template <int HD_, int BQ_, int BK_, bool EXACT_, int MINB_> struct DqCfg {
  static constexpr int HD = HD_, BQ = BQ_, BK = BK_, MINB = MINB_;
  static constexpr bool EXACT = EXACT_;
  static constexpr int NW = BQ / 16, NT = NW * 32, LD = HD + PAD;
  // Q and dO tiles, two stages of (K, V) tiles.
  static constexpr int SMEM = (2 * BQ + 4 * BK) * LD * 2;
};

template <class C>
__device__ __forceinline__ void flash_bwd_dq(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                             const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                             const float *__restrict__ lse, const float *__restrict__ delta,
                                             bf16 *__restrict__ dq, int tq, int tk, int tk_stride, int nh, int nkv,
                                             int hd_rt, float scale, int vec_rt) {
  constexpr int HD = C::HD, BQ = C::BQ, BK = C::BK, NT = C::NT, LD = C::LD;
  constexpr int KS = HD / 16, NBK = BK / 8, NBD = HD / 8;
  check_launch<NT, C::SMEM>();
  const int hd = C::EXACT ? HD : hd_rt;
  const bool vec = C::EXACT || vec_rt != 0;
  const int ks_lim = C::EXACT ? KS : (hd + 15) / 16;
  const float scale_log2 = scale * LOG2E;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, kh = h / (nh / nkv);
  const int off = tk - tq, i0 = qt * BQ;
  const int rows = min(BQ, tq - i0);
  const int kend = min(tk, off + i0 + rows);
  const int ntiles = (kend + BK - 1) / BK;
  const long long qs = (long long)nh * hd, kvs = (long long)nkv * hd;
  const long long qoff = ((long long)b * tq + i0) * qs + (long long)h * hd;
  const long long kvoff = (long long)b * tk_stride * kvs + (long long)kh * hd;
  const bf16 *gk = k + kvoff, *gv = v + kvoff;

  extern __shared__ uint4 smem_u4[];
  bf16 *sm = reinterpret_cast<bf16 *>(smem_u4);
  bf16 *sQ = sm, *sO = sm + BQ * LD, *sKV = sm + 2 * BQ * LD;  // stage s: K at sKV + 2s BK LD, V after

  load_tile<BQ, HD, NT>(sQ, q + qoff, qs, rows, hd, vec, tid);
  load_tile<BQ, HD, NT>(sO, dout + qoff, qs, rows, hd, vec, tid);
  load_tile<BK, HD, NT>(sKV, gk, kvs, min(BK, tk), hd, vec, tid);
  load_tile<BK, HD, NT>(sKV + BK * LD, gv, kvs, min(BK, tk), hd, vec, tid);
  cp_async_commit();

  const int wrow0 = i0 + warp * 16;
  const bool active = wrow0 < tq;
  float lse2[2], dd[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = wrow0 + g + 8 * r;
    const long long row = ((long long)b * nh + h) * tq + i;
    lse2[r] = i < tq ? lse[row] * LOG2E : 0.0f;
    dd[r] = i < tq ? delta[row] : 0.0f;
  }
  float acc[NBD][4];
#pragma unroll
  for (int nd = 0; nd < NBD; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;

  for (int t = 0; t < ntiles; ++t) {
    const int j0 = t * BK;
    if (t + 1 < ntiles) {
      const int jn = j0 + BK;
      bf16 *st = sKV + ((t + 1) & 1) * 2 * BK * LD;
      load_tile<BK, HD, NT>(st, gk + jn * kvs, kvs, min(BK, tk - jn), hd, vec, tid);
      load_tile<BK, HD, NT>(st + BK * LD, gv + jn * kvs, kvs, min(BK, tk - jn), hd, vec, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16 *cK = sKV + (t & 1) * 2 * BK * LD, *cV = cK + BK * LD;
    if (active && j0 <= off + wrow0 + 15) {
      float s[NBK][4], dp[NBK][4];
#pragma unroll
      for (int nb = 0; nb < NBK; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.0f;
      }
      mma_sA_sBt<NBK, KS>(s, sQ + warp * 16 * LD, cK, LD, ks_lim, lane);
      mma_sA_sBt<NBK, KS>(dp, sO + warp * 16 * LD, cV, LD, ks_lim, lane);
      const bool mask = (j0 + BK > tk) || (j0 + BK - 1 > off + wrow0);
#pragma unroll
      for (int nb = 0; nb < NBK; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float p = exp2f(s[nb][e] * scale_log2 - lse2[r]);
          if (mask) {
            const int j = j0 + nb * 8 + 2 * t4 + (e & 1), i = wrow0 + g + 8 * r;
            if (j >= tk || j > off + i) p = 0.0f;
          }
          s[nb][e] = p * (dp[nb][e] - dd[r]) * scale;  // dS
        }
      }
      uint32_t dsf[NBK / 2][4];
      acc_to_afrags<NBK>(s, dsf);
      mma_rA_sB<NBD, BK / 16>(acc, dsf, cK, LD, ks_lim, lane);
    }
    __syncthreads();
  }

  if (active) {
    bf16 *so = sm + warp * 16 * LD;  // this warp's own Q rows, no longer read
    stage_acc<NBD>(so, LD, acc, 1.0f, 1.0f, lane);
    __syncwarp();
    store_tile<16, HD, 32>(dq + qoff + (long long)warp * 16 * qs, qs, so, min(16, tq - wrow0), hd, vec, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode (split-K): new query rows (usually Tq = 1) against a long KV cache. Pass 1: a CTA per
// (key chunk, head x query row, batch) runs the online softmax over its chunk and writes partial
// (m, l) (log2 domain) and the unnormalised o; pass 2 merges the chunks of each row. Keys are
// read once per (row, head): each group of L lanes handles one key (VEC dims per lane per load,
// NCH loads per row), the DEC_WARPS warps x (32 / L) groups step through the chunk together.

constexpr int DEC_WARPS = 4;  // 128 threads: enough keys in flight per CTA, many CTAs per SM
constexpr int DEC_NT = DEC_WARPS * 32;

template <int L, int VEC, int NCH>
__device__ __forceinline__ void decode_split(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                             const bf16 *__restrict__ v, float *__restrict__ part_o,
                                             float *__restrict__ part_ml, int tq, int tk, int tk_stride, int nh,
                                             int nkv, int hd, int chunk, int nchunks, float scale_log2) {
  constexpr int G = 32 / L, DPL = NCH * VEC;  // key groups per warp, dims per lane
  static_assert(L * VEC * NCH <= MAX_HD && (L & (L - 1)) == 0, "lane groups are powers of two");
  __shared__ float s_o[DEC_WARPS][MAX_HD];
  __shared__ float s_m[DEC_WARPS], s_l[DEC_WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, sl = lane & (L - 1), kg = lane / L;
  const int c = blockIdx.x, h = blockIdx.y / tq, i = blockIdx.y % tq, b = blockIdx.z;
  const int kh = h / (nh / nkv);
  const long long row = ((long long)b * nh + h) * tq + i;
  const int jbeg = c * chunk, jend = min(jbeg + chunk, tk - tq + i + 1);
  float *po = part_o + (row * nchunks + c) * hd;
  float *pml = part_ml + (row * nchunks + c) * 2;
  if (jbeg >= jend) {  // the row sees no key of this chunk
    for (int d = tid; d < hd; d += DEC_NT) po[d] = 0.0f;
    if (tid == 0) {
      pml[0] = -INFINITY;
      pml[1] = 0.0f;
    }
    return;
  }

  // Lane dims: d = (cc L + sl) VEC + e for cc < NCH, e < VEC (VEC = 8 needs hd % 8 == 0).
  float qr[DPL], acc[DPL];
  const bf16 *qp = q + (((long long)b * tq + i) * nh + h) * hd;
#pragma unroll
  for (int cc = 0; cc < NCH; ++cc) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int d = (cc * L + sl) * VEC + e;
      qr[cc * VEC + e] = d < hd ? to_f32(qp[d]) * scale_log2 : 0.0f;
      acc[cc * VEC + e] = 0.0f;
    }
  }
  float m = -INFINITY, l = 0.0f;
  const long long kvs = (long long)nkv * hd;
  const bf16 *kb = k + (long long)b * tk_stride * kvs + (long long)kh * hd;
  const bf16 *vb = v + (long long)b * tk_stride * kvs + (long long)kh * hd;
  // Every lane runs the same number of steps (the shuffles need the whole warp).
  for (int jb = jbeg + warp * G; jb < jend; jb += DEC_WARPS * G) {
    const int j = jb + kg;
    const bool valid = j < jend;
    float x[DPL];
#pragma unroll
    for (int cc = 0; cc < NCH; ++cc) {
      const int d0 = (cc * L + sl) * VEC;
      const bool ok = valid && d0 < hd;
      if constexpr (VEC == 8) {
        uint4 u = make_uint4(0, 0, 0, 0);
        if (ok) u = *reinterpret_cast<const uint4 *>(kb + j * kvs + d0);
        const __nv_bfloat162 *hp = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __bfloat1622float2(hp[e]);
          x[cc * 8 + 2 * e] = f.x;
          x[cc * 8 + 2 * e + 1] = f.y;
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[cc * VEC + e] = (ok && d0 + e < hd) ? to_f32(kb[j * kvs + d0 + e]) : 0.0f;
      }
    }
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
#pragma unroll
    for (int cc = 0; cc < NCH; ++cc) {
      const int d0 = (cc * L + sl) * VEC;
      const bool ok = valid && d0 < hd;
      if constexpr (VEC == 8) {
        uint4 u = make_uint4(0, 0, 0, 0);
        if (ok) u = *reinterpret_cast<const uint4 *>(vb + j * kvs + d0);
        const __nv_bfloat162 *hp = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __bfloat1622float2(hp[e]);
          x[cc * 8 + 2 * e] = f.x;
          x[cc * 8 + 2 * e + 1] = f.y;
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[cc * VEC + e] = (ok && d0 + e < hd) ? to_f32(vb[j * kvs + d0 + e]) : 0.0f;
      }
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = acc[d] * corr + p * x[d];
  }

  // Merge the key groups of the warp (lane sl of every group holds the same dims).
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
  __syncthreads();
  // Merge the warps; the chunk holds at least one visible key, so mm is finite.
  float mm = -INFINITY;
#pragma unroll
  for (int w = 0; w < DEC_WARPS; ++w) mm = fmaxf(mm, s_m[w]);
  float wt[DEC_WARPS];
#pragma unroll
  for (int w = 0; w < DEC_WARPS; ++w) wt[w] = s_m[w] == -INFINITY ? 0.0f : exp2f(s_m[w] - mm);
  for (int d = tid; d < hd; d += DEC_NT) {
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) a += s_o[w][d] * wt[w];
    po[d] = a;
  }
  if (tid == 0) {
    float ls = 0.0f;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) ls += s_l[w] * wt[w];
    pml[0] = mm;
    pml[1] = ls;
  }
}

}  // namespace fa

// ---------------------------------------------------------------------------------------------
// Entry points. Tile configurations (mirrored in src/backend/cuda/flash.rs; a mismatch traps).
// Cfg<..., MINB>: MINB is the __launch_bounds__ CTAs-per-SM hint, set only where ptxas meets it
// without spilling (registers as ptxas 13.0 reports them for sm_80 / sm_90).
//   forward hd64:   BQ 64, BK 64, 4 warps, Q in registers  36 KiB, 167 regs: 3 CTAs/SM (12 warps)
//           hd128:  BQ 64, BK 64, 4 warps, Q in registers  68 KiB, 239 regs: 2 CTAs/SM (8 warps)
//           any256: BQ 64, BK 32, 4 warps, Q in smem       99 KiB: O alone is 128 registers
//   dK/dV   hd64:   BKB 64, BQB 64, 4 warps                 54.5 KiB, 224 regs: 2 CTAs/SM
//           hd128:  BKB 64, BQB 32, 4 warps                 68.5 KiB, 248 regs: 2 CTAs/SM (dK+dV = 128 regs)
//           any256: BKB 64, BQB 32, 8 warps, 2 per 16 keys  132 KiB: each warp owns half the head dims
//   dQ      hd64:   BQ 64, BK 64, 4 warps                   54 KiB, 186 regs: 2 CTAs/SM
//           hd128:  BQ 64, BK 32, 4 warps                   68 KiB, 166 regs: 3 CTAs/SM on H100, 2 on A100
//           any256: BQ 64, BK 32, 4 warps                   132 KiB
// BQ / BKB rows per CTA are 16 per warp (one m16 MMA block each); BK / BQB are the streamed tile
// rows, two cp.async stages deep. The any64 / any128 generic variants use the hd64 / hd128 tiles.

using FwdHd64 = fa::FwdCfg<64, 64, 64, true, true, 3>;
using FwdHd128 = fa::FwdCfg<128, 64, 64, true, true, 2>;
using FwdAny64 = fa::FwdCfg<64, 64, 64, false, true, 3>;
using FwdAny128 = fa::FwdCfg<128, 64, 64, false, true, 2>;
using FwdAny256 = fa::FwdCfg<256, 64, 32, false, false, 1>;

using DkdvHd64 = fa::DkdvCfg<64, 64, 64, 1, true, 2>;
using DkdvHd128 = fa::DkdvCfg<128, 64, 32, 1, true, 2>;
using DkdvAny64 = fa::DkdvCfg<64, 64, 64, 1, false, 2>;
using DkdvAny128 = fa::DkdvCfg<128, 64, 32, 1, false, 2>;
using DkdvAny256 = fa::DkdvCfg<256, 64, 32, 2, false, 1>;

using DqHd64 = fa::DqCfg<64, 64, 64, true, 2>;
using DqHd128 = fa::DqCfg<128, 64, 32, true, 3>;
using DqAny64 = fa::DqCfg<64, 64, 64, false, 2>;
using DqAny128 = fa::DqCfg<128, 64, 32, false, 3>;
using DqAny256 = fa::DqCfg<256, 64, 32, false, 1>;

// Forward: grid (ceil(Tq / BQ), nh, B), dynamic smem Cfg::SMEM. scale_log2 = log2(e) / sqrt(hd);
// vec = 1 when hd % 8 == 0 and q, k, v, o are 16-byte aligned (always 1 for the exact variants).
#define FWD_PARAMS                                                                                            \
  const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int tq, int tk, int tk_stride, int nh, \
      int nkv, int hd, float scale_log2, int vec
#define FWD_ARGS q, k, v, o, lse, tq, tk, tk_stride, nh, nkv, hd, scale_log2, vec
#define FWD_KERNEL(name, Cfg) \
  extern "C" __global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) name(FWD_PARAMS) { fa::flash_fwd<Cfg>(FWD_ARGS); }
FWD_KERNEL(flash_fwd_hd64_bf16, FwdHd64)
FWD_KERNEL(flash_fwd_hd128_bf16, FwdHd128)
FWD_KERNEL(flash_fwd_any64_bf16, FwdAny64)
FWD_KERNEL(flash_fwd_any128_bf16, FwdAny128)
FWD_KERNEL(flash_fwd_any256_bf16, FwdAny256)

// dK/dV: grid (ceil(Tk_stride / BKB), nkv, B). dQ: grid (ceil(Tq / BQ), nh, B). scale = 1/sqrt(hd);
// delta from flash_bwd_delta_bf16.
#define BWD_PARAMS                                                                                           \
  const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse, const float *delta,    \
      bf16 *dk, bf16 *dv, int tq, int tk, int tk_stride, int nh, int nkv, int hd, float scale, int vec
#define DKDV_KERNEL(name, Cfg)                                                                             \
  extern "C" __global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) name(BWD_PARAMS) {                                 \
    fa::flash_bwd_dkdv<Cfg>(q, k, v, dout, lse, delta, dk, dv, tq, tk, tk_stride, nh, nkv, hd, scale, vec); \
  }
DKDV_KERNEL(flash_bwd_dkdv_hd64_bf16, DkdvHd64)
DKDV_KERNEL(flash_bwd_dkdv_hd128_bf16, DkdvHd128)
DKDV_KERNEL(flash_bwd_dkdv_any64_bf16, DkdvAny64)
DKDV_KERNEL(flash_bwd_dkdv_any128_bf16, DkdvAny128)
DKDV_KERNEL(flash_bwd_dkdv_any256_bf16, DkdvAny256)

#define DQ_PARAMS                                                                                            \
  const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse, const float *delta,    \
      bf16 *dq, int tq, int tk, int tk_stride, int nh, int nkv, int hd, float scale, int vec
#define DQ_KERNEL(name, Cfg)                                                                          \
  extern "C" __global__ void __launch_bounds__(Cfg::NT, Cfg::MINB) name(DQ_PARAMS) {                             \
    fa::flash_bwd_dq<Cfg>(q, k, v, dout, lse, delta, dq, tq, tk, tk_stride, nh, nkv, hd, scale, vec); \
  }
DQ_KERNEL(flash_bwd_dq_hd64_bf16, DqHd64)
DQ_KERNEL(flash_bwd_dq_hd128_bf16, DqHd128)
DQ_KERNEL(flash_bwd_dq_any64_bf16, DqAny64)
DQ_KERNEL(flash_bwd_dq_any128_bf16, DqAny128)
DQ_KERNEL(flash_bwd_dq_any256_bf16, DqAny256)

// Decode pass 1: grid (nchunks, nh * Tq, B), DEC_NT threads, static smem. part_o [rows, nchunks,
// hd], part_ml [rows, nchunks, 2] with rows ordered like lse. v8l<L>: hd % 8 == 0, hd <= 8 L,
// k/v 16-byte aligned; s1: any hd <= 256.
#define DEC_PARAMS                                                                                        \
  const bf16 *q, const bf16 *k, const bf16 *v, float *part_o, float *part_ml, int tq, int tk, int tk_stride, \
      int nh, int nkv, int hd, int chunk, int nchunks, float scale_log2
#define DEC_KERNEL(name, L, VEC, NCH)                                                                     \
  extern "C" __global__ void __launch_bounds__(fa::DEC_NT) name(DEC_PARAMS) {                             \
    fa::decode_split<L, VEC, NCH>(q, k, v, part_o, part_ml, tq, tk, tk_stride, nh, nkv, hd, chunk, nchunks, \
                                  scale_log2);                                                           \
  }
DEC_KERNEL(flash_decode_v8l8_bf16, 8, 8, 1)
DEC_KERNEL(flash_decode_v8l16_bf16, 16, 8, 1)
DEC_KERNEL(flash_decode_v8l32_bf16, 32, 8, 1)
DEC_KERNEL(flash_decode_s1_bf16, 32, 1, 8)

// Decode pass 2: one warp per row (b, h, i); out like q, lse [B, nh, Tq] (natural log).
extern "C" __global__ void flash_decode_combine_bf16(const float *part_o, const float *part_ml, bf16 *o, float *lse,
                                                     int b, int tq, int nh, int hd, int nchunks) {
  const int lane = threadIdx.x & 31;
  const long long rows = (long long)b * nh * tq;
  for (long long row = gtid() >> 5; row < rows; row += gstride() >> 5) {
    const int i = (int)(row % tq), h = (int)((row / tq) % nh), bb = (int)(row / ((long long)tq * nh));
    const float *ml = part_ml + row * nchunks * 2;
    const float *po = part_o + row * nchunks * hd;
    float mm = -INFINITY;
    for (int c = lane; c < nchunks; c += 32) mm = fmaxf(mm, ml[2 * c]);
    mm = warp_max(mm);  // finite: chunk 0 holds key 0
    float ls = 0.0f;
    for (int c = lane; c < nchunks; c += 32) ls += ml[2 * c] == -INFINITY ? 0.0f : ml[2 * c + 1] * exp2f(ml[2 * c] - mm);
    ls = warp_sum(ls);
    const float inv = 1.0f / ls;
    bf16 *out = o + (((long long)bb * tq + i) * nh + h) * hd;
    for (int d = lane; d < hd; d += 32) {
      float a = 0.0f;
      for (int c = 0; c < nchunks; ++c) {
        const float mc = ml[2 * c];
        if (mc != -INFINITY) a += po[(long long)c * hd + d] * exp2f(mc - mm);
      }
      out[d] = from_f32<bf16>(a * inv);
    }
    if (lane == 0) lse[row] = (mm + log2f(ls)) * fa::LN2;
  }
}
