//! The model written once over the backend's kernel families (`model::net`), run on the CPU
//! backend (`ops::host::Host`, f32), against the tape model it is checked by: logits, cached
//! decoding, routing, the loss with every expert-training term, the gradient of every trained
//! parameter, recomputation and chunked loss, and optimizer steps. In f32 the two differ only by
//! the order of a few sums, so the tolerances here are tight (1e-4 relative), where a wrong
//! transpose, a missing term or a wrong scale is off by O(1). tests/gpu_model.rs runs the same
//! model on the CUDA backend.

use flexrun::autograd::Tape;
use flexrun::model::net::{HostNet, NetTrainer};
use flexrun::model::runner::Runner;
use flexrun::model::{Config, LossCoefs, Model};
use flexrun::ops::host::Host;
use flexrun::tensor::Tensor;
use flexrun::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::R;

/// A random model whose every block moves the logits (f32 weights: see
/// `common::test_model`).
fn model(cfg: Config, seed: u64, router_std: f32) -> Model {
    common::test_model(cfg, seed, router_std, false)
}

/// hidden 64, 4 heads on 2 KV heads (hd 16), intermediate 96, 3 layers, vocab 200.
fn moe_cfg(experts: usize, top_k: usize) -> Config {
    Config::flex_olmo(200, 64, 96, 3, 4, 2, experts, top_k)
}

fn dense_cfg() -> Config {
    Config::olmo2(300, 128, 200, 2, 4, 4)
}

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(0..vocab as u32)).collect()
}

/// `||a - b|| / ||b||` (L2).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

const TOL: f64 = 1e-4;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let rel = rel_diff(got, want);
    assert!(rel <= TOL, "{what}: relative error {rel:.3e}");
}

/// Logits and final hidden states of every kind of model: MoE with top-k of all experts,
/// top-2 of 4 with renormalised weights, dense; ragged lengths.
#[test]
fn forward_matches_tape() -> R {
    let mut renorm = moe_cfg(4, 2);
    renorm.norm_topk_prob = true;
    let cases = [
        (model(moe_cfg(3, 3), 1, 1.0), 2, 17),
        (model(moe_cfg(4, 2), 2, 1.0), 3, 9),
        (model(renorm, 3, 1.0), 2, 13),
        (model(dense_cfg(), 4, 1.0), 2, 33),
    ];
    for (i, (m, b, t)) in cases.iter().enumerate() {
        let x = ids(b * t, m.cfg.vocab_size, 10 + i as u64);
        let net = HostNet::upload(&Host, m)?;
        assert_close(
            &format!("case {i} logits"),
            net.logits(&x, *b, *t)?.data(),
            m.logits(&x, *b, *t)?.data(),
        );
        let want = Runner::Cpu(m).final_hidden(&x, *b, *t)?;
        assert_close(
            &format!("case {i} hidden"),
            net.final_hidden(&x, *b, *t)?.data(),
            want.data(),
        );
    }
    Ok(())
}

/// Decoding with the KV cache in steps of several tokens and of one gives the uncached
/// forward's logits at every position.
#[test]
fn cached_decode_matches_full() -> R {
    let m = model(moe_cfg(4, 2), 5, 1.0);
    let (b, steps) = (2, [5usize, 1, 1, 3, 1]);
    let total: usize = steps.iter().sum();
    let x = ids(b * total, 200, 6);
    let net = HostNet::upload(&Host, &m)?;
    let full = m.logits(&x, b, total)?;
    let mut cache = net.new_cache(b, total + 2)?;
    let mut pos = 0;
    for &t in &steps {
        let mut chunk = Vec::with_capacity(b * t);
        for bi in 0..b {
            chunk.extend_from_slice(&x[bi * total + pos..bi * total + pos + t]);
        }
        let logits = net.forward(&chunk, b, t, Some(&mut cache))?;
        let got = Host.download(logits.r())?;
        let mut want = Vec::new();
        for bi in 0..b {
            for i in 0..t {
                want.extend_from_slice(full.row(bi * total + pos + i));
            }
        }
        assert_close(&format!("positions {pos}..{}", pos + t), &got, &want);
        pos += t;
    }
    assert_eq!(cache.len, total);
    Ok(())
}

use flexrun::backend::kernels::Kernels;

/// Every MoE layer's router probabilities and top-k experts equal the tape's.
#[test]
fn routing_matches_tape() -> R {
    let m = model(moe_cfg(4, 2), 7, 1.0);
    let (b, t) = (2, 21);
    let x = ids(b * t, 200, 8);
    let net = HostNet::upload(&Host, &m)?;
    let want = Runner::Cpu(&m).routing(&x, b, t)?;
    let got = net.routing(&x, b, t)?;
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((g.experts, g.k), (w.experts, w.k));
        assert_close("router probabilities", &g.probs, &w.probs);
        assert_eq!(g.topk, w.topk);
    }
    Ok(())
}

