//! Grouped expert GEMM wrappers (kernels/grouped_gemm.cu): one launch runs every expert's GEMM
//! over its contiguous segment of the expert-permuted rows (`offsets [e+1]` from
//! [`Device::moe_permutation`]: expert e's rows are `offsets[e]..offsets[e+1]`), and
//! [`bench_grouped`], the TFLOP/s measurement behind `flexrun bench moe --device cuda`.
//!
//! CPU reference: per expert, `model::swiglu_ffn` (`ops::linear` + `ops::swiglu`) on the rows
//! `ops::gather_rows` picks. Test: tests/gpu_grouped.rs.
//!
//! The MoE FFN on the permuted rows `xp [m, h]` with the stacked expert weights in the HF layout
//! (`wg`, `wu [e, i, h]`, `wd [e, h, i]`, bf16):
//! - forward: [`Device::grouped_gateup_fwd`] (act, and the saved gate/up), then
//!   [`Device::grouped_nt`] (`y = act @ wd_e^T`);
//! - backward from `dy [m, h]`: [`Device::grouped_nn_swiglu_bwd`] (dgate, dup),
//!   [`Device::grouped_nn`] with the second pair (`dxp = dgate @ wg_e + dup @ wu_e`),
//!   [`Device::grouped_wgrad`] twice (`dwd = dy^T act`; `dwg, dwu` from `dgate, dup` and `xp` in
//!   one launch), with a per-expert mask that skips frozen experts.
//!
//! Every width must be a multiple of 8 and every bf16 operand 16-byte aligned (the kernels copy
//! 16-byte chunks); f32 gradients must be 8-byte aligned. The offsets are read on the device
//! only (no synchronisation): they must be non-decreasing with `offsets[e] <= m` (the kernels
//! clamp rows to `0..m`, so bad offsets give wrong results, never out-of-bounds accesses). Rows
//! outside `offsets[0]..offsets[e]` of an output are not written.

use super::{int, launch, Device, DeviceRead, DeviceWrite, View, ViewMut};
use crate::ensure;
use crate::error::{Error, Result};
use half::bf16;
use serde::Serialize;

/// Most experts one launch handles (the device-side scheduler scans two experts per lane of one
/// warp); kernels/grouped_gemm.cu MAX_EXPERTS.
pub const GROUPED_MAX_EXPERTS: usize = 64;
/// CTA tile rows and columns of the kernels (grouped_gemm.cu BM, BN).
const TILE_M: usize = 128;
const TILE_N: usize = 128;
/// Intermediate columns per CTA of the fused gate/up kernel (64 gate + 64 up), GATEUP_BN.
const GATEUP_TILE_N: usize = 64;
/// Threads per CTA (grouped_gemm.cu THREADS).
const THREADS: u32 = 256;
/// Dynamic shared memory per CTA (grouped_gemm.cu SMEM_BYTES): STAGES (4) stages of two
/// [128, BK + 8] bf16 operand tiles with BK = 32.
const SMEM_BYTES: usize = 4 * 2 * 128 * (32 + 8) * 2;

fn check_width(x: usize, what: &str) -> Result<()> {
    ensure!(
        x > 0 && x.is_multiple_of(8),
        "grouped GEMM: {what} = {x} must be a positive multiple of 8"
    );
    Ok(())
}

fn check_align(ptr: u64, align: u64, what: &str) -> Result<()> {
    ensure!(
        ptr.is_multiple_of(align),
        "grouped GEMM: {what} at {ptr:#x} is not {align}-byte aligned"
    );
    Ok(())
}

fn check_experts(e: usize, offsets: &impl DeviceRead<u32>) -> Result<()> {
    ensure!(
        (1..=GROUPED_MAX_EXPERTS).contains(&e),
        "grouped GEMM: {e} experts (1..={GROUPED_MAX_EXPERTS} supported)"
    );
    ensure!(
        offsets.len() == e + 1,
        "grouped GEMM: offsets hold {}, not {} experts + 1",
        offsets.len(),
        e
    );
    Ok(())
}

/// Rows of a `[m, width]` operand, or an error when its length is not a multiple of the width.
fn rows_of(len: usize, width: usize, what: &str) -> Result<usize> {
    ensure!(
        len.is_multiple_of(width),
        "grouped GEMM: {what} holds {len} values, not rows of {width}"
    );
    Ok(len / width)
}

