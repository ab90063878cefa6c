//! The OLMo-2 / FlexOlmo transformer (see docs/METHOD.md): post-norm blocks, full-width QK-norm,
//! GQA attention with rotate-half RoPE, untied embeddings, no biases, and either a dense SwiGLU
//! FFN or a mixture of SwiGLU experts with a softmax top-k router.

pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod encoder;
pub mod infer;
mod init;
pub mod net;
pub mod params;
pub mod runner;

pub use config::Config;
pub use params::{Param, ParamStore, ParamVars};

use crate::autograd::{Tape, Var};
use crate::ensure;
use crate::error::Result;
use crate::ops::{self, AttnShape, RopeTable, Routing};
use crate::tensor::Tensor;
use std::sync::Arc;

/// Standard deviation of the normal initialisation of every weight matrix.
pub const INIT_STD: f32 = 0.02;

#[derive(Clone, Copy, Debug)]
pub struct ExpertFfn {
    pub gate: usize,
    pub up: usize,
    pub down: usize,
}

/// One expert slot of an MoE layer: its FFN, its router row `[1, H]` and optional bias `[1]`.
#[derive(Clone, Copy, Debug)]
pub struct Expert {
    pub ffn: ExpertFfn,
    pub router: usize,
    pub bias: Option<usize>,
}

#[derive(Clone, Debug)]
pub enum Ffn {
    Dense(ExpertFfn),
    Moe(Vec<Expert>),
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    pub q_norm: usize,
    pub k_norm: usize,
    pub post_attn_norm: usize,
    pub post_ffn_norm: usize,
    pub ffn: Ffn,
}

#[derive(Clone)]
pub struct Model {
    pub cfg: Config,
    pub params: ParamStore,
    pub embed: usize,
    pub final_norm: usize,
    pub lm_head: usize,
    pub layers: Vec<Layer>,
    rope: Arc<RopeTable>,
}

/// Per-layer key/value cache for incremental decoding, `[B, capacity, kv_heads*hd]` per layer.
pub struct KvCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub len: usize,
    pub capacity: usize,
    pub batch: usize,
}

impl KvCache {
    pub fn new(cfg: &Config, batch: usize, capacity: usize) -> Self {
        let n = batch * capacity * cfg.kv_heads() * cfg.head_dim();
        KvCache {
            k: vec![vec![0f32; n]; cfg.num_hidden_layers],
            v: vec![vec![0f32; n]; cfg.num_hidden_layers],
            len: 0,
            capacity,
            batch,
        }
    }
}

pub struct ForwardOut {
    pub logits: Var,
    /// Final hidden states `[N, H]` after the last RMSNorm (what the LM head reads).
    pub hidden: Var,
    /// Router logits `[N, E]` per MoE layer (for the router z-loss and routing analysis).
    pub router_logits: Vec<Var>,
    /// The per-expert router bias `[E]` of each MoE layer, when the model has biases.
    pub router_bias: Vec<Option<Var>>,
    pub routings: Vec<Arc<Routing>>,
    /// Per MoE layer, when asked for ([`Model::forward_with`]): the layer's post-normed output
    /// and the post-normed output of expert 0 (the public FFN) alone, `[N, H]` each.
    pub public_anchor: Vec<(Var, Var)>,
    /// Per MoE layer, with the same request: the raw (not normed) outputs of expert 1 and of
    /// expert 0, `[N, H]` each (empty for a model with one expert).
    pub expert_pair: Vec<(Var, Var)>,
}

pub struct LossOut {
    pub loss: Var,
    pub ce: f32,
    pub tokens: usize,
}

