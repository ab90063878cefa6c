//! The flexrun command line: parses arguments, calls the library, prints results.
//! Every error is printed as one line on stderr with exit status 1.

use clap::{Args, Parser, Subcommand};
use flexrun::data::{self, shards, synth, tokenizer, Tokenizer};
use flexrun::error::{Context, Result};
use flexrun::eval::{self, routing, DomainEval, Evaluated};
use flexrun::flex;
use flexrun::generate::{self, SamplingConfig};
use flexrun::model::gpu::GpuModel;
use flexrun::model::{checkpoint, Config};
use flexrun::train::{self, optim::AdamWConfig, TrainConfig};
use flexrun::{bail, ensure};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "flexrun",
    version,
    about = "FlexOlmo from scratch: train, merge and serve mixture-of-experts language models"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Corpus tools: the built-in synthetic corpus and token shards.
    #[command(subcommand)]
    Data(DataCmd),
    /// Byte-level BPE tokenizer.
    #[command(subcommand)]
    Tokenizer(TokCmd),
    /// Train a public (dense OLMo-2) model from scratch on prepared data.
    Pretrain(PretrainArgs),
    /// Generate text (or token ids) from a model with a KV cache.
    Generate(GenerateArgs),
    /// Print the logits of one sequence as JSON.
    Logits(LogitsArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Train one data owner's expert against the frozen public model, on its own data only.
    TrainExpert(TrainExpertArgs),
    /// Merge the public model and expert artifacts into one FlexOlmo checkpoint (no data needed).
    Merge {
        #[arg(long)]
        public: PathBuf,
        #[arg(long, required = true, num_args = 1..)]
        experts: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Experts per token at inference (default: 2, at most the number of experts).
        #[arg(long)]
        top_k: Option<usize>,
        /// Shift an expert's router bias by V (one value, or one per layer) before it is
        /// applied as min(bias, 0): a negative V makes the router pick that expert less, with
        /// no retraining and no data. Repeatable; recorded in the manifest; opt-out stays exact.
        #[arg(
            long = "bias-offset",
            value_name = "NAME=V[,V...]",
            allow_hyphen_values = true
        )]
        bias_offset: Vec<String>,
    },
    /// Tune only the router rows of a merged model on proxy data (breaks strict opt-out).
    RouterTune {
        #[arg(long)]
        model: PathBuf,
        /// Prepared proxy datasets (public documents, small per-domain proxies).
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        train: TrainOpts,
    },
    /// Baseline: fine-tune every weight of the public model on one domain (a dense expert), or
    /// only some of them (`--only`).
    Finetune {
        #[arg(long)]
        public: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Train only the parameters whose name contains one of these (e.g. `mlp,lm_head`); the
        /// rest stay frozen. Default: every weight.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        #[command(flatten)]
        train: TrainOpts,
    },
    /// Baseline: uniform parameter average of dense experts.
    Soup {
        /// The dense models to average (space- or comma-separated).
        #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
        models: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Per-domain held-out loss and task accuracy of a model, expert subset, or BTM ensemble.
    Eval(EvalArgs),
    /// Per-layer fraction of each domain's tokens routed to each expert: table and SVG heatmap.
    AnalyzeRouting {
        #[command(flatten)]
        sel: SelectOpts,
        /// Domains as NAME=PREPARED_DIR.
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<String>,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// Heatmap output (.svg).
        #[arg(long, default_value = "routing.svg")]
        out: PathBuf,
    },
    /// Where a model's held-out loss on one domain differs from a reference model's (e.g. a
    /// merged FlexOlmo model and that domain's dense expert), per target token and by how
    /// often the token is a target in public training data.
    Compare(CompareArgs),
    /// Training-data extraction check: how often sampled continuations of a document's prefix
    /// reproduce the document (FlexOlmo's data extraction check).
    Extract(ExtractArgs),
    /// The main job: the whole FlexOlmo pipeline on the built-in corpus, with baselines.
    Demo(DemoArgs),
}

