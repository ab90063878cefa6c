//! `flexrun demo`, the main job: on the built-in FlexMix corpus, pretrain a public model, train
//! each closed-domain expert independently, merge them, and evaluate the public model, each dense
//! expert, the FFN-only bound of each domain, the soup, BTM, BTX, prompt routing, FlexOlmo with
//! all experts and with each expert opted out; then analyse routing, check the FlexOlmo
//! acceptance criteria and report each merged model's gap to the FFN-only bound. Optional ablations: no bias, random router
//! init, and a top-k sweep.

use crate::backend::Device;
use crate::data::shards::{self, Dataset};
use crate::data::{synth, tokenizer, Tokenizer};
use crate::ensure;
use crate::error::{Context, Result};
use crate::eval::extract::{self, ExtractConfig, Extraction};
use crate::eval::{self, routing, DomainEval, Evaluated, Row};
use crate::flex::{finetune, load_model, RouterInit, Selection};
use crate::fsutil::write_bytes_atomic;
use crate::model::runner::Placed;
use crate::model::{checkpoint, Config, Model};
use crate::train::{pretrain, RunDir, TrainConfig};

mod baselines;
mod experts;
use experts::{experts_and_merge, write_loss_curves};
mod report;
pub use report::{acceptance, render};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct DemoConfig {
    pub seed: u64,
    pub docs_per_domain: usize,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub seq: usize,
    pub batch: usize,
    pub public_steps: u64,
    pub expert_steps: u64,
    pub dense_steps: u64,
    pub lr: f32,
    /// Peak learning rate of expert training (only FFN, router row and bias are trained).
    pub expert_lr: f32,
    /// Peak learning rate of the dense-expert baselines (every weight is trained).
    pub dense_lr: f32,
    pub top_k: usize,
    /// Initial expert bias (see `train-expert --bias-init`).
    pub bias_init: f32,
    /// Fraction of each expert's training rows drawn from public data.
    pub public_mix: f64,
    /// Weight of the public anchor on those public rows. It sets the trade-off between the
    /// merged model's loss on each closed domain and how little opting an expert out moves the
    /// other domains: 10 keeps every other domain within 2% (1 gives lower losses and moves
    /// them by up to 4%; studies/NOTES.md, "Choosing the anchor weight", has the whole range).
    pub public_anchor: f32,
    /// Its per-layer weights; None: 4 on the first and last layer, 1 on the others (the
    /// first layer's router sees little more than the token, so it cannot keep its expert off
    /// other domains' text by routing alone; the last layer's is the one most prone to fire on
    /// unfamiliar text).
    pub public_anchor_layers: Option<Vec<f32>>,
    /// Weight of the router's own-text loss in expert training (`train-expert --router-own`).
    pub router_own: f32,
    /// Weight of the router's public-text loss (`train-expert --router-public`).
    pub router_public: f32,
    /// Weight of the expert loudness loss (`train-expert --expert-loudness`).
    pub expert_loudness: f32,
    /// BPE-dropout of the public training data (`data prepare --bpe-dropout`): without it the
    /// public model never predicts the tokens its text only holds inside longer ones (`=` of
    /// `+=`, pieces of invented names), and no FFN-only expert can teach its frozen output
    /// layer to (studies/NOTES.md, "Tokens the public model never predicts").
    pub bpe_dropout: f64,
    pub embed_docs: usize,
    pub eval_tokens: usize,
    pub tasks: usize,
    /// The data extraction check: training documents per closed domain (0: skipped) and the
    /// longest continuation compared (the check's other settings are the paper's).
    pub extract_docs: usize,
    pub extract_max_new: usize,
    pub btm_temperature: f32,
    pub btm_top_k: usize,
    /// BTX baseline: router-training steps on public data.
    pub btx_steps: u64,
    /// Prompt-routing baseline: labelled queries per domain, and the tokens of each query.
    pub route_queries: usize,
    pub route_prompt: usize,
    /// A sentence encoder (sentence-transformers directory): with `ablations`, also the
    /// experts whose router rows come from its embeddings (the paper's router init).
    pub encoder: Option<PathBuf>,
    pub ablations: bool,
    /// Use this corpus (one sub-directory of .txt/.jsonl files per domain, `public` among them)
    /// instead of the built-in FlexMix; tasks are then not evaluated.
    pub corpus: Option<PathBuf>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seed: 0,
            docs_per_domain: synth::SynthConfig::default().docs_per_domain,
            vocab: 512,
            hidden: 128,
            layers: 4,
            heads: 4,
            intermediate: 352,
            seq: 128,
            batch: 16,
            public_steps: 800,
            expert_steps: 400,
            dense_steps: 400,
            lr: 3e-3,
            expert_lr: 5e-3,
            dense_lr: 2e-3,
            top_k: 4,
            bias_init: -2.0,
            public_mix: 0.25,
            public_anchor: 10.0,
            public_anchor_layers: None,
            router_own: 0.3,
            router_public: 0.0,
            expert_loudness: 0.0,
            bpe_dropout: 0.01,
            embed_docs: 64,
            eval_tokens: 8192,
            tasks: 64,
            extract_docs: 200,
            extract_max_new: 64,
            btm_temperature: 1.0,
            btm_top_k: 2,
            btx_steps: 200,
            route_queries: 32,
            route_prompt: 32,
            encoder: None,
            ablations: false,
            corpus: None,
        }
    }
}

