//! Flash attention on tensor cores (kernels/flash_attention.cu; CPU reference
//! src/ops/attention.rs; test tests/gpu_flash.rs): causal GQA forward with saved logsumexp,
//! FlashAttention-2 style backward (deterministic: dK/dV per key tile, dQ per query tile, no
//! atomics), and split-K decode against a KV cache. Their benchmark, `flexrun bench attention`, is
//! `crate::bench::attention`.
//!
//! Same layout and meaning as [`crate::ops::attention_forward`]: q `[B, Tq, nh, hd]`, k/v
//! `[B, Tk_stride, nkv, hd]` (first Tk positions read), out like q, lse `[B, nh, Tq]` f32.
//! Head dims 64 and 128 with 16-byte aligned buffers run the exact kernels; any other head dim
//! up to [`FLASH_MAX_HD`] (or a misaligned view) runs the generic kernel of the next bucket.

pub use super::flash_sm90::{
    decode_heads_per_cta, sm90_applies, sm90_bwd_smem, sm90_decode_smem, sm90_kernel,
    sm90_keys_per_tile, sm90_smem,
};
use super::{blocks_for, int, launch, Device, DeviceRead, DeviceWrite, KernelPath, BLOCK};
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaFunction;
use half::bf16;

/// Kernel module (kernels/flash_attention.cu).
const MODULE: &str = "flash_attention";
/// Largest head dimension of any variant (MAX_HD in the .cu).
pub const FLASH_MAX_HD: usize = 256;
/// Shared-memory row padding in elements (PAD in the .cu).
const PAD: usize = 8;
/// CUDA's limit on gridDim.y and gridDim.z.
const MAX_GRID_YZ: usize = 65535;

/// Threads of a decode split CTA (DEC_NT in the .cu).
const DECODE_THREADS: u32 = 128;
/// Fewest keys per decode chunk: below this the partial (m, l, o) writes cost as much as the keys.
pub const DECODE_MIN_CHUNK: usize = 64;
/// Decode chunks are a multiple of this many keys (4 warps x 8 key groups step through a chunk).
const DECODE_CHUNK_ALIGN: usize = 32;
/// Decode CTAs wanted per SM: enough loads in flight to approach memory bandwidth.
const DECODE_CTAS_PER_SM: usize = 4;

/// Which kernel of the backward or forward a [`Variant`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Fwd,
    BwdDkdv,
    BwdDq,
}

/// One compiled tile configuration (mirrors the `using ...Cfg` lines of flash_attention.cu; a
/// launch that disagrees with the kernel's compile-time block size or shared memory traps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub pass: Pass,
    pub kernel: &'static str,
    /// Head-dim bucket (HD) the kernel is compiled for.
    pub hd: usize,
    /// hd == HD with 16-byte rows; otherwise run-time hd (and plain loads when unaligned).
    pub exact: bool,
    /// Rows of the CTA's own tile: query rows (forward, dQ) or key rows (dK/dV).
    pub rows: usize,
    /// Rows of each streamed tile: keys (forward, dQ) or queries (dK/dV).
    pub stream: usize,
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub smem: usize,
}

const fn ld(hd: usize) -> usize {
    hd + PAD
}

/// Forward: BQ query rows, BK keys per tile, Q fragments in registers (Q aliases a K/V stage).
const fn fwd(
    kernel: &'static str,
    hd: usize,
    exact: bool,
    bq: usize,
    bk: usize,
    q_regs: bool,
) -> Variant {
    let rows = if q_regs { 4 * bk } else { bq + 4 * bk };
    Variant {
        pass: Pass::Fwd,
        kernel,
        hd,
        exact,
        rows: bq,
        stream: bk,
        threads: (bq / 16 * 32) as u32,
        smem: rows * ld(hd) * 2,
    }
}

/// dK/dV: BKB key rows per CTA, BQB query rows per streamed tile, DSPLIT warps per 16 keys.
const fn dkdv(
    kernel: &'static str,
    hd: usize,
    exact: bool,
    bkb: usize,
    bqb: usize,
    dsplit: usize,
) -> Variant {
    Variant {
        pass: Pass::BwdDkdv,
        kernel,
        hd,
        exact,
        rows: bkb,
        stream: bqb,
        threads: (bkb / 16 * dsplit * 32) as u32,
        smem: (2 * bkb + 4 * bqb) * ld(hd) * 2 + 4 * bqb * 4,
    }
}

