//! Whole-model checks: gradient of the full MoE loss, KV-cache decoding, expert selection,
//! checkpoint round trips and config validation.

use flexrun::autograd::Tape;
use flexrun::generate::{generate, SamplingConfig};
use flexrun::model::runner::Runner;
use flexrun::model::{checkpoint, Config, KvCache, LossCoefs, Model};
use flexrun::tensor::{DType, Tensor};
use rand::{rngs::StdRng, SeedableRng};

fn tiny_moe(seed: u64) -> Model {
    let cfg = Config::flex_olmo(32, 16, 24, 2, 4, 2, 4, 2);
    let mut m = Model::new_random(&cfg, seed).unwrap();
    // Larger weights and non-trivial norms so that every path carries a visible gradient.
    let mut rng = StdRng::seed_from_u64(seed + 1);
    for p in m.params.params.iter_mut() {
        let shape = p.value.shape().to_vec();
        p.value = if p.name.contains("norm") {
            let noise = Tensor::randn(&shape, 0.3, &mut rng);
            Tensor::from_vec(noise.data().iter().map(|x| 1.0 + x).collect(), &shape)
        } else if p.name.contains("gate.weight[") {
            Tensor::randn(&shape, 1.0, &mut rng)
        } else {
            Tensor::randn(&shape, 0.3, &mut rng)
        };
    }
    m
}

fn batch() -> (Vec<u32>, Vec<u32>) {
    let inp: Vec<u32> = (0..2 * 6).map(|i| (i * 7 % 32) as u32).collect();
    let tgt: Vec<u32> = (0..2 * 6).map(|i| (i * 5 % 32 + 1) as u32 % 32).collect();
    (inp, tgt)
}

fn loss_value(m: &Model, coefs: &LossCoefs) -> f64 {
    let (inp, tgt) = batch();
    let mut tape = Tape::inference();
    let out = m.loss(&mut tape, &inp, &tgt, 2, 6, coefs).unwrap();
    tape.value(out.loss).data()[0] as f64
}

#[test]
fn whole_moe_model_gradient_matches_finite_differences() {
    let mut m = tiny_moe(3);
    // Give two experts a router bias so its gradient is checked too (away from the kink at 0).
    let mut ps = m.params.clone();
    for l in 0..2 {
        for e in [1, 3] {
            ps.add(
                flexrun::model::router_bias_name(l, e),
                Tensor::from_vec(vec![-0.3], &[1]),
            );
        }
    }
    m = Model::from_params(m.cfg.clone(), ps).unwrap();
    let coefs = LossCoefs {
        z_loss: 1e-2,
        router_z_loss: 1e-1,
        ..LossCoefs::default()
    };
    let (inp, tgt) = batch();
    let mut tape = Tape::new();
    let out = m.loss(&mut tape, &inp, &tgt, 2, 6, &coefs).unwrap();
    let grads = tape.backward(out.loss);
    assert_eq!(
        grads.params.len(),
        m.params.len(),
        "every trainable parameter gets a gradient"
    );
    let eps = 2e-3f32;
    let mut checked = 0;
    let mut worst = 0f32;
    for (id, g) in &grads.params {
        let n = g.numel();
        for j in (0..n).step_by((n / 5).max(1)) {
            let orig = m.params.params[*id].value.data()[j];
            m.params.params[*id].value.data_mut()[j] = orig + eps;
            let lp = loss_value(&m, &coefs);
            m.params.params[*id].value.data_mut()[j] = orig - eps;
            let lm = loss_value(&m, &coefs);
            m.params.params[*id].value.data_mut()[j] = orig;
            let num = ((lp - lm) / (2.0 * eps as f64)) as f32;
            let a = g.data()[j];
            let err = (a - num).abs();
            assert!(
                err <= 2e-3 + 5e-2 * a.abs().max(num.abs()),
                "{}[{j}]: analytic {a} numeric {num}",
                m.params.params[*id].name
            );
            worst = worst.max(err);
            checked += 1;
        }
    }
    assert!(checked > 100, "checked {checked} coordinates");
}

