//! Fused multi-tensor AdamW and the global gradient norm (kernels/optim.cu; CPU reference
//! src/train/optim.rs).

use super::{launch, Buf, Device, DeviceRead, View, ViewMut, BLOCK, MAX_BLOCKS};
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Elements per block of the multi-tensor kernels: large enough that the per-block table of a
/// 7B-parameter model stays ~1 MiB, small enough that a 10k-element norm weight is one block.
const CHUNK: usize = 1 << 16;
/// Threads of the one-block finish of the norm.
const REDUCE_BLOCK: u32 = 1024;

/// One tensor of an AdamW step: f32 master weight, gradient and moments of equal length, its
/// weight decay (0 for norms and biases, as the CPU's rule) and what the decay pulls toward
/// (None: zero), and optionally a bf16 copy of the weight to refresh for the forward pass.
/// Windows, so that a slot can be the trainable part of a stacked weight.
pub struct AdamWSlot<'a> {
    pub param: ViewMut<'a, f32>,
    pub grad: View<'a, f32>,
    pub m: ViewMut<'a, f32>,
    pub v: ViewMut<'a, f32>,
    pub weight_decay: f32,
    pub decay_to: Option<View<'a, f32>>,
    pub param_bf16: Option<ViewMut<'a, bf16>>,
}

/// Hyper-parameters of one AdamW step; `step` counts from 1 (the CPU's `AdamW::step` after its
/// increment).
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub step: u64,
}

// Mirrors of the structs in optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AdamWTensor {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    p_bf16: u64,
    t: u64,
    n: u64,
    wd: f32,
    pad: u32,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GradTensor {
    g: u64,
    n: u64,
}

/// Per block: (tensor index, first element); one block per CHUNK elements of each tensor.
fn spans(lens: &[usize]) -> Vec<u64> {
    let mut s = Vec::new();
    for (t, &n) in lens.iter().enumerate() {
        let mut start = 0;
        while start < n {
            s.push(t as u64);
            s.push(start as u64);
            start += CHUNK;
        }
    }
    s
}

/// Plain-old-data structs as bytes for upload.
fn as_bytes<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: T is a #[repr(C)] struct of integers and floats with explicit padding fields.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        .to_vec()
}

impl Device {
    /// One AdamW step over all `slots` in a single launch, PyTorch semantics as the CPU's
    /// `AdamW::update`: `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`, `w -= lr wd w`,
    /// `w -= lr m_hat / (sqrt(v_hat) + eps)`. `grad_scale` (a device scalar, e.g. element 1 of
    /// [`Device::grad_norm`]'s result) multiplies every gradient first.
    pub fn adamw_step(
        &self,
        slots: &mut [AdamWSlot<'_>],
        hp: AdamWHyper,
        grad_scale: Option<View<'_, f32>>,
    ) -> Result<()> {
        ensure!(hp.step >= 1, "adamw: step counts from 1");
        let mut desc = Vec::with_capacity(slots.len());
        for (i, s) in slots.iter_mut().enumerate() {
            let n = s.param.len();
            ensure!(
                s.grad.len() == n && s.m.len() == n && s.v.len() == n,
                "adamw: tensor {i}: param {n}, grad {}, m {}, v {}",
                s.grad.len(),
                s.m.len(),
                s.v.len()
            );
            if let Some(b) = &s.param_bf16 {
                ensure!(
                    b.len() == n,
                    "adamw: tensor {i}: bf16 copy holds {} of {n}",
                    b.len()
                );
            }
            if let Some(t) = &s.decay_to {
                ensure!(
                    t.len() == n,
                    "adamw: tensor {i}: decay target holds {} of {n}",
                    t.len()
                );
            }
            desc.push(AdamWTensor {
                p: s.param.dptr(),
                g: s.grad.dptr(),
                m: s.m.dptr(),
                v: s.v.dptr(),
                p_bf16: s.param_bf16.as_ref().map_or(0, |b| b.dptr()),
                t: s.decay_to.as_ref().map_or(0, |t| t.dptr()),
                n: n as u64,
                wd: s.weight_decay,
                pad: 0,
            });
        }
        if let Some(g) = &grad_scale {
            ensure!(!g.is_empty(), "adamw: empty grad_scale");
        }
        let lens: Vec<usize> = desc.iter().map(|d| d.n as usize).collect();
        let sp = spans(&lens);
        let n_spans = sp.len() / 2;
        if n_spans == 0 {
            return Ok(());
        }
        let desc_d = self.upload(&as_bytes(&desc))?;
        let spans_d = self.upload(&sp)?;
        let bc1 = 1.0 - hp.beta1.powi(hp.step as i32);
        let bc2 = 1.0 - hp.beta2.powi(hp.step as i32);
        let grid = ((n_spans as u64).min(MAX_BLOCKS) as u32, 1, 1);
        launch!(self, "optim", "adamw_f32", grid, BLOCK;
            desc_d.dptr(), spans_d.dptr(), n_spans as i32, CHUNK as i64, hp.lr, hp.beta1, hp.beta2, hp.eps, bc1, bc2,
            grad_scale.map_or(0, |g| g.dptr()))
    }

    /// Global L2 norm of `grads` and the clipping coefficient for `max_norm` (as the CPU's
    /// `clip_grad_norm`: `max_norm / (norm + 1e-6)` when `max_norm > 0` and the norm exceeds it,
    /// else 1), returned on the device as `[norm, coefficient]` (f32) so a training step need
    /// not synchronise. Deterministic: fixed per-block partial sums, then one block in order.
    pub fn grad_norm(&self, grads: &[View<'_, f32>], max_norm: f32) -> Result<Buf<f32>> {
        let desc: Vec<GradTensor> = grads
            .iter()
            .map(|g| GradTensor {
                g: g.dptr(),
                n: g.len() as u64,
            })
            .collect();
        let lens: Vec<usize> = grads.iter().map(|g| g.len()).collect();
        let sp = spans(&lens);
        let n_spans = sp.len() / 2;
        let out = self.alloc::<f32>(2)?;
        let partial = self.alloc::<f64>(n_spans)?;
        if n_spans > 0 {
            let desc_d = self.upload(&as_bytes(&desc))?;
            let spans_d = self.upload(&sp)?;
            let grid = ((n_spans as u64).min(MAX_BLOCKS) as u32, 1, 1);
            launch!(self, "optim", "grad_norm_partial_f32", grid, BLOCK;
                desc_d.dptr(), spans_d.dptr(), n_spans as i32, CHUNK as i64, partial.dptr())?;
        }
        launch!(self, "optim", "grad_norm_finish", (1, 1, 1), REDUCE_BLOCK;
            partial.dptr(), out.dptr(), n_spans as i32, max_norm)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_every_tensor_in_chunks() {
        let s = spans(&[0, 1, CHUNK, CHUNK + 1]);
        assert_eq!(s, vec![1, 0, 2, 0, 3, 0, 3, CHUNK as u64]);
        assert_eq!(std::mem::size_of::<AdamWTensor>(), 64);
        assert_eq!(std::mem::size_of::<GradTensor>(), 16);
    }
}
