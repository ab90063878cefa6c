//! Token permutation for the MoE block: gather an expert's tokens, and combine the experts'
//! outputs weighted by the routing weights.

use super::router::Routing;
use crate::autograd::{Backward, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// Rows `rows` of `x [N, H]` as `[rows.len(), H]`.
pub fn gather_rows(tape: &mut Tape, x: Var, rows: &Arc<Vec<u32>>) -> Var {
    let xv = tape.value(x);
    let h = xv.cols();
    let mut y = vec![0f32; rows.len() * h];
    y.par_chunks_mut(h).zip(rows.par_iter()).for_each(|(y, &r)| y.copy_from_slice(xv.row(r as usize)));
    let op = GatherBack { rows: rows.clone(), n: xv.rows() };
    tape.push(Tensor::from_vec(y, &[rows.len(), h]), &[x], op)
}

struct GatherBack {
    rows: Arc<Vec<u32>>,
    n: usize,
}

impl Backward for GatherBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        let h = g.cols();
        let mut dx = vec![0f32; self.n * h];
        for (i, &r) in self.rows.iter().enumerate() {
            for (a, b) in dx[r as usize * h..(r as usize + 1) * h].iter_mut().zip(g.row(i)) {
                *a += b;
            }
        }
        vec![Some(Tensor::from_vec(dx, &[self.n, h]))]
    }
}

/// `y[t] = sum_s w[t,s] * out_{e(t,s)}[row(t,s)]`. `outs[e]` is expert e's output over its
/// tokens (`None` for an expert that received none); `weights [N, k]`.
pub fn moe_combine(tape: &mut Tape, outs: &[Option<Var>], weights: Var, routing: &Arc<Routing>) -> Var {
    let r = routing.clone();
    let present: Vec<Var> = outs.iter().flatten().copied().collect();
    let slot_of_expert: Vec<Option<usize>> = {
        let mut i = 0;
        outs.iter().map(|o| o.map(|_| { i += 1; i - 1 })).collect()
    };
    let vals: Vec<Tensor> = present.iter().map(|v| tape.value(*v).clone()).collect();
    let wv = tape.value(weights).clone();
    let h = vals.first().map(|t| t.cols()).unwrap_or(0);
    let (n, k) = (r.n, r.k);
    let mut y = vec![0f32; n * h];
    y.par_chunks_mut(h.max(1)).enumerate().for_each(|(t, y)| {
        for s in 0..k {
            let e = r.indices[t * k + s] as usize;
            let o = &vals[slot_of_expert[e].expect("routed expert has output")];
            let w = wv.data()[t * k + s];
            for (a, b) in y.iter_mut().zip(o.row(r.row_of[t * k + s] as usize)) {
                *a += w * b;
            }
        }
    });
    let mut parents = present.clone();
    parents.push(weights);
    let op = CombineBack { vals, weights: wv, routing: r, slot_of_expert };
    tape.push(Tensor::from_vec(y, &[n, h]), &parents, op)
}

struct CombineBack {
    vals: Vec<Tensor>,
    weights: Tensor,
    routing: Arc<Routing>,
    slot_of_expert: Vec<Option<usize>>,
}

impl Backward for CombineBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let r = &self.routing;
        let (k, h) = (r.k, g.cols());
        let mut out: Vec<Option<Tensor>> = Vec::with_capacity(self.vals.len() + 1);
        for (e, tokens) in r.expert_tokens.iter().enumerate() {
            let Some(slot) = self.slot_of_expert[e] else { continue };
            if !needs[slot] {
                out.push(None);
                continue;
            }
            // Row i of expert e is token tokens[i]; find its slot to read the weight.
            let mut d = vec![0f32; tokens.len() * h];
            d.par_chunks_mut(h).enumerate().for_each(|(i, drow)| {
                let t = tokens[i] as usize;
                let s = (0..k)
                    .find(|&s| r.indices[t * k + s] as usize == e && r.row_of[t * k + s] as usize == i)
                    .expect("routing is consistent");
                let w = self.weights.data()[t * k + s];
                for (a, b) in drow.iter_mut().zip(g.row(t)) {
                    *a = w * b;
                }
            });
            out.push(Some(Tensor::from_vec(d, &[tokens.len(), h])));
        }
        let dw = needs[self.vals.len()].then(|| {
            let mut dw = vec![0f32; r.n * k];
            dw.par_chunks_mut(k).enumerate().for_each(|(t, dwr)| {
                for s in 0..k {
                    let e = r.indices[t * k + s] as usize;
                    let o = &self.vals[self.slot_of_expert[e].unwrap()];
                    dwr[s] = crate::backend::cpu::dot(g.row(t), o.row(r.row_of[t * k + s] as usize));
                }
            });
            Tensor::from_vec(dw, self.weights.shape())
        });
        out.push(dw);
        out
    }
}