/// The loss of the tape and the net under `coefs`, and every trained parameter's gradient:
/// the same parameters get gradients, each within [`TOL`] (relative L2; a router bias, one
/// nearly cancelling column sum, relative to the largest bias gradient).
fn check_gradients(
    m: &Model,
    b: usize,
    t: usize,
    seed: u64,
    coefs: &LossCoefs,
    anchored: &[bool],
) -> R {
    let v = m.cfg.vocab_size;
    let (inp, tgt) = (ids(b * t, v, seed), ids(b * t, v, seed + 1));
    let mut tape = Tape::new();
    let out = m.loss_anchored(&mut tape, &inp, &tgt, b, t, coefs, anchored)?;
    let want_loss = tape.value(out.loss).data()[0];
    let want = tape.backward(out.loss).params;
    let mut net = HostNet::upload(&Host, m)?;
    net.train_as(m)?;
    let (loss, grads) = net.loss_and_grads(&inp, &tgt, b, t, coefs, anchored)?;
    assert!(
        ((loss.loss - want_loss) as f64).abs() <= TOL * want_loss.abs() as f64,
        "loss: net {} vs tape {want_loss}",
        loss.loss
    );
    assert!(
        ((loss.ce - out.ce) as f64).abs() <= TOL * out.ce.abs() as f64,
        "cross-entropy: net {} vs tape {}",
        loss.ce,
        out.ce
    );
    let got = net.grads_to_host(&grads, m)?;
    for (name, rel, scale) in common::grad_errors(m, &got, &want) {
        assert!(
            scale > 0.0,
            "{name}: the tape's gradient is zero: the check would be empty"
        );
        assert!(rel <= TOL, "{name}: gradient relative error {rel:.3e}");
    }
    Ok(())
}

#[test]
fn gradients_moe_and_dense() -> R {
    let coefs = LossCoefs::default();
    check_gradients(&model(moe_cfg(3, 3), 13, 0.2), 2, 19, 14, &coefs, &[])?;
    check_gradients(&model(moe_cfg(4, 2), 15, 1.0), 2, 11, 16, &coefs, &[])?;
    check_gradients(&model(dense_cfg(), 17, 1.0), 2, 33, 18, &coefs, &[])?;
    // Widths that are not multiples of 8 (the CUDA kernels need them; the CPU does not), head
    // dim 6, GQA 2:1.
    check_gradients(
        &model(Config::flex_olmo(50, 12, 20, 2, 2, 1, 2, 2), 19, 1.0),
        2,
        7,
        20,
        &coefs,
        &[],
    )
}

/// Sets of trained parameters the model cannot train are refused before any work, in one line
/// (a stacked weight's trained experts that are not its last ones); the others pass.
#[test]
fn unsupported_trainable_sets_are_refused() {
    use flexrun::model::net::grad_from;
    let base = model(moe_cfg(3, 3), 23, 1.0);
    let with = |keep: &dyn Fn(&str) -> bool| {
        let mut m = base.clone();
        for p in m.params.params.iter_mut() {
            p.trainable = keep(&p.name);
        }
        grad_from(&m)
    };
    let e = with(&|n: &str| n.contains("experts.0."))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("must be its last ones") && !e.contains('\n'),
        "{e}"
    );
    for ok in [
        &|_: &str| true as bool,
        &|n: &str| n.contains(".mlp.gate."),
        &|n: &str| n.contains("experts.2."),
        &|n: &str| n.contains("self_attn"),
        &|n: &str| n.contains("gate_proj"),
    ] as [&dyn Fn(&str) -> bool; 5]
    {
        with(ok).unwrap();
    }
}

