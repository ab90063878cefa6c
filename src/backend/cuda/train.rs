//! The training loss and its gradients on the GPU: [`GpuModel::loss_and_grads`] runs the forward
//! of infer.rs keeping each layer's activations, the fused cross-entropy (+ LM z-loss) and the
//! router z-loss, then the backward of every block in reverse with flexrun's backward kernels,
//! giving f32 gradients of every weight (the same loss as the CPU's [`crate::model::Model::loss`]:
//! mean next-token cross-entropy + `z_loss * mean(lse^2)` + `router_z_loss * mean over MoE layers
//! of mean(logsumexp(z)^2)`). tests/gpu_model.rs compares them with the CPU tape's gradients.
//!
//! Gradients flow in f32 along the residual stream; every other activation gradient is bf16 (as
//! the activations). Weight gradients are f32: cuBLAS `dW = dY^T X` for the dense projections and
//! the grouped weight-gradient kernel per expert.

use super::infer::{FfnSaved, GpuFfn, LayerSaved};
use super::{AdamWHyper, AdamWSlot, Buf, Device, GpuModel};
use crate::ensure;
use crate::error::Result;
use crate::model::Ffn;
use crate::model::Model;
use crate::ops::AttnShape;
use crate::tensor::Tensor;
use crate::train::optim::{AdamW, AdamWConfig};
use half::bf16;

/// The loss of one batch (as the CPU's `LossOut`): the total and the mean cross-entropy.
#[derive(Clone, Copy, Debug)]
pub struct GpuLoss {
    pub loss: f32,
    pub ce: f32,
}

/// f32 gradients of one FFN's stacked weights (`[E, I, H]`, `[E, I, H]`, `[E, H, I]`), router
/// rows `[E, H]` and bias `[E]`.
pub struct FfnGrads {
    pub gate: Buf<f32>,
    pub up: Buf<f32>,
    pub down: Buf<f32>,
    pub router: Option<Buf<f32>>,
    pub bias: Option<Buf<f32>>,
}

pub struct LayerGrads {
    pub q: Buf<f32>,
    pub k: Buf<f32>,
    pub v: Buf<f32>,
    pub o: Buf<f32>,
    pub q_norm: Buf<f32>,
    pub k_norm: Buf<f32>,
    pub post_attn_norm: Buf<f32>,
    pub post_ffn_norm: Buf<f32>,
    pub ffn: FfnGrads,
}

/// Gradients of every weight of a [`GpuModel`], on the device.
pub struct GpuGrads {
    pub embed: Buf<f32>,
    pub final_norm: Buf<f32>,
    pub lm_head: Buf<f32>,
    pub layers: Vec<LayerGrads>,
}

impl GpuGrads {
    /// Every gradient buffer (for the gradient norm and the optimizer), in a fixed order.
    pub fn buffers(&self) -> Vec<&Buf<f32>> {
        let mut v = vec![&self.embed, &self.final_norm, &self.lm_head];
        for l in &self.layers {
            v.extend([
                &l.q,
                &l.k,
                &l.v,
                &l.o,
                &l.q_norm,
                &l.k_norm,
                &l.post_attn_norm,
                &l.post_ffn_norm,
                &l.ffn.gate,
                &l.ffn.up,
                &l.ffn.down,
            ]);
            v.extend(l.ffn.router.iter());
            v.extend(l.ffn.bias.iter());
        }
        v
    }
}

/// `dW [out, in] = dy^T x` (dy `[n, out]`, x `[n, in]`, bf16), f32.
fn weight_grad(dev: &Device, dy: &Buf<bf16>, x: &Buf<bf16>, n: usize) -> Result<Buf<f32>> {
    let (out, inp) = (dy.len() / n.max(1), x.len() / n.max(1));
    let mut dw = dev.alloc::<f32>(out * inp)?;
    dev.gemm(out, inp, n, dy, true, x, false, &mut dw, false)?;
    Ok(dw)
}

