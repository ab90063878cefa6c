//! RoPE wrapper (kernels/rope.cu; CPU reference src/ops/rope.rs).

use super::{blocks_for, int, launch, Buf, Device, DeviceRead, DeviceWrite, BLOCK};
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// cos/sin tables `[max_pos, hd/2]` (f32) on the device.
pub struct RopeTableGpu {
    pub hd: usize,
    pub max_pos: usize,
    cos: Buf<f32>,
    sin: Buf<f32>,
}

impl Device {
    /// The tables of `ops::RopeTable::new(hd, theta, max_pos)`, computed on the host by the same
    /// f64 inverse frequencies and f32 angles (bit-identical), then uploaded.
    pub fn rope_table(&self, hd: usize, theta: f64, max_pos: usize) -> Result<RopeTableGpu> {
        ensure!(
            hd.is_multiple_of(2) && hd > 0,
            "rope: head dim {hd} must be even"
        );
        let half = hd / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / hd as f64)) as f32)
            .collect();
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            for i in 0..half {
                let a = p as f32 * inv[i];
                cos[p * half + i] = a.cos();
                sin[p * half + i] = a.sin();
            }
        }
        Ok(RopeTableGpu {
            hd,
            max_pos,
            cos: self.upload(&cos)?,
            sin: self.upload(&sin)?,
        })
    }

    /// Rotate `x [rows, width]` (width a multiple of hd) into `y [rows, width]`; row `r` is at
    /// position `offset + r % t_len`. `inverse` applies the transpose (the backward). The kernel
    /// also works in place, but the borrow rules here want distinct buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &impl DeviceRead<bf16>,
        y: &mut impl DeviceWrite<bf16>,
        table: &RopeTableGpu,
        rows: usize,
        width: usize,
        t_len: usize,
        offset: usize,
        inverse: bool,
    ) -> Result<()> {
        let hd = table.hd;
        ensure!(
            width.is_multiple_of(hd),
            "rope: width {width} not a multiple of head dim {hd}"
        );
        ensure!(
            x.len() == rows * width && y.len() == rows * width,
            "rope: buffers do not hold {rows}x{width}"
        );
        ensure!(t_len > 0 || rows == 0, "rope: t_len is 0");
        ensure!(
            offset + t_len <= table.max_pos,
            "rope: position {} beyond table {}",
            offset + t_len,
            table.max_pos
        );
        let sign = if inverse { -1.0f32 } else { 1.0 };
        launch!(self, "rope", "rope_bf16", (blocks_for(rows * width / 2, BLOCK), 1, 1), BLOCK;
            x.dptr(), y.dptr(), table.cos.dptr(), table.sin.dptr(), int(rows, "rows")?, int(width, "width")?,
            int(hd, "head dim")?, int(t_len.max(1), "t_len")?, int(offset, "offset")?, sign)
    }
}