#[derive(Args)]
struct CompareArgs {
    /// The model studied (with --exclude/--experts, as for eval).
    #[command(flatten)]
    sel: SelectOpts,
    /// The model it is compared with.
    #[arg(long)]
    reference: PathBuf,
    /// The prepared domain whose validation text is scored.
    #[arg(long)]
    data: PathBuf,
    /// Prepared public data: its training split's target counts group the gap.
    #[arg(long)]
    public: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Target tokens listed (largest share of the gap first).
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ExtractArgs {
    #[command(flatten)]
    sel: SelectOpts,
    /// The prepared domain whose training documents are checked.
    #[arg(long)]
    data: PathBuf,
    /// Documents to check (the paper: 10000).
    #[arg(long, default_value_t = 1000)]
    docs: usize,
    /// Prefix length in tokens, at a random offset of each document.
    #[arg(long, default_value_t = 32)]
    prefix: usize,
    /// Longest true continuation compared (the samples are as long as it).
    #[arg(long, default_value_t = 256)]
    max_new: usize,
    /// Shortest true continuation: shorter documents are skipped.
    #[arg(long, default_value_t = 16)]
    min_new: usize,
    /// Samples per document.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Normalised Levenshtein similarity (on tokens) at which a sample counts as the document.
    #[arg(long, default_value_t = 0.9)]
    threshold: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A model directory and the experts to use from it (opt-out at load time).
#[derive(Args, Clone)]
struct SelectOpts {
    #[arg(long)]
    model: PathBuf,
    /// Experts to leave out (names from flexolmo.json, or indices for plain checkpoints).
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// Use only these experts.
    #[arg(long, value_delimiter = ',')]
    experts: Vec<String>,
    /// Experts per token (default: the checkpoint's).
    #[arg(long)]
    expert_top_k: Option<usize>,
    /// cpu (f32), or cuda: flexrun's kernels on the GPU, bf16 weights and activations.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl SelectOpts {
    fn load(&self) -> Result<flex::Loaded> {
        let sel = flex::Selection {
            exclude: self.exclude.clone(),
            only: self.experts.clone(),
            top_k: self.expert_top_k,
            keep_bf16: true,
        };
        flex::load_model(&self.model, &sel)
    }
}

#[derive(Args)]
struct TrainExpertArgs {
    /// The public model directory.
    #[arg(long)]
    public: PathBuf,
    /// This owner's prepared data directory.
    #[arg(long)]
    data: PathBuf,
    /// Prepared public data, to embed the public router row (router init 'domain').
    #[arg(long)]
    public_data: Option<PathBuf>,
    #[arg(long)]
    name: String,
    /// Domain label recorded in the artifact (default: the name).
    #[arg(long)]
    domain: Option<String>,
    /// The expert artifact to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Run directory for the log and resumable checkpoint (default: OUT with .run).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    #[arg(long, default_value = "domain")]
    router_init: String,
    /// Documents sampled to embed a domain.
    #[arg(long, default_value_t = 64)]
    embed_docs: usize,
    /// Initial expert bias; it acts as min(b, 0), which passes no gradient once b > 0, so it
    /// starts below 0. At -2 an expert starts nearly off everywhere and is switched on where its
    /// own data pulls its router row, which keeps it off other owners' text after the merge.
    #[arg(long, default_value_t = -2.0, allow_negative_numbers = true)]
    bias_init: f32,
    /// Train without the expert bias (ablation).
    #[arg(long)]
    no_bias: bool,
    /// Fraction of training rows drawn from --public-data (0: the owner's data only).
    #[arg(long, default_value_t = 0.0)]
    public_mix: f64,
    /// Weight of the public anchor on the public rows (--public-mix): the relative squared
    /// error between each MoE layer's output and the public FFN's alone. It teaches the expert
    /// (its router row, bias and FFN) to leave public text as the public model has it, so that
    /// after merging it does not disturb other domains.
    #[arg(long, default_value_t = 0.0)]
    public_anchor: f32,
    /// Per-layer weights of the public anchor, one per layer (default: 1 each), e.g. 4,1,1,4:
    /// the first layer's router sees little more than the token and cannot tell domains apart,
    /// so a heavier anchor there keeps that layer's expert quiet on text that is not its own.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    public_anchor_layers: Vec<f32>,
    /// Weight of the router's own-text loss: on the owner's own rows, the cross-entropy of the
    /// router logits (before the bias) toward the new expert, so that its router row learns to
    /// tell its data from public text rather than lean on a louder FFN; the bias still sets how
    /// much the expert is used.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    router_own: f32,
    /// Weight of the router's public-text loss, the mirror of --router-own: on the public rows
    /// (--public-mix), the cross-entropy of the router logits (before the bias) toward the
    /// public expert.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    router_public: f32,
    /// Weight of the expert loudness loss: per layer, how much louder (in squared norm) the new
    /// FFN's output is than the public FFN's, on every row. Under the post-FFN norm a loud
    /// expert outvotes its router, and once merged it moves other owners' text wherever it is
    /// routed a little.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    expert_loudness: f32,
    /// Train with differential privacy (DP-SGD): this noise multiplier. Each step samples the
    /// owner's training documents independently (one window of each), clips each document's
    /// gradient to --dp-clip, adds Gaussian noise of --dp-noise x --dp-clip and reports the
    /// (epsilon, --dp-delta) guarantee per document. CPU only.
    #[arg(long)]
    dp_noise: Option<f32>,
    /// Per-document gradient norm bound of DP-SGD.
    #[arg(long, default_value_t = 1.0)]
    dp_clip: f32,
    /// The delta of the reported (epsilon, delta).
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    #[command(flatten)]
    train: TrainOpts,
}

#[derive(Args)]
struct EvalArgs {
    /// Model to evaluate (omit with --btm).
    #[arg(long, required_unless_present = "btm")]
    model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    experts: Vec<String>,
    /// Experts per token (default: the checkpoint's).
    #[arg(long)]
    expert_top_k: Option<usize>,
    /// cpu (f32), or cuda: flexrun's kernels on the GPU, bf16 weights and activations (every
    /// member of a --btm ensemble too).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// BTM ensemble of these dense models instead of --model.
    #[arg(long, value_delimiter = ',', conflicts_with = "model")]
    btm: Vec<PathBuf>,
    /// BTM: the ensemble weights are softmax(-context NLL / T) (T > 0).
    #[arg(long, default_value_t = 1.0)]
    btm_temperature: f32,
    /// BTM: mix the k members with the lowest context NLL at each position (k >= 1).
    #[arg(long, default_value_t = 2)]
    btm_top_k: usize,
    /// Domains as NAME=PREPARED_DIR; built-in domain names also get exact-match tasks.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<String>,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Tasks per built-in domain (0: none).
    #[arg(long, default_value_t = 64)]
    tasks: usize,
    /// Seed of the built-in tasks.
    #[arg(long, default_value_t = 1000)]
    task_seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// Working directory for corpus, models and results.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the ablations (no bias, random router init, top-k sweep).
    #[arg(long)]
    ablations: bool,
    /// A tiny configuration that runs in seconds (smoke test).
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    public_steps: Option<u64>,
    #[arg(long)]
    expert_steps: Option<u64>,
    #[arg(long)]
    top_k: Option<usize>,
    /// Fraction of each expert's training rows drawn from public data.
    #[arg(long)]
    public_mix: Option<f64>,
    /// Weight of the public anchor on the public rows of expert training (default 10: opting an
    /// expert out then moves every other domain by less than 2%; lower weights give lower
    /// losses and more interference).
    #[arg(long)]
    public_anchor: Option<f32>,
    /// Per-layer weights of the public anchor (one per layer; default 4,1,...,1,4).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    public_anchor_layers: Option<Vec<f32>>,
    /// BPE-dropout of the public training data (default 0.01; see `data prepare --bpe-dropout`).
    #[arg(long)]
    bpe_dropout: Option<f64>,
    /// Tokenizer vocabulary size.
    #[arg(long)]
    vocab: Option<usize>,
    /// Model width (default 128).
    #[arg(long)]
    hidden: Option<usize>,
    /// Number of layers (default 4).
    #[arg(long)]
    layers: Option<usize>,
    /// Attention heads (default 4; must divide --hidden).
    #[arg(long)]
    heads: Option<usize>,
    /// FFN width of the public model and of every expert (default 352).
    #[arg(long)]
    intermediate: Option<usize>,
    /// Run on this corpus (one sub-directory per domain, public/ among them) instead of FlexMix.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Where the models are trained and evaluated: auto (the GPU when present), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    quiet: bool,
}

fn parse_domains(specs: &[String]) -> Result<Vec<(String, PathBuf)>> {
    specs
        .iter()
        .map(|s| {
            let (n, p) = s
                .split_once('=')
                .with_context(|| format!("'{s}' is not NAME=DIR"))?;
            Ok((n.to_string(), PathBuf::from(p)))
        })
        .collect()
}

#[derive(Subcommand)]
enum DataCmd {
    /// Write the built-in synthetic multi-domain corpus (one directory per domain).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training documents per domain (default: the demo size).
        #[arg(long)]
        docs: Option<usize>,
    },
    /// Tokenize text files (.txt, .jsonl, or directories of them) into train/valid shards.
    Prepare {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0.05)]
        valid_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// BPE-dropout of the training split: each merged token is split back into its pair
        /// with this probability, so that every token of the vocabulary is trained (validation
        /// stays deterministic). For a public model whose tokenizer has intermediate tokens
        /// that its data never shows on their own.
        #[arg(long, default_value_t = 0.0)]
        bpe_dropout: f64,
    },
}