impl DemoConfig {
    /// The per-layer public-anchor weights expert training uses.
    pub fn anchor_layers(&self) -> Vec<f32> {
        match &self.public_anchor_layers {
            Some(w) => w.clone(),
            None => (0..self.layers)
                .map(|l| {
                    if l == 0 || l + 1 == self.layers {
                        4.0
                    } else {
                        1.0
                    }
                })
                .collect(),
        }
    }

    /// Settings that cannot train or measure anything are errors before any work is done (the
    /// model's shape is [`Config::validate`]'s, the top-k is checked once the domains are known).
    pub fn check(&self) -> Result<()> {
        for (what, n) in [
            ("--public-steps", self.public_steps),
            ("--expert-steps", self.expert_steps),
            ("--dense-steps", self.dense_steps),
            ("--embed-docs", self.embed_docs as u64),
            ("--top-k", self.top_k as u64),
            ("--btm-top-k", self.btm_top_k as u64),
            ("--btx-steps", self.btx_steps),
            ("--route-queries", self.route_queries as u64),
            ("--route-prompt", self.route_prompt as u64),
        ] {
            ensure!(n > 0, "{what} must be at least 1");
        }
        for (what, lr) in [
            ("--lr", self.lr),
            ("--expert-lr", self.expert_lr),
            ("--dense-lr", self.dense_lr),
            ("--btm-temperature", self.btm_temperature),
        ] {
            ensure!(
                lr.is_finite() && lr > 0.0,
                "{what} must be a finite number > 0, got {lr}"
            );
        }
        let layer_w = self.anchor_layers();
        crate::flex::check_expert_settings(
            self.public_mix,
            [
                self.public_anchor,
                self.router_own,
                self.router_public,
                self.expert_loudness,
            ],
            &layer_w,
            Some(self.bias_init),
        )?;
        ensure!(
            layer_w.len() == self.layers,
            "{} public-anchor layer weights for {} layers",
            layer_w.len(),
            self.layers
        );
        ensure!(
            self.eval_tokens >= self.seq,
            "--eval-tokens ({}) must hold at least one window of --seq ({}) tokens",
            self.eval_tokens,
            self.seq
        );
        Ok(())
    }

