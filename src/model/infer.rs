//! The CPU's cached forward for generation and serving: tape-free, one KV cache per sequence,
//! and batch-invariant, so that a sequence's logits are bit-identical whatever else shares the
//! step.
//!
//! A step takes any number of sequences, each with its own new tokens (a whole prompt, or one
//! token), its own cache (its own length) and its own set of allowed experts. Every op is a
//! function of one row alone:
//! - linear layers are [`rows_abt`] (one [`crate::backend::cpu::simd::dot`] per element, never a
//!   blocked GEMM whose rounding depends on how many rows it was given);
//! - norms, RoPE and SwiGLU run per row;
//! - attention runs per sequence, on that sequence's cache only;
//! - the router's softmax and top-k run over the row's allowed experts only, in expert order, so
//!   a row whose mask drops experts computes exactly what a model without those experts computes
//!   (the opt-out guarantee, per request);
//! - only each sequence's last position goes through the final norm and the LM head.
//!
//! `generate` uses this path for a batch of one, `flexrun serve` for its running batch: their
//! tokens agree bit for bit (tests/serve.rs).

use super::{Config, Ffn, Model};
use crate::backend::cpu::{rows_abt, simd, sum_sq};
use crate::backend::shapes::AttnShape;
use crate::ensure;
use crate::error::Result;
use crate::ops::attention_forward;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Rows per rayon task of the per-row kernels (norms, SwiGLU).
const ROWS: usize = 8;

/// One sequence's keys and values, `[capacity, kv_heads * hd]` per layer.
pub struct SeqCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
}

impl SeqCache {
    /// A cache for up to `capacity` positions (checked against the model and the memory).
    pub fn new(cfg: &Config, capacity: usize) -> Result<Self> {
        ensure!(
            capacity <= cfg.max_position_embeddings,
            "kv cache of {capacity} positions exceeds max_position_embeddings {}",
            cfg.max_position_embeddings
        );
        cfg.check_cache_memory(1, capacity)?;
        let n = capacity * cfg.kv_heads() * cfg.head_dim();
        Ok(SeqCache {
            k: vec![vec![0f32; n]; cfg.num_hidden_layers],
            v: vec![vec![0f32; n]; cfg.num_hidden_layers],
            len: 0,
            capacity,
        })
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held (keys and values of every layer).
    pub fn bytes(&self) -> usize {
        4 * (self.k.iter().map(Vec::len).sum::<usize>()
            + self.v.iter().map(Vec::len).sum::<usize>())
    }
}

/// One sequence's share of a [`Model::step_seqs`] step.
pub struct SeqStep<'a> {
    /// The new tokens (continuing what the cache holds).
    pub ids: &'a [u32],
    pub cache: &'a mut SeqCache,
    /// `allowed[e]`: may this sequence route to expert `e` (`None`: every expert).
    pub allowed: Option<&'a [bool]>,
}

/// What a step returns.
pub struct StepOut {
    /// Each sequence's logits at its last new position.
    pub logits: Vec<Vec<f32>>,
    /// Per expert, the (token, layer) pairs routed to it in this step (empty for a dense model).
    pub routed: Vec<u64>,
    /// Per MoE layer, how many distinct experts the step used (whose weights it had to read).
    pub layer_hits: Vec<usize>,
}