#[test]
fn frozen_parameters_get_no_gradient() {
    let mut m = tiny_moe(4);
    m.params.set_all_trainable(false);
    let id = m
        .params
        .id("model.layers.1.mlp.experts.2.up_proj.weight")
        .unwrap();
    m.params.params[id].trainable = true;
    let (inp, tgt) = batch();
    let mut tape = Tape::new();
    let out = m
        .loss(&mut tape, &inp, &tgt, 2, 6, &LossCoefs::default())
        .unwrap();
    let grads = tape.backward(out.loss);
    assert_eq!(grads.params.len(), 1);
    assert_eq!(grads.params[0].0, id);
    assert!(grads.params[0].1.sq_norm() > 0.0);
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let m = tiny_moe(5);
    let ids: Vec<u32> = vec![3, 9, 27, 1, 4, 30, 12, 7, 19];
    let full = m.logits(&ids, 1, ids.len()).unwrap();
    let mut cache = KvCache::new(&m.cfg, 1, ids.len());
    // A 4-token prefill, then one token at a time.
    let mut rows = Vec::new();
    let mut tape = Tape::inference();
    let f = m
        .forward(&mut tape, &ids[..4], 1, 4, Some(&mut cache))
        .unwrap();
    rows.push(tape.value(f.logits).clone());
    for i in 4..ids.len() {
        let mut tape = Tape::inference();
        let f = m
            .forward(&mut tape, &ids[i..i + 1], 1, 1, Some(&mut cache))
            .unwrap();
        rows.push(tape.value(f.logits).clone());
    }
    let parts: Vec<&Tensor> = rows.iter().collect();
    let inc = Tensor::cat_rows(&parts);
    let err = inc.max_abs_diff(&full);
    assert!(err < 1e-5, "cached logits differ by {err}");
    // Greedy generation continues the same way as argmax over full recomputation.
    let cfg = SamplingConfig {
        max_new_tokens: 5,
        ..Default::default()
    };
    let out = generate(Runner::Cpu(&m), &ids, &cfg, |_| {}).unwrap();
    let mut seq = ids.clone();
    for &tok in &out {
        let l = m.logits(&seq, 1, seq.len()).unwrap();
        assert_eq!(flexrun::generate::argmax(l.row(seq.len() - 1)), tok);
        seq.push(tok);
    }
}

#[test]
fn sampling_is_seeded() {
    let m = tiny_moe(6);
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_k: 10,
        top_p: 0.9,
        seed: 11,
        max_new_tokens: 12,
        stop_token: None,
    };
    let a = generate(Runner::Cpu(&m), &[1, 2, 3], &cfg, |_| {}).unwrap();
    let b = generate(Runner::Cpu(&m), &[1, 2, 3], &cfg, |_| {}).unwrap();
    assert_eq!(a, b);
    let c = generate(
        Runner::Cpu(&m),
        &[1, 2, 3],
        &SamplingConfig { seed: 12, ..cfg },
        |_| {},
    )
    .unwrap();
    assert_ne!(a, c, "a different seed should change a 12-token sample");
}

#[test]
fn dropping_an_expert_equals_a_model_built_without_it() {
    let m = tiny_moe(7);
    let without = m.select_experts(&[0, 1, 3]).unwrap();
    // Build the same 3-expert model independently, from renamed tensors.
    let mut ps = flexrun::model::ParamStore::default();
    for p in &m.params.params {
        let name = p
            .name
            .replace("experts.3.", "experts.2.")
            .replace("[3]", "[2]");
        if p.name.contains("experts.2.") || p.name.ends_with("[2]") {
            continue;
        }
        ps.add(name, p.value.clone());
    }
    let mut cfg = m.cfg.clone();
    cfg.num_experts = Some(3);
    let direct = Model::from_params(cfg, ps).unwrap();
    let ids: Vec<u32> = (0..10).map(|i| (i * 3 % 32) as u32).collect();
    let a = without.logits(&ids, 1, 10).unwrap();
    let b = direct.logits(&ids, 1, 10).unwrap();
    assert_eq!(a.data(), b.data(), "bit-identical logits");
}

