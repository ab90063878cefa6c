//! Elementwise wrappers (kernels/elementwise.cu; CPU reference src/ops/elementwise.rs).

use super::{blocks_for, launch, Device, DeviceRead, DeviceType, DeviceWrite, BLOCK};
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Float element types with kernels in both precisions.
pub trait FloatType: DeviceType {
    const IS_BF16: bool;
}
impl FloatType for f32 {
    const IS_BF16: bool = false;
}
impl FloatType for bf16 {
    const IS_BF16: bool = true;
}

fn n_i64(n: usize) -> i64 {
    n as i64
}

impl Device {
    /// `y = a + alpha * b` (same lengths; bf16 or f32).
    pub fn add_scaled<T: FloatType>(
        &self,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        y: &mut impl DeviceWrite<T>,
        alpha: f32,
    ) -> Result<()> {
        let n = y.len();
        ensure!(
            a.len() == n && b.len() == n,
            "add: lengths {} + {} -> {n}",
            a.len(),
            b.len()
        );
        let grid = (blocks_for(n, BLOCK), 1, 1);
        if T::IS_BF16 {
            launch!(self, "elementwise", "add_scaled_bf16", grid, BLOCK; a.dptr(), b.dptr(), y.dptr(), n_i64(n), alpha)
        } else {
            launch!(self, "elementwise", "add_scaled_f32", grid, BLOCK; a.dptr(), b.dptr(), y.dptr(), n_i64(n), alpha)
        }
    }

    /// `y = s * a`.
    pub fn scale<T: FloatType>(
        &self,
        a: &impl DeviceRead<T>,
        y: &mut impl DeviceWrite<T>,
        s: f32,
    ) -> Result<()> {
        let n = y.len();
        ensure!(a.len() == n, "scale: lengths {} -> {n}", a.len());
        let grid = (blocks_for(n, BLOCK), 1, 1);
        if T::IS_BF16 {
            launch!(self, "elementwise", "scale_bf16", grid, BLOCK; a.dptr(), y.dptr(), n_i64(n), s)
        } else {
            launch!(self, "elementwise", "scale_f32", grid, BLOCK; a.dptr(), y.dptr(), n_i64(n), s)
        }
    }

    /// SwiGLU `y = silu(gate) * up` (bf16).
    pub fn swiglu_fwd(
        &self,
        gate: &impl DeviceRead<bf16>,
        up: &impl DeviceRead<bf16>,
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        let n = y.len();
        ensure!(gate.len() == n && up.len() == n, "swiglu: shape mismatch");
        launch!(self, "elementwise", "swiglu_fwd_bf16", (blocks_for(n, BLOCK), 1, 1), BLOCK;
            gate.dptr(), up.dptr(), y.dptr(), n_i64(n))
    }

    /// SwiGLU backward: `dgate`, `dup` from `dy`.
    pub fn swiglu_bwd(
        &self,
        gate: &impl DeviceRead<bf16>,
        up: &impl DeviceRead<bf16>,
        dy: &impl DeviceRead<bf16>,
        dgate: &mut impl DeviceWrite<bf16>,
        dup: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        let n = dy.len();
        ensure!(
            gate.len() == n && up.len() == n && dgate.len() == n && dup.len() == n,
            "swiglu backward: shape mismatch"
        );
        launch!(self, "elementwise", "swiglu_bwd_bf16", (blocks_for(n, BLOCK), 1, 1), BLOCK;
            gate.dptr(), up.dptr(), dy.dptr(), dgate.dptr(), dup.dptr(), n_i64(n))
    }

    /// f32 -> bf16 (round to nearest even, as `half::bf16::from_f32`).
    pub fn cast_f32_to_bf16(
        &self,
        x: &impl DeviceRead<f32>,
        y: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        let n = y.len();
        ensure!(x.len() == n, "cast: lengths {} -> {n}", x.len());
        launch!(self, "elementwise", "cast_f32_bf16", (blocks_for(n, BLOCK), 1, 1), BLOCK; x.dptr(), y.dptr(), n_i64(n))
    }

    /// bf16 -> f32 (exact).
    pub fn cast_bf16_to_f32(
        &self,
        x: &impl DeviceRead<bf16>,
        y: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        let n = y.len();
        ensure!(x.len() == n, "cast: lengths {} -> {n}", x.len());
        launch!(self, "elementwise", "cast_bf16_f32", (blocks_for(n, BLOCK), 1, 1), BLOCK; x.dptr(), y.dptr(), n_i64(n))
    }
}
