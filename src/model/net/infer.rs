//! The transformer's forward, written once over the backend's kernel families
//! ([`crate::backend::kernels::Kernels`]): the OLMo-2 / FlexOlmo forward, with an optional KV
//! cache for decoding, on flexrun's CUDA kernels (`backend::cuda::Device`) or the CPU's
//! (`ops::host::Host`). The tape model (`Model::forward_with` in src/model/mod.rs) is its
//! reference (tests/net.rs on the CPU, tests/gpu_model.rs on a GPU).
//!
//! Precision: weights and the activations between kernels are the backend's activation type
//! (bf16 on the GPU, f32 on the CPU); the residual stream, the router (input, weights, logits,
//! softmax) and the output logits are f32; every GEMM accumulates in f32. On the GPU, logits
//! therefore match the CPU's f32 forward to bf16 accuracy, not bit for bit. Opt-out is exact all
//! the same: an excluded expert is removed from the model before upload
//! ([`crate::model::Model::select_experts`]).
//!
//! Per layer: q, k, v = x Wq^T, x Wk^T, x Wv^T -> full-width RMSNorm of q and k -> RoPE ->
//! causal attention (the decode kernel for one new token against the cache) -> o = a Wo^T ->
//! x += RMSNorm(o); then the FFN: a dense FFN is the grouped expert GEMM with one expert; an MoE
//! layer routes x (f32 router GEMM, softmax with the bias, top-k), groups the token copies by
//! expert, runs the grouped gate/up + SwiGLU and down GEMMs and combines with the routing
//! weights -> x += RMSNorm(y). Last: RMSNorm and the LM head.

use crate::backend::kernels::{Buf, Kernels, R};
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::Result;
use crate::model::{Ffn, Layer, Model};
use crate::tensor::Tensor;

fn to_f32(t: &Tensor) -> Vec<f32> {
    t.clone().into_vec()
}

/// A buffer of backend `K`'s activation type.
pub(super) type Act<K> = Buf<K, <K as Kernels>::A>;
/// A buffer of f32 (statistics, the residual stream, the router, gradients of weights).
pub(super) type F32<K> = Buf<K, f32>;

/// The FFN of one layer: `e` experts stacked (a dense FFN is one expert that every token uses).
pub(super) struct NetFfn<K: Kernels> {
    pub(super) e: usize,
    pub(super) gate: Act<K>,
    pub(super) up: Act<K>,
    pub(super) down: Act<K>,
    /// MoE only: router rows `[E, H]` (f32) and the per-expert bias `[E]` when the model has one.
    pub(super) router: Option<(F32<K>, Option<F32<K>>)>,
}

pub(super) struct NetLayer<K: Kernels> {
    pub(super) q: Act<K>,
    pub(super) k: Act<K>,
    pub(super) v: Act<K>,
    pub(super) o: Act<K>,
    pub(super) q_norm: Act<K>,
    pub(super) k_norm: Act<K>,
    pub(super) post_attn_norm: Act<K>,
    pub(super) post_ffn_norm: Act<K>,
    pub(super) ffn: NetFfn<K>,
}