/// A small public model and its 2-expert training model ([public FFN frozen, copy trained],
/// r_pub frozen, r_i and b_i trained), the new expert moved away from its copy (and made
/// louder: its down projection scaled by 1.5) so that the anchor and loudness terms are active.
fn expert_model(seed: u64) -> Model {
    let public = model(Config::olmo2(200, 64, 96, 2, 4, 2), seed, 1.0);
    let h = public.cfg.hidden_size;
    let mut rng = StdRng::seed_from_u64(seed + 7);
    let r_pub: Vec<f32> = Tensor::randn(&[h], 0.2, &mut rng).into_vec();
    let r_i: Vec<f32> = Tensor::randn(&[h], 0.2, &mut rng).into_vec();
    let mut m = flexrun::flex::expert_training_model(&public, &r_pub, &r_i, Some(-0.3)).unwrap();
    for p in m.params.params.iter_mut() {
        if p.trainable && p.name.contains("experts.1.") {
            let noise = Tensor::randn(p.value.shape(), 0.05, &mut rng);
            let f = if p.name.contains("down_proj") {
                1.5
            } else {
                1.0
            };
            let v: Vec<f32> = p
                .value
                .data()
                .iter()
                .zip(noise.data())
                .map(|(a, b)| f * (a + b))
                .collect();
            p.value = Tensor::from_vec(v, p.value.shape());
        }
    }
    m
}

fn expert_coefs() -> LossCoefs {
    LossCoefs {
        public_anchor: 1.0,
        public_anchor_layers: vec![4.0, 1.0],
        router_own: 0.3,
        router_public: 0.3,
        expert_loudness: 0.5,
        ..LossCoefs::default()
    }
}

/// Expert training: every loss term on (anchor weighted per layer, router own- and
/// public-text cross-entropies, loudness), frozen public weights without gradients.
#[test]
fn gradients_expert_training() -> R {
    let m = expert_model(41);
    let anchored = [false, true, false, true];
    // Each extra term is active: turning it off moves the tape's loss.
    let (b, t) = (4, 21);
    let (inp, tgt) = (ids(b * t, 200, 42), ids(b * t, 200, 43));
    let loss_with = |c: &LossCoefs| -> flexrun::Result<f32> {
        let mut tape = Tape::new();
        let out = m.loss_anchored(&mut tape, &inp, &tgt, b, t, c, &anchored)?;
        Ok(tape.value(out.loss).data()[0])
    };
    let all = loss_with(&expert_coefs())?;
    for off in [
        LossCoefs {
            public_anchor: 0.0,
            ..expert_coefs()
        },
        LossCoefs {
            router_own: 0.0,
            ..expert_coefs()
        },
        LossCoefs {
            router_public: 0.0,
            ..expert_coefs()
        },
        LossCoefs {
            expert_loudness: 0.0,
            ..expert_coefs()
        },
    ] {
        assert!(
            (all - loss_with(&off)?).abs() > 1e-3,
            "a loss term is inactive: {off:?}"
        );
    }
    check_gradients(&m, b, t, 42, &expert_coefs(), &anchored)
}

/// Router tuning trains every router row and bias of a merged model and nothing else.
#[test]
fn gradients_router_tuning() -> R {
    let mut m = model(moe_cfg(3, 3), 43, 0.2);
    for p in m.params.params.iter_mut() {
        p.trainable = p.name.contains(".mlp.gate.");
    }
    check_gradients(&m, 2, 19, 44, &LossCoefs::default(), &[])?;
    // Only one attention projection of the middle layer: the backward stops below it (nothing
    // under it trains), and the loss still counts every layer's router
    // z-loss.
    let mut m = model(moe_cfg(3, 3), 45, 0.2);
    for p in m.params.params.iter_mut() {
        p.trainable = p.name.contains("layers.1.self_attn.q_proj");
    }
    check_gradients(&m, 2, 19, 46, &LossCoefs::default(), &[])?;
    // An FFN's gate projection without its up projection, and the last expert's up projection
    // without its gate.
    for (seed, part) in [(47, "gate_proj"), (48, "experts.2.up_proj")] {
        let mut m = model(moe_cfg(3, 3), seed, 0.2);
        for p in m.params.params.iter_mut() {
            p.trainable = p.name.contains(part);
        }
        check_gradients(&m, 2, 19, seed + 10, &LossCoefs::default(), &[])?;
    }
    Ok(())
}