/// Loss coefficients: LM z-loss on the output logits, router z-loss on router logits, and the
/// public anchor on anchored rows: per MoE layer, the relative squared error
/// ([`ops::rel_sq_err`]) between the layer's post-normed output and that of expert 0 (the public
/// FFN) alone, averaged over layers, layer `l` weighted by `public_anchor_layers[l]` (1 when
/// the list is empty). `router_own`, for 2-expert training: the router cross-entropy toward
/// expert 1 (the owner's) on the rows that are not anchored (the owner's own text), on the
/// router logits before the expert bias, averaged over layers. `router_public`, its mirror:
/// the router cross-entropy toward expert 0 (public) on the anchored (public) rows, so that
/// the two together train each layer's router as an own-vs-public classifier. `expert_loudness`:
/// on every row, per MoE layer, how much louder expert 1's FFN output is than expert 0's
/// ([`ops::excess_energy`]), averaged over layers.
#[derive(Clone, Debug)]
pub struct LossCoefs {
    pub z_loss: f32,
    pub router_z_loss: f32,
    pub public_anchor: f32,
    pub public_anchor_layers: Vec<f32>,
    pub router_own: f32,
    pub router_public: f32,
    pub expert_loudness: f32,
}

impl Default for LossCoefs {
    fn default() -> Self {
        LossCoefs {
            z_loss: 1e-5,
            router_z_loss: 1e-3,
            public_anchor: 0.0,
            public_anchor_layers: Vec::new(),
            router_own: 0.0,
            router_public: 0.0,
            expert_loudness: 0.0,
        }
    }
}

/// Per-token targets of expert training's router cross-entropy for `b` sequences of `t`
/// tokens: the own-text loss (`public` false) asks for expert 1 on the rows `anchored` does not
/// mark (the owner's text), the public-text loss for expert 0 on the marked (public) rows; the
/// other rows are `IGNORE`.
pub fn router_ce_targets(anchored: &[bool], b: usize, t: usize, public: bool) -> Vec<u32> {
    (0..b)
        .flat_map(|r| {
            let is_public = anchored.get(r).copied().unwrap_or(false);
            let x = match (public, is_public) {
                (false, false) => 1,
                (true, true) => 0,
                _ => ops::IGNORE,
            };
            std::iter::repeat_n(x, t)
        })
        .collect()
}

/// A KV cache of `batch` sequences and `capacity` positions can take `b` sequences up to
/// position `end` (the CPU's [`KvCache`] and the GPU's).
pub fn check_cache(batch: usize, capacity: usize, b: usize, end: usize) -> Result<()> {
    ensure!(batch == b, "kv cache holds {batch} sequences, input {b}");
    ensure!(end <= capacity, "kv cache capacity {capacity} exceeded");
    Ok(())
}

pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}.")
}

/// Internal name of expert `e`'s router row in layer `i` (stacked as `mlp.gate.weight` on save).
pub fn router_row_name(i: usize, e: usize) -> String {
    format!("model.layers.{i}.mlp.gate.weight[{e}]")
}

/// Internal name of expert `e`'s router bias in layer `i`.
pub fn router_bias_name(i: usize, e: usize) -> String {
    format!("model.layers.{i}.mlp.gate.bias[{e}]")
}

pub fn expert_prefix(i: usize, e: usize, moe: bool) -> String {
    if moe {
        format!("model.layers.{i}.mlp.experts.{e}.")
    } else {
        format!("model.layers.{i}.mlp.")
    }
}