impl GpuModel<'_> {
    /// RMSNorm backward: (dx bf16, dw f32) for `y = norm(x) * w` given `dy`.
    fn norm_bwd(
        &self,
        x: &Buf<bf16>,
        w: &Buf<bf16>,
        dy: &Buf<bf16>,
        rstd: &Buf<f32>,
        n: usize,
    ) -> Result<(Buf<bf16>, Buf<f32>)> {
        let d = w.len();
        let mut dx = self.dev.alloc::<bf16>(n * d)?;
        self.dev.rmsnorm_bwd_dx(x, w, dy, rstd, &mut dx, n, d)?;
        let mut dw = self.dev.alloc::<f32>(d)?;
        self.dev.rmsnorm_bwd_dw(x, dy, rstd, &mut dw, n, d)?;
        Ok((dx, dw))
    }

    /// The loss of `inputs` -> `targets` (`b` sequences of `t` tokens) and the gradient of every
    /// weight. `z_loss` and `router_z_loss` as in [`crate::model::LossCoefs`].
    pub fn loss_and_grads(
        &self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        z_loss: f32,
        router_z_loss: f32,
    ) -> Result<(GpuLoss, GpuGrads)> {
        let dev = self.dev;
        let (h, v) = (self.h, self.vocab);
        let n = b * t;
        ensure!(
            targets.len() == n,
            "{} targets for {n} tokens",
            targets.len()
        );
        let mut saved = Vec::with_capacity(self.layers.len());
        let (xn, (xf, rstd_f)) = self.hidden(inputs, b, t, None, Some(&mut saved))?;
        let logits = self.linear(&xn, &self.lm_head, n, v)?;
        let ce = dev.cross_entropy(&logits, n, v, targets, z_loss)?;
        // Router z-loss: the mean over MoE layers, each the mean of lse(z)^2 over tokens.
        let moe_layers = saved.iter().filter(|s| s.ffn.route.is_some()).count();
        let rz_scale = if moe_layers > 0 {
            router_z_loss / moe_layers as f32
        } else {
            0.0
        };
        let mut zlse = Vec::with_capacity(saved.len());
        let mut rz = 0f32;
        for s in &saved {
            zlse.push(match &s.ffn.route {
                Some(r) => {
                    let e = r.z.len() / n;
                    let mut lse = dev.alloc::<f32>(n)?;
                    rz += rz_scale * dev.router_zloss(&r.z, n, e, &mut lse)?;
                    Some(lse)
                }
                None => None,
            });
        }
        let loss = GpuLoss {
            loss: ce.loss + rz,
            ce: ce.ce,
        };

        // LM head and final norm.
        let mut dlogits = dev.alloc::<bf16>(n * v)?;
        dev.cross_entropy_bwd(&logits, &ce, 1.0, &mut dlogits)?;
        drop(logits);
        let lm_head = weight_grad(dev, &dlogits, &xn, n)?;
        let mut dxn = dev.alloc::<bf16>(n * h)?;
        dev.gemm(
            n,
            h,
            v,
            &dlogits,
            false,
            &self.lm_head,
            false,
            &mut dxn,
            false,
        )?;
        drop(dlogits);
        let (dxf, final_norm) = self.norm_bwd(&xf, &self.final_norm, &dxn, &rstd_f, n)?;
        // The residual stream's gradient, f32.
        let mut dx = dev.alloc::<f32>(n * h)?;
        dev.cast_bf16_to_f32(&dxf, &mut dx)?;

        let dense_offsets = dev.upload(&[0u32, n as u32])?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for ((l, s), zl) in self.layers.iter().zip(&saved).zip(&zlse).rev() {
            // x_out = x_mid + norm(ffn(x_mid)).
            let dm = self.bf16_of(&dx)?;
            let (dy, post_ffn_norm) = self.norm_bwd(&s.y, &l.post_ffn_norm, &dm, &s.rstd_m, n)?;
            let ffn = self.ffn_bwd(
                &l.ffn,
                s,
                &s.ffn,
                zl.as_ref(),
                rz_scale,
                &dense_offsets,
                &dy,
                &mut dx,
                n,
            )?;
            // x_mid = x_in + norm(a Wo^T).
            let do_ = self.bf16_of(&dx)?;
            let (do_pre, post_attn_norm) =
                self.norm_bwd(&s.o_pre, &l.post_attn_norm, &do_, &s.rstd_o, n)?;
            let o = weight_grad(dev, &do_pre, &s.a, n)?;
            let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
            let mut da = dev.alloc::<bf16>(n * nh * hd)?;
            dev.gemm(n, nh * hd, h, &do_pre, false, &l.o, false, &mut da, false)?;
            let mut dqr = dev.alloc::<bf16>(n * nh * hd)?;
            let mut dkr = dev.alloc::<bf16>(n * nkv * hd)?;
            let mut dv = dev.alloc::<bf16>(n * nkv * hd)?;
            dev.flash_attention_bwd(
                &s.qr,
                &s.kr,
                &s.v,
                &s.a,
                &s.lse,
                &da,
                AttnShape::causal(b, t, nh, nkv, hd),
                &mut dqr,
                &mut dkr,
                &mut dv,
            )?;
            let mut dqn = dev.alloc::<bf16>(dqr.len())?;
            dev.rope(&dqr, &mut dqn, &self.rope, n, nh * hd, t, 0, true)?;
            let mut dkn = dev.alloc::<bf16>(dkr.len())?;
            dev.rope(&dkr, &mut dkn, &self.rope, n, nkv * hd, t, 0, true)?;
            let (dq, q_norm) = self.norm_bwd(&s.q_pre, &l.q_norm, &dqn, &s.rstd_q, n)?;
            let (dk, k_norm) = self.norm_bwd(&s.k_pre, &l.k_norm, &dkn, &s.rstd_k, n)?;
            // dx_in = dx_mid + dq Wq + dk Wk + dv Wv (accumulated into the f32 residual grad).
            for (g, w) in [(&dq, &l.q), (&dk, &l.k), (&dv, &l.v)] {
                let out = g.len() / n;
                dev.gemm(n, h, out, g, false, w, false, &mut dx, true)?;
            }
            layers.push(LayerGrads {
                q: weight_grad(dev, &dq, &s.xb, n)?,
                k: weight_grad(dev, &dk, &s.xb, n)?,
                v: weight_grad(dev, &dv, &s.xb, n)?,
                o,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                ffn,
            });
        }
        layers.reverse();
        let dxb = self.bf16_of(&dx)?;
        let mut embed = dev.alloc::<f32>(self.embed.len())?;
        dev.embedding_bwd(&dxb, inputs, v, h, &mut embed)?;
        Ok((
            loss,
            GpuGrads {
                embed,
                final_norm,
                lm_head,
                layers,
            },
        ))
    }

    /// Backward of one FFN from `dy` (the gradient of its output): the weight, router and bias
    /// gradients; the gradient of its input (the residual stream) is added to `dx`.
    /// `dense_offsets` is `[0, n]` (a dense FFN's one expert).
    #[allow(clippy::too_many_arguments)]
    fn ffn_bwd(
        &self,
        f: &GpuFfn,
        s: &LayerSaved,
        fs: &FfnSaved,
        zlse: Option<&Buf<f32>>,
        rz_scale: f32,
        dense_offsets: &Buf<u32>,
        dy: &Buf<bf16>,
        dx: &mut Buf<f32>,
        n: usize,
    ) -> Result<FfnGrads> {
        let dev = self.dev;
        let (h, i, e) = (self.h, self.inter, f.e);
        let rows = fs.xp.len() / h;
        let offsets = fs.offsets(dense_offsets);
        // The experts' output gradient in the grouped layout (and the routing weights' gradient).
        let dyp_moe;
        let (dyp, dweights) = match (&fs.route, &fs.yp) {
            (Some(r), Some(yp)) => {
                let mut dyp = dev.alloc::<bf16>(rows * h)?;
                let mut dw = dev.alloc::<f32>(n * r.k)?;
                dev.moe_combine_bwd(dy, yp, &r.weights, &r.perm, h, &mut dyp, &mut dw)?;
                dyp_moe = dyp;
                (&dyp_moe, Some(dw))
            }
            _ => (dy, None),
        };
        let mut dgate = dev.alloc::<bf16>(rows * i)?;
        let mut dup = dev.alloc::<bf16>(rows * i)?;
        dev.grouped_nn_swiglu_bwd(
            dyp, offsets, &f.down, &fs.gate, &fs.up, e, h, i, &mut dgate, &mut dup,
        )?;
        let mut down = dev.alloc::<f32>(e * h * i)?;
        dev.grouped_wgrad(dyp, &fs.act, offsets, None, None, e, h, i, false, &mut down)?;
        let mut dxp = dev.alloc::<bf16>(rows * h)?;
        dev.grouped_nn(
            &dgate,
            offsets,
            &f.gate,
            Some((dup.as_view(), f.up.as_view())),
            e,
            i,
            h,
            &mut dxp,
        )?;
        let mut gate = dev.alloc::<f32>(e * i * h)?;
        let mut up = dev.alloc::<f32>(e * i * h)?;
        dev.grouped_wgrad(
            &dgate,
            &fs.xp,
            offsets,
            None,
            Some((dup.as_view(), up.view_mut(..))),
            e,
            i,
            h,
            false,
            &mut gate,
        )?;
        let (Some(r), Some(dweights), Some((router_w, bias))) = (&fs.route, dweights, &f.router)
        else {
            // Dense: the rows are the tokens.
            let mut dxf = dev.alloc::<f32>(n * h)?;
            dev.cast_bf16_to_f32(&dxp, &mut dxf)?;
            let mut sum = dev.alloc::<f32>(n * h)?;
            dev.add_scaled(&*dx, &dxf, &mut sum, 1.0)?;
            *dx = sum;
            return Ok(FfnGrads {
                gate,
                up,
                down,
                router: None,
                bias: None,
            });
        };
        // Token copies back to tokens.
        let mut dxb = dev.alloc::<bf16>(n * h)?;
        dev.moe_permute_bwd(&dxp, &r.perm, h, &mut dxb)?;
        let mut dxf = dev.alloc::<f32>(n * h)?;
        dev.cast_bf16_to_f32(&dxb, &mut dxf)?;
        let mut sum = dev.alloc::<f32>(n * h)?;
        dev.add_scaled(&*dx, &dxf, &mut sum, 1.0)?;
        *dx = sum;
        // Router: dz from the routing weights and from the router z-loss.
        let mut dz = dev.alloc::<f32>(n * e)?;
        dev.route_bwd(
            &r.probs,
            &r.weights,
            &r.indices,
            &dweights,
            n,
            e,
            r.k,
            self.renorm,
            &mut dz,
        )?;
        let db = match bias {
            Some(bv) => {
                let mut db = dev.alloc::<f32>(e)?;
                dev.route_bias_grad(&dz, bv, n, e, &mut db)?;
                Some(db)
            }
            None => None,
        };
        if let Some(lse) = zlse {
            if rz_scale != 0.0 {
                let mut dzz = dev.alloc::<f32>(n * e)?;
                dev.router_zloss_bwd(&r.z, lse, n, e, rz_scale, &mut dzz)?;
                let mut sum = dev.alloc::<f32>(n * e)?;
                dev.add_scaled(&dz, &dzz, &mut sum, 1.0)?;
                dz = sum;
            }
        }
        let mut router = dev.alloc::<f32>(e * h)?;
        dev.gemm(e, h, n, &dz, true, &s.x_mid, false, &mut router, false)?;
        dev.gemm(n, h, e, &dz, false, router_w, false, dx, true)?;
        Ok(FfnGrads {
            gate,
            up,
            down,
            router: Some(router),
            bias: db,
        })
    }

    /// The host parameter ids behind each weight, in [`GpuGrads::buffers`] order: one id for a
    /// plain weight, E for the experts' stacked weights, router rows and biases (equal
    /// segments; None for an expert without a bias, whose segment holds 0).
    pub fn host_layout(&self) -> Vec<Vec<Option<usize>>> {
        let one = |id: usize| vec![Some(id)];
        let mut out = vec![
            one(self.embed_id),
            one(self.final_norm_id),
            one(self.lm_head_id),
        ];
        for l in &self.layer_ids {
            for id in [
                l.q,
                l.k,
                l.v,
                l.o,
                l.q_norm,
                l.k_norm,
                l.post_attn_norm,
                l.post_ffn_norm,
            ] {
                out.push(one(id));
            }
            match &l.ffn {
                Ffn::Dense(f) => out.extend([one(f.gate), one(f.up), one(f.down)]),
                Ffn::Moe(experts) => {
                    let all = |pick: &dyn Fn(&crate::model::Expert) -> Option<usize>| {
                        experts.iter().map(pick).collect::<Vec<_>>()
                    };
                    out.push(all(&|x| Some(x.ffn.gate)));
                    out.push(all(&|x| Some(x.ffn.up)));
                    out.push(all(&|x| Some(x.ffn.down)));
                    out.push(all(&|x| Some(x.router)));
                    if experts.iter().any(|x| x.bias.is_some()) {
                        out.push(all(&|x| x.bias));
                    }
                }
            }
        }
        out
    }

    /// The gradients as host tensors keyed by the host model's parameter ids (stacked expert
    /// weights split per expert), in the shapes of the parameters, sorted by id.
    pub fn grads_to_host(
        &self,
        g: &GpuGrads,
        model: &crate::model::Model,
    ) -> Result<Vec<(usize, Tensor)>> {
        let mut out = Vec::new();
        for (ids, buf) in self.host_layout().iter().zip(g.buffers()) {
            for (id, seg) in split_to_host(self.dev, buf, ids)? {
                out.push((id, Tensor::from_vec(seg, model.params.value(id).shape())));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }
}

/// `buf` brought to the host and cut into `ids.len()` equal segments, one per id (None: skipped).
fn split_to_host(
    dev: &Device,
    buf: &Buf<f32>,
    ids: &[Option<usize>],
) -> Result<Vec<(usize, Vec<f32>)>> {
    let all = dev.download(buf)?;
    let per = all.len() / ids.len().max(1);
    Ok(ids
        .iter()
        .zip(all.chunks(per.max(1)))
        .filter_map(|(id, c)| id.map(|id| (id, c.to_vec())))
        .collect())
}

/// The host values of `ids` (f32; None: zeros of the segment size `per`) concatenated.
fn concat_from_host(
    ids: &[Option<usize>],
    per: usize,
    value: impl Fn(usize) -> Vec<f32>,
) -> Vec<f32> {
    let mut all = Vec::with_capacity(per * ids.len());
    for id in ids {
        match id {
            Some(id) => all.extend(value(*id)),
            None => all.extend(std::iter::repeat_n(0.0, per)),
        }
    }
    all
}

/// Training on the GPU: the [`GpuModel`]'s bf16 weights are the compute copies of f32 master
/// weights (router rows and biases are f32 themselves), updated by the fused AdamW kernel after
/// global-norm clipping, with f32 moments. Made from, and written back to, the host model and
/// its [`AdamW`] state, so that checkpoints and resumption work as on the CPU.
pub struct GpuTrainer<'d> {
    pub model: GpuModel<'d>,
    /// Per weight (in [`GpuGrads::buffers`] order): its f32 master copy (None where the model's
    /// own buffer is f32), and the AdamW moments.
    master: Vec<Option<Buf<f32>>>,
    m: Vec<Buf<f32>>,
    v: Vec<Buf<f32>>,
    steps: u64,
    adamw: AdamWConfig,
    clip: f32,
}

