//! Fused softmax cross-entropy with LM z-loss, and the router z-loss.

use crate::autograd::{Backward, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

pub use crate::backend::shapes::IGNORE;

pub struct CrossEntropyOut {
    /// `mean(ce) + z_coef * mean(lse^2)` over non-ignored rows, differentiable.
    pub loss: Var,
    /// Mean cross-entropy alone (for reporting).
    pub ce: f32,
    pub n_valid: usize,
}

use crate::backend::cpu::alloc_init;
use crate::backend::cpu::simd::{self, logsumexp};

/// Rows per rayon task in the row-wise loops (a row of a 4096-entry vocabulary is 16 KiB).
const ROWS_PER_TASK: usize = 16;

/// Cross-entropy of `logits [N, V]` against `targets [N]` plus `z_coef * lse^2`, averaged over
/// the rows whose target is not [`IGNORE`]. The softmax is recomputed in backward.
pub fn cross_entropy(
    tape: &mut Tape,
    logits: Var,
    targets: &[u32],
    z_coef: f32,
) -> CrossEntropyOut {
    let lv = tape.value(logits);
    let (n, v) = (lv.rows(), lv.cols());
    assert_eq!(
        targets.len(),
        n,
        "cross_entropy: {} targets for {n} rows",
        targets.len()
    );
    assert!(
        targets.iter().all(|&t| t == IGNORE || (t as usize) < v),
        "cross_entropy: a target out of range (vocab {v})"
    );
    let per_row = ce_rows(lv.data(), v, targets);
    let n_valid = targets.iter().filter(|&&t| t != IGNORE).count();
    let denom = n_valid.max(1) as f64;
    let ce = per_row.iter().map(|r| r.0 as f64).sum::<f64>() / denom;
    let z = per_row.iter().map(|r| (r.1 as f64).powi(2)).sum::<f64>() / denom;
    let total = ce + z_coef as f64 * z;
    let lse: Vec<f32> = per_row.iter().map(|r| r.1).collect();
    let op = CeBack {
        logits: lv.clone(),
        targets: Arc::new(targets.to_vec()),
        lse,
        z_coef,
        denom: denom as f32,
    };
    let loss = tape.push(Tensor::scalar(total as f32), &[logits], op);
    CrossEntropyOut {
        loss,
        ce: ce as f32,
        n_valid,
    }
}

/// Per row of `logits` (`[n, v]`): `(lse - x_t, lse)`, `(0, 0)` for an ignored target (every
/// target checked in range by the caller).
pub(crate) fn ce_rows(logits: &[f32], v: usize, targets: &[u32]) -> Vec<(f32, f32)> {
    logits
        .par_chunks(v.max(1))
        .zip(targets.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .map(|(row, &t)| {
            if t == IGNORE {
                return (0.0, 0.0);
            }
            let lse = logsumexp(row);
            (lse - row[t as usize], lse)
        })
        .collect()
}

struct CeBack {
    logits: Tensor,
    targets: Arc<Vec<u32>>,
    lse: Vec<f32>,
    z_coef: f32,
    denom: f32,
}

impl Backward for CeBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        let v = self.logits.cols();
        let scale = g.data()[0] / self.denom;
        let ld = self.logits.data();
        let fill = |d: &mut [MaybeUninit<f32>]| {
            d.par_chunks_mut(v.max(1))
                .with_min_len(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(i, drow)| {
                    let t = self.targets[i];
                    if t == IGNORE {
                        drow.iter_mut().for_each(|x| {
                            x.write(0.0);
                        });
                        return;
                    }
                    let lse = self.lse[i];
                    let row = &ld[i * v..(i + 1) * v];
                    // d/dx [lse - x_t + z lse^2] = softmax * (1 + 2 z lse) - onehot(t)
                    let f = scale * (1.0 + 2.0 * self.z_coef * lse);
                    simd::exp_sub_scale_into(drow, row, lse, f);
                    // SAFETY: the kernel just initialised the whole row.
                    let dt = unsafe { drow[t as usize].assume_init_mut() };
                    *dt -= scale;
                })
        };
        // SAFETY: one chunk per row; every row is written (zeros for ignored targets).
        let d = unsafe { alloc_init(self.logits.numel(), fill) };
        vec![Some(Tensor::from_vec(d, self.logits.shape()))]
    }
}

/// Router z-loss: `mean_n logsumexp(z_n)^2` for router logits `z [N, E]`.
pub fn logsumexp_sq_mean(tape: &mut Tape, z: Var) -> Var {
    let zv = tape.value(z);
    let (n, e) = (zv.rows(), zv.cols());
    let lse: Vec<f32> = zv
        .data()
        .par_chunks(e.max(1))
        .with_min_len(256)
        .map(logsumexp)
        .collect();
    let mean = lse.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n.max(1) as f64;
    let op = ZBack { z: zv.clone(), lse };
    tape.push(Tensor::scalar(mean as f32), &[z], op)
}

struct ZBack {
    z: Tensor,
    lse: Vec<f32>,
}

