//! The training loss and its gradients, written once over the backend's kernel families:
//! [`Net::loss_and_grads`] runs the forward of infer.rs keeping each layer's activations, the
//! fused cross-entropy (+ LM z-loss), the router z-loss and expert training's terms (the public
//! anchor, the router's own-text and public-text cross-entropies, the expert loudness), then the
//! backward of every block in reverse, giving f32 gradients of the trainable weights (the same
//! loss as the tape's [`crate::model::Model::loss_anchored`], which tests/net.rs and
//! tests/gpu_model.rs check it against). Frozen weights get no gradient memory: the backward
//! still passes gradients through them.
//!
//! Gradients flow in f32 along the residual stream; every other activation gradient is in the
//! activation type (bf16 on the GPU). Weight gradients are f32: `dW = dY^T X` for the dense
//! projections and the grouped weight-gradient kernel per expert.

use super::extra::LayerExtra;
use super::infer::{Act, FfnSaved, Keep, LayerSaved, NetFfn, F32};
use super::Net;
use crate::backend::kernels::{Buf, Kernels, R, W};
use crate::backend::shapes::{AttnShape, IGNORE};
use crate::ensure;
use crate::error::Result;
use crate::model::LossCoefs;

/// The loss of one batch (as the tape's `LossOut`): the total and the mean cross-entropy.
#[derive(Clone, Copy, Debug)]
pub struct NetLoss {
    pub loss: f32,
    pub ce: f32,
}

/// Gradients of a [`Net`]'s weights, on its backend: one entry per weight in the fixed order
/// of [`Net::host_layout`] (embedding, final norm, lm_head, then per layer q, k, v, o, q/k
/// norms, post-attention and post-FFN norms, FFN gate, up, down, router rows, bias). None for a
/// frozen weight; a stacked weight's gradient covers its trained experts only (the last ones,
/// see [`Net::train_as`]).
pub struct NetGrads<K: Kernels> {
    pub grads: Vec<Option<F32<K>>>,
}

impl<K: Kernels> NetGrads<K> {
    /// The gradient buffers that exist, in order (for the gradient norm and the optimizer).
    pub fn buffers(&self) -> Vec<&F32<K>> {
        self.grads.iter().flatten().collect()
    }
}

// Positions of a layer's weights after its first (see [`NetGrads`]).
const Q: usize = 0;
const K_: usize = 1;
const V: usize = 2;
const O: usize = 3;
const Q_NORM: usize = 4;
const K_NORM: usize = 5;
const POST_ATTN: usize = 6;
const POST_FFN: usize = 7;
/// The FFN's weights (gate, up, down, router rows, bias) start here; [`Net::ffn_bwd`] gets
/// them from there on.
const FFN: usize = 8;
const F_GATE: usize = 0;
const F_UP: usize = 1;
const F_DOWN: usize = 2;
const F_ROUTER: usize = 3;
const F_BIAS: usize = 4;
// The model-wide weights.
const EMBED: usize = 0;
const FINAL_NORM: usize = 1;
const LM_HEAD: usize = 2;

/// `dW [out, in] = dy^T x` (dy `[n, out]`, x `[n, in]`), f32.
fn weight_grad<K: Kernels>(dev: &K, dy: &Act<K>, x: &Act<K>, n: usize) -> Result<F32<K>> {
    let (out, inp) = (dy.len() / n.max(1), x.len() / n.max(1));
    let mut dw = dev.alloc::<f32>(out * inp)?;
    dev.gemm(out, inp, n, dy.r(), true, x.r(), false, dw.w(), false)?;
    Ok(dw)
}

/// `Some(f())` when `want`.
pub(super) fn when<T>(want: bool, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    want.then(f).transpose()
}