/// dQ: BQ query rows per CTA, BK keys per tile.
const fn dq(kernel: &'static str, hd: usize, exact: bool, bq: usize, bk: usize) -> Variant {
    Variant {
        pass: Pass::BwdDq,
        kernel,
        hd,
        exact,
        rows: bq,
        stream: bk,
        threads: (bq / 16 * 32) as u32,
        smem: (2 * bq + 4 * bk) * ld(hd) * 2,
    }
}

/// Every variant, in the order exact 64, exact 128, generic 64, 128, 256 per pass. Tile reasons
/// are in the .cu next to the `using` lines.
pub const VARIANTS: &[Variant] = &[
    fwd("flash_fwd_hd64_bf16", 64, true, 64, 64, true),
    fwd("flash_fwd_hd128_bf16", 128, true, 64, 64, true),
    fwd("flash_fwd_any64_bf16", 64, false, 64, 64, true),
    fwd("flash_fwd_any128_bf16", 128, false, 64, 64, true),
    fwd("flash_fwd_any256_bf16", 256, false, 64, 32, false),
    dkdv("flash_bwd_dkdv_hd64_bf16", 64, true, 64, 64, 1),
    dkdv("flash_bwd_dkdv_hd128_bf16", 128, true, 64, 32, 1),
    dkdv("flash_bwd_dkdv_any64_bf16", 64, false, 64, 64, 1),
    dkdv("flash_bwd_dkdv_any128_bf16", 128, false, 64, 32, 1),
    dkdv("flash_bwd_dkdv_any256_bf16", 256, false, 64, 32, 2),
    dq("flash_bwd_dq_hd64_bf16", 64, true, 64, 64),
    dq("flash_bwd_dq_hd128_bf16", 128, true, 64, 32),
    dq("flash_bwd_dq_any64_bf16", 64, false, 64, 64),
    dq("flash_bwd_dq_any128_bf16", 128, false, 64, 32),
    dq("flash_bwd_dq_any256_bf16", 256, false, 64, 32),
];

/// The variant of `pass` for head dim `hd`; `vec`: hd % 8 == 0 and every buffer 16-byte aligned.
pub fn select(pass: Pass, hd: usize, vec: bool) -> Result<Variant> {
    ensure!(
        (1..=FLASH_MAX_HD).contains(&hd),
        "flash attention: head dim {hd} outside 1..={FLASH_MAX_HD}"
    );
    let exact = vec && (hd == 64 || hd == 128);
    let bucket = if hd <= 64 {
        64
    } else if hd <= 128 {
        128
    } else {
        256
    };
    VARIANTS
        .iter()
        .find(|v| v.pass == pass && v.hd == bucket && v.exact == exact)
        .copied()
        .ok_or_else(|| {
            Error(format!(
                "flash attention: no {pass:?} kernel for head dim {hd}"
            ))
        })
}

