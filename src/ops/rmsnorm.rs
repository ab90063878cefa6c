//! RMSNorm over the last dimension: `y = w * x * rsqrt(mean(x^2) + eps)`, statistics in f32.

use crate::autograd::{Backward, Tape, Var};
use crate::backend::cpu::{alloc_init, chunks, simd, sum_sq, REDUCE_CHUNKS};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Rows per rayon task (a row is 1 KiB at d = 256).
const ROWS: usize = 16;

pub fn rmsnorm(tape: &mut Tape, x: Var, w: Var, eps: f32) -> Var {
    let (xv, wv) = (tape.value(x), tape.value(w));
    let d = xv.cols();
    assert_eq!(
        wv.numel(),
        d,
        "rmsnorm: weight has {} entries, input width {d}",
        wv.numel()
    );
    let n = xv.rows();
    let mut rstd = vec![0f32; n];
    let (xd, wd) = (xv.data(), wv.data());
    // SAFETY: one chunk per row, every element of each row written.
    let y = unsafe {
        alloc_init(n * d, |y| {
            y.par_chunks_mut(d.max(1))
                .zip(rstd.par_iter_mut())
                .with_min_len(ROWS)
                .enumerate()
                .for_each(|(i, (y, r))| {
                    let row = &xd[i * d..(i + 1) * d];
                    *r = 1.0 / (sum_sq(row) / d as f32 + eps).sqrt();
                    simd::rms_scale(y, wd, row, *r);
                })
        })
    };
    let op = RmsBack {
        x: xv.clone(),
        w: wv.clone(),
        rstd,
    };
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
            // SAFETY: one chunk per row, every element of each row written.
            let dx = unsafe {
                alloc_init(n * d, |dx| {
                    dx.par_chunks_mut(d.max(1))
                        .with_min_len(ROWS)
                        .enumerate()
                        .for_each(|(i, dx)| {
                            let (x, gy, r) = (
                                &xd[i * d..(i + 1) * d],
                                &gd[i * d..(i + 1) * d],
                                self.rstd[i],
                            );
                            // dx = r * (w*g - xhat * mean(w*g*xhat)), xhat = x*r
                            let c = simd::dot3(wd, gy, x) * r * r / d as f32;
                            simd::rms_dx(dx, wd, gy, x, r, c);
                        })
                })
            };
            Tensor::from_vec(dx, self.x.shape())
        });
        let dw = needs[1].then(|| {
            // Fixed row partition, partial sums reduced in order: deterministic.
            let parts: Vec<Vec<f32>> = chunks(n, REDUCE_CHUNKS)
                .into_par_iter()
                .map(|rows| {
                    let mut acc = vec![0f32; d];
                    for i in rows {
                        let (x, gy, r) = (
                            &xd[i * d..(i + 1) * d],
                            &gd[i * d..(i + 1) * d],
                            self.rstd[i],
                        );
                        simd::acc_mul(&mut acc, gy, x, r);
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
        vec![dx, dw]
    }
}