/// `y` += `x` for f32 buffers of the same size (a new buffer: the sum's rounding is the
/// backends' `add_scaled`).
fn add_into<K: Kernels>(dev: &K, y: &mut F32<K>, x: R<'_, K, f32>) -> Result<()> {
    let mut sum = dev.alloc::<f32>(y.len())?;
    dev.add_scaled(y.r(), x, sum.w(), 1.0)?;
    *y = sum;
    Ok(())
}

/// The window `w` of an activation buffer += `c * x`.
fn add_act_into<K: Kernels>(
    dev: &K,
    mut w: W<'_, K, K::A>,
    x: R<'_, K, K::A>,
    c: f32,
) -> Result<()> {
    let mut sum = dev.alloc::<K::A>(w.len)?;
    dev.add_scaled(w.r(), x, sum.w(), c)?;
    dev.copy(sum.r(), w.re())
}

impl<K: Kernels> Net<'_, K> {
    /// Index of layer `l`'s first weight in [`NetGrads::grads`].
    pub(super) fn layer_base(&self, l: usize) -> usize {
        3 + self.layers[..l].iter().map(|x| x.weights()).sum::<usize>()
    }

    /// Whether the unstacked weight at `idx` gets a gradient.
    fn wants(&self, idx: usize) -> bool {
        self.grad_from[idx] == 0
    }

    /// RMSNorm backward: (dx, dw f32 when `want_dw`) for `y = norm(x) * w` given `dy`.
    fn norm_bwd(
        &self,
        x: R<'_, K, K::A>,
        w: &Act<K>,
        dy: R<'_, K, K::A>,
        rstd: &F32<K>,
        n: usize,
        want_dw: bool,
    ) -> Result<(Act<K>, Option<F32<K>>)> {
        let d = w.len();
        let mut dx = self.dev.alloc::<K::A>(n * d)?;
        self.dev
            .rmsnorm_bwd_dx(x, w.r(), dy, rstd.r(), dx.w(), n, d)?;
        let dw = when(want_dw, || {
            let mut dw = self.dev.alloc::<f32>(d)?;
            self.dev.rmsnorm_bwd_dw(x, dy, rstd.r(), dw.w(), n, d)?;
            Ok(dw)
        })?;
        Ok((dx, dw))
    }

    /// The loss of `inputs` -> `targets` (`b` sequences of `t` tokens) under `coefs` and the
    /// gradient of every trainable weight. `anchored` marks the sequences the public anchor and
    /// the router's public-text loss apply to (and which the own-text loss skips); empty for
    /// none.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        coefs: &LossCoefs,
        anchored: &[bool],
    ) -> Result<(NetLoss, NetGrads<K>)> {
        let dev = self.dev;
        let (h, v) = (self.h, self.vocab);
        let n = b * t;
        ensure!(b > 0 && t > 0, "a training batch of {b} x {t} tokens");
        ensure!(
            targets.len() == n,
            "{} targets for {n} tokens",
            targets.len()
        );
        ensure!(
            anchored.is_empty() || anchored.len() == b,
            "{} anchored-row flags for a batch of {b}",
            anchored.len()
        );
        // Every layer's activations, or with recomputation only every layer's input.
        let (mut saved, mut layer_inputs) = (Vec::new(), Vec::new());
        let keep = match self.recompute {
            true => Keep::Inputs(&mut layer_inputs),
            false => Keep::All(&mut saved),
        };
        let (xn, (xf, rstd_f)) = self.hidden(inputs, b, t, None, keep)?;
        // The LM head and its loss, a chunk of rows at a time: the loss of each chunk, its
        // logits' gradient (scaled to the whole batch's mean), and from it the chunk's share of
        // the LM head's gradient and of the final hidden states' gradient.
        let scored = targets.iter().filter(|&&x| x != IGNORE).count().max(1) as f64;
        let (mut ce_sum, mut loss_sum) = (0f64, 0f64);
        let want_head = self.wants(LM_HEAD);
        let mut head_grad = when(want_head, || dev.alloc::<f32>(v * h))?;
        let mut dxn = dev.alloc::<K::A>(n * h)?;
        for (ci, rows) in self.ce_chunks(n).enumerate() {
            let nc = rows.len();
            let xc = xn.at(rows.start * h..rows.end * h);
            let logits = self.linear(xc, &self.lm_head, nc, v)?;
            let ce = dev.cross_entropy(logits.r(), nc, v, &targets[rows.clone()], coefs.z_loss)?;
            let st = K::ce_stats(&ce);
            ce_sum += st.ce as f64 * st.n_valid as f64;
            loss_sum += st.loss as f64 * st.n_valid as f64;
            let mut dlogits = dev.alloc::<K::A>(nc * v)?;
            dev.cross_entropy_bwd(
                logits.r(),
                &ce,
                (st.n_valid as f64 / scored) as f32,
                dlogits.w(),
            )?;
            drop(logits);
            if let Some(g) = head_grad.as_mut() {
                dev.gemm(v, h, nc, dlogits.r(), true, xc, false, g.w(), ci > 0)?;
            }
            dev.gemm(
                nc,
                h,
                v,
                dlogits.r(),
                false,
                self.lm_head.r(),
                false,
                dxn.w_at(rows.start * h..rows.end * h),
                false,
            )?;
        }
        let ce = NetLoss {
            loss: (loss_sum / scored) as f32,
            ce: (ce_sum / scored) as f32,
        };
        // The public rows' tokens, for the anchor.
        let anchor = coefs.public_anchor > 0.0 && anchored.iter().any(|&a| a);
        let mask = when(anchor, || self.row_mask(anchored, t))?;
        let plan = self.extra_plan(coefs, anchored, mask.as_ref(), b, t)?;
        // Each layer's extra loss terms: from the saved activations now, or (recomputation)
        // when the backward reaches the layer; summed in layer order at the end.
        let mut layer_loss = vec![0f32; self.layers.len()];
        let mut extra: Vec<Option<LayerExtra<K>>> = Vec::with_capacity(self.layers.len());
        for (li, s) in saved.iter().enumerate() {
            let (x, l) = self.layer_extra(li, s, &plan, mask.as_ref(), n)?;
            layer_loss[li] = l;
            extra.push(Some(x));
        }
        extra.resize_with(self.layers.len(), || None);
        let mut grads: Vec<Option<F32<K>>> = Vec::new();
        grads.resize_with(self.grad_from.len(), || None);

        // Final norm.
        grads[LM_HEAD] = head_grad;
        let (dxf, g) = self.norm_bwd(
            xf.r(),
            &self.final_norm,
            dxn.r(),
            &rstd_f,
            n,
            self.wants(FINAL_NORM),
        )?;
        grads[FINAL_NORM] = g;
        // The residual stream's gradient, f32.
        let mut dx = dev.alloc::<f32>(n * h)?;
        dev.act_to_f32(dxf.r(), dx.w())?;

        let dense_offsets = dev.upload(&[0u32, n as u32])?;
        // The gradient of a layer's input is needed only when something under it trains (the
        // tape's rule: expert training's first layer takes no attention backward).
        let below = &self.below;
        let mut stop = None;
        for li in (0..self.layers.len()).rev() {
            let l = &self.layers[li];
            // This layer's activations: saved (and freed after its backward), or recomputed
            // from its input.
            let s = match saved.pop() {
                Some(s) => s,
                None => {
                    let x = layer_inputs
                        .pop()
                        .expect("recomputation keeps every layer's input");
                    self.layer_fwd(li, &x, b, t, 0, None, true, &dense_offsets)?
                        .1
                        .expect("a saving forward returns the layer's activations")
                }
            };
            let s = &s;
            let ex = match extra[li].take() {
                Some(x) => x,
                None => {
                    let (x, l) = self.layer_extra(li, s, &plan, mask.as_ref(), n)?;
                    layer_loss[li] = l;
                    x
                }
            };
            let ex = &ex;
            let base = self.layer_base(li);
            let want = |w: usize| self.wants(base + w);
            // The gradient of the FFN's input (the residual stream after attention) is needed
            // when the attention below it or anything under the layer is trained.
            let need_mid = below[li] || (Q..=POST_ATTN).any(want);
            // x_out = x_mid + m, m = norm(ffn(x_mid)); the anchor adds to dm and, through
            // m0 = norm(y0), to expert 0's output.
            let (dmf, dy0) = match &ex.anchor {
                Some(a) => {
                    let mut dmf = dev.alloc::<f32>(n * h)?;
                    dev.copy(dx.r(), dmf.w())?;
                    let mut dm0 = dev.alloc::<K::A>(n * h)?;
                    let mask = mask.as_ref().expect("an anchored layer has the row mask");
                    dev.rel_sq_err_bwd(
                        a.m.r(),
                        a.m0.r(),
                        mask.r(),
                        a.sums.r(),
                        n,
                        h,
                        a.coef,
                        dmf.w(),
                        dm0.w(),
                    )?;
                    let yp = s.ffn.yp.as_ref().expect("the anchor needs MoE");
                    let y0 = yp.at(0..n * h);
                    let (dy0, dw) =
                        self.norm_bwd(y0, &l.post_ffn_norm, dm0.r(), &a.rstd0, n, want(POST_FFN))?;
                    grads[base + POST_FFN] = dw;
                    (Some(dmf), Some(dy0))
                }
                None => (None, None),
            };
            let mut dm_tmp = None;
            let dm = self.as_act(dmf.as_ref().unwrap_or(&dx), &mut dm_tmp)?;
            let (dy, dw) =
                self.norm_bwd(s.y.r(), &l.post_ffn_norm, dm, &s.rstd_m, n, want(POST_FFN))?;
            grads[base + POST_FFN] = sum_opt(dev, grads[base + POST_FFN].take(), dw)?;
            self.ffn_bwd(
                &l.ffn,
                s,
                &s.ffn,
                ex.dz.as_ref(),
                dy0.as_ref(),
                ex.loud,
                &dense_offsets,
                &dy,
                need_mid.then_some(&mut dx),
                n,
                &self.grad_from[base + FFN..base + l.weights()],
                &mut grads[base + FFN..base + l.weights()],
            )?;
            if !need_mid {
                stop = Some(li);
                break;
            }
            // x_mid = x_in + norm(a Wo^T).
            let mut do_tmp = None;
            let do_ = self.as_act(&dx, &mut do_tmp)?;
            let (do_pre, g) = self.norm_bwd(
                s.o_pre.r(),
                &l.post_attn_norm,
                do_,
                &s.rstd_o,
                n,
                want(POST_ATTN),
            )?;
            grads[base + POST_ATTN] = g;
            grads[base + O] = when(want(O), || weight_grad(dev, &do_pre, &s.a, n))?;
            let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
            let mut da = dev.alloc::<K::A>(n * nh * hd)?;
            dev.gemm(
                n,
                nh * hd,
                h,
                do_pre.r(),
                false,
                l.o.r(),
                false,
                da.w(),
                false,
            )?;
            let mut dqr = dev.alloc::<K::A>(n * nh * hd)?;
            let mut dkr = dev.alloc::<K::A>(n * nkv * hd)?;
            let mut dv = dev.alloc::<K::A>(n * nkv * hd)?;
            dev.attention_bwd(
                s.qr.r(),
                s.kr.r(),
                s.v.r(),
                s.a.r(),
                s.lse.r(),
                da.r(),
                AttnShape::causal(b, t, nh, nkv, hd),
                dqr.w(),
                dkr.w(),
                dv.w(),
            )?;
            let mut dqn = dev.alloc::<K::A>(dqr.len())?;
            dev.rope(dqr.r(), dqn.w(), &self.rope, n, nh * hd, t, 0, true)?;
            let mut dkn = dev.alloc::<K::A>(dkr.len())?;
            dev.rope(dkr.r(), dkn.w(), &self.rope, n, nkv * hd, t, 0, true)?;
            let (dq, g) =
                self.norm_bwd(s.q_pre.r(), &l.q_norm, dqn.r(), &s.rstd_q, n, want(Q_NORM))?;
            grads[base + Q_NORM] = g;
            let (dk, g) =
                self.norm_bwd(s.k_pre.r(), &l.k_norm, dkn.r(), &s.rstd_k, n, want(K_NORM))?;
            grads[base + K_NORM] = g;
            // dx_in = dx_mid + dq Wq + dk Wk + dv Wv (accumulated into the f32 residual grad).
            if below[li] {
                for (g, w) in [(&dq, &l.q), (&dk, &l.k), (&dv, &l.v)] {
                    let out = g.len() / n;
                    dev.gemm(n, h, out, g.r(), false, w.r(), false, dx.w(), true)?;
                }
            }
            for (slot, g) in [(Q, &dq), (K_, &dk), (V, &dv)] {
                grads[base + slot] = when(want(slot), || weight_grad(dev, g, &s.xb, n))?;
            }
            if !below[li] {
                // Nothing under this layer trains: its input's gradient is not needed.
                stop = Some(li);
                break;
            }
        }
        // Where the backward stopped early, the layers below still add their loss terms' values
        // (computed in the forward, or with recomputation from their inputs now).
        if let Some(top) = stop {
            for li in (0..top).rev() {
                if extra[li].is_some() {
                    continue;
                }
                let Some(x) = layer_inputs.pop() else { break };
                if plan.active() {
                    let s = self
                        .layer_fwd(li, &x, b, t, 0, None, true, &dense_offsets)?
                        .1
                        .expect("a saving forward returns the layer's activations");
                    layer_loss[li] = self.layer_extra(li, &s, &plan, mask.as_ref(), n)?.1;
                }
            }
        } else if self.wants(EMBED) {
            let mut tmp = None;
            let dxb = self.as_act(&dx, &mut tmp)?;
            let mut embed = dev.alloc::<f32>(self.embed.len())?;
            dev.embedding_bwd(dxb, inputs, v, h, embed.w())?;
            grads[EMBED] = Some(embed);
        }
        let loss = NetLoss {
            loss: ce.loss + layer_loss.iter().sum::<f32>(),
            ce: ce.ce,
        };
        Ok((loss, NetGrads { grads }))
    }

    /// Backward of one FFN from `dy` (the gradient of its output) and, for the anchor, `dy0`
    /// (a gradient on expert 0's own output, every token in its batch): the gradients of its
    /// trainable weights (`from`, `grads`: its gate, up, down, router and bias entries); the
    /// gradient of its input (the residual stream) is added to `dx` (None: not needed).
    /// `dz_extra` is added to
    /// the router logits' gradient. `dense_offsets` is `[0, n]` (a dense FFN's one expert).
    #[allow(clippy::too_many_arguments)]
    fn ffn_bwd(
        &self,
        f: &NetFfn<K>,
        s: &LayerSaved<K>,
        fs: &FfnSaved<K>,
        dz_extra: Option<&F32<K>>,
        dy0: Option<&Act<K>>,
        loud: Option<(f32, f32)>,
        dense_offsets: &Buf<K, u32>,
        dy: &Act<K>,
        dx: Option<&mut F32<K>>,
        n: usize,
        from: &[usize],
        grads: &mut [Option<F32<K>>],
    ) -> Result<()> {
        let dev = self.dev;
        let (h, i, e) = (self.h, self.inter, f.e);
        let rows = fs.xp.len() / h;
        let offsets = fs.offsets(dense_offsets);
        // The experts' output gradient in the grouped layout (and the routing weights' gradient).
        let dyp_moe;
        let (dyp, dweights) = match (&fs.route, &fs.yp) {
            (Some(r), Some(yp)) => {
                let mut dyp = dev.alloc::<K::A>(rows * h)?;
                let mut dw = dev.alloc::<f32>(n * r.k)?;
                dev.moe_combine_bwd(dy.r(), yp.r(), r.weights.r(), &r.perm, h, dyp.w(), dw.w())?;
                if let Some(d0) = dy0 {
                    add_act_into(dev, dyp.w_at(0..n * h), d0.r(), 1.0)?;
                }
                // The loudness term: d/d(expert 1's output) = ca * it, expert 0's: cb * it.
                if let Some((ca, cb)) = loud {
                    for (range, c) in [(n * h..2 * n * h, ca), (0..n * h, cb)] {
                        add_act_into(dev, dyp.w_at(range.clone()), yp.at(range), c)?;
                    }
                }
                dyp_moe = dyp;
                (&dyp_moe, Some(dw))
            }
            _ => (dy, None),
        };
        let mut dgate = dev.alloc::<K::A>(rows * i)?;
        let mut dup = dev.alloc::<K::A>(rows * i)?;
        dev.grouped_nn_swiglu_bwd(
            dyp.r(),
            offsets,
            f.down.r(),
            fs.gate.r(),
            fs.up.r(),
            e,
            h,
            i,
            dgate.w(),
            dup.w(),
        )?;
        // Weight gradients of the trained experts only: experts from..e, whose rows the
        // offsets from `from` on delimit (row indices are absolute).
        let trained = |w: usize| {
            let f = *from.get(w)?;
            (f < e).then_some((f, e - f))
        };
        grads[F_DOWN] = match trained(F_DOWN) {
            Some((f0, ne)) => {
                let mut down = dev.alloc::<f32>(ne * h * i)?;
                dev.grouped_wgrad(
                    dyp.r(),
                    fs.act.r(),
                    offsets.at(f0..),
                    None,
                    ne,
                    h,
                    i,
                    down.w(),
                )?;
                Some(down)
            }
            None => None,
        };
        // Gate and up come from one launch (same rows, same input): over the experts from the
        // first one either trains, each weight keeping its own trained experts.
        let (tg, tu) = (trained(F_GATE), trained(F_UP));
        if let Some(f0) = [tg, tu].iter().flatten().map(|t| t.0).min() {
            let ne = e - f0;
            let mut gate = dev.alloc::<f32>(ne * i * h)?;
            let mut up = dev.alloc::<f32>(ne * i * h)?;
            dev.grouped_wgrad(
                dgate.r(),
                fs.xp.r(),
                offsets.at(f0..),
                Some((dup.r(), up.w())),
                ne,
                i,
                h,
                gate.w(),
            )?;
            for (slot, t, g) in [(F_GATE, tg, gate), (F_UP, tu, up)] {
                grads[slot] = match t {
                    Some((f, n)) => Some(suffix(dev, g, f - f0, n)?),
                    None => None,
                };
            }
        }
        // The input gradient of the grouped rows, when it is needed.
        let dxp = match dx.is_some() {
            true => {
                let mut dxp = dev.alloc::<K::A>(rows * h)?;
                dev.grouped_nn(
                    dgate.r(),
                    offsets,
                    f.gate.r(),
                    Some((dup.r(), f.up.r())),
                    e,
                    i,
                    h,
                    dxp.w(),
                )?;
                Some(dxp)
            }
            false => None,
        };
        let (Some(r), Some(dweights), Some((router_w, bias))) = (&fs.route, dweights, &f.router)
        else {
            // Dense: the rows are the tokens.
            if let (Some(dx), Some(dxp)) = (dx, dxp) {
                let mut tmp = None;
                add_into(dev, dx, self.as_f32(&dxp, &mut tmp)?)?;
            }
            return Ok(());
        };
        // Token copies back to tokens.
        let mut dx = dx;
        if let (Some(dx), Some(dxp)) = (dx.as_deref_mut(), &dxp) {
            let mut dxb = dev.alloc::<K::A>(n * h)?;
            dev.moe_permute_bwd(dxp.r(), &r.perm, h, dxb.w())?;
            let mut tmp = None;
            add_into(dev, dx, self.as_f32(&dxb, &mut tmp)?)?;
        }
        // Router: dz from the routing weights and from the extra loss terms.
        let mut dz = dev.alloc::<f32>(n * e)?;
        dev.route_bwd(
            r.probs.r(),
            r.weights.r(),
            r.indices.r(),
            dweights.r(),
            n,
            e,
            r.k,
            self.renorm,
            dz.w(),
        )?;
        // The bias enters the routing only: the z-loss and router cross-entropies are losses
        // of the unbiased logits (as on the tape), so its gradient comes before their terms.
        if let (Some(bv), Some((f0, ne))) = (bias, trained(F_BIAS)) {
            let mut db = dev.alloc::<f32>(e)?;
            dev.route_bias_grad(dz.r(), bv.r(), n, e, db.w())?;
            grads[F_BIAS] = Some(suffix(dev, db, f0, ne)?);
        }
        if let Some(extra) = dz_extra {
            add_into(dev, &mut dz, extra.r())?;
        }
        if let Some((f0, ne)) = trained(F_ROUTER) {
            let mut router = dev.alloc::<f32>(e * h)?;
            dev.gemm(e, h, n, dz.r(), true, s.x_mid.r(), false, router.w(), false)?;
            grads[F_ROUTER] = Some(suffix(dev, router, f0, ne)?);
        }
        if let Some(dx) = dx {
            dev.gemm(n, h, e, dz.r(), false, router_w.r(), false, dx.w(), true)?;
        }
        Ok(())
    }
}

