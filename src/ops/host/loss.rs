//! The loss kernels on the CPU: the fused cross-entropy with z-loss, the router z-loss and
//! router cross-entropy, and the relative squared error of the public anchor (the arithmetic of
//! the tape's ops in src/ops/loss.rs).

use crate::backend::cpu::simd::{self, logsumexp};
use crate::backend::kernels::CeStats;
use crate::backend::shapes::IGNORE;
use crate::ensure;
use crate::error::Result;
use rayon::prelude::*;

/// Rows per rayon task.
const ROWS: usize = 16;

/// A cross-entropy forward: its scalars and what the backward needs.
pub struct HostCe {
    pub stats: CeStats,
    lse: Vec<f32>,
    targets: Vec<u32>,
    z_coef: f32,
    v: usize,
}

impl HostCe {
    pub(super) fn new(
        logits: &[f32],
        n: usize,
        v: usize,
        targets: &[u32],
        z_coef: f32,
    ) -> Result<HostCe> {
        ensure!(
            logits.len() == n * v && targets.len() == n,
            "cross-entropy: {} logits and {} targets for {n} rows of {v}",
            logits.len(),
            targets.len()
        );
        if let Some(bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
            crate::bail!("cross-entropy: target {bad} out of range (vocab {v})");
        }
        let per_row = crate::ops::loss::ce_rows(logits, v, targets);
        let n_valid = targets.iter().filter(|&&t| t != IGNORE).count();
        let denom = n_valid.max(1) as f64;
        let ce = per_row.iter().map(|r| r.0 as f64).sum::<f64>() / denom;
        let z = per_row.iter().map(|r| (r.1 as f64).powi(2)).sum::<f64>() / denom;
        Ok(HostCe {
            stats: CeStats {
                loss: (ce + z_coef as f64 * z) as f32,
                ce: ce as f32,
                n_valid,
            },
            lse: per_row.iter().map(|r| r.1).collect(),
            targets: targets.to_vec(),
            z_coef,
            v,
        })
    }

    /// `dlogits = dloss / n_valid * (softmax * (1 + 2 z lse) - onehot)`, zero rows for ignored
    /// targets.
    pub(super) fn backward(&self, logits: &[f32], dloss: f32, d: &mut [f32]) -> Result<()> {
        let v = self.v;
        ensure!(
            logits.len() == self.targets.len() * v && d.len() == logits.len(),
            "cross-entropy backward: sizes do not match"
        );
        let scale = dloss / self.stats.n_valid.max(1) as f32;
        d.par_chunks_mut(v.max(1))
            .with_min_len(ROWS)
            .enumerate()
            .for_each(|(i, drow)| {
                let t = self.targets[i];
                if t == IGNORE {
                    drow.iter_mut().for_each(|x| *x = 0.0);
                    return;
                }
                let lse = self.lse[i];
                let f = scale * (1.0 + 2.0 * self.z_coef * lse);
                simd::exp_sub_scale_into(drow, &logits[i * v..(i + 1) * v], lse, f);
                drow[t as usize] -= scale;
            });
        Ok(())
    }
}

/// `mean_n lse(z_n)^2`, the per-row lse written to `lse`.
pub(super) fn router_zloss(z: &[f32], n: usize, e: usize, lse: &mut [f32]) -> Result<f32> {
    ensure!(
        z.len() == n * e && lse.len() == n,
        "router z-loss: sizes do not match"
    );
    lse.par_iter_mut()
        .zip(z.par_chunks(e.max(1)))
        .with_min_len(256)
        .for_each(|(l, row)| *l = logsumexp(row));
    Ok((lse.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n.max(1) as f64) as f32)
}

/// `dz = dloss * 2/n * lse * softmax(z)`.
pub(super) fn router_zloss_bwd(
    z: &[f32],
    lse: &[f32],
    n: usize,
    e: usize,
    dloss: f32,
    dz: &mut [f32],
) -> Result<()> {
    ensure!(
        z.len() == n * e && lse.len() == n && dz.len() == n * e,
        "router z-loss backward: sizes do not match"
    );
    let scale = dloss * 2.0 / n.max(1) as f32;
    dz.par_chunks_mut(e.max(1))
        .zip(z.par_chunks(e.max(1)))
        .zip(lse.par_iter())
        .with_min_len(256)
        .for_each(|((d, row), &l)| simd::exp_sub_scale_into(d, row, l, scale * l));
    Ok(())
}