impl Model {
    /// Bind a parameter store to the model structure by name. Every expected tensor must be present
    /// with the right shape (router biases are optional).
    pub fn from_params(cfg: Config, params: ParamStore) -> Result<Self> {
        cfg.validate()?;
        let (h, i_sz, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qw, kvw) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.kv_heads() * cfg.head_dim(),
        );
        let need = |name: &str, shape: &[usize]| -> Result<usize> {
            let Some(id) = params.id(name) else {
                crate::bail!("checkpoint lacks tensor {name}")
            };
            let got = params.value(id).shape();
            let ok = got == shape
                || (shape.len() == 1
                    && got.iter().product::<usize>() == shape[0]
                    && got.len() <= 2);
            ensure!(
                ok,
                "tensor {name} has shape {got:?}, config implies {shape:?}"
            );
            Ok(id)
        };
        let embed = need("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = layer_prefix(l);
            let expert_ffn = |e: usize| -> Result<ExpertFfn> {
                let ep = expert_prefix(l, e, cfg.is_moe());
                Ok(ExpertFfn {
                    gate: need(&format!("{ep}gate_proj.weight"), &[i_sz, h])?,
                    up: need(&format!("{ep}up_proj.weight"), &[i_sz, h])?,
                    down: need(&format!("{ep}down_proj.weight"), &[h, i_sz])?,
                })
            };
            let ffn = if cfg.is_moe() {
                let mut experts = Vec::new();
                for e in 0..cfg.experts() {
                    let bias = params.id(&router_bias_name(l, e));
                    if let Some(b) = bias {
                        ensure!(
                            params.value(b).numel() == 1,
                            "router bias of expert {e} in layer {l} must be a scalar"
                        );
                    }
                    experts.push(Expert {
                        ffn: expert_ffn(e)?,
                        router: need(&router_row_name(l, e), &[1, h])?,
                        bias,
                    });
                }
                Ffn::Moe(experts)
            } else {
                Ffn::Dense(expert_ffn(0)?)
            };
            layers.push(Layer {
                q: need(&format!("{p}self_attn.q_proj.weight"), &[qw, h])?,
                k: need(&format!("{p}self_attn.k_proj.weight"), &[kvw, h])?,
                v: need(&format!("{p}self_attn.v_proj.weight"), &[kvw, h])?,
                o: need(&format!("{p}self_attn.o_proj.weight"), &[h, qw])?,
                q_norm: need(&format!("{p}self_attn.q_norm.weight"), &[qw])?,
                k_norm: need(&format!("{p}self_attn.k_norm.weight"), &[kvw])?,
                post_attn_norm: need(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                post_ffn_norm: need(&format!("{p}post_feedforward_layernorm.weight"), &[h])?,
                ffn,
            });
        }
        let final_norm = need("model.norm.weight", &[h])?;
        let lm_head = need("lm_head.weight", &[v, h])?;
        let rope = Arc::new(RopeTable::new(
            cfg.head_dim(),
            cfg.rope_theta(),
            cfg.max_position_embeddings,
        ));
        Ok(Model {
            cfg,
            params,
            embed,
            final_norm,
            lm_head,
            layers,
            rope,
        })
    }

    /// Check token ids and sequence length against the config.
    pub fn check_input(&self, ids: &[u32], positions: usize) -> Result<()> {
        self.cfg.check_input(ids, positions)
    }

