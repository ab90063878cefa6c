//! Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling,
//! seeded, streaming each token to a callback as it is produced.

use crate::ensure;
use crate::error::Result;
use crate::model::runner::Runner;
use crate::model::Config;
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

impl SamplingConfig {
    /// Settings that mean something: a finite temperature of at least 0 and a top-p in (0, 1].
    /// Every sampling path checks them before its first step.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a finite number >= 0 (0: greedy), not {}",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top-p must be in (0, 1] (1: off), not {}",
            self.top_p
        );
        Ok(())
    }
}

/// Pick the next token from one row of logits.
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    // Highest logit first, ties by id: a total order, so selecting the top k and sorting only
    // them gives exactly the first k of the fully sorted vocabulary.
    let order = |&a: &usize, &b: &usize| logits[b].total_cmp(&logits[a]).then(a.cmp(&b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        idx.select_nth_unstable_by(cfg.top_k - 1, order);
        idx.truncate(cfg.top_k);
    }
    idx.sort_by(order);
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

/// A prompt to continue by `new` tokens: non-empty, in the vocabulary, and the whole sequence
/// within the model's positions. Every generation path checks this before its first step;
/// callers that print the prompt check it first.
pub fn check_prompt(cfg: &Config, prompt: &[u32], new: usize) -> Result<()> {
    ensure!(!prompt.is_empty(), "the prompt is empty");
    ensure!(
        prompt
            .len()
            .checked_add(new)
            .is_some_and(|n| n <= cfg.max_position_embeddings),
        "prompt ({}) + new tokens ({new}) exceed max_position_embeddings {}",
        prompt.len(),
        cfg.max_position_embeddings
    );
    cfg.check_input(prompt, prompt.len())
}

/// Generate a continuation of `prompt` with `model` (on the CPU, or on the GPU with a device KV
/// cache and the split-KV decode kernel for every new token); `on_token` is called with each new
/// token as it is chosen. Returns the new tokens.
pub fn generate(
    model: Runner<'_>,
    prompt: &[u32],
    cfg: &SamplingConfig,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if let Some(c) = model.cpu_config() {
        check_prompt(c, prompt, cfg.max_new_tokens)?;
    }
    ensure!(!prompt.is_empty(), "the prompt is empty");
    let mut cache = model.new_cache(1, prompt.len() + cfg.max_new_tokens)?;
    generate_with(prompt, cfg, on_token, |ids| {
        Ok(model.step(&mut cache, ids, 1, ids.len())?.remove(0))
    })
}

/// `n` independent samples of `new` tokens each continuing `prompt`, decoded together as one
/// batch with a KV cache (the prompt is fed once per row); no stop token. Row r draws from
/// `rng` after rows 0..r at every position, so the result depends only on the seed.
pub fn sample_batch(
    model: Runner<'_>,
    prompt: &[u32],
    n: usize,
    new: usize,
    cfg: &SamplingConfig,
    rng: &mut StdRng,
) -> Result<Vec<Vec<u32>>> {
    let mut groups = [SampleGroup { prompt, new, rng }];
    Ok(sample_groups(model, &mut groups, n, cfg)?.remove(0))
}

/// One prompt of a [`sample_groups`] batch: `n` samples of `new` tokens drawn from `rng`.
pub struct SampleGroup<'a> {
    pub prompt: &'a [u32],
    pub new: usize,
    pub rng: &'a mut StdRng,
}

