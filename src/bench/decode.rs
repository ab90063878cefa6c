//! `flexrun bench decode`: greedy decoding with a KV cache, and how close a step comes to the
//! memory roofline: the bytes a step must read (the weights of what it uses, the experts it hits
//! included, and the KV cache) over the step time, against the copy bandwidth measured in the
//! same process on the same device.

use super::median;
use crate::backend::Device;
use crate::ensure;
use crate::error::Result;
use crate::model::{parse_expert_param, ExpertPart, Model};
use crate::tensor::DType;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Serialize, Debug)]
pub struct DecodeBench {
    pub framework: &'static str,
    pub device: String,
    pub batch: usize,
    pub prompt: usize,
    pub new_tokens: usize,
    pub params: usize,
    /// The prompt's forward pass (all `batch` sequences at once), filling the KV cache.
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Median time of one decode step (one new token for each of the `batch` sequences).
    pub step_ms: f64,
    pub decode_tokens_per_s: f64,
    /// Distinct experts a decode step used per MoE layer, on average (0 for a dense model).
    pub experts_hit: f64,
    /// Whether `experts_hit` was measured (the CPU step reports it) or is the bound
    /// `min(experts, batch x top-k)` (the GPU step does not report its routing).
    pub experts_hit_measured: bool,
    /// Bytes one decode step must read: weights (those of the experts it hits only) and the KV
    /// cache (at the mean length over the timed steps).
    pub weight_bytes_per_step: f64,
    pub kv_bytes_per_step: f64,
    /// (weight + KV bytes) / median step time.
    pub achieved_gb_per_s: f64,
    /// Copy bandwidth (bytes read + written per second) measured here, where the model runs.
    pub copy_gb_per_s: f64,
    /// Read bandwidth (a parallel sum over the same buffer; measured on the CPU only: a step
    /// mostly reads, and a CPU reads faster than it copies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_gb_per_s: Option<f64>,
    /// achieved / the best measured bandwidth (read on the CPU, copy on the GPU): the fraction of
    /// the memory roofline a step reaches.
    pub roofline_fraction: f64,
}

/// Bytes of weights one decode step of `batch` sequences reads: every tensor whole, but the
/// embedding (`batch` rows) and the experts' FFNs (`hits[l]` of the layer's experts, a mean).
/// `elem` gives the bytes per element of a tensor where the step runs.
pub fn step_weight_bytes(
    model: &Model,
    batch: usize,
    hits: &[f64],
    elem: impl Fn(DType) -> usize,
) -> f64 {
    let experts = model.cfg.experts().max(1) as f64;
    model
        .params
        .params
        .iter()
        .map(|p| {
            let bytes = (p.value.numel() * elem(p.value.dtype())) as f64;
            if p.name == "model.embed_tokens.weight" {
                return bytes * (batch as f64 / p.value.rows().max(1) as f64).min(1.0);
            }
            match parse_expert_param(&p.name) {
                Some((l, _, ExpertPart::Ffn(_))) if model.cfg.is_moe() => {
                    bytes * hits.get(l).copied().unwrap_or(experts) / experts
                }
                _ => bytes,
            }
        })
        .sum()
}