    /// Forward `ids` (`[B, T]` row-major). With a cache, the tokens continue the cached sequences
    /// (positions `cache.len..`), their keys/values are appended, and no gradient flows through
    /// attention.
    pub fn forward(
        &self,
        tape: &mut Tape,
        ids: &[u32],
        b: usize,
        t: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<ForwardOut> {
        self.forward_with(tape, ids, b, t, cache, false)
    }

    /// [`Model::forward`]; with `public_anchor`, also the per-layer outputs of expert 0 alone
    /// and the raw outputs of experts 1 and 0 ([`ForwardOut::expert_pair`]; every token must
    /// use expert 0, as in expert training with top-k 2 of 2).
    pub fn forward_with(
        &self,
        tape: &mut Tape,
        ids: &[u32],
        b: usize,
        t: usize,
        mut cache: Option<&mut KvCache>,
        public_anchor: bool,
    ) -> Result<ForwardOut> {
        ensure!(
            ids.len() == b * t,
            "forward: {} ids for batch {b} x seq {t}",
            ids.len()
        );
        let offset = cache.as_ref().map_or(0, |c| c.len);
        self.check_input(ids, offset + t)?;
        if let Some(c) = cache.as_ref() {
            check_cache(c.batch, c.capacity, b, offset + t)?;
        }
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps as f32;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let ps = &self.params;
        let mut pv = ParamVars::new(ps);
        let mut p = |tape: &mut Tape, id: usize| pv.get(tape, ps, id);
        let we = p(tape, self.embed);
        let mut x = ops::embedding(tape, we, ids);
        let mut router_logits = Vec::new();
        let mut router_bias = Vec::new();
        let mut routings = Vec::new();
        let mut anchors = Vec::new();
        let mut pairs = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            let (wq, wk, wv, wo) = (
                p(tape, layer.q),
                p(tape, layer.k),
                p(tape, layer.v),
                p(tape, layer.o),
            );
            let (qn, kn) = (p(tape, layer.q_norm), p(tape, layer.k_norm));
            let q = ops::linear(tape, x, wq);
            let k = ops::linear(tape, x, wk);
            let v = ops::linear(tape, x, wv);
            let q = ops::rmsnorm(tape, q, qn, eps);
            let k = ops::rmsnorm(tape, k, kn, eps);
            let q = ops::rope(tape, q, &self.rope, t, offset);
            let k = ops::rope(tape, k, &self.rope, t, offset);
            let a = match cache.as_deref_mut() {
                None => ops::attention(tape, q, k, v, AttnShape::causal(b, t, nh, nkv, hd)),
                Some(c) => {
                    let kvw = nkv * hd;
                    for (dst, src) in [(&mut c.k[li], tape.value(k)), (&mut c.v[li], tape.value(v))]
                    {
                        for bi in 0..b {
                            let d0 = (bi * c.capacity + offset) * kvw;
                            dst[d0..d0 + t * kvw]
                                .copy_from_slice(&src.data()[bi * t * kvw..(bi + 1) * t * kvw]);
                        }
                    }
                    let s = AttnShape::cached(b, t, offset, c.capacity, nh, nkv, hd);
                    let (out, _) =
                        ops::attention_forward(tape.value(q).data(), &c.k[li], &c.v[li], s);
                    tape.constant(Tensor::from_vec(out, &[b * t, nh * hd]))
                }
            };
            let o = ops::linear(tape, a, wo);
            let pan = p(tape, layer.post_attn_norm);
            let o = ops::rmsnorm(tape, o, pan, eps);
            x = ops::add(tape, x, o);
            let mut y0 = None;
            let m = match &layer.ffn {
                Ffn::Dense(f) => {
                    let (g, u, d) = (p(tape, f.gate), p(tape, f.up), p(tape, f.down));
                    swiglu_ffn(tape, x, g, u, d)
                }
                Ffn::Moe(experts) => {
                    let rows: Vec<Var> = experts.iter().map(|e| p(tape, e.router)).collect();
                    let wr = ops::cat_rows(tape, &rows);
                    let z = ops::linear(tape, x, wr);
                    let bias = if experts.iter().any(|e| e.bias.is_some()) {
                        let parts: Vec<Var> = experts
                            .iter()
                            .map(|e| match e.bias {
                                Some(bid) => p(tape, bid),
                                None => tape.constant(Tensor::zeros(&[1])),
                            })
                            .collect();
                        Some(ops::cat_rows(tape, &parts))
                    } else {
                        None
                    };
                    let (w, routing) = ops::route(tape, z, bias, cfg.top_k(), cfg.norm_topk_prob);
                    let routing = Arc::new(routing);
                    let mut outs = Vec::with_capacity(experts.len());
                    for (e, ex) in experts.iter().enumerate() {
                        let toks = &routing.expert_tokens[e];
                        if toks.is_empty() {
                            outs.push(None);
                            continue;
                        }
                        let xe = if toks.len() == b * t
                            && toks.iter().enumerate().all(|(i, &r)| i == r as usize)
                        {
                            x // every token: skip the gather
                        } else {
                            ops::gather_rows(tape, x, &Arc::new(toks.clone()))
                        };
                        let (g, u, d) = (
                            p(tape, ex.ffn.gate),
                            p(tape, ex.ffn.up),
                            p(tape, ex.ffn.down),
                        );
                        outs.push(Some(swiglu_ffn(tape, xe, g, u, d)));
                    }
                    if public_anchor {
                        ensure!(
                            routing.expert_tokens[0].len() == b * t,
                            "the public anchor needs every token to use expert 0 (top-k = number of experts)"
                        );
                        y0 = outs[0];
                        if let (Some(f0), Some(Some(f1))) = (outs[0], outs.get(1)) {
                            pairs.push((*f1, f0));
                        }
                    }
                    let y = ops::moe_combine(tape, &outs, w, &routing);
                    router_logits.push(z);
                    router_bias.push(bias);
                    routings.push(routing);
                    y
                }
            };
            let pfn = p(tape, layer.post_ffn_norm);
            let m = ops::rmsnorm(tape, m, pfn, eps);
            if let Some(y0) = y0 {
                anchors.push((m, ops::rmsnorm(tape, y0, pfn, eps)));
            }
            x = ops::add(tape, x, m);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let fnorm = p(tape, self.final_norm);
        let x = ops::rmsnorm(tape, x, fnorm, eps);
        let wl = p(tape, self.lm_head);
        let logits = ops::linear(tape, x, wl);
        Ok(ForwardOut {
            logits,
            hidden: x,
            router_logits,
            router_bias,
            routings,
            public_anchor: anchors,
            expert_pair: pairs,
        })
    }

    /// Training loss: mean next-token cross-entropy + LM z-loss + router z-loss (mean over MoE
    /// layers of `mean(logsumexp(z)^2)`).
    pub fn loss(
        &self,
        tape: &mut Tape,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        coefs: &LossCoefs,
    ) -> Result<LossOut> {
        self.loss_anchored(tape, inputs, targets, b, t, coefs, &[])
    }

    /// [`Model::loss`] plus, for the rows (sequences) marked in `anchored` (`[b]`, or empty for
    /// none), the public anchor ([`LossCoefs::public_anchor`]): on those rows the MoE layers
    /// should act as the public FFN alone would.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_anchored(
        &self,
        tape: &mut Tape,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        coefs: &LossCoefs,
        anchored: &[bool],
    ) -> Result<LossOut> {
        ensure!(
            anchored.is_empty() || anchored.len() == b,
            "{} anchored-row flags for a batch of {b}",
            anchored.len()
        );
        if let Some(&bad) = targets
            .iter()
            .find(|&&x| x != ops::IGNORE && x as usize >= self.cfg.vocab_size)
        {
            crate::bail!(
                "target id {bad} is out of range for vocab_size {}",
                self.cfg.vocab_size
            );
        }
        let anchor = coefs.public_anchor > 0.0 && anchored.iter().any(|&a| a) && self.cfg.is_moe();
        let loud = coefs.expert_loudness > 0.0 && self.cfg.is_moe();
        if loud {
            ensure!(
                self.cfg.experts() == 2,
                "the expert loudness loss is for 2-expert (expert) training, not {} experts",
                self.cfg.experts()
            );
        }
        let out = self.forward_with(tape, inputs, b, t, None, anchor || loud)?;
        let ce = ops::cross_entropy(tape, out.logits, targets, coefs.z_loss);
        let mut loss = ce.loss;
        if loud {
            let n = out.expert_pair.len() as f32;
            for &(f1, f0) in &out.expert_pair {
                let e = ops::excess_energy(tape, f1, f0);
                loss = ops::add_scaled(tape, loss, e, coefs.expert_loudness / n);
            }
        }
        if coefs.router_z_loss > 0.0 && !out.router_logits.is_empty() {
            let n = out.router_logits.len() as f32;
            for &z in &out.router_logits {
                let zl = ops::logsumexp_sq_mean(tape, z);
                loss = ops::add_scaled(tape, loss, zl, coefs.router_z_loss / n);
            }
        }
        for (w, public) in [(coefs.router_own, false), (coefs.router_public, true)] {
            if w <= 0.0 || out.router_logits.is_empty() {
                continue;
            }
            ensure!(
                self.cfg.experts() == 2,
                "the router's own-text and public-text losses are for 2-expert (expert) \
                 training, not {} experts",
                self.cfg.experts()
            );
            let target = router_ce_targets(anchored, b, t, public);
            if target.iter().any(|&x| x != ops::IGNORE) {
                let n = out.router_logits.len() as f32;
                for &z in &out.router_logits {
                    let r = ops::cross_entropy(tape, z, &target, 0.0);
                    loss = ops::add_scaled(tape, loss, r.loss, w / n);
                }
            }
        }
        if anchor {
            let rows: Arc<Vec<bool>> = Arc::new(
                anchored
                    .iter()
                    .flat_map(|&a| std::iter::repeat_n(a, t))
                    .collect(),
            );
            let n = out.public_anchor.len();
            ensure!(
                coefs.public_anchor_layers.is_empty() || coefs.public_anchor_layers.len() == n,
                "{} public-anchor layer weights for {n} MoE layers",
                coefs.public_anchor_layers.len()
            );
            for (l, &(m, m0)) in out.public_anchor.iter().enumerate() {
                let w = coefs.public_anchor_layers.get(l).copied().unwrap_or(1.0);
                let e = ops::rel_sq_err(tape, m, m0, &rows);
                loss = ops::add_scaled(tape, loss, e, coefs.public_anchor * w / n as f32);
            }
        }
        Ok(LossOut {
            loss,
            ce: ce.ce,
            tokens: ce.n_valid,
        })
    }