impl<K: Kernels> NetLayer<K> {
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
pub(super) struct LayerSaved<K: Kernels> {
    /// The layer input in the activation type (the q/k/v GEMMs' operand).
    pub(super) xb: Act<K>,
    pub(super) q_pre: Act<K>,
    pub(super) rstd_q: F32<K>,
    pub(super) k_pre: Act<K>,
    pub(super) rstd_k: F32<K>,
    /// RoPE'd q and k, v, the attention output and its logsumexp.
    pub(super) qr: Act<K>,
    pub(super) kr: Act<K>,
    pub(super) v: Act<K>,
    pub(super) a: Act<K>,
    pub(super) lse: F32<K>,
    pub(super) o_pre: Act<K>,
    pub(super) rstd_o: F32<K>,
    /// The residual stream after attention: the FFN's and router's input (f32).
    pub(super) x_mid: F32<K>,
    pub(super) ffn: FfnSaved<K>,
    /// The FFN output before its norm, and the norm's statistics.
    pub(super) y: Act<K>,
    pub(super) rstd_m: F32<K>,
}

/// The FFN's forward state: the grouped rows `xp` (the permuted token copies, or the tokens
/// themselves for a dense FFN), the pre-activations, the SwiGLU output, the experts' outputs
/// `yp` (permuted) and, for MoE, the routing.
pub(super) struct FfnSaved<K: Kernels> {
    pub(super) xp: Act<K>,
    pub(super) gate: Act<K>,
    pub(super) up: Act<K>,
    pub(super) act: Act<K>,
    pub(super) yp: Option<Act<K>>,
    pub(super) route: Option<RouteSaved<K>>,
}

impl<K: Kernels> FfnSaved<K> {
    /// The expert offsets of the grouped rows: the routing's, or `dense` (`[0, n]`: every token
    /// through the one expert).
    pub(super) fn offsets<'a>(&'a self, dense: &'a Buf<K, u32>) -> R<'a, K, u32> {
        self.route
            .as_ref()
            .map_or(dense.r(), |r| K::perm_offsets(&r.perm))
    }
}

pub(super) struct RouteSaved<K: Kernels> {
    /// Router logits before the bias `[n, E]`, probabilities, top-k weights and indices.
    pub(super) z: F32<K>,
    pub(super) probs: F32<K>,
    pub(super) weights: F32<K>,
    pub(super) indices: Buf<K, u32>,
    pub(super) perm: K::Perm,
    pub(super) k: usize,
}

/// What [`Net::hidden`] keeps of each layer: nothing (inference), everything its backward
/// needs (training), or only its input (training with recomputation: the backward runs
/// [`Net::layer_fwd`] again).
pub(super) enum Keep<'a, K: Kernels> {
    Nothing,
    All(&'a mut Vec<LayerSaved<K>>),
    Inputs(&'a mut Vec<F32<K>>),
}

/// The K/V cache of every layer, `[B, capacity, kv_heads * hd]` activations per layer.
pub struct NetCache<K: Kernels> {
    k: Vec<Act<K>>,
    v: Vec<Act<K>>,
    pub len: usize,
    pub capacity: usize,
    pub batch: usize,
}

/// A model's weights on a backend, ready for [`Net::forward`] (and, in train.rs,
/// [`Net::loss_and_grads`]).
pub struct Net<'d, K: Kernels> {
    pub(super) dev: &'d K,
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
    pub(super) embed: Act<K>,
    pub(super) final_norm: Act<K>,
    pub(super) lm_head: Act<K>,
    pub(super) rope: K::Rope,
    pub(super) layers: Vec<NetLayer<K>>,
    /// Per weight, in [`super::NetGrads`] order: the first expert whose part of the weight
    /// gets a gradient (0: all of it; the weight's expert count, 1 for an unstacked weight:
    /// frozen, no gradient). All zeros after [`Net::upload`].
    pub(super) grad_from: Vec<usize>,
    /// Per layer: whether anything under it (a lower layer, the embedding) trains, so that the
    /// backward needs the gradient of its input (set with `grad_from`).
    pub(super) below: Vec<bool>,
    /// Rows of logits the loss computes at once ([`Net::set_ce_chunk_rows`]): the
    /// cross-entropy over a 100k vocabulary never holds all of a batch's logits.
    pub(super) ce_chunk_rows: usize,
    /// Training keeps only each layer's input and recomputes the layer's activations in the
    /// backward ([`Net::set_recompute`]).
    pub(super) recompute: bool,
}

/// The bytes of logits (and as many of their gradient) the loss holds at once.
const CE_CHUNK_BYTES: usize = 1 << 30;

impl<'d, K: Kernels> Net<'d, K> {
    /// Put `model` (after any expert selection) on `dev`.
    pub fn upload(dev: &'d K, model: &Model) -> Result<Net<'d, K>> {
        let cfg = &model.cfg;
        let ps = &model.params;
        let w = |id: usize| dev.upload_tensors_act(&[ps.value(id)]);
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        dev.check_widths(h, inter)?;
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let ffn = match &l.ffn {
                Ffn::Dense(f) => NetFfn {
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
                        dev.upload_tensors_act(&parts)
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
                    NetFfn {
                        e: experts.len(),
                        gate: stack(&|x| x.ffn.gate)?,
                        up: stack(&|x| x.ffn.up)?,
                        down: stack(&|x| x.ffn.down)?,
                        router: Some((dev.upload(&rows)?, bias)),
                    }
                }
            };
            layers.push(NetLayer {
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
        let act_bytes = std::mem::size_of::<K::A>();
        Ok(Net {
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
            grad_from: vec![0; 3 + layers.iter().map(NetLayer::weights).sum::<usize>()],
            below: vec![true; layers.len()],
            layers,
            ce_chunk_rows: (CE_CHUNK_BYTES / (act_bytes * cfg.vocab_size.max(1))).max(1),
            recompute: false,
        })
    }

    /// The loss's logits are computed `rows` rows at a time (default: 1 GiB of logits).
    pub fn set_ce_chunk_rows(&mut self, rows: usize) {
        self.ce_chunk_rows = rows.max(1);
    }

    /// Activation recomputation in training: keep each layer's input only and recompute its
    /// activations when its backward runs (about one more forward per step; the activations of
    /// one layer at a time instead of every layer's).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// The row ranges of `n` rows in chunks of [`Net::set_ce_chunk_rows`].
    pub(super) fn ce_chunks(&self, n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let c = self.ce_chunk_rows;
        (0..n.div_ceil(c)).map(move |i| i * c..((i + 1) * c).min(n))
    }

    pub fn device(&self) -> &'d K {
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
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<NetCache<K>> {
        ensure!(
            capacity <= self.max_pos,
            "kv cache of {capacity} positions exceeds max_position_embeddings {}",
            self.max_pos
        );
        let n = batch * capacity * self.nkv * self.hd;
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(self.dev.zeros::<K::A>(n)?);
            v.push(self.dev.zeros::<K::A>(n)?);
        }
        Ok(NetCache {
            k,
            v,
            len: 0,
            capacity,
            batch,
        })
    }

    /// `x [n, in] @ w^T` with `w [out, in]`.
    pub(super) fn linear(
        &self,
        x: R<'_, K, K::A>,
        w: &Act<K>,
        n: usize,
        out: usize,
    ) -> Result<Act<K>> {
        let mut y = self.dev.alloc::<K::A>(n * out)?;
        self.dev.gemm(
            n,
            out,
            x.len / n.max(1),
            x,
            false,
            w.r(),
            true,
            y.w(),
            false,
        )?;
        Ok(y)
    }

    /// RMSNorm of the rows of `x` with weight `w`: (y, rstd).
    pub(super) fn norm(&self, x: R<'_, K, K::A>, w: &Act<K>, n: usize) -> Result<(Act<K>, F32<K>)> {
        let d = w.len();
        let mut y = self.dev.alloc::<K::A>(n * d)?;
        let mut rstd = self.dev.alloc::<f32>(n)?;
        self.dev
            .rmsnorm_fwd(x, w.r(), y.w(), rstd.w(), n, d, self.eps)?;
        Ok((y, rstd))
    }

    /// `x + f32(y)`.
    pub(super) fn residual(&self, x: &F32<K>, y: &Act<K>) -> Result<F32<K>> {
        let mut tmp = None;
        let yf = self.as_f32(y, &mut tmp)?;
        let mut out = self.dev.alloc::<f32>(x.len())?;
        self.dev.add_scaled(x.r(), yf, out.w(), 1.0)?;
        Ok(out)
    }

    /// `x` read as activations: `x` itself where activations are f32, else a copy in `tmp`.
    pub(super) fn as_act<'a>(
        &self,
        x: &'a F32<K>,
        tmp: &'a mut Option<Act<K>>,
    ) -> Result<R<'a, K, K::A>> {
        if let Some(v) = K::f32_as_act(x.r()) {
            return Ok(v);
        }
        *tmp = Some(self.act_of(x)?);
        let t: &'a Option<Act<K>> = tmp;
        Ok(t.as_ref().expect("just set").r())
    }

