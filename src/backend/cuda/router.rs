//! Router wrappers (kernels/router.cu; CPU reference src/ops/router.rs).

use super::{blocks_for, int, launch, Device, DeviceRead, DeviceWrite, View, BLOCK, MAX_GRID_Y};
use crate::ensure;
use crate::error::Result;

/// Threads per block of the per-token router kernels (one thread per token): small blocks so
/// that a few thousand tokens still spread over many SMs.
const ROUTER_BLOCK: u32 = 128;
/// Row chunks of the bias-gradient column sums (see rmsnorm's RMS_DW_CHUNKS).
const BIAS_CHUNKS: usize = 256;

impl Device {
    /// Route `z [n, e]` (f32 logits) with an optional bias `[e]` (applied as `min(b, 0)`):
    /// writes `probs [n, e]`, `weights [n, k]` (f32) and `indices [n, k]` (top-k, descending,
    /// ties to the lower expert), renormalising the k weights when `renorm`. The grouping of
    /// token copies by expert is [`Device::moe_permutation`].
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        z: &impl DeviceRead<f32>,
        bias: Option<View<'_, f32>>,
        n: usize,
        e: usize,
        k: usize,
        renorm: bool,
        probs: &mut impl DeviceWrite<f32>,
        weights: &mut impl DeviceWrite<f32>,
        indices: &mut impl DeviceWrite<u32>,
    ) -> Result<()> {
        ensure!(k >= 1 && k <= e, "route: top-k {k} of {e} experts");
        ensure!(
            z.len() == n * e && probs.len() == n * e,
            "route: logits/probs do not hold {n}x{e}"
        );
        ensure!(
            weights.len() == n * k && indices.len() == n * k,
            "route: weights/indices do not hold {n}x{k}"
        );
        if let Some(b) = &bias {
            ensure!(
                b.len() == e,
                "route: bias has {} entries for {e} experts",
                b.len()
            );
        }
        let bptr = bias.map_or(0, |b| b.dptr());
        launch!(self, "router", "router_fwd_f32", (blocks_for(n, ROUTER_BLOCK), 1, 1), ROUTER_BLOCK;
            z.dptr(), bptr, probs.dptr(), weights.dptr(), indices.dptr(), int(n, "tokens")?, int(e, "experts")?,
            int(k, "top-k")?, i32::from(renorm))
    }

    /// Gradient of the logits `dz [n, e]` from the gradient of the routing weights `gw [n, k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn route_bwd(
        &self,
        probs: &impl DeviceRead<f32>,
        weights: &impl DeviceRead<f32>,
        indices: &impl DeviceRead<u32>,
        gw: &impl DeviceRead<f32>,
        n: usize,
        e: usize,
        k: usize,
        renorm: bool,
        dz: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        ensure!(
            probs.len() == n * e && dz.len() == n * e,
            "route backward: probs/dz do not hold {n}x{e}"
        );
        ensure!(
            weights.len() == n * k && indices.len() == n * k && gw.len() == n * k,
            "route backward: weights/indices/grad do not hold {n}x{k}"
        );
        launch!(self, "router", "router_bwd_f32", (blocks_for(n, ROUTER_BLOCK), 1, 1), ROUTER_BLOCK;
            probs.dptr(), weights.dptr(), indices.dptr(), gw.dptr(), dz.dptr(), int(n, "tokens")?, int(e, "experts")?,
            int(k, "top-k")?, i32::from(renorm))
    }

    /// Bias gradient `db [e]` = column sums of `dz [n, e]`, zero where `bias > 0`
    /// (deterministic two-pass sum).
    pub fn route_bias_grad(
        &self,
        dz: &impl DeviceRead<f32>,
        bias: &impl DeviceRead<f32>,
        n: usize,
        e: usize,
        db: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        ensure!(
            dz.len() == n * e && bias.len() == e && db.len() == e,
            "route bias grad: sizes do not match {n}x{e}"
        );
        let rows_per_chunk = n.div_ceil(BIAS_CHUNKS).max(1);
        let chunks = n.div_ceil(rows_per_chunk).max(1);
        let partial = self.zeros::<f32>(chunks * e)?;
        let grid = (
            e.div_ceil(ROUTER_BLOCK as usize) as u32,
            (chunks as u64).min(MAX_GRID_Y) as u32,
            1,
        );
        launch!(self, "router", "router_bias_grad_partial_f32", grid, ROUTER_BLOCK;
            dz.dptr(), partial.dptr(), int(n, "tokens")?, int(e, "experts")?, int(rows_per_chunk, "rows")?)?;
        launch!(self, "router", "router_bias_grad_finish_f32", (blocks_for(e, BLOCK), 1, 1), BLOCK;
            partial.dptr(), bias.dptr(), db.dptr(), int(chunks, "chunks")?, int(e, "experts")?)
    }
}
