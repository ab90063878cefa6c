//! End-to-end: exact resume of training, and the FlexOlmo pipeline (independent experts, merge,
//! opt-out identical to a merge without the expert, refusal of foreign experts).

use flexrun::backend::Device;
use flexrun::data::Dataset;
use flexrun::demo;
use flexrun::flex::{self, Selection};
use flexrun::model::{checkpoint, Config, Model};
use flexrun::train::{data::ShardBatches, LogEntry, TrainConfig, Trainer};
use std::path::{Path, PathBuf};

mod common;
use common::small_dataset;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flexrun-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Batches of 2 x 16 tokens of `data`, validated on 256 tokens.
fn small_batches(data: &Dataset) -> ShardBatches<'_> {
    ShardBatches {
        data,
        batch: 2,
        seq: 16,
        seed: 0,
        valid_tokens: 256,
    }
}

fn log(dir: &Path) -> Vec<LogEntry> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn resumed_training_reproduces_the_uninterrupted_run() {
    let root = tmp("resume");
    let data_dir = small_dataset(&root);
    let data = Dataset::open(&data_dir).unwrap();
    let cfg = Config::olmo2(data.meta.vocab_size, 32, 48, 2, 2, 1);
    let tcfg = TrainConfig {
        steps: 8,
        batch: 2,
        seq: 16,
        grad_accum: 2,
        warmup: 2,
        eval_every: 3,
        ..Default::default()
    };
    let batches = small_batches(&data);
    let run = |dir: &Path, stop: Option<u64>, resume: bool| -> Model {
        let mut m = Model::new_random(&cfg, if resume { 99 } else { 0 }).unwrap();
        let mut tr = Trainer::new(&mut m, tcfg.clone(), dir).unwrap();
        tr.quiet = true;
        tr.stop_at = stop;
        if resume {
            tr.resume().unwrap();
        }
        tr.run(&batches).unwrap();
        m
    };
    let a = run(&root.join("a"), None, false);
    run(&root.join("b"), Some(5), false);
    assert_eq!(log(&root.join("b")).len(), 5);
    let b = run(&root.join("b"), None, true);
    let (la, lb) = (log(&root.join("a")), log(&root.join("b")));
    assert_eq!(la.len(), 8);
    assert_eq!(
        la, lb,
        "losses, lrs, grad norms and validation after resuming equal the uninterrupted run"
    );
    for (p, q) in a.params.params.iter().zip(&b.params.params) {
        assert_eq!(p.value.data(), q.value.data(), "{} differs", p.name);
    }
    // The resumed run's loss curve image covers all 8 steps, once each.
    assert_eq!(
        flexrun::train::read_log(&root.join("b/train_log.jsonl")).unwrap(),
        la
    );
    let svg = std::fs::read_to_string(root.join("b/loss.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains(">valid<"));
    // Changed settings are refused.
    let mut m = Model::new_random(&cfg, 0).unwrap();
    let mut tr = Trainer::new(
        &mut m,
        TrainConfig {
            lr: 1e-2,
            ..tcfg.clone()
        },
        &root.join("b"),
    )
    .unwrap();
    assert!(tr
        .resume()
        .unwrap_err()
        .0
        .contains("training settings differ"));
    std::fs::remove_dir_all(&root).ok();
}

/// A run with frozen parameters (expert training: the public FFN, attention, embeddings and
/// r_pub frozen) checkpoints its trained tensors only, with a hash of the frozen ones; resumed
/// from a model whose trained tensors start elsewhere, it reproduces the uninterrupted run bit
/// for bit, and a resume over other frozen weights is refused.
#[test]
fn resumed_expert_training_restores_the_trained_tensors_only() {
    let root = tmp("resume-expert");
    let data_dir = small_dataset(&root);
    let data = Dataset::open(&data_dir).unwrap();
    let cfg = Config::olmo2(data.meta.vocab_size, 32, 48, 2, 2, 1);
    let public = Model::new_random(&cfg, 7).unwrap();
    let h = cfg.hidden_size;
    let rows = |s: f32| -> Vec<f32> { (0..h).map(|i| s * ((i as f32).sin())).collect() };
    let tcfg = TrainConfig {
        steps: 6,
        batch: 2,
        seq: 16,
        warmup: 2,
        ..Default::default()
    };
    let batches = small_batches(&data);
    let expert = |r_i: f32| {
        flex::expert_training_model(&public, &rows(0.1), &rows(r_i), Some(-1.0)).unwrap()
    };
    let run = |m: &mut Model, dir: &Path, stop: Option<u64>, resume: bool| -> flexrun::Result<()> {
        let mut tr = Trainer::new(m, tcfg.clone(), dir)?;
        tr.quiet = true;
        tr.stop_at = stop;
        if resume {
            tr.resume()?;
        }
        tr.run(&batches)?;
        Ok(())
    };
    let mut a = expert(0.2);
    run(&mut a, &root.join("a"), None, false).unwrap();
    let mut b = expert(0.2);
    run(&mut b, &root.join("b"), Some(3), false).unwrap();
    let ck = root.join("b/checkpoint");
    assert!(ck.join("trained.safetensors").exists());
    assert!(!ck.join("model.safetensors").exists());
    let saved = checkpoint::read_tensors(&[ck.join("trained.safetensors")], false).unwrap();
    let trained = b.params.params.iter().filter(|p| p.trainable).count();
    assert_eq!(saved.len(), trained);
    assert!(trained < b.params.len());
    // Another start for the trained tensors: the checkpoint brings them back.
    let mut b = expert(0.5);
    run(&mut b, &root.join("b"), None, true).unwrap();
    assert_eq!(log(&root.join("a")), log(&root.join("b")));
    for (p, q) in a.params.params.iter().zip(&b.params.params) {
        assert_eq!(p.value.data(), q.value.data(), "{} differs", p.name);
    }
    // Over other frozen weights (r_pub here), the resume is refused.
    let mut c = flex::expert_training_model(&public, &rows(0.3), &rows(0.2), Some(-1.0)).unwrap();
    run(&mut c, &root.join("c"), Some(3), false).unwrap();
    let mut other =
        flex::expert_training_model(&public, &rows(0.4), &rows(0.2), Some(-1.0)).unwrap();
    let err = run(&mut other, &root.join("c"), None, true).unwrap_err();
    assert!(err.0.contains("other frozen weights"), "{}", err.0);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn flexolmo_pipeline_merge_and_opt_out() {
    let root = tmp("pipeline");
    let c = demo::DemoConfig::quick();
    let report = demo::run(&c, &root, &Device::cpu(), true).unwrap();
    let names: Vec<&str> = report.rows.iter().map(|r| r.model.as_str()).collect();
    assert_eq!(
        names,
        [
            "public",
            "dense code",
            "dense facts",
            "dense math",
            "FFN-only code",
            "FFN-only facts",
            "FFN-only math",
            "soup",
            "BTM",
            "BTX",
            "prompt routing",
            "FlexOlmo (top-4)",
            "FlexOlmo without code",
            "FlexOlmo without facts",
            "FlexOlmo without math"
        ]
    );
    // The retired "within 5% of the dense expert" check is gone; the gap to the FFN-only bound
    // is reported instead: each dense expert on its domain, FlexOlmo on every closed domain and
    // each opted-out model on the domains it keeps, as loss / bound - 1.
    assert!(report.checks.iter().all(|c| !c.name.contains("within 5%")));
    let bound_models: Vec<&str> = report.bound.iter().map(|b| b.model.as_str()).collect();
    assert_eq!(
        bound_models,
        [
            "dense code",
            "dense facts",
            "dense math",
            "FlexOlmo (top-4)",
            "FlexOlmo without code",
            "FlexOlmo without facts",
            "FlexOlmo without math"
        ]
    );
    let row_loss = |model: &str, d: &str| {
        let r = report.rows.iter().find(|r| r.model == model).unwrap();
        r.scores.iter().find(|s| s.domain == d).unwrap().loss
    };
    let flex_gaps = &report.bound[3].gaps;
    assert_eq!(flex_gaps.len(), 3);
    for (d, g) in flex_gaps {
        let want = row_loss("FlexOlmo (top-4)", d) / row_loss(&format!("FFN-only {d}"), d) - 1.0;
        assert!((g - want).abs() < 1e-12, "{d}: {g} vs {want}");
    }
    let kept: Vec<&str> = report.bound[4]
        .gaps
        .iter()
        .map(|(d, _)| d.as_str())
        .collect();
    assert_eq!(kept, ["facts", "math"]);
    let md = std::fs::read_to_string(root.join("results.md")).unwrap();
    assert!(
        md.contains("### Gap to the FFN-only bound") && md.contains("| FFN-only bound (loss) |")
    );
    // The FFN-only fine-tune trained the FFNs and nothing else.
    let public_m = flexrun::model::checkpoint::load(&root.join("models/public")).unwrap();
    let ffn_m = flexrun::model::checkpoint::load(&root.join("models/ffn-code")).unwrap();
    for (a, b) in public_m.params.params.iter().zip(&ffn_m.params.params) {
        assert_eq!(a.name, b.name);
        let same = a.value.data() == b.value.data();
        assert_eq!(same, !a.name.contains(".mlp."), "{}", a.name);
    }

    // The BTX model is written with a manifest naming its experts; strict opt-out does not hold.
    let btx = flex::Manifest::load(&root.join("models/btx"))
        .unwrap()
        .unwrap();
    let btx_names: Vec<&str> = btx.experts.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(btx_names, ["public", "code", "facts", "math"]);
    assert!(!btx.strict_opt_out);
    // The prompt router reports a rate for every domain.
    assert_eq!(report.prompt_routing.len(), 4);
    assert!(report
        .prompt_routing
        .iter()
        .all(|(_, r)| (0.0..=1.0).contains(r)));
    for f in ["routing.svg", "loss_curves.svg", "results.md"] {
        assert!(root.join(f).exists(), "the demo writes {f}");
    }
    let flex_dir = root.join("models/flexolmo-main");
    let manifest = flex::Manifest::load(&flex_dir).unwrap().unwrap();
    let names: Vec<&str> = manifest.experts.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["public", "code", "facts", "math"]);
    assert!(manifest.strict_opt_out);

    // The artifact holds only the expert's own weights.
    let art = flex::ExpertArtifact::load(&root.join("experts/main/math.safetensors")).unwrap();
    assert_eq!(art.layers.len(), c.layers);
    assert_eq!(art.meta.public_hash, manifest.public_hash);

    // Opt-out: excluding 'facts' at load time equals merging without it, bit for bit.
    let public = root.join("models/public");
    let arts: Vec<PathBuf> = ["code", "math"]
        .iter()
        .map(|d| root.join(format!("experts/main/{d}.safetensors")))
        .collect();
    let without = root.join("merged-without-facts");
    flex::merge(&public, &arts, c.top_k.min(arts.len() + 1), &[], &without).unwrap();
    let a = flex::load_model(
        &flex_dir,
        &Selection {
            exclude: vec!["facts".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let b = flex::load_model(&without, &Selection::default()).unwrap();
    assert_eq!(a.expert_names, b.expert_names);
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 250) as u32 + 2).collect();
    let la = a.model.logits(&ids, 1, ids.len()).unwrap();
    let lb = b.model.logits(&ids, 1, ids.len()).unwrap();
    assert_eq!(
        la.data(),
        lb.data(),
        "opt-out must be bit-identical to a merge without the expert"
    );
    let full = flex::load_model(&flex_dir, &Selection::default())
        .unwrap()
        .model
        .logits(&ids, 1, ids.len())
        .unwrap();
    assert_ne!(
        full.data(),
        la.data(),
        "removing an expert changes the model"
    );

    // A merge-time bias offset belongs to one expert: opt-out stays exact with it, and a very
    // negative one switches its expert off exactly.
    let all: Vec<PathBuf> = ["code", "facts", "math"]
        .iter()
        .map(|d| root.join(format!("experts/main/{d}.safetensors")))
        .collect();
    let off = |s: &str| vec![flex::BiasOffset::parse(s).unwrap()];
    let logits_of = |dir: &Path, sel: &Selection| {
        flex::load_model(dir, sel)
            .unwrap()
            .model
            .logits(&ids, 1, ids.len())
            .unwrap()
    };
    let k = c.top_k.min(4);
    let (shifted, shifted_without) = (root.join("shifted"), root.join("shifted-without"));
    let (_, m) = flex::merge(&public, &all, k, &off("code=-0.5"), &shifted).unwrap();
    assert_eq!(m.experts[1].bias_offset, Some(vec![-0.5; c.layers]));
    let art_bias = flex::ExpertArtifact::load(&all[0]).unwrap().layers[0].bias;
    assert_eq!(
        m.experts[1].bias.as_ref().unwrap()[0],
        art_bias.unwrap() - 0.5
    );
    flex::merge(
        &public,
        &arts,
        k.min(3),
        &off("code=-0.5"),
        &shifted_without,
    )
    .unwrap();
    let ex_facts = Selection {
        exclude: vec!["facts".into()],
        ..Default::default()
    };
    let a = logits_of(&shifted, &ex_facts);
    assert_eq!(
        a.data(),
        logits_of(&shifted_without, &Selection::default()).data()
    );
    assert_ne!(a.data(), la.data(), "the offset changes the model");
    let off_dir = root.join("facts-off");
    flex::merge(&public, &all, k, &off("facts=-1e4"), &off_dir).unwrap();
    assert_eq!(
        logits_of(&off_dir, &Selection::default()).data(),
        lb.data(),
        "an expert whose bias is -1e4 is never used"
    );
    let too_many = format!("code={}", vec!["-1"; c.layers + 1].join(","));
    let err = flex::merge(&public, &all, k, &off(&too_many), &root.join("bad"))
        .err()
        .unwrap();
    assert!(err.0.contains("give 1 or one per layer"), "{err}");
    let err = flex::merge(&public, &arts, k, &off("facts=-1"), &root.join("bad"))
        .err()
        .unwrap();
    assert!(err.0.contains("the experts are [code, math]"), "{err}");

    // Router tuning changes only router rows and records that strict opt-out is gone.
    let tuned = root.join("tuned");
    let tcfg = TrainConfig {
        steps: 3,
        batch: 2,
        seq: 16,
        warmup: 1,
        ..Default::default()
    };
    flex::router_tune(
        &flex_dir,
        &[root.join("data/public"), root.join("data/math")],
        &tcfg,
        &tuned,
        &root.join("tune-run"),
        false,
        true,
        &Device::cpu(),
    )
    .unwrap();
    let tm = flex::Manifest::load(&tuned).unwrap().unwrap();
    assert!(tm.router_tuned && !tm.strict_opt_out);
    let (before, after) = (
        checkpoint::load(&flex_dir).unwrap(),
        checkpoint::load(&tuned).unwrap(),
    );
    let mut changed = 0;
    for p in &before.params.params {
        let q = after.params.value(after.params.id(&p.name).unwrap());
        if p.value.data() != q.data() {
            assert!(
                p.name.contains(".mlp.gate."),
                "router tuning changed {}",
                p.name
            );
            changed += 1;
        }
    }
    assert!(changed > 0, "router tuning changed nothing");

    // An expert trained against another public model is refused.
    let other = root.join("other-public");
    let pm = checkpoint::load(&public).unwrap();
    let mut m2 = Model::new_random(&pm.cfg, 1234).unwrap();
    m2.cfg = pm.cfg.clone();
    flex::write_model(&m2, None, &public, &other).unwrap();
    let err = flex::merge(&other, &arts, 2, &[], &root.join("bad"))
        .err()
        .unwrap();
    assert!(err.0.contains("different public model"), "{err}");
    // Unknown expert names are clear errors.
    let err = flex::load_model(
        &flex_dir,
        &Selection {
            exclude: vec!["poetry".into()],
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(err.0.contains("no expert 'poetry'"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn partial_finetune_trains_only_the_named_weights() {
    let root = tmp("partial-ft");
    let data_dir = small_dataset(&root);
    let data = Dataset::open(&data_dir).unwrap();
    let cfg = Config::olmo2(data.meta.vocab_size, 32, 48, 2, 2, 2);
    let tcfg = TrainConfig {
        steps: 3,
        batch: 2,
        seq: 16,
        warmup: 1,
        save_every: 0,
        ..Default::default()
    };
    let public = root.join("public");
    flexrun::train::pretrain::pretrain(
        &data_dir,
        &cfg,
        &tcfg,
        &public,
        false,
        true,
        &Device::cpu(),
    )
    .unwrap();
    let only = ["mlp".to_string(), "lm_head".to_string()];
    let out = root.join("partial");
    flex::finetune(
        &public,
        &data_dir,
        &tcfg,
        &only,
        &out,
        &root.join("run"),
        false,
        true,
        &Device::cpu(),
    )
    .unwrap();
    let (before, after) = (
        checkpoint::load(&public).unwrap(),
        checkpoint::load(&out).unwrap(),
    );
    let (mut moved, mut kept) = (0, 0);
    for p in &before.params.params {
        let q = &after.params.params[after.params.id(&p.name).unwrap()];
        let same = p.value.data() == q.value.data();
        if p.name.contains("mlp") || p.name.contains("lm_head") {
            assert!(!same, "{} should have been trained", p.name);
            moved += 1;
        } else {
            assert!(same, "{} should be frozen", p.name);
            kept += 1;
        }
    }
    // 2 layers x 3 FFN matrices + lm_head; embeddings, attention and every norm stay.
    assert_eq!((moved, kept), (7, 1 + 2 * 8 + 1));
    std::fs::remove_dir_all(&root).ok();
}

/// Fixed private records (counting windows) for the DP-SGD tests; no public rows.
struct Records {
    n: usize,
    seq: usize,
}

impl flexrun::train::Batches for Records {
    fn train(&self, _: u64, _: u64) -> flexrun::Result<(Vec<u32>, Vec<u32>)> {
        unreachable!("DP training draws records")
    }
    fn valid(&self) -> flexrun::Result<Vec<(Vec<u32>, Vec<u32>)>> {
        Ok(vec![])
    }
    fn dp_records(&self) -> flexrun::Result<usize> {
        Ok(self.n)
    }
    fn dp_batch(&self, step: u64, q: f64) -> flexrun::Result<flexrun::train::dp::DpBatch> {
        let private = flexrun::train::dp::poisson_sample(self.n, q, 5, step)
            .into_iter()
            .map(|i| {
                let w: Vec<u32> = (0..=self.seq as u32)
                    .map(|t| (3 * i as u32 + t) % 40)
                    .collect();
                (w[..self.seq].to_vec(), w[1..].to_vec())
            })
            .collect();
        Ok(flexrun::train::dp::DpBatch {
            private,
            public: (vec![], vec![]),
            public_rows: 0,
        })
    }
}

/// DP-SGD: each record's gradient is clipped (a tiny bound caps the step's gradient norm, where
/// unclipped gradients are O(1)); the noise has the calibrated size (norm sigma C sqrt(P) over
/// the expected rows); the reported epsilon is the accountant's; a stopped and resumed run
/// repeats the uninterrupted one exactly.
#[test]
fn dp_sgd_clips_records_and_calibrates_noise() {
    use flexrun::train::dp::{epsilon, DpConfig};
    let root = tmp("dp");
    let cfg = Config::olmo2(40, 16, 24, 1, 2, 1);
    let data = Records { n: 8, seq: 12 };
    let run = |dir: &Path, noise: f32, clip: f32, stop: Option<u64>, resume: bool| {
        let tcfg = TrainConfig {
            steps: 6,
            batch: 4,
            seq: 12,
            warmup: 1,
            dp: Some(DpConfig {
                noise,
                clip,
                rows: 4,
                delta: 1e-5,
            }),
            ..Default::default()
        };
        let mut m = Model::new_random(&cfg, 1).unwrap();
        let params = m.params.trainable_numel() as f64;
        let mut tr = Trainer::new(&mut m, tcfg, dir).unwrap();
        tr.quiet = true;
        tr.stop_at = stop;
        if resume {
            tr.resume().unwrap();
        }
        (tr.run(&data).unwrap(), params)
    };
    // Clipping: 8 records at most, each at most 1e-4, over 4 expected rows.
    run(&root.join("clip"), 1e-9, 1e-4, None, false);
    for e in log(&root.join("clip")) {
        assert!(
            e.grad_norm <= 2.1e-4,
            "step {}: gradient norm {}",
            e.step,
            e.grad_norm
        );
    }
    // Noise: sigma C sqrt(P) / 4 dominates the clipped signal (at most 2e-4).
    let (s, p) = run(&root.join("noise"), 5.0, 1e-4, None, false);
    let want = 5.0 * 1e-4 * p.sqrt() / 4.0;
    for e in log(&root.join("noise")) {
        let r = e.grad_norm as f64 / want;
        assert!(
            (0.9..1.1).contains(&r),
            "step {}: noise norm {} vs {want}",
            e.step,
            e.grad_norm
        );
    }
    assert_eq!(s.dp_sample_rate, Some(0.5));
    assert_eq!(s.dp_epsilon, Some(epsilon(0.5, 5.0, 6, 1e-5)));
    // Exact resume: the same samples and the same noise.
    run(&root.join("a"), 1.0, 1.0, None, false);
    run(&root.join("b"), 1.0, 1.0, Some(3), false);
    run(&root.join("b"), 1.0, 1.0, None, true);
    assert_eq!(log(&root.join("a")), log(&root.join("b")));
}

/// The owner's DP records are its documents: all of them at rate 1, one window of each in
/// which the targets are the inputs shifted by one, and the batch's public share alongside.
#[test]
fn dp_records_are_the_owners_documents() {
    use flexrun::train::Batches;
    let root = tmp("dp-docs");
    let data_dir = small_dataset(&root);
    let own = Dataset::open(&data_dir).unwrap();
    let public = Dataset::open(&data_dir).unwrap();
    let b = flex::MixedBatches {
        sets: vec![(&own, 0.75), (&public, 0.25)],
        valid_sets: vec![0],
        anchor_sets: vec![1],
        private_set: Some(0),
        batch: 8,
        seq: 16,
        seed: 1,
    };
    let n = own.train.n_docs();
    assert_eq!(b.dp_records().unwrap(), n);
    let batch = b.dp_batch(0, 1.0).unwrap();
    assert_eq!(batch.private.len(), n);
    assert_eq!(batch.public_rows, 2);
    assert_eq!(batch.public.0.len(), 2 * 16);
    for (inp, tgt) in &batch.private {
        assert_eq!((inp.len(), tgt.len()), (16, 16));
        assert_eq!(inp[1..], tgt[..15], "targets are the next tokens");
    }
    // Another step draws other windows of the same documents, the same step the same ones.
    assert_eq!(b.dp_batch(0, 1.0).unwrap().private, batch.private);
    assert_ne!(b.dp_batch(1, 1.0).unwrap().private, batch.private);
}