    /// A configuration small enough for an end-to-end test in seconds.
    pub fn quick() -> Self {
        DemoConfig {
            docs_per_domain: 60,
            vocab: 300,
            hidden: 32,
            layers: 2,
            heads: 2,
            intermediate: 64,
            seq: 32,
            batch: 4,
            public_steps: 12,
            expert_steps: 6,
            dense_steps: 6,
            embed_docs: 4,
            eval_tokens: 256,
            tasks: 4,
            extract_docs: 4,
            extract_max_new: 16,
            btx_steps: 6,
            route_queries: 6,
            route_prompt: 8,
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub config: DemoConfig,
    /// What evaluated the models: "cpu (f32)" or the GPU's name (bf16, flexrun's kernels).
    pub eval_device: String,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
    /// Each merged model's gap to the FFN-only bound, per closed domain.
    pub bound: Vec<BoundGap>,
    pub ablations: Vec<Row>,
    pub routing: Vec<routing::RoutingStats>,
    /// The data extraction check per closed domain: public, dense expert, FlexOlmo, and
    /// FlexOlmo without that domain's expert.
    pub extraction: Vec<ExtractionRow>,
    /// The prompt-routing baseline's router: per domain, the fraction of held-out windows it sent
    /// to that domain's own model (the public model for public text).
    pub prompt_routing: Vec<(String, f64)>,
    pub seconds: f64,
}

/// One model's held-out loss on each closed domain relative to the FFN-only bound there (the
/// public model with only its FFNs fine-tuned on the domain): `loss / bound - 1`.
#[derive(Clone, Debug, Serialize)]
pub struct BoundGap {
    pub model: String,
    /// (domain, relative gap); positive: behind the bound.
    pub gaps: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
pub struct ExtractionRow {
    pub domain: String,
    pub public: Extraction,
    /// The domain's dense expert.
    pub dense: Extraction,
    pub flexolmo: Extraction,
    /// FlexOlmo with the domain's expert opted out.
    pub flexolmo_without: Extraction,
}

/// Announce a phase of the demo, with the seconds since the first phase began.
pub(crate) fn step(msg: &str, quiet: bool) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    if !quiet {
        crate::note!("== [{t:4.0} s] {msg}");
    }
}

pub(crate) fn train_cfg(c: &DemoConfig, steps: u64, lr: f32, seed: u64) -> TrainConfig {
    TrainConfig {
        steps,
        batch: c.batch,
        seq: c.seq,
        lr,
        warmup: (steps / 10).max(1),
        seed,
        save_every: 0,
        eval_every: 0,
        ..Default::default()
    }
}

pub(crate) struct Work {
    root: PathBuf,
}

impl Work {
    pub(crate) fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// The domains of a corpus directory: its sub-directories, `public` first.
fn corpus_domains(corpus: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(corpus)
        .with_context(|| format!("reading corpus {}", corpus.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    ensure!(
        names.iter().any(|n| n == "public"),
        "{} has no public/ domain",
        corpus.display()
    );
    ensure!(
        names.len() >= 2,
        "{} needs at least one closed domain besides public/",
        corpus.display()
    );
    names.retain(|n| n != "public");
    names.insert(0, "public".into());
    Ok(names)
}

/// The public model's configuration for the demo's shape and a vocabulary size.
fn model_config(c: &DemoConfig, vocab: usize) -> Config {
    let mut cfg = Config::olmo2(vocab, c.hidden, c.intermediate, c.layers, c.heads, c.heads);
    cfg.max_position_embeddings = c.seq.max(256);
    cfg
}

/// Run the whole pipeline in `work_dir`; returns the report and writes results.md, results.json
/// and routing.svg there.
pub fn run(c: &DemoConfig, work_dir: &Path, device: &Device, quiet: bool) -> Result<DemoReport> {
    let t0 = Instant::now();
    // A bad setting or model shape is an error before any work is done.
    c.check()?;
    if let Some(dir) = &c.encoder {
        ensure!(
            c.ablations,
            "--encoder adds the encoder router-init ablation: use it with --ablations"
        );
        crate::model::encoder::Encoder::load(dir)?;
    }
    model_config(c, c.vocab.max(1)).validate()?;
    // The kernels need widths that are multiples of 8 (16-byte rows): an automatic choice of
    // the GPU falls back to the CPU for a demo shape they cannot run.
    let cpu = Device::cpu();
    let fits = c.hidden.is_multiple_of(8) && c.intermediate.is_multiple_of(8);
    let device = match (device.gpu(), fits) {
        (Some(_), false) if device.is_auto() => {
            crate::note!("note: the demo's widths are not multiples of 8, which the GPU kernels need; running on the CPU");
            &cpu
        }
        (Some(_), false) => crate::bail!(
            "--device cuda needs --hidden and --intermediate that are multiples of 8 (got {} and {})",
            c.hidden,
            c.intermediate
        ),
        _ => device,
    };
    let gpu = device.gpu();
    let domains = match &c.corpus {
        Some(dir) => corpus_domains(dir)?.len(),
        None => synth::DOMAINS.len(),
    };
    ensure!(
        c.top_k <= domains,
        "--top-k {} must be at most the number of experts ({domains}: public and {} closed domains)",
        c.top_k,
        domains - 1
    );
    let w = Work {
        root: work_dir.to_path_buf(),
    };
    // Only into a new or empty directory, or over an earlier demo.
    crate::fsutil::check_out(
        work_dir,
        &crate::fsutil::DirKind {
            what: "an earlier demo",
            markers: &[
                "results.json",
                "corpus",
                "data",
                "models",
                "runs",
                "tokenizer.json",
            ],
            owns: |_| false,
        },
    )?;
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let corpus = match &c.corpus {
        Some(dir) => dir.clone(),
        None => {
            step("write the built-in FlexMix corpus", quiet);
            let corpus = w.p("corpus");
            let scfg = synth::SynthConfig {
                seed: c.seed,
                docs_per_domain: c.docs_per_domain,
                ..Default::default()
            };
            synth::write_corpus(&corpus, &scfg)?;
            corpus
        }
    };
    let all = corpus_domains(&corpus)?;
    let closed: Vec<String> = all[1..].to_vec();
    for d in &closed {
        crate::flex::artifact::check_expert_name(d)
            .with_context(|| format!("domain directory {}", corpus.join(d).display()))?;
    }

    let with_tasks = c.corpus.is_none();
    // The tokenizer belongs to the public model: it is trained on public data only, since the
    // closed domains never leave their owners. Their text is tokenized with it as it is.
    step("train the byte-level BPE tokenizer on public data", quiet);
    let tok_path = w.p("tokenizer.json");
    tokenizer::train_bpe(&[corpus.join("public")], c.vocab, &tok_path)?;
    let tok = Tokenizer::load(&tok_path)?;
    let mut sets = Vec::new();
    for d in &all {
        let dir = w.p(&format!("data/{d}"));
        // BPE-dropout on public training text only: the public model then learns every token
        // of its vocabulary, including those its text only shows inside longer ones.
        let dropout = if d == &all[0] { c.bpe_dropout } else { 0.0 };
        shards::prepare(&[corpus.join(d)], &tok, &dir, 0.05, c.seed, dropout)?;
        sets.push((d.to_string(), Dataset::open(&dir)?));
    }
    step("pretrain the public model on public data", quiet);
    let cfg = model_config(c, tok.vocab_size());
    RunDir::clear(&w.p("models/public"))?;
    pretrain::pretrain(
        &w.p("data/public"),
        &cfg,
        &train_cfg(c, c.public_steps, c.lr, c.seed),
        &w.p("models/public"),
        false,
        quiet,
        device,
    )?;
    let tune = |name: &str, what: &str, lr: f32, only: &[String]| -> Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        for (i, d) in closed.iter().enumerate() {
            step(&format!("{what} on '{d}'"), quiet);
            let out = w.p(&format!("models/{name}-{d}"));
            RunDir::clear(&w.p(&format!("runs/{name}-{d}")))?;
            finetune(
                &w.p("models/public"),
                &w.p(&format!("data/{d}")),
                &train_cfg(c, c.dense_steps, lr, c.seed + 20 + i as u64),
                only,
                &out,
                &w.p(&format!("runs/{name}-{d}")),
                false,
                quiet,
                device,
            )?;
            dirs.push(out);
        }
        Ok(dirs)
    };
    let dense_dirs: Vec<(String, PathBuf)> = closed
        .iter()
        .cloned()
        .zip(tune(
            "dense",
            "baseline: fine-tune a dense expert (all weights)",
            c.dense_lr,
            &[],
        )?)
        .collect();
    // The FFN-only bound: the public model with only its FFNs fine-tuned on the domain (no MoE,
    // no public rows, no anchor), on the dense experts' schedule and seeds at the experts'
    // learning rate. An expert trains FFN weights only, so this is the closest any expert comes
    // to a dense expert; the report gives each merged model's gap to it.
    let bound_dirs = tune(
        "ffn",
        "bound: fine-tune only the FFNs of the public model",
        c.expert_lr,
        &["mlp".to_string()],
    )?;
    let btx_dir = baselines::train_btx(c, &w, &dense_dirs, quiet, device)?;
    let flex_dir = experts_and_merge(
        c,
        &w,
        &closed,
        "main",
        RouterInit::Domain,
        Some(c.bias_init),
        quiet,
        device,
    )?;

    write_loss_curves(&w, &closed)?;

    step("evaluate", quiet);
    let domains: Vec<DomainEval> = sets
        .iter()
        .map(|(d, ds)| {
            let tasks = if with_tasks {
                synth::tasks(d, c.seed + 1000, c.tasks)?
            } else {
                vec![]
            };
            DomainEval::new(d, ds, c.seq, c.eval_tokens, tasks)
        })
        .collect::<Result<_>>()?;
    let public = checkpoint::load(&w.p("models/public"))?;
    let dense: Vec<(String, Model)> = dense_dirs
        .iter()
        .map(|(d, p)| Ok((d.clone(), checkpoint::load(p)?)))
        .collect::<Result<_>>()?;
    let soup = crate::flex::soup(&dense.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>())?;
    let flex = load_model(&flex_dir, &Selection::default())?;
    let mut rows = Vec::new();
    let eval_device = match gpu {
        Some(d) => format!("{} (bf16)", d.name()?),
        None => "cpu (f32)".into(),
    };
    let ev = |name: &str, e: &Evaluated<'_>| {
        eval::evaluate(name, e, &domains, c.seq, with_tasks.then_some(&tok))
    };
    // One model, on the GPU when there is one.
    let ev_model =
        |name: &str, m: &Model| ev(name, &Evaluated::One(Placed::new(m, device)?.runner()));
    // Each model goes to the device once; its row, BTM and the extraction check share it.
    let public_g = Placed::new(&public, device)?;
    rows.push(ev("public", &Evaluated::One(public_g.runner()))?);
    let dense_g: Vec<Placed> = dense
        .iter()
        .map(|(_, m)| Placed::new(m, device))
        .collect::<Result<_>>()?;
    for ((d, _), g) in dense.iter().zip(&dense_g) {
        rows.push(ev(&format!("dense {d}"), &Evaluated::One(g.runner()))?);
    }
    for (d, p) in closed.iter().zip(&bound_dirs) {
        rows.push(ev_model(&format!("FFN-only {d}"), &checkpoint::load(p)?)?);
    }
    rows.push(ev_model("soup", &soup)?);
    let btm = Evaluated::Btm {
        models: dense_g.iter().map(|g| Evaluated::One(g.runner())).collect(),
        temperature: c.btm_temperature,
        top_k: c.btm_top_k,
    };
    rows.push(ev("BTM", &btm)?);
    let btx = load_model(&btx_dir, &Selection::default())?;
    rows.push(ev_model("BTX", &btx.model)?);
    let router = baselines::prompt_router(c, public_g.runner(), &sets)?;
    let prompt_routing = baselines::routing_accuracy(&router, public_g.runner(), &domains, c.seq)?;
    let routed_models = std::iter::once(&public_g)
        .chain(dense_g.iter())
        .map(|g| Evaluated::One(g.runner()))
        .collect();
    rows.push(ev(
        "prompt routing",
        &Evaluated::Routed {
            router: &router,
            embed: crate::eval::routed::QueryEmbedder::Model(public_g.runner()),
            models: routed_models,
        },
    )?);
    let flex_g = Placed::new(&flex.model, device)?;
    rows.push(ev(
        &format!("FlexOlmo (top-{})", flex.model.cfg.top_k()),
        &Evaluated::One(flex_g.runner()),
    )?);
    let without_models: Vec<Model> = closed
        .iter()
        .map(|d| {
            let sel = Selection {
                exclude: vec![d.clone()],
                ..Default::default()
            };
            Ok(load_model(&flex_dir, &sel)?.model)
        })
        .collect::<Result<_>>()?;
    let without: Vec<Placed> = without_models
        .iter()
        .map(|m| Placed::new(m, device))
        .collect::<Result<_>>()?;
    for (d, g) in closed.iter().zip(&without) {
        rows.push(ev(
            &format!("FlexOlmo without {d}"),
            &Evaluated::One(g.runner()),
        )?);
    }

    let mut extraction = Vec::new();
    if c.extract_docs > 0 {
        step("data extraction check", quiet);
        let xc = ExtractConfig {
            docs: c.extract_docs,
            max_continuation: c.extract_max_new,
            min_continuation: c.extract_max_new.min(16),
            seed: c.seed,
            ..Default::default()
        };
        let extract =
            |e: Evaluated<'_>, ds: &Dataset| extract::extraction(&e, &ds.train, &xc, None);
        for ((d, dg), wg) in closed.iter().zip(&dense_g).zip(&without) {
            let ds = &sets
                .iter()
                .find(|(n, _)| n == d)
                .expect("every domain is prepared")
                .1;
            extraction.push(ExtractionRow {
                domain: d.clone(),
                public: extract(Evaluated::One(public_g.runner()), ds)?,
                dense: extract(Evaluated::One(dg.runner()), ds)?,
                flexolmo: extract(Evaluated::One(flex_g.runner()), ds)?,
                flexolmo_without: extract(Evaluated::One(wg.runner()), ds)?,
            });
        }
    }

    step("routing analysis", quiet);
    let routing_stats: Vec<routing::RoutingStats> = sets
        .iter()
        .map(|(d, ds)| {
            let windows: Vec<Vec<u32>> =
                shards::valid_batches(&ds.valid, 1, c.seq, c.eval_tokens.min(4096))?
                    .into_iter()
                    .map(|(i, _)| i)
                    .collect();
            routing::analyze(flex_g.runner(), d, &windows)
        })
        .collect::<Result<_>>()?;
    let svg = routing::heatmap_svg(
        &routing_stats,
        &flex.expert_names,
        "FlexOlmo routing: mean router probability of each expert",
    );
    write_bytes_atomic(&w.p("routing.svg"), svg.as_bytes())?;

    let mut ablations = Vec::new();
    if c.ablations {
        for k in 1..=flex.model.cfg.experts() {
            let m = load_model(
                &flex_dir,
                &Selection {
                    top_k: Some(k),
                    ..Default::default()
                },
            )?;
            ablations.push(ev_model(&format!("FlexOlmo top-{k}"), &m.model)?);
        }
        let nb = experts_and_merge(
            c,
            &w,
            &closed,
            "nobias",
            RouterInit::Domain,
            None,
            quiet,
            device,
        )?;
        ablations.push(ev_model(
            "FlexOlmo, no bias",
            &load_model(&nb, &Selection::default())?.model,
        )?);
        let rnd = experts_and_merge(
            c,
            &w,
            &closed,
            "random",
            RouterInit::Random,
            Some(c.bias_init),
            quiet,
            device,
        )?;
        ablations.push(ev_model(
            "FlexOlmo, random router init",
            &load_model(&rnd, &Selection::default())?.model,
        )?);
        if c.encoder.is_some() {
            let enc = experts_and_merge(
                c,
                &w,
                &closed,
                "encoder",
                RouterInit::Encoder,
                Some(c.bias_init),
                quiet,
                device,
            )?;
            ablations.push(ev_model(
                "FlexOlmo, encoder router init",
                &load_model(&enc, &Selection::default())?.model,
            )?);
        }
    }

    let closed_refs: Vec<&str> = closed.iter().map(|s| s.as_str()).collect();
    let checks = acceptance(&rows, &closed_refs);
    let bound = report::bound_gaps(&rows, &ablations, &closed_refs);
    let report = DemoReport {
        config: c.clone(),
        eval_device,
        rows,
        checks,
        bound,
        ablations,
        routing: routing_stats,
        extraction,
        prompt_routing,
        seconds: t0.elapsed().as_secs_f64(),
    };
    write_bytes_atomic(
        &w.p("results.md"),
        render(&report, &flex.expert_names).as_bytes(),
    )?;
    write_bytes_atomic(
        &w.p("results.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::DomainScore;

    fn row(model: &str, code: (f64, f64), math: (f64, f64)) -> Row {
        let score = |domain: &str, (loss, acc): (f64, f64)| DomainScore {
            domain: domain.into(),
            loss,
            ppl: loss.exp(),
            accuracy: Some(acc),
        };
        Row {
            model: model.into(),
            scores: vec![score("code", code), score("math", math)],
            avg_loss: (code.0 + math.0) / 2.0,
            avg_accuracy: Some((code.1 + math.1) / 2.0),
        }
    }

    /// The opt-out check: the expert's own loss rises by more than 5%, every other domain moves
    /// by less than 2%, and accuracy moves back toward the public model's, from either side.
    #[test]
    fn opt_out_check_follows_the_criterion() {
        let check = |flex_code: (f64, f64), opt: Row| {
            let rows = vec![
                row("public", (5.0, 0.05), (2.0, 0.0)),
                row("soup", (2.0, 0.0), (1.0, 0.0)),
                row("BTM", (1.0, 0.0), (1.0, 0.0)),
                row("FlexOlmo", flex_code, (0.5, 0.3)),
                opt,
            ];
            let checks = acceptance(&rows, &["code", "math"]);
            let c = checks.iter().find(|c| c.name.contains("'code'")).unwrap();
            c.passed
        };
        let without =
            |code: (f64, f64), math_loss: f64| row("FlexOlmo without code", code, (math_loss, 0.3));
        assert!(check((0.3, 0.9), without((5.0, 0.05), 0.505)));
        // Accuracy below the public model's rises back to it.
        assert!(check((0.3, 0.0), without((5.0, 0.05), 0.505)));
        // ... but not past it, nor away from it.
        assert!(!check((0.3, 0.0), without((5.0, 0.2), 0.505)));
        assert!(!check((0.3, 0.5), without((5.0, 0.9), 0.505)));
        // Another domain moving by 2% or more, or the own loss barely rising, fails.
        assert!(!check((0.3, 0.9), without((5.0, 0.05), 0.511)));
        assert!(!check((0.3, 0.9), without((0.31, 0.05), 0.505)));
    }
}
