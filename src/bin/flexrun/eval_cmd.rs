//! Evaluation commands: `eval` (held-out loss and task accuracy, BTM included),
//! `analyze-routing`, `compare` and `extract` (the data extraction check).

use crate::opts::{parse_domains, DeviceOpts, SelectOpts};
use clap::Args;
use flexrun::data::{self, shards, synth, Tokenizer};
use flexrun::ensure;
use flexrun::error::Result;
use flexrun::eval::{self, routing, DomainEval, Evaluated};
use flexrun::model::checkpoint;
use flexrun::model::runner::Placed;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// Model to evaluate (omit with --btm or --route).
    #[arg(long, required_unless_present_any = ["btm", "route"])]
    pub model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub experts: Vec<String>,
    /// Experts per token (default: the checkpoint's).
    #[arg(long)]
    pub expert_top_k: Option<usize>,
    /// Where every model is evaluated (every member of a --btm ensemble too).
    #[command(flatten)]
    pub device: DeviceOpts,
    /// BTM ensemble of these dense models instead of --model.
    #[arg(long, value_delimiter = ',', conflicts_with = "model")]
    pub btm: Vec<PathBuf>,
    /// BTM: the ensemble weights are softmax(-context NLL / T) (T > 0).
    #[arg(long, default_value_t = 1.0)]
    pub btm_temperature: f32,
    /// BTM: mix the k members with the lowest context NLL at each position (k >= 1).
    #[arg(long, default_value_t = 2)]
    pub btm_top_k: usize,
    /// Prompt-routing baseline instead of --model: one model per domain as NAME=MODEL_DIR (one
    /// named `public`, whose hidden states embed the queries). A classifier trained on
    /// --route-queries documents of each named --data domain's training split sends each window
    /// (by its first --route-prompt tokens) or task prompt to one of them.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["model", "btm"])]
    pub route: Vec<String>,
    /// Prompt routing: embed the queries with this sentence encoder (a sentence-transformers
    /// directory, as for `train-expert --router-init encoder`) instead of the public model.
    #[arg(long)]
    pub route_encoder: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub route_queries: usize,
    #[arg(long, default_value_t = 32)]
    pub route_prompt: usize,
    /// Domains as NAME=PREPARED_DIR; built-in domain names also get exact-match tasks.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Tasks per built-in domain (0: none).
    #[arg(long, default_value_t = 64)]
    pub tasks: usize,
    /// Seed of the built-in tasks.
    #[arg(long, default_value_t = 1000)]
    pub task_seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct RoutingArgs {
    #[command(flatten)]
    pub sel: SelectOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    /// Domains as NAME=PREPARED_DIR.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Heatmap output (.svg).
    #[arg(long, default_value = "routing.svg")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct CompareArgs {
    /// The model studied (with --exclude/--experts, as for eval).
    #[command(flatten)]
    pub sel: SelectOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    /// The model it is compared with.
    #[arg(long)]
    pub reference: PathBuf,
    /// The prepared domain whose validation text is scored.
    #[arg(long)]
    pub data: PathBuf,
    /// Prepared public data: its training split's target counts group the gap.
    #[arg(long)]
    pub public: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Target tokens listed (largest share of the gap first).
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub sel: SelectOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    /// The prepared domain whose training documents are checked.
    #[arg(long)]
    pub data: PathBuf,
    /// Documents to check (the paper: 10000).
    #[arg(long, default_value_t = 1000)]
    pub docs: usize,
    /// Prefix length in tokens, at a random offset of each document.
    #[arg(long, default_value_t = 32)]
    pub prefix: usize,
    /// Longest true continuation compared (the samples are as long as it).
    #[arg(long, default_value_t = 256)]
    pub max_new: usize,
    /// Shortest true continuation: shorter documents are skipped.
    #[arg(long, default_value_t = 16)]
    pub min_new: usize,
    /// Samples per document.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Normalised Levenshtein similarity (on tokens) at which a sample counts as the document.
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let domains = parse_domains(&a.data)?;
    if let Some(j) = &a.json {
        let mut inputs: Vec<&std::path::Path> = domains.iter().map(|(_, p)| p.as_path()).collect();
        inputs.extend(a.model.as_deref());
        inputs.extend(a.btm.iter().map(PathBuf::as_path));
        let routes = parse_domains(&a.route)?;
        inputs.extend(routes.iter().map(|(_, p)| p.as_path()));
        flexrun::fsutil::check_output_file(j, "--json", &inputs)?;
    }
    flexrun::limits::check_dim(
        "--tasks",
        a.tasks,
        flexrun::limits::MAX_COUNT,
        "far beyond any evaluation",
    )?;
    let routes = parse_domains(&a.route)?;
    ensure!(
        a.route_encoder.is_none() || !routes.is_empty(),
        "--route-encoder embeds the queries of prompt routing: it goes with --route"
    );
    if !routes.is_empty() {
        ensure!(
            routes.iter().any(|(n, _)| n == "public"),
            "--route needs a model named public (its hidden states embed the queries)"
        );
        for (n, _) in &routes {
            ensure!(
                domains.iter().any(|(d, _)| d == n),
                "--route {n}=...: no --data domain named {n} to take its labelled queries from"
            );
        }
        ensure!(
            a.route_queries >= 1 && a.route_prompt >= 1,
            "--route-queries and --route-prompt must be at least 1"
        );
    }
    let device = a.device.open()?;
    // Every model is loaded, then placed on the device once; `what` names what is evaluated.
    let (name, hosts, dirs): (String, Vec<flexrun::model::Model>, Vec<PathBuf>) =
        if !routes.is_empty() {
            let ms = routes
                .iter()
                .map(|(_, m)| checkpoint::load_with(m, true))
                .collect::<Result<_>>()?;
            (
                "prompt routing".to_string(),
                ms,
                routes.iter().map(|(_, p)| p.clone()).collect(),
            )
        } else if a.btm.is_empty() {
            let sel = SelectOpts {
                model: a
                    .model
                    .clone()
                    .expect("clap requires --model without --btm"),
                exclude: a.exclude.clone(),
                experts: a.experts.clone(),
                expert_top_k: a.expert_top_k,
            };
            let loaded = sel.load()?;
            (
                sel.model.display().to_string(),
                vec![loaded.model],
                vec![sel.model],
            )
        } else {
            let ms = a
                .btm
                .iter()
                .map(|m| checkpoint::load_with(m, true))
                .collect::<Result<_>>()?;
            ("BTM".to_string(), ms, a.btm.clone())
        };
    let placed: Vec<Placed> = hosts
        .iter()
        .map(|m| Placed::new(m, &device))
        .collect::<Result<_>>()?;
    // The sentence encoder of --route-encoder, and the public model's tokenizer that turns the
    // queries back into its input text.
    let encoder = match &a.route_encoder {
        Some(dir) => {
            let public_dir = &routes
                .iter()
                .find(|(n, _)| n == "public")
                .expect("checked above")
                .1;
            let tok = Tokenizer::load(&flexrun::fsutil::confined(
                public_dir,
                "tokenizer.json",
                "tokenizer",
            )?)?;
            Some((flexrun::model::encoder::Encoder::load(dir)?, tok))
        }
        None => None,
    };
    let embedder = |i: usize| match &encoder {
        Some((enc, tok)) => eval::routed::QueryEmbedder::Encoder { enc, tok },
        None => eval::routed::QueryEmbedder::Model(placed[i].runner()),
    };
    let router = if routes.is_empty() {
        None
    } else {
        let embed = routes.iter().position(|(n, _)| n == "public").unwrap_or(0);
        let mut examples = Vec::new();
        for (k, (n, dir)) in routes.iter().enumerate() {
            let (_, p) = domains.iter().find(|(d, _)| d == n).expect("checked above");
            let ds = data::Dataset::open_for(p, dir, hosts[k].cfg.vocab_size)?;
            for doc in shards::sample_docs(&ds.train, a.route_queries, a.route_prompt, a.task_seed)
            {
                if !doc.is_empty() {
                    examples.push((doc, k));
                }
            }
        }
        let classes = routes.iter().map(|(n, _)| n.clone()).collect();
        let r =
            eval::routed::PromptRouter::train(embedder(embed), &examples, classes, a.route_prompt)?;
        Some((r, embed))
    };
    let e = match &router {
        Some((r, embed)) => Evaluated::Routed {
            router: r,
            embed: embedder(*embed),
            models: placed.iter().map(|p| Evaluated::One(p.runner())).collect(),
        },
        None if a.btm.is_empty() => Evaluated::One(placed[0].runner()),
        None => Evaluated::Btm {
            models: placed.iter().map(|p| Evaluated::One(p.runner())).collect(),
            temperature: a.btm_temperature,
            top_k: a.btm_top_k,
        },
    };
    // Each model must read the data with its own tokenizer; the first one's scores the tasks.
    let models: Vec<(PathBuf, usize)> = dirs
        .iter()
        .zip(&hosts)
        .map(|(d, m)| (d.clone(), m.cfg.vocab_size))
        .collect();
    let tok_path = flexrun::fsutil::confined(&models[0].0, "tokenizer.json", "tokenizer")?;
    let tok = if tok_path.exists() && a.tasks > 0 {
        Some(Tokenizer::load(&tok_path)?)
    } else {
        None
    };
    let evals: Vec<DomainEval> = domains
        .iter()
        .map(|(n, p)| {
            let ds = data::Dataset::open(p)?;
            for (m, vocab) in &models {
                ds.check_for(p, m, *vocab)?;
            }
            let tasks = if synth::is_known_domain(n) && tok.is_some() {
                synth::tasks(n, a.task_seed, a.tasks)?
            } else {
                vec![]
            };
            DomainEval::new(n, &ds, a.seq, a.tokens, tasks)
        })
        .collect::<Result<_>>()?;
    let row = eval::evaluate(&name, &e, &evals, a.seq, tok.as_ref())?;
    out!("{}", eval::markdown(std::slice::from_ref(&row)));
    if let Some(j) = a.json {
        flexrun::fsutil::write_bytes_atomic(&j, serde_json::to_string_pretty(&row)?.as_bytes())?;
    }
    Ok(())
}