/// Whether the 16-byte (cp.async / uint4) paths apply: hd a multiple of 8 elements and every
/// buffer address a multiple of 16 bytes (views at odd offsets fall back to plain loads).
pub fn vectorizable(hd: usize, ptrs: &[u64]) -> bool {
    hd.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Visible (query, key) pairs of causal attention: query i sees Tk - Tq + i + 1 keys.
pub fn causal_pairs(s: &AttnShape) -> f64 {
    let (tq, off) = (s.tq as f64, (s.tk - s.tq) as f64);
    tq * (off + 1.0) + tq * (tq - 1.0) / 2.0
}

/// Forward FLOPs of causal attention (two GEMMs, 2 flops per multiply-add, visible pairs only).
/// The backward is counted as 2.5x this (five GEMMs), the convention of FlashAttention's and
/// PyTorch's benchmarks, although the dQ pass here recomputes S and dP (seven GEMMs).
pub fn causal_attention_flops(s: &AttnShape) -> f64 {
    4.0 * (s.b * s.nh * s.hd) as f64 * causal_pairs(s)
}

fn check(s: &AttnShape, q: usize, k: usize, v: usize) -> Result<()> {
    ensure!(
        s.nkv > 0 && s.nh.is_multiple_of(s.nkv),
        "flash attention: kv heads {} must divide heads {}",
        s.nkv,
        s.nh
    );
    ensure!(
        s.tq <= s.tk && s.tk <= s.tk_stride,
        "flash attention: bad lengths {s:?}"
    );
    ensure!(
        s.hd >= 1 && s.hd <= FLASH_MAX_HD,
        "flash attention: head dim {} outside 1..={FLASH_MAX_HD}",
        s.hd
    );
    ensure!(
        q == s.b * s.tq * s.nh * s.hd,
        "flash attention: q holds {q} values for {s:?}"
    );
    ensure!(
        k == s.b * s.tk_stride * s.nkv * s.hd && v == k,
        "flash attention: k/v hold {k}/{v} values for {s:?}"
    );
    ensure!(
        s.b <= MAX_GRID_YZ && s.nh <= MAX_GRID_YZ,
        "flash attention: batch {} or heads {} above {MAX_GRID_YZ}",
        s.b,
        s.nh
    );
    Ok(())
}

struct Dims {
    tq: i32,
    tk: i32,
    stride: i32,
    nh: i32,
    nkv: i32,
    hd: i32,
}

fn dims(s: &AttnShape) -> Result<Dims> {
    // Element offsets inside the kernels are 64-bit; row counts must fit an int.
    Ok(Dims {
        tq: int(s.tq, "tq")?,
        tk: int(s.tk, "tk")?,
        stride: int(s.tk_stride, "tk_stride")?,
        nh: int(s.nh, "heads")?,
        nkv: int(s.nkv, "kv heads")?,
        hd: int(s.hd, "head dim")?,
    })
}

/// The kernel of `v`, allowed its dynamic shared memory (opt-in above 48 KiB).
fn prepare(dev: &Device, v: &Variant) -> Result<CudaFunction> {
    dev.function_smem(MODULE, v.kernel, v.smem)
}

/// Launch variant `$v` on grid `$grid` with its block size and dynamic shared memory. Arguments
/// must have the exact C types of the kernel (see `launch!` in mod.rs).
macro_rules! launch_variant {
    ($dev:expr, $v:expr, $grid:expr; $($arg:expr),* $(,)?) => {{
        let dev: &Device = $dev;
        let v: Variant = $v;
        let grid: (u32, u32, u32) = $grid;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            Ok(())
        } else {
            use cudarc::driver::PushKernelArg;
            let f = prepare(dev, &v)?;
            let mut b = dev.stream().launch_builder(&f);
            $( let a = $arg; b.arg(&a); )*
            let cfg = cudarc::driver::LaunchConfig { grid_dim: grid, block_dim: (v.threads, 1, 1), shared_mem_bytes: v.smem as u32 };
            // SAFETY: the wrapper checked every buffer against the sizes the kernel indexes, the
            // argument types match the kernel's C signature, and the block size and shared memory
            // are the kernel's compile-time configuration (it traps otherwise).
            unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(|e| Error(format!("launching {}: {}", v.kernel, Error::from(e))))
        }
    }};
}

/// Grid dimension `n` as u32 (block counts never exceed 2^31 for int-sized lengths).
fn g(n: usize) -> u32 {
    n as u32
}

/// How a decode launch splits the cache: `nchunks` chunks of `chunk` keys per query row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub kernel: &'static str,
    pub chunk: usize,
    pub nchunks: usize,
}

/// Chunks for `rows` = B * nh * Tq query rows over `tk` keys on a GPU with `sms` SMs: enough CTAs
/// for [`DECODE_CTAS_PER_SM`] per SM, each chunk at least [`DECODE_MIN_CHUNK`] keys and a multiple
/// of 32. `vec`: hd % 8 == 0 and k/v 16-byte aligned (16-byte loads, hd / 8 lanes per key).
pub fn decode_plan(rows: usize, tk: usize, hd: usize, vec: bool, sms: usize) -> DecodePlan {
    let kernel = match (vec, hd) {
        (true, 0..=64) => "flash_decode_v8l8_bf16",
        (true, 65..=128) => "flash_decode_v8l16_bf16",
        (true, _) => "flash_decode_v8l32_bf16",
        (false, _) => "flash_decode_s1_bf16",
    };
    let want = (DECODE_CTAS_PER_SM * sms.max(1))
        .div_ceil(rows.max(1))
        .max(1);
    let chunk = tk
        .div_ceil(want)
        .next_multiple_of(DECODE_CHUNK_ALIGN)
        .max(DECODE_MIN_CHUNK);
    DecodePlan {
        kernel,
        chunk,
        nchunks: tk.max(1).div_ceil(chunk),
    }
}

