//! The Hopper flash attention forward (kernels/flash_attention_sm90.cu: wgmma, TMA, a producer
//! and two consumer warpgroups; notes in kernels/flash_attention_sm90.md): the tensor maps its
//! TMA loads read and its launch. [`Device::flash_attention_fwd`] takes it on
//! [`super::KernelPath::Sm90`] for the shapes [`sm90_applies`] accepts; everything else runs
//! kernels/flash_attention.cu.

use super::tma::{plain_map, tensor_map, TensorMap};
use super::Device;
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::{Error, Result};

const MODULE: &str = "flash_attention_sm90";
/// Threads of a CTA: a producer and two consumer warpgroups (THREADS in the .cu).
const THREADS: u32 = 384;
/// Query rows per CTA (BM).
const BM: usize = 128;
/// Bytes of one 128-byte-swizzled row: 64 bf16.
const ROW_BYTES: usize = 128;

/// Keys per tile (Layout<HD>::BN).
pub const fn sm90_keys_per_tile(_hd: usize) -> usize {
    128
}

/// Stages of the K/V ring (Layout<HD>::STAGES).
const STAGES: usize = 3;

/// Dynamic shared memory of the forward for head dim `hd` (Layout<HD>::SMEM): Q, the stages' K
/// and V tiles, 1 + 3 * STAGES mbarriers, a float per consumer warp, and 1024 bytes to align the
/// base.
pub const fn sm90_smem(hd: usize) -> usize {
    let blocks = hd / 64;
    let q = blocks * BM * ROW_BYTES;
    let kv = blocks * sm90_keys_per_tile(hd) * ROW_BYTES;
    q + 2 * STAGES * kv + (1 + 3 * STAGES) * 8 + 8 * 4 + 1024
}

/// Whether the Hopper kernels handle this call: head dim 64 or 128, every buffer 16-byte aligned
/// (TMA's requirement on addresses and strides), and some query rows (an empty call runs the
/// sm_80 path, which zeroes dK and dV: TMA maps cannot describe an empty tensor). `ptrs`: every
/// bf16 buffer of the call.
pub fn sm90_applies(s: &AttnShape, ptrs: &[u64]) -> bool {
    (s.hd == 64 || s.hd == 128)
        && s.b * s.tq * s.nh > 0
        && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// The Hopper forward kernel for head dim `hd` (64 or 128).
pub fn sm90_kernel(hd: usize) -> &'static str {
    if hd == 64 {
        "flash_fwd_sm90_hd64_bf16"
    } else {
        "flash_fwd_sm90_hd128_bf16"
    }
}

/// The tensor map of a `[batch, rows, heads, hd]` bf16 tensor at `ptr` whose row `r` of batch
/// `b` starts `b * batch_rows + r` rows in (rows of `heads * hd` elements; `batch_rows >= rows`):
/// TMA boxes of 64 columns x `box_rows` rows of one head, positions past `rows` read as zeros.
fn heads_map(
    ptr: u64,
    hd: usize,
    rows: usize,
    heads: usize,
    batch: usize,
    batch_rows: usize,
    box_rows: usize,
) -> Result<TensorMap> {
    let row = heads * hd * 2;
    tensor_map(
        ptr,
        [hd, rows, heads, batch],
        &[row, hd * 2, batch_rows * row],
        box_rows,
        "flash attention (Hopper)",
    )
}

impl Device {
    /// The Hopper forward: the caller ([`Device::flash_attention_fwd_on`]) checked the sizes of
    /// q, k, v, out and lse against `s` and [`sm90_applies`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_fwd_sm90(
        &self,
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        lse: u64,
        s: &AttnShape,
    ) -> Result<()> {
        self.require_sm90("flash attention")?;
        ensure!(
            s.tq <= i32::MAX as usize && s.tk <= i32::MAX as usize,
            "flash attention (Hopper): {} queries or {} keys exceed a 32-bit TMA coordinate",
            s.tq,
            s.tk
        );
        if s.b * s.tq * s.nh == 0 {
            return Ok(());
        }
        let bn = sm90_keys_per_tile(s.hd);
        let tm_q = heads_map(q, s.hd, s.tq, s.nh, s.b, s.tq, BM)?;
        let tm_k = heads_map(k, s.hd, s.tk, s.nkv, s.b, s.tk_stride, bn)?;
        let tm_v = heads_map(v, s.hd, s.tk, s.nkv, s.b, s.tk_stride, bn)?;
        let name = sm90_kernel(s.hd);
        let smem = sm90_smem(s.hd);
        let f = self.function_smem(MODULE, name, smem)?;
        let scale_log2 = std::f32::consts::LOG2_E / (s.hd as f32).sqrt();
        let grid = (s.tq.div_ceil(BM) as u32, s.nh as u32, s.b as u32);
        use cudarc::driver::PushKernelArg;
        let mut b = self.stream().launch_builder(&f);
        let (tq, tk, nh, nkv) = (s.tq as i32, s.tk as i32, s.nh as i32, s.nkv as i32);
        b.arg(&tm_q)
            .arg(&tm_k)
            .arg(&tm_v)
            .arg(&out)
            .arg(&lse)
            .arg(&tq)
            .arg(&tk)
            .arg(&nh)
            .arg(&nkv)
            .arg(&scale_log2);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: grid,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the caller checked every buffer against the sizes the kernel indexes (the
        // tensor maps bound the loads, out and lse are written for rows < tq only), the argument
        // types match the kernel's C signature, and the block size and shared memory are the
        // kernel's compile-time configuration (it traps when given less shared memory).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| Error(format!("launching {name}: {}", Error::from(e))))
    }
}

