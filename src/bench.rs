//! Throughput measurements behind `flexrun bench`.

use crate::autograd::Tape;
use crate::ensure;
use crate::error::Result;
use crate::model::{Config, LossCoefs, Model};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Serialize, Debug)]
pub struct TrainBench {
    pub framework: &'static str,
    pub device: &'static str,
    pub threads: usize,
    pub batch: usize,
    pub seq: usize,
    pub params: usize,
    /// Median over the timed steps (after warm-up).
    pub step_ms: f64,
    pub step_ms_all: Vec<f64>,
    pub tokens_per_s: f64,
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

/// Time full training steps (forward, backward, clipping, AdamW) of a randomly initialised
/// model on random tokens.
pub fn train_step(
    cfg: &Config,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
) -> Result<TrainBench> {
    ensure!(steps > 0, "--steps must be positive");
    // Keep freed activation buffers in the process (see `tune_allocator`); the training loop
    // should do the same.
    crate::backend::cpu::tune_allocator();
    let mut model = Model::new_random(cfg, 0)?;
    let mut opt = AdamW::new(AdamWConfig::default(), model.params.len());
    let mut rng = StdRng::seed_from_u64(0);
    let v = cfg.vocab_size as u32;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let ids: Vec<u32> = (0..batch * (seq + 1))
            .map(|_| rng.random_range(0..v))
            .collect();
        let (mut inp, mut tgt) = (
            Vec::with_capacity(batch * seq),
            Vec::with_capacity(batch * seq),
        );
        for b in 0..batch {
            inp.extend_from_slice(&ids[b * (seq + 1)..b * (seq + 1) + seq]);
            tgt.extend_from_slice(&ids[b * (seq + 1) + 1..(b + 1) * (seq + 1)]);
        }
        let t0 = Instant::now();
        // The step runs on a rayon worker: the op kernels' parallel loops then fork and join
        // inside the pool instead of each one injecting a job from outside and putting the
        // calling thread to sleep until it completes (~6% of a moe_small step on 2 cores).
        rayon::scope(|_| -> Result<()> {
            let mut tape = Tape::new();
            let out = model.loss(&mut tape, &inp, &tgt, batch, seq, &LossCoefs::default())?;
            let mut grads = tape.backward(out.loss).params;
            drop(tape);
            clip_grad_norm(&mut grads, 1.0);
            opt.update(&mut model.params, &grads, 1e-4);
            drop(grads);
            Ok(())
        })?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if i >= warmup {
            times.push(ms);
        }
    }
    let step_ms = median(&times);
    Ok(TrainBench {
        framework: "flexrun",
        device: "cpu",
        threads: rayon::current_num_threads(),
        batch,
        seq,
        params: model.params.numel(),
        step_ms,
        step_ms_all: times,
        tokens_per_s: (batch * seq) as f64 / (step_ms / 1e3),
    })
}
