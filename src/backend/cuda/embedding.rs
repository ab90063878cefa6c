//! Embedding wrappers (kernels/embedding.cu; CPU reference src/ops/embedding.rs).

use super::elementwise::FloatType;
use super::{blocks_for, int, launch, Device, DeviceRead, DeviceWrite, BLOCK, MAX_GRID_Y};
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Rows grouped by value, for deterministic scatter-adds: the distinct values ascending
/// (`uniq`), and for value `uniq[u]` the positions `positions[offsets[u]..offsets[u+1]]` where it
/// occurs, ascending (the order in which the CPU loops add them).
pub(crate) struct Csr {
    pub uniq: Vec<u32>,
    pub offsets: Vec<u32>,
    pub positions: Vec<u32>,
}

pub(crate) fn csr(values: &[u32]) -> Csr {
    let mut positions: Vec<u32> = (0..values.len() as u32).collect();
    positions.sort_by_key(|&p| (values[p as usize], p));
    let mut uniq = Vec::new();
    let mut offsets = Vec::new();
    for (i, &p) in positions.iter().enumerate() {
        let v = values[p as usize];
        if uniq.last() != Some(&v) {
            uniq.push(v);
            offsets.push(i as u32);
        }
    }
    offsets.push(positions.len() as u32);
    Csr {
        uniq,
        offsets,
        positions,
    }
}

impl Device {
    /// `y[i] = W[ids[i]]`: W `[vocab, h]` (bf16 or f32), y `[ids.len(), h]` bf16. Ids are checked
    /// here (an out-of-range id is an error, as the CPU op's assertion).
    pub fn embedding_fwd<T: FloatType>(
        &self,
        w: &impl DeviceRead<T>,
        vocab: usize,
        h: usize,
        ids: &[u32],
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        ensure!(
            w.len() == vocab * h,
            "embedding: table holds {} values, not {vocab}x{h}",
            w.len()
        );
        ensure!(
            y.len() == ids.len() * h,
            "embedding: output holds {} values, not {}x{h}",
            y.len(),
            ids.len()
        );
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            crate::bail!("embedding: id {bad} out of range (vocab {vocab})");
        }
        let ids_d = self.upload(ids)?;
        let n = ids.len();
        let grid = (blocks_for(n * h, BLOCK), 1, 1);
        let args = (int(n, "tokens")?, int(h, "width")?, int(vocab, "vocab")?);
        if T::IS_BF16 {
            launch!(self, "embedding", "embedding_fwd_bf16", grid, BLOCK; w.dptr(), ids_d.dptr(), y.dptr(), args.0, args.1, args.2)
        } else {
            launch!(self, "embedding", "embedding_fwd_f32", grid, BLOCK; w.dptr(), ids_d.dptr(), y.dptr(), args.0, args.1, args.2)
        }
    }

    /// `dW [vocab, h]` (f32, overwritten) `= sum over i with ids[i] = v of dy[i]`, summed in
    /// ascending i per row (deterministic, no atomics).
    pub fn embedding_bwd(
        &self,
        dy: &impl DeviceRead<bf16>,
        ids: &[u32],
        vocab: usize,
        h: usize,
        dw: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        ensure!(
            dy.len() == ids.len() * h,
            "embedding backward: grad holds {} values, not {}x{h}",
            dy.len(),
            ids.len()
        );
        ensure!(
            dw.len() == vocab * h,
            "embedding backward: dW holds {} values, not {vocab}x{h}",
            dw.len()
        );
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            crate::bail!("embedding backward: id {bad} out of range (vocab {vocab})");
        }
        self.memset_zero(dw)?;
        let c = csr(ids);
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
        launch!(self, "embedding", "embedding_bwd_bf16", grid, BLOCK;
            dy.dptr(), u.dptr(), o.dptr(), p.dptr(), dw.dptr(), int(c.uniq.len(), "distinct ids")?, int(h, "width")?)
    }
}

#[cfg(test)]
mod tests {
    use super::csr;

    #[test]
    fn csr_groups_positions_by_value_in_order() {
        let c = csr(&[3, 1, 3, 0, 1, 3]);
        assert_eq!(c.uniq, vec![0, 1, 3]);
        assert_eq!(c.offsets, vec![0, 1, 3, 6]);
        assert_eq!(c.positions, vec![3, 1, 4, 0, 2, 5]);
        let e = csr(&[]);
        assert!(e.uniq.is_empty() && e.offsets == vec![0]);
    }
}