/// Device addresses of the backward's operands (sizes checked by the caller).
pub(super) struct BwdPtrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub dout: u64,
    pub lse: u64,
    pub delta: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
}

/// Rows a backward CTA owns (keys for dK/dV, queries for dQ) and rows of each streamed tile
/// (BwdLayout<HD>::OWN, STREAM).
const BWD_OWN: usize = 128;
const BWD_STREAM: usize = 64;
/// Stages of the backward's ring (BwdLayout<HD>::STAGES).
const BWD_STAGES: usize = 2;

/// Dynamic shared memory of the backward kernels for head dim `hd` (BwdLayout<HD>::SMEM): the
/// two owned operands, the stages' two streamed tiles, 1 + 2 * stages mbarriers, 1024 bytes of
/// alignment slack.
pub const fn sm90_bwd_smem(hd: usize) -> usize {
    let blocks = hd / 64;
    2 * blocks * BWD_OWN * ROW_BYTES
        + BWD_STAGES * 2 * blocks * BWD_STREAM * ROW_BYTES
        + (1 + 2 * BWD_STAGES) * 8
        + 1024
}

impl Device {
    /// The Hopper backward's dK/dV and dQ launches; D is in `p.delta`. The caller checked every
    /// size against `s` and [`sm90_applies`].
    pub(super) fn flash_bwd_sm90(&self, p: &BwdPtrs, s: &AttnShape) -> Result<()> {
        self.require_sm90("flash attention backward")?;
        ensure!(
            s.tq <= i32::MAX as usize && s.tk_stride <= i32::MAX as usize,
            "flash attention (Hopper): {} queries or {} keys exceed a 32-bit TMA coordinate",
            s.tq,
            s.tk_stride
        );
        if s.b * s.nh == 0 || s.tq == 0 {
            return Ok(());
        }
        let smem = sm90_bwd_smem(s.hd);
        let scale = 1.0 / (s.hd as f32).sqrt();
        let (tq, tk, stride, nh, nkv) = (
            s.tq as i32,
            s.tk as i32,
            s.tk_stride as i32,
            s.nh as i32,
            s.nkv as i32,
        );
        let (dkdv, dq) = if s.hd == 64 {
            (
                "flash_bwd_dkdv_sm90_hd64_bf16",
                "flash_bwd_dq_sm90_hd64_bf16",
            )
        } else {
            (
                "flash_bwd_dkdv_sm90_hd128_bf16",
                "flash_bwd_dq_sm90_hd128_bf16",
            )
        };
        use cudarc::driver::PushKernelArg;
        let cfg = |grid: (usize, usize, usize)| cudarc::driver::LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // The maps of q, k, v and dout with boxes of `q_rows` query rows and `kv_rows` keys.
        let maps = |q_rows: usize, kv_rows: usize| -> Result<[TensorMap; 4]> {
            Ok([
                heads_map(p.q, s.hd, s.tq, s.nh, s.b, s.tq, q_rows)?,
                heads_map(p.k, s.hd, s.tk, s.nkv, s.b, s.tk_stride, kv_rows)?,
                heads_map(p.v, s.hd, s.tk, s.nkv, s.b, s.tk_stride, kv_rows)?,
                heads_map(p.dout, s.hd, s.tq, s.nh, s.b, s.tq, q_rows)?,
            ])
        };
        // dK/dV: own 128 keys (K, V), stream 64 queries (Q, dO).
        let tm = maps(BWD_STREAM, BWD_OWN)?;
        let f = self.function_smem(MODULE, dkdv, smem)?;
        let mut b = self.stream().launch_builder(&f);
        for m in &tm {
            b.arg(m);
        }
        b.arg(&p.lse)
            .arg(&p.delta)
            .arg(&p.dk)
            .arg(&p.dv)
            .arg(&tq)
            .arg(&tk)
            .arg(&stride)
            .arg(&nh)
            .arg(&nkv)
            .arg(&scale);
        // SAFETY: as flash_fwd_sm90: sizes checked by the caller, loads bounded by the tensor
        // maps, dk/dv written for rows < tk_stride, argument types as the kernel's.
        unsafe { b.launch(cfg((s.tk_stride.div_ceil(BWD_OWN), s.nkv, s.b))) }
            .map_err(|e| Error(format!("launching {dkdv}: {}", Error::from(e))))?;
        // dQ: own 128 queries (Q, dO), stream 64 keys (K, V).
        let tm = maps(BWD_OWN, BWD_STREAM)?;
        let f = self.function_smem(MODULE, dq, smem)?;
        let mut b = self.stream().launch_builder(&f);
        for m in &tm {
            b.arg(m);
        }
        b.arg(&p.lse)
            .arg(&p.delta)
            .arg(&p.dq)
            .arg(&tq)
            .arg(&tk)
            .arg(&nh)
            .arg(&nkv)
            .arg(&scale);
        // SAFETY: as above; dq is written for rows < tq.
        unsafe { b.launch(cfg((s.tq.div_ceil(BWD_OWN), s.nh, s.b))) }
            .map(|_| ())
            .map_err(|e| Error(format!("launching {dq}: {}", Error::from(e))))
    }
}