impl Model {
    /// One cached forward of several sequences (see the module docs). Everything is checked
    /// before any work: token ids, positions, cache room, masks.
    pub fn step_seqs(&self, seqs: &mut [SeqStep<'_>]) -> Result<StepOut> {
        let cfg = &self.cfg;
        let n_exp = if cfg.is_moe() { cfg.experts() } else { 0 };
        for s in seqs.iter() {
            ensure!(
                !s.ids.is_empty(),
                "a sequence in the step has no new tokens"
            );
            let end = s.cache.len + s.ids.len();
            self.check_input(s.ids, end)?;
            ensure!(
                end <= s.cache.capacity,
                "the kv cache holds {} positions, the sequence needs {end}",
                s.cache.capacity
            );
            ensure!(
                s.cache.k.len() == cfg.num_hidden_layers
                    && s.cache.k.first().is_none_or(
                        |k| k.len() == s.cache.capacity * cfg.kv_heads() * cfg.head_dim()
                    ),
                "a kv cache is used with a model of another shape"
            );
            if let Some(a) = s.allowed {
                ensure!(
                    n_exp > 0 && a.len() == n_exp && a.iter().any(|&x| x),
                    "an expert mask must name at least one of the model's {n_exp} experts"
                );
            }
        }
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let kvw = nkv * hd;
        // Row ranges of each sequence in the stacked batch.
        let mut starts = Vec::with_capacity(seqs.len() + 1);
        starts.push(0usize);
        for s in seqs.iter() {
            starts.push(starts.last().unwrap() + s.ids.len());
        }
        let n = *starts.last().unwrap();
        let pv = |id: usize| self.params.value(id);
        let embed = pv(self.embed);
        let mut x = vec![0f32; n * h];
        for (r, &id) in seqs.iter().flat_map(|s| s.ids).enumerate() {
            embed.rows_to_f32(id as usize, 1, &mut x[r * h..(r + 1) * h]);
        }
        let mut routed = vec![0u64; n_exp];
        let mut layer_hits = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            let mut q = rows_abt(&x, n, pv(layer.q));
            let mut k = rows_abt(&x, n, pv(layer.k));
            let v = rows_abt(&x, n, pv(layer.v));
            norm_rows(&mut q, pv(layer.q_norm).data(), eps);
            norm_rows(&mut k, pv(layer.k_norm).data(), eps);
            for (si, s) in seqs.iter_mut().enumerate() {
                let off = s.cache.len;
                for (j, r) in (starts[si]..starts[si + 1]).enumerate() {
                    self.rope
                        .apply_row(&mut q[r * nh * hd..(r + 1) * nh * hd], off + j);
                    self.rope.apply_row(&mut k[r * kvw..(r + 1) * kvw], off + j);
                }
                let (a, b) = (starts[si] * kvw, starts[si + 1] * kvw);
                s.cache.k[li][off * kvw..off * kvw + (b - a)].copy_from_slice(&k[a..b]);
                s.cache.v[li][off * kvw..off * kvw + (b - a)].copy_from_slice(&v[a..b]);
            }
            let a = attend(&q, seqs, &starts, li, (nh, nkv, hd));
            let mut o = rows_abt(&a, n, pv(layer.o));
            norm_rows(&mut o, pv(layer.post_attn_norm).data(), eps);
            add_into(&mut x, &o);
            let mut m = match &layer.ffn {
                Ffn::Dense(f) => swiglu_ffn(&x, n, pv(f.gate), pv(f.up), pv(f.down)),
                Ffn::Moe(experts) => {
                    let router = {
                        let mut w = vec![0f32; experts.len() * h];
                        for (e, ex) in experts.iter().enumerate() {
                            pv(ex.router).rows_to_f32(0, 1, &mut w[e * h..(e + 1) * h]);
                        }
                        Tensor::from_vec(w, &[experts.len(), h])
                    };
                    let z = rows_abt(&x, n, &router);
                    let bias: Vec<f32> = experts
                        .iter()
                        .map(|e| e.bias.map_or(0.0, |b| pv(b).data()[0].min(0.0)))
                        .collect();
                    let mut row_mask = Vec::with_capacity(n);
                    for (si, s) in seqs.iter().enumerate() {
                        row_mask
                            .extend(std::iter::repeat_n(s.allowed, starts[si + 1] - starts[si]));
                    }
                    let routes: Vec<Vec<(usize, f32)>> = (0..n)
                        .map(|r| {
                            route_row(
                                &z[r * n_exp..(r + 1) * n_exp],
                                &bias,
                                row_mask[r],
                                cfg.top_k(),
                                cfg.norm_topk_prob,
                            )
                        })
                        .collect();
                    let mut tokens: Vec<Vec<usize>> = vec![Vec::new(); n_exp];
                    for (r, route) in routes.iter().enumerate() {
                        for &(e, _) in route {
                            tokens[e].push(r);
                        }
                    }
                    let outs: Vec<Option<Vec<f32>>> = experts
                        .iter()
                        .zip(&tokens)
                        .map(|(ex, rows)| {
                            (!rows.is_empty()).then(|| {
                                let xe: Vec<f32> = rows
                                    .iter()
                                    .flat_map(|&r| &x[r * h..(r + 1) * h])
                                    .copied()
                                    .collect();
                                let f = ex.ffn;
                                swiglu_ffn(&xe, rows.len(), pv(f.gate), pv(f.up), pv(f.down))
                            })
                        })
                        .collect();
                    let mut pos = vec![0usize; n_exp];
                    let mut y = vec![0f32; n * h];
                    for (r, route) in routes.iter().enumerate() {
                        let yr = &mut y[r * h..(r + 1) * h];
                        for (s, &(e, w)) in route.iter().enumerate() {
                            let o = outs[e].as_ref().expect("a routed expert has an output");
                            let src = &o[pos[e] * h..(pos[e] + 1) * h];
                            pos[e] += 1;
                            if s == 0 {
                                yr.iter_mut().zip(src).for_each(|(a, b)| *a = w * b);
                            } else {
                                yr.iter_mut().zip(src).for_each(|(a, b)| *a += w * b);
                            }
                        }
                    }
                    for (e, t) in tokens.iter().enumerate() {
                        routed[e] += t.len() as u64;
                    }
                    layer_hits.push(tokens.iter().filter(|t| !t.is_empty()).count());
                    y
                }
            };
            norm_rows(&mut m, pv(layer.post_ffn_norm).data(), eps);
            add_into(&mut x, &m);
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.ids.len();
        }
        let mut last: Vec<f32> = starts[1..]
            .iter()
            .flat_map(|&end| &x[(end - 1) * h..end * h])
            .copied()
            .collect();
        norm_rows(&mut last, pv(self.final_norm).data(), eps);
        let logits = rows_abt(&last, seqs.len(), pv(self.lm_head));
        let v = cfg.vocab_size;
        Ok(StepOut {
            logits: logits.chunks_exact(v).map(<[f32]>::to_vec).collect(),
            routed,
            layer_hits,
        })
    }
}