/// Recomputing each layer's activations in the backward gives bit-identical loss and
/// gradients; the loss over logits 7 rows at a time (ragged chunks) gives the whole batch's.
#[test]
fn recompute_and_chunked_loss() -> R {
    let m = expert_model(91);
    let (b, t) = (4, 21);
    let (inp, tgt) = (ids(b * t, 200, 92), ids(b * t, 200, 93));
    let anchored = [false, true, false, true];
    let run =
        |chunk: Option<usize>, recompute: bool| -> flexrun::Result<(f32, Vec<(usize, Tensor)>)> {
            let mut net = HostNet::upload(&Host, &m)?;
            net.train_as(&m)?;
            if let Some(c) = chunk {
                net.set_ce_chunk_rows(c);
            }
            net.set_recompute(recompute);
            let (loss, grads) = net.loss_and_grads(&inp, &tgt, b, t, &expert_coefs(), &anchored)?;
            Ok((loss.loss, net.grads_to_host(&grads, &m)?))
        };
    let (base_loss, base) = run(None, false)?;
    let (rec_loss, rec) = run(None, true)?;
    assert_eq!(rec_loss.to_bits(), base_loss.to_bits(), "recomputed loss");
    for ((id, a), (_, b)) in rec.iter().zip(&base) {
        assert_eq!(
            a.data(),
            b.data(),
            "{}: recomputed gradient",
            m.params.get(*id).name
        );
    }
    let (loss, chunked) = run(Some(7), true)?;
    assert!(((loss - base_loss) as f64).abs() <= 1e-6 * base_loss.abs() as f64);
    for ((id, a), (_, b)) in chunked.iter().zip(&base) {
        assert_close(
            &format!("{} chunked", m.params.get(*id).name),
            a.data(),
            b.data(),
        );
    }
    Ok(())
}

/// Twenty AdamW steps (clipping at 1, weight decay 0.1, two micro-batches averaged) of the
/// net's trainer end at the tape trainer's weights, and the losses agree at every step.
#[test]
fn trainer_matches_tape_steps() -> R {
    let cfg = Config::flex_olmo(64, 64, 96, 2, 4, 2, 2, 2);
    let mut tape_m = Model::new_random(&cfg, 21)?;
    let mut opt = AdamW::new(AdamWConfig::default(), tape_m.params.len());
    let mut trainer = NetTrainer::from_host(&Host, &tape_m, &opt, 1.0)?;
    let (b, t, lr) = (2, 16, 2e-3);
    let mut rng = StdRng::seed_from_u64(22);
    let coefs = LossCoefs::default();
    for step in 0..20 {
        let mut micro = Vec::new();
        for _ in 0..2 {
            let (mut inp, mut tgt) = (Vec::new(), Vec::new());
            for _ in 0..b {
                let s: u32 = rng.random_range(0..64);
                inp.extend((0..t as u32).map(|i| (s + i) % 64));
                tgt.extend((0..t as u32).map(|i| (s + i + 1) % 64));
            }
            micro.push((inp, tgt));
        }
        let mut acc: Vec<(usize, Tensor)> = Vec::new();
        let mut want_loss = 0f32;
        for (inp, tgt) in &micro {
            let mut tape = Tape::new();
            let out = tape_m.loss(&mut tape, inp, tgt, b, t, &coefs)?;
            want_loss += 0.5 * tape.value(out.loss).data()[0];
            let g = tape.backward(out.loss).params;
            if acc.is_empty() {
                acc = g
                    .into_iter()
                    .map(|(id, g)| {
                        (
                            id,
                            Tensor::from_vec(g.data().iter().map(|x| 0.5 * x).collect(), g.shape()),
                        )
                    })
                    .collect();
            } else {
                for ((_, a), (_, g)) in acc.iter_mut().zip(&g) {
                    let v: Vec<f32> = a
                        .data()
                        .iter()
                        .zip(g.data())
                        .map(|(a, g)| a + 0.5 * g)
                        .collect();
                    *a = Tensor::from_vec(v, g.shape());
                }
            }
        }
        clip_grad_norm(&mut acc, 1.0);
        opt.update(&mut tape_m.params, &acc, lr);
        let got = trainer.step(&micro, &[], b, t, lr, &coefs)?;
        assert!(
            ((got.loss - want_loss) as f64).abs() <= TOL * want_loss as f64,
            "step {step}: net loss {} vs tape {want_loss}",
            got.loss
        );
    }
    let mut net_m = tape_m.clone();
    let mut net_opt = AdamW::new(AdamWConfig::default(), net_m.params.len());
    trainer.to_host(&mut net_m, &mut net_opt)?;
    assert_eq!(net_opt.step, opt.step);
    for (a, b) in net_m.params.params.iter().zip(&tape_m.params.params) {
        assert_close(&a.name, a.value.data(), b.value.data());
    }
    Ok(())
}