/// Keys per sub-tile and stages of the Hopper decode (DEC_KT, DEC_STAGES), and its threads: four
/// consumer warps and a producer warp (DEC_THREADS).
pub(super) const DEC_KT: usize = 64;
const DEC_STAGES: usize = 2;
const DEC_THREADS: u32 = 160;

/// Query heads per CTA of the Hopper decode for `group` query heads per KV head: 4, 2 or 1, the
/// largest that divides the group (the CTA's four consumer warps split among them, and their K
/// and V are read once).
pub fn decode_heads_per_cta(group: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|&h| group.is_multiple_of(h))
        .unwrap_or(1)
}

/// Dynamic shared memory of the Hopper decode for head dim `hd` (DecLayout<HD>::SMEM): the
/// stages' K and V sub-tiles, 2 * stages mbarriers, 1024 bytes of alignment slack.
pub const fn sm90_decode_smem(hd: usize) -> usize {
    2 * DEC_STAGES * DEC_KT * hd * 2 + 2 * DEC_STAGES * 8 + 1024
}

impl Device {
    /// Pass 1 of the Hopper decode into `part_o` / `part_ml` (`hpc` query heads per CTA, `chunk`
    /// keys per chunk, `nchunks` chunks per row, as [`Device::decode_launch`] planned them); the
    /// caller runs the combine pass and checked every size against `s` and [`sm90_applies`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_decode_sm90(
        &self,
        q: u64,
        k: u64,
        v: u64,
        part_o: u64,
        part_ml: u64,
        s: &AttnShape,
        hpc: usize,
        chunk: usize,
        nchunks: usize,
    ) -> Result<()> {
        self.require_sm90("flash decode")?;
        ensure!(
            [1, 2, 4].contains(&hpc) && (s.nh / s.nkv).is_multiple_of(hpc),
            "flash decode (Hopper): {hpc} heads per CTA for groups of {}",
            s.nh / s.nkv
        );
        let what = "flash decode (Hopper)";
        let row = s.nkv * s.hd * 2;
        let kv_map = |p: u64| {
            plain_map(
                p,
                [s.hd, s.tk, s.nkv, s.b],
                &[row, s.hd * 2, s.tk_stride * row],
                s.hd,
                DEC_KT,
                what,
            )
        };
        let (tm_k, tm_v) = (kv_map(k)?, kv_map(v)?);
        let name = if s.hd == 64 {
            "flash_decode_sm90_hd64_bf16"
        } else {
            "flash_decode_sm90_hd128_bf16"
        };
        let smem = sm90_decode_smem(s.hd);
        let f = self.function_smem(MODULE, name, smem)?;
        let (tq, tk, nh, nkv) = (s.tq as i32, s.tk as i32, s.nh as i32, s.nkv as i32);
        let (chunk, nchunks_i) = (chunk as i32, nchunks as i32);
        let hpc_i = hpc as i32;
        let scale_log2 = std::f32::consts::LOG2_E / (s.hd as f32).sqrt();
        use cudarc::driver::PushKernelArg;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&q)
            .arg(&tm_k)
            .arg(&tm_v)
            .arg(&part_o)
            .arg(&part_ml)
            .arg(&tq)
            .arg(&tk)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hpc_i)
            .arg(&chunk)
            .arg(&nchunks_i)
            .arg(&scale_log2);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (nchunks as u32, (s.nh / hpc * s.tq) as u32, s.b as u32),
            block_dim: (DEC_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the caller checked q, k, v against `s` and sized part_o / part_ml for rows x
        // nchunks; the maps bound the K/V loads; argument types as the kernel's.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| Error(format!("launching {name}: {}", Error::from(e))))
    }
}
