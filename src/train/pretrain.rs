//! `flexrun pretrain`: train a dense (or MoE) model from scratch on one prepared dataset.

use super::data::ShardBatches;
use super::{TrainConfig, TrainSummary, Trainer};
use crate::backend::Device;
use crate::data::shards::Dataset;
use crate::ensure;
use crate::error::Result;
use crate::model::{checkpoint, Config, Model};
use crate::tensor::DType;
use std::path::Path;

/// Validation tokens per evaluation.
pub const VALID_TOKENS: usize = 1 << 16;

/// Pretrain `cfg` on `data_dir`, writing the run (log, checkpoint) and the final model
/// (config.json, model.safetensors, tokenizer.json when the data dir has one) to `out`; on
/// `device` when given (see [`Trainer::device`]).
pub fn pretrain(
    data_dir: &Path,
    cfg: &Config,
    tcfg: &TrainConfig,
    out: &Path,
    resume: bool,
    quiet: bool,
    device: &Device,
) -> Result<(Model, TrainSummary)> {
    tcfg.check()?;
    crate::fsutil::check_model_out(out)?;
    cfg.validate()?;
    cfg.check_training_memory(tcfg.batch, tcfg.seq, None)?;
    let data = Dataset::open(data_dir)?;
    // The tokenizer copied beside the model must be the one the data was prepared with.
    let tok = crate::fsutil::confined(data_dir, "tokenizer.json", "tokenizer")?;
    if tok.exists() {
        ensure!(
            crate::data::Tokenizer::file_hash(&tok)? == data.meta.tokenizer_hash,
            "{} is not the tokenizer {} was prepared with",
            tok.display(),
            data_dir.display()
        );
    }
    ensure!(
        data.meta.vocab_size <= cfg.vocab_size,
        "the data's vocabulary ({}) exceeds the model's vocab_size ({})",
        data.meta.vocab_size,
        cfg.vocab_size
    );
    let mut model = Model::new_random(cfg, tcfg.seed)?;
    let summary = {
        let mut tr = Trainer::start(
            &mut model,
            tcfg.clone(),
            out,
            serde_json::json!({ "kind": "pretrain", "data": data.fingerprint() }),
            quiet,
            device,
            resume,
        )?;
        let batches = ShardBatches {
            data: &data,
            batch: tcfg.batch,
            seq: tcfg.seq,
            seed: tcfg.seed,
            valid_tokens: VALID_TOKENS,
        };
        tr.run(&batches)?
    };
    export(&model, data_dir, out)?;
    Ok((model, summary))
}

/// Write the final model and copy the data's tokenizer beside it.
pub fn export(model: &Model, data_dir: &Path, out: &Path) -> Result<()> {
    let tok = crate::fsutil::confined(data_dir, "tokenizer.json", "tokenizer")?;
    let mut extra = Vec::new();
    if tok.exists() {
        let bytes = crate::fsutil::read_regular(&tok, "tokenizer", crate::fsutil::MAX_JSON_BYTES)?;
        extra.push(("tokenizer.json", bytes));
    }
    checkpoint::save_with(model, out, DType::F32, &extra)
}