    /// Logits `[B*T, V]` of a plain forward without gradients.
    pub fn logits(&self, ids: &[u32], b: usize, t: usize) -> Result<Tensor> {
        let mut tape = Tape::inference();
        let out = self.forward(&mut tape, ids, b, t, None)?;
        Ok(tape.value(out.logits).clone())
    }

    /// Keep only the listed experts (indices into the current expert list), in the given order:
    /// their FFNs, router rows and biases. The result equals a model built without the others.
    pub fn select_experts(&self, keep: &[usize]) -> Result<Model> {
        ensure!(
            self.cfg.is_moe(),
            "expert selection needs a mixture-of-experts model"
        );
        ensure!(!keep.is_empty(), "at least one expert must remain");
        let e = self.cfg.experts();
        for &k in keep {
            ensure!(k < e, "expert index {k} out of range ({e} experts)");
        }
        let mut cfg = self.cfg.clone();
        cfg.num_experts = Some(keep.len());
        cfg.num_experts_per_tok = Some(self.cfg.top_k().min(keep.len()));
        let mut ps = ParamStore::default();
        for p in &self.params.params {
            match parse_expert_param(&p.name) {
                Some((l, ex, suffix)) => {
                    if let Some(new) = keep.iter().position(|&k| k == ex) {
                        let name = match suffix {
                            ExpertPart::Ffn(rest) => {
                                format!("{}{rest}", expert_prefix(l, new, true))
                            }
                            ExpertPart::Router => router_row_name(l, new),
                            ExpertPart::Bias => router_bias_name(l, new),
                        };
                        ps.add(name, p.value.clone());
                    }
                }
                None => {
                    ps.add(p.name.clone(), p.value.clone());
                }
            }
        }
        // Keep ids in a canonical order so that any two equal models have equal stores.
        Model::from_params(cfg, ps)
    }

