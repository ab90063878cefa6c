//! `flexrun bench attention`: TFLOP/s of the flash attention kernels, forward and backward, on
//! the GPU.

use crate::backend::cuda::flash::{
    causal_attention_flops, select, sm90_applies, sm90_kernel, vectorizable, Pass,
};
use crate::backend::cuda::*;
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::Result;
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use serde::Serialize;

/// What `bench_attention` measures: causal training-shape attention (Tq = Tk = seq) with
/// `batch = max(1, tokens / seq)` sequences, so that every row does similar total work.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub seqs: Vec<usize>,
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    /// Timed launches per pass (after `warmup` untimed ones).
    pub iters: usize,
    pub warmup: usize,
}

impl Default for BenchConfig {
    /// FlashAttention-2's benchmark shape: 16k tokens per step, 16 heads of 128.
    fn default() -> Self {
        BenchConfig {
            seqs: vec![1024, 2048, 4096, 8192, 16384],
            tokens: 16384,
            heads: 16,
            kv_heads: 16,
            hd: 128,
            iters: 10,
            warmup: 2,
        }
    }
}

/// One measured shape. Times are means over the timed launches (CUDA events on the device's
/// stream); TFLOP/s use [`causal_attention_flops`] (backward = 2.5x forward).
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub seq: usize,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub fwd_tflops: f64,
    pub bwd_tflops: f64,
    pub fwd_kernel: &'static str,
    /// The device's kernel path: "sm80" or "sm90" (the Hopper forward, FLEXRUN_SM90=1).
    pub path: &'static str,
}

/// Mean milliseconds of `f` over `iters` launches after `warmup` untimed ones.
fn time_ms(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let ctx = dev.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(dev.stream())?;
    for _ in 0..iters {
        f()?;
    }
    end.record(dev.stream())?;
    let ms = start.elapsed_ms(&end)? as f64;
    Ok(ms / iters.max(1) as f64)
}

/// Forward and backward throughput of the flash kernels at each sequence length of `cfg`
/// (random bf16 inputs; the backward includes the D = rowsum(dO * O) pass).
pub fn bench_attention(dev: &Device, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    ensure!(cfg.iters > 0, "attention bench: iters must be positive");
    crate::limits::check_dim("--iters", cfg.iters, 1 << 20, "far beyond any benchmark")?;
    crate::limits::check_dim("--warmup", cfg.warmup, 1 << 20, "far beyond any benchmark")?;
    ensure!(
        !cfg.seqs.is_empty() && cfg.seqs.iter().all(|&t| t > 0),
        "attention bench: sequence lengths must be positive"
    );
    let mut rows = Vec::new();
    for &seq in &cfg.seqs {
        let batch = (cfg.tokens / seq).max(1);
        let s = AttnShape {
            b: batch,
            tq: seq,
            tk: seq,
            tk_stride: seq,
            nh: cfg.heads,
            nkv: cfg.kv_heads,
            hd: cfg.hd,
        };
        let (nq, nk) = (
            batch * seq * cfg.heads * cfg.hd,
            batch * seq * cfg.kv_heads * cfg.hd,
        );
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seq as u64;
        // Uniform in [-2, 2): values only matter for not overflowing.
        let mut rand = |n: usize| -> Vec<bf16> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    bf16::from_f32((state >> 40) as f32 / (1u64 << 22) as f32 - 2.0)
                })
                .collect()
        };
        let (q, k, v, dout) = (
            dev.upload(&rand(nq))?,
            dev.upload(&rand(nk))?,
            dev.upload(&rand(nk))?,
            dev.upload(&rand(nq))?,
        );
        let mut out = dev.alloc::<bf16>(nq)?;
        let mut lse = dev.alloc::<f32>(batch * cfg.heads * seq)?;
        let (mut dq, mut dk, mut dv) = (
            dev.alloc::<bf16>(nq)?,
            dev.alloc::<bf16>(nk)?,
            dev.alloc::<bf16>(nk)?,
        );
        let fwd_ms = time_ms(dev, cfg.warmup, cfg.iters, || {
            dev.flash_attention_fwd(&q, &k, &v, s, &mut out, &mut lse)
        })?;
        let bwd_ms = time_ms(dev, cfg.warmup, cfg.iters, || {
            dev.flash_attention_bwd(&q, &k, &v, &out, &lse, &dout, s, &mut dq, &mut dk, &mut dv)
        })?;
        let flops = causal_attention_flops(&s);
        let vec = vectorizable(s.hd, &[q.dptr(), k.dptr(), v.dptr(), out.dptr()]);
        rows.push(BenchRow {
            seq,
            batch,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            hd: cfg.hd,
            fwd_ms,
            bwd_ms,
            fwd_tflops: flops / (fwd_ms * 1e-3) / 1e12,
            bwd_tflops: 2.5 * flops / (bwd_ms * 1e-3) / 1e12,
            fwd_kernel: if dev.kernel_path() == KernelPath::Sm90
                && sm90_applies(&s, &[q.dptr(), k.dptr(), v.dptr(), out.dptr()])
            {
                sm90_kernel(s.hd)
            } else {
                select(Pass::Fwd, s.hd, vec)?.kernel
            },
            path: path_name(dev),
        });
    }
    Ok(rows)
}

/// What `bench_decode_attention` measures: one new token per sequence (the decode step's
/// attention) against a KV cache of each context length, for each batch size.
#[derive(Clone, Debug)]
pub struct DecodeConfig {
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub iters: usize,
    pub warmup: usize,
}