/// Grid of the offset-scheduled kernels: an upper bound on the tiles, `(ceil(m/128) + e) * n_tiles`
/// (sum over experts of ceil(rows_e / 128) < m/128 + e), so the offsets never go to the host.
fn sched_grid(m: usize, e: usize, n_tiles: usize) -> Result<(u32, u32, u32)> {
    let x = (m.div_ceil(TILE_M) + e) * n_tiles;
    ensure!(
        x <= i32::MAX as usize,
        "grouped GEMM: {x} tiles exceed the grid limit"
    );
    Ok((x as u32, 1, 1))
}

impl Device {
    /// Fused gate/up projection and SwiGLU per expert segment:
    /// `act[seg] = silu(x[seg] wg_e^T) * (x[seg] wu_e^T)`. x `[m, h]`, wg / wu `[e, i, h]`,
    /// act `[m, i]` (all bf16); `saved = Some((gate, up))` also stores the pre-activations
    /// `[m, i]` that [`Device::grouped_nn_swiglu_bwd`] needs (None for inference).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gateup_fwd(
        &self,
        x: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        wg: &impl DeviceRead<bf16>,
        wu: &impl DeviceRead<bf16>,
        e: usize,
        h: usize,
        i: usize,
        act: &mut impl DeviceWrite<bf16>,
        saved: Option<(ViewMut<'_, bf16>, ViewMut<'_, bf16>)>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(h, "hidden")?;
        check_width(i, "intermediate")?;
        let m = rows_of(x.len(), h, "x")?;
        ensure!(
            wg.len() == e * i * h && wu.len() == e * i * h,
            "grouped gate/up: weights are not [{e}, {i}, {h}]"
        );
        ensure!(
            act.len() == m * i,
            "grouped gate/up: act holds {}, not [{m}, {i}]",
            act.len()
        );
        let (gp, up) = match &saved {
            Some((g, u)) => {
                ensure!(
                    g.len() == m * i && u.len() == m * i,
                    "grouped gate/up: saved gate/up are not [{m}, {i}]"
                );
                (g.dptr(), u.dptr())
            }
            None => (0, 0),
        };
        for (p, what) in [
            (x.dptr(), "x"),
            (wg.dptr(), "wg"),
            (wu.dptr(), "wu"),
            (act.dptr(), "act"),
            (gp, "gate"),
            (up, "up"),
        ] {
            check_align(p, 16, what)?;
        }
        let grid = sched_grid(m, e, i.div_ceil(GATEUP_TILE_N))?;
        launch!(self, "grouped_gemm", "grouped_gateup_fwd_bf16", grid, THREADS, smem = SMEM_BYTES;
            x.dptr(), wg.dptr(), wu.dptr(), offsets.dptr(), act.dptr(), gp, up, int(m, "rows")?, int(e, "experts")?,
            int(h, "hidden")?, int(i, "intermediate")?)
    }

    /// `y[seg] = a[seg] w_e^T` per expert segment: a `[m, k]`, w `[e, n, k]`, y `[m, n]` (bf16).
    /// The down projection's forward (k = I, n = H).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nt(
        &self,
        a: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        w: &impl DeviceRead<bf16>,
        e: usize,
        k: usize,
        n: usize,
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(k, "k")?;
        check_width(n, "n")?;
        let m = rows_of(a.len(), k, "a")?;
        ensure!(
            w.len() == e * n * k,
            "grouped NT: weights are not [{e}, {n}, {k}]"
        );
        ensure!(
            y.len() == m * n,
            "grouped NT: output holds {}, not [{m}, {n}]",
            y.len()
        );
        for (p, what) in [(a.dptr(), "a"), (w.dptr(), "w"), (y.dptr(), "y")] {
            check_align(p, 16, what)?;
        }
        let grid = sched_grid(m, e, n.div_ceil(TILE_N))?;
        launch!(self, "grouped_gemm", "grouped_nt_bf16", grid, THREADS, smem = SMEM_BYTES;
            a.dptr(), w.dptr(), offsets.dptr(), y.dptr(), int(m, "rows")?, int(e, "experts")?, int(k, "k")?, int(n, "n")?)
    }

    /// Input gradient per expert segment: `dx[seg] = dy[seg] w_e (+ dy2[seg] w2_e)`: dy `[m, k]`,
    /// w `[e, k, n]` (the forward's weight, HF layout `[out, in]` with k = out), dx `[m, n]`.
    /// `second = Some((dy2, w2))` adds a second product in the same pass (gate and up:
    /// `dxp = dgate wg_e + dup wu_e`).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nn(
        &self,
        dy: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        w: &impl DeviceRead<bf16>,
        second: Option<(View<'_, bf16>, View<'_, bf16>)>,
        e: usize,
        k: usize,
        n: usize,
        dx: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(k, "k")?;
        check_width(n, "n")?;
        let m = rows_of(dy.len(), k, "dy")?;
        ensure!(
            w.len() == e * k * n,
            "grouped NN: weights are not [{e}, {k}, {n}]"
        );
        ensure!(
            dx.len() == m * n,
            "grouped NN: output holds {}, not [{m}, {n}]",
            dx.len()
        );
        let (dy2, w2) = match &second {
            Some((d2, w2)) => {
                ensure!(
                    d2.len() == m * k && w2.len() == e * k * n,
                    "grouped NN: the second pair is not [{m}, {k}] x [{e}, {k}, {n}]"
                );
                (d2.dptr(), w2.dptr())
            }
            None => (0, 0),
        };
        for (p, what) in [
            (dy.dptr(), "dy"),
            (w.dptr(), "w"),
            (dy2, "dy2"),
            (w2, "w2"),
            (dx.dptr(), "dx"),
        ] {
            check_align(p, 16, what)?;
        }
        let grid = sched_grid(m, e, n.div_ceil(TILE_N))?;
        launch!(self, "grouped_gemm", "grouped_nn_bf16", grid, THREADS, smem = SMEM_BYTES;
            dy.dptr(), w.dptr(), dy2, w2, offsets.dptr(), dx.dptr(), int(m, "rows")?, int(e, "experts")?,
            int(k, "k")?, int(n, "n")?)
    }

    /// Backward through the down projection and the SwiGLU in one pass:
    /// `da = dy[seg] wd_e` (f32, not stored), then `dgate`, `dup` from the saved `gate`, `up`.
    /// dy `[m, h]`, wd `[e, h, i]`, gate / up / dgate / dup `[m, i]` (bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_nn_swiglu_bwd(
        &self,
        dy: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        wd: &impl DeviceRead<bf16>,
        gate: &impl DeviceRead<bf16>,
        up: &impl DeviceRead<bf16>,
        e: usize,
        h: usize,
        i: usize,
        dgate: &mut impl DeviceWrite<bf16>,
        dup: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(h, "hidden")?;
        check_width(i, "intermediate")?;
        let m = rows_of(dy.len(), h, "dy")?;
        ensure!(
            wd.len() == e * h * i,
            "grouped SwiGLU backward: down weights are not [{e}, {h}, {i}]"
        );
        ensure!(
            gate.len() == m * i && up.len() == m * i && dgate.len() == m * i && dup.len() == m * i,
            "grouped SwiGLU backward: gate/up/dgate/dup are not [{m}, {i}]"
        );
        for (p, what) in [
            (dy.dptr(), "dy"),
            (wd.dptr(), "wd"),
            (gate.dptr(), "gate"),
            (up.dptr(), "up"),
            (dgate.dptr(), "dgate"),
            (dup.dptr(), "dup"),
        ] {
            check_align(p, 16, what)?;
        }
        let grid = sched_grid(m, e, i.div_ceil(TILE_N))?;
        launch!(self, "grouped_gemm", "grouped_nn_swiglu_bwd_bf16", grid, THREADS, smem = SMEM_BYTES;
            dy.dptr(), wd.dptr(), gate.dptr(), up.dptr(), offsets.dptr(), dgate.dptr(), dup.dptr(), int(m, "rows")?,
            int(e, "experts")?, int(h, "k")?, int(i, "n")?)
    }

    /// Weight gradients per expert: `dw[e] (+)= dy[seg]^T x[seg]` (f32 `[e, n, k]`), dy `[m, n]`,
    /// x `[m, k]` (bf16). `second = Some((dy2, dw2))` computes `dw2` from `dy2` with the same x in
    /// the same launch (gate and up). `mask` (`[e]`, nonzero = trainable; None = all) skips frozen
    /// experts: their slices of dw / dw2 are not touched. A trainable expert with no rows gets
    /// zeros, or is left as is with `accumulate` (which adds into dw instead of overwriting).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_wgrad(
        &self,
        dy: &impl DeviceRead<bf16>,
        x: &impl DeviceRead<bf16>,
        offsets: &impl DeviceRead<u32>,
        mask: Option<View<'_, u32>>,
        second: Option<(View<'_, bf16>, ViewMut<'_, f32>)>,
        e: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        dw: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        check_experts(e, offsets)?;
        check_width(n, "n")?;
        check_width(k, "k")?;
        let m = rows_of(dy.len(), n, "dy")?;
        ensure!(
            x.len() == m * k,
            "grouped weight gradient: x holds {}, not [{m}, {k}]",
            x.len()
        );
        ensure!(
            dw.len() == e * n * k,
            "grouped weight gradient: dw holds {}, not [{e}, {n}, {k}]",
            dw.len()
        );
        let (dy2, dw2, problems) = match &second {
            Some((d2, w2)) => {
                ensure!(
                    d2.len() == m * n && w2.len() == e * n * k,
                    "grouped weight gradient: the second pair is not [{m}, {n}] -> [{e}, {n}, {k}]"
                );
                (d2.dptr(), w2.dptr(), 2)
            }
            None => (0, 0, 1),
        };
        let mp = match &mask {
            Some(v) => {
                ensure!(
                    v.len() == e,
                    "grouped weight gradient: mask holds {}, not {e}",
                    v.len()
                );
                v.dptr()
            }
            None => 0,
        };
        for (p, what) in [(dy.dptr(), "dy"), (x.dptr(), "x"), (dy2, "dy2")] {
            check_align(p, 16, what)?;
        }
        check_align(dw.dptr(), 8, "dw")?;
        check_align(dw2, 8, "dw2")?;
        let tiles = n.div_ceil(TILE_M) * k.div_ceil(TILE_N);
        ensure!(
            tiles <= i32::MAX as usize,
            "grouped weight gradient: {tiles} tiles exceed the grid limit"
        );
        launch!(self, "grouped_gemm", "grouped_wgrad_f32", (tiles as u32, e as u32, problems), THREADS, smem = SMEM_BYTES;
            dy.dptr(), x.dptr(), dy2, dw.dptr(), dw2, offsets.dptr(), mp, int(m, "rows")?, int(e, "experts")?,
            int(n, "n")?, int(k, "k")?, i32::from(accumulate))
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark.