    pub fn rope(&self) -> &Arc<RopeTable> {
        &self.rope
    }
}

fn swiglu_ffn(tape: &mut Tape, x: Var, g: Var, u: Var, d: Var) -> Var {
    let gv = ops::linear(tape, x, g);
    let uv = ops::linear(tape, x, u);
    let a = ops::swiglu(tape, gv, uv);
    ops::linear(tape, a, d)
}

pub enum ExpertPart<'a> {
    Ffn(&'a str),
    Router,
    Bias,
}

/// Split an expert-owned parameter name into (layer, expert, part).
pub fn parse_expert_param(name: &str) -> Option<(usize, usize, ExpertPart<'_>)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    if let Some(r) = rest.strip_prefix("mlp.experts.") {
        let (e, part) = r.split_once('.')?;
        return Some((l, e.parse().ok()?, ExpertPart::Ffn(part)));
    }
    let idx = |s: &str| s.strip_suffix(']').and_then(|x| x.parse().ok());
    if let Some(r) = rest.strip_prefix("mlp.gate.weight[") {
        return Some((l, idx(r)?, ExpertPart::Router));
    }
    if let Some(r) = rest.strip_prefix("mlp.gate.bias[") {
        return Some((l, idx(r)?, ExpertPart::Bias));
    }
    None
}

