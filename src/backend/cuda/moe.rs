//! MoE permutation wrappers (kernels/moe.cu; CPU reference src/ops/moe.rs and the grouping in
//! src/ops/router.rs).

use super::embedding::csr;
use super::{blocks_for, int, launch, Buf, Device, DeviceRead, DeviceWrite, BLOCK, MAX_GRID_Y};
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Threads of the per-expert scan blocks.
const SCAN_BLOCK: u32 = 1024;

/// The grouping of token copies by expert (the CPU `Routing`'s `expert_tokens` / `row_of`, on
/// the device). Copy `(t, s)` of token t's slot s sits at row `pos[t*k+s]` of the permuted
/// `[n*k, h]` layout, expert e's batch being rows `offsets[e]..offsets[e+1]`.
pub struct MoePermutation {
    pub n: usize,
    pub k: usize,
    pub e: usize,
    /// `[e+1]` start of each expert's batch (the grouped GEMMs read it on the device).
    pub offsets: Buf<u32>,
    /// `[n*k]` row of each copy within its expert's batch.
    pub row_of: Buf<u32>,
    /// `[n*k]` row of each copy in the permuted layout (`offsets[e] + row_of`).
    pub pos: Buf<u32>,
    /// `[n*k]` token of each permuted row (the concatenated `expert_tokens`).
    pub sorted_tokens: Buf<u32>,
}

impl MoePermutation {
    /// Tokens per expert (brings the offsets to the host: synchronises).
    pub fn histogram(&self, dev: &Device) -> Result<Vec<usize>> {
        Ok(dev
            .download(&self.offsets)?
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect())
    }
}

impl Device {
    /// `y [rows.len(), h] = x[rows]` (x `[n, h]`, bf16).
    pub fn gather_rows(
        &self,
        x: &impl DeviceRead<bf16>,
        n: usize,
        h: usize,
        rows: &[u32],
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        ensure!(
            x.len() == n * h && y.len() == rows.len() * h,
            "gather_rows: sizes do not match"
        );
        if let Some(r) = rows.iter().find(|&&r| r as usize >= n) {
            crate::bail!("gather_rows: row {r} out of range ({n} rows)");
        }
        let r = self.upload(rows)?;
        launch!(self, "moe", "gather_rows_bf16", (blocks_for(rows.len() * h, BLOCK), 1, 1), BLOCK;
            x.dptr(), r.dptr(), y.dptr(), int(rows.len(), "rows")?, int(h, "width")?)
    }

    /// Backward of [`Device::gather_rows`]: `dx [n, h]` (overwritten) gets `dy[i]` added at row
    /// `rows[i]`, in ascending i (deterministic).
    pub fn gather_rows_bwd(
        &self,
        dy: &impl DeviceRead<bf16>,
        rows: &[u32],
        n: usize,
        h: usize,
        dx: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        ensure!(
            dy.len() == rows.len() * h && dx.len() == n * h,
            "gather_rows backward: sizes do not match"
        );
        if let Some(r) = rows.iter().find(|&&r| r as usize >= n) {
            crate::bail!("gather_rows backward: row {r} out of range ({n} rows)");
        }
        self.memset_zero(dx)?;
        let c = csr(rows);
        if c.uniq.is_empty() || h == 0 {
            return Ok(());
        }
        let (u, o, p) = (
            self.upload(&c.uniq)?,
            self.upload(&c.offsets)?,
            self.upload(&c.positions)?,
        );
        let grid = (
            h.div_ceil(BLOCK as usize) as u32,
            (c.uniq.len() as u64).min(MAX_GRID_Y) as u32,
            1,
        );
        launch!(self, "moe", "gather_rows_bwd_bf16", grid, BLOCK;
            dy.dptr(), u.dptr(), o.dptr(), p.dptr(), dx.dptr(), int(c.uniq.len(), "rows")?, int(h, "width")?)
    }

