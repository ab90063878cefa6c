//! Whole-model inference on the GPU: the OLMo-2 / FlexOlmo forward of [`crate::model::Model`]
//! (`forward_with` in src/model/mod.rs) on flexrun's kernels, with an optional KV cache for
//! decoding. Used by `logits`, `eval` and `generate` with `--device cuda` and by `bench decode`.
//!
//! Precision: weights and the activations between kernels are bf16; the residual stream, the
//! router (input, weights, logits, softmax) and the output logits are f32; every GEMM accumulates
//! in f32. Logits therefore match the CPU's f32 forward to bf16 accuracy, not bit for bit
//! (tests/gpu_model.rs). Opt-out is exact all the same: an excluded expert is removed from the
//! model before upload ([`crate::model::Model::select_experts`]).
//!
//! Per layer: q, k, v = x Wq^T, x Wk^T, x Wv^T (cuBLAS) -> full-width RMSNorm of q and k -> RoPE ->
//! causal flash attention (the split-KV decode kernel for one new token against the cache) ->
//! o = a Wo^T -> x += RMSNorm(o); then the FFN: a dense FFN is the grouped expert GEMM with one
//! expert; an MoE layer routes x (f32 router GEMM, softmax with the bias, top-k), groups the token
//! copies by expert, runs the grouped gate/up + SwiGLU and down GEMMs in one launch each and
//! combines with the routing weights -> x += RMSNorm(y). Last: RMSNorm and the LM head.

use crate::backend::cuda::{Buf, Device, DeviceRead, RopeTableGpu};
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::Result;
use crate::model::{Ffn, Layer, Model};
use crate::tensor::Tensor;
use half::bf16;

/// A tensor's values as bf16 on the device (bf16 storage is uploaded as is).
fn upload_bf16(dev: &Device, t: &Tensor) -> Result<Buf<bf16>> {
    match t.bf16_data() {
        Some(d) => dev.upload(d),
        None => dev.upload_f32_as_bf16(t.data()),
    }
}

/// Several tensors stacked into one bf16 buffer (the experts' `[E, out, in]` layout).
fn upload_stacked(dev: &Device, parts: &[&Tensor]) -> Result<Buf<bf16>> {
    let mut all: Vec<bf16> = Vec::with_capacity(parts.iter().map(|t| t.numel()).sum());
    for t in parts {
        match t.bf16_data() {
            Some(d) => all.extend_from_slice(d),
            None => all.extend(t.data().iter().map(|&x| bf16::from_f32(x))),
        }
    }
    dev.upload(&all)
}

fn to_f32(t: &Tensor) -> Vec<f32> {
    t.clone().into_vec()
}

/// The FFN of one layer: `e` experts stacked (a dense FFN is one expert that every token uses).
pub(super) struct GpuFfn {
    pub(super) e: usize,
    pub(super) gate: Buf<bf16>,
    pub(super) up: Buf<bf16>,
    pub(super) down: Buf<bf16>,
    /// MoE only: router rows `[E, H]` (f32) and the per-expert bias `[E]` when the model has one.
    pub(super) router: Option<(Buf<f32>, Option<Buf<f32>>)>,
}

pub(super) struct GpuLayer {
    pub(super) q: Buf<bf16>,
    pub(super) k: Buf<bf16>,
    pub(super) v: Buf<bf16>,
    pub(super) o: Buf<bf16>,
    pub(super) q_norm: Buf<bf16>,
    pub(super) k_norm: Buf<bf16>,
    pub(super) post_attn_norm: Buf<bf16>,
    pub(super) post_ffn_norm: Buf<bf16>,
    pub(super) ffn: GpuFfn,
}

impl GpuLayer {
    /// Number of weights: 8 of attention and norms, 3 of the FFN, the router rows and bias.
    pub(super) fn weights(&self) -> usize {
        11 + self
            .ffn
            .router
            .as_ref()
            .map_or(0, |(_, b)| 1 + usize::from(b.is_some()))
    }
}