    /// Activations read as f32: themselves where they are f32, else a copy in `tmp`.
    pub(super) fn as_f32<'a>(
        &self,
        x: &'a Act<K>,
        tmp: &'a mut Option<F32<K>>,
    ) -> Result<R<'a, K, f32>> {
        if let Some(v) = K::act_as_f32(x.r()) {
            return Ok(v);
        }
        let mut y = self.dev.alloc::<f32>(x.len())?;
        self.dev.act_to_f32(x.r(), y.w())?;
        *tmp = Some(y);
        let t: &'a Option<F32<K>> = tmp;
        Ok(t.as_ref().expect("just set").r())
    }

    /// `x` in the activation type.
    pub(super) fn act_of(&self, x: &F32<K>) -> Result<Act<K>> {
        let mut y = self.dev.alloc::<K::A>(x.len())?;
        self.dev.f32_to_act(x.r(), y.w())?;
        Ok(y)
    }

    /// The FFN output `[n, H]` (before the post-FFN norm) for the residual stream `x`, and
    /// (with `save`) what its backward needs. `dense_offsets` is `[0, n]`, the offsets of a
    /// dense FFN's one expert.
    fn ffn(
        &self,
        f: &NetFfn<K>,
        x: &F32<K>,
        n: usize,
        dense_offsets: &Buf<K, u32>,
        save: bool,
    ) -> Result<(Act<K>, Option<FfnSaved<K>>)> {
        let dev = self.dev;
        let (h, i) = (self.h, self.inter);
        // Rows in expert order with their offsets: the tokens themselves for a dense FFN.
        let (xp, route, e, rows) = match &f.router {
            None => (self.act_of(x)?, None, 1, n),
            Some((router, bias)) => {
                let (e, k) = (f.e, self.top_k.clamp(1, f.e));
                let mut z = dev.alloc::<f32>(n * e)?;
                dev.gemm(n, e, h, x.r(), false, router.r(), true, z.w(), false)?;
                let mut probs = dev.alloc::<f32>(n * e)?;
                let mut weights = dev.alloc::<f32>(n * k)?;
                let mut indices = dev.alloc::<u32>(n * k)?;
                dev.route(
                    z.r(),
                    bias.as_ref().map(|b| b.r()),
                    n,
                    e,
                    k,
                    self.renorm,
                    probs.w(),
                    weights.w(),
                    indices.w(),
                )?;
                let perm = dev.moe_permutation(indices.r(), n, k, e)?;
                let mut xp = dev.alloc::<K::A>(n * k * h)?;
                let mut tmp = None;
                dev.moe_permute(self.as_act(x, &mut tmp)?, &perm, h, xp.w())?;
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
        let offsets = route
            .as_ref()
            .map_or(dense_offsets.r(), |r| K::perm_offsets(&r.perm));
        let mut act = dev.alloc::<K::A>(rows * i)?;
        let (mut gate, mut up) = if save {
            (dev.alloc::<K::A>(rows * i)?, dev.alloc::<K::A>(rows * i)?)
        } else {
            (dev.alloc::<K::A>(0)?, dev.alloc::<K::A>(0)?)
        };
        let saved_pre = save.then(|| (gate.w(), up.w()));
        dev.grouped_gateup_fwd(
            xp.r(),
            offsets,
            f.gate.r(),
            f.up.r(),
            e,
            h,
            i,
            act.w(),
            saved_pre,
        )?;
        let mut yp = dev.alloc::<K::A>(rows * h)?;
        dev.grouped_nt(act.r(), offsets, f.down.r(), e, i, h, yp.w())?;
        let (y, yp) = match &route {
            Some(r) => {
                let mut y = dev.alloc::<K::A>(n * h)?;
                dev.moe_combine(yp.r(), r.weights.r(), &r.perm, h, y.w())?;
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
    /// probabilities and top-k experts the forward computed, brought to the host per layer.
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
                    probs: self.dev.download(r.probs.r())?,
                    topk: self.dev.download(r.indices.r())?,
                })
            })
            .collect()
    }

    /// Logits `[b*t, V]` (f32, on the backend) of `ids` (`b` sequences of `t` tokens). With a
    /// cache, the tokens continue the cached sequences at position `cache.len`, their K/V are
    /// appended, and `cache.len` advances by `t`.
    pub fn forward(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        cache: Option<&mut NetCache<K>>,
    ) -> Result<F32<K>> {
        let (xn, _) = self.hidden(ids, b, t, cache, Keep::Nothing)?;
        let mut logits = self.dev.alloc::<f32>(b * t * self.vocab)?;
        self.dev.gemm(
            b * t,
            self.vocab,
            self.h,
            xn.r(),
            false,
            self.lm_head.r(),
            true,
            logits.w(),
            false,
        )?;
        Ok(logits)
    }

    /// The final normed hidden states `[b*t, H]` and the final norm's input and rstd; with
    /// `keep`, each layer's [`LayerSaved`] (or input) is pushed there (training, no cache).
    #[allow(clippy::type_complexity)]
    pub(super) fn hidden(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        mut cache: Option<&mut NetCache<K>>,
        mut keep: Keep<'_, K>,
    ) -> Result<(Act<K>, (Act<K>, F32<K>))> {
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
        let mut e0 = dev.alloc::<K::A>(n * h)?;
        dev.embedding_fwd(self.embed.r(), self.vocab, h, ids, e0.w())?;
        let mut x = dev.alloc::<f32>(n * h)?;
        dev.act_to_f32(e0.r(), x.w())?;
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
        let xf = self.act_of(&x)?;
        let (xn, rstd) = self.norm(xf.r(), &self.final_norm, n)?;
        Ok((xn, (xf, rstd)))
    }

    /// Block `li` on the residual stream `x` (f32 `[b*t, H]`, positions from `offset`, the
    /// cache's K/V appended when there is one): the block's output and, with `save`, what its
    /// backward needs. `dense_offsets` is `[0, b*t]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_fwd(
        &self,
        li: usize,
        x: &F32<K>,
        b: usize,
        t: usize,
        offset: usize,
        cache: Option<&mut NetCache<K>>,
        save: bool,
        dense_offsets: &Buf<K, u32>,
    ) -> Result<(F32<K>, Option<LayerSaved<K>>)> {
        let dev = self.dev;
        let l = &self.layers[li];
        let (h, nh, nkv, hd) = (self.h, self.nh, self.nkv, self.hd);
        let n = b * t;
        let xb = self.act_of(x)?;
        let q_pre = self.linear(xb.r(), &l.q, n, nh * hd)?;
        let k_pre = self.linear(xb.r(), &l.k, n, nkv * hd)?;
        let v = self.linear(xb.r(), &l.v, n, nkv * hd)?;
        let (q, rstd_q) = self.norm(q_pre.r(), &l.q_norm, n)?;
        let (k, rstd_k) = self.norm(k_pre.r(), &l.k_norm, n)?;
        let mut qr = dev.alloc::<K::A>(q.len())?;
        dev.rope(q.r(), qr.w(), &self.rope, n, nh * hd, t, offset, false)?;
        let mut kr = dev.alloc::<K::A>(k.len())?;
        dev.rope(k.r(), kr.w(), &self.rope, n, nkv * hd, t, offset, false)?;
        let mut a = dev.alloc::<K::A>(n * nh * hd)?;
        let mut lse = dev.alloc::<f32>(b * nh * t)?;
        match cache {
            None => dev.attention_fwd(
                qr.r(),
                kr.r(),
                v.r(),
                AttnShape::causal(b, t, nh, nkv, hd),
                a.w(),
                lse.w(),
            )?,
            Some(c) => {
                let kvw = nkv * hd;
                for bi in 0..b {
                    let src = bi * t * kvw..(bi + 1) * t * kvw;
                    let d0 = (bi * c.capacity + offset) * kvw;
                    dev.copy(kr.at(src.clone()), c.k[li].w_at(d0..d0 + t * kvw))?;
                    dev.copy(v.at(src), c.v[li].w_at(d0..d0 + t * kvw))?;
                }
                let s = AttnShape::cached(b, t, offset, c.capacity, nh, nkv, hd);
                if t == 1 {
                    dev.attention_decode(qr.r(), c.k[li].r(), c.v[li].r(), s, a.w(), lse.w())?;
                } else {
                    dev.attention_fwd(qr.r(), c.k[li].r(), c.v[li].r(), s, a.w(), lse.w())?;
                }
            }
        }
        let o_pre = self.linear(a.r(), &l.o, n, h)?;
        let (o, rstd_o) = self.norm(o_pre.r(), &l.post_attn_norm, n)?;
        let x_mid = self.residual(x, &o)?;
        let (y, ffn) = self.ffn(&l.ffn, &x_mid, n, dense_offsets, save)?;
        let (m, rstd_m) = self.norm(y.r(), &l.post_ffn_norm, n)?;
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
            self.dev.download_act_f32(xn.r())?,
            &[b * t, self.h],
        ))
    }

    /// [`Net::forward`] without a cache, the logits brought to the host as `[b*t, V]`.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let l = self.forward(ids, b, t, None)?;
        Ok(Tensor::from_vec(
            self.dev.download(l.r())?,
            &[b * t, self.vocab],
        ))
    }

    /// The logits of the last position of each of the `b` sequences, `[b, V]` on the host.
    pub fn last_logits(&self, logits: &F32<K>, b: usize, t: usize) -> Result<Vec<Vec<f32>>> {
        let v = self.vocab;
        if t == 1 {
            // A decode step: the last rows are all of them, one copy.
            let all = self.dev.download(logits.r())?;
            return Ok(all.chunks(v).map(|r| r.to_vec()).collect());
        }
        (0..b)
            .map(|bi| {
                let r = (bi * t + t - 1) * v;
                self.dev.download(logits.at(r..r + v))
            })
            .collect()
    }
}
