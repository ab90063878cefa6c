//! A model placed on the device chosen for a command: the decision of where a forward pass runs
//! is made here, once, and every consumer (generation, evaluation, extraction, the demo, the
//! benchmarks, the CLI) takes a [`Runner`] instead of choosing between a CPU and a GPU function.

use super::infer::{SeqCache, SeqStep};
use super::net::{GpuNet, NetCache};
use super::{Config, Model};
use crate::backend::Device;
use crate::error::Result;
use crate::tensor::Tensor;

/// A model on its device: the host model, and its upload when the device is a GPU.
pub struct Placed<'a> {
    pub host: &'a Model,
    gpu: Option<GpuNet<'a>>,
}

impl<'a> Placed<'a> {
    /// Place `model` on `device` (uploads it to the GPU, as bf16 weights, when that is the device).
    pub fn new(model: &'a Model, device: &'a Device) -> Result<Self> {
        let gpu = match device.gpu() {
            Some(dev) => Some(GpuNet::upload(dev, model)?),
            None => None,
        };
        Ok(Placed { host: model, gpu })
    }

    /// The forward passes of this placement.
    pub fn runner(&self) -> Runner<'_> {
        match &self.gpu {
            Some(g) => Runner::Gpu(g),
            None => Runner::Cpu(self.host),
        }
    }
}

/// Where a forward pass runs: the CPU model (f32) or its GPU upload (flexrun's kernels).
#[derive(Clone, Copy)]
pub enum Runner<'a> {
    Cpu(&'a Model),
    Gpu(&'a GpuNet<'a>),
}

impl Runner<'_> {
    pub fn vocab(&self) -> usize {
        match self {
            Runner::Cpu(m) => m.cfg.vocab_size,
            Runner::Gpu(g) => g.vocab(),
        }
    }

    /// The longest sequence the model takes.
    pub fn max_positions(&self) -> usize {
        match self {
            Runner::Cpu(m) => m.cfg.max_position_embeddings,
            Runner::Gpu(g) => g.max_positions(),
        }
    }

    /// Logits `[b * t, vocab]` (f32 on the host) of `ids` (`[b, t]` row-major).
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let l = match self {
            Runner::Cpu(m) => m.logits(ids, b, t)?,
            Runner::Gpu(g) => g.logits(ids, b, t)?,
        };
        finite(l.data())?;
        Ok(l)
    }

    /// The final hidden states `[b * t, hidden]` (after the last norm) of `ids`.
    pub fn final_hidden(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        match self {
            Runner::Cpu(m) => {
                let mut tape = crate::autograd::Tape::inference();
                let out = m.forward(&mut tape, ids, b, t, None)?;
                Ok(tape.value(out.hidden).clone())
            }
            Runner::Gpu(g) => g.final_hidden(ids, b, t),
        }
    }

    /// A KV cache for `batch` sequences of up to `capacity` positions, where the model runs.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<Cache> {
        Ok(match self {
            Runner::Cpu(m) => {
                m.cfg.check_cache_memory(batch, capacity)?;
                Cache::Cpu(
                    (0..batch)
                        .map(|_| SeqCache::new(&m.cfg, capacity))
                        .collect::<Result<_>>()?,
                )
            }
            Runner::Gpu(g) => Cache::Gpu(g.new_cache(batch, capacity)?),
        })
    }

    /// One cached forward of `t` new tokens for each of `b` sequences (`ids` is `[b, t]`,
    /// continuing what `cache` holds): each sequence's last logits, on the host.
    pub fn step(
        &self,
        cache: &mut Cache,
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<Vec<Vec<f32>>> {
        Ok(self.step_with_hits(cache, ids, b, t)?.0)
    }

    /// [`Runner::step`], and on the CPU how many distinct experts each MoE layer used (the
    /// GPU step does not report them).
    pub fn step_with_hits(
        &self,
        cache: &mut Cache,
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<(Vec<Vec<f32>>, Option<Vec<usize>>)> {
        match (self, cache) {
            (Runner::Cpu(m), Cache::Cpu(c)) => {
                crate::ensure!(
                    ids.len() == b * t && b == c.len(),
                    "step: {} ids for {b} x {t} with a cache of {} sequences",
                    ids.len(),
                    c.len()
                );
                let mut seqs: Vec<SeqStep<'_>> = c
                    .iter_mut()
                    .zip(ids.chunks_exact(t.max(1)))
                    .map(|(cache, ids)| SeqStep {
                        ids,
                        cache,
                        allowed: None,
                    })
                    .collect();
                let out = m.step_seqs(&mut seqs)?;
                out.logits.iter().try_for_each(|r| finite(r))?;
                Ok((out.logits, Some(out.layer_hits)))
            }
            (Runner::Gpu(g), Cache::Gpu(c)) => {
                let logits = g.forward(ids, b, t, Some(c))?;
                let rows = g.last_logits(&logits, b, t)?;
                rows.iter().try_for_each(|r| finite(r))?;
                Ok((rows, None))
            }
            _ => crate::bail!("a KV cache is used with a model on another device"),
        }
    }

    /// How every MoE layer routes the tokens of `ids` (`[b, t]`): per layer, the router
    /// probabilities (softmax over all experts, bias included) and each token's top-k experts.
    /// Empty for a dense model.
    pub fn routing(&self, ids: &[u32], b: usize, t: usize) -> Result<Vec<LayerRouting>> {
        match self {
            Runner::Cpu(m) => {
                let mut tape = crate::autograd::Tape::inference();
                let out = m.forward(&mut tape, ids, b, t, None)?;
                out.routings
                    .iter()
                    .enumerate()
                    .map(|(li, r)| {
                        let z = tape.value(out.router_logits[li]);
                        let bias = out.router_bias[li].map(|b| tape.value(b).data().to_vec());
                        let (probs, _, _) = crate::ops::route_values(z, bias.as_deref(), 1, false);
                        Ok(LayerRouting {
                            experts: r.e,
                            k: r.k,
                            probs,
                            topk: r.indices.clone(),
                        })
                    })
                    .collect()
            }
            Runner::Gpu(g) => g.routing(ids, b, t),
        }
    }

    pub fn on_gpu(&self) -> bool {
        matches!(self, Runner::Gpu(_))
    }

    /// The config of a CPU model (a GPU model keeps the shapes it needs only).
    pub fn cpu_config(&self) -> Option<&Config> {
        match self {
            Runner::Cpu(m) => Some(&m.cfg),
            Runner::Gpu(_) => None,
        }
    }
}

/// One MoE layer's routing of `n` tokens (see [`Runner::routing`]).
#[derive(Clone, Debug)]
pub struct LayerRouting {
    pub experts: usize,
    pub k: usize,
    /// `[n, experts]`: the router's probabilities, bias included.
    pub probs: Vec<f32>,
    /// `[n, k]`: each token's experts, most probable first.
    pub topk: Vec<u32>,
}

/// Outputs must be finite: finite weights can still overflow f32 on the way (weights near 3e38),
/// and a NaN logit would print as `null` or sample nothing.
pub fn finite(v: &[f32]) -> Result<()> {
    crate::ensure!(
        v.iter().all(|x| x.is_finite()),
        "the model's output is not finite (NaN or infinity): its weights overflow f32 on the way"
    );
    Ok(())
}

/// A KV cache on the device of the [`Runner`] that made it (on the CPU, one per sequence: the
/// batch-invariant path of `model::infer`).
pub enum Cache {
    Cpu(Vec<SeqCache>),
    Gpu(NetCache<crate::backend::cuda::Device>),
}
