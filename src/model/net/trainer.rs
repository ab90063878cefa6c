//! The training step, written once over the backend's kernel families: [`NetTrainer`] keeps
//! f32 master weights and AdamW moments of the trained weights on the backend and runs
//! optimizer steps over [`Net::loss_and_grads`] (train.rs): gradient accumulation, global-norm
//! clipping and AdamW, and DP-SGD's step (per-record gradients clipped to a norm, summed,
//! noised and averaged).

use super::infer::{Act, F32};
use super::layout::{concat_from_host, split_to_host};
use super::train::{when, NetGrads};
use super::Net;
use crate::backend::kernels::{AdamWHyper, AdamWSlot, Kernels};
use crate::backend::shapes::IGNORE;
use crate::ensure;
use crate::error::Result;
use crate::model::adamw::{AdamW, AdamWConfig};
use crate::model::{LossCoefs, Model};
use crate::tensor::Tensor;

/// Training on a backend: the [`Net`]'s weights (bf16 on the GPU) are the compute copies of
/// f32 master weights (router rows and biases are f32 themselves), updated by AdamW after
/// global-norm clipping, with f32 moments. Only the host model's trainable parameters are
/// trained (and hold masters, moments and gradients); weight decay pulls toward each
/// parameter's `decay_to` where it has one. Made from, and written back to, the host model and
/// its [`AdamW`] state, so that checkpoints and resumption work on every backend.
pub struct NetTrainer<'d, K: Kernels> {
    pub model: Net<'d, K>,
    /// The trained weights, in [`NetGrads`] order.
    slots: Vec<TrainSlot<K>>,
    steps: u64,
    adamw: AdamWConfig,
    clip: f32,
}

/// One trained weight: its index in [`NetGrads`] order, the trained experts (segments `from..`
/// of `per` elements; 0 for an unstacked weight), the f32 master of that part (None where the
/// model's own buffer is f32), the decay target, and the AdamW moments.
struct TrainSlot<K: Kernels> {
    idx: usize,
    from: usize,
    per: usize,
    master: Option<F32<K>>,
    decay_to: Option<F32<K>>,
    m: F32<K>,
    v: F32<K>,
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

impl<K: Kernels> Net<'_, K> {
    /// Every weight, in [`NetGrads`] order: activation-type ones and f32 ones (router, bias).
    fn weights_mut(&mut self) -> Vec<WeightMut<'_, K>> {
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

/// A weight to update: in the activation type (with whether weight decay applies: matrices,
/// as the host's AdamW, not norm weights) or f32 (router rows `[1, H]` per expert and biases:
/// no decay).
enum WeightMut<'a, K: Kernels> {
    Bf16(&'a mut Act<K>, bool),
    F32(&'a mut F32<K>),
}

impl<K: Kernels> WeightMut<'_, K> {
    fn len(&self) -> usize {
        match self {
            WeightMut::Bf16(b, _) => b.len(),
            WeightMut::F32(b) => b.len(),
        }
    }
}

impl<'d, K: Kernels> NetTrainer<'d, K> {
    /// Upload `model` with its optimizer state `opt` (moments and step; absent moments start at
    /// zero). Master weights are the host's f32 values exactly. Frozen parameters get no
    /// gradients and no optimizer state; a stacked weight may be trained for its last experts
    /// only ([`Net::train_as`]).
    pub fn from_host(dev: &'d K, model: &Model, opt: &AdamW, clip: f32) -> Result<Self> {
        let mut g = Net::upload(dev, model)?;
        g.train_as(model)?;
        let layout = g.host_layout();
        let grad_from = g.grad_from.clone();
        let host = |id: usize| model.params.value(id).clone().into_vec();
        let mut slots = Vec::new();
        for (idx, (w, ids)) in g.weights_mut().into_iter().zip(&layout).enumerate() {
            let from = grad_from[idx];
            if from == ids.len() {
                continue;
            }
            let per = w.len() / ids.len();
            let ids = &ids[from..];
            let master = match w {
                WeightMut::Bf16(..) => Some(dev.upload(&concat_from_host(ids, per, host))?),
                WeightMut::F32(_) => None,
            };
            let decays_to = ids
                .iter()
                .flatten()
                .any(|&id| model.params.params[id].decay_to.is_some());
            let decay_to = when(decays_to, || {
                dev.upload(&concat_from_host(ids, per, |id| {
                    match &model.params.params[id].decay_to {
                        Some(t) => t.clone().into_vec(),
                        None => vec![0.0; per],
                    }
                }))
            })?;
            let moment = |which: usize| {
                concat_from_host(ids, per, |id| match &opt.moments[id] {
                    Some((mm, vv)) => [mm, vv][which].clone(),
                    None => vec![0.0; per],
                })
            };
            slots.push(TrainSlot {
                idx,
                from,
                per,
                master,
                decay_to,
                m: dev.upload(&moment(0))?,
                v: dev.upload(&moment(1))?,
            });
        }
        ensure!(!slots.is_empty(), "the model has no trainable parameters");
        Ok(NetTrainer {
            model: g,
            slots,
            steps: opt.step,
            adamw: opt.cfg,
            clip,
        })
    }