pub fn analyze_routing(a: RoutingArgs) -> Result<()> {
    let RoutingArgs {
        sel,
        data,
        seq,
        tokens,
        out,
        ..
    } = a;
    let domains = parse_domains(&data)?;
    let mut inputs: Vec<&std::path::Path> = domains.iter().map(|(_, p)| p.as_path()).collect();
    inputs.push(&sel.model);
    flexrun::fsutil::check_output_file(&out, "--out", &inputs)?;
    let device = a.device.open()?;
    let loaded = sel.load()?;
    let placed = Placed::new(&loaded.model, &device)?;
    let mut stats = Vec::new();
    for (n, p) in parse_domains(&data)? {
        let ds = data::Dataset::open_for(&p, &sel.model, loaded.model.cfg.vocab_size)?;
        let windows: Vec<Vec<u32>> = shards::eval_batches(&ds.valid, 1, seq, tokens, &n)?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        stats.push(routing::analyze(placed.runner(), &n, &windows)?);
    }
    out!("{}", routing::markdown(&stats, &loaded.expert_names));
    let svg = routing::heatmap_svg(
        &stats,
        &loaded.expert_names,
        &format!(
            "Mean router probability per expert, {}",
            sel.model.display()
        ),
    );
    flexrun::fsutil::write_bytes_atomic(&out, svg.as_bytes())?;
    outln!("heatmap written to {}", out.display());
    Ok(())
}

