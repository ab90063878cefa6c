//! RMSNorm over the last dimension: `y = w * x * rsqrt(mean(x^2) + eps)`, statistics in f32.

use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::{chunks, dot, sum_sq, REDUCE_CHUNKS};
use crate::tensor::Tensor;
use rayon::prelude::*;

pub fn rmsnorm(tape: &mut Tape, x: Var, w: Var, eps: f32) -> Var {
    let (xv, wv) = (tape.value(x), tape.value(w));
    let d = xv.cols();
    assert_eq!(wv.numel(), d, "rmsnorm: weight has {} entries, input width {d}", wv.numel());
    let n = xv.rows();
    let mut y = vec![0f32; n * d];
    let mut rstd = vec![0f32; n];
    let (xd, wd) = (xv.data(), wv.data());
    y.par_chunks_mut(d).zip(rstd.par_iter_mut()).enumerate().for_each(|(i, (y, r))| {
        let row = &xd[i * d..(i + 1) * d];
        *r = 1.0 / (sum_sq(row) / d as f32 + eps).sqrt();
        for j in 0..d {
            y[j] = wd[j] * (row[j] * *r);
        }
    });
    let op = RmsBack { x: xv.clone(), w: wv.clone(), rstd };
    let shape = xv.shape().to_vec();
    tape.push(Tensor::from_vec(y, &shape), &[x, w], op)
}

struct RmsBack {
    x: Tensor,
    w: Tensor,
    rstd: Vec<f32>,
}

impl Backward for RmsBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let d = self.x.cols();
        let n = self.x.rows();
        let (xd, wd, gd) = (self.x.data(), self.w.data(), g.data());
        let dx = needs[0].then(|| {
            let mut dx = vec![0f32; n * d];
            dx.par_chunks_mut(d).enumerate().for_each(|(i, dx)| {
                let (x, gy, r) = (&xd[i * d..(i + 1) * d], &gd[i * d..(i + 1) * d], self.rstd[i]);
                // dx = r * (w*g - xhat * mean(w*g*xhat)), xhat = x*r
                let mut wg_x = 0f32;
                for j in 0..d {
                    wg_x += wd[j] * gy[j] * x[j];
                }
                let c = wg_x * r * r / d as f32;
                for j in 0..d {
                    dx[j] = r * (wd[j] * gy[j] - x[j] * c);
                }
            });
            Tensor::from_vec(dx, self.x.shape())
        });
        let dw = needs[1].then(|| {
            // Fixed row partition, partial sums reduced in order: deterministic.
            let parts: Vec<Vec<f32>> = chunks(n, REDUCE_CHUNKS)
                .into_par_iter()
                .map(|rows| {
                    let mut acc = vec![0f32; d];
                    for i in rows {
                        let (x, gy, r) = (&xd[i * d..(i + 1) * d], &gd[i * d..(i + 1) * d], self.rstd[i]);
                        for j in 0..d {
                            acc[j] += gy[j] * x[j] * r;
                        }
                    }
                    acc
                })
                .collect();
            let mut dw = vec![0f32; d];
            for p in parts {
                for j in 0..d {
                    dw[j] += p[j];
                }
            }
            Tensor::from_vec(dw, self.w.shape())
        });
        let _ = dot;
        vec![dx, dw]
    }
}
