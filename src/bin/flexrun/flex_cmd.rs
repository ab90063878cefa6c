//! The FlexOlmo method's commands: `train-expert` (a data owner, alone), `merge` (no data),
//! `router-tune`, and the dense baselines `finetune` and `soup`.

use crate::opts::TrainOpts;
use clap::Args;
use flexrun::error::Result;
use flexrun::flex;
use flexrun::model::checkpoint;
use flexrun::train::TrainConfig;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainExpertArgs {
    /// The public model directory.
    #[arg(long)]
    pub public: PathBuf,
    /// This owner's prepared data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Prepared public data, to embed the public router row (router init 'domain').
    #[arg(long)]
    pub public_data: Option<PathBuf>,
    #[arg(long)]
    pub name: String,
    /// Domain label recorded in the artifact (default: the name).
    #[arg(long)]
    pub domain: Option<String>,
    /// The expert artifact to write (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Run directory for the log and resumable checkpoint (default: OUT with .run).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// How the router row starts: domain (the public model's embedding of the owner's
    /// documents), random, or encoder (a sentence encoder's, with --encoder).
    #[arg(long, default_value = "domain")]
    pub router_init: String,
    /// The sentence encoder of --router-init encoder (a sentence-transformers directory: BERT
    /// config, model.safetensors, tokenizer.json), e.g. all-MiniLM-L6-v2.
    #[arg(long)]
    pub encoder: Option<PathBuf>,
    /// Documents sampled to embed a domain.
    #[arg(long, default_value_t = 64)]
    pub embed_docs: usize,
    /// Initial expert bias; it acts as min(b, 0), which passes no gradient once b > 0, so it
    /// starts below 0. At -2 an expert starts nearly off everywhere and is switched on where its
    /// own data pulls its router row, which keeps it off other owners' text after the merge.
    #[arg(long, default_value_t = -2.0, allow_negative_numbers = true)]
    pub bias_init: f32,
    /// Train without the expert bias (ablation).
    #[arg(long)]
    pub no_bias: bool,
    /// Fraction of training rows drawn from --public-data (0: the owner's data only).
    #[arg(long, default_value_t = 0.0)]
    pub public_mix: f64,
    /// Weight of the public anchor on the public rows (--public-mix): the relative squared
    /// error between each MoE layer's output and the public FFN's alone. It teaches the expert
    /// (its router row, bias and FFN) to leave public text as the public model has it, so that
    /// after merging it does not disturb other domains.
    #[arg(long, default_value_t = 0.0)]
    pub public_anchor: f32,
    /// Per-layer weights of the public anchor, one per layer (default: 1 each), e.g. 4,1,1,4:
    /// the first layer's router sees little more than the token and cannot tell domains apart,
    /// so a heavier anchor there keeps that layer's expert quiet on text that is not its own.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub public_anchor_layers: Vec<f32>,
    /// Weight of the router's own-text loss: on the owner's own rows, the cross-entropy of the
    /// router logits (before the bias) toward the new expert, so that its router row learns to
    /// tell its data from public text rather than lean on a louder FFN; the bias still sets how
    /// much the expert is used.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub router_own: f32,
    /// Weight of the router's public-text loss, the mirror of --router-own: on the public rows
    /// (--public-mix), the cross-entropy of the router logits (before the bias) toward the
    /// public expert.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub router_public: f32,
    /// Weight of the expert loudness loss: per layer, how much louder (in squared norm) the new
    /// FFN's output is than the public FFN's, on every row. Under the post-FFN norm a loud
    /// expert outvotes its router, and once merged it moves other owners' text wherever it is
    /// routed a little.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub expert_loudness: f32,
    /// Train with differential privacy (DP-SGD): this noise multiplier. Each step samples the
    /// owner's training documents independently (one window of each), clips each document's
    /// gradient to --dp-clip, adds Gaussian noise of --dp-noise x --dp-clip and reports the
    /// (epsilon, --dp-delta) guarantee per document. No GPU path yet: trains on the CPU.
    #[arg(long)]
    pub dp_noise: Option<f32>,
    /// Per-document gradient norm bound of DP-SGD.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f32,
    /// The delta of the reported (epsilon, delta).
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    #[command(flatten)]
    pub train: TrainOpts,
}

#[derive(Args)]
pub struct MergeArgs {
    #[arg(long)]
    pub public: PathBuf,
    #[arg(long, required = true, num_args = 1..)]
    pub experts: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Experts per token at inference (default: 2, at most the number of experts).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Shift an expert's router bias by V (one value, or one per layer) before it is
    /// applied as min(bias, 0): a negative V makes the router pick that expert less, with
    /// no retraining and no data. Repeatable; recorded in the manifest; opt-out stays exact.
    #[arg(
        long = "bias-offset",
        value_name = "NAME=V[,V...]",
        allow_hyphen_values = true
    )]
    pub bias_offset: Vec<String>,
}

#[derive(Args)]
pub struct RouterTuneArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Prepared proxy datasets (public documents, small per-domain proxies).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainOpts,
}

#[derive(Args)]
pub struct BtxArgs {
    /// The public model the dense experts were fine-tuned from.
    #[arg(long)]
    pub public: PathBuf,
    /// Dense experts as NAME=MODEL_DIR (from `flexrun finetune`).
    #[arg(long, required = true, num_args = 1..)]
    pub dense: Vec<String>,
    /// Prepared public data: the only data the router is trained on.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Experts per token.
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainOpts,
}

#[derive(Args)]
pub struct FinetuneArgs {
    #[arg(long)]
    pub public: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Train only the parameters whose name contains one of these (e.g. `mlp,lm_head`); the
    /// rest stay frozen. Default: every weight.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    #[command(flatten)]
    pub train: TrainOpts,
}

