//! Prompt-based routing, a baseline of the FlexOlmo paper: a classifier reads an embedding of
//! the query and sends the whole sequence to one model (the public model or one dense expert).
//!
//! The embedding ([`QueryEmbedder`]) is the mean of the public model's final hidden states over
//! the first `prompt_tokens` tokens, or a sentence encoder's embedding of those tokens' text (the
//! paper's choice; `model::encoder`). The classifier is a softmax regression on standardised embeddings, trained on what a model builder
//! may see: public text and a few labelled queries per domain. In held-out loss evaluation the
//! first `prompt_tokens` tokens of each window are the query, and the chosen model scores the
//! whole window.

use crate::data::Tokenizer;
use crate::ensure;
use crate::error::Result;
use crate::model::encoder::Encoder;
use crate::model::runner::Runner;

/// What embeds a query for the router.
#[derive(Clone, Copy)]
pub enum QueryEmbedder<'a> {
    /// The mean final hidden state of a model (the public model).
    Model(Runner<'a>),
    /// A sentence encoder's embedding of the query's text (`tok` turns the ids back into it).
    Encoder {
        enc: &'a Encoder,
        tok: &'a Tokenizer,
    },
}

impl QueryEmbedder<'_> {
    /// The embedding of the first `prompt_tokens` tokens of `ids`.
    pub fn embed(&self, ids: &[u32], prompt_tokens: usize) -> Result<Vec<f64>> {
        ensure!(!ids.is_empty(), "prompt routing: an empty query");
        let q = &ids[..ids.len().min(prompt_tokens)];
        match self {
            QueryEmbedder::Model(model) => {
                let h = model.final_hidden(q, 1, q.len())?;
                let d = h.cols();
                let mut e = vec![0f64; d];
                for r in 0..q.len() {
                    for (a, &b) in e.iter_mut().zip(h.row(r)) {
                        *a += b as f64 / q.len() as f64;
                    }
                }
                Ok(e)
            }
            QueryEmbedder::Encoder { enc, tok } => Ok(enc
                .embed(&tok.decode(q)?)?
                .into_iter()
                .map(f64::from)
                .collect()),
        }
    }

    pub fn on_gpu(&self) -> bool {
        matches!(self, QueryEmbedder::Model(r) if r.on_gpu())
    }

    /// The longest query it takes.
    pub fn max_positions(&self) -> usize {
        match self {
            QueryEmbedder::Model(r) => r.max_positions(),
            QueryEmbedder::Encoder { .. } => usize::MAX,
        }
    }
}

/// A trained prompt router.
pub struct PromptRouter {
    /// The class (domain) names, in the order of the models they route to.
    pub classes: Vec<String>,
    pub prompt_tokens: usize,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    /// `[classes, dim + 1]`: weights and bias.
    w: Vec<f64>,
    /// Accuracy on the training queries.
    pub train_accuracy: f64,
}

/// Gradient steps of the regression (full batch).
const STEPS: usize = 500;
const LR: f64 = 0.5;
const L2: f64 = 1e-3;

