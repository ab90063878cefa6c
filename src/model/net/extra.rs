//! The loss terms of training beyond the cross-entropy, per MoE layer (as the tape's
//! `Model::loss_anchored`): the router z-loss, the router's own-text and public-text
//! cross-entropies, the public anchor and the expert loudness. [`Net::extra_plan`] fixes
//! their settings for a batch; [`Net::layer_extra`] computes one layer's terms from its
//! activations (in the forward, or, with recomputation, when the backward reaches the layer)
//! and what their backward in train.rs needs.

use super::infer::{Act, LayerSaved, F32};
use super::Net;
use crate::backend::kernels::{Buf, Kernels};
use crate::backend::shapes::IGNORE;
use crate::ensure;
use crate::error::Result;
use crate::model::{router_ce_targets, LossCoefs};

/// Per MoE layer: what the extra loss terms need in the backward.
pub(super) struct LayerExtra<K: Kernels> {
    /// Gradient of the loss terms on the router logits (z-loss, router cross-entropies), added
    /// to the routing's in the backward.
    pub(super) dz: Option<F32<K>>,
    /// The public anchor: its weight, the layer's normed output and expert 0's alone
    /// (`m`, `m0`, `[n, H]`), the norm statistics of `m0` and the sums `[S, T]`.
    pub(super) anchor: Option<AnchorSaved<K>>,
    /// The expert loudness term's gradient on the experts' raw outputs: `(ca, cb)`, the
    /// factors of expert 1's and expert 0's own output (None: the term is off or inactive).
    pub(super) loud: Option<(f32, f32)>,
}

/// The extra loss terms' settings for every layer (see [`Net::extra_plan`]).
pub(super) struct ExtraPlan {
    /// 1 / the number of MoE layers: each term is a mean over them.
    pub(super) per_layer: f32,
    pub(super) router_z: f32,
    /// (weight, per-token targets) of the router's own-text and public-text cross-entropies.
    pub(super) router_ce: Vec<(f32, Vec<u32>)>,
    pub(super) anchor: f32,
    pub(super) anchor_layers: Vec<f32>,
    pub(super) loudness: f32,
    /// Each layer's index among the MoE layers.
    pub(super) moe_index: Vec<usize>,
}

pub(super) struct AnchorSaved<K: Kernels> {
    pub(super) coef: f32,
    pub(super) m: Act<K>,
    pub(super) m0: Act<K>,
    pub(super) rstd0: F32<K>,
    pub(super) sums: Buf<K, f64>,
}

impl ExtraPlan {
    /// Whether any term beyond the cross-entropy is on.
    pub(super) fn active(&self) -> bool {
        self.router_z != 0.0
            || !self.router_ce.is_empty()
            || self.anchor > 0.0
            || self.loudness > 0.0
    }
}