/// One timed operation of [`bench_grouped`].
#[derive(Serialize, Debug, Clone)]
pub struct GroupedOpTime {
    pub op: &'static str,
    /// Mean milliseconds per call over the timed iterations (CUDA events around all of them).
    pub ms: f64,
    pub flops: f64,
    pub tflops: f64,
}

/// Result of [`bench_grouped`] (JSON for `flexrun bench moe --json`).
#[derive(Serialize, Debug, Clone)]
pub struct GroupedBench {
    pub framework: &'static str,
    pub device: String,
    pub experts: usize,
    pub tokens_per_expert: usize,
    pub hidden: usize,
    pub intermediate: usize,
    /// Rows of the permuted layout (experts x tokens per expert).
    pub rows: usize,
    pub iters: usize,
    /// The grouped kernels one by one, then the totals, then the cuBLAS baselines.
    pub ops: Vec<GroupedOpTime>,
    /// Forward (gate/up + down) of the grouped kernels.
    pub fwd_tflops: f64,
    /// Forward + backward (input and weight gradients) of the grouped kernels.
    pub fwd_bwd_tflops: f64,
    /// Forward as a per-expert loop of cuBLAS GEMMs plus the SwiGLU kernel.
    pub cublas_loop_fwd_tflops: f64,
    /// Forward as dense cuBLAS GEMMs of the same total size (every row through expert 0).
    pub cublas_dense_fwd_tflops: f64,
}

