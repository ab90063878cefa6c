//! Token permutation for the MoE block: gather an expert's tokens, and combine the experts'
//! outputs weighted by the routing weights.

use super::router::Routing;
use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::alloc_init;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Rows `rows` of `x [N, H]` as `[rows.len(), H]`.
pub fn gather_rows(tape: &mut Tape, x: Var, rows: &Arc<Vec<u32>>) -> Var {
    let xv = tape.value(x);
    let h = xv.cols();
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(h.max(1))
            .zip(rows.par_iter())
            .with_min_len(16)
            .for_each(|(y, &r)| {
                y.iter_mut().zip(xv.row(r as usize)).for_each(|(a, b)| {
                    a.write(*b);
                })
            })
    };
    // SAFETY: one chunk per gathered row, each copied in full.
    let y = unsafe { alloc_init(rows.len() * h, fill) };
    let op = GatherBack {
        rows: rows.clone(),
        n: xv.rows(),
    };
    tape.push(Tensor::from_vec(y, &[rows.len(), h]), &[x], op)
}

struct GatherBack {
    rows: Arc<Vec<u32>>,
    n: usize,
}

impl Backward for GatherBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        let h = g.cols();
        if self.rows.windows(2).all(|w| w[0] < w[1]) {
            // Distinct rows (an expert's token list is ascending): a parallel scatter, each
            // destination row written once, rows no token maps to with zeros.
            let mut src_of = vec![u32::MAX; self.n];
            for (i, &r) in self.rows.iter().enumerate() {
                src_of[r as usize] = i as u32;
            }
            let fill = |dx: &mut [MaybeUninit<f32>]| {
                dx.par_chunks_mut(h.max(1))
                    .zip(src_of.par_iter())
                    .with_min_len(64)
                    .for_each(|(d, &i)| {
                        if i != u32::MAX {
                            d.iter_mut().zip(g.row(i as usize)).for_each(|(a, b)| {
                                a.write(*b);
                            });
                        } else {
                            d.iter_mut().for_each(|a| {
                                a.write(0.0);
                            });
                        }
                    })
            };
            // SAFETY: one chunk per destination row, each written in full.
            let dx = unsafe { alloc_init(self.n * h, fill) };
            return vec![Some(Tensor::from_vec(dx, &[self.n, h]))];
        }
        // General gather (repeated rows): serial scatter-add.
        let mut dx = vec![0f32; self.n * h];
        for (i, &r) in self.rows.iter().enumerate() {
            for (a, b) in dx[r as usize * h..(r as usize + 1) * h]
                .iter_mut()
                .zip(g.row(i))
            {
                *a += b;
            }
        }
        vec![Some(Tensor::from_vec(dx, &[self.n, h]))]
    }
}

/// `y[t] = sum_s w[t,s] * out_{e(t,s)}[row(t,s)]`. `outs[e]` is expert e's output over its
/// tokens (`None` for an expert that received none); `weights [N, k]`.
pub fn moe_combine(
    tape: &mut Tape,
    outs: &[Option<Var>],
    weights: Var,
    routing: &Arc<Routing>,
) -> Var {
    let r = routing.clone();
    let present: Vec<Var> = outs.iter().flatten().copied().collect();
    let slot_of_expert: Vec<Option<usize>> = {
        let mut i = 0;
        outs.iter()
            .map(|o| {
                o.map(|_| {
                    i += 1;
                    i - 1
                })
            })
            .collect()
    };
    let vals: Vec<Tensor> = present.iter().map(|v| tape.value(*v).clone()).collect();
    let wv = tape.value(weights).clone();
    let h = vals.first().map(|t| t.cols()).unwrap_or(0);
    let (n, k) = (r.n, r.k);
    assert!(k >= 1 || n == 0, "moe_combine: top-k must be at least 1");
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(h.max(1))
            .with_min_len(16)
            .enumerate()
            .for_each(|(t, y)| {
                for s in 0..k {
                    let e = r.indices[t * k + s] as usize;
                    let o = &vals[slot_of_expert[e].expect("routed expert has output")];
                    let w = wv.data()[t * k + s];
                    let src = o.row(r.row_of[t * k + s] as usize);
                    if s == 0 {
                        y.iter_mut().zip(src).for_each(|(a, b)| {
                            a.write(w * b);
                        });
                    } else {
                        // SAFETY: slot 0 initialised the whole row.
                        let y = unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) };
                        y.iter_mut().zip(src).for_each(|(a, b)| *a += w * b);
                    }
                }
            })
    };
    // SAFETY: one chunk per token row, written in full by its first slot (k >= 1).
    let y = unsafe { alloc_init(n * h, fill) };
    let mut parents = present.clone();
    parents.push(weights);
    let op = CombineBack {
        vals,
        weights: wv,
        routing: r,
        slot_of_expert,
    };
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
            let Some(slot) = self.slot_of_expert[e] else {
                continue;
            };
            if !needs[slot] {
                out.push(None);
                continue;
            }
            // Row i of expert e is token tokens[i]; find its slot to read the weight.
            let fill = |d: &mut [MaybeUninit<f32>]| {
                d.par_chunks_mut(h.max(1))
                    .with_min_len(16)
                    .enumerate()
                    .for_each(|(i, drow)| {
                        let t = tokens[i] as usize;
                        let s = (0..k)
                            .find(|&s| {
                                r.indices[t * k + s] as usize == e
                                    && r.row_of[t * k + s] as usize == i
                            })
                            .expect("routing is consistent");
                        let w = self.weights.data()[t * k + s];
                        for (a, b) in drow.iter_mut().zip(g.row(t)) {
                            a.write(w * b);
                        }
                    })
            };
            // SAFETY: one chunk per expert row, each written in full.
            let d = unsafe { alloc_init(tokens.len() * h, fill) };
            out.push(Some(Tensor::from_vec(d, &[tokens.len(), h])));
        }
        let dw = needs[self.vals.len()].then(|| {
            let mut dw = vec![0f32; r.n * k];
            dw.par_chunks_mut(k).enumerate().for_each(|(t, dwr)| {
                for s in 0..k {
                    let e = r.indices[t * k + s] as usize;
                    let o = &self.vals[self.slot_of_expert[e].unwrap()];
                    dwr[s] =
                        crate::backend::cpu::dot(g.row(t), o.row(r.row_of[t * k + s] as usize));
                }
            });
            Tensor::from_vec(dw, self.weights.shape())
        });
        out.push(dw);
        out
    }
}
