//! RMSNorm wrappers (kernels/rmsnorm.cu; CPU reference src/ops/rmsnorm.rs).

use super::{blocks_for, int, launch, Device, DeviceRead, DeviceWrite, BLOCK, MAX_GRID_Y};
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Row chunks of the dw partial sums: the partial matrix has at most this many rows, which bounds
/// its memory (`RMS_DW_CHUNKS * d` f32) and the serial work of the finish pass.
const RMS_DW_CHUNKS: usize = 256;

impl Device {
    /// `y = w * x * rstd` over rows of width `d`: x, y `[n, d]` bf16, w `[d]` bf16; writes the
    /// per-row `rstd [n]` (f32) that the backward needs.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        &self,
        x: &impl DeviceRead<bf16>,
        w: &impl DeviceRead<bf16>,
        y: &mut impl DeviceWrite<bf16>,
        rstd: &mut impl DeviceWrite<f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(
            x.len() == n * d && y.len() == n * d,
            "rmsnorm: x/y hold {}/{} values, not {n}x{d}",
            x.len(),
            y.len()
        );
        ensure!(
            w.len() == d && rstd.len() == n,
            "rmsnorm: weight {} (want {d}), rstd {} (want {n})",
            w.len(),
            rstd.len()
        );
        let grid = (blocks_for(n, 1), 1, 1);
        launch!(self, "rmsnorm", "rmsnorm_fwd_bf16", grid, BLOCK;
            x.dptr(), w.dptr(), y.dptr(), rstd.dptr(), int(n, "rows")?, int(d, "width")?, eps)
    }

    /// Input gradient: `dx = r * (w*dy - x * sum(w*dy*x) * r^2 / d)`, all `[n, d]` bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd_dx(
        &self,
        x: &impl DeviceRead<bf16>,
        w: &impl DeviceRead<bf16>,
        dy: &impl DeviceRead<bf16>,
        rstd: &impl DeviceRead<f32>,
        dx: &mut impl DeviceWrite<bf16>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        ensure!(
            x.len() == n * d
                && dy.len() == n * d
                && dx.len() == n * d
                && w.len() == d
                && rstd.len() == n,
            "rmsnorm backward: sizes do not match {n}x{d}"
        );
        let grid = (blocks_for(n, 1), 1, 1);
        launch!(self, "rmsnorm", "rmsnorm_bwd_dx_bf16", grid, BLOCK;
            x.dptr(), w.dptr(), dy.dptr(), rstd.dptr(), dx.dptr(), int(n, "rows")?, int(d, "width")?)
    }

    /// Weight gradient `dw[j] = sum_rows dy * x * rstd` (f32 `[d]`, overwritten), a deterministic
    /// two-pass column sum.
    pub fn rmsnorm_bwd_dw(
        &self,
        x: &impl DeviceRead<bf16>,
        dy: &impl DeviceRead<bf16>,
        rstd: &impl DeviceRead<f32>,
        dw: &mut impl DeviceWrite<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        ensure!(
            x.len() == n * d && dy.len() == n * d && dw.len() == d && rstd.len() == n,
            "rmsnorm weight gradient: sizes do not match {n}x{d}"
        );
        if n == 0 {
            return self.memset_zero(dw);
        }
        let rows_per_chunk = n.div_ceil(RMS_DW_CHUNKS);
        let chunks = n.div_ceil(rows_per_chunk);
        let partial = self.alloc::<f32>(chunks * d)?;
        let grid = (
            d.div_ceil(BLOCK as usize) as u32,
            chunks.min(MAX_GRID_Y as usize) as u32,
            1,
        );
        launch!(self, "rmsnorm", "rmsnorm_bwd_dw_partial_bf16", grid, BLOCK;
            x.dptr(), dy.dptr(), rstd.dptr(), partial.dptr(), int(n, "rows")?, int(d, "width")?, int(rows_per_chunk, "rows")?)?;
        launch!(self, "rmsnorm", "rmsnorm_bwd_dw_finish", (blocks_for(d, BLOCK), 1, 1), BLOCK;
            partial.dptr(), dw.dptr(), int(chunks, "chunks")?, int(d, "width")?)
    }
}