#[derive(Subcommand)]
enum TokCmd {
    /// Train a byte-level BPE on text files and write tokenizer.json.
    Train {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long, default_value_t = 2048)]
        vocab: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Optimisation settings shared by every training command.
#[derive(Args, Clone)]
struct TrainOpts {
    #[arg(long, default_value_t = 300)]
    steps: u64,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f32,
    #[arg(long, default_value_t = 30)]
    warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    #[arg(long, default_value_t = 0.95)]
    beta2: f32,
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validate every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    save_every: u64,
    #[arg(long, default_value_t = 1e-5)]
    z_loss: f32,
    #[arg(long, default_value_t = 1e-3)]
    router_z_loss: f32,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// cpu, or cuda: train on the GPU with flexrun's kernels (bf16 compute, f32 master weights
    /// and optimizer state; frozen weights hold no gradients; every loss term but
    /// --expert-loudness).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl TrainOpts {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            steps: self.steps,
            batch: self.batch,
            seq: self.seq,
            grad_accum: self.grad_accum,
            lr: self.lr,
            min_lr_ratio: self.min_lr_ratio,
            warmup: self.warmup,
            adamw: AdamWConfig {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: 1e-8,
                weight_decay: self.weight_decay,
            },
            clip: self.clip,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            z_loss: self.z_loss,
            router_z_loss: self.router_z_loss,
            public_anchor: 0.0,
            public_anchor_layers: Vec::new(),
            router_own: 0.0,
            router_public: 0.0,
            expert_loudness: 0.0,
            dp: None,
        }
    }
}