#[test]
fn checkpoint_round_trip_f32_and_bf16() {
    let m = tiny_moe(8);
    let dir = std::env::temp_dir().join(format!("flexrun-ckpt-{}", std::process::id()));
    checkpoint::save(&m, &dir, DType::F32).unwrap();
    let back = checkpoint::load(&dir).unwrap();
    let ids = [1u32, 5, 9, 2];
    assert_eq!(
        m.logits(&ids, 1, 4).unwrap().data(),
        back.logits(&ids, 1, 4).unwrap().data()
    );
    checkpoint::save(&m, &dir, DType::BF16).unwrap();
    let back = checkpoint::load(&dir).unwrap();
    let err = m
        .logits(&ids, 1, 4)
        .unwrap()
        .max_abs_diff(&back.logits(&ids, 1, 4).unwrap());
    assert!(err > 0.0 && err < 0.5, "bf16 round trip error {err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A model larger than the shard size is written as transformers writes one: shards named
/// `model-0000k-of-0000n.safetensors`, each within the size (a tensor over it alone), and an
/// index mapping every tensor to its shard with the total size; it loads back bit for bit, and a
/// save that fits one file replaces the shards whole.
#[test]
fn large_models_are_written_in_shards() {
    let m = tiny_moe(8);
    let dir = std::env::temp_dir().join(format!("flexrun-shards-{}", std::process::id()));
    let max = 6000;
    checkpoint::save_sharded(&m, &dir, DType::F32, max).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let files: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    let n = files.len();
    assert!(n > 2, "{n} shards");
    let mut total = 0u64;
    for (k, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", k + 1));
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
        assert!(
            data <= max || st.len() == 1,
            "{f}: {data} bytes in {} tensors",
            st.len()
        );
        total += data as u64;
        for (name, _) in st.tensors() {
            assert_eq!(map[&name].as_str().unwrap(), *f, "{name}");
        }
    }
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), total);
    assert!(!dir.join("model.safetensors").exists());
    let back = checkpoint::load(&dir).unwrap();
    let ids = [1u32, 5, 9, 2];
    assert_eq!(
        m.logits(&ids, 1, 4).unwrap().data(),
        back.logits(&ids, 1, 4).unwrap().data()
    );
    checkpoint::save(&m, &dir, DType::F32).unwrap();
    assert!(dir.join("model.safetensors").exists());
    assert!(!dir.join("model.safetensors.index.json").exists());
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("model-")));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn impossible_configs_are_rejected_with_a_reason() {
    let base = Config::flex_olmo(32, 16, 24, 2, 4, 2, 4, 2);
    let mut c = base.clone();
    c.num_attention_heads = 3;
    assert!(c
        .validate()
        .unwrap_err()
        .0
        .contains("does not divide hidden_size"));
    let mut c = base.clone();
    c.num_key_value_heads = Some(3);
    assert!(c.validate().unwrap_err().0.contains("num_key_value_heads"));
    let mut c = base.clone();
    c.num_experts_per_tok = Some(5);
    assert!(c.validate().unwrap_err().0.contains("num_experts_per_tok"));
    let mut c = base.clone();
    c.model_type = "llama".into();
    assert!(c
        .validate()
        .unwrap_err()
        .0
        .contains("unsupported model_type"));
}