impl<K: Kernels> Net<'_, K> {
    /// `[b*t]` flags (u32) on the backend: 1 for the tokens of the `anchored` sequences.
    pub(super) fn row_mask(&self, anchored: &[bool], t: usize) -> Result<Buf<K, u32>> {
        let rows: Vec<u32> = anchored
            .iter()
            .flat_map(|&a| std::iter::repeat_n(u32::from(a), t))
            .collect();
        self.dev.upload(&rows)
    }

    /// What the loss terms on the router logits and the per-layer outputs need for every
    /// layer (as the CPU's `loss_anchored`): the router z-loss and router own-text and
    /// public-text cross-entropies (their targets and weights), the public anchor (on the
    /// tokens `mask` marks; None: no anchor) and the expert loudness.
    pub(super) fn extra_plan(
        &self,
        coefs: &LossCoefs,
        anchored: &[bool],
        mask: Option<&Buf<K, u32>>,
        b: usize,
        t: usize,
    ) -> Result<ExtraPlan> {
        let moe = self
            .layers
            .iter()
            .filter(|l| l.ffn.router.is_some())
            .count();
        let per_layer = 1.0 / moe.max(1) as f32;
        // Router cross-entropy targets: own rows (not anchored) toward expert 1, public rows
        // toward expert 0.
        let mut router_ce = Vec::new();
        for (w, public) in [(coefs.router_own, false), (coefs.router_public, true)] {
            if w <= 0.0 || moe == 0 {
                continue;
            }
            ensure!(
                self.layers
                    .iter()
                    .all(|l| l.ffn.router.is_none() || l.ffn.e == 2),
                "the router's own-text and public-text losses are for 2-expert (expert) \
                 training"
            );
            let target = router_ce_targets(anchored, b, t, public);
            if target.iter().any(|&x| x != IGNORE) {
                router_ce.push((w * per_layer, target));
            }
        }
        if mask.is_some() && moe > 0 {
            ensure!(
                coefs.public_anchor_layers.is_empty() || coefs.public_anchor_layers.len() == moe,
                "{} public-anchor layer weights for {moe} MoE layers",
                coefs.public_anchor_layers.len()
            );
        }
        // Each layer's index among the MoE layers (the anchor's per-layer weights).
        let moe_index = self
            .layers
            .iter()
            .scan(0usize, |k, l| {
                let i = *k;
                *k += usize::from(l.ffn.router.is_some());
                Some(i)
            })
            .collect();
        Ok(ExtraPlan {
            per_layer,
            router_z: coefs.router_z_loss * per_layer,
            router_ce,
            anchor: coefs.public_anchor,
            anchor_layers: coefs.public_anchor_layers.clone(),
            loudness: coefs.expert_loudness,
            moe_index,
        })
    }

    /// Layer `li`'s extra loss terms from its activations `s` under `plan`: what their backward
    /// needs, and their value.
    pub(super) fn layer_extra(
        &self,
        li: usize,
        s: &LayerSaved<K>,
        plan: &ExtraPlan,
        mask: Option<&Buf<K, u32>>,
        n: usize,
    ) -> Result<(LayerExtra<K>, f32)> {
        let dev = self.dev;
        let (l, h) = (&self.layers[li], self.h);
        let Some(r) = &s.ffn.route else {
            let none = LayerExtra {
                dz: None,
                anchor: None,
                loud: None,
            };
            return Ok((none, 0.0));
        };
        let e = l.ffn.e;
        let mut total = 0f32;
        let mut dz = None;
        if plan.router_z != 0.0 {
            let mut lse = dev.alloc::<f32>(n)?;
            total += plan.router_z * dev.router_zloss(r.z.r(), n, e, lse.w())?;
            let mut d = dev.alloc::<f32>(n * e)?;
            dev.router_zloss_bwd(r.z.r(), lse.r(), n, e, plan.router_z, d.w())?;
            dz = Some(d);
        }
        for (w, target) in &plan.router_ce {
            let d = match &mut dz {
                Some(d) => d,
                None => dz.insert(dev.zeros::<f32>(n * e)?),
            };
            total += dev.router_ce(r.z.r(), target, n, e, *w, d.w())?;
        }
        let anchor = match mask {
            Some(mask) => {
                ensure!(
                    r.k == e,
                    "the public anchor needs every token to use expert 0 (top-k = number of experts)"
                );
                let w = plan
                    .anchor_layers
                    .get(plan.moe_index[li])
                    .copied()
                    .unwrap_or(1.0);
                let coef = plan.anchor * w * plan.per_layer;
                let (m, _) = self.norm(s.y.r(), &l.post_ffn_norm, n)?;
                // Every token is in expert 0's batch, in token order: its first n rows.
                let yp = s.ffn.yp.as_ref().expect("MoE keeps the experts' outputs");
                let (m0, rstd0) = self.norm(yp.at(0..n * h), &l.post_ffn_norm, n)?;
                let (value, sums) = dev.rel_sq_err(m.r(), m0.r(), mask.r(), n, h)?;
                total += coef * value;
                Some(AnchorSaved {
                    coef,
                    m,
                    m0,
                    rstd0,
                    sums,
                })
            }
            None => None,
        };
        let loud = match plan.loudness > 0.0 {
            true => {
                ensure!(
                    e == 2 && r.k == 2,
                    "the expert loudness loss is for 2-expert (expert) training with top-2 of 2"
                );
                // Both experts see every token, in token order: expert 0's rows, then 1's.
                let yp = s.ffn.yp.as_ref().expect("MoE keeps the experts' outputs");
                let sq = |range: std::ops::Range<usize>| -> Result<f64> {
                    let mut f = dev.alloc::<f32>(n * h)?;
                    dev.act_to_f32(yp.at(range), f.w())?;
                    let norm = dev.grad_norm(&[f.r()], 0.0)?;
                    Ok((dev.download(norm.at(0..1))?[0] as f64).powi(2))
                };
                let (sa, sb) = (sq(n * h..2 * n * h)?, sq(0..n * h)?);
                let value = if sb > 0.0 {
                    (sa / sb - 1.0).max(0.0)
                } else {
                    0.0
                };
                let w = (plan.loudness * plan.per_layer) as f64;
                total += (w * value) as f32;
                (value > 0.0).then(|| ((2.0 * w / sb) as f32, (-2.0 * w * sa / (sb * sb)) as f32))
            }
            false => None,
        };
        Ok((LayerExtra { dz, anchor, loud }, total))
    }
}