/// One measured (batch, context). The roofline: a decode step's attention must read the cache's
/// K and V once (`kv_bytes`); `fraction` is that over the time, against the copy bandwidth
/// (bytes read + written per second) measured in the same call.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    pub batch: usize,
    pub context: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub us: f64,
    pub kv_bytes: usize,
    pub gb_per_s: f64,
    pub copy_gb_per_s: f64,
    pub fraction: f64,
    /// Key chunks per query row (the split-KV plan).
    pub chunks: usize,
    /// The device's kernel path: "sm80" or "sm90" (the Hopper decode, FLEXRUN_SM90=1).
    pub path: &'static str,
}

/// Copy bandwidth on the GPU: bytes read + written per second of a 1 GiB device-to-device copy,
/// best of 5 (CUDA events).
pub fn copy_bandwidth(dev: &Device) -> Result<f64> {
    const BYTES: usize = 1 << 30;
    let a = dev.alloc::<u32>(BYTES / 4)?;
    let mut b = dev.alloc::<u32>(BYTES / 4)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        best = best.min(time_ms(dev, 1, 1, || dev.copy(&a, &mut b))?);
    }
    Ok(2.0 * BYTES as f64 / (best * 1e-3))
}

/// Split-KV decode attention throughput (`Device::flash_attention_decode`) at each batch and
/// context of `cfg`, against the copy bandwidth measured first.
pub fn bench_decode_attention(dev: &Device, cfg: &DecodeConfig) -> Result<Vec<DecodeRow>> {
    ensure!(
        cfg.iters > 0,
        "decode attention bench: iters must be positive"
    );
    crate::limits::check_dim("--iters", cfg.iters, 1 << 20, "far beyond any benchmark")?;
    crate::limits::check_dim("--warmup", cfg.warmup, 1 << 20, "far beyond any benchmark")?;
    ensure!(
        !cfg.batches.is_empty() && cfg.batches.iter().all(|&b| b > 0),
        "decode attention bench: batch sizes must be positive"
    );
    ensure!(
        !cfg.contexts.is_empty() && cfg.contexts.iter().all(|&t| t > 0),
        "decode attention bench: contexts must be positive"
    );
    ensure!(
        cfg.heads > 0 && cfg.kv_heads > 0 && cfg.heads.is_multiple_of(cfg.kv_heads),
        "decode attention bench: kv heads {} must divide heads {} (both positive)",
        cfg.kv_heads,
        cfg.heads
    );
    ensure!(
        (1..=crate::backend::cuda::flash::FLASH_MAX_HD).contains(&cfg.hd),
        "decode attention bench: head dim {} outside 1..={}",
        cfg.hd,
        crate::backend::cuda::flash::FLASH_MAX_HD
    );
    for &b in &cfg.batches {
        crate::limits::check_dim("--batch", b, 1 << 16, "far beyond any decode batch")?;
    }
    for &t in &cfg.contexts {
        crate::limits::check_dim("--context", t, 1 << 24, "far beyond any context")?;
    }
    // The largest cache must fit next to the copy's 2 GiB: checked before anything is allocated.
    let most = cfg.batches.iter().max().unwrap_or(&1) * cfg.contexts.iter().max().unwrap_or(&1);
    let need = 2 * most * cfg.kv_heads * cfg.hd * 2;
    dev.context().bind_to_thread()?;
    let (free, _) = cudarc::driver::result::mem_get_info()?;
    ensure!(
        need + (2 << 30) <= free,
        "decode attention bench: a {} x {} cache of K and V needs {:.1} GiB, the GPU has {:.1} GiB free",
        cfg.batches.iter().max().unwrap_or(&1),
        cfg.contexts.iter().max().unwrap_or(&1),
        need as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64
    );
    let copy = copy_bandwidth(dev)?;
    let mut rows = Vec::new();
    for &batch in &cfg.batches {
        for &context in &cfg.contexts {
            let s = AttnShape::cached(
                batch,
                1,
                context - 1,
                context,
                cfg.heads,
                cfg.kv_heads,
                cfg.hd,
            );
            let (nq, nk) = (
                batch * cfg.heads * cfg.hd,
                batch * context * cfg.kv_heads * cfg.hd,
            );
            // The values do not change the work: zeros need no host memory.
            let q = dev.zeros::<bf16>(nq)?;
            let k = dev.zeros::<bf16>(nk)?;
            let v = dev.zeros::<bf16>(nk)?;
            let mut out = dev.alloc::<bf16>(nq)?;
            let mut lse = dev.alloc::<f32>(batch * cfg.heads)?;
            let ms = time_ms(dev, cfg.warmup, cfg.iters, || {
                dev.flash_attention_decode(&q, &k, &v, s, &mut out, &mut lse)
            })?;
            let kv_bytes = 2 * nk * 2;
            let rate = kv_bytes as f64 / (ms * 1e-3);
            let launch =
                dev.decode_launch(dev.kernel_path(), &s, &[q.dptr(), k.dptr(), v.dptr()])?;
            rows.push(DecodeRow {
                batch,
                context,
                heads: cfg.heads,
                kv_heads: cfg.kv_heads,
                hd: cfg.hd,
                us: ms * 1e3,
                kv_bytes,
                gb_per_s: rate / 1e9,
                copy_gb_per_s: copy / 1e9,
                fraction: rate / copy,
                chunks: launch.plan.nchunks,
                path: path_name(dev),
            });
        }
    }
    Ok(rows)
}

/// The device's kernel path as the benchmarks report it.
fn path_name(dev: &Device) -> &'static str {
    match dev.kernel_path() {
        KernelPath::Sm80 => "sm80",
        KernelPath::Sm90 => "sm90",
    }
}
