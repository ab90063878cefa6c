//! Attention wrappers (kernels/attention.cu; CPU reference src/ops/attention.rs).

use super::{blocks_for, int, launch, Device, DeviceRead, DeviceWrite};
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::Result;
use half::bf16;

/// Warps per block of the simple attention kernels (one warp per query or key row).
const ATTN_BLOCK: u32 = 128;
/// Largest head dimension the kernels hold in registers (ATTN_MAX_HD in attention.cu).
pub const ATTN_MAX_HD: usize = 256;

fn check(s: &AttnShape, q: usize, k: usize, v: usize) -> Result<()> {
    ensure!(
        s.nkv > 0 && s.nh.is_multiple_of(s.nkv),
        "attention: kv heads {} must divide heads {}",
        s.nkv,
        s.nh
    );
    ensure!(
        s.tq <= s.tk && s.tk <= s.tk_stride,
        "attention: bad lengths {s:?}"
    );
    ensure!(
        s.hd >= 1 && s.hd <= ATTN_MAX_HD,
        "attention: head dim {} outside 1..={ATTN_MAX_HD}",
        s.hd
    );
    ensure!(
        q == s.b * s.tq * s.nh * s.hd,
        "attention: q holds {q} values for {s:?}"
    );
    ensure!(
        k == s.b * s.tk_stride * s.nkv * s.hd && v == k,
        "attention: k/v hold {k}/{v} values for {s:?}"
    );
    Ok(())
}

struct Dims(i32, i32, i32, i32, i32, i32, i32);

fn dims(s: &AttnShape) -> Result<Dims> {
    Ok(Dims(
        int(s.b, "batch")?,
        int(s.tq, "tq")?,
        int(s.tk, "tk")?,
        int(s.tk_stride, "tk_stride")?,
        int(s.nh, "heads")?,
        int(s.nkv, "kv heads")?,
        int(s.hd, "head dim")?,
    ))
}

/// Blocks for one warp per row over `rows` rows.
fn warp_blocks(rows: usize) -> u32 {
    blocks_for(rows, ATTN_BLOCK / 32)
}

impl Device {
    /// Causal GQA attention forward: q `[B, Tq, nh, hd]`, k/v `[B, Tk_stride, nkv, hd]`, out like
    /// q (all bf16), `lse [B, nh, Tq]` (f32) for the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd(
        &self,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        s: AttnShape,
        out: &mut impl DeviceWrite<bf16>,
        lse: &mut impl DeviceWrite<f32>,
    ) -> Result<()> {
        check(&s, q.len(), k.len(), v.len())?;
        ensure!(
            out.len() == q.len() && lse.len() == s.b * s.nh * s.tq,
            "attention: out/lse sizes do not match {s:?}"
        );
        let d = dims(&s)?;
        let scale = 1.0 / (s.hd as f32).sqrt();
        launch!(self, "attention", "attn_fwd_bf16", (warp_blocks(s.b * s.nh * s.tq), 1, 1), ATTN_BLOCK;
            q.dptr(), k.dptr(), v.dptr(), out.dptr(), lse.dptr(), d.0, d.1, d.2, d.3, d.4, d.5, d.6, scale)
    }

    /// Attention backward: `dq` like q, `dk`/`dv` like k/v (zero past `tk`), from the forward's
    /// `out` and `lse` and the output gradient `dout`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        q: &impl DeviceRead<bf16>,
        k: &impl DeviceRead<bf16>,
        v: &impl DeviceRead<bf16>,
        out: &impl DeviceRead<bf16>,
        lse: &impl DeviceRead<f32>,
        dout: &impl DeviceRead<bf16>,
        s: AttnShape,
        dq: &mut impl DeviceWrite<bf16>,
        dk: &mut impl DeviceWrite<bf16>,
        dv: &mut impl DeviceWrite<bf16>,
    ) -> Result<()> {
        check(&s, q.len(), k.len(), v.len())?;
        ensure!(
            out.len() == q.len()
                && dout.len() == q.len()
                && dq.len() == q.len()
                && lse.len() == s.b * s.nh * s.tq,
            "attention backward: out/dout/dq/lse sizes do not match {s:?}"
        );
        ensure!(
            dk.len() == k.len() && dv.len() == v.len(),
            "attention backward: dk/dv sizes do not match {s:?}"
        );
        let d = dims(&s)?;
        let scale = 1.0 / (s.hd as f32).sqrt();
        let delta = self.alloc::<f32>(s.b * s.nh * s.tq)?;
        let qrows = warp_blocks(s.b * s.nh * s.tq);
        launch!(self, "attention", "attn_bwd_delta_bf16", (qrows, 1, 1), ATTN_BLOCK;
            out.dptr(), dout.dptr(), delta.dptr(), d.0, d.1, d.4, d.6)?;
        launch!(self, "attention", "attn_bwd_dq_bf16", (qrows, 1, 1), ATTN_BLOCK;
            q.dptr(), k.dptr(), v.dptr(), dout.dptr(), lse.dptr(), delta.dptr(), dq.dptr(),
            d.0, d.1, d.2, d.3, d.4, d.5, d.6, scale)?;
        launch!(self, "attention", "attn_bwd_dkdv_bf16", (warp_blocks(s.b * s.nkv * s.tk_stride), 1, 1), ATTN_BLOCK;
            q.dptr(), k.dptr(), v.dptr(), dout.dptr(), lse.dptr(), delta.dptr(), dk.dptr(), dv.dptr(),
            d.0, d.1, d.2, d.3, d.4, d.5, d.6, scale)
    }
}
