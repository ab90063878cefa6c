//! MoE routing: softmax over all experts of `z + min(b, 0)` in f32, top-k, optional
//! renormalisation of the k weights; and the stable token permutation grouping token copies by
//! expert. Backward gives gradients for the logits and the per-expert bias (the bias gradient
//! passes where `b <= 0`, like `clamp(max=0)`).

use crate::autograd::{Backward, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// Which experts each token uses and where its copies sit in the per-expert batches.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub n: usize,
    pub k: usize,
    pub e: usize,
    /// `[N*k]` expert of each (token, slot); slots in descending probability, ties to the lower id.
    pub indices: Vec<u32>,
    /// Per expert, the tokens routed to it in ascending order (a stable, deterministic grouping).
    pub expert_tokens: Vec<Vec<u32>>,
    /// `[N*k]` row of each (token, slot) copy within its expert's batch.
    pub row_of: Vec<u32>,
}

impl Routing {
    /// Tokens per expert.
    pub fn histogram(&self) -> Vec<usize> {
        self.expert_tokens.iter().map(|t| t.len()).collect()
    }
}

/// Softmax of one row with bias, in place of `p`; returns nothing, writes probabilities.
fn softmax_biased(z: &[f32], bias: Option<&[f32]>, p: &mut [f32]) {
    for (j, x) in z.iter().enumerate() {
        p[j] = x + bias.map_or(0.0, |b| b[j].min(0.0));
    }
    softmax_in_place(p);
}

/// Softmax of one row in place, in f32, in index order: the routing's arithmetic, shared with
/// the serving step's per-row masked routing (`model::infer`).
pub fn softmax_in_place(p: &mut [f32]) {
    let m = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f32;
    for x in p.iter_mut() {
        *x = (*x - m).exp();
        s += *x;
    }
    let inv = 1.0 / s;
    p.iter_mut().for_each(|x| *x *= inv);
}

/// Indices of the k largest entries, descending, ties to the lower index.
fn topk(p: &[f32], k: usize, out: &mut [u32]) {
    let mut idx: Vec<u32> = (0..p.len() as u32).collect();
    idx.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    out.copy_from_slice(&idx[..k]);
}

/// Routing without the tape: `(probs [N,E], weights [N,k], routing)`.
pub fn route_values(
    z: &Tensor,
    bias: Option<&[f32]>,
    k: usize,
    renorm: bool,
) -> (Vec<f32>, Vec<f32>, Routing) {
    let (n, e) = (z.rows(), z.cols());
    assert!(k >= 1 && k <= e, "route: top-k {k} of {e} experts");
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            e,
            "route: bias has {} entries for {e} experts",
            b.len()
        );
    }
    let mut probs = vec![0f32; n * e];
    let mut weights = vec![0f32; n * k];
    let mut indices = vec![0u32; n * k];
    route_rows(
        z.data(),
        bias,
        e,
        k,
        renorm,
        &mut probs,
        &mut weights,
        &mut indices,
    );
    let mut expert_tokens = vec![Vec::new(); e];
    let mut row_of = vec![0u32; n * k];
    for t in 0..n {
        for s in 0..k {
            let ex = indices[t * k + s] as usize;
            row_of[t * k + s] = expert_tokens[ex].len() as u32;
            expert_tokens[ex].push(t as u32);
        }
    }
    (
        probs,
        weights,
        Routing {
            n,
            k,
            e,
            indices,
            expert_tokens,
            row_of,
        },
    )
}

/// Per row of `z` (`[n, e]`): the softmax of `z + min(bias, 0)` into `probs`, the top-k experts
/// (descending probability, ties to the lower id) into `indices` and their weights,
/// renormalised when `renorm`, into `weights`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_rows(
    z: &[f32],
    bias: Option<&[f32]>,
    e: usize,
    k: usize,
    renorm: bool,
    probs: &mut [f32],
    weights: &mut [f32],
    indices: &mut [u32],
) {
    probs
        .par_chunks_mut(e.max(1))
        .zip(weights.par_chunks_mut(k.max(1)))
        .zip(indices.par_chunks_mut(k.max(1)))
        .enumerate()
        .for_each(|(i, ((p, w), idx))| {
            softmax_biased(&z[i * e..(i + 1) * e], bias, p);
            topk(p, k, idx);
            for s in 0..k {
                w[s] = p[idx[s] as usize];
            }
            if renorm {
                let sum: f32 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= sum);
            }
        });
}