/// What the backward (train.rs) needs of one layer's forward.
pub(super) struct LayerSaved {
    /// bf16 copy of the layer input (the q/k/v GEMMs' operand).
    pub(super) xb: Buf<bf16>,
    pub(super) q_pre: Buf<bf16>,
    pub(super) rstd_q: Buf<f32>,
    pub(super) k_pre: Buf<bf16>,
    pub(super) rstd_k: Buf<f32>,
    /// RoPE'd q and k, v, the attention output and its logsumexp.
    pub(super) qr: Buf<bf16>,
    pub(super) kr: Buf<bf16>,
    pub(super) v: Buf<bf16>,
    pub(super) a: Buf<bf16>,
    pub(super) lse: Buf<f32>,
    pub(super) o_pre: Buf<bf16>,
    pub(super) rstd_o: Buf<f32>,
    /// The residual stream after attention: the FFN's and router's input (f32).
    pub(super) x_mid: Buf<f32>,
    pub(super) ffn: FfnSaved,
    /// The FFN output before its norm, and the norm's statistics.
    pub(super) y: Buf<bf16>,
    pub(super) rstd_m: Buf<f32>,
}

/// The FFN's forward state: the grouped rows `xp` (the permuted token copies, or the tokens
/// themselves for a dense FFN), the pre-activations, the SwiGLU output, the experts' outputs
/// `yp` (permuted) and, for MoE, the routing.
pub(super) struct FfnSaved {
    pub(super) xp: Buf<bf16>,
    pub(super) gate: Buf<bf16>,
    pub(super) up: Buf<bf16>,
    pub(super) act: Buf<bf16>,
    pub(super) yp: Option<Buf<bf16>>,
    pub(super) route: Option<RouteSaved>,
}

impl FfnSaved {
    /// The expert offsets of the grouped rows: the routing's, or `dense` (`[0, n]`: every token
    /// through the one expert).
    pub(super) fn offsets<'a>(&'a self, dense: &'a Buf<u32>) -> &'a Buf<u32> {
        self.route.as_ref().map_or(dense, |r| &r.perm.offsets)
    }
}

pub(super) struct RouteSaved {
    /// Router logits before the bias `[n, E]`, probabilities, top-k weights and indices.
    pub(super) z: Buf<f32>,
    pub(super) probs: Buf<f32>,
    pub(super) weights: Buf<f32>,
    pub(super) indices: Buf<u32>,
    pub(super) perm: crate::backend::cuda::MoePermutation,
    pub(super) k: usize,
}

/// What [`GpuModel::hidden`] keeps of each layer: nothing (inference), everything its
/// backward needs (training), or only its input (training with recomputation: the backward
/// runs [`GpuModel::layer_fwd`] again).
pub(super) enum Keep<'a> {
    Nothing,
    All(&'a mut Vec<LayerSaved>),
    Inputs(&'a mut Vec<Buf<f32>>),
}

/// The K/V cache of every layer on the device, `[B, capacity, kv_heads * hd]` bf16 per layer.
pub struct GpuKvCache {
    k: Vec<Buf<bf16>>,
    v: Vec<Buf<bf16>>,
    pub len: usize,
    pub capacity: usize,
    pub batch: usize,
}

/// A model's weights on one GPU, ready for [`GpuModel::forward`] (and, in train.rs,
/// [`GpuModel::loss_and_grads`]).
pub struct GpuModel<'d> {
    pub(super) dev: &'d Device,
    /// The host model's parameter ids of every weight (to map gradients back).
    pub(super) embed_id: usize,
    pub(super) final_norm_id: usize,
    pub(super) lm_head_id: usize,
    pub(super) layer_ids: Vec<Layer>,
    pub(super) h: usize,
    pub(super) inter: usize,
    pub(super) nh: usize,
    pub(super) nkv: usize,
    pub(super) hd: usize,
    pub(super) vocab: usize,
    pub(super) eps: f32,
    pub(super) top_k: usize,
    pub(super) renorm: bool,
    pub(super) max_pos: usize,
    pub(super) embed: Buf<bf16>,
    pub(super) final_norm: Buf<bf16>,
    pub(super) lm_head: Buf<bf16>,
    pub(super) rope: RopeTableGpu,
    pub(super) layers: Vec<GpuLayer>,
    /// Per weight, in [`super::GpuGrads`] order: the first expert whose part of the
    /// weight gets a gradient (0: all of it; the weight's expert count, 1 for an unstacked
    /// weight: frozen, no gradient). All zeros after [`GpuModel::upload`].
    pub(super) grad_from: Vec<usize>,
    /// Rows of logits the loss computes at once ([`GpuModel::set_ce_chunk_rows`]): the
    /// cross-entropy over a 100k vocabulary never holds all of a batch's logits.
    pub(super) ce_chunk_rows: usize,
    /// Training keeps only each layer's input and recomputes the layer's activations in the
    /// backward ([`GpuModel::set_recompute`]).
    pub(super) recompute: bool,
}

