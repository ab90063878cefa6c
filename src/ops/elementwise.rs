//! Elementwise ops: add, scaled add, scale, SwiGLU, and row concatenation.

use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::{alloc_init, simd};
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
    // SAFETY: the chunks cover the output and each kernel call writes its whole chunk.
    let y = unsafe {
        alloc_init(av.numel(), |y| {
            y.par_chunks_mut(PAR_CHUNK)
                .zip(
                    av.data()
                        .par_chunks(PAR_CHUNK)
                        .zip(bv.data().par_chunks(PAR_CHUNK)),
                )
                .for_each(|(y, (a, b))| simd::add_scaled_into(y, a, b, alpha))
        })
    };
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
                Tensor::from_vec(scaled(g.data(), self.alpha), g.shape())
            }
        });
        vec![needs[0].then(|| g.clone()), gb]
    }
}

pub fn scale(tape: &mut Tape, a: Var, s: f32) -> Var {
    let av = tape.value(a);
    let y = scaled(av.data(), s);
    let shape = av.shape().to_vec();
    tape.push(Tensor::from_vec(y, &shape), &[a], ScaleBack { s })
}

struct ScaleBack {
    s: f32,
}

impl Backward for ScaleBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        vec![Some(Tensor::from_vec(scaled(g.data(), self.s), g.shape()))]
    }
}

/// `s * x`, elementwise.
fn scaled(x: &[f32], s: f32) -> Vec<f32> {
    // SAFETY: the chunks cover the output and each element is written.
    unsafe {
        alloc_init(x.len(), |y| {
            y.par_chunks_mut(PAR_CHUNK)
                .zip(x.par_chunks(PAR_CHUNK))
                .for_each(|(y, x)| {
                    for (a, b) in y.iter_mut().zip(x) {
                        a.write(b * s);
                    }
                })
        })
    }
}

/// SwiGLU: `silu(gate) * up`.
pub fn swiglu(tape: &mut Tape, gate: Var, up: Var) -> Var {
    let (gv, uv) = (tape.value(gate), tape.value(up));
    assert_eq!(gv.shape(), uv.shape(), "swiglu: shape mismatch");
    // SAFETY: the chunks cover the output and each kernel call writes its whole chunk.
    let y = unsafe {
        alloc_init(gv.numel(), |y| {
            y.par_chunks_mut(PAR_CHUNK)
                .zip(
                    gv.data()
                        .par_chunks(PAR_CHUNK)
                        .zip(uv.data().par_chunks(PAR_CHUNK)),
                )
                .for_each(|(y, (g, u))| simd::swiglu_fwd(y, g, u))
        })
    };
    let op = SwigluBack {
        gate: gv.clone(),
        up: uv.clone(),
    };
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
        let (gate, up, gy) = (self.gate.data(), self.up.data(), g.data());
        let (mut dg, mut du) = (Vec::<f32>::with_capacity(n), Vec::<f32>::with_capacity(n));
        dg.spare_capacity_mut()[..n]
            .par_chunks_mut(PAR_CHUNK)
            .zip(du.spare_capacity_mut()[..n].par_chunks_mut(PAR_CHUNK))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let r = c * PAR_CHUNK..c * PAR_CHUNK + dg.len();
                simd::swiglu_bwd(dg, du, &gate[r.clone()], &up[r.clone()], &gy[r]);
            });
        // SAFETY: the chunks cover 0..n of both buffers and the kernel writes every element.
        unsafe {
            dg.set_len(n);
            du.set_len(n);
        }
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
