//! Evaluation: per-domain held-out loss and perplexity, exact-match task accuracy, for single
//! models (any expert subset) and for the BTM ensemble baseline; tables as markdown and JSON.

pub mod compare;
pub mod extract;
pub mod plot;
pub mod routed;
pub mod routing;

use crate::data::shards::{self, Dataset};
use crate::data::synth::Task;
use crate::data::Tokenizer;
use crate::ensure;
use crate::error::Result;
use crate::generate::{self, argmax, SamplingConfig};
use crate::model::runner::Runner;
use crate::model::Model;
use rayon::prelude::*;
use serde::Serialize;

/// What is evaluated: one model, or a BTM ensemble of dense experts.
pub enum Evaluated<'a> {
    /// One model on its device (on a GPU: evaluated one sequence at a time on the device).
    One(Runner<'a>),
    /// `p = sum_j w_j p_j`, `w = softmax(-meanNLL_j(context) / temperature)` restricted to the
    /// `top_k` largest weights (renormalised). At the first position the weights are uniform.
    /// The members are single models, each on the CPU or a GPU.
    Btm {
        models: Vec<Evaluated<'a>>,
        temperature: f32,
        top_k: usize,
    },
    /// Prompt-based routing: `router` reads the query (embedded by `embed`) and one of `models`
    /// scores or continues the whole sequence ([`routed`]).
    Routed {
        router: &'a routed::PromptRouter,
        embed: routed::QueryEmbedder<'a>,
        models: Vec<Evaluated<'a>>,
    },
}

/// Log-probabilities of a `[T, V]` logits block, row-wise.
fn log_softmax_rows(logits: &[f32], v: usize) -> Vec<f32> {
    let mut out = logits.to_vec();
    for row in out.chunks_mut(v) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
        row.iter_mut().for_each(|x| *x -= lse);
    }
    out
}

impl<'a> Evaluated<'a> {
    /// The CPU model `m`.
    pub fn cpu(m: &'a Model) -> Self {
        Evaluated::One(Runner::Cpu(m))
    }

    fn vocab(&self) -> usize {
        match self {
            Evaluated::One(r) => r.vocab(),
            Evaluated::Btm { models, .. } | Evaluated::Routed { models, .. } => {
                models.first().map_or(0, Evaluated::vocab)
            }
        }
    }

    /// Log-probabilities `[T, V]` of next tokens for one sequence `ids`.
    pub fn log_probs(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let v = self.vocab();
        match self {
            Evaluated::One(r) => Ok(log_softmax_rows(r.logits(ids, 1, ids.len())?.data(), v)),
            Evaluated::Routed {
                router,
                embed,
                models,
            } => {
                let k = router.route(*embed, ids)?;
                ensure!(k < models.len(), "prompt routing: no model for class {k}");
                models[k].log_probs(ids)
            }
            Evaluated::Btm {
                models,
                temperature,
                top_k,
            } => {
                ensure!(!models.is_empty(), "BTM needs at least one model");
                ensure!(
                    temperature.is_finite() && *temperature > 0.0,
                    "the BTM temperature must be a finite number > 0, not {temperature}"
                );
                ensure!(
                    *top_k >= 1,
                    "BTM mixes at least one model per position (top-k >= 1)"
                );
                let t = ids.len();
                ensure!(
                    models.iter().all(|m| m.vocab() == v),
                    "BTM members have different vocabularies"
                );
                let lps: Vec<Vec<f32>> = models
                    .iter()
                    .map(|m| m.log_probs(ids))
                    .collect::<Result<_>>()?;
                let mut out = vec![0f32; t * v];
                let mut nll = vec![0f64; models.len()];
                for pos in 0..t {
                    // Context NLL: tokens 1..=pos predicted from their prefixes.
                    if pos > 0 {
                        for (j, lp) in lps.iter().enumerate() {
                            nll[j] -= lp[(pos - 1) * v + ids[pos] as usize] as f64;
                        }
                    }
                    let scores: Vec<f64> = nll
                        .iter()
                        .map(|n| -n / pos.max(1) as f64 / *temperature as f64)
                        .collect();
                    let mut order: Vec<usize> = (0..models.len()).collect();
                    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                    order.truncate((*top_k).min(models.len()));
                    let mx = scores[order[0]];
                    let ws: Vec<f64> = order.iter().map(|&j| (scores[j] - mx).exp()).collect();
                    let z: f64 = ws.iter().sum();
                    let row = &mut out[pos * v..(pos + 1) * v];
                    for c in 0..v {
                        let p: f64 = order
                            .iter()
                            .zip(&ws)
                            .map(|(&j, w)| w / z * (lps[j][pos * v + c] as f64).exp())
                            .sum();
                        row[c] = p.max(1e-30).ln() as f32;
                    }
                }
                Ok(out)
            }
        }
    }