    /// Group the copies of `indices [n, k]` (from [`Device::route`]) by expert, tokens ascending
    /// within an expert. Stream-ordered: nothing comes back to the host (the grouped GEMMs size
    /// their grids from an upper bound and read the offsets on the device).
    pub fn moe_permutation(
        &self,
        indices: &impl DeviceRead<u32>,
        n: usize,
        k: usize,
        e: usize,
    ) -> Result<MoePermutation> {
        ensure!(
            indices.len() == n * k,
            "moe permutation: indices hold {}, not {n}x{k}",
            indices.len()
        );
        ensure!(e >= 1, "moe permutation: no experts");
        let nk = (n * k) as i64;
        let counts = self.alloc::<u32>(e)?;
        let offsets = self.alloc::<u32>(e + 1)?;
        let row_of = self.alloc::<u32>(n * k)?;
        let pos = self.alloc::<u32>(n * k)?;
        let sorted_tokens = self.alloc::<u32>(n * k)?;
        let grid = ((e as u64).min(MAX_GRID_Y) as u32, 1, 1);
        launch!(self, "moe", "moe_count", grid, SCAN_BLOCK; indices.dptr(), counts.dptr(), nk, int(e, "experts")?)?;
        launch!(self, "moe", "moe_permute_index", grid, SCAN_BLOCK;
            indices.dptr(), counts.dptr(), offsets.dptr(), row_of.dptr(), pos.dptr(), sorted_tokens.dptr(), nk,
            int(k, "top-k")?, int(e, "experts")?)?;
        Ok(MoePermutation {
            n,
            k,
            e,
            offsets,
            row_of,
            pos,
            sorted_tokens,
        })
    }

    /// Permute `x [n, h]` into the expert-grouped `xp [n*k, h]` (token copies).
    pub fn moe_permute(
        &self,
        x: &impl DeviceRead<bf16>,
        perm: &MoePermutation,
        h: usize,
        xp: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        let (n, k) = (perm.n, perm.k);
        ensure!(
            x.len() == n * h && xp.len() == n * k * h,
            "moe permute: sizes do not match"
        );
        launch!(self, "moe", "moe_permute_fwd_bf16", (blocks_for(n * k * h, BLOCK), 1, 1), BLOCK;
            x.dptr(), perm.pos.dptr(), xp.dptr(), int(n, "tokens")?, int(k, "top-k")?, int(h, "width")?)
    }

    /// Backward of [`Device::moe_permute`]: `dx[t] = sum_s dxp[pos[t, s]]`.
    pub fn moe_permute_bwd(
        &self,
        dxp: &impl DeviceRead<bf16>,
        perm: &MoePermutation,
        h: usize,
        dx: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        let (n, k) = (perm.n, perm.k);
        ensure!(
            dx.len() == n * h && dxp.len() == n * k * h,
            "moe permute backward: sizes do not match"
        );
        launch!(self, "moe", "moe_permute_bwd_bf16", (blocks_for(n * h, BLOCK), 1, 1), BLOCK;
            dxp.dptr(), perm.pos.dptr(), dx.dptr(), int(n, "tokens")?, int(k, "top-k")?, int(h, "width")?)
    }

    /// `y[t] = sum_s w[t,s] * outs[pos[t,s]]`: the experts' outputs `outs [n*k, h]` (permuted
    /// layout, bf16) combined with the routing weights `w [n, k]` (f32) into `y [n, h]`.
    pub fn moe_combine(
        &self,
        outs: &impl DeviceRead<bf16>,
        w: &impl DeviceRead<f32>,
        perm: &MoePermutation,
        h: usize,
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        let (n, k) = (perm.n, perm.k);
        ensure!(
            outs.len() == n * k * h && w.len() == n * k && y.len() == n * h,
            "moe combine: sizes do not match"
        );
        launch!(self, "moe", "moe_combine_fwd_bf16", (blocks_for(n * h, BLOCK), 1, 1), BLOCK;
            outs.dptr(), w.dptr(), perm.pos.dptr(), y.dptr(), int(n, "tokens")?, int(k, "top-k")?, int(h, "width")?)
    }

    /// Backward of [`Device::moe_combine`]: `douts [n*k, h]` (bf16) and `dw [n, k]` (f32).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine_bwd(
        &self,
        dy: &impl DeviceRead<bf16>,
        outs: &impl DeviceRead<bf16>,
        w: &impl DeviceRead<f32>,
        perm: &MoePermutation,
        h: usize,
        douts: &mut impl DeviceWrite<bf16>,
        dw: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        let (n, k) = (perm.n, perm.k);
        ensure!(
            dy.len() == n * h
                && outs.len() == n * k * h
                && w.len() == n * k
                && douts.len() == n * k * h
                && dw.len() == n * k,
            "moe combine backward: sizes do not match"
        );
        launch!(self, "moe", "moe_combine_bwd_bf16", (blocks_for(n, 1), 1, 1), BLOCK;
            dy.dptr(), outs.dptr(), w.dptr(), perm.pos.dptr(), douts.dptr(), dw.dptr(), int(n, "tokens")?,
            int(k, "top-k")?, int(h, "width")?)
    }
}