/// Model shape for commands that create a model (ignored when --config is given).
#[derive(Args, Clone)]
struct ShapeOpts {
    /// A Hugging Face config.json to build the model from.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 352)]
    intermediate: usize,
    #[arg(long, default_value_t = 1024)]
    max_pos: usize,
}

impl ShapeOpts {
    fn config(&self, vocab: usize) -> Result<Config> {
        if let Some(p) = &self.config {
            return Config::load(p);
        }
        let mut c = Config::olmo2(
            vocab,
            self.hidden,
            self.intermediate,
            self.layers,
            self.heads,
            self.kv_heads.unwrap_or(self.heads),
        );
        c.max_position_embeddings = self.max_pos;
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args)]
struct PretrainArgs {
    /// Prepared data directory (from `flexrun data prepare`).
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    shape: ShapeOpts,
    #[command(flatten)]
    train: TrainOpts,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    sel: SelectOpts,
    /// Text prompt (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "ids")]
    prompt: Option<String>,
    /// Comma-separated prompt token ids.
    #[arg(long)]
    ids: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokenizer file (default: tokenizer.json in the model directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    sel: SelectOpts,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: String,
    /// Print JSON (the only format).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Flash attention forward and backward throughput on the GPU (causal, bf16, random inputs).
    Attention {
        /// Comma-separated sequence lengths.
        #[arg(long, default_value = "1024,2048,4096,8192,16384")]
        seq: String,
        /// Tokens per call: batch = max(1, tokens / seq).
        #[arg(long, default_value_t = 16384)]
        tokens: usize,
        #[arg(long, default_value_t = 16)]
        heads: usize,
        /// KV heads (GQA when fewer than --heads; default: --heads).
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long, default_value_t = 128)]
        hd: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Grouped expert GEMMs of the MoE FFN (forward + backward) on the GPU: TFLOP/s per kernel,
    /// plus cuBLAS per-expert-loop and dense baselines.
    Moe {
        #[arg(long, default_value_t = 8)]
        experts: usize,
        #[arg(long, default_value_t = 4096)]
        tokens_per_expert: usize,
        #[arg(long, default_value_t = 4096)]
        hidden: usize,
        #[arg(long, default_value_t = 11008)]
        intermediate: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Greedy decoding with a KV cache: prefill and per-token throughput of a randomly
    /// initialised model (cpu, or cuda with flexrun's kernels).
    Decode {
        #[arg(long)]
        config: PathBuf,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Full training steps (forward, backward, AdamW) on random tokens.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Time a data owner's expert-training step instead: the (dense) config is the frozen
        /// public model, upcycled to [public FFN, trained copy], with the demo's loss terms.
        #[arg(long)]
        expert: bool,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
}

/// Comma-separated token ids ("" gives none; an empty item between commas is an error).
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|x| {
            x.trim().parse::<u32>().map_err(|_| {
                flexrun::Error(format!("'{}' is not a token id (in --ids {s})", x.trim()))
            })
        })
        .collect()
}

fn load_tokenizer_for(model_dir: &Path, explicit: Option<&PathBuf>) -> Result<Tokenizer> {
    let path = explicit
        .cloned()
        .unwrap_or_else(|| model_dir.join("tokenizer.json"));
    ensure!(
        path.exists(),
        "no tokenizer at {} (pass --tokenizer or use --ids)",
        path.display()
    );
    Tokenizer::load(&path)
}