/// How a decode call runs: the plan, whether the Hopper kernel takes it, and its query heads
/// per CTA (1 on the sm_80 kernel).
#[derive(Clone, Copy, Debug)]
pub struct DecodeLaunch {
    pub plan: DecodePlan,
    pub hopper: bool,
    pub hpc: usize,
}

impl Device {
    /// The decode's launch on `path` for `s` (`ptrs`: q, k, v): the Hopper kernel where
    /// [`sm90_applies`], with its query heads per CTA counted in the plan's rows and chunks of
    /// whole 64-key sub-tiles; the sm_80 kernel otherwise.
    pub fn decode_launch(
        &self,
        path: KernelPath,
        s: &AttnShape,
        ptrs: &[u64],
    ) -> Result<DecodeLaunch> {
        let sms = self
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        let hopper = path == KernelPath::Sm90 && sm90_applies(s, ptrs);
        let hpc = if hopper {
            decode_heads_per_cta(s.nh / s.nkv)
        } else {
            1
        };
        let vec = vectorizable(s.hd, &ptrs[1..]);
        let mut plan = decode_plan(s.b * s.nh * s.tq / hpc, s.tk, s.hd, vec, sms);
        if hopper {
            plan.chunk = plan.chunk.next_multiple_of(super::flash_sm90::DEC_KT);
            plan.nchunks = s.tk.max(1).div_ceil(plan.chunk);
        }
        Ok(DecodeLaunch { plan, hopper, hpc })
    }

    /// Causal GQA attention forward on tensor cores: q `[B, Tq, nh, hd]`, k/v
    /// `[B, Tk_stride, nkv, hd]`, out like q (all bf16), `lse [B, nh, Tq]` (f32, natural log)
    /// for the backward. On [`Device::kernel_path`].
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_fwd(
        &self,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        s: AttnShape,
        out: &mut impl DeviceWrite<bf16>,
        lse: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        self.flash_attention_fwd_on(self.kernel_path(), q, k, v, s, out, lse)
    }