    /// Write the trained master weights into `model` (f32) and their moments and the step
    /// count into `opt`.
    pub fn to_host(&mut self, model: &mut Model, opt: &mut AdamW) -> Result<()> {
        let dev = self.model.dev;
        let layout = self.model.host_layout();
        let mut weights: Vec<Option<WeightMut<K>>> =
            self.model.weights_mut().into_iter().map(Some).collect();
        for s in &self.slots {
            let ids = &layout[s.idx][s.from..];
            let own;
            let values = match (&s.master, weights[s.idx].take()) {
                (Some(master), _) => master.r(),
                (None, Some(WeightMut::F32(b))) => {
                    own = b;
                    own.at(s.from * s.per..)
                }
                _ => unreachable!("every activation-type weight has a master copy"),
            };
            for (id, seg) in split_to_host(dev, values, ids)? {
                let shape = model.params.value(id).shape().to_vec();
                model.params.params[id].value = Tensor::from_vec(seg, &shape);
            }
            let ms = split_to_host(dev, s.m.r(), ids)?;
            let vs = split_to_host(dev, s.v.r(), ids)?;
            for ((id, mm), (_, vv)) in ms.into_iter().zip(vs) {
                opt.moments[id] = Some((mm, vv));
            }
        }
        opt.step = self.steps;
        Ok(())
    }

