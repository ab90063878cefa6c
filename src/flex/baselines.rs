//! Baselines and router tuning: dense experts ([`finetune`]), the parameter average ([`soup`]),
//! and router tuning on proxy data ([`router_tune`]), which gives up strict opt-out.

use super::*;
use crate::backend::Device;
use crate::data::shards::Dataset;
use crate::ensure;
use crate::error::{Context, Result};
use crate::model::{checkpoint, Model};
use crate::tensor::Tensor;
use crate::train::data::ShardBatches;
use crate::train::pretrain::VALID_TOKENS;
use crate::train::{TrainConfig, TrainSummary, Trainer};
use std::path::{Path, PathBuf};

/// Router tuning: everything frozen but the router rows (and biases); trained on proxy data.
/// The manifest records that strict opt-out no longer holds.
#[allow(clippy::too_many_arguments)]
pub fn router_tune(
    model_dir: &Path,
    data: &[PathBuf],
    tcfg: &TrainConfig,
    out: &Path,
    run_dir: &Path,
    resume: bool,
    quiet: bool,
    device: &Device,
) -> Result<TrainSummary> {
    tcfg.check()?;
    crate::fsutil::check_model_out(out)?;
    let mut inputs: Vec<&Path> = vec![model_dir];
    inputs.extend(data.iter().map(PathBuf::as_path));
    crate::fsutil::check_not_input(out, "--out", &inputs)?;
    let loaded = load_model(model_dir, &Selection::default())?;
    let mut model = loaded.model;
    let tuned_hash = model_hash(&model);
    ensure!(
        model.cfg.is_moe(),
        "{} is dense: router tuning needs a merged FlexOlmo model",
        model_dir.display()
    );
    ensure!(
        !data.is_empty(),
        "router tuning needs at least one proxy dataset"
    );
    let sets: Vec<Dataset> = data
        .iter()
        .map(|d| Dataset::open_for(d, model_dir, model.cfg.vocab_size))
        .collect::<Result<_>>()?;
    let tag = serde_json::json!({
        "kind": "router-tune",
        "model_hash": tuned_hash,
        "data": sets.iter().map(Dataset::fingerprint).collect::<Vec<_>>(),
    });
    let summary = train_router(&mut model, &sets, tcfg, run_dir, tag, resume, quiet, device)?;
    let mut manifest = loaded.manifest.unwrap_or_else(|| Manifest {
        public_hash: String::new(),
        experts: (0..model.cfg.experts())
            .map(|i| ManifestExpert {
                name: i.to_string(),
                domain: String::new(),
                tokens_seen: 0,
                bias: None,
                bias_offset: None,
                source: String::new(),
            })
            .collect(),
        top_k: model.cfg.top_k(),
        router_tuned: false,
        strict_opt_out: true,
    });
    manifest.router_tuned = true;
    manifest.strict_opt_out = false;
    write_model(&model, Some(&manifest), model_dir, out)?;
    Ok(summary)
}

/// Train only the router rows (and biases) of `model` on `sets`, mixed evenly; everything else
/// stays frozen (router tuning, and the router of the BTX baseline).
#[allow(clippy::too_many_arguments)]
pub(super) fn train_router(
    model: &mut Model,
    sets: &[Dataset],
    tcfg: &TrainConfig,
    run_dir: &Path,
    tag: serde_json::Value,
    resume: bool,
    quiet: bool,
    device: &Device,
) -> Result<TrainSummary> {
    for p in model.params.params.iter_mut() {
        p.trainable = p.name.contains(".mlp.gate.");
    }
    let trained = model.params.trainable_numel() as u128;
    model
        .cfg
        .check_training_memory(tcfg.batch, tcfg.seq, Some(trained))?;
    let mut tr = Trainer::start(model, tcfg.clone(), run_dir, tag, quiet, device, resume)?;
    let b = MixedBatches {
        sets: sets.iter().map(|d| (d, 1.0)).collect(),
        valid_sets: (0..sets.len()).collect(),
        anchor_sets: vec![],
        private_set: None,
        batch: tcfg.batch,
        seq: tcfg.seq,
        seed: tcfg.seed,
    };
    tr.run(&b)
}

/// Dense expert baseline: the public model with every weight fine-tuned on one domain. With
/// `only` non-empty, just the parameters whose Hugging Face name contains one of its strings are
/// trained (e.g. `mlp` and `lm_head`: how much of a dense expert's gain the FFNs and the output
/// layer carry); the rest stay frozen, with no gradient memory. With `device`, the training
/// runs on that GPU.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    public_dir: &Path,
    data_dir: &Path,
    tcfg: &TrainConfig,
    only: &[String],
    out: &Path,
    run_dir: &Path,
    resume: bool,
    quiet: bool,
    device: &Device,
) -> Result<(Model, TrainSummary)> {
    ensure!(
        only.iter().all(|s| !s.is_empty()),
        "--only takes non-empty parameter name parts"
    );
    tcfg.check()?;
    crate::fsutil::check_model_out(out)?;
    crate::fsutil::check_not_input(out, "--out", &[public_dir, data_dir])?;
    let mut model = checkpoint::load(public_dir)?;
    let base_hash = model_hash(&model);
    for p in model.params.params.iter_mut() {
        p.trainable = only.is_empty() || only.iter().any(|s| p.name.contains(s.as_str()));
    }
    ensure!(
        model.params.trainable_numel() > 0,
        "--only {}: no parameter of {} has such a name (names look like model.layers.0.mlp.up_proj.weight, lm_head.weight)",
        only.join(","),
        public_dir.display()
    );
    let trained = model.params.trainable_numel() as u128;
    model
        .cfg
        .check_training_memory(tcfg.batch, tcfg.seq, Some(trained))?;
    let data = Dataset::open_for(data_dir, public_dir, model.cfg.vocab_size)?;
    let summary = {
        let tag = serde_json::json!({
            "kind": "finetune",
            "base_hash": base_hash,
            "only": only,
            "data": data.fingerprint(),
        });
        let mut tr = Trainer::start(
            &mut model,
            tcfg.clone(),
            run_dir,
            tag,
            quiet,
            device,
            resume,
        )?;
        let b = ShardBatches {
            data: &data,
            batch: tcfg.batch,
            seq: tcfg.seq,
            seed: tcfg.seed,
            valid_tokens: VALID_TOKENS,
        };
        tr.run(&b)?
    };
    write_model(&model, None, public_dir, out)?;
    Ok((model, summary))
}

/// Model soup: the uniform average of the parameters of models with identical structure.
pub fn soup(models: &[Model]) -> Result<Model> {
    ensure!(!models.is_empty(), "soup needs at least one model");
    let first = &models[0];
    let mut ps = first.params.clone();
    for p in ps.params.iter_mut() {
        let mut acc = vec![0f32; p.value.numel()];
        for m in models {
            let q = m
                .params
                .id(&p.name)
                .with_context(|| format!("soup: a model lacks {}", p.name))?;
            let v = m.params.value(q);
            ensure!(
                v.shape() == p.value.shape(),
                "soup: {} has different shapes",
                p.name
            );
            for (a, b) in acc.iter_mut().zip(v.data()) {
                *a += b / models.len() as f32;
            }
        }
        p.value = Tensor::from_vec(acc, p.value.shape());
    }
    Model::from_params(first.cfg.clone(), ps)
}