/// `a + b` where both exist; either alone otherwise.
fn sum_opt<K: Kernels>(dev: &K, a: Option<F32<K>>, b: Option<F32<K>>) -> Result<Option<F32<K>>> {
    Ok(match (a, b) {
        (Some(mut a), Some(b)) => {
            add_into(dev, &mut a, b.r())?;
            Some(a)
        }
        (a, b) => a.or(b),
    })
}

/// The segments `from..from + count` of `x` (`from + count` equal segments, one per expert):
/// `x` itself when that is all of it.
fn suffix<K: Kernels>(dev: &K, x: F32<K>, from: usize, count: usize) -> Result<F32<K>> {
    if from == 0 {
        return Ok(x);
    }
    let per = x.len() / (from + count).max(1);
    let mut out = dev.alloc::<f32>(count * per)?;
    dev.copy(x.at(from * per..), out.w())?;
    Ok(out)
}
impl<K: Kernels> Net<'_, K> {
    /// Mean next-token cross-entropy of `inputs` -> `targets` (forward only).
    pub fn cross_entropy(
        &self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
    ) -> Result<f32> {
        let (n, h, v) = (b * t, self.h, self.vocab);
        ensure!(
            targets.len() == n,
            "{} targets for {n} tokens",
            targets.len()
        );
        let (xn, _) = self.hidden(inputs, b, t, None, Keep::Nothing)?;
        let scored = targets.iter().filter(|&&x| x != IGNORE).count().max(1) as f64;
        let mut sum = 0f64;
        for rows in self.ce_chunks(n) {
            let nc = rows.len();
            let xc = xn.at(rows.start * h..rows.end * h);
            let logits = self.linear(xc, &self.lm_head, nc, v)?;
            let ce = self
                .dev
                .cross_entropy(logits.r(), nc, v, &targets[rows], 0.0)?;
            let st = K::ce_stats(&ce);
            sum += st.ce as f64 * st.n_valid as f64;
        }
        Ok((sum / scored) as f32)
    }
}