    /// The longest sequence every model takes.
    pub fn max_positions(&self) -> usize {
        match self {
            Evaluated::One(r) => r.max_positions(),
            Evaluated::Btm { models, .. } => models
                .iter()
                .map(Evaluated::max_positions)
                .min()
                .unwrap_or(0),
            Evaluated::Routed { embed, models, .. } => models
                .iter()
                .map(Evaluated::max_positions)
                .chain([embed.max_positions()])
                .min()
                .unwrap_or(0),
        }
    }

    /// Whether anything runs on a GPU.
    fn on_gpu(&self) -> bool {
        match self {
            Evaluated::One(r) => r.on_gpu(),
            Evaluated::Btm { models, .. } => models.iter().any(Evaluated::on_gpu),
            Evaluated::Routed { embed, models, .. } => {
                embed.on_gpu() || models.iter().any(Evaluated::on_gpu)
            }
        }
    }

    /// `f` over `items`: in parallel on the CPU, one after the other on the GPU (one stream).
    fn map<T: Sync, R: Send>(
        &self,
        items: &[T],
        f: impl Fn(&T) -> Result<R> + Sync + Send,
    ) -> Result<Vec<R>> {
        if self.on_gpu() {
            items.iter().map(f).collect()
        } else {
            items.par_iter().map(f).collect()
        }
    }

    /// Mean next-token cross-entropy over validation windows.
    pub fn loss(&self, batches: &[(Vec<u32>, Vec<u32>)], seq: usize) -> Result<f64> {
        let nll = self.token_losses(batches, seq)?;
        Ok(nll.iter().sum::<f64>() / nll.len().max(1) as f64)
    }

    /// Next-token cross-entropy at every target position of the windows (rows of `seq`
    /// tokens), in order: the targets of `batches`, flattened.
    pub fn token_losses(&self, batches: &[(Vec<u32>, Vec<u32>)], seq: usize) -> Result<Vec<f64>> {
        let v = self.vocab();
        let rows: Vec<(&[u32], &[u32])> = batches
            .iter()
            .flat_map(|(i, t)| i.chunks(seq).zip(t.chunks(seq)))
            .collect();
        let parts: Vec<Vec<f64>> = self.map(&rows, |(inp, tgt)| {
            let lp = self.log_probs(inp)?;
            Ok(tgt
                .iter()
                .enumerate()
                .map(|(p, &x)| -(lp[p * v + x as usize] as f64))
                .collect())
        })?;
        Ok(parts.concat())
    }

    /// Greedy continuation of `prompt` for `n` tokens.
    pub fn greedy(&self, prompt: &[u32], n: usize, stop: Option<u32>) -> Result<Vec<u32>> {
        let cfg = SamplingConfig {
            max_new_tokens: n,
            stop_token: stop,
            ..Default::default()
        };
        match self {
            Evaluated::One(r) => generate::generate(*r, prompt, &cfg, |_| {}),
            Evaluated::Routed {
                router,
                embed,
                models,
            } => {
                let k = router.route(*embed, prompt)?;
                ensure!(k < models.len(), "prompt routing: no model for class {k}");
                models[k].greedy(prompt, n, stop)
            }
            Evaluated::Btm { .. } => {
                let v = self.vocab();
                let mut seq = prompt.to_vec();
                let mut out = Vec::new();
                for _ in 0..n {
                    let lp = self.log_probs(&seq)?;
                    let tok = argmax(&lp[(seq.len() - 1) * v..seq.len() * v]);
                    if Some(tok) == stop {
                        break;
                    }
                    out.push(tok);
                    seq.push(tok);
                }
                Ok(out)
            }
        }
    }

