//! Options shared by several commands, declared once: the device, a model with its expert
//! selection, training settings, a new model's shape; and small argument parsers.

use clap::Args;
use flexrun::backend::{Device, DeviceChoice};
use flexrun::data::Tokenizer;
use flexrun::error::{Context, Result};
use flexrun::flex;
use flexrun::model::Config;
use flexrun::train::{optim::AdamWConfig, TrainConfig};
use flexrun::{bail, ensure};
use std::path::{Path, PathBuf};

/// Where a command computes; one flag, one default, on every command.
#[derive(Args, Clone, Copy)]
pub struct DeviceOpts {
    /// auto: the GPU when one can be used, else the CPU; cpu: f32, the reference; cuda:
    /// flexrun's kernels on the GPU (bf16 weights and activations, f32 statistics, master
    /// weights and optimizer state).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

impl DeviceOpts {
    /// Open the device (once per command).
    pub fn open(&self) -> Result<Device> {
        Device::open(self.device)
    }

    /// The device for `what`, which has no GPU path yet: the CPU, unless cuda was asked for.
    pub fn cpu_only(&self, what: &str) -> Result<Device> {
        ensure!(
            self.device != DeviceChoice::Cuda,
            "{what} has no GPU path yet: use --device cpu (or auto)"
        );
        Ok(Device::cpu())
    }
}

/// A model directory and the experts to use from it (opt-out at load time).
#[derive(Args, Clone)]
pub struct SelectOpts {
    /// The model directory (a checkpoint; a merged FlexOlmo model names its experts in
    /// flexolmo.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Experts to leave out (names from flexolmo.json, or indices for plain checkpoints).
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Use only these experts.
    #[arg(long, value_delimiter = ',')]
    pub experts: Vec<String>,
    /// Experts per token (default: the checkpoint's).
    #[arg(long)]
    pub expert_top_k: Option<usize>,
}

impl SelectOpts {
    pub fn load(&self) -> Result<flex::Loaded> {
        let sel = flex::Selection {
            exclude: self.exclude.clone(),
            only: self.experts.clone(),
            top_k: self.expert_top_k,
            keep_bf16: true,
        };
        flex::load_model(&self.model, &sel)
    }
}

/// Optimisation settings shared by every training command.
#[derive(Args, Clone)]
pub struct TrainOpts {
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f32,
    #[arg(long, default_value_t = 30)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f32,
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validate every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    #[arg(long, default_value_t = 1e-5)]
    pub z_loss: f32,
    #[arg(long, default_value_t = 1e-3)]
    pub router_z_loss: f32,
    /// Keep only each layer's input and recompute its activations in the backward (the same
    /// gradients in less memory, about a third more compute).
    #[arg(long)]
    pub recompute: bool,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceOpts,
}

impl TrainOpts {
    /// The training configuration, checked (every setting that cannot train is an error here,
    /// before any data is read).
    pub fn config(&self) -> Result<TrainConfig> {
        let c = TrainConfig {
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
            recompute: self.recompute,
        };
        c.check()?;
        Ok(c)
    }
}

/// Model shape for commands that create a model (ignored when --config is given).
#[derive(Args, Clone)]
pub struct ShapeOpts {
    /// A Hugging Face config.json to build the model from.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long, default_value_t = 352)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_pos: usize,
}

impl ShapeOpts {
    pub fn config(&self, vocab: usize) -> Result<Config> {
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

/// Comma-separated token ids ("" gives none; an empty item between commas is an error).
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
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

/// Domains given as NAME=DIR.
pub fn parse_domains(specs: &[String]) -> Result<Vec<(String, PathBuf)>> {
    specs
        .iter()
        .map(|s| {
            let (n, p) = s
                .split_once('=')
                .with_context(|| format!("'{s}' is not NAME=DIR"))?;
            ensure!(!n.is_empty(), "'{s}' names no domain");
            Ok((n.to_string(), PathBuf::from(p)))
        })
        .collect()
}

/// The tokenizer given, or the model directory's.
pub fn load_tokenizer_for(model_dir: &Path, explicit: Option<&PathBuf>) -> Result<Tokenizer> {
    let path = match explicit {
        Some(p) => p.clone(),
        None => flexrun::fsutil::confined(model_dir, "tokenizer.json", "tokenizer")?,
    };
    if !path.exists() {
        bail!(
            "no tokenizer at {} (pass --tokenizer or use --ids)",
            path.display()
        );
    }
    Tokenizer::load(&path)
}
