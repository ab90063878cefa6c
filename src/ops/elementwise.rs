//! Elementwise ops: add, scaled add, scale, SwiGLU, and row concatenation.

use crate::autograd::{Backward, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Elements per rayon task in elementwise loops.
const PAR_CHUNK: usize = 1 << 14;

pub fn add(tape: &mut Tape, a: Var, b: Var) -> Var {
    add_scaled(tape, a, b, 1.0)
}

/// `a + alpha * b` (same shapes).
pub fn add_scaled(tape: &mut Tape, a: Var, b: Var, alpha: f32) -> Var {
    let (av, bv) = (tape.value(a), tape.value(b));
    assert_eq!(av.shape(), bv.shape(), "add: shape mismatch");
    let mut y = av.data().to_vec();
    y.par_chunks_mut(PAR_CHUNK).zip(bv.data().par_chunks(PAR_CHUNK)).for_each(|(y, b)| {
        for (yi, bi) in y.iter_mut().zip(b) {
            *yi += alpha * bi;
        }
    });
    let shape = av.shape().to_vec();
    tape.push(Tensor::from_vec(y, &shape), &[a, b], AddBack { alpha })
}

struct AddBack {
    alpha: f32,
}

impl Backward for AddBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let gb = needs[1].then(|| {
            if self.alpha == 1.0 {
                g.clone()
            } else {
                Tensor::from_vec(g.data().iter().map(|x| x * self.alpha).collect(), g.shape())
            }
        });
        vec![needs[0].then(|| g.clone()), gb]
    }
}

pub fn scale(tape: &mut Tape, a: Var, s: f32) -> Var {
    let av = tape.value(a);
    let y: Vec<f32> = av.data().iter().map(|x| x * s).collect();
    let shape = av.shape().to_vec();
    tape.push(Tensor::from_vec(y, &shape), &[a], ScaleBack { s })
}

struct ScaleBack {
    s: f32,
}

impl Backward for ScaleBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        vec![Some(Tensor::from_vec(g.data().iter().map(|x| x * self.s).collect(), g.shape()))]
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU: `silu(gate) * up`.
pub fn swiglu(tape: &mut Tape, gate: Var, up: Var) -> Var {
    let (gv, uv) = (tape.value(gate), tape.value(up));
    assert_eq!(gv.shape(), uv.shape(), "swiglu: shape mismatch");
    let mut y = vec![0f32; gv.numel()];
    y.par_chunks_mut(PAR_CHUNK)
        .zip(gv.data().par_chunks(PAR_CHUNK).zip(uv.data().par_chunks(PAR_CHUNK)))
        .for_each(|(y, (g, u))| {
            for i in 0..y.len() {
                y[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        });
    let op = SwigluBack { gate: gv.clone(), up: uv.clone() };
    let shape = gv.shape().to_vec();
    tape.push(Tensor::from_vec(y, &shape), &[gate, up], op)
}

struct SwigluBack {
    gate: Tensor,
    up: Tensor,
}

impl Backward for SwigluBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let n = g.numel();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        dg.par_chunks_mut(PAR_CHUNK)
            .zip(du.par_chunks_mut(PAR_CHUNK))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let o = c * PAR_CHUNK;
                for i in 0..dg.len() {
                    let (x, u, gy) = (self.gate.data()[o + i], self.up.data()[o + i], g.data()[o + i]);
                    let s = sigmoid(x);
                    dg[i] = gy * u * s * (1.0 + x * (1.0 - s));
                    du[i] = gy * x * s;
                }
            });
        vec![
            needs[0].then(|| Tensor::from_vec(dg, g.shape())),
            needs[1].then(|| Tensor::from_vec(du, g.shape())),
        ]
    }
}

/// Stack `[r_i, C]` inputs into `[sum r_i, C]` (router rows of separately owned experts).
pub fn cat_rows(tape: &mut Tape, parts: &[Var]) -> Var {
    let vals: Vec<&Tensor> = parts.iter().map(|p| tape.value(*p)).collect();
    let rows: Vec<usize> = vals.iter().map(|t| t.rows()).collect();
    let y = Tensor::cat_rows(&vals);
    tape.push(y, parts, CatBack { rows })
}

struct CatBack {
    rows: Vec<usize>,
}

impl Backward for CatBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let mut start = 0;
        self.rows
            .iter()
            .zip(needs)
            .map(|(&r, &need)| {
                let t = need.then(|| g.slice_rows(start, r));
                start += r;
                t
            })
            .collect()
    }
}
