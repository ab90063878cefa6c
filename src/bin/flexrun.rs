//! The flexrun command line: parses arguments, calls the library, prints results.
//! Every error is printed as one line on stderr with exit status 1.

use clap::{Args, Parser, Subcommand};
use flexrun::data::{self, shards, synth, tokenizer, Tokenizer};
use flexrun::error::{Context, Result};
use flexrun::generate::{self, SamplingConfig};
use flexrun::model::{checkpoint, Config};
use flexrun::train::{self, optim::AdamWConfig, TrainConfig};
use flexrun::{bail, ensure};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "flexrun", version, about = "FlexOlmo from scratch: train, merge and serve mixture-of-experts language models")]
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
            adamw: AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: 1e-8, weight_decay: self.weight_decay },
            clip: self.clip,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            z_loss: self.z_loss,
            router_z_loss: self.router_z_loss,
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
        let mut c = Config::olmo2(vocab, self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads.unwrap_or(self.heads));
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
    #[arg(long)]
    model: PathBuf,
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
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: String,
    /// Print JSON (the only format).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Full training steps (forward, backward, AdamW) on random tokens.
    Train {
        #[arg(long)]
        config: PathBuf,
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

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse::<u32>().map_err(|_| flexrun::Error(format!("'{x}' is not a token id"))))
        .collect()
}

fn load_tokenizer_for(model_dir: &Path, explicit: Option<&PathBuf>) -> Result<Tokenizer> {
    let path = explicit.cloned().unwrap_or_else(|| model_dir.join("tokenizer.json"));
    ensure!(path.exists(), "no tokenizer at {} (pass --tokenizer or use --ids)", path.display());
    Tokenizer::load(&path)
}

fn check_device(device: &str) -> Result<()> {
    match device {
        "cpu" => Ok(()),
        "cuda" => bail!("this build of flexrun has no CUDA backend; use --device cpu"),
        other => bail!("unknown device '{other}' (expected cpu or cuda)"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Data(DataCmd::Synth { out, seed, docs }) => {
            let mut cfg = synth::SynthConfig { seed, ..Default::default() };
            if let Some(d) = docs {
                cfg.docs_per_domain = d;
            }
            synth::write_corpus(&out, &cfg)?;
            println!("wrote {} domains ({}) to {}", synth::DOMAINS.len(), synth::DOMAINS.join(", "), out.display());
        }
        Cmd::Data(DataCmd::Prepare { input, tokenizer, out, valid_fraction, seed }) => {
            let tok = Tokenizer::load(&tokenizer)?;
            let meta = shards::prepare(&input, &tok, &out, valid_fraction, seed)?;
            let bytes = std::fs::read(&tokenizer).with_context(|| format!("reading {}", tokenizer.display()))?;
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
            let (model, s) = train::pretrain::pretrain(&a.data, &cfg, &tcfg, &a.out, a.train.resume, a.train.quiet)?;
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
            let model = checkpoint::load(&a.model)?;
            let tok = if a.ids.is_none() { Some(load_tokenizer_for(&a.model, a.tokenizer.as_ref())?) } else { None };
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
            let mut out = std::io::stdout().lock();
            let mut produced: Vec<u32> = Vec::new();
            let mut printed = 0usize;
            if let (Some(p), Some(_)) = (&a.prompt, &tok) {
                write!(out, "{p}")?;
            }
            let mut decode_err = None;
            generate::generate(&model, &prompt, &cfg, |t| {
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
            })?;
            writeln!(out)?;
            if let Some(e) = decode_err {
                return Err(e);
            }
        }
        Cmd::Logits(a) => {
            let _ = a.json;
            let model = checkpoint::load(&a.model)?;
            let ids = parse_ids(&a.ids)?;
            ensure!(!ids.is_empty(), "--ids is empty");
            let l = model.logits(&ids, 1, ids.len())?;
            let rows: Vec<&[f32]> = (0..ids.len()).map(|i| l.row(i)).collect();
            println!("{}", serde_json::json!({ "logits": rows }));
        }
        Cmd::Bench(BenchCmd::Train { config, batch, seq, steps, warmup, device, json }) => {
            check_device(&device)?;
            let cfg = Config::load(&config)?;
            let r = flexrun::bench::train_step(&cfg, batch, seq, steps, warmup)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: batch {batch} x seq {seq}, {} params: {:.1} ms/step, {:.0} tokens/s ({} threads)",
                    config.display(),
                    r.params,
                    r.step_ms,
                    r.tokens_per_s,
                    r.threads
                );
            }
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(t.max(1)).build_global() {
            eprintln!("error: cannot set up {t} threads: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