pub fn compare(a: CompareArgs) -> Result<()> {
    if let Some(j) = &a.json {
        let mut inputs = vec![
            a.sel.model.as_path(),
            a.reference.as_path(),
            a.data.as_path(),
        ];
        inputs.extend(a.public.as_deref());
        flexrun::fsutil::check_output_file(j, "--json", &inputs)?;
    }
    let device = a.device.open()?;
    let loaded = a.sel.load()?;
    let reference = checkpoint::load_with(&a.reference, true)?;
    let vocab = loaded.model.cfg.vocab_size;
    ensure!(
        reference.cfg.vocab_size == vocab,
        "{} has {} tokens, {} has {vocab}",
        a.reference.display(),
        reference.cfg.vocab_size,
        a.sel.model.display()
    );
    let ds = data::Dataset::open_for(&a.data, &a.sel.model, vocab)?;
    ds.check_for(&a.data, &a.reference, vocab)?;
    let counts = match &a.public {
        Some(p) => {
            let public = data::Dataset::open_for(p, &a.sel.model, vocab)?;
            Some(eval::compare::target_counts(&public.train, vocab))
        }
        None => None,
    };
    let tok = Tokenizer::load(&flexrun::fsutil::confined(
        &a.sel.model,
        "tokenizer.json",
        "tokenizer",
    )?)?;
    let batches =
        shards::eval_batches(&ds.valid, 8, a.seq, a.tokens, &a.data.display().to_string())?;
    let (model_g, reference_g) = (
        Placed::new(&loaded.model, &device)?,
        Placed::new(&reference, &device)?,
    );
    let gap = eval::compare::token_gap(
        &Evaluated::One(model_g.runner()),
        &Evaluated::One(reference_g.runner()),
        &batches,
        a.seq,
        counts.as_deref(),
        &tok,
        a.top,
    )?;
    out!("{}", eval::compare::markdown(&gap));
    if let Some(j) = a.json {
        flexrun::fsutil::write_bytes_atomic(&j, serde_json::to_string_pretty(&gap)?.as_bytes())?;
    }
    Ok(())
}