/// [`sample_batch`] for several prompts of one length at once: every group's `n` rows are
/// decoded in one batch (as long as the longest group; a shorter group's rows stop drawing once
/// it has its tokens). Each group's samples are those [`sample_batch`] draws from its rng alone,
/// up to the last bits of the logits (a batch of other rows may round them differently).
pub fn sample_groups(
    model: Runner<'_>,
    groups: &mut [SampleGroup<'_>],
    n: usize,
    cfg: &SamplingConfig,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let (prompt_len, longest) = group_shape(groups)?;
    let rows = groups.len() * n;
    if let Some(c) = model.cpu_config() {
        for g in groups.iter() {
            check_prompt(c, g.prompt, longest)?;
        }
    }
    let mut cache = model.new_cache(rows, prompt_len + longest)?;
    sample_groups_with(groups, n, cfg, |ids, t| {
        model.step(&mut cache, ids, rows, t)
    })
}

/// The common prompt length of `groups` and their longest continuation.
fn group_shape(groups: &[SampleGroup<'_>]) -> Result<(usize, usize)> {
    ensure!(!groups.is_empty(), "nothing to sample");
    let len = groups[0].prompt.len();
    ensure!(len > 0, "the prompt is empty");
    ensure!(
        groups.iter().all(|g| g.prompt.len() == len),
        "prompts sampled in one batch must have one length"
    );
    Ok((len, groups.iter().map(|g| g.new).max().unwrap_or(0)))
}

/// The batched sampling loop: `step(ids, t)` feeds `t` new tokens per row (`[rows, t]`, group
/// g's rows at g*n..(g+1)*n) to a cached forward and returns each row's last logits.
fn sample_groups_with(
    groups: &mut [SampleGroup<'_>],
    n: usize,
    cfg: &SamplingConfig,
    mut step: impl FnMut(&[u32], usize) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<Vec<u32>>>> {
    cfg.check()?;
    let mut out: Vec<Vec<Vec<u32>>> = groups
        .iter()
        .map(|g| vec![Vec::with_capacity(g.new); n])
        .collect();
    let mut ids: Vec<u32> = groups.iter().flat_map(|g| g.prompt.repeat(n)).collect();
    let mut t = groups[0].prompt.len();
    let longest = groups.iter().map(|g| g.new).max().unwrap_or(0);
    for pos in 0..longest {
        let logits = step(&ids, t)?;
        if pos == 0 {
            // One token per row from now on; a finished group's rows are fed their last token
            // again (and nothing is drawn for them).
            ids = groups
                .iter()
                .flat_map(|g| std::iter::repeat_n(g.prompt[t - 1], n))
                .collect();
        }
        for (gi, g) in groups.iter_mut().enumerate() {
            if pos >= g.new {
                continue;
            }
            for r in 0..n {
                let tok = sample(&logits[gi * n + r], cfg, g.rng);
                ids[gi * n + r] = tok;
                out[gi][r].push(tok);
            }
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
    cfg.check()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Config, Model};

    /// Prompts sampled together in one batch draw what each draws alone from its own rng, for
    /// groups of different lengths (a finished group's rows draw nothing more), and the rngs end
    /// in the same state.
    #[test]
    fn grouped_sampling_equals_sampling_each_prompt_alone() {
        let cfg = Config::olmo2(64, 32, 64, 2, 2, 2);
        let m = Model::new_random(&cfg, 5).unwrap();
        let sc = SamplingConfig {
            temperature: 1.0,
            top_k: 20,
            top_p: 0.9,
            ..Default::default()
        };
        let prompts: Vec<Vec<u32>> = (0..3u32)
            .map(|g| (0..6).map(|j| (g * 11 + j * 5) % 64).collect())
            .collect();
        let news = [7, 3, 0];
        let alone: Vec<(Vec<Vec<u32>>, u64)> = prompts
            .iter()
            .zip(news)
            .enumerate()
            .map(|(g, (p, new))| {
                let mut rng = StdRng::seed_from_u64(g as u64);
                let rows = if new == 0 {
                    vec![vec![]; 4]
                } else {
                    sample_batch(Runner::Cpu(&m), p, 4, new, &sc, &mut rng).unwrap()
                };
                (rows, rng.random())
            })
            .collect();
        let mut rngs: Vec<StdRng> = (0..3).map(StdRng::seed_from_u64).collect();
        let mut groups: Vec<SampleGroup<'_>> = prompts
            .iter()
            .zip(news)
            .zip(rngs.iter_mut())
            .map(|((prompt, new), rng)| SampleGroup { prompt, new, rng })
            .collect();
        let together = sample_groups(Runner::Cpu(&m), &mut groups, 4, &sc).unwrap();
        for (g, ((rows, next), rng)) in alone.iter().zip(rngs.iter_mut()).enumerate() {
            assert_eq!(&together[g], rows, "group {g}");
            assert!(rows.iter().all(|r| r.len() == news[g]));
            assert_eq!(rng.random::<u64>(), *next, "group {g}'s rng");
        }
        // Prompts of different lengths cannot share a batch.
        let mut r0 = StdRng::seed_from_u64(0);
        let mut r1 = StdRng::seed_from_u64(1);
        let mut mixed = [
            SampleGroup {
                prompt: &prompts[0],
                new: 2,
                rng: &mut r0,
            },
            SampleGroup {
                prompt: &prompts[1][..3],
                new: 2,
                rng: &mut r1,
            },
        ];
        assert!(sample_groups(Runner::Cpu(&m), &mut mixed, 2, &sc).is_err());
    }

    /// Top-k sampling draws from exactly the k highest logits, ties broken by id, in order:
    /// the same tokens as a full sort, for every k.
    #[test]
    fn top_k_selection_matches_a_full_sort() {
        let mut rng = StdRng::seed_from_u64(9);
        // Coarse values, so ties are common.
        let logits: Vec<f32> = (0..200)
            .map(|_| rng.random_range(0..12) as f32 * 0.5)
            .collect();
        let mut sorted: Vec<usize> = (0..logits.len()).collect();
        sorted.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        for k in [1, 2, 7, 50, 199, 200, 0] {
            let sc = SamplingConfig {
                temperature: 1e-3,
                top_k: k,
                top_p: 1.0,
                ..Default::default()
            };
            // At a tiny temperature the draw has the highest logit (several tokens tie there);
            // with top-k 1, it is the lowest id among them.
            let mut r = StdRng::seed_from_u64(k as u64);
            let t = sample(&logits, &sc, &mut r);
            assert_eq!(logits[t as usize], logits[sorted[0]], "k {k}");
            if k == 1 {
                assert_eq!(t, sorted[0] as u32);
            }
            let warm = SamplingConfig {
                temperature: 50.0,
                ..sc
            };
            let kept: std::collections::HashSet<u32> =
                (0..400).map(|_| sample(&logits, &warm, &mut r)).collect();
            let top: std::collections::HashSet<u32> = sorted
                [..if k == 0 { logits.len() } else { k }]
                .iter()
                .map(|&i| i as u32)
                .collect();
            assert!(kept.is_subset(&top), "k {k}: drew outside the top k");
            if k > 0 && k <= 7 {
                assert_eq!(
                    kept, top,
                    "k {k}: every one of the top k is drawn at a high temperature"
                );
            }
        }
    }
}