impl Backward for ZBack {
    fn backward(&self, g: &Tensor, _needs: &[bool]) -> Vec<Option<Tensor>> {
        let (n, e) = (self.z.rows(), self.z.cols());
        let scale = g.data()[0] * 2.0 / n.max(1) as f32;
        let mut d = vec![0f32; n * e];
        d.par_chunks_mut(e.max(1) * 256)
            .zip(self.z.data().par_chunks(e.max(1) * 256))
            .enumerate()
            .for_each(|(c, (d, z))| {
                for (r, (drow, zrow)) in d.chunks_mut(e).zip(z.chunks(e)).enumerate() {
                    let lse = self.lse[c * 256 + r];
                    simd::exp_sub_scale_into(drow, zrow, lse, scale * lse);
                }
            });
        vec![Some(Tensor::from_vec(d, self.z.shape()))]
    }
}

/// Relative squared error of `a` against `b` (`[N, H]` each) over the marked rows:
/// `sum_i |a_i - b_i|^2 / sum_i |b_i|^2` for the rows i with `rows[i]`; 0 when none is marked.
/// Expert training uses it on public rows, with `a` the MoE layer's output and `b` the public
/// FFN's alone: how far the new expert moves public text away from the public model.
pub fn rel_sq_err(tape: &mut Tape, a: Var, b: Var, rows: &Arc<Vec<bool>>) -> Var {
    let (av, bv) = (tape.value(a), tape.value(b));
    assert_eq!(av.shape(), bv.shape(), "rel_sq_err: shape mismatch");
    assert_eq!(
        rows.len(),
        av.rows(),
        "rel_sq_err: {} row flags for {} rows",
        rows.len(),
        av.rows()
    );
    let (mut s, mut t) = (0f64, 0f64);
    for i in (0..av.rows()).filter(|&i| rows[i]) {
        for (x, y) in av.row(i).iter().zip(bv.row(i)) {
            s += ((x - y) as f64).powi(2);
            t += (*y as f64).powi(2);
        }
    }
    let value = if t > 0.0 { s / t } else { 0.0 };
    let op = RelErrBack {
        a: av.clone(),
        b: bv.clone(),
        rows: rows.clone(),
        s,
        t,
    };
    tape.push(Tensor::scalar(value as f32), &[a, b], op)
}

struct RelErrBack {
    a: Tensor,
    b: Tensor,
    rows: Arc<Vec<bool>>,
    s: f64,
    t: f64,
}

impl Backward for RelErrBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let (n, h) = (self.a.rows(), self.a.cols());
        let mut da = vec![0f32; n * h];
        let mut db = vec![0f32; n * h];
        if self.t > 0.0 {
            let g = g.data()[0] as f64;
            let (ca, cb) = (2.0 * g / self.t, 2.0 * g * self.s / (self.t * self.t));
            for i in (0..n).filter(|&i| self.rows[i]) {
                for j in 0..h {
                    let (x, y) = (self.a.row(i)[j] as f64, self.b.row(i)[j] as f64);
                    da[i * h + j] = (ca * (x - y)) as f32;
                    db[i * h + j] = (-ca * (x - y) - cb * y) as f32;
                }
            }
        }
        vec![
            needs[0].then(|| Tensor::from_vec(da, &[n, h])),
            needs[1].then(|| Tensor::from_vec(db, &[n, h])),
        ]
    }
}

/// How much louder `a` is than `b` (`[N, H]` each): `max(0, sum |a|^2 / sum |b|^2 - 1)`, the
/// sums over every element; 0 when `b` is all zero. Expert training uses it with `a` the new
/// expert's FFN output and `b` the public FFN's: under the post-FFN norm an expert can outvote
/// its router by being louder, and a loud expert that is routed a little to text it was never
/// trained on (another owner's, after the merge) moves that text a lot.
pub fn excess_energy(tape: &mut Tape, a: Var, b: Var) -> Var {
    let (av, bv) = (tape.value(a), tape.value(b));
    assert_eq!(av.shape(), bv.shape(), "excess_energy: shape mismatch");
    let sa: f64 = av.data().iter().map(|&x| (x as f64).powi(2)).sum();
    let sb: f64 = bv.data().iter().map(|&x| (x as f64).powi(2)).sum();
    let value = if sb > 0.0 {
        (sa / sb - 1.0).max(0.0)
    } else {
        0.0
    };
    let op = ExcessEnergyBack {
        a: av.clone(),
        b: bv.clone(),
        sa,
        sb,
        active: value > 0.0,
    };
    tape.push(Tensor::scalar(value as f32), &[a, b], op)
}

struct ExcessEnergyBack {
    a: Tensor,
    b: Tensor,
    sa: f64,
    sb: f64,
    active: bool,
}

impl Backward for ExcessEnergyBack {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Vec<Option<Tensor>> {
        let g = g.data()[0] as f64;
        let (ca, cb) = if self.active {
            (2.0 * g / self.sb, -2.0 * g * self.sa / (self.sb * self.sb))
        } else {
            (0.0, 0.0)
        };
        let scale = |t: &Tensor, c: f64| {
            Tensor::from_vec(
                t.data().iter().map(|&x| (c * x as f64) as f32).collect(),
                t.shape(),
            )
        };
        vec![
            needs[0].then(|| scale(&self.a, ca)),
            needs[1].then(|| scale(&self.b, cb)),
        ]
    }
}