pub fn extract(a: ExtractArgs) -> Result<()> {
    if let Some(j) = &a.json {
        flexrun::fsutil::check_output_file(j, "--json", &[&a.sel.model, &a.data])?;
    }
    let device = a.device.open()?;
    let loaded = a.sel.load()?;
    let cfg = eval::extract::ExtractConfig {
        docs: a.docs,
        prefix: a.prefix,
        max_continuation: a.max_new,
        min_continuation: a.min_new,
        samples: a.samples,
        top_k: a.top_k,
        top_p: a.top_p,
        temperature: a.temperature,
        threshold: a.threshold,
        seed: a.seed,
    };
    cfg.check(loaded.model.cfg.max_position_embeddings)?;
    let ds = data::Dataset::open_for(&a.data, &a.sel.model, loaded.model.cfg.vocab_size)?;
    let placed = Placed::new(&loaded.model, &device)?;
    let e = Evaluated::One(placed.runner());
    let bar = indicatif::ProgressBar::new(cfg.docs as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("extract [{bar:30}] {pos}/{len} docs eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let r = eval::extract::extraction(&e, &ds.train, &cfg, Some(&bar));
    bar.finish_and_clear();
    let r = r?;
    let what = match loaded.expert_names.len() {
        0 => a.sel.model.display().to_string(),
        _ => format!(
            "{} [{}]",
            a.sel.model.display(),
            loaded.expert_names.join(", ")
        ),
    };
    outln!(
        "{what}: {} of {} documents extracted ({:.2}%), mean best similarity {:.3}",
        r.extracted,
        r.docs,
        100.0 * r.rate,
        r.mean_best_similarity
    );
    if let Some(j) = a.json {
        let v =
            serde_json::json!({ "model": a.sel.model, "data": a.data, "config": cfg, "result": r });
        flexrun::fsutil::write_bytes_atomic(&j, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}