/// The bytes of bf16 logits (and as many of their gradient) the loss holds at once.
const CE_CHUNK_BYTES: usize = 1 << 30;

impl<'d> GpuModel<'d> {
    /// Upload `model` (after any expert selection) to `dev`.
    pub fn upload(dev: &'d Device, model: &Model) -> Result<GpuModel<'d>> {
        let cfg = &model.cfg;
        let ps = &model.params;
        let w = |id: usize| upload_bf16(dev, ps.value(id));
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        ensure!(
            h % 8 == 0 && inter % 8 == 0,
            "the CUDA forward needs hidden ({h}) and intermediate ({inter}) sizes that are multiples of 8"
        );
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let ffn = match &l.ffn {
                Ffn::Dense(f) => GpuFfn {
                    e: 1,
                    gate: w(f.gate)?,
                    up: w(f.up)?,
                    down: w(f.down)?,
                    router: None,
                },
                Ffn::Moe(experts) => {
                    let stack = |pick: &dyn Fn(&crate::model::Expert) -> usize| {
                        let parts: Vec<&Tensor> =
                            experts.iter().map(|x| ps.value(pick(x))).collect();
                        upload_stacked(dev, &parts)
                    };
                    let rows: Vec<f32> = experts
                        .iter()
                        .flat_map(|x| to_f32(ps.value(x.router)))
                        .collect();
                    let bias = if experts.iter().any(|x| x.bias.is_some()) {
                        let b: Vec<f32> = experts
                            .iter()
                            .map(|x| x.bias.map_or(0.0, |id| to_f32(ps.value(id))[0]))
                            .collect();
                        Some(dev.upload(&b)?)
                    } else {
                        None
                    };
                    GpuFfn {
                        e: experts.len(),
                        gate: stack(&|x| x.ffn.gate)?,
                        up: stack(&|x| x.ffn.up)?,
                        down: stack(&|x| x.ffn.down)?,
                        router: Some((dev.upload(&rows)?, bias)),
                    }
                }
            };
            layers.push(GpuLayer {
                q: w(l.q)?,
                k: w(l.k)?,
                v: w(l.v)?,
                o: w(l.o)?,
                q_norm: w(l.q_norm)?,
                k_norm: w(l.k_norm)?,
                post_attn_norm: w(l.post_attn_norm)?,
                post_ffn_norm: w(l.post_ffn_norm)?,
                ffn,
            });
        }
        let hd = cfg.head_dim();
        Ok(GpuModel {
            dev,
            embed_id: model.embed,
            final_norm_id: model.final_norm,
            lm_head_id: model.lm_head,
            layer_ids: model.layers.clone(),
            h,
            inter,
            nh: cfg.num_attention_heads,
            nkv: cfg.kv_heads(),
            hd,
            vocab: cfg.vocab_size,
            eps: cfg.rms_norm_eps as f32,
            top_k: cfg.top_k(),
            renorm: cfg.norm_topk_prob,
            max_pos: cfg.max_position_embeddings,
            embed: w(model.embed)?,
            final_norm: w(model.final_norm)?,
            lm_head: w(model.lm_head)?,
            rope: dev.rope_table(hd, cfg.rope_theta(), cfg.max_position_embeddings)?,
            grad_from: vec![0; 3 + layers.iter().map(GpuLayer::weights).sum::<usize>()],
            layers,
            ce_chunk_rows: (CE_CHUNK_BYTES / (2 * cfg.vocab_size.max(1))).max(1),
            recompute: false,
        })
    }