impl PromptRouter {
    /// Train on labelled queries `(ids, class)`.
    pub fn train(
        model: QueryEmbedder<'_>,
        examples: &[(Vec<u32>, usize)],
        classes: Vec<String>,
        prompt_tokens: usize,
    ) -> Result<Self> {
        ensure!(
            prompt_tokens >= 1,
            "prompt routing needs at least one query token"
        );
        let c = classes.len();
        ensure!(c >= 2, "prompt routing needs at least two models");
        for (k, name) in classes.iter().enumerate() {
            ensure!(
                examples.iter().any(|(_, y)| *y == k),
                "prompt routing: no labelled query for '{name}'"
            );
        }
        ensure!(
            examples.iter().all(|(_, y)| *y < c),
            "prompt routing: a label out of range"
        );
        let xs: Vec<Vec<f64>> = examples
            .iter()
            .map(|(ids, _)| model.embed(ids, prompt_tokens))
            .collect::<Result<_>>()?;
        let d = xs[0].len();
        let n = xs.len() as f64;
        let mean: Vec<f64> = (0..d)
            .map(|j| xs.iter().map(|x| x[j]).sum::<f64>() / n)
            .collect();
        let inv_std: Vec<f64> = (0..d)
            .map(|j| {
                let v = xs.iter().map(|x| (x[j] - mean[j]).powi(2)).sum::<f64>() / n;
                1.0 / (v.sqrt() + 1e-6)
            })
            .collect();
        let feats: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| {
                let mut f: Vec<f64> = (0..d).map(|j| (x[j] - mean[j]) * inv_std[j]).collect();
                f.push(1.0);
                f
            })
            .collect();
        let mut r = PromptRouter {
            classes,
            prompt_tokens,
            mean,
            inv_std,
            w: vec![0f64; c * (d + 1)],
            train_accuracy: 0.0,
        };
        for _ in 0..STEPS {
            let mut grad = vec![0f64; c * (d + 1)];
            for (f, (_, y)) in feats.iter().zip(examples) {
                let p = r.probs(f);
                for k in 0..c {
                    let g = (p[k] - f64::from(u8::from(k == *y))) / n;
                    for (gj, fj) in grad[k * (d + 1)..(k + 1) * (d + 1)].iter_mut().zip(f) {
                        *gj += g * fj;
                    }
                }
            }
            for (w, g) in r.w.iter_mut().zip(&grad) {
                *w -= LR * (g + L2 * *w);
            }
        }
        let hits = feats
            .iter()
            .zip(examples)
            .filter(|(f, (_, y))| argmax(&r.probs(f)) == *y)
            .count();
        r.train_accuracy = hits as f64 / n;
        Ok(r)
    }

    fn probs(&self, f: &[f64]) -> Vec<f64> {
        let d1 = f.len();
        let z: Vec<f64> = self
            .w
            .chunks(d1)
            .map(|w| w.iter().zip(f).map(|(a, b)| a * b).sum())
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// The class (model index) for a query.
    pub fn route(&self, model: QueryEmbedder<'_>, ids: &[u32]) -> Result<usize> {
        let x = model.embed(ids, self.prompt_tokens)?;
        ensure!(
            x.len() == self.mean.len(),
            "prompt routing: the embedding model changed width"
        );
        let mut f: Vec<f64> = x
            .iter()
            .zip(&self.mean)
            .zip(&self.inv_std)
            .map(|((x, m), s)| (x - m) * s)
            .collect();
        f.push(1.0);
        Ok(argmax(&self.probs(&f)))
    }
}

fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Config, Model};

    /// Queries of two kinds the model tells apart (different token ranges) are routed to their
    /// own class, on the training queries and on new ones.
    #[test]
    fn separable_queries_are_routed_to_their_class() {
        let m = Model::new_random(&Config::olmo2(64, 16, 32, 1, 2, 2), 4).unwrap();
        let r = QueryEmbedder::Model(Runner::Cpu(&m));
        let query = |class: usize, i: u32| -> Vec<u32> {
            (0..8)
                .map(|j| class as u32 * 32 + (i * 7 + j * 3) % 32)
                .collect()
        };
        let ex: Vec<(Vec<u32>, usize)> = (0..2)
            .flat_map(|c| (0..12).map(move |i| (query(c, i), c)))
            .collect();
        let router = PromptRouter::train(r, &ex, vec!["a".into(), "b".into()], 8).unwrap();
        assert_eq!(router.train_accuracy, 1.0);
        for c in 0..2 {
            for i in 20..26 {
                assert_eq!(router.route(r, &query(c, i)).unwrap(), c);
            }
        }
        assert!(PromptRouter::train(r, &ex[..12], vec!["a".into(), "b".into()], 8).is_err());
    }
}
