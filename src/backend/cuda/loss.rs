//! Cross-entropy and router z-loss wrappers (kernels/loss.cu; CPU reference src/ops/loss.rs).

use super::{blocks_for, int, launch, Buf, Device, DeviceRead, DeviceWrite, BLOCK};
use crate::backend::shapes::IGNORE;
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Threads per row of the cross-entropy kernels: a vocabulary row of ~100k logits is swept
/// by 512 threads in ~200 coalesced steps.
const CE_BLOCK: u32 = 512;
/// Threads of the one-block final reductions.
const REDUCE_BLOCK: u32 = 1024;

/// Result of [`Device::cross_entropy`]: the scalars (as the CPU's `CrossEntropyOut`) and what
/// the backward needs.
pub struct CrossEntropyGpu {
    /// `mean(ce) + z_coef * mean(lse^2)` over the valid rows.
    pub loss: f32,
    /// Mean cross-entropy alone.
    pub ce: f32,
    pub n_valid: usize,
    pub z_coef: f32,
    /// Per-row logsumexp `[n]` (0 for ignored rows).
    pub lse: Buf<f32>,
    pub targets: Buf<u32>,
}

impl Device {
    /// Cross-entropy of `logits [n, v]` (bf16) against `targets [n]` plus `z_coef * lse^2`,
    /// averaged over rows whose target is not `IGNORE`. Synchronises (returns host scalars).
    pub fn cross_entropy(
        &self,
        logits: &impl DeviceRead<bf16>,
        n: usize,
        v: usize,
        targets: &[u32],
        z_coef: f32,
    ) -> Result<CrossEntropyGpu> {
        ensure!(
            logits.len() == n * v,
            "cross_entropy: logits hold {} values, not {n}x{v}",
            logits.len()
        );
        ensure!(
            targets.len() == n,
            "cross_entropy: {} targets for {n} rows",
            targets.len()
        );
        if let Some(t) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
            crate::bail!("cross_entropy: target {t} out of range (vocab {v})");
        }
        let tg = self.upload(targets)?;
        let lse = self.alloc::<f32>(n)?;
        let ce = self.alloc::<f32>(n)?;
        let sums = self.alloc::<f64>(3)?;
        let (ni, vi) = (int(n, "rows")?, int(v, "vocab")?);
        launch!(self, "loss", "ce_fwd_bf16", (blocks_for(n, 1), 1, 1), CE_BLOCK;
            logits.dptr(), tg.dptr(), lse.dptr(), ce.dptr(), ni, vi)?;
        launch!(self, "loss", "ce_reduce", (1, 1, 1), REDUCE_BLOCK; lse.dptr(), ce.dptr(), tg.dptr(), sums.dptr(), ni)?;
        let s = self.download(&sums)?;
        let (ce_sum, z_sum) = (s[0], s[1]);
        let n_valid = targets.iter().filter(|&&t| t != IGNORE).count();
        let denom = n_valid.max(1) as f64;
        let ce_mean = ce_sum / denom;
        let total = ce_mean + z_coef as f64 * (z_sum / denom);
        Ok(CrossEntropyGpu {
            loss: total as f32,
            ce: ce_mean as f32,
            n_valid,
            z_coef,
            lse,
            targets: tg,
        })
    }

    /// Gradient of the loss for `logits` given `dloss` (the loss's upstream gradient, 1 for a
    /// final loss): `dlogits [n, v]` bf16, zero rows for ignored targets.
    pub fn cross_entropy_bwd(
        &self,
        logits: &impl DeviceRead<bf16>,
        saved: &CrossEntropyGpu,
        dloss: f32,
        dlogits: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        let n = saved.targets.len();
        let v = logits.len().checked_div(n).unwrap_or(0);
        ensure!(
            logits.len() == n * v && dlogits.len() == n * v,
            "cross_entropy backward: sizes do not match"
        );
        let scale = dloss / saved.n_valid.max(1) as f32;
        launch!(self, "loss", "ce_bwd_bf16", (blocks_for(n, 1), 1, 1), CE_BLOCK;
            logits.dptr(), saved.targets.dptr(), saved.lse.dptr(), dlogits.dptr(), int(n, "rows")?, int(v, "vocab")?,
            scale, saved.z_coef)
    }

    /// Router z-loss `mean_n logsumexp(z_n)^2` of `z [n, e]` (f32); writes `lse [n]` for the
    /// backward and returns the loss (synchronises).
    pub fn router_zloss(
        &self,
        z: &impl DeviceRead<f32>,
        n: usize,
        e: usize,
        lse: &mut impl DeviceWrite<f32>,
    ) -> Result<f32> {
        ensure!(
            z.len() == n * e && lse.len() == n,
            "router z-loss: sizes do not match {n}x{e}"
        );
        let sum = self.zeros::<f64>(1)?;
        let ni = int(n, "rows")?;
        launch!(self, "loss", "zloss_fwd_f32", (blocks_for(n, BLOCK), 1, 1), BLOCK; z.dptr(), lse.dptr(), ni, int(e, "experts")?)?;
        launch!(self, "loss", "zloss_reduce", (1, 1, 1), REDUCE_BLOCK; lse.dptr(), sum.dptr(), ni)?;
        let s = self.download(&sum)?[0];
        Ok((s / n.max(1) as f64) as f32)
    }

    /// `dz = dloss * 2/n * lse * softmax(z)`.
    #[allow(clippy::too_many_arguments)]
    pub fn router_zloss_bwd(
        &self,
        z: &impl DeviceRead<f32>,
        lse: &impl DeviceRead<f32>,
        n: usize,
        e: usize,
        dloss: f32,
        dz: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        ensure!(
            z.len() == n * e && lse.len() == n && dz.len() == n * e,
            "router z-loss backward: sizes do not match"
        );
        let scale = dloss * 2.0 / n.max(1) as f32;
        launch!(self, "loss", "zloss_bwd_f32", (blocks_for(n * e, BLOCK), 1, 1), BLOCK;
            z.dptr(), lse.dptr(), dz.dptr(), int(n, "rows")?, int(e, "experts")?, scale)
    }
}