    /// Fraction of tasks whose greedy continuation starts with the answer.
    pub fn task_accuracy(&self, tok: &Tokenizer, tasks: &[Task]) -> Result<f64> {
        if tasks.is_empty() {
            return Ok(0.0);
        }
        let hits: Vec<bool> = self.map(tasks, |t| {
            let prompt = tok.encode(&t.prompt)?;
            let n = tok.encode(&t.answer)?.len() + 2;
            let out = self.greedy(&prompt, n, Some(tok.eos_id()))?;
            Ok(t.is_correct(&tok.decode(&out)?))
        })?;
        Ok(hits.iter().filter(|&&h| h).count() as f64 / tasks.len() as f64)
    }
}

/// One domain's evaluation material.
pub struct DomainEval {
    pub name: String,
    pub batches: Vec<(Vec<u32>, Vec<u32>)>,
    pub tasks: Vec<Task>,
}

impl DomainEval {
    pub fn new(
        name: &str,
        data: &Dataset,
        seq: usize,
        max_tokens: usize,
        tasks: Vec<Task>,
    ) -> Result<Self> {
        Ok(DomainEval {
            name: name.into(),
            batches: shards::eval_batches(&data.valid, 8, seq, max_tokens, name)?,
            tasks,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DomainScore {
    pub domain: String,
    pub loss: f64,
    pub ppl: f64,
    pub accuracy: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub model: String,
    pub scores: Vec<DomainScore>,
    pub avg_loss: f64,
    pub avg_accuracy: Option<f64>,
}

pub fn evaluate(
    name: &str,
    e: &Evaluated<'_>,
    domains: &[DomainEval],
    seq: usize,
    tok: Option<&Tokenizer>,
) -> Result<Row> {
    let mut scores = Vec::new();
    for d in domains {
        let loss = e.loss(&d.batches, seq)?;
        let accuracy = match tok {
            Some(t) if !d.tasks.is_empty() => Some(e.task_accuracy(t, &d.tasks)?),
            _ => None,
        };
        scores.push(DomainScore {
            domain: d.name.clone(),
            loss,
            ppl: loss.exp(),
            accuracy,
        });
    }
    let avg_loss = scores.iter().map(|s| s.loss).sum::<f64>() / scores.len().max(1) as f64;
    let accs: Vec<f64> = scores.iter().filter_map(|s| s.accuracy).collect();
    let avg_accuracy = (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64);
    Ok(Row {
        model: name.into(),
        scores,
        avg_loss,
        avg_accuracy,
    })
}

/// Markdown table: one row per model, loss (and accuracy %) per domain, averages.
pub fn markdown(rows: &[Row]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let mut s = String::from("| model |");
    for d in &first.scores {
        s.push_str(&format!(" {} loss | {} acc |", d.domain, d.domain));
    }
    s.push_str(" avg loss | avg acc |\n|---|");
    for _ in &first.scores {
        s.push_str("---:|---:|");
    }
    s.push_str("---:|---:|\n");
    let pct = |a: Option<f64>| a.map(|x| format!("{:.1}", 100.0 * x)).unwrap_or("-".into());
    for r in rows {
        s.push_str(&format!("| {} |", r.model));
        for d in &r.scores {
            s.push_str(&format!(" {:.4} | {} |", d.loss, pct(d.accuracy)));
        }
        s.push_str(&format!(" {:.4} | {} |\n", r.avg_loss, pct(r.avg_accuracy)));
    }
    s
}