    /// [`Device::flash_attention_fwd`] on the given path (tests and benchmarks compare the two).
    /// [`KernelPath::Sm90`] runs the Hopper kernel (kernels/flash_attention_sm90.cu) where
    /// [`sm90_applies`] (head dims 64 and 128, 16-byte aligned buffers) and the sm_80 kernels
    /// otherwise; it is an error on a GPU other than compute capability 9.0.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_fwd_on(
        &self,
        path: KernelPath,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        s: AttnShape,
        out: &mut impl DeviceWrite<bf16>,
        lse: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        check(&s, q.len(), k.len(), v.len())?;
        ensure!(
            out.len() == q.len() && lse.len() == s.b * s.nh * s.tq,
            "flash attention: out/lse sizes do not match {s:?}"
        );
        let ptrs = [q.dptr(), k.dptr(), v.dptr(), out.dptr()];
        if path == KernelPath::Sm90 && sm90_applies(&s, &ptrs) {
            return self.flash_fwd_sm90(q.dptr(), k.dptr(), v.dptr(), out.dptr(), lse.dptr(), &s);
        }
        let d = dims(&s)?;
        let vec = vectorizable(s.hd, &[q.dptr(), k.dptr(), v.dptr(), out.dptr()]);
        let var = select(Pass::Fwd, s.hd, vec)?;
        let scale_log2 = std::f32::consts::LOG2_E / (s.hd as f32).sqrt();
        launch_variant!(self, var, (g(s.tq.div_ceil(var.rows)), g(s.nh), g(s.b));
            q.dptr(), k.dptr(), v.dptr(), out.dptr(), lse.dptr(),
            d.tq, d.tk, d.stride, d.nh, d.nkv, d.hd, scale_log2, vec as i32)
    }

    /// Flash attention backward: `dq` like q, `dk`/`dv` like k/v (zero past `tk`), from the
    /// forward's `out` and `lse` and the output gradient `dout`. Three launches: D = rowsum(dO*O),
    /// dK/dV per key tile, dQ per query tile. Deterministic (no atomics). On
    /// [`Device::kernel_path`].
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_bwd(
        &self,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        out: &impl DeviceRead<bf16>,
        lse: &impl DeviceRead<f32>,
        dout: &impl DeviceRead<bf16>,
        s: AttnShape,
        dq: &mut impl DeviceWrite<bf16>,
        dk: &mut impl DeviceWrite<bf16>,
        dv: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        self.flash_attention_bwd_on(self.kernel_path(), q, k, v, out, lse, dout, s, dq, dk, dv)
    }

    /// [`Device::flash_attention_bwd`] on the given path: [`KernelPath::Sm90`] runs the Hopper
    /// dK/dV and dQ kernels (kernels/flash_attention_sm90.cu) where [`sm90_applies`], the sm_80
    /// kernels otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_bwd_on(
        &self,
        path: KernelPath,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        out: &impl DeviceRead<bf16>,
        lse: &impl DeviceRead<f32>,
        dout: &impl DeviceRead<bf16>,
        s: AttnShape,
        dq: &mut impl DeviceWrite<bf16>,
        dk: &mut impl DeviceWrite<bf16>,
        dv: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check(&s, q.len(), k.len(), v.len())?;
        ensure!(
            out.len() == q.len()
                && dout.len() == q.len()
                && dq.len() == q.len()
                && lse.len() == s.b * s.nh * s.tq,
            "flash attention backward: out/dout/dq/lse sizes do not match {s:?}"
        );
        ensure!(
            dk.len() == k.len() && dv.len() == v.len(),
            "flash attention backward: dk/dv sizes do not match {s:?}"
        );
        ensure!(
            s.nkv <= MAX_GRID_YZ,
            "flash attention backward: kv heads {} above {MAX_GRID_YZ}",
            s.nkv
        );
        let d = dims(&s)?;
        let b = int(s.b, "batch")?;
        let scale = 1.0 / (s.hd as f32).sqrt();
        let delta = self.alloc::<f32>(s.b * s.nh * s.tq)?;
        launch!(self, "flash_attention", "flash_bwd_delta_bf16", (blocks_for(s.b * s.nh * s.tq, BLOCK / 32), 1, 1), BLOCK;
            out.dptr(), dout.dptr(), delta.dptr(), b, d.tq, d.nh, d.hd)?;
        let ptrs = [
            q.dptr(),
            k.dptr(),
            v.dptr(),
            dout.dptr(),
            dq.dptr(),
            dk.dptr(),
            dv.dptr(),
        ];
        if path == KernelPath::Sm90 && sm90_applies(&s, &ptrs) {
            let g = super::flash_sm90::BwdPtrs {
                q: q.dptr(),
                k: k.dptr(),
                v: v.dptr(),
                dout: dout.dptr(),
                lse: lse.dptr(),
                delta: delta.dptr(),
                dq: dq.dptr(),
                dk: dk.dptr(),
                dv: dv.dptr(),
            };
            return self.flash_bwd_sm90(&g, &s);
        }
        let vec = vectorizable(
            s.hd,
            &[
                q.dptr(),
                k.dptr(),
                v.dptr(),
                dout.dptr(),
                dq.dptr(),
                dk.dptr(),
                dv.dptr(),
            ],
        );
        let kv = select(Pass::BwdDkdv, s.hd, vec)?;
        launch_variant!(self, kv, (g(s.tk_stride.div_ceil(kv.rows)), g(s.nkv), g(s.b));
            q.dptr(), k.dptr(), v.dptr(), dout.dptr(), lse.dptr(), delta.dptr(), dk.dptr(), dv.dptr(),
            d.tq, d.tk, d.stride, d.nh, d.nkv, d.hd, scale, vec as i32)?;
        let qv = select(Pass::BwdDq, s.hd, vec)?;
        launch_variant!(self, qv, (g(s.tq.div_ceil(qv.rows)), g(s.nh), g(s.b));
            q.dptr(), k.dptr(), v.dptr(), dout.dptr(), lse.dptr(), delta.dptr(), dq.dptr(),
            d.tq, d.tk, d.stride, d.nh, d.nkv, d.hd, scale, vec as i32)
    }

    /// Decode attention: the `Tq` newest positions (usually 1) of each sequence against its KV
    /// cache (`tk` valid of `tk_stride` slots), split over the cache in chunks (one CTA per
    /// chunk and query row, for one head, or on the Hopper kernel up to four heads of a KV head)
    /// and merged by a second kernel. Same outputs as
    /// [`Device::flash_attention_fwd`]; meant for small `Tq` (each row reads its keys once). On
    /// [`Device::kernel_path`].
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_decode(
        &self,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        s: AttnShape,
        out: &mut impl DeviceWrite<bf16>,
        lse: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        self.flash_attention_decode_on(self.kernel_path(), q, k, v, s, out, lse)
    }

    /// [`Device::flash_attention_decode`] on the given path: [`KernelPath::Sm90`] stages each
    /// chunk's keys in shared memory by TMA (kernels/flash_attention_sm90.cu) where
    /// [`sm90_applies`], the sm_80 split kernel otherwise; both use the same plan and combine.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_decode_on(
        &self,
        path: KernelPath,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        s: AttnShape,
        out: &mut impl DeviceWrite<bf16>,
        lse: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        check(&s, q.len(), k.len(), v.len())?;
        ensure!(
            out.len() == q.len() && lse.len() == s.b * s.nh * s.tq,
            "flash decode: out/lse sizes do not match {s:?}"
        );
        ensure!(
            s.nh * s.tq <= MAX_GRID_YZ,
            "flash decode: heads x new tokens = {} above {MAX_GRID_YZ}",
            s.nh * s.tq
        );
        if s.b * s.tq == 0 {
            return Ok(());
        }
        let d = dims(&s)?;
        let rows = s.b * s.nh * s.tq;
        let DecodeLaunch { plan, hopper, hpc } =
            self.decode_launch(path, &s, &[q.dptr(), k.dptr(), v.dptr()])?;
        let part_o = self.alloc::<f32>(rows * plan.nchunks * s.hd)?;
        let part_ml = self.alloc::<f32>(rows * plan.nchunks * 2)?;
        let (chunk, nchunks) = (
            int(plan.chunk, "decode chunk")?,
            int(plan.nchunks, "decode chunks")?,
        );
        let scale_log2 = std::f32::consts::LOG2_E / (s.hd as f32).sqrt();
        if hopper {
            self.flash_decode_sm90(
                q.dptr(),
                k.dptr(),
                v.dptr(),
                part_o.dptr(),
                part_ml.dptr(),
                &s,
                hpc,
                plan.chunk,
                plan.nchunks,
            )?;
            return launch!(self, "flash_attention", "flash_decode_combine_bf16", (blocks_for(rows, BLOCK / 32), 1, 1), BLOCK;
                part_o.dptr(), part_ml.dptr(), out.dptr(), lse.dptr(), int(s.b, "batch")?, d.tq, d.nh, d.hd, nchunks);
        }
        let split = Variant {
            pass: Pass::Fwd,
            kernel: plan.kernel,
            hd: s.hd,
            exact: false,
            rows: 1,
            stream: plan.chunk,
            threads: DECODE_THREADS,
            smem: 0,
        };
        launch_variant!(self, split, (g(plan.nchunks), g(s.nh * s.tq), g(s.b));
            q.dptr(), k.dptr(), v.dptr(), part_o.dptr(), part_ml.dptr(),
            d.tq, d.tk, d.stride, d.nh, d.nkv, d.hd, chunk, nchunks, scale_log2)?;
        launch!(self, "flash_attention", "flash_decode_combine_bf16", (blocks_for(rows, BLOCK / 32), 1, 1), BLOCK;
            part_o.dptr(), part_ml.dptr(), out.dptr(), lse.dptr(), int(s.b, "batch")?, d.tq, d.nh, d.hd, nchunks)
    }
}