impl Device {
    /// Router cross-entropy of `z [n, e]` (f32) toward `targets [n]` (`IGNORE`: the row takes
    /// no part), averaged over the valid rows and times `coef`; its gradient is added to `dz`.
    /// Returns `coef * mean(ce)` (0 without valid rows; synchronises).
    pub fn router_ce(
        &self,
        z: &impl DeviceRead<f32>,
        targets: &[u32],
        n: usize,
        e: usize,
        coef: f32,
        dz: &mut impl DeviceWrite<f32>,
    ) -> Result<f32> {
        ensure!(
            z.len() == n * e && targets.len() == n && dz.len() == n * e,
            "router cross-entropy: sizes do not match {n}x{e}"
        );
        if let Some(t) = targets.iter().find(|&&t| t != IGNORE && t as usize >= e) {
            crate::bail!("router cross-entropy: target {t} out of range ({e} experts)");
        }
        let n_valid = targets.iter().filter(|&&t| t != IGNORE).count();
        if n_valid == 0 {
            return Ok(0.0);
        }
        let tg = self.upload(targets)?;
        let ce = self.alloc::<f32>(n)?;
        let sum = self.alloc::<f64>(1)?;
        let ni = int(n, "rows")?;
        let scale = coef / n_valid as f32;
        launch!(self, "loss", "router_ce_f32", (blocks_for(n, BLOCK), 1, 1), BLOCK;
            z.dptr(), tg.dptr(), ce.dptr(), dz.dptr(), ni, int(e, "experts")?, scale)?;
        launch!(self, "loss", "sum_reduce_f32", (1, 1, 1), REDUCE_BLOCK; ce.dptr(), sum.dptr(), ni)?;
        Ok((coef as f64 * self.download(&sum)?[0] / n_valid as f64) as f32)
    }

    /// Relative squared error `S / T` of `a` against `b` (`[n, h]` bf16 each) over the rows
    /// with `mask[row] != 0` (`S = sum |a - b|^2`, `T = sum |b|^2`; 0 when T is 0), as the
    /// CPU's `ops::rel_sq_err`. Returns the value (synchronises) and `[S, T]` on the device
    /// for [`Device::rel_sq_err_bwd`].
    pub fn rel_sq_err(
        &self,
        a: &impl DeviceRead<bf16>,
        b: &impl DeviceRead<bf16>,
        mask: &Buf<u32>,
        n: usize,
        h: usize,
    ) -> Result<(f32, Buf<f64>)> {
        ensure!(
            a.len() == n * h && b.len() == n * h && mask.len() == n,
            "relative error: sizes do not match {n}x{h}"
        );
        let (s, t) = (self.alloc::<f32>(n)?, self.alloc::<f32>(n)?);
        let sums = self.alloc::<f64>(2)?;
        let ni = int(n, "rows")?;
        launch!(self, "loss", "rel_err_rows_bf16", (blocks_for(n, 1), 1, 1), BLOCK;
            a.dptr(), b.dptr(), mask.dptr(), s.dptr(), t.dptr(), ni, int(h, "width")?)?;
        launch!(self, "loss", "pair_sum_reduce_f32", (1, 1, 1), REDUCE_BLOCK; s.dptr(), t.dptr(), sums.dptr(), ni)?;
        let st = self.download(&sums)?;
        let value = if st[1] > 0.0 { st[0] / st[1] } else { 0.0 };
        Ok((value as f32, sums))
    }

    /// Backward of `coef * rel_sq_err(a, b)`: `da += coef * d/da` (f32, accumulated) and
    /// `db = coef * d/db` (bf16, overwritten; 0 on unmarked rows).
    #[allow(clippy::too_many_arguments)]
    pub fn rel_sq_err_bwd(
        &self,
        a: &impl DeviceRead<bf16>,
        b: &impl DeviceRead<bf16>,
        mask: &Buf<u32>,
        sums: &Buf<f64>,
        n: usize,
        h: usize,
        coef: f32,
        da: &mut impl DeviceWrite<f32>,
        db: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        ensure!(
            a.len() == n * h
                && b.len() == n * h
                && mask.len() == n
                && sums.len() == 2
                && da.len() == n * h
                && db.len() == n * h,
            "relative error backward: sizes do not match {n}x{h}"
        );
        launch!(self, "loss", "rel_err_bwd_bf16", (blocks_for(n * h, BLOCK), 1, 1), BLOCK;
            a.dptr(), b.dptr(), mask.dptr(), sums.dptr(), da.dptr(), db.dptr(), int(n, "rows")?, int(h, "width")?, coef)
    }
}
