//! Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling,
//! seeded, streaming each token to a callback as it is produced.

use crate::autograd::Tape;
use crate::backend::cuda::GpuModel;
use crate::ensure;
use crate::error::Result;
use crate::model::{Config, KvCache, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct SamplingConfig {
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Stop after producing this token (not included in the output).
    pub stop_token: Option<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 64,
            stop_token: None,
        }
    }
}

/// Pick the next token from one row of logits.
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let m = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - m) / cfg.temperature) as f64).exp())
        .collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if cfg.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u: f64 = rng.random();
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for i in 1..x.len() {
        if x[i] > x[best] {
            best = i;
        }
    }
    best as u32
}

/// A CPU KV cache for `batch` copies of `prompt` followed by `new` tokens, after checking that
/// the prompt is non-empty, in the vocabulary and that everything fits the model's positions.
fn cpu_cache(model: &Model, prompt: &[u32], new: usize, batch: usize) -> Result<KvCache> {
    check_prompt(&model.cfg, prompt, new)?;
    Ok(KvCache::new(&model.cfg, batch, prompt.len() + new))
}

/// A prompt to continue by `new` tokens: non-empty, in the vocabulary, and the whole sequence
/// within the model's positions. Every generation path checks this before its first step;
/// callers that print the prompt check it first.
pub fn check_prompt(cfg: &Config, prompt: &[u32], new: usize) -> Result<()> {
    ensure!(!prompt.is_empty(), "the prompt is empty");
    ensure!(
        prompt.len() + new <= cfg.max_position_embeddings,
        "prompt ({}) + new tokens ({new}) exceed max_position_embeddings {}",
        prompt.len(),
        cfg.max_position_embeddings
    );
    cfg.check_input(prompt, prompt.len())
}

/// One cached CPU forward of `t` new tokens per row (`ids` is `[n, t]`): each row's last
/// logits.
fn cpu_step(
    model: &Model,
    cache: &mut KvCache,
    ids: &[u32],
    n: usize,
    t: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut tape = Tape::inference();
    let f = model.forward(&mut tape, ids, n, t, Some(cache))?;
    let logits = tape.value(f.logits);
    Ok((0..n).map(|r| logits.row(r * t + t - 1).to_vec()).collect())
}

/// Generate a continuation of `prompt`; `on_token` is called with each new token as it is chosen.
/// Returns the new tokens.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cfg: &SamplingConfig,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut cache = cpu_cache(model, prompt, cfg.max_new_tokens, 1)?;
    generate_with(prompt, cfg, on_token, |ids| {
        Ok(cpu_step(model, &mut cache, ids, 1, ids.len())?.remove(0))
    })
}

/// [`generate`] on the GPU: the same sampling loop over [`GpuModel::forward`] with a device KV
/// cache (the split-KV decode kernel for every new token).
pub fn generate_gpu(
    model: &GpuModel<'_>,
    prompt: &[u32],
    cfg: &SamplingConfig,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    ensure!(!prompt.is_empty(), "the prompt is empty");
    let mut cache = model.new_cache(1, prompt.len() + cfg.max_new_tokens)?;
    generate_with(prompt, cfg, on_token, |ids| {
        let t = ids.len();
        let logits = model.forward(ids, 1, t, Some(&mut cache))?;
        Ok(model.last_logits(&logits, 1, t)?.remove(0))
    })
}

/// `n` independent samples of `new` tokens each continuing `prompt`, decoded together as one
/// batch with a KV cache (the prompt is fed once per row); no stop token. Row r draws from
/// `rng` after rows 0..r at every position, so the result depends only on the seed.
pub fn sample_batch(
    model: &Model,
    prompt: &[u32],
    n: usize,
    new: usize,
    cfg: &SamplingConfig,
    rng: &mut StdRng,
) -> Result<Vec<Vec<u32>>> {
    let mut cache = cpu_cache(model, prompt, new, n)?;
    sample_batch_with(prompt, n, new, cfg, rng, |ids, t| {
        cpu_step(model, &mut cache, ids, n, t)
    })
}

/// [`sample_batch`] on the GPU.
pub fn sample_batch_gpu(
    model: &GpuModel<'_>,
    prompt: &[u32],
    n: usize,
    new: usize,
    cfg: &SamplingConfig,
    rng: &mut StdRng,
) -> Result<Vec<Vec<u32>>> {
    ensure!(!prompt.is_empty(), "the prompt is empty");
    let mut cache = model.new_cache(n, prompt.len() + new)?;
    sample_batch_with(prompt, n, new, cfg, rng, |ids, t| {
        let logits = model.forward(ids, n, t, Some(&mut cache))?;
        model.last_logits(&logits, n, t)
    })
}

/// The batched sampling loop: `step(ids, t)` feeds `t` new tokens per row (`[n, t]`) to a
/// cached forward and returns each row's last logits.
fn sample_batch_with(
    prompt: &[u32],
    n: usize,
    new: usize,
    cfg: &SamplingConfig,
    rng: &mut StdRng,
    mut step: impl FnMut(&[u32], usize) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![Vec::with_capacity(new); n];
    let mut next: Vec<u32> = prompt.repeat(n);
    let mut t = prompt.len();
    for _ in 0..new {
        let logits = step(&next, t)?;
        next = logits.iter().map(|l| sample(l, cfg, rng)).collect();
        for (o, &tok) in out.iter_mut().zip(&next) {
            o.push(tok);
        }
        t = 1;
    }
    Ok(out)
}

/// The sampling loop: `step(ids)` feeds the new tokens (the prompt first, then one token at a
/// time) to a cached forward and returns the logits of the last position.
fn generate_with(
    prompt: &[u32],
    cfg: &SamplingConfig,
    mut on_token: impl FnMut(u32),
    mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut out = Vec::new();
    let mut next_input = prompt.to_vec();
    for _ in 0..cfg.max_new_tokens {
        let logits = step(&next_input)?;
        let tok = sample(&logits, cfg, &mut rng);
        if Some(tok) == cfg.stop_token {
            break;
        }
        on_token(tok);
        out.push(tok);
        next_input = vec![tok];
    }
    Ok(out)
}