/// Copy bandwidth where `device` computes: bytes read + written per second, best of 5 copies
/// of 256 MiB (on the CPU split over the worker threads, as the decode step's work is); and on
/// the CPU the read bandwidth of a parallel sum over the same bytes.
fn bandwidth(device: &Device) -> Result<(f64, Option<f64>)> {
    const BYTES: usize = 256 << 20;
    let mut best = f64::INFINITY;
    let mut read = None;
    match device.gpu() {
        Some(dev) => {
            let n = BYTES / 4;
            let a = dev.alloc::<u32>(n)?;
            let mut b = dev.alloc::<u32>(n)?;
            dev.copy(&a, &mut b)?;
            dev.synchronize()?;
            for _ in 0..5 {
                let t0 = Instant::now();
                dev.copy(&a, &mut b)?;
                dev.synchronize()?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
        }
        None => {
            use rayon::prelude::*;
            let src = vec![1u8; BYTES];
            let mut dst = vec![0u8; BYTES];
            let chunk = BYTES / rayon::current_num_threads().max(1);
            for _ in 0..5 {
                let t0 = Instant::now();
                dst.par_chunks_mut(chunk)
                    .zip(src.par_chunks(chunk))
                    .for_each(|(d, s)| d.copy_from_slice(s));
                best = best.min(t0.elapsed().as_secs_f64());
                std::hint::black_box(&dst);
            }
            let words: &[u64] = bytemuck::cast_slice(&dst[..BYTES / 8 * 8]);
            let mut best_read = f64::INFINITY;
            for _ in 0..5 {
                let t0 = Instant::now();
                let s: u64 = words
                    .par_chunks(chunk / 8)
                    .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                    .reduce(|| 0, u64::wrapping_add);
                best_read = best_read.min(t0.elapsed().as_secs_f64());
                std::hint::black_box(s);
            }
            read = Some(BYTES as f64 / best_read);
        }
    }
    Ok((2.0 * BYTES as f64 / best, read))
}

/// Greedy decoding of `model`: a `prompt`-token prefill of `batch` random sequences, then
/// `new_tokens` steps of one token per sequence through the KV cache, on the CPU or the GPU,
/// where each step brings the last logits to the host for the argmax as a sampler would. One
/// untimed warm-up generation of 4 tokens comes first.
pub fn decode(
    model: &Model,
    batch: usize,
    prompt: usize,
    new_tokens: usize,
    device: &Device,
) -> Result<DecodeBench> {
    use crate::generate::argmax;
    let cfg = &model.cfg;
    let gpu = device.gpu();
    ensure!(
        batch > 0 && prompt > 0 && new_tokens > 0,
        "--batch, --prompt and --new-tokens must be positive"
    );
    crate::limits::check_dim(
        "--batch",
        batch,
        crate::limits::MAX_BATCH,
        "far beyond any batch",
    )?;
    let total = prompt
        .checked_add(new_tokens)
        .filter(|&t| t <= cfg.max_position_embeddings);
    let Some(total) = total else {
        crate::bail!(
            "--prompt {prompt} + --new-tokens {new_tokens} exceed max_position_embeddings {}",
            cfg.max_position_embeddings
        );
    };
    // The KV cache and the prefill's logits and activations (the weights exist already).
    let (b, t) = (batch as u128, total as u128);
    let kv = 2 * cfg.num_hidden_layers as u128 * (cfg.kv_heads() * cfg.head_dim()) as u128;
    let per_prompt_token =
        (cfg.vocab_size + 4 * cfg.hidden_size + 3 * cfg.intermediate_size) as u128;
    crate::limits::check_memory(
        &format!("decoding {batch} sequences of {prompt} + {new_tokens} tokens"),
        4 * (b * t * kv + b * prompt as u128 * per_prompt_token),
    )?;
    let mut rng = StdRng::seed_from_u64(0);
    let v = cfg.vocab_size;
    let ids: Vec<u32> = (0..batch * prompt)
        .map(|_| rng.random_range(0..v as u32))
        .collect();
    let placed = crate::model::runner::Placed::new(model, device)?;
    let runner = placed.runner();
    // One generation: (prefill ms, per-step ms, per-step distinct experts per layer).
    let run = |steps: usize| -> Result<(f64, Vec<f64>, Vec<Vec<usize>>)> {
        let mut times = Vec::with_capacity(steps);
        let mut hits = Vec::new();
        let mut prefill = 0.0;
        let mut cache = runner.new_cache(batch, total)?;
        let mut inp = ids.clone();
        for s in 0..=steps {
            let t = inp.len() / batch;
            let t0 = Instant::now();
            let (rows, h) = runner.step_with_hits(&mut cache, &inp, batch, t)?;
            inp = rows.iter().map(|r| argmax(r)).collect();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if s == 0 {
                prefill = ms
            } else {
                times.push(ms);
                hits.extend(h);
            }
        }
        Ok((prefill, times, hits))
    };
    run(4.min(new_tokens))?;
    let (prefill_ms, times, hits) = run(new_tokens)?;
    let step_ms = median(&times);
    let moe = cfg.is_moe();
    let layers = cfg.num_hidden_layers;
    let measured = !hits.is_empty();
    let per_layer: Vec<f64> = if !moe {
        vec![]
    } else if measured {
        (0..layers)
            .map(|l| hits.iter().map(|h| h[l] as f64).sum::<f64>() / hits.len() as f64)
            .collect()
    } else {
        vec![(batch * cfg.top_k()).min(cfg.experts()) as f64; layers]
    };
    // Bytes per element where the step runs: the GPU holds matrices in bf16 and vectors in f32;
    // the CPU reads what the host model stores.
    let on_gpu = gpu.is_some();
    let weight_bytes =
        step_weight_bytes(
            model,
            batch,
            &per_layer,
            |d| {
                if on_gpu {
                    2
                } else {
                    d.size()
                }
            },
        );
    let kv_elem = if on_gpu { 2.0 } else { 4.0 };
    let mean_len = prompt as f64 + (new_tokens as f64 + 1.0) / 2.0;
    let kv_bytes = kv as f64 * kv_elem * mean_len * batch as f64;
    let (copy, read) = bandwidth(device)?;
    let achieved = (weight_bytes + kv_bytes) / (step_ms / 1e3);
    Ok(DecodeBench {
        framework: "flexrun",
        device: match gpu {
            Some(d) => d.name()?,
            None => format!("cpu ({} threads)", rayon::current_num_threads()),
        },
        batch,
        prompt,
        new_tokens,
        params: model.params.numel(),
        prefill_ms,
        prefill_tokens_per_s: (batch * prompt) as f64 / (prefill_ms / 1e3),
        step_ms,
        decode_tokens_per_s: batch as f64 / (step_ms / 1e3),
        experts_hit: if per_layer.is_empty() {
            0.0
        } else {
            per_layer.iter().sum::<f64>() / per_layer.len() as f64
        },
        experts_hit_measured: measured && moe,
        weight_bytes_per_step: weight_bytes,
        kv_bytes_per_step: kv_bytes,
        achieved_gb_per_s: achieved / 1e9,
        copy_gb_per_s: copy / 1e9,
        read_gb_per_s: read.map(|r| r / 1e9),
        roofline_fraction: achieved / read.unwrap_or(0.0).max(copy),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    /// A dense model's step reads every weight but the embedding table (its `batch` rows only);
    /// an MoE step reads the experts it hits only.
    #[test]
    fn step_bytes_count_what_a_step_reads() {
        let cfg = Config::olmo2(100, 8, 12, 2, 2, 2);
        let m = Model::new_random(&cfg, 0).unwrap();
        let all = (m.params.numel() * 4) as f64;
        let got = step_weight_bytes(&m, 3, &[], |d| d.size());
        assert_eq!(got, all - (97 * 8 * 4) as f64);
        let moe = Config::flex_olmo(100, 8, 12, 2, 2, 2, 4, 2);
        let m = Model::new_random(&moe, 0).unwrap();
        let ffn = (3 * 8 * 12 * 4) as f64; // one expert's gate, up, down in f32
        let full = step_weight_bytes(&m, 1, &[4.0, 4.0], |d| d.size());
        let two = step_weight_bytes(&m, 1, &[2.0, 1.0], |d| d.size());
        assert_eq!(full - two, ffn * (2.0 + 3.0));
    }
}
