//! `flexrun bench moe`: TFLOP/s of the grouped expert GEMM kernels (forward and backward) next to
//! cuBLAS per-expert loops and one dense GEMM, on the GPU.

use crate::backend::cuda::grouped::{check_width, GROUPED_MAX_EXPERTS};
use crate::backend::cuda::*;
use crate::ensure;
use crate::error::{Error, Result};
use half::bf16;
use serde::Serialize;

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
    /// The grouped kernels' path: "sm80" (mma.sync) or "sm90" (wgmma forward, FLEXRUN_SM90=1).
    pub path: &'static str,
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
fn fill_tiled<T: DeviceType>(dev: &Device, buf: &mut Buf<T>, pattern: &Buf<T>) -> Result<()> {
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
    crate::limits::check_dim("--iters", iters, 1 << 20, "far beyond any benchmark")?;
    crate::limits::check_dim("--warmup", warmup, 1 << 20, "far beyond any benchmark")?;
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
    let randbuf = |len: usize| -> Result<Buf<bf16>> {
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
        path: match dev.kernel_path() {
            crate::backend::cuda::KernelPath::Sm80 => "sm80",
            crate::backend::cuda::KernelPath::Sm90 => "sm90",
        },
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