/// Route `z [N, E]` (router logits) with an optional bias `[E]`; returns the differentiable
/// weights `[N, k]` and the routing.
pub fn route(tape: &mut Tape, z: Var, bias: Option<Var>, k: usize, renorm: bool) -> (Var, Routing) {
    let zv = tape.value(z).clone();
    let bv = bias.map(|b| tape.value(b).clone());
    let (probs, weights, routing) = route_values(&zv, bv.as_ref().map(|b| b.data()), k, renorm);
    let w = Tensor::from_vec(weights, &[zv.rows(), k]);
    let op = RouteBack {
        probs,
        weights: w.clone(),
        indices: Arc::new(routing.indices.clone()),
        bias: bv,
        k,
        renorm,
    };
    let parents: Vec<Var> = std::iter::once(z).chain(bias).collect();
    (tape.push(w, &parents, op), routing)
}

struct RouteBack {
    probs: Vec<f32>,
    weights: Tensor,
    indices: Arc<Vec<u32>>,
    bias: Option<Tensor>,
    k: usize,
    renorm: bool,
}

impl Backward for RouteBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let k = self.k;
        let n = g.rows();
        let e = self.probs.len() / n.max(1);
        let mut dz = vec![0f32; n * e];
        route_bwd_rows(
            &self.probs,
            self.weights.data(),
            &self.indices,
            g.data(),
            e,
            k,
            self.renorm,
            &mut dz,
        );
        let db = match (&self.bias, needs.get(1)) {
            (Some(b), Some(true)) => {
                let mut db = vec![0f32; e];
                route_bias_grad_into(&dz, b.data(), &mut db);
                Some(Tensor::from_vec(db, b.shape()))
            }
            _ => None,
        };
        let mut out = vec![Some(Tensor::from_vec(dz, &[n, e]))];
        if self.bias.is_some() {
            out.push(db);
        }
        out
    }
}

/// The router logits' gradient `dz [n, e]` from the routing weights' gradient `gw [n, k]`,
/// given the probabilities, weights and top-k indices of the forward.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_bwd_rows(
    probs: &[f32],
    weights: &[f32],
    indices: &[u32],
    gw: &[f32],
    e: usize,
    k: usize,
    renorm: bool,
    dz: &mut [f32],
) {
    dz.par_chunks_mut(e.max(1))
        .enumerate()
        .for_each(|(i, dzr)| {
            let p = &probs[i * e..(i + 1) * e];
            let (gw, w, idx) = (
                &gw[i * k..(i + 1) * k],
                &weights[i * k..(i + 1) * k],
                &indices[i * k..(i + 1) * k],
            );
            // dL/dp for the selected experts.
            let mut dp = vec![0f32; e];
            if renorm {
                let sum_p: f32 = idx.iter().map(|&j| p[j as usize]).sum();
                let gw_w: f32 = gw.iter().zip(w).map(|(a, b)| a * b).sum();
                for s in 0..k {
                    dp[idx[s] as usize] = (gw[s] - gw_w) / sum_p;
                }
            } else {
                for s in 0..k {
                    dp[idx[s] as usize] = gw[s];
                }
            }
            let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
            for j in 0..e {
                dzr[j] = p[j] * (dp[j] - dot);
            }
        });
}

/// The bias gradient `db [e]`: column sums of `dz [n, e]` in row order, zero where `bias > 0`
/// (the bias enters as `min(b, 0)`).
pub(crate) fn route_bias_grad_into(dz: &[f32], bias: &[f32], db: &mut [f32]) {
    let e = db.len();
    db.iter_mut().for_each(|x| *x = 0.0);
    for row in dz.chunks(e.max(1)) {
        for j in 0..e {
            db[j] += row[j];
        }
    }
    for j in 0..e {
        if bias[j] > 0.0 {
            db[j] = 0.0;
        }
    }
}