/// The GPU for `--device cuda` (None for cpu), or a one-line reason why there is none.
fn gpu_for(device: &str) -> Result<Option<flexrun::backend::cuda::Device>> {
    match device {
        "cpu" => Ok(None),
        "cuda" => flexrun::backend::cuda::Device::new(0)
            .map(Some)
            .map_err(|e| flexrun::Error(format!("--device cuda: {e}"))),
        other => bail!("unknown device '{other}' (expected cpu or cuda)"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Data(DataCmd::Synth { out, seed, docs }) => {
            let mut cfg = synth::SynthConfig {
                seed,
                ..Default::default()
            };
            if let Some(d) = docs {
                ensure!(d >= 1, "--docs must be at least 1");
                cfg.docs_per_domain = d;
            }
            synth::write_corpus(&out, &cfg)?;
            println!(
                "wrote {} domains ({}) to {}",
                synth::DOMAINS.len(),
                synth::DOMAINS.join(", "),
                out.display()
            );
        }
        Cmd::Data(DataCmd::Prepare {
            input,
            tokenizer,
            out,
            valid_fraction,
            seed,
            bpe_dropout,
        }) => {
            let tok = Tokenizer::load(&tokenizer)?;
            let meta = shards::prepare(&input, &tok, &out, valid_fraction, seed, bpe_dropout)?;
            let bytes = flexrun::fsutil::read_regular(
                &tokenizer,
                "tokenizer",
                flexrun::fsutil::MAX_JSON_BYTES,
            )?;
            flexrun::fsutil::write_bytes_atomic(&out.join("tokenizer.json"), &bytes)?;
            println!(
                "{}: {} train tokens ({} docs), {} valid tokens ({} docs), vocab {}",
                out.display(),
                meta.train_tokens,
                meta.train_docs,
                meta.valid_tokens,
                meta.valid_docs,
                meta.vocab_size
            );
        }
        Cmd::Tokenizer(TokCmd::Train { input, vocab, out }) => {
            tokenizer::train_bpe(&input, vocab, &out)?;
            let tok = Tokenizer::load(&out)?;
            println!("wrote {} (vocab {})", out.display(), tok.vocab_size());
        }
        Cmd::Pretrain(a) => {
            let meta = data::Dataset::open(&a.data)?.meta;
            let cfg = a.shape.config(meta.vocab_size)?;
            let tcfg = a.train.config();
            let gpu = gpu_for(&a.train.device)?;
            let (model, s) = train::pretrain::pretrain(
                &a.data,
                &cfg,
                &tcfg,
                &a.out,
                a.train.resume,
                a.train.quiet,
                gpu.as_ref(),
            )?;
            println!(
                "pretrained {} parameters for {} steps ({} tokens, {:.0} tok/s): train ce {:.4}, valid ce {}; model in {}",
                model.params.numel(),
                s.steps,
                s.tokens,
                s.tokens_per_s,
                s.final_ce,
                s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
                a.out.display()
            );
        }
        Cmd::Generate(a) => {
            let model = a.sel.load()?.model;
            let tok = if a.ids.is_none() {
                Some(load_tokenizer_for(&a.sel.model, a.tokenizer.as_ref())?)
            } else {
                None
            };
            let prompt = match (&a.ids, &a.prompt, &tok) {
                (Some(ids), _, _) => parse_ids(ids)?,
                (None, Some(p), Some(t)) => t.encode(p)?,
                _ => bail!("give --prompt or --ids"),
            };
            let cfg = SamplingConfig {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
                max_new_tokens: a.max_new_tokens,
                stop_token: model.cfg.eos_id(),
            };
            // Bad requests fail before anything is printed.
            cfg.check()?;
            generate::check_prompt(&model.cfg, &prompt, cfg.max_new_tokens)?;
            let mut out = std::io::stdout().lock();
            let mut produced: Vec<u32> = Vec::new();
            let mut printed = 0usize;
            if let (Some(p), Some(_)) = (&a.prompt, &tok) {
                write!(out, "{p}")?;
            }
            let mut decode_err = None;
            let gpu = gpu_for(&a.sel.device)?;
            let gpu_model = match &gpu {
                Some(dev) => Some(GpuModel::upload(dev, &model)?),
                None => None,
            };
            let on_token = |t| {
                produced.push(t);
                match &tok {
                    Some(tk) => match tk.decode(&produced) {
                        // Print only complete characters: the decoded text grows monotonically.
                        Ok(text) if !text.ends_with('\u{FFFD}') => {
                            let _ = write!(out, "{}", &text[printed.min(text.len())..]);
                            printed = text.len();
                        }
                        Ok(_) => {}
                        Err(e) => decode_err = Some(e),
                    },
                    None => {
                        let _ = write!(out, "{}{t}", if produced.len() > 1 { "," } else { "" });
                    }
                }
                let _ = out.flush();
            };
            match &gpu_model {
                Some(g) => generate::generate_gpu(g, &prompt, &cfg, on_token)?,
                None => generate::generate(&model, &prompt, &cfg, on_token)?,
            };
            writeln!(out)?;
            if let Some(e) = decode_err {
                return Err(e);
            }
        }
        Cmd::Logits(a) => {
            let _ = a.json;
            let model = a.sel.load()?.model;
            let ids = parse_ids(&a.ids)?;
            ensure!(!ids.is_empty(), "--ids is empty");
            let l = match gpu_for(&a.sel.device)? {
                Some(dev) => GpuModel::upload(&dev, &model)?.logits(&ids, 1, ids.len())?,
                None => model.logits(&ids, 1, ids.len())?,
            };
            let rows: Vec<&[f32]> = (0..ids.len()).map(|i| l.row(i)).collect();
            println!("{}", serde_json::json!({ "logits": rows }));
        }
        Cmd::Bench(BenchCmd::Attention {
            seq,
            tokens,
            heads,
            kv_heads,
            hd,
            iters,
            warmup,
            device,
            json,
        }) => {
            use flexrun::backend::cuda::{flash, Device};
            ensure!(
                device == "cuda",
                "bench attention times the CUDA flash kernels: use --device cuda"
            );
            let seqs = parse_ids(&seq)?.into_iter().map(|x| x as usize).collect();
            let dev = Device::new(0)?;
            let cfg = flash::BenchConfig {
                seqs,
                tokens,
                heads,
                kv_heads: kv_heads.unwrap_or(heads),
                hd,
                iters,
                warmup,
            };
            let rows = flash::bench_attention(&dev, &cfg)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "framework": "flexrun", "device": dev.name()?, "rows": rows })
                );
            } else {
                println!(
                    "{}: causal bf16 attention, {heads} heads ({} kv) of {hd}",
                    dev.name()?,
                    cfg.kv_heads
                );
                for r in &rows {
                    println!(
                        "seq {:>6} x batch {:>3}: fwd {:8.3} ms {:6.1} TFLOP/s | bwd {:8.3} ms {:6.1} TFLOP/s ({})",
                        r.seq, r.batch, r.fwd_ms, r.fwd_tflops, r.bwd_ms, r.bwd_tflops, r.fwd_kernel
                    );
                }
            }
        }
        Cmd::Bench(BenchCmd::Moe {
            experts,
            tokens_per_expert,
            hidden,
            intermediate,
            iters,
            warmup,
            device,
            json,
        }) => {
            ensure!(
                device == "cuda",
                "bench moe times the CUDA grouped GEMM kernels: use --device cuda (got '{device}')"
            );
            let dev = flexrun::backend::cuda::Device::new(0)?;
            let r = flexrun::backend::cuda::grouped::bench_grouped(
                &dev,
                experts,
                tokens_per_expert,
                hidden,
                intermediate,
                iters,
                warmup,
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: {} experts x {} tokens, H={} I={}",
                    r.device, r.experts, r.tokens_per_expert, r.hidden, r.intermediate
                );
                for op in &r.ops {
                    println!("  {:<22} {:9.3} ms {:8.1} TFLOP/s", op.op, op.ms, op.tflops);
                }
            }
        }
        Cmd::Bench(BenchCmd::Decode {
            config,
            batch,
            prompt,
            new_tokens,
            device,
            json,
        }) => {
            let cfg = Config::load(&config)?;
            let gpu = gpu_for(&device)?;
            let r = flexrun::bench::decode(&cfg, batch, prompt, new_tokens, gpu.as_ref())?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} on {}: batch {batch}, prompt {prompt}, {} params: prefill {:.1} ms ({:.0} tokens/s), decode {:.2} ms/step ({:.0} tokens/s)",
                    config.display(),
                    r.device,
                    r.params,
                    r.prefill_ms,
                    r.prefill_tokens_per_s,
                    r.step_ms,
                    r.decode_tokens_per_s
                );
            }
        }
        Cmd::Bench(BenchCmd::Train {
            config,
            expert,
            batch,
            seq,
            steps,
            warmup,
            device,
            json,
        }) => {
            let cfg = Config::load(&config)?;
            let mode = if expert {
                flexrun::bench::TrainMode::Expert
            } else {
                flexrun::bench::TrainMode::Full
            };
            let r = match gpu_for(&device)? {
                Some(dev) => {
                    flexrun::bench::train_step_gpu(&cfg, mode, batch, seq, steps, warmup, &dev)?
                }
                None => flexrun::bench::train_step(&cfg, mode, batch, seq, steps, warmup)?,
            };
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let mfu = match (r.model_tflops, r.mfu) {
                    (Some(t), Some(m)) => format!(", {t:.1} TFLOP/s, MFU {:.1}%", 100.0 * m),
                    (Some(t), None) => format!(", {t:.1} TFLOP/s"),
                    _ => String::new(),
                };
                println!(
                    "{} on {}: batch {batch} x seq {seq}, {} params: {:.1} ms/step, {:.0} tokens/s{mfu}",
                    config.display(),
                    r.device,
                    r.params,
                    r.step_ms,
                    r.tokens_per_s,
                );
            }
        }
        Cmd::TrainExpert(a) => {
            let gpu = gpu_for(&a.train.device)?;
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
                        rows: ((a.train.batch as f64 * (1.0 - a.public_mix)).round() as usize)
                            .max(1),
                        delta: a.dp_delta,
                    }),
                    ..a.train.config()
                },
                resume: a.train.resume,
                quiet: a.train.quiet,
            };
            let (art, s) = flex::train_expert(&opts, gpu.as_ref())?;
            let dp = match (s.dp_epsilon, s.dp_sample_rate) {
                (Some(e), Some(q)) => format!(
                    ", differentially private: epsilon {e:.2} at delta {:e} per document (sampling rate {q:.4})",
                    a.dp_delta
                ),
                _ => String::new(),
            };
            println!(
                "expert '{}' ({} steps, {} tokens, train ce {:.4}, valid ce {}{dp}) written to {}",
                art.meta.name,
                s.steps,
                s.tokens,
                s.final_ce,
                s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
                a.out.display()
            );
        }
        Cmd::Merge {
            public,
            experts,
            out,
            top_k,
            bias_offset,
        } => {
            // The default fits any merge; an explicit k is checked against the experts.
            let k = top_k.unwrap_or_else(|| 2.min(experts.len() + 1));
            let offsets = bias_offset
                .iter()
                .map(|s| flex::BiasOffset::parse(s))
                .collect::<Result<Vec<_>>>()?;
            let (_, m) = flex::merge(&public, &experts, k, &offsets, &out)?;
            let names: Vec<&str> = m.experts.iter().map(|e| e.name.as_str()).collect();
            println!(
                "merged {} experts [{}] (top-{k}) into {}",
                names.len(),
                names.join(", "),
                out.display()
            );
        }
        Cmd::RouterTune {
            model,
            data,
            out,
            train,
        } => {
            let gpu = gpu_for(&train.device)?;
            let run_dir = out.with_extension("run");
            let s = flex::router_tune(
                &model,
                &data,
                &train.config(),
                &out,
                &run_dir,
                train.resume,
                train.quiet,
                gpu.as_ref(),
            )?;
            println!("router tuned for {} steps (valid ce {}); written to {} (strict opt-out no longer holds)", s.steps, s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()), out.display());
        }
        Cmd::Finetune {
            public,
            data,
            out,
            only,
            train,
        } => {
            let run_dir = out.join("run");
            let gpu = gpu_for(&train.device)?;
            let (_, s) = flex::finetune(
                &public,
                &data,
                &train.config(),
                &only,
                &out,
                &run_dir,
                train.resume,
                train.quiet,
                gpu.as_ref(),
            )?;
            println!(
                "dense expert trained for {} steps (valid ce {}) in {}",
                s.steps,
                s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
                out.display()
            );
        }
        Cmd::Soup { models, out } => {
            let ms: Vec<_> = models
                .iter()
                .map(|m| checkpoint::load(m))
                .collect::<Result<_>>()?;
            let s = flex::soup(&ms)?;
            flex::write_model(&s, None, &models[0], &out)?;
            let plural = if ms.len() == 1 { "" } else { "s" };
            println!("averaged {} model{plural} into {}", ms.len(), out.display());
        }
        Cmd::Eval(a) => {
            let domains = parse_domains(&a.data)?;
            let loaded;
            let btm_models: Vec<flexrun::model::Model>;
            let btm_gpu: Vec<GpuModel>;
            let gpu = gpu_for(&a.device)?;
            let gpu_model;
            // (name, what is evaluated, and every model's directory and vocabulary: each must
            // read the data with its own tokenizer; the first one's tokenizer scores the tasks)
            let (name, e, models) = if a.btm.is_empty() {
                let sel = SelectOpts {
                    model: a.model.clone().unwrap(),
                    exclude: a.exclude.clone(),
                    experts: a.experts.clone(),
                    expert_top_k: a.expert_top_k,
                    device: a.device.clone(),
                };
                loaded = sel.load()?;
                let e = match &gpu {
                    Some(dev) => {
                        gpu_model = GpuModel::upload(dev, &loaded.model)?;
                        Evaluated::Gpu(&gpu_model)
                    }
                    None => Evaluated::Model(&loaded.model),
                };
                let models = vec![(sel.model.clone(), loaded.model.cfg.vocab_size)];
                (sel.model.display().to_string(), e, models)
            } else {
                btm_models = a
                    .btm
                    .iter()
                    .map(|m| checkpoint::load_with(m, true))
                    .collect::<Result<_>>()?;
                btm_gpu = match &gpu {
                    Some(dev) => btm_models
                        .iter()
                        .map(|m| GpuModel::upload(dev, m))
                        .collect::<Result<_>>()?,
                    None => Vec::new(),
                };
                let e = Evaluated::Btm {
                    models: match &gpu {
                        Some(_) => btm_gpu.iter().map(Evaluated::Gpu).collect(),
                        None => btm_models.iter().map(Evaluated::Model).collect(),
                    },
                    temperature: a.btm_temperature,
                    top_k: a.btm_top_k,
                };
                let models = a
                    .btm
                    .iter()
                    .zip(&btm_models)
                    .map(|(d, m)| (d.clone(), m.cfg.vocab_size))
                    .collect();
                ("BTM".to_string(), e, models)
            };
            let tok_path = models[0].0.join("tokenizer.json");
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
            print!("{}", eval::markdown(std::slice::from_ref(&row)));
            if let Some(j) = a.json {
                flexrun::fsutil::write_bytes_atomic(
                    &j,
                    serde_json::to_string_pretty(&row)?.as_bytes(),
                )?;
            }
        }
        Cmd::AnalyzeRouting {
            sel,
            data,
            seq,
            tokens,
            out,
        } => {
            ensure!(
                sel.device == "cpu",
                "analyze-routing runs on the CPU (got --device {})",
                sel.device
            );
            let loaded = sel.load()?;
            let mut stats = Vec::new();
            for (n, p) in parse_domains(&data)? {
                let ds = data::Dataset::open_for(&p, &sel.model, loaded.model.cfg.vocab_size)?;
                let windows: Vec<Vec<u32>> = shards::eval_batches(&ds.valid, 1, seq, tokens, &n)?
                    .into_iter()
                    .map(|(i, _)| i)
                    .collect();
                stats.push(routing::analyze(&loaded.model, &n, &windows)?);
            }
            print!("{}", routing::markdown(&stats, &loaded.expert_names));
            let svg = routing::heatmap_svg(
                &stats,
                &loaded.expert_names,
                &format!(
                    "Mean router probability per expert, {}",
                    sel.model.display()
                ),
            );
            flexrun::fsutil::write_bytes_atomic(&out, svg.as_bytes())?;
            println!("heatmap written to {}", out.display());
        }
        Cmd::Compare(a) => {
            ensure!(
                a.sel.device == "cpu",
                "compare runs on the CPU (got --device {})",
                a.sel.device
            );
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
            let tok = Tokenizer::load(&a.sel.model.join("tokenizer.json"))?;
            let batches =
                shards::eval_batches(&ds.valid, 8, a.seq, a.tokens, &a.data.display().to_string())?;
            let gap = eval::compare::token_gap(
                &Evaluated::Model(&loaded.model),
                &Evaluated::Model(&reference),
                &batches,
                a.seq,
                counts.as_deref(),
                &tok,
                a.top,
            )?;
            print!("{}", eval::compare::markdown(&gap));
            if let Some(j) = a.json {
                flexrun::fsutil::write_bytes_atomic(
                    &j,
                    serde_json::to_string_pretty(&gap)?.as_bytes(),
                )?;
            }
        }
        Cmd::Extract(a) => {
            let gpu = gpu_for(&a.sel.device)?;
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
            let gpu_model;
            let e = match &gpu {
                Some(dev) => {
                    gpu_model = GpuModel::upload(dev, &loaded.model)?;
                    Evaluated::Gpu(&gpu_model)
                }
                None => Evaluated::Model(&loaded.model),
            };
            let bar = indicatif::ProgressBar::new(cfg.docs as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "extract [{bar:30}] {pos}/{len} docs eta {eta}",
                )
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
            println!(
                "{what}: {} of {} documents extracted ({:.2}%), mean best similarity {:.3}",
                r.extracted,
                r.docs,
                100.0 * r.rate,
                r.mean_best_similarity
            );
            if let Some(j) = a.json {
                let v = serde_json::json!({ "model": a.sel.model, "data": a.data, "config": cfg, "result": r });
                flexrun::fsutil::write_bytes_atomic(
                    &j,
                    serde_json::to_string_pretty(&v)?.as_bytes(),
                )?;
            }
        }
        Cmd::Demo(a) => {
            let mut c = if a.quick {
                demo::DemoConfig::quick()
            } else {
                demo::DemoConfig::default()
            };
            c.seed = a.seed;
            c.ablations = a.ablations;
            c.corpus = a.corpus.clone();
            c.device = a.device.clone();
            // Each flag given overrides the configuration's field of the same name.
            macro_rules! override_fields {
                ($($f:ident),*) => {$(
                    if let Some(v) = a.$f {
                        c.$f = v;
                    }
                )*};
            }
            override_fields!(
                public_mix,
                public_anchor,
                bpe_dropout,
                vocab,
                hidden,
                layers,
                heads,
                intermediate,
                public_steps,
                top_k
            );
            if let Some(w) = &a.public_anchor_layers {
                c.public_anchor_layers = Some(w.clone());
            }
            if let Some(s) = a.expert_steps {
                c.expert_steps = s;
                c.dense_steps = s;
            }
            demo::run(&c, &a.out, a.quiet)?;
            print!("{}", std::fs::read_to_string(a.out.join("results.md"))?);
            println!(
                "\nresults: {}, {}; routing heatmap: {}; loss curves: {}",
                a.out.join("results.md").display(),
                a.out.join("results.json").display(),
                a.out.join("routing.svg").display(),
                a.out.join("loss_curves.svg").display()
            );
        }
    }
    Ok(())
}