    /// One optimizer step over the micro-batches `(inputs, targets)` (`b` sequences of `t`
    /// tokens each; gradients averaged over them) at learning rate `lr`, with the loss terms of
    /// `coefs`; `anchored[i]` marks micro-batch i's public rows (see
    /// [`Net::loss_and_grads`]; empty: none anywhere).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        micro: &[(Vec<u32>, Vec<u32>)],
        anchored: &[Vec<bool>],
        b: usize,
        t: usize,
        lr: f32,
        coefs: &LossCoefs,
    ) -> Result<StepOut> {
        let dev = self.model.dev;
        ensure!(!micro.is_empty(), "a step needs at least one micro-batch");
        ensure!(
            anchored.is_empty() || anchored.len() == micro.len(),
            "{} anchored-row lists for {} micro-batches",
            anchored.len(),
            micro.len()
        );
        let scale = 1.0 / micro.len() as f32;
        let (mut loss, mut ce) = (0f32, 0f32);
        // One micro-batch: its gradients as they are. Several: their mean, accumulated.
        let mut single: Option<NetGrads<K>> = None;
        let mut acc: Vec<F32<K>> = Vec::new();
        for (i, (inp, tgt)) in micro.iter().enumerate() {
            let rows = anchored.get(i).map_or(&[][..], |a| &a[..]);
            let (l, grads) = self.model.loss_and_grads(inp, tgt, b, t, coefs, rows)?;
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
                    dev.scale(g.r(), a.w(), scale)?;
                    acc.push(a);
                }
            } else {
                for (a, g) in acc.iter_mut().zip(bufs) {
                    let mut sum = dev.alloc::<f32>(g.len())?;
                    dev.add_scaled(a.r(), g.r(), sum.w(), scale)?;
                    *a = sum;
                }
            }
        }
        let grads: Vec<&F32<K>> = match &single {
            Some(g) => g.buffers(),
            None => acc.iter().collect(),
        };
        let grad_norm = self.apply(&grads, lr)?;
        Ok(StepOut {
            loss,
            ce,
            grad_norm,
        })
    }

    /// Clip `grads` (one per trained weight, in [`NetGrads`] order) to the global norm and take
    /// one AdamW step at `lr`; returns the norm before clipping.
    fn apply(&mut self, grads: &[&F32<K>], lr: f32) -> Result<f32> {
        let dev = self.model.dev;
        ensure!(
            grads.len() == self.slots.len(),
            "{} gradients for {} trained weights",
            grads.len(),
            self.slots.len()
        );
        let views: Vec<_> = grads.iter().map(|g| g.r()).collect();
        let norm_scale = dev.grad_norm(&views, self.clip)?;
        self.steps += 1;
        let wd = self.adamw.weight_decay;
        let mut weights: Vec<Option<WeightMut<K>>> =
            self.model.weights_mut().into_iter().map(Some).collect();
        let mut slots = Vec::with_capacity(views.len());
        for (s, g) in self.slots.iter_mut().zip(&views) {
            let part = s.from * s.per..;
            let (param, param_act, decay) = match (weights[s.idx].take(), s.master.as_mut()) {
                (Some(WeightMut::Bf16(b, decays)), Some(mw)) => {
                    (mw.w(), Some(b.w_at(part)), if decays { wd } else { 0.0 })
                }
                (Some(WeightMut::F32(p)), _) => (p.w_at(part), None, 0.0),
                _ => unreachable!("every activation-type weight has a master copy"),
            };
            slots.push(AdamWSlot {
                param,
                grad: *g,
                m: s.m.w(),
                v: s.v.w(),
                weight_decay: decay,
                decay_to: s.decay_to.as_ref().map(|t| t.r()),
                param_act,
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
            Some(norm_scale.at(1..2)),
        )?;
        Ok(dev.download(norm_scale.at(0..1))?[0])
    }

    /// One DP-SGD step (as the CPU's): each private record's gradient (`b` = 1, `t` tokens, its
    /// own loss terms) is clipped to the L2 norm `record_clip` and summed; the public rows'
    /// gradient (their summed loss; `public`: inputs, targets, rows) is added unclipped; then
    /// `noise` (the Gaussian noise of every trained parameter, by host parameter id, in the
    /// parameter's shape: the caller draws it so that the CPU and the GPU draw the same) is
    /// added, the sum divided by `expected` (the expected number of rows), and the step
    /// finishes as [`NetTrainer::step`] does (global clipping, AdamW at `lr`).
    #[allow(clippy::too_many_arguments)]
    pub fn dp_step(
        &mut self,
        private: &[(Vec<u32>, Vec<u32>)],
        public: Option<(&[u32], &[u32], usize)>,
        t: usize,
        lr: f32,
        coefs: &LossCoefs,
        record_clip: f32,
        noise: &[(usize, Tensor)],
        expected: f64,
    ) -> Result<StepOut> {
        let dev = self.model.dev;
        ensure!(expected > 0.0, "DP-SGD: expected rows {expected}");
        let layout = self.model.host_layout();
        let mut acc: Vec<F32<K>> = self
            .slots
            .iter()
            .map(|s| dev.zeros::<f32>((layout[s.idx].len() - s.from) * s.per))
            .collect::<Result<_>>()?;
        let add = |acc: &mut Vec<F32<K>>, g: &NetGrads<K>, f: f32| -> Result<()> {
            let bufs = g.buffers();
            ensure!(
                bufs.len() == acc.len(),
                "{} gradients for {} trained weights",
                bufs.len(),
                acc.len()
            );
            for (a, g) in acc.iter_mut().zip(bufs) {
                let mut sum = dev.alloc::<f32>(g.len())?;
                dev.add_scaled(a.r(), g.r(), sum.w(), f)?;
                *a = sum;
            }
            Ok(())
        };
        let (mut loss_sum, mut ce_sum) = (0f64, 0f64);
        for (inp, tgt) in private {
            let (l, g) = self.model.loss_and_grads(inp, tgt, 1, t, coefs, &[false])?;
            let views: Vec<_> = g.buffers().iter().map(|b| b.r()).collect();
            let norm = dev.download(dev.grad_norm(&views, 0.0)?.at(0..1))?[0];
            add(&mut acc, &g, (record_clip / norm.max(1e-12)).min(1.0))?;
            loss_sum += l.loss as f64;
            ce_sum += l.ce as f64;
        }
        let n_pub = public.map_or(0, |p| p.2);
        if let Some((inp, tgt, rows)) = public.filter(|p| p.2 > 0) {
            let (l, g) = self
                .model
                .loss_and_grads(inp, tgt, rows, t, coefs, &vec![true; rows])?;
            add(&mut acc, &g, rows as f32)?;
            loss_sum += l.loss as f64 * rows as f64;
            ce_sum += l.ce as f64 * rows as f64;
        }
        // (sum + noise) / expected, per trained weight in its device layout.
        let noise_of: std::collections::HashMap<usize, &Tensor> =
            noise.iter().map(|(i, z)| (*i, z)).collect();
        for (a, s) in acc.iter_mut().zip(&self.slots) {
            let ids = &layout[s.idx][s.from..];
            for id in ids.iter().flatten() {
                ensure!(
                    noise_of.get(id).is_some_and(|z| z.numel() == s.per),
                    "DP-SGD: no noise of the right size for parameter {id}"
                );
            }
            let z = dev.upload(&concat_from_host(ids, s.per, |id| {
                noise_of[&id].data().to_vec()
            }))?;
            let mut sum = dev.alloc::<f32>(a.len())?;
            dev.add_scaled(a.r(), z.r(), sum.w(), 1.0)?;
            dev.scale(sum.r(), a.w(), (1.0 / expected) as f32)?;
        }
        let rows = (private.len() + n_pub).max(1) as f64;
        let loss = (loss_sum / rows) as f32;
        let ce = (ce_sum / rows) as f32;
        if !loss.is_finite() {
            return Ok(StepOut {
                loss,
                ce,
                grad_norm: f32::NAN,
            });
        }
        let grads: Vec<&F32<K>> = acc.iter().collect();
        let grad_norm = self.apply(&grads, lr)?;
        Ok(StepOut {
            loss,
            ce,
            grad_norm,
        })
    }

    /// Mean cross-entropy (no z-losses) of the current weights over `batches` of `t`-token
    /// sequences; None when there are none.
    pub fn valid_ce(&self, batches: &[(Vec<u32>, Vec<u32>)], t: usize) -> Result<Option<f32>> {
        crate::model::mean_ce(batches, t, |inp, tgt, b| {
            let scored = tgt.iter().filter(|&&x| x != IGNORE).count();
            Ok((self.model.cross_entropy(inp, tgt, b, t)?, scored))
        })
    }
}