/// One DP-SGD step of the net's trainer (expert training: per-record gradients clipped to 0.5,
/// the public rows' gradient unclipped, Gaussian noise, the sum over the expected rows, then
/// global clipping and AdamW) ends at the weights of the same step written out on the tape.
#[test]
fn dp_step_matches_tape() -> R {
    let mut m = expert_model(61);
    let coefs = LossCoefs {
        public_anchor: 1.0,
        router_own: 0.3,
        ..LossCoefs::default()
    };
    let (t, clip, expected, lr) = (12, 0.5f32, 5.0f64, 1e-3);
    let private: Vec<(Vec<u32>, Vec<u32>)> = (0..3)
        .map(|i| (ids(t, 200, 70 + 2 * i), ids(t, 200, 71 + 2 * i)))
        .collect();
    let (pub_in, pub_tgt) = (ids(2 * t, 200, 80), ids(2 * t, 200, 81));
    let mut rng = StdRng::seed_from_u64(82);
    let noise: Vec<(usize, Tensor)> = m
        .params
        .params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.trainable)
        .map(|(i, p)| (i, Tensor::randn(p.value.shape(), 0.1, &mut rng)))
        .collect();
    let mut opt = AdamW::new(AdamWConfig::default(), m.params.len());
    let mut trainer = NetTrainer::from_host(&Host, &m, &opt, 1.0)?;
    let got = trainer.dp_step(
        &private,
        Some((&pub_in, &pub_tgt, 2)),
        t,
        lr,
        &coefs,
        clip,
        &noise,
        expected,
    )?;
    // The same step on the tape.
    let grads_of = |inp: &[u32], tgt: &[u32], b: usize, public: bool| -> flexrun::Result<_> {
        let mut tape = Tape::new();
        let out = m.loss_anchored(&mut tape, inp, tgt, b, t, &coefs, &vec![public; b])?;
        let loss = tape.value(out.loss).data()[0];
        Ok((loss, tape.backward(out.loss).params))
    };
    let mut acc: Vec<(usize, Tensor)> = noise.clone();
    let mut loss_sum = 0f64;
    for (inp, tgt) in &private {
        let (loss, g) = grads_of(inp, tgt, 1, false)?;
        let norm = g.iter().map(|(_, x)| x.sq_norm()).sum::<f64>().sqrt() as f32;
        let f = (clip / norm.max(1e-12)).min(1.0);
        for ((_, a), (_, x)) in acc.iter_mut().zip(&g) {
            let v: Vec<f32> = a
                .data()
                .iter()
                .zip(x.data())
                .map(|(a, x)| a + f * x)
                .collect();
            *a = Tensor::from_vec(v, a.shape());
        }
        loss_sum += loss as f64;
    }
    let (loss, g) = grads_of(&pub_in, &pub_tgt, 2, true)?;
    loss_sum += 2.0 * loss as f64;
    for ((_, a), (_, x)) in acc.iter_mut().zip(&g) {
        let v: Vec<f32> = a
            .data()
            .iter()
            .zip(x.data())
            .map(|(a, x)| a + 2.0 * x)
            .collect();
        *a = Tensor::from_vec(v, a.shape());
    }
    for (_, a) in acc.iter_mut() {
        let v: Vec<f32> = a.data().iter().map(|x| x / expected as f32).collect();
        *a = Tensor::from_vec(v, a.shape());
    }
    let want_loss = (loss_sum / 5.0) as f32;
    assert!(
        ((got.loss - want_loss) as f64).abs() <= TOL * want_loss as f64,
        "DP loss: net {} vs tape {want_loss}",
        got.loss
    );
    let norm = clip_grad_norm(&mut acc, 1.0);
    assert!(
        ((got.grad_norm - norm) as f64).abs() <= TOL * norm as f64,
        "gradient norm: net {} vs tape {norm}",
        got.grad_norm
    );
    let before = m.clone();
    opt.update(&mut m.params, &acc, lr);
    let mut net_m = before.clone();
    let mut net_opt = AdamW::new(AdamWConfig::default(), net_m.params.len());
    trainer.to_host(&mut net_m, &mut net_opt)?;
    for ((a, b), c) in net_m
        .params
        .params
        .iter()
        .zip(&m.params.params)
        .zip(&before.params.params)
    {
        if !a.trainable {
            assert_eq!(
                a.value.data(),
                c.value.data(),
                "{}: a frozen weight moved",
                a.name
            );
            continue;
        }
        // Compare the updates (a step of lr is a small change of the weights).
        let du: Vec<f32> = a
            .value
            .data()
            .iter()
            .zip(c.value.data())
            .map(|(x, y)| x - y)
            .collect();
        let dw: Vec<f32> = b
            .value
            .data()
            .iter()
            .zip(c.value.data())
            .map(|(x, y)| x - y)
            .collect();
        assert!(
            dw.iter().any(|&x| x != 0.0),
            "{}: the tape's step did not move it",
            a.name
        );
        assert!(
            rel_diff(&du, &dw) <= 1e-3,
            "{}: update {:.3e} off",
            a.name,
            rel_diff(&du, &dw)
        );
    }
    Ok(())
}
