//! Throughput measurements behind `flexrun bench`.

use crate::backend::cuda::Device as CudaDevice;
use crate::ensure;
use crate::error::Result;
use crate::model::net::NetTrainer;
use crate::model::{Config, LossCoefs, Model};
use crate::ops::host::Host;
use crate::train::optim::{AdamW, AdamWConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// The shape of a benchmarked training step.
#[derive(Clone, Copy, Debug)]
pub struct StepSpec {
    pub mode: TrainMode,
    /// Sequences per micro-batch, tokens per sequence, micro-batches per optimizer step.
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    /// GPU: keep each layer's input only and recompute its activations in the backward.
    pub recompute: bool,
    /// Timed steps, after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
}

impl StepSpec {
    /// `steps` timed steps of `batch x seq` tokens (one micro-batch, no recomputation) after
    /// `warmup` untimed ones.
    pub fn new(mode: TrainMode, batch: usize, seq: usize, steps: usize, warmup: usize) -> Self {
        StepSpec {
            mode,
            batch,
            seq,
            grad_accum: 1,
            recompute: false,
            steps,
            warmup,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct TrainBench {
    pub framework: &'static str,
    pub device: String,
    pub threads: usize,
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    pub recompute: bool,
    pub params: usize,
    /// Median over the timed optimizer steps (after warm-up).
    pub step_ms: f64,
    pub step_ms_all: Vec<f64>,
    pub tokens_per_s: f64,
    /// Model FLOPs per step ([`train_flops`]) over the median step time, and that as a fraction
    /// of the GPU's dense bf16 peak (GPU runs on a known GPU only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_tflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// GPU runs: the most device memory live buffers held at once during the run (weights,
    /// master weights, optimizer state, gradients, activations), and the most the allocator held
    /// from the driver (live and cached), in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_reserved_bytes: Option<usize>,
}

/// Model FLOPs of one training step (forward + backward = 3x the forward's 2 FLOPs per
/// multiply-add): every projection with the experts a token actually uses (top-k of E), the LM
/// head, and causal attention (half of the `seq x seq` score and value products). The embedding
/// lookup, norms and element-wise work are not counted (the usual MFU convention).
pub fn train_flops(cfg: &Config, batch: usize, seq: usize) -> f64 {
    step_flops(cfg, batch, seq, None)
}

/// Weights a token multiplies in the forward (every projection, the experts it uses, the
/// router, the LM head), and the causal attention's multiply-adds per token.
fn per_token(cfg: &Config, seq: usize) -> (f64, f64) {
    let (h, i, l) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.num_hidden_layers as f64,
    );
    let (nh, nkv, hd) = (
        cfg.num_attention_heads as f64,
        cfg.kv_heads() as f64,
        cfg.head_dim() as f64,
    );
    let e = cfg.experts() as f64;
    let k = cfg.top_k() as f64;
    let router = if cfg.is_moe() { h * e } else { 0.0 };
    let params = l * (h * nh * hd * 2.0 + h * nkv * hd * 2.0 + 3.0 * h * i * k + router)
        + h * cfg.vocab_size as f64;
    let attn = l * 2.0 * nh * hd * seq as f64; // QK^T and PV, causal half of 4 seq d
    (params, attn)
}

/// FLOPs of a step whose weight gradients cover `trained` of the per-token weights (None:
/// all): forward and input gradient through every weight, weight gradients of the trained
/// ones only, attention three times.
fn step_flops(cfg: &Config, batch: usize, seq: usize, trained: Option<f64>) -> f64 {
    let (p, attn) = per_token(cfg, seq);
    let w = trained.unwrap_or(p);
    (batch * seq) as f64 * (2.0 * p + 2.0 * p + 2.0 * w + 3.0 * attn)
}

/// What `bench train` times: a full training step of the configured model, or one data owner's
/// expert-training step with the configured (dense, public) model as the frozen anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainMode {
    Full,
    /// The public model upcycled to [public FFN (frozen), copy (trained)] in every layer, r_i and
    /// b_i trained, everything else frozen; the demo's loss terms (public anchor 1 on a quarter
    /// of the rows, router own-text loss 0.3 on the others).
    Expert,
}

/// The model, loss terms and anchored rows a benchmark step trains with; the step's shape is
/// checked first.
/// On the GPU (`fast`) the weights are drawn in parallel and kept in bf16 on the host
/// ([`Model::new_random_fast`]): the 7B shapes would take minutes one tensor at a time and twice
/// the host memory, and the GPU computes on bf16 weights anyway (the trained tensors' f32 master
/// copies are made on the device).
fn bench_setup(cfg: &Config, spec: &StepSpec, fast: bool) -> Result<(Model, LossCoefs, Vec<bool>)> {
    let (mode, batch, seq, steps) = (spec.mode, spec.batch, spec.seq, spec.steps);
    if mode == TrainMode::Expert {
        expert_config(cfg)?;
    }
    ensure!(
        batch > 0 && seq > 0 && steps > 0,
        "--batch, --seq and --steps must be positive"
    );
    crate::limits::check_dim("--steps", steps, 1 << 20, "far beyond any benchmark")?;
    ensure!(
        seq <= cfg.max_position_embeddings,
        "--seq {seq} exceeds max_position_embeddings {}",
        cfg.max_position_embeddings
    );
    let model = match fast {
        true => Model::new_random_fast(cfg, 0, true)?,
        false => Model::new_random(cfg, 0)?,
    };
    match mode {
        TrainMode::Full => Ok((model, LossCoefs::default(), Vec::new())),
        TrainMode::Expert => {
            let h = cfg.hidden_size;
            let mut rng = StdRng::seed_from_u64(1);
            let row = |rng: &mut StdRng| crate::tensor::Tensor::randn(&[h], 0.02, rng).into_vec();
            let (r_pub, r_i) = (row(&mut rng), row(&mut rng));
            let m = crate::flex::expert_training_model(&model, &r_pub, &r_i, Some(-2.0))?;
            let coefs = LossCoefs {
                public_anchor: 1.0,
                router_own: 0.3,
                ..LossCoefs::default()
            };
            Ok((m, coefs, (0..batch).map(|r| r % 4 == 3).collect()))
        }
    }
}

/// Model FLOPs of one step in `mode` (see [`train_flops`]; expert training computes weight
/// gradients for the new FFN and router row only).
pub fn mode_flops(cfg: &Config, mode: TrainMode, batch: usize, seq: usize) -> Result<f64> {
    Ok(match mode {
        TrainMode::Full => train_flops(cfg, batch, seq),
        TrainMode::Expert => {
            let up = expert_config(cfg)?;
            let (h, i, l) = (
                cfg.hidden_size as f64,
                cfg.intermediate_size as f64,
                cfg.num_hidden_layers as f64,
            );
            step_flops(&up, batch, seq, Some(l * (3.0 * h * i + h)))
        }
    })
}

/// The 2-expert (top-2 of 2) configuration expert training runs for the public `cfg`.
fn expert_config(cfg: &Config) -> Result<Config> {
    ensure!(
        !cfg.is_moe(),
        "--expert trains against a public model: give a dense (OLMo-2) config"
    );
    let up = cfg.upcycled(2);
    up.validate()?;
    Ok(up)
}

/// Dense bf16 tensor-core peak of a known GPU (FLOP/s), by name.
pub fn gpu_peak_bf16(name: &str) -> Option<f64> {
    [("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
        .iter()
        .find(|(n, _)| name.contains(n))
        .map(|&(_, p)| p)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// `batch` random sequences of `seq + 1` tokens below `v`, as (inputs, next-token targets).
fn random_batch(rng: &mut StdRng, v: u32, batch: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
    let ids: Vec<u32> = (0..batch * (seq + 1))
        .map(|_| rng.random_range(0..v))
        .collect();
    let (mut inp, mut tgt) = (
        Vec::with_capacity(batch * seq),
        Vec::with_capacity(batch * seq),
    );
    for row in ids.chunks(seq + 1) {
        inp.extend_from_slice(&row[..seq]);
        tgt.extend_from_slice(&row[1..]);
    }
    (inp, tgt)
}

/// Wall times (ms) of `step` on `grad_accum` random micro-batches (`batch` x `seq` tokens
/// below the vocabulary) each, the `warmup` first ones left out.
fn time_steps(
    cfg: &Config,
    spec: &StepSpec,
    mut step: impl FnMut(Vec<(Vec<u32>, Vec<u32>)>) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(0);
    let v = cfg.vocab_size as u32;
    let mut times = Vec::new();
    for i in 0..spec.warmup + spec.steps {
        let micro = (0..spec.grad_accum)
            .map(|_| random_batch(&mut rng, v, spec.batch, spec.seq))
            .collect();
        let t0 = Instant::now();
        step(micro)?;
        if i >= spec.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// Time full training steps (forward, backward, clipping, AdamW) of a randomly initialised
/// model on random tokens, on `device`.
pub fn train_step(
    cfg: &Config,
    spec: &StepSpec,
    device: &crate::backend::Device,
) -> Result<TrainBench> {
    crate::limits::check_dim("--warmup", spec.warmup, 1 << 20, "far beyond any benchmark")?;
    crate::limits::check_dim(
        "--grad-accum",
        spec.grad_accum,
        1 << 16,
        "far beyond any benchmark",
    )?;
    ensure!(spec.grad_accum > 0, "--grad-accum must be positive");
    let (batch, seq) = (spec.batch, spec.seq);
    if device.gpu().is_none() {
        // Keep freed activation buffers in the process (see `tune_allocator`), as training does.
        crate::backend::cpu::tune_allocator();
        cfg.check_training_memory(batch, seq, None)?;
    }
    let (model, coefs, anchored) = bench_setup(cfg, spec, device.gpu().is_some())?;
    let params = model.params.numel();
    let opt = AdamW::new(AdamWConfig::default(), model.params.len());
    let mut stepper = Stepper::new(model, opt, spec.recompute, device)?;
    let rows = vec![anchored; spec.grad_accum];
    let times = time_steps(cfg, spec, |micro| stepper.step(&micro, &rows, spec, &coefs))?;
    let step_ms = median(&times);
    let tokens_per_s = (batch * seq * spec.grad_accum) as f64 / (step_ms / 1e3);
    let mut r = TrainBench {
        framework: "flexrun",
        device: device.describe(),
        threads: rayon::current_num_threads(),
        batch,
        seq,
        grad_accum: spec.grad_accum,
        recompute: spec.recompute,
        params,
        step_ms,
        step_ms_all: times,
        tokens_per_s,
        model_tflops: None,
        mfu: None,
        peak_device_bytes: None,
        peak_reserved_bytes: None,
    };
    if let Some(dev) = device.gpu() {
        let flops = spec.grad_accum as f64 * mode_flops(cfg, spec.mode, batch, seq)?;
        let tflops = flops / (step_ms / 1e3) / 1e12;
        let pool = dev.pool_stats();
        r.model_tflops = Some(tflops);
        r.mfu = gpu_peak_bf16(&r.device).map(|p| tflops * 1e12 / p);
        r.peak_device_bytes = Some(pool.peak_in_use);
        r.peak_reserved_bytes = Some(pool.peak_reserved);
    }
    Ok(r)
}

/// One benchmarked optimizer step where the model lives: the model's training step
/// ([`crate::model::net::NetTrainer`]) on the CPU or on the GPU (each GPU step ends with the
/// loss read back, a synchronisation).
enum Stepper<'d> {
    Cpu(NetTrainer<'d, Host>),
    Gpu(NetTrainer<'d, CudaDevice>, &'d CudaDevice),
}

impl<'d> Stepper<'d> {
    fn new(
        model: Model,
        opt: AdamW,
        recompute: bool,
        device: &'d crate::backend::Device,
    ) -> Result<Self> {
        Ok(match device.gpu() {
            None => {
                let mut t = NetTrainer::from_host(&Host, &model, &opt, 1.0)?;
                t.model.set_recompute(recompute);
                Stepper::Cpu(t)
            }
            Some(dev) => {
                dev.reset_peak_memory();
                let mut t = NetTrainer::from_host(dev, &model, &opt, 1.0)?;
                t.model.set_recompute(recompute);
                Stepper::Gpu(t, dev)
            }
        })
    }

    /// One step over the micro-batches (gradients averaged), learning rate 1e-4.
    fn step(
        &mut self,
        micro: &[(Vec<u32>, Vec<u32>)],
        anchored: &[Vec<bool>],
        spec: &StepSpec,
        coefs: &LossCoefs,
    ) -> Result<()> {
        let (batch, seq) = (spec.batch, spec.seq);
        match self {
            Stepper::Gpu(t, dev) => {
                t.step(micro, anchored, batch, seq, 1e-4, coefs)?;
                dev.synchronize()
            }
            // The step runs on a rayon worker: the kernels' parallel loops then fork and join
            // inside the pool instead of each one injecting a job from outside and putting the
            // calling thread to sleep until it completes (~6% of a moe_small step on 2 cores).
            Stepper::Cpu(t) => rayon::scope(|_| {
                t.step(micro, anchored, batch, seq, 1e-4, coefs)?;
                Ok(())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expert-training step runs both FFNs of every layer forward and through the input
    /// gradient, and computes weight gradients for the trained FFN (and router row) only.
    #[test]
    fn expert_step_flops_count_both_ffns() {
        let cfg = Config::olmo2(1000, 64, 96, 2, 4, 2);
        let (b, t) = (2, 16);
        let (h, i, l, v) = (64.0, 96.0, 2.0, 1000.0);
        let attn = l * 2.0 * 4.0 * 16.0 * t as f64;
        let tok = (b * t) as f64;
        let dense = l * (3.0 * h * h + 3.0 * h * i) + h * v; // q, o: h x h; k, v: h x h/2
        let full = mode_flops(&cfg, TrainMode::Full, b, t).unwrap();
        assert!((full - tok * (6.0 * dense + 3.0 * attn)).abs() < 1.0);
        let up = l * (3.0 * h * h + 2.0 * 3.0 * h * i + 2.0 * h) + h * v;
        let trained = l * (3.0 * h * i + h);
        let expert = mode_flops(&cfg, TrainMode::Expert, b, t).unwrap();
        assert!((expert - tok * (4.0 * up + 2.0 * trained + 3.0 * attn)).abs() < 1.0);
        let moe = Config::flex_olmo(1000, 64, 96, 2, 4, 2, 4, 2);
        assert!(mode_flops(&moe, TrainMode::Expert, b, t).is_err());
    }
}

pub mod attention;
mod decode;
pub use decode::{decode, step_weight_bytes, DecodeBench};
pub mod moe;
pub mod serve;