/// `--help` and `--version` print and exit 0; any other argument error is one line on stderr and
/// exit status 1, like every other error (clap's own report is several lines with exit 2).
fn exit_on_parse_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        std::process::exit(0);
    }
    let what = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "no command given".to_string()
    } else {
        // clap's first paragraph, on one line: "the following required arguments were not
        // provided: --public <PUBLIC> --data <DATA>".
        let text = e.render().to_string();
        let para: Vec<&str> = text
            .lines()
            .map(str::trim)
            .skip_while(|l| l.is_empty())
            .take_while(|l| !l.is_empty())
            .collect();
        let line = para.join(" ");
        line.strip_prefix("error: ").unwrap_or(&line).to_string()
    };
    // The command the arguments were for, so that its help is one copy-paste away.
    let cmd: Vec<String> = std::env::args()
        .skip(1)
        .take_while(|a| !a.starts_with('-'))
        .take(2)
        .collect();
    let help = match cmd.is_empty() {
        true => "flexrun --help".to_string(),
        false => format!("flexrun {} --help", cmd.join(" ")),
    };
    eprintln!("error: {what} (see {help})");
    std::process::exit(1);
}

fn main() {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`flexrun ... | head`)
    // instead of panicking on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_on_parse_error(e),
    };
    // Training and evaluation keep their freed activation buffers in the process (see
    // `tune_allocator`); set before the first allocation of any worker thread.
    if matches!(
        cli.cmd,
        Cmd::Pretrain(_)
            | Cmd::TrainExpert(_)
            | Cmd::Finetune { .. }
            | Cmd::RouterTune { .. }
            | Cmd::Demo(_)
            | Cmd::Eval(_)
            | Cmd::Extract(_)
    ) {
        flexrun::backend::cpu::tune_allocator();
    }
    if let Some(t) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
        {
            eprintln!("error: cannot set up {t} threads: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