#[test]
fn out_of_range_ids_are_errors() {
    let m = tiny_moe(9);
    let e = m.logits(&[1, 2, 40], 1, 3).unwrap_err();
    assert!(e.0.contains("token id 40 is out of range"), "{e}");
    let mut tape = Tape::new();
    let e = m
        .loss(&mut tape, &[1, 2], &[3, 99], 1, 2, &LossCoefs::default())
        .err()
        .unwrap();
    assert!(e.0.contains("target id 99"), "{e}");
}

#[test]
fn dense_olmo2_model_runs_and_round_trips() {
    let cfg = Config::olmo2(32, 16, 24, 2, 4, 4);
    let m = Model::new_random(&cfg, 1).unwrap();
    let dir = std::env::temp_dir().join(format!("flexrun-dense-{}", std::process::id()));
    checkpoint::save(&m, &dir, DType::F32).unwrap();
    let back = checkpoint::load(&dir).unwrap();
    assert_eq!(back.cfg.model_type, "olmo2");
    assert_eq!(
        m.logits(&[1, 2, 3], 1, 3).unwrap().data(),
        back.logits(&[1, 2, 3], 1, 3).unwrap().data()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The loss of expert training with the public anchor on row 0 of the batch.
fn anchored_loss(m: &Model, anchor: f32) -> f64 {
    anchored_loss_layers(m, anchor, &[2.0, 0.5])
}

fn anchored_loss_layers(m: &Model, anchor: f32, layers: &[f32]) -> f64 {
    let (inp, tgt) = batch();
    let mut tape = Tape::inference();
    let coefs = LossCoefs {
        z_loss: 0.0,
        router_z_loss: 0.0,
        public_anchor: anchor,
        public_anchor_layers: layers.to_vec(),
        router_own: 0.5,
        router_public: 0.7,
        expert_loudness: 0.4,
    };
    let out = m
        .loss_anchored(&mut tape, &inp, &tgt, 2, 6, &coefs, &[true, false])
        .unwrap();
    tape.value(out.loss).data()[0] as f64
}

#[test]
fn public_anchor_measures_how_far_the_expert_moves_public_text() {
    let cfg = Config::olmo2(32, 16, 24, 2, 4, 2);
    let mut public = Model::new_random(&cfg, 8).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    for p in public.params.params.iter_mut() {
        if !p.name.contains("norm") {
            p.value = Tensor::randn(&p.value.shape().to_vec(), 0.3, &mut rng);
        }
    }
    let r_pub = Tensor::randn(&[16], 1.0, &mut rng).into_vec();
    let r_i = Tensor::randn(&[16], 1.0, &mut rng).into_vec();
    let mut m = flexrun::flex::expert_training_model(&public, &r_pub, &r_i, Some(-0.3)).unwrap();
    // A fresh expert is a copy of the public FFN: the layers act as the public FFN alone.
    let fresh = anchored_loss(&m, 1.0) - anchored_loss(&m, 0.0);
    assert!(fresh.abs() < 1e-5, "anchor of a copy: {fresh}");
    // Once the expert differs, the anchor is positive; its gradient matches finite differences.
    for p in m.params.params.iter_mut() {
        // Louder than the public FFN, so that the loudness term is active.
        if p.name.contains("experts.1.") {
            p.value = Tensor::randn(&p.value.shape().to_vec(), 0.45, &mut rng);
        }
    }
    let moved = anchored_loss(&m, 1.0) - anchored_loss(&m, 0.0);
    assert!(moved > 1e-2, "anchor of a trained expert: {moved}");
    // Per-layer weights scale each layer's term: the anchor is linear in them.
    let base = anchored_loss_layers(&m, 0.0, &[]);
    let term = |w: &[f32]| anchored_loss_layers(&m, 1.0, w) - base;
    let (l0, l1) = (term(&[1.0, 0.0]), term(&[0.0, 1.0]));
    assert!(l0 > 1e-3 && l1 > 1e-3, "per-layer terms {l0} {l1}");
    assert!((term(&[1.0, 1.0]) - (l0 + l1)).abs() < 1e-5);
    assert!(
        (term(&[]) - (l0 + l1)).abs() < 1e-5,
        "no weights: 1 per layer"
    );
    assert!((term(&[3.0, 0.0]) - 3.0 * l0).abs() < 1e-5);
    let (inp, tgt) = batch();
    let wrong = LossCoefs {
        public_anchor: 1.0,
        public_anchor_layers: vec![1.0; 3],
        ..LossCoefs::default()
    };
    let err = m
        .loss_anchored(
            &mut Tape::inference(),
            &inp,
            &tgt,
            2,
            6,
            &wrong,
            &[true, false],
        )
        .err()
        .expect("3 layer weights for 2 layers");
    assert!(
        err.to_string()
            .contains("3 public-anchor layer weights for 2"),
        "{err}"
    );
    let (inp, tgt) = batch();
    let mut tape = Tape::new();
    let coefs = LossCoefs {
        z_loss: 0.0,
        router_z_loss: 0.0,
        public_anchor: 1.0,
        public_anchor_layers: vec![2.0, 0.5],
        router_own: 0.5,
        router_public: 0.7,
        expert_loudness: 0.4,
    };
    let out = m
        .loss_anchored(&mut tape, &inp, &tgt, 2, 6, &coefs, &[true, false])
        .unwrap();
    let grads = tape.backward(out.loss);
    let eps = 2e-3f32;
    let mut checked = 0;
    for (id, g) in &grads.params {
        let n = g.numel();
        for j in (0..n).step_by((n / 7).max(1)) {
            let orig = m.params.params[*id].value.data()[j];
            m.params.params[*id].value.data_mut()[j] = orig + eps;
            let lp = anchored_loss(&m, 1.0);
            m.params.params[*id].value.data_mut()[j] = orig - eps;
            let lm = anchored_loss(&m, 1.0);
            m.params.params[*id].value.data_mut()[j] = orig;
            let num = ((lp - lm) / (2.0 * eps as f64)) as f32;
            let a = g.data()[j];
            assert!(
                (a - num).abs() <= 2e-3 + 5e-2 * a.abs().max(num.abs()),
                "{}[{j}]: analytic {a} numeric {num}",
                m.params.params[*id].name
            );
            checked += 1;
        }
    }
    // Expert FFN (3 matrices), router row and bias in each of 2 layers.
    assert_eq!(grads.params.len(), 10);
    assert!(checked > 40, "checked {checked}");
}

/// The router's own-text loss: on rows that are not anchored, the cross-entropy of the router
/// logits (before the bias) toward expert 1, averaged over layers; nothing on anchored rows.
/// Its mirror, the public-text loss: on anchored rows, the cross-entropy toward expert 0.
#[test]
fn router_own_and_public_losses_are_router_cross_entropies() {
    let cfg = Config::olmo2(32, 16, 24, 2, 4, 2);
    let public = Model::new_random(&cfg, 8).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let r_pub = Tensor::randn(&[16], 1.0, &mut rng).into_vec();
    let r_i = Tensor::randn(&[16], 1.0, &mut rng).into_vec();
    let m = flexrun::flex::expert_training_model(&public, &r_pub, &r_i, Some(-0.3)).unwrap();
    let (inp, tgt) = batch();
    let total_with = |own: f32, public: f32, anchored: &[bool]| {
        let coefs = LossCoefs {
            z_loss: 0.0,
            router_z_loss: 0.0,
            router_own: own,
            router_public: public,
            ..LossCoefs::default()
        };
        let mut tape = Tape::inference();
        let out = m
            .loss_anchored(&mut tape, &inp, &tgt, 2, 6, &coefs, anchored)
            .unwrap();
        tape.value(out.loss).data()[0] as f64
    };
    let total = |own: f32, anchored: &[bool]| total_with(own, 0.0, anchored);
    // The expected terms from the router logits of a plain forward pass: row 1 (tokens 6..12)
    // is the owner's text, row 0 (tokens 0..6) is anchored.
    let mut tape = Tape::inference();
    let out = m.forward(&mut tape, &inp, 2, 6, None).unwrap();
    let expected_ce = |rows: std::ops::Range<usize>, target: usize| {
        let mut expected = 0.0;
        for &z in &out.router_logits {
            let z = tape.value(z);
            let mut ce = 0.0;
            for r in rows.clone() {
                let (a, b) = (z.row(r)[0] as f64, z.row(r)[1] as f64);
                let lse = a.max(b) + ((a - a.max(b)).exp() + (b - a.max(b)).exp()).ln();
                ce += lse - if target == 1 { b } else { a };
            }
            expected += ce / rows.len() as f64;
        }
        expected / out.router_logits.len() as f64
    };
    let expected = expected_ce(6..12, 1);
    let got = total(2.0, &[true, false]) - total(0.0, &[true, false]);
    assert!(expected > 0.1, "{expected}");
    assert!(
        (got - 2.0 * expected).abs() < 1e-4,
        "{got} vs {}",
        2.0 * expected
    );
    // Every row anchored: no own text, no term.
    assert!((total(2.0, &[true, true]) - total(0.0, &[true, true])).abs() < 1e-7);
    // The public-text term: toward expert 0 on the anchored row only, and the two add up.
    let expected_pub = expected_ce(0..6, 0);
    assert!(expected_pub > 0.1, "{expected_pub}");
    let got = total_with(0.0, 3.0, &[true, false]) - total(0.0, &[true, false]);
    assert!(
        (got - 3.0 * expected_pub).abs() < 1e-4,
        "{got} vs {}",
        3.0 * expected_pub
    );
    let both = total_with(2.0, 3.0, &[true, false]) - total(0.0, &[true, false]);
    assert!((both - 2.0 * expected - 3.0 * expected_pub).abs() < 1e-4);
    assert!((total_with(0.0, 3.0, &[false, false]) - total(0.0, &[false, false])).abs() < 1e-7);
    // Only for 2-expert training.
    let merged = Model::new_random(&Config::flex_olmo(32, 16, 24, 2, 4, 2, 3, 3), 8).unwrap();
    let coefs = LossCoefs {
        router_own: 1.0,
        ..LossCoefs::default()
    };
    let err = merged
        .loss(&mut Tape::inference(), &inp, &tgt, 2, 6, &coefs)
        .err()
        .expect("3 experts");
    assert!(err.to_string().contains("2-expert"), "{err}");
}

/// The benchmark configs load, and the released models' shapes have their published sizes:
/// OLMo-2 1B 1.48 B parameters, OLMo-2 7B 7.30 B, FlexOlmo-7x7B 33.3 B (7 experts of the 7B
/// FFN); an expert-training model (public FFN + the new one) on the 7B shape 11.6 B.
#[test]
fn bench_configs_have_the_released_sizes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs");
    let billions = |name: &str| {
        let c = Config::load(&dir.join(format!("{name}.json"))).unwrap();
        c.param_count() as f64 / 1e9
    };
    let near = |name: &str, want: f64| {
        let got = billions(name);
        assert!(
            (got - want).abs() < 0.01 * want,
            "{name}: {got:.3} B, want {want} B"
        );
    };
    near("olmo2_1b", 1.485);
    near("olmo2_7b", 7.299);
    near("flexolmo_7x7b", 33.27);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        Config::load(&p).unwrap_or_else(|e| panic!("{}: {}", p.display(), e.0));
    }
    let c7 = Config::load(&dir.join("olmo2_7b.json")).unwrap();
    let expert = Config {
        model_type: "flex_olmo".into(),
        num_experts: Some(2),
        num_experts_per_tok: Some(2),
        ..c7
    };
    let b = expert.param_count() as f64 / 1e9;
    assert!(
        (b - 11.63).abs() < 0.05,
        "7B expert-training model: {b:.3} B"
    );
}