/// Elements of the random pattern tiled over the benchmark's buffers.
const BENCH_PATTERN: usize = 1 << 20;

/// Fill `buf` with copies of `pattern` (device-to-device: no host copy of a large buffer).
fn fill_tiled<T: super::DeviceType>(
    dev: &Device,
    buf: &mut super::Buf<T>,
    pattern: &super::Buf<T>,
) -> Result<()> {
    let (len, p) = (buf.len(), pattern.len());
    let mut s = 0;
    while s < len {
        let c = p.min(len - s);
        dev.copy(&pattern.view(..c), &mut buf.view_mut(s..s + c))?;
        s += c;
    }
    Ok(())
}

/// Mean milliseconds of `f` over `iters` calls after `warmup` calls, timed with CUDA events.
fn time_ms(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    use cudarc::driver::sys::CUevent_flags;
    for _ in 0..warmup {
        f()?;
    }
    let start = dev
        .stream()
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..iters {
        f()?;
    }
    let end = dev
        .stream()
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)? as f64;
    dev.synchronize()?;
    Ok(ms / iters as f64)
}

fn op(name: &'static str, ms: f64, flops: f64) -> GroupedOpTime {
    GroupedOpTime {
        op: name,
        ms,
        flops,
        tflops: flops / (ms * 1e-3) / 1e12,
    }
}