impl Model {
    /// Upcycle a dense OLMo-2 model into a FlexOlmo MoE with `n_experts` experts: every expert is
    /// a copy of the dense FFN of its layer (sharing storage until written), every router row is
    /// zero, there are no router biases, and the config becomes `flex_olmo` /
    /// `FlexOlmoForCausalLM` with `num_experts = num_experts_per_tok = n_experts`. With zero router
    /// rows every token gives each expert weight `1/n`, so the result computes the dense model.
    pub fn upcycle(&self, n_experts: usize) -> Result<Model> {
        ensure!(
            !self.cfg.is_moe(),
            "upcycling needs a dense olmo2 model, not a {} model with {} experts",
            self.cfg.model_type,
            self.cfg.experts()
        );
        ensure!(n_experts > 0, "upcycling needs at least one expert");
        let cfg = self.cfg.upcycled(n_experts);
        let mut ps = ParamStore::default();
        for p in &self.params.params {
            let ffn_part = p.name.strip_prefix("model.layers.").and_then(|r| {
                let (l, rest) = r.split_once('.')?;
                Some((l.parse::<usize>().ok()?, rest.strip_prefix("mlp.")?))
            });
            match ffn_part {
                Some((l, part)) => {
                    for e in 0..n_experts {
                        ps.add(
                            format!("{}{part}", expert_prefix(l, e, true)),
                            p.value.clone(),
                        );
                    }
                }
                None => {
                    ps.add(p.name.clone(), p.value.clone());
                }
            }
        }
        for l in 0..cfg.num_hidden_layers {
            for e in 0..n_experts {
                ps.add(router_row_name(l, e), Tensor::zeros(&[1, cfg.hidden_size]));
            }
        }
        Model::from_params(cfg, ps)
    }
}

/// Token-weighted mean cross-entropy over validation `batches` of `seq`-token rows, `ce` giving
/// one batch's (mean cross-entropy, scored tokens) for its inputs, targets and row count; None
/// when there are no batches. The CPU and GPU validation share it.
pub fn mean_ce(
    batches: &[(Vec<u32>, Vec<u32>)],
    seq: usize,
    mut ce: impl FnMut(&[u32], &[u32], usize) -> Result<(f32, usize)>,
) -> Result<Option<f32>> {
    if batches.is_empty() {
        return Ok(None);
    }
    let (mut sum, mut n) = (0f64, 0usize);
    for (inp, tgt) in batches {
        let b = inp.len() / seq;
        crate::ensure!(
            b * seq == inp.len(),
            "validation batch is not a multiple of seq"
        );
        let (c, tokens) = ce(inp, tgt, b)?;
        sum += c as f64 * tokens as f64;
        n += tokens;
    }
    Ok(Some((sum / n.max(1) as f64) as f32))
}