#[derive(Args)]
pub struct SoupArgs {
    /// The dense models to average (space- or comma-separated).
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
    pub models: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn train_expert(a: TrainExpertArgs) -> Result<()> {
    let device = a.train.device.open()?;
    let run_dir = a
        .run_dir
        .clone()
        .unwrap_or_else(|| a.out.with_extension("run"));
    let opts = flex::ExpertTrainOpts {
        public: a.public,
        data: a.data,
        public_data: a.public_data,
        domain: a.domain.unwrap_or_else(|| a.name.clone()),
        name: a.name,
        out: a.out.clone(),
        run_dir,
        router_init: flex::RouterInit::parse(&a.router_init)?,
        encoder: a.encoder.clone(),
        embed_docs: a.embed_docs,
        bias_init: (!a.no_bias).then_some(a.bias_init),
        public_mix: a.public_mix,
        train: TrainConfig {
            public_anchor: a.public_anchor,
            public_anchor_layers: a.public_anchor_layers.clone(),
            router_own: a.router_own,
            router_public: a.router_public,
            expert_loudness: a.expert_loudness,
            // The expected private documents per step: the batch's share of own rows.
            dp: a.dp_noise.map(|noise| flexrun::train::dp::DpConfig {
                noise,
                clip: a.dp_clip,
                rows: ((a.train.batch as f64 * (1.0 - a.public_mix)).round() as usize).max(1),
                delta: a.dp_delta,
            }),
            ..a.train.config()?
        },
        resume: a.train.resume,
        quiet: a.train.quiet,
    };
    let (art, s) = flex::train_expert(&opts, &device)?;
    let dp = match (s.dp_epsilon, s.dp_sample_rate) {
        (Some(e), Some(q)) => format!(
            ", differentially private: epsilon {e:.2} at delta {:e} per document (sampling rate {q:.4})",
            a.dp_delta
        ),
        _ => String::new(),
    };
    outln!(
        "expert '{}' ({} steps, {} tokens, train ce {:.4}, valid ce {}{dp}) written to {}",
        art.meta.name,
        s.steps,
        s.tokens,
        s.final_ce,
        s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        a.out.display()
    );
    Ok(())
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let MergeArgs {
        public,
        experts,
        out,
        top_k,
        bias_offset,
    } = a;
    // The default fits any merge; an explicit k is checked against the experts.
    let k = top_k.unwrap_or_else(|| 2.min(experts.len() + 1));
    let offsets = bias_offset
        .iter()
        .map(|s| flex::BiasOffset::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let (_, m) = flex::merge(&public, &experts, k, &offsets, &out)?;
    let names: Vec<&str> = m.experts.iter().map(|e| e.name.as_str()).collect();
    outln!(
        "merged {} experts [{}] (top-{k}) into {}",
        names.len(),
        names.join(", "),
        out.display()
    );
    Ok(())
}

pub fn router_tune(a: RouterTuneArgs) -> Result<()> {
    let RouterTuneArgs {
        model,
        data,
        out,
        train,
    } = a;
    let device = train.device.open()?;
    let run_dir = out.with_extension("run");
    let s = flex::router_tune(
        &model,
        &data,
        &train.config()?,
        &out,
        &run_dir,
        train.resume,
        train.quiet,
        &device,
    )?;
    outln!(
        "router tuned for {} steps (valid ce {}); written to {} (strict opt-out no longer holds)",
        s.steps,
        s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        out.display()
    );
    Ok(())
}

pub fn btx(a: BtxArgs) -> Result<()> {
    let dense = crate::opts::parse_domains(&a.dense)?;
    let top_k = a.top_k.unwrap_or(dense.len() + 1);
    let device = a.train.device.open()?;
    let run_dir = a.out.with_extension("run");
    let s = flex::btx(
        &a.public,
        &dense,
        &a.data,
        top_k,
        &a.train.config()?,
        &a.out,
        &run_dir,
        a.train.resume,
        a.train.quiet,
        &device,
    )?;
    outln!(
        "BTX of the public model and {} dense experts (top-{top_k}), router trained for {} steps on public data (valid ce {}); written to {}",
        dense.len(),
        s.steps,
        s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        a.out.display()
    );
    Ok(())
}

pub fn finetune(a: FinetuneArgs) -> Result<()> {
    let FinetuneArgs {
        public,
        data,
        out,
        only,
        train,
    } = a;
    let run_dir = out.join("run");
    let device = train.device.open()?;
    let (_, s) = flex::finetune(
        &public,
        &data,
        &train.config()?,
        &only,
        &out,
        &run_dir,
        train.resume,
        train.quiet,
        &device,
    )?;
    outln!(
        "dense expert trained for {} steps (valid ce {}) in {}",
        s.steps,
        s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        out.display()
    );
    Ok(())
}

pub fn soup(a: SoupArgs) -> Result<()> {
    let SoupArgs { models, out } = a;
    flexrun::fsutil::check_model_out(&out)?;
    let inputs: Vec<&std::path::Path> = models.iter().map(PathBuf::as_path).collect();
    flexrun::fsutil::check_not_input(&out, "--out", &inputs)?;
    let ms: Vec<_> = models
        .iter()
        .map(|m| checkpoint::load(m))
        .collect::<Result<_>>()?;
    let s = flex::soup(&ms)?;
    flex::write_model(&s, None, &models[0], &out)?;
    let plural = if ms.len() == 1 { "" } else { "s" };
    outln!("averaged {} model{plural} into {}", ms.len(), out.display());
    Ok(())
}