/// The experts of one row and their weights, in slot order (descending probability, ties to the
/// lower expert): softmax of `z + min(bias, 0)` over the allowed experts only, top-k of them
/// (k clamped to how many are allowed), renormalised when `renorm`. Over a mask that allows
/// every expert this is the tape's routing (`ops::router`); over a mask it is exactly the
/// routing of the model built without the masked experts.
pub fn route_row(
    z: &[f32],
    bias: &[f32],
    allowed: Option<&[bool]>,
    top_k: usize,
    renorm: bool,
) -> Vec<(usize, f32)> {
    let experts: Vec<usize> = (0..z.len())
        .filter(|&e| allowed.is_none_or(|a| a[e]))
        .collect();
    let mut p: Vec<f32> = experts.iter().map(|&e| z[e] + bias[e]).collect();
    crate::ops::softmax_in_place(&mut p);
    let mut order: Vec<usize> = (0..experts.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let k = top_k.clamp(1, experts.len());
    let mut out: Vec<(usize, f32)> = order[..k].iter().map(|&i| (experts[i], p[i])).collect();
    if renorm {
        let sum: f32 = out.iter().map(|x| x.1).sum();
        out.iter_mut().for_each(|x| x.1 /= sum);
    }
    out
}

/// Attention of every sequence's new rows against its own cache (keys and values of this layer
/// already written): a sequence with several new tokens (a prompt) through the tiled CPU
/// attention, one with a single new token through [`attend_one`]; which of the two depends only
/// on the sequence's own token count, so a sequence's result never depends on the batch.
fn attend(
    q: &[f32],
    seqs: &[SeqStep<'_>],
    starts: &[usize],
    li: usize,
    (nh, nkv, hd): (usize, usize, usize),
) -> Vec<f32> {
    let qw = nh * hd;
    let n = *starts.last().unwrap_or(&0);
    let mut a = vec![0f32; n * qw];
    for (si, s) in seqs.iter().enumerate() {
        let t = s.ids.len();
        if t > 1 {
            let shape = AttnShape::cached(1, t, s.cache.len, s.cache.capacity, nh, nkv, hd);
            let (r0, r1) = (starts[si] * qw, starts[si + 1] * qw);
            let out = attention_forward(&q[r0..r1], &s.cache.k[li], &s.cache.v[li], shape).0;
            a[r0..r1].copy_from_slice(&out);
        }
    }
    let single: Vec<(usize, &SeqStep<'_>)> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.ids.len() == 1)
        .map(|(si, s)| (starts[si], s))
        .collect();
    let work = single.iter().map(|(_, s)| s.cache.len + 1).sum::<usize>() * qw;
    let one = |&(row, s): &(usize, &SeqStep<'_>)| -> Vec<f32> {
        attend_one(&q[row * qw..(row + 1) * qw], s, li, (nh, nkv, hd))
    };
    let outs: Vec<Vec<f32>> = if work < 1 << 15 {
        single.iter().map(one).collect()
    } else {
        single.par_iter().with_min_len(2).map(one).collect()
    };
    for ((row, _), o) in single.iter().zip(outs) {
        a[row * qw..(row + 1) * qw].copy_from_slice(&o);
    }
    a
}

/// One new token's attention over its sequence's cache (positions `0..=len`), head by head:
/// scores by [`dot8`], a softmax in f32, values summed in position order.
fn attend_one(
    q: &[f32],
    s: &SeqStep<'_>,
    li: usize,
    (nh, nkv, hd): (usize, usize, usize),
) -> Vec<f32> {
    let len = s.cache.len + 1;
    let kvw = nkv * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let (k, v) = (&s.cache.k[li], &s.cache.v[li]);
    let mut out = vec![0f32; nh * hd];
    let mut p = vec![0f32; len];
    for h in 0..nh {
        let kh = h / (nh / nkv);
        let qh = &q[h * hd..(h + 1) * hd];
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = dot8(qh, &k[j * kvw + kh * hd..j * kvw + (kh + 1) * hd]) * scale;
        }
        let m = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in p.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        let o = &mut out[h * hd..(h + 1) * hd];
        for (j, &pj) in p.iter().enumerate() {
            let w = pj * inv;
            let vj = &v[j * kvw + kh * hd..j * kvw + (kh + 1) * hd];
            o.iter_mut().zip(vj).for_each(|(a, b)| *a += w * b);
        }
    }
    out
}

/// A short dot product (a head's width) in 8 lanes and a fixed tree: no dispatch, vectorised in
/// place.
#[inline]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// RMSNorm of each row of `x` in place (`w * (x * r)`, `r = 1 / sqrt(mean(x^2) + eps)`).
fn norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    let norm = |row: &mut [f32]| {
        let r = 1.0 / (sum_sq(row) / d as f32 + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(x, w)| *x = w * (*x * r));
    };
    if x.len() < 1 << 14 {
        x.chunks_mut(d.max(1)).for_each(norm);
    } else {
        x.par_chunks_mut(d.max(1)).with_min_len(ROWS).for_each(norm);
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// `down(silu(x gate^T) * (x up^T))` of `n` rows, SwiGLU per row.
fn swiglu_ffn(x: &[f32], n: usize, gate: &Tensor, up: &Tensor, down: &Tensor) -> Vec<f32> {
    let g = rows_abt(x, n, gate);
    let u = rows_abt(x, n, up);
    let i = gate.rows();
    let mut a = vec![0f32; n * i];
    let act = |(a, (g, u)): (&mut [f32], (&[f32], &[f32]))| simd::swiglu_fwd(a, g, u);
    if n * i < 1 << 14 {
        a.chunks_mut(i.max(1))
            .zip(g.chunks(i.max(1)).zip(u.chunks(i.max(1))))
            .for_each(act);
    } else {
        a.par_chunks_mut(i.max(1))
            .zip(g.par_chunks(i.max(1)).zip(u.par_chunks(i.max(1))))
            .with_min_len(ROWS)
            .for_each(act);
    }
    rows_abt(&a, n, down)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    fn moe(top_k: usize) -> Model {
        let mut cfg = Config::flex_olmo(61, 32, 48, 2, 4, 2, 4, top_k);
        cfg.norm_topk_prob = top_k == 2;
        Model::new_random(&cfg, 11).unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Decode a sequence alone, then inside a batch of other sequences of other lengths and
    /// masks: its logits are bit-identical at every step; with a mask they are bit-identical to
    /// the model built without the masked experts; and they are close to the tape's forward.
    #[test]
    fn a_sequence_is_bit_identical_alone_in_a_batch_and_without_its_masked_experts() {
        for top_k in [1, 2, 4] {
            let m = moe(top_k);
            let prompt: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 61).collect();
            let mask = [true, false, true, true];
            let sel = m.select_experts(&[0, 2, 3]).unwrap();
            let run = |model: &Model, allowed: Option<&[bool]>, others: bool| -> Vec<Vec<u32>> {
                let mut c = SeqCache::new(&model.cfg, 16).unwrap();
                let mut o1 = SeqCache::new(&m.cfg, 16).unwrap();
                let mut o2 = SeqCache::new(&m.cfg, 16).unwrap();
                let mut out = Vec::new();
                let mut ids = prompt.clone();
                for step in 0..4 {
                    let other1: Vec<u32> = vec![5 + step as u32; if step == 0 { 3 } else { 1 }];
                    let other2: Vec<u32> =
                        vec![(11 * step as u32 + 1) % 61; if step == 1 { 6 } else { 1 }];
                    let mut seqs = vec![SeqStep {
                        ids: &ids,
                        cache: &mut c,
                        allowed,
                    }];
                    if others {
                        seqs.insert(
                            0,
                            SeqStep {
                                ids: &other1,
                                cache: &mut o1,
                                allowed: Some(&[false, true, false, false]),
                            },
                        );
                        if step >= 1 {
                            seqs.push(SeqStep {
                                ids: &other2,
                                cache: &mut o2,
                                allowed: None,
                            });
                        }
                    }
                    let pos = if others { 1 } else { 0 };
                    let l = model.step_seqs(&mut seqs).unwrap().logits.remove(pos);
                    let next = crate::generate::argmax(&l);
                    out.push(bits(&l));
                    ids = vec![next];
                }
                out
            };
            let alone = run(&m, None, false);
            assert_eq!(
                alone,
                run(&m, None, true),
                "top-k {top_k}: unmasked, batched"
            );
            let masked = run(&m, Some(&mask), false);
            assert_eq!(
                masked,
                run(&m, Some(&mask), true),
                "top-k {top_k}: masked, batched"
            );
            assert_eq!(
                masked,
                run(&sel, None, false),
                "top-k {top_k}: mask = selected model"
            );
            if top_k < 4 {
                assert_ne!(masked, alone, "top-k {top_k}: the mask changes the result");
            }
            // Close to the tape's forward of the whole sequence, at the prompt's last position
            // and at every decoded one (the one-token attention path).
            let mut seq = prompt.clone();
            for l in &alone[..alone.len() - 1] {
                let l: Vec<f32> = l.iter().map(|&b| f32::from_bits(b)).collect();
                seq.push(crate::generate::argmax(&l));
            }
            let tape = m.logits(&seq, 1, seq.len()).unwrap();
            for (step, l) in alone.iter().enumerate() {
                let want = tape.row(prompt.len() - 1 + step);
                for (a, b) in l.iter().map(|&b| f32::from_bits(b)).zip(want) {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "top-k {top_k} step {step}: {a} vs tape {b}"
                    );
                }
            }
        }
    }

    /// Bad steps are refused before any work: an id out of range, no room in the cache, a mask
    /// of the wrong length or with no expert, a mask on a dense model.
    #[test]
    fn bad_steps_are_refused() {
        let m = moe(2);
        let mut c = SeqCache::new(&m.cfg, 4).unwrap();
        let step = |ids: &[u32], c: &mut SeqCache, a: Option<&[bool]>| {
            m.step_seqs(&mut [SeqStep {
                ids,
                cache: c,
                allowed: a,
            }])
            .err()
            .map(|e| e.to_string())
        };
        assert!(step(&[61], &mut c, None).is_some());
        assert!(step(&[1, 2, 3, 4, 5], &mut c, None)
            .unwrap()
            .contains("kv cache"));
        assert!(step(&[1], &mut c, Some(&[true; 3])).is_some());
        assert!(step(&[1], &mut c, Some(&[false; 4])).is_some());
        assert_eq!(c.len(), 0, "refused steps leave the cache as it was");
        let dense = Model::new_random(&Config::olmo2(61, 32, 48, 2, 4, 2), 1).unwrap();
        let mut dc = SeqCache::new(&dense.cfg, 4).unwrap();
        assert!(dense
            .step_seqs(&mut [SeqStep {
                ids: &[1],
                cache: &mut dc,
                allowed: Some(&[true])
            }])
            .is_err());
        assert!(SeqCache::new(&m.cfg, m.cfg.max_position_embeddings + 1).is_err());
    }
}