    /// The loss's logits are computed `rows` rows at a time (default: 1 GiB of bf16 logits).
    pub fn set_ce_chunk_rows(&mut self, rows: usize) {
        self.ce_chunk_rows = rows.max(1);
    }

    /// Activation recomputation in training: keep each layer's input only and recompute its
    /// activations when its backward runs (about one more forward per step; the activations of
    /// one layer at a time instead of every layer's).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// The row ranges of `n` rows in chunks of [`GpuModel::set_ce_chunk_rows`].
    pub(super) fn ce_chunks(&self, n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let c = self.ce_chunk_rows;
        (0..n.div_ceil(c)).map(move |i| i * c..((i + 1) * c).min(n))
    }

    pub fn device(&self) -> &'d Device {
        self.dev
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// `max_position_embeddings`: the longest sequence the model takes.
    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<GpuKvCache> {
        ensure!(
            capacity <= self.max_pos,
            "kv cache of {capacity} positions exceeds max_position_embeddings {}",
            self.max_pos
        );
        let n = batch * capacity * self.nkv * self.hd;
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(self.dev.zeros::<bf16>(n)?);
            v.push(self.dev.zeros::<bf16>(n)?);
        }
        Ok(GpuKvCache {
            k,
            v,
            len: 0,
            capacity,
            batch,
        })
    }

    /// `x [n, in] @ w^T` with `w [out, in]` (bf16 out).
    pub(super) fn linear(
        &self,
        x: &impl DeviceRead<bf16>,
        w: &Buf<bf16>,
        n: usize,
        out: usize,
    ) -> Result<Buf<bf16>> {
        let mut y = self.dev.alloc::<bf16>(n * out)?;
        self.dev
            .gemm(n, out, x.len() / n.max(1), x, false, w, true, &mut y, false)?;
        Ok(y)
    }

    /// RMSNorm of the rows of `x` with weight `w`: (y, rstd).
    pub(super) fn norm(
        &self,
        x: &impl DeviceRead<bf16>,
        w: &Buf<bf16>,
        n: usize,
    ) -> Result<(Buf<bf16>, Buf<f32>)> {
        let d = w.len();
        let mut y = self.dev.alloc::<bf16>(n * d)?;
        let mut rstd = self.dev.alloc::<f32>(n)?;
        self.dev
            .rmsnorm_fwd(x, w, &mut y, &mut rstd, n, d, self.eps)?;
        Ok((y, rstd))
    }

    /// `x + f32(y)`.
    pub(super) fn residual(&self, x: &Buf<f32>, y: &Buf<bf16>) -> Result<Buf<f32>> {
        let mut yf = self.dev.alloc::<f32>(y.len())?;
        self.dev.cast_bf16_to_f32(y, &mut yf)?;
        let mut out = self.dev.alloc::<f32>(x.len())?;
        self.dev.add_scaled(x, &yf, &mut out, 1.0)?;
        Ok(out)
    }

    pub(super) fn bf16_of(&self, x: &Buf<f32>) -> Result<Buf<bf16>> {
        let mut y = self.dev.alloc::<bf16>(x.len())?;
        self.dev.cast_f32_to_bf16(x, &mut y)?;
        Ok(y)
    }

    /// The FFN output `[n, H]` (bf16, before the post-FFN norm) for the residual stream `x`,
    /// and (with `save`) what its backward needs.
    /// `dense_offsets` is `[0, n]`, the offsets of a dense FFN's one expert.
    fn ffn(
        &self,
        f: &GpuFfn,
        x: &Buf<f32>,
        n: usize,
        dense_offsets: &Buf<u32>,
        save: bool,
    ) -> Result<(Buf<bf16>, Option<FfnSaved>)> {
        let dev = self.dev;
        let (h, i) = (self.h, self.inter);
        let xb = self.bf16_of(x)?;
        // Rows in expert order with their offsets: the tokens themselves for a dense FFN.
        let (xp, route, e, rows) = match &f.router {
            None => (xb, None, 1, n),
            Some((router, bias)) => {
                let (e, k) = (f.e, self.top_k.clamp(1, f.e));
                let mut z = dev.alloc::<f32>(n * e)?;
                dev.gemm(n, e, h, x, false, router, true, &mut z, false)?;
                let mut probs = dev.alloc::<f32>(n * e)?;
                let mut weights = dev.alloc::<f32>(n * k)?;
                let mut indices = dev.alloc::<u32>(n * k)?;
                dev.route(
                    &z,
                    bias.as_ref().map(|b| b.as_view()),
                    n,
                    e,
                    k,
                    self.renorm,
                    &mut probs,
                    &mut weights,
                    &mut indices,
                )?;
                let perm = dev.moe_permutation(&indices, n, k, e)?;
                let mut xp = dev.alloc::<bf16>(n * k * h)?;
                dev.moe_permute(&xb, &perm, h, &mut xp)?;
                let r = RouteSaved {
                    z,
                    probs,
                    weights,
                    indices,
                    perm,
                    k,
                };
                (xp, Some(r), e, n * k)
            }
        };
        let offsets = route.as_ref().map_or(dense_offsets, |r| &r.perm.offsets);
        let mut act = dev.alloc::<bf16>(rows * i)?;
        let (mut gate, mut up) = if save {
            (dev.alloc::<bf16>(rows * i)?, dev.alloc::<bf16>(rows * i)?)
        } else {
            (dev.alloc::<bf16>(0)?, dev.alloc::<bf16>(0)?)
        };
        let saved_pre = save.then(|| (gate.view_mut(..), up.view_mut(..)));
        dev.grouped_gateup_fwd(&xp, offsets, &f.gate, &f.up, e, h, i, &mut act, saved_pre)?;
        let mut yp = dev.alloc::<bf16>(rows * h)?;
        dev.grouped_nt(&act, offsets, &f.down, e, i, h, &mut yp)?;
        let (y, yp) = match &route {
            Some(r) => {
                let mut y = dev.alloc::<bf16>(n * h)?;
                dev.moe_combine(&yp, &r.weights, &r.perm, h, &mut y)?;
                (y, Some(yp))
            }
            None => (yp, None),
        };
        let saved = save.then_some(FfnSaved {
            xp,
            gate,
            up,
            act,
            yp,
            route,
        });
        Ok((y, saved))
    }

    /// Every MoE layer's routing of `ids` (`b` sequences of `t` tokens): the router
    /// probabilities and top-k experts the forward computed, downloaded per layer.
    pub fn routing(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
    ) -> Result<Vec<crate::model::runner::LayerRouting>> {
        let mut saved = Vec::with_capacity(self.layers.len());
        self.hidden(ids, b, t, None, Keep::All(&mut saved))?;
        saved
            .iter()
            .zip(&self.layers)
            .filter_map(|(s, l)| s.ffn.route.as_ref().map(|r| (r, l.ffn.e)))
            .map(|(r, e)| {
                Ok(crate::model::runner::LayerRouting {
                    experts: e,
                    k: r.k,
                    probs: self.dev.download(&r.probs)?,
                    topk: self.dev.download(&r.indices)?,
                })
            })
            .collect()
    }

    /// Logits `[b*t, V]` (f32, on the device) of `ids` (`b` sequences of `t` tokens). With a
    /// cache, the tokens continue the cached sequences at position `cache.len`, their K/V are
    /// appended, and `cache.len` advances by `t`.
    pub fn forward(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        cache: Option<&mut GpuKvCache>,
    ) -> Result<Buf<f32>> {
        let (xn, _) = self.hidden(ids, b, t, cache, Keep::Nothing)?;
        let mut logits = self.dev.alloc::<f32>(b * t * self.vocab)?;
        self.dev.gemm(
            b * t,
            self.vocab,
            self.h,
            &xn,
            false,
            &self.lm_head,
            true,
            &mut logits,
            false,
        )?;
        Ok(logits)
    }

    /// The final normed hidden states `[b*t, H]` (bf16) and the final norm's input and rstd;
    /// with `save`, each layer's [`LayerSaved`] is pushed there (training, no cache).
    #[allow(clippy::type_complexity)]
    pub(super) fn hidden(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        mut cache: Option<&mut GpuKvCache>,
        mut keep: Keep<'_>,
    ) -> Result<(Buf<bf16>, (Buf<bf16>, Buf<f32>))> {
        let dev = self.dev;
        ensure!(
            ids.len() == b * t && t > 0,
            "forward: {} ids for batch {b} x seq {t}",
            ids.len()
        );
        if let Some(&bad) = ids.iter().find(|&&x| x as usize >= self.vocab) {
            crate::bail!("token id {bad} out of range (vocab {})", self.vocab);
        }
        let offset = cache.as_ref().map_or(0, |c| c.len);
        ensure!(
            offset + t <= self.max_pos,
            "{} positions exceed max_position_embeddings {}",
            offset + t,
            self.max_pos
        );
        if let Some(c) = cache.as_ref() {
            crate::model::check_cache(c.batch, c.capacity, b, offset + t)?;
        }
        let (h, n) = (self.h, b * t);
        let mut e0 = dev.alloc::<bf16>(n * h)?;
        dev.embedding_fwd(&self.embed, self.vocab, h, ids, &mut e0)?;
        let mut x = dev.alloc::<f32>(n * h)?;
        dev.cast_bf16_to_f32(&e0, &mut x)?;
        let dense_offsets = dev.upload(&[0u32, n as u32])?;
        for li in 0..self.layers.len() {
            let want = matches!(keep, Keep::All(_));
            let (x_out, saved) = self.layer_fwd(
                li,
                &x,
                b,
                t,
                offset,
                cache.as_deref_mut(),
                want,
                &dense_offsets,
            )?;
            let x_in = std::mem::replace(&mut x, x_out);
            match (&mut keep, saved) {
                (Keep::All(v), Some(s)) => v.push(s),
                (Keep::Inputs(v), _) => v.push(x_in),
                _ => {}
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let xf = self.bf16_of(&x)?;
        let (xn, rstd) = self.norm(&xf, &self.final_norm, n)?;
        Ok((xn, (xf, rstd)))
    }

    /// Block `li` on the residual stream `x` (f32 `[b*t, H]`, positions from `offset`, the
    /// cache's K/V appended when there is one): the block's output and, with `save`, what its
    /// backward needs. `dense_offsets` is `[0, b*t]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_fwd(
        &self,
        li: usize,
        x: &Buf<f32>,
        b: usize,
        t: usize,
        offset: usize,
        cache: Option<&mut GpuKvCache>,
        save: bool,
        dense_offsets: &Buf<u32>,
    ) -> Result<(Buf<f32>, Option<LayerSaved>)> {
        let dev = self.dev;
        let l = &self.layers[li];
        let (h, nh, nkv, hd) = (self.h, self.nh, self.nkv, self.hd);
        let n = b * t;
        let xb = self.bf16_of(x)?;
        let q_pre = self.linear(&xb, &l.q, n, nh * hd)?;
        let k_pre = self.linear(&xb, &l.k, n, nkv * hd)?;
        let v = self.linear(&xb, &l.v, n, nkv * hd)?;
        let (q, rstd_q) = self.norm(&q_pre, &l.q_norm, n)?;
        let (k, rstd_k) = self.norm(&k_pre, &l.k_norm, n)?;
        let mut qr = dev.alloc::<bf16>(q.len())?;
        dev.rope(&q, &mut qr, &self.rope, n, nh * hd, t, offset, false)?;
        let mut kr = dev.alloc::<bf16>(k.len())?;
        dev.rope(&k, &mut kr, &self.rope, n, nkv * hd, t, offset, false)?;
        let mut a = dev.alloc::<bf16>(n * nh * hd)?;
        let mut lse = dev.alloc::<f32>(b * nh * t)?;
        match cache {
            None => dev.flash_attention_fwd(
                &qr,
                &kr,
                &v,
                AttnShape::causal(b, t, nh, nkv, hd),
                &mut a,
                &mut lse,
            )?,
            Some(c) => {
                let kvw = nkv * hd;
                for bi in 0..b {
                    let src = bi * t * kvw..(bi + 1) * t * kvw;
                    let d0 = (bi * c.capacity + offset) * kvw;
                    dev.copy(
                        &kr.view(src.clone()),
                        &mut c.k[li].view_mut(d0..d0 + t * kvw),
                    )?;
                    dev.copy(&v.view(src), &mut c.v[li].view_mut(d0..d0 + t * kvw))?;
                }
                let s = AttnShape::cached(b, t, offset, c.capacity, nh, nkv, hd);
                if t == 1 {
                    dev.flash_attention_decode(&qr, &c.k[li], &c.v[li], s, &mut a, &mut lse)?;
                } else {
                    dev.flash_attention_fwd(&qr, &c.k[li], &c.v[li], s, &mut a, &mut lse)?;
                }
            }
        }
        let o_pre = self.linear(&a, &l.o, n, h)?;
        let (o, rstd_o) = self.norm(&o_pre, &l.post_attn_norm, n)?;
        let x_mid = self.residual(x, &o)?;
        let (y, ffn) = self.ffn(&l.ffn, &x_mid, n, dense_offsets, save)?;
        let (m, rstd_m) = self.norm(&y, &l.post_ffn_norm, n)?;
        let x_out = self.residual(&x_mid, &m)?;
        let saved = match ffn {
            Some(ffn) if save => Some(LayerSaved {
                xb,
                q_pre,
                rstd_q,
                k_pre,
                rstd_k,
                qr,
                kr,
                v,
                a,
                lse,
                o_pre,
                rstd_o,
                x_mid,
                ffn,
                y,
                rstd_m,
            }),
            _ => None,
        };
        Ok((x_out, saved))
    }

    /// The final normed hidden states (the input of the LM head) of `ids` (`b` sequences of
    /// `t` tokens), brought to the host as `[b*t, H]` f32.
    pub fn final_hidden(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let (xn, _) = self.hidden(ids, b, t, None, Keep::Nothing)?;
        Ok(Tensor::from_vec(
            self.dev.download_bf16_as_f32(&xn)?,
            &[b * t, self.h],
        ))
    }

    /// [`GpuModel::forward`] without a cache, the logits brought to the host as `[b*t, V]`.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let l = self.forward(ids, b, t, None)?;
        Ok(Tensor::from_vec(
            self.dev.download(&l)?,
            &[b * t, self.vocab],
        ))
    }

    /// The logits of the last position of each of the `b` sequences, `[b, V]` on the host.
    pub fn last_logits(&self, logits: &Buf<f32>, b: usize, t: usize) -> Result<Vec<Vec<f32>>> {
        let v = self.vocab;
        if t == 1 {
            // A decode step: the last rows are all of them, one copy.
            let all = self.dev.download(logits)?;
            return Ok(all.chunks(v).map(|r| r.to_vec()).collect());
        }
        (0..b)
            .map(|bi| {
                let r = (bi * t + t - 1) * v;
                self.dev.download(&logits.view(r..r + v))
            })
            .collect()
    }
}