/// TFLOP/s of the grouped expert GEMMs for `e` experts with `tokens_per_expert` rows each (a
/// uniform routing; the offsets are `j * tokens_per_expert`), hidden `h`, intermediate `i`:
/// every kernel alone, forward and forward + backward totals, and two cuBLAS baselines of the
/// forward (a per-expert loop, and dense GEMMs of the same total size). Buffers hold a tiled
/// random pattern (values do not change the timing). FLOPs: forward 6 m h i, backward 12 m h i
/// (m = e * tokens_per_expert).
pub fn bench_grouped(
    dev: &Device,
    e: usize,
    tokens_per_expert: usize,
    h: usize,
    i: usize,
    iters: usize,
    warmup: usize,
) -> Result<GroupedBench> {
    ensure!(iters > 0, "bench moe: --iters must be positive");
    ensure!(
        tokens_per_expert > 0,
        "bench moe: --tokens-per-expert must be positive"
    );
    check_width(h, "hidden")?;
    check_width(i, "intermediate")?;
    ensure!(
        (1..=GROUPED_MAX_EXPERTS).contains(&e),
        "bench moe: {e} experts (1..={GROUPED_MAX_EXPERTS})"
    );
    let m = e * tokens_per_expert;
    let offsets_host: Vec<u32> = (0..=e)
        .map(|j| {
            u32::try_from(j * tokens_per_expert)
                .map_err(|_| Error(format!("bench moe: {m} rows are too many")))
        })
        .collect::<Result<_>>()?;
    let offsets = dev.upload(&offsets_host)?;

    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(0);
    let pat: Vec<bf16> = (0..BENCH_PATTERN)
        .map(|_| bf16::from_f32(rng.random_range(-0.05f32..0.05)))
        .collect();
    let pat = dev.upload(&pat)?;
    let randbuf = |len: usize| -> Result<super::Buf<bf16>> {
        let mut b = dev.alloc::<bf16>(len)?;
        fill_tiled(dev, &mut b, &pat)?;
        Ok(b)
    };
    let x = randbuf(m * h)?;
    let dy = randbuf(m * h)?;
    let wg = randbuf(e * i * h)?;
    let wu = randbuf(e * i * h)?;
    let wd = randbuf(e * h * i)?;
    let mut act = dev.alloc::<bf16>(m * i)?;
    let mut gate = dev.alloc::<bf16>(m * i)?;
    let mut up = dev.alloc::<bf16>(m * i)?;
    let mut y = dev.alloc::<bf16>(m * h)?;
    let mut dgate = dev.alloc::<bf16>(m * i)?;
    let mut dup = dev.alloc::<bf16>(m * i)?;
    let mut dx = dev.alloc::<bf16>(m * h)?;
    let mut dwg = dev.alloc::<f32>(e * i * h)?;
    let mut dwu = dev.alloc::<f32>(e * i * h)?;
    let mut dwd = dev.alloc::<f32>(e * h * i)?;

    let mhi = (m * h * i) as f64;
    let mut ops = Vec::new();
    // The forward: gate/up (2 GEMMs of m x i x h) and down (m x h x i).
    let gu = time_ms(dev, warmup, iters, || {
        dev.grouped_gateup_fwd(
            &x,
            &offsets,
            &wg,
            &wu,
            e,
            h,
            i,
            &mut act,
            Some((gate.view_mut(..), up.view_mut(..))),
        )
    })?;
    ops.push(op("gateup_fwd", gu, 4.0 * mhi));
    let down = time_ms(dev, warmup, iters, || {
        dev.grouped_nt(&act, &offsets, &wd, e, i, h, &mut y)
    })?;
    ops.push(op("down_fwd", down, 2.0 * mhi));
    let sbwd = time_ms(dev, warmup, iters, || {
        dev.grouped_nn_swiglu_bwd(
            &dy, &offsets, &wd, &gate, &up, e, h, i, &mut dgate, &mut dup,
        )
    })?;
    ops.push(op("down_dact_swiglu_bwd", sbwd, 2.0 * mhi));
    let dxt = time_ms(dev, warmup, iters, || {
        dev.grouped_nn(
            &dgate,
            &offsets,
            &wg,
            Some((dup.as_view(), wu.as_view())),
            e,
            i,
            h,
            &mut dx,
        )
    })?;
    ops.push(op("gateup_dx", dxt, 4.0 * mhi));
    let wdt = time_ms(dev, warmup, iters, || {
        dev.grouped_wgrad(&dy, &act, &offsets, None, None, e, h, i, false, &mut dwd)
    })?;
    ops.push(op("down_dw", wdt, 2.0 * mhi));
    let wgt = time_ms(dev, warmup, iters, || {
        dev.grouped_wgrad(
            &dgate,
            &x,
            &offsets,
            None,
            Some((dup.as_view(), dwu.view_mut(..))),
            e,
            i,
            h,
            false,
            &mut dwg,
        )
    })?;
    ops.push(op("gateup_dw", wgt, 4.0 * mhi));
    let fwd = gu + down;
    let all = fwd + sbwd + dxt + wdt + wgt;
    ops.push(op("total_fwd", fwd, 6.0 * mhi));
    ops.push(op("total_fwd_bwd", all, 18.0 * mhi));

    // cuBLAS baselines of the forward, into the same buffers.
    let tpe = tokens_per_expert;
    let loop_fwd = time_ms(dev, warmup, iters, || {
        for j in 0..e {
            let xs = x.view(j * tpe * h..(j + 1) * tpe * h);
            let wgj = wg.view(j * i * h..(j + 1) * i * h);
            let wuj = wu.view(j * i * h..(j + 1) * i * h);
            dev.gemm(
                tpe,
                i,
                h,
                &xs,
                false,
                &wgj,
                true,
                &mut gate.view_mut(j * tpe * i..(j + 1) * tpe * i),
                false,
            )?;
            dev.gemm(
                tpe,
                i,
                h,
                &xs,
                false,
                &wuj,
                true,
                &mut up.view_mut(j * tpe * i..(j + 1) * tpe * i),
                false,
            )?;
        }
        dev.swiglu_fwd(&gate, &up, &mut act)?;
        for j in 0..e {
            let a = act.view(j * tpe * i..(j + 1) * tpe * i);
            let wdj = wd.view(j * h * i..(j + 1) * h * i);
            dev.gemm(
                tpe,
                h,
                i,
                &a,
                false,
                &wdj,
                true,
                &mut y.view_mut(j * tpe * h..(j + 1) * tpe * h),
                false,
            )?;
        }
        Ok(())
    })?;
    ops.push(op("cublas_loop_fwd", loop_fwd, 6.0 * mhi));
    let dense_fwd = time_ms(dev, warmup, iters, || {
        let (wg0, wu0, wd0) = (wg.view(..i * h), wu.view(..i * h), wd.view(..h * i));
        dev.gemm(m, i, h, &x, false, &wg0, true, &mut gate, false)?;
        dev.gemm(m, i, h, &x, false, &wu0, true, &mut up, false)?;
        dev.gemm(m, h, i, &act, false, &wd0, true, &mut y, false)
    })?;
    ops.push(op("cublas_dense_fwd", dense_fwd, 6.0 * mhi));

    let tf = |ms: f64, flops: f64| flops / (ms * 1e-3) / 1e12;
    Ok(GroupedBench {
        framework: "flexrun-cuda",
        device: dev.name()?,
        experts: e,
        tokens_per_expert,
        hidden: h,
        intermediate: i,
        rows: m,
        iters,
        fwd_tflops: tf(fwd, 6.0 * mhi),
        fwd_bwd_tflops: tf(all, 18.0 * mhi),
        cublas_loop_fwd_tflops: tf(loop_fwd, 6.0 * mhi),
        cublas_dense_fwd_tflops: tf(dense_fwd, 6.0 * mhi),
        ops,
    })
}
