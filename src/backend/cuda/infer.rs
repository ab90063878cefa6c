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

use super::{Buf, Device, RopeTableGpu};
use crate::ensure;
use crate::error::Result;
use crate::model::{Ffn, Model};
use crate::ops::AttnShape;
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
struct GpuFfn {
    e: usize,
    gate: Buf<bf16>,
    up: Buf<bf16>,
    down: Buf<bf16>,
    /// MoE only: router rows `[E, H]` (f32) and the per-expert bias `[E]` when the model has one.
    router: Option<(Buf<f32>, Option<Buf<f32>>)>,
}

struct GpuLayer {
    q: Buf<bf16>,
    k: Buf<bf16>,
    v: Buf<bf16>,
    o: Buf<bf16>,
    q_norm: Buf<bf16>,
    k_norm: Buf<bf16>,
    post_attn_norm: Buf<bf16>,
    post_ffn_norm: Buf<bf16>,
    ffn: GpuFfn,
}

/// The K/V cache of every layer on the device, `[B, capacity, kv_heads * hd]` bf16 per layer.
pub struct GpuKvCache {
    k: Vec<Buf<bf16>>,
    v: Vec<Buf<bf16>>,
    pub len: usize,
    pub capacity: usize,
    pub batch: usize,
}

/// A model's weights on one GPU, ready for [`GpuModel::forward`].
pub struct GpuModel<'d> {
    dev: &'d Device,
    h: usize,
    inter: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    vocab: usize,
    eps: f32,
    top_k: usize,
    renorm: bool,
    max_pos: usize,
    embed: Buf<bf16>,
    final_norm: Buf<bf16>,
    lm_head: Buf<bf16>,
    rope: RopeTableGpu,
    layers: Vec<GpuLayer>,
}

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
            layers,
        })
    }

    pub fn device(&self) -> &'d Device {
        self.dev
    }

    pub fn vocab(&self) -> usize {
        self.vocab
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

    fn linear(&self, x: &Buf<bf16>, w: &Buf<bf16>, n: usize, out: usize) -> Result<Buf<bf16>> {
        let mut y = self.dev.alloc::<bf16>(n * out)?;
        self.dev
            .gemm(n, out, x.len() / n.max(1), x, false, w, true, &mut y, false)?;
        Ok(y)
    }

    fn norm(&self, x: &Buf<bf16>, w: &Buf<bf16>, n: usize) -> Result<Buf<bf16>> {
        let d = w.len();
        let mut y = self.dev.alloc::<bf16>(n * d)?;
        let mut rstd = self.dev.alloc::<f32>(n)?;
        self.dev
            .rmsnorm_fwd(x, w, &mut y, &mut rstd, n, d, self.eps)?;
        Ok(y)
    }

    /// `x + f32(y)`.
    fn residual(&self, x: &Buf<f32>, y: &Buf<bf16>) -> Result<Buf<f32>> {
        let mut yf = self.dev.alloc::<f32>(y.len())?;
        self.dev.cast_bf16_to_f32(y, &mut yf)?;
        let mut out = self.dev.alloc::<f32>(x.len())?;
        self.dev.add_scaled(x, &yf, &mut out, 1.0)?;
        Ok(out)
    }

    fn bf16_of(&self, x: &Buf<f32>) -> Result<Buf<bf16>> {
        let mut y = self.dev.alloc::<bf16>(x.len())?;
        self.dev.cast_f32_to_bf16(x, &mut y)?;
        Ok(y)
    }

    /// The FFN output `[n, H]` (bf16, before the post-FFN norm) for the residual stream `x`.
    fn ffn(&self, f: &GpuFfn, x: &Buf<f32>, n: usize) -> Result<Buf<bf16>> {
        let dev = self.dev;
        let (h, i) = (self.h, self.inter);
        let xb = self.bf16_of(x)?;
        let Some((router, bias)) = &f.router else {
            let offsets = dev.upload(&[0u32, n as u32])?;
            let mut act = dev.alloc::<bf16>(n * i)?;
            dev.grouped_gateup_fwd(&xb, &offsets, &f.gate, &f.up, 1, h, i, &mut act, None)?;
            let mut y = dev.alloc::<bf16>(n * h)?;
            dev.grouped_nt(&act, &offsets, &f.down, 1, i, h, &mut y)?;
            return Ok(y);
        };
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
        let mut act = dev.alloc::<bf16>(n * k * i)?;
        dev.grouped_gateup_fwd(&xp, &perm.offsets, &f.gate, &f.up, e, h, i, &mut act, None)?;
        let mut yp = dev.alloc::<bf16>(n * k * h)?;
        dev.grouped_nt(&act, &perm.offsets, &f.down, e, i, h, &mut yp)?;
        let mut y = dev.alloc::<bf16>(n * h)?;
        dev.moe_combine(&yp, &weights, &perm, h, &mut y)?;
        Ok(y)
    }

    /// Logits `[b*t, V]` (f32, on the device) of `ids` (`b` sequences of `t` tokens). With a
    /// cache, the tokens continue the cached sequences at position `cache.len`, their K/V are
    /// appended, and `cache.len` advances by `t`.
    pub fn forward(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        mut cache: Option<&mut GpuKvCache>,
    ) -> Result<Buf<f32>> {
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
            ensure!(
                c.batch == b,
                "kv cache holds {} sequences, input {b}",
                c.batch
            );
            ensure!(
                offset + t <= c.capacity,
                "kv cache capacity {} exceeded",
                c.capacity
            );
        }
        let (h, nh, nkv, hd) = (self.h, self.nh, self.nkv, self.hd);
        let n = b * t;
        let mut e0 = dev.alloc::<bf16>(n * h)?;
        dev.embedding_fwd(&self.embed, self.vocab, h, ids, &mut e0)?;
        let mut x = dev.alloc::<f32>(n * h)?;
        dev.cast_bf16_to_f32(&e0, &mut x)?;
        for (li, l) in self.layers.iter().enumerate() {
            let xb = self.bf16_of(&x)?;
            let q = self.norm(&self.linear(&xb, &l.q, n, nh * hd)?, &l.q_norm, n)?;
            let k = self.norm(&self.linear(&xb, &l.k, n, nkv * hd)?, &l.k_norm, n)?;
            let v = self.linear(&xb, &l.v, n, nkv * hd)?;
            let mut qr = dev.alloc::<bf16>(q.len())?;
            dev.rope(&q, &mut qr, &self.rope, n, nh * hd, t, offset, false)?;
            let mut kr = dev.alloc::<bf16>(k.len())?;
            dev.rope(&k, &mut kr, &self.rope, n, nkv * hd, t, offset, false)?;
            let mut a = dev.alloc::<bf16>(n * nh * hd)?;
            let mut lse = dev.alloc::<f32>(b * nh * t)?;
            match cache.as_deref_mut() {
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
                    let s = AttnShape {
                        b,
                        tq: t,
                        tk: offset + t,
                        tk_stride: c.capacity,
                        nh,
                        nkv,
                        hd,
                    };
                    if t == 1 {
                        dev.flash_attention_decode(&qr, &c.k[li], &c.v[li], s, &mut a, &mut lse)?;
                    } else {
                        dev.flash_attention_fwd(&qr, &c.k[li], &c.v[li], s, &mut a, &mut lse)?;
                    }
                }
            }
            let o = self.norm(&self.linear(&a, &l.o, n, h)?, &l.post_attn_norm, n)?;
            x = self.residual(&x, &o)?;
            let y = self.ffn(&l.ffn, &x, n)?;
            let m = self.norm(&y, &l.post_ffn_norm, n)?;
            x = self.residual(&x, &m)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let xn = self.norm(&self.bf16_of(&x)?, &self.final_norm, n)?;
        let mut logits = dev.alloc::<f32>(n * self.vocab)?;
        dev.gemm(
            n,
            self.vocab,
            h,
            &xn,
            false,
            &self.lm_head,
            true,
            &mut logits,
            false,
        )?;
        Ok(logits)
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
        (0..b)
            .map(|bi| {
                let r = (bi * t + t - 1) * v;
                self.dev.download(&logits.view(r..r + v))
            })
            .collect()
    }
}