/// `coef * mean(ce(z, targets))` over the valid rows, its gradient added to `dz`.
pub(super) fn router_ce(
    z: &[f32],
    targets: &[u32],
    n: usize,
    e: usize,
    coef: f32,
    dz: &mut [f32],
) -> Result<f32> {
    ensure!(
        z.len() == n * e && targets.len() == n && dz.len() == n * e,
        "router cross-entropy: sizes do not match"
    );
    if let Some(bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= e) {
        crate::bail!("router cross-entropy: target {bad} out of range ({e} experts)");
    }
    let n_valid = targets.iter().filter(|&&t| t != IGNORE).count();
    if n_valid == 0 {
        return Ok(0.0);
    }
    let f = coef / n_valid as f32;
    let ce: f64 = dz
        .par_chunks_mut(e.max(1))
        .zip(z.par_chunks(e.max(1)))
        .zip(targets.par_iter())
        .with_min_len(256)
        .map(|((d, row), &t)| {
            if t == IGNORE {
                return 0.0;
            }
            let lse = logsumexp(row);
            let mut g = vec![0f32; e];
            simd::exp_sub_scale_into(&mut g[..], row, lse, f);
            g[t as usize] -= f;
            d.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            (lse - row[t as usize]) as f64
        })
        .sum();
    Ok((coef as f64 * ce / n_valid as f64) as f32)
}

/// `S / T` (`S = sum |a - b|^2`, `T = sum |b|^2` over the rows `mask` marks; 0 when T is 0) and
/// `[S, T]`.
pub(super) fn rel_sq_err(
    a: &[f32],
    b: &[f32],
    mask: &[u32],
    n: usize,
    h: usize,
) -> Result<(f32, [f64; 2])> {
    ensure!(
        a.len() == n * h && b.len() == n * h && mask.len() == n,
        "relative squared error: sizes do not match"
    );
    // Per block of rows, partial sums; the blocks' sums added in order (deterministic).
    let parts: Vec<(f64, f64)> = crate::backend::cpu::chunks(n, crate::backend::cpu::REDUCE_CHUNKS)
        .into_par_iter()
        .map(|rows| {
            let (mut s, mut t) = (0f64, 0f64);
            for i in rows.filter(|&i| mask[i] != 0) {
                for (x, y) in a[i * h..(i + 1) * h].iter().zip(&b[i * h..(i + 1) * h]) {
                    s += ((x - y) as f64).powi(2);
                    t += (*y as f64).powi(2);
                }
            }
            (s, t)
        })
        .collect();
    let (s, t) = parts
        .iter()
        .fold((0f64, 0f64), |(s, t), p| (s + p.0, t + p.1));
    let value = if t > 0.0 { s / t } else { 0.0 };
    Ok((value as f32, [s, t]))
}

/// Backward of `coef * S / T`: `da += coef d/da`, `db = coef d/db` (0 on unmarked rows).
#[allow(clippy::too_many_arguments)]
pub(super) fn rel_sq_err_bwd(
    a: &[f32],
    b: &[f32],
    mask: &[u32],
    sums: &[f64],
    n: usize,
    h: usize,
    coef: f32,
    da: &mut [f32],
    db: &mut [f32],
) -> Result<()> {
    ensure!(
        a.len() == n * h
            && b.len() == n * h
            && mask.len() == n
            && sums.len() == 2
            && da.len() == n * h
            && db.len() == n * h,
        "relative squared error backward: sizes do not match"
    );
    let (s, t) = (sums[0], sums[1]);
    let g = coef as f64;
    let (ca, cb) = if t > 0.0 {
        (2.0 * g / t, 2.0 * g * s / (t * t))
    } else {
        (0.0, 0.0)
    };
    da.par_chunks_mut(h.max(1))
        .zip(db.par_chunks_mut(h.max(1)))
        .enumerate()
        .with_min_len(ROWS)
        .for_each(|(i, (da, db))| {
            if mask[i] == 0 || t <= 0.0 {
                db.iter_mut().for_each(|x| *x = 0.0);
                return;
            }
            for j in 0..h {
                let (x, y) = (a[i * h + j] as f64, b[i * h + j] as f64);
                da[j] += (ca * (x - y)) as f32;
                db[j] = (-ca * (x - y) - cb * y) as f32;
            }
        });
    Ok(())
}