/// One optimizer step's scalars.
#[derive(Clone, Copy, Debug)]
pub struct StepOut {
    /// Mean over the micro-batches of the loss and of the cross-entropy.
    pub loss: f32,
    pub ce: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

impl<'d> GpuModel<'d> {
    /// Every weight, in [`GpuGrads::buffers`] order: bf16 ones and f32 ones (router, bias).
    fn weights_mut(&mut self) -> Vec<WeightMut<'_>> {
        let mut w = vec![
            WeightMut::Bf16(&mut self.embed, true),
            WeightMut::Bf16(&mut self.final_norm, false),
            WeightMut::Bf16(&mut self.lm_head, true),
        ];
        for l in &mut self.layers {
            w.extend([
                WeightMut::Bf16(&mut l.q, true),
                WeightMut::Bf16(&mut l.k, true),
                WeightMut::Bf16(&mut l.v, true),
                WeightMut::Bf16(&mut l.o, true),
                WeightMut::Bf16(&mut l.q_norm, false),
                WeightMut::Bf16(&mut l.k_norm, false),
                WeightMut::Bf16(&mut l.post_attn_norm, false),
                WeightMut::Bf16(&mut l.post_ffn_norm, false),
                WeightMut::Bf16(&mut l.ffn.gate, true),
                WeightMut::Bf16(&mut l.ffn.up, true),
                WeightMut::Bf16(&mut l.ffn.down, true),
            ]);
            if let Some((r, b)) = &mut l.ffn.router {
                w.push(WeightMut::F32(r));
                if let Some(b) = b {
                    w.push(WeightMut::F32(b));
                }
            }
        }
        w
    }
}

