//! `flexrun pretrain`, `generate` and `logits`: a public model from scratch, and running a model.

use crate::opts::{load_tokenizer_for, parse_ids, DeviceOpts, SelectOpts, ShapeOpts, TrainOpts};
use clap::Args;
use flexrun::data;
use flexrun::error::Result;
use flexrun::generate::{self, SamplingConfig};
use flexrun::model::runner::Placed;
use flexrun::train;
use flexrun::{bail, ensure};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct PretrainArgs {
    /// Prepared data directory (from `flexrun data prepare`).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub shape: ShapeOpts,
    #[command(flatten)]
    pub train: TrainOpts,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub sel: SelectOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    /// Text prompt (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "ids")]
    pub prompt: Option<String>,
    /// Comma-separated prompt token ids.
    #[arg(long)]
    pub ids: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenizer file (default: tokenizer.json in the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub sel: SelectOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    /// Comma-separated token ids.
    #[arg(long)]
    pub ids: String,
    /// Print JSON (the only format).
    #[arg(long)]
    pub json: bool,
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let meta = data::Dataset::open(&a.data)?.meta;
    let cfg = a.shape.config(meta.vocab_size)?;
    let tcfg = a.train.config()?;
    let device = a.train.device.open()?;
    let (model, s) = train::pretrain::pretrain(
        &a.data,
        &cfg,
        &tcfg,
        &a.out,
        a.train.resume,
        a.train.quiet,
        &device,
    )?;
    outln!(
        "pretrained {} parameters for {} steps ({} tokens, {:.0} tok/s): train ce {:.4}, valid ce {}; model in {}",
        model.params.numel(),
        s.steps,
        s.tokens,
        s.tokens_per_s,
        s.final_ce,
        s.valid_ce.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        a.out.display()
    );
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
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
    let device = a.device.open()?;
    let placed = Placed::new(&model, &device)?;
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
    generate::generate(placed.runner(), &prompt, &cfg, on_token)?;
    writeln!(out)?;
    if let Some(e) = decode_err {
        return Err(e);
    }
    Ok(())
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let _ = a.json;
    let model = a.sel.load()?.model;
    let ids = parse_ids(&a.ids)?;
    ensure!(!ids.is_empty(), "--ids is empty");
    let device = a.device.open()?;
    let l = Placed::new(&model, &device)?
        .runner()
        .logits(&ids, 1, ids.len())?;
    let rows: Vec<&[f32]> = (0..ids.len()).map(|i| l.row(i)).collect();
    outln!("{}", serde_json::json!({ "logits": rows }));
    Ok(())
}