/// A weight to update: bf16 (with whether weight decay applies: matrices, as the CPU's AdamW,
/// not norm weights) or f32 (router rows `[1, H]` per expert and biases: no decay).
enum WeightMut<'a> {
    Bf16(&'a mut Buf<bf16>, bool),
    F32(&'a mut Buf<f32>),
}

impl<'d> GpuTrainer<'d> {
    /// Upload `model` (every parameter trainable) with its optimizer state `opt` (moments and
    /// step; absent moments start at zero). Master weights are the host's f32 values exactly.
    pub fn from_host(dev: &'d Device, model: &Model, opt: &AdamW, clip: f32) -> Result<Self> {
        ensure!(
            model
                .params
                .params
                .iter()
                .all(|p| p.trainable && p.decay_to.is_none()),
            "training on the GPU updates every weight with plain weight decay (no frozen \
             parameters, no decay targets)"
        );
        let mut g = GpuModel::upload(dev, model)?;
        let layout = g.host_layout();
        let host = |id: usize| model.params.value(id).clone().into_vec();
        let (mut master, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (w, ids) in g.weights_mut().into_iter().zip(&layout) {
            let n = match &w {
                WeightMut::Bf16(b, _) => b.len(),
                WeightMut::F32(b) => b.len(),
            };
            let per = n / ids.len();
            master.push(match w {
                WeightMut::Bf16(..) => Some(dev.upload(&concat_from_host(ids, per, host))?),
                WeightMut::F32(_) => None,
            });
            let moment = |which: usize| {
                concat_from_host(ids, per, |id| match &opt.moments[id] {
                    Some((mm, vv)) => [mm, vv][which].clone(),
                    None => vec![0.0; per],
                })
            };
            m.push(dev.upload(&moment(0))?);
            v.push(dev.upload(&moment(1))?);
        }
        Ok(GpuTrainer {
            model: g,
            master,
            m,
            v,
            steps: opt.step,
            adamw: opt.cfg,
            clip,
        })
    }

    /// Write the master weights into `model` (f32) and the moments and step count into `opt`.
    pub fn to_host(&mut self, model: &mut Model, opt: &mut AdamW) -> Result<()> {
        let dev = self.model.dev;
        let layout = self.model.host_layout();
        for (i, (ids, w)) in layout.iter().zip(self.model.weights_mut()).enumerate() {
            let values = match (&self.master[i], &w) {
                (Some(master), _) => master,
                (None, WeightMut::F32(own)) => &**own,
                (None, WeightMut::Bf16(..)) => unreachable!("every bf16 weight has a master copy"),
            };
            for (id, seg) in split_to_host(dev, values, ids)? {
                let shape = model.params.value(id).shape().to_vec();
                model.params.params[id].value = Tensor::from_vec(seg, &shape);
            }
            let ms = split_to_host(dev, &self.m[i], ids)?;
            let vs = split_to_host(dev, &self.v[i], ids)?;
            for ((id, mm), (_, vv)) in ms.into_iter().zip(vs) {
                opt.moments[id] = Some((mm, vv));
            }
        }
        opt.step = self.steps;
        Ok(())
    }

    /// One optimizer step over the micro-batches `(inputs, targets)` (`b` sequences of `t`
    /// tokens each; gradients averaged over them) at learning rate `lr`.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        micro: &[(Vec<u32>, Vec<u32>)],
        b: usize,
        t: usize,
        lr: f32,
        z_loss: f32,
        router_z_loss: f32,
    ) -> Result<StepOut> {
        let dev = self.model.dev;
        ensure!(!micro.is_empty(), "a step needs at least one micro-batch");
        let scale = 1.0 / micro.len() as f32;
        let (mut loss, mut ce) = (0f32, 0f32);
        // One micro-batch: its gradients as they are. Several: their mean, accumulated.
        let mut single: Option<GpuGrads> = None;
        let mut acc: Vec<Buf<f32>> = Vec::new();
        for (inp, tgt) in micro {
            let (l, grads) = self
                .model
                .loss_and_grads(inp, tgt, b, t, z_loss, router_z_loss)?;
            loss += scale * l.loss;
            ce += scale * l.ce;
            if micro.len() == 1 {
                single = Some(grads);
                continue;
            }
            let bufs = grads.buffers();
            if acc.is_empty() {
                for g in bufs {
                    let mut a = dev.alloc::<f32>(g.len())?;
                    dev.scale(g, &mut a, scale)?;
                    acc.push(a);
                }
            } else {
                for (a, g) in acc.iter_mut().zip(bufs) {
                    let mut sum = dev.alloc::<f32>(g.len())?;
                    dev.add_scaled(&*a, g, &mut sum, scale)?;
                    *a = sum;
                }
            }
        }
        let grads: Vec<&Buf<f32>> = match &single {
            Some(g) => g.buffers(),
            None => acc.iter().collect(),
        };
        let views: Vec<_> = grads.iter().map(|g| g.as_view()).collect();
        let norm_scale = dev.grad_norm(&views, self.clip)?;
        self.steps += 1;
        let wd = self.adamw.weight_decay;
        let mut slots = Vec::with_capacity(views.len());
        for ((((w, g), master), m), v) in self
            .model
            .weights_mut()
            .into_iter()
            .zip(&views)
            .zip(self.master.iter_mut())
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            let (param, param_bf16, decay) = match (w, master) {
                (WeightMut::Bf16(b, decays), Some(mw)) => {
                    (mw, Some(b), if decays { wd } else { 0.0 })
                }
                (WeightMut::F32(p), _) => (p, None, 0.0),
                (WeightMut::Bf16(..), None) => unreachable!("every bf16 weight has a master copy"),
            };
            slots.push(AdamWSlot {
                param,
                grad: *g,
                m,
                v,
                weight_decay: decay,
                param_bf16,
            });
        }
        dev.adamw_step(
            &mut slots,
            AdamWHyper {
                lr,
                beta1: self.adamw.beta1,
                beta2: self.adamw.beta2,
                eps: self.adamw.eps,
                step: self.steps,
            },
            Some(norm_scale.view(1..2)),
        )?;
        let grad_norm = dev.download(&norm_scale.view(0..1))?[0];
        Ok(StepOut {
            loss,
            ce,
            grad_norm,
        })
    }

    /// Mean cross-entropy (no z-losses) of the current weights over `batches` of `t`-token
    /// sequences; None when there are none.
    pub fn valid_ce(&self, batches: &[(Vec<u32>, Vec<u32>)], t: usize) -> Result<Option<f32>> {
        if batches.is_empty() {
            return Ok(None);
        }
        let (mut sum, mut n) = (0f64, 0usize);
        for (inp, tgt) in batches {
            let b = inp.len() / t;
            ensure!(
                b * t == inp.len(),
                "validation batch is not a multiple of seq"
            );
            let ce = self.model.cross_entropy(inp, tgt, b, t)?;
            sum += ce as f64 * tgt.len() as f64;
            n += tgt.len();
        }
        Ok(Some((sum / n.max(1) as f64) as f32))
    }
}

impl GpuModel<'_> {
    /// Mean next-token cross-entropy of `inputs` -> `targets` (forward only).
    pub fn cross_entropy(
        &self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
    ) -> Result<f32> {
        let n = b * t;
        let (xn, _) = self.hidden(inputs, b, t, None, None)?;
        let logits = self.linear(&xn, &self.lm_head, n, self.vocab)?;
        Ok(self
            .dev
            .cross_entropy(&logits, n, self.vocab, targets, 0.0)?
            .ce)
    }
}
