//! Resumable training checkpoints: `checkpoint/` holds the weights, optimizer.safetensors
//! (AdamW moments by parameter name) and trainer_state.json (step, tokens, training settings).
//! The weights: config.json + model.safetensors (f32) when every parameter trains; when some are
//! frozen (expert training, router tuning), trained.safetensors with the trained parameters only
//! and, in the state, a hash of the frozen ones: the run's own inputs rebuild them, and a resume
//! whose frozen weights differ is refused. Large files are written in shards with an index. The
//! directory is written beside the old one and swapped in by renames, so a crash leaves either
//! the previous or the new checkpoint, never a mix.

use super::optim::AdamW;
use super::TrainConfig;
use crate::error::{Context, Result};
use crate::fsutil::write_bytes_atomic;
use crate::model::{checkpoint as mckpt, Model};
use crate::tensor::{DType, Tensor};
use crate::{bail, ensure};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Serialize, Deserialize)]
struct State {
    step: u64,
    tokens: u64,
    adam_step: u64,
    cfg: TrainConfig,
    #[serde(default)]
    tag: serde_json::Value,
    /// Parameters with AdamW moments when written (absent in older checkpoints).
    #[serde(default)]
    moments: Option<usize>,
    /// With frozen parameters: their hash ([`frozen_hash`]); the checkpoint then holds the
    /// trained parameters only (trained.safetensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    frozen_hash: Option<String>,
}

/// FNV-1a over the name, shape and f32 values of every frozen parameter of `model`, in id
/// order; None when every parameter trains.
pub fn frozen_hash(model: &Model) -> Option<String> {
    let frozen: Vec<_> = model
        .params
        .params
        .iter()
        .filter(|p| !p.trainable)
        .collect();
    if frozen.is_empty() {
        return None;
    }
    let mut h = crate::hash::Fnv::default();
    for p in frozen {
        h.update(p.name.as_bytes());
        for d in p.value.shape() {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(bytemuck::cast_slice(p.value.to_dtype(DType::F32).data()));
    }
    Some(h.hex())
}

pub struct Restored {
    pub step: u64,
    pub tokens: u64,
    pub cfg: TrainConfig,
    pub opt: AdamW,
    pub tag: serde_json::Value,
    /// The frozen parameters' hash the checkpoint was written with (None: it holds every
    /// parameter); the caller compares it with its own model's.
    pub frozen_hash: Option<String>,
}

#[allow(clippy::too_many_arguments)]
pub fn write(
    dir: &Path,
    model: &Model,
    opt: &AdamW,
    cfg: &TrainConfig,
    step: u64,
    tokens: u64,
    tag: &serde_json::Value,
    frozen: Option<&str>,
) -> Result<()> {
    let parent = dir.parent().context("checkpoint path has no parent")?;
    let name = dir
        .file_name()
        .context("checkpoint path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    match frozen {
        Some(_) => {
            let trained: Vec<(String, Tensor)> = model
                .params
                .params
                .iter()
                .filter(|p| p.trainable)
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect();
            mckpt::write_tensor_files(
                &tmp,
                "trained",
                &trained,
                DType::F32,
                mckpt::MAX_SHARD_BYTES,
            )?;
        }
        None => mckpt::write_files(model, &tmp, DType::F32)?,
    }
    let mut moments = Vec::new();
    for (id, m) in opt.moments.iter().enumerate() {
        if let Some((m, v)) = m {
            let p = &model.params.params[id];
            moments.push((
                format!("m.{}", p.name),
                Tensor::from_vec(m.clone(), p.value.shape()),
            ));
            moments.push((
                format!("v.{}", p.name),
                Tensor::from_vec(v.clone(), p.value.shape()),
            ));
        }
    }
    mckpt::write_tensor_files(
        &tmp,
        "optimizer",
        &moments,
        DType::F32,
        mckpt::MAX_SHARD_BYTES,
    )?;
    let state = State {
        step,
        tokens,
        adam_step: opt.step,
        cfg: cfg.clone(),
        tag: tag.clone(),
        moments: Some(opt.moments.iter().filter(|m| m.is_some()).count()),
        frozen_hash: frozen.map(str::to_string),
    };
    write_bytes_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("installing {}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Restore parameters into `model` (matched by name; the structure must be the same) and return
/// the optimizer and loop state.
pub fn read(dir: &Path, model: &mut Model) -> Result<Restored> {
    let mut dir = dir.to_path_buf();
    if !dir.exists() {
        // A crash between the two renames of `write` leaves only the previous checkpoint aside.
        let old = dir.with_file_name(format!(
            ".{}.old",
            dir.file_name().unwrap().to_string_lossy()
        ));
        ensure!(
            old.exists(),
            "no checkpoint to resume from at {}",
            dir.display()
        );
        dir = old;
    }
    let state_path = dir.join("trainer_state.json");
    let text =
        crate::fsutil::read_text(&state_path, "trainer state", crate::fsutil::MAX_JSON_BYTES)?;
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("{} is corrupt", state_path.display()))?;
    match &state.frozen_hash {
        None => restore_all(&dir, model)?,
        Some(_) => restore_trained(&dir, model)?,
    }
    let moments = mckpt::read_tensors(&mckpt::tensor_files(&dir, "optimizer")?, false)?;
    let by_name: std::collections::HashMap<String, Tensor> = moments.into_iter().collect();
    let mut opt = AdamW::new(state.cfg.adamw, model.params.len());
    opt.step = state.adam_step;
    for (id, p) in model.params.params.iter().enumerate() {
        if let (Some(m), Some(v)) = (
            by_name.get(&format!("m.{}", p.name)),
            by_name.get(&format!("v.{}", p.name)),
        ) {
            ensure!(
                m.shape() == p.value.shape() && v.shape() == p.value.shape(),
                "{}: the optimizer moments of {} have the wrong shape",
                dir.display(),
                p.name
            );
            opt.moments[id] = Some((m.data().to_vec(), v.data().to_vec()));
        }
    }
    // Restarting the moments of a trained parameter would not continue the run exactly.
    let found = opt.moments.iter().filter(|m| m.is_some()).count();
    if let Some(want) = state.moments {
        ensure!(
            found == want,
            "{}: optimizer.safetensors holds the AdamW moments of {found} parameters, the checkpoint was written with {want}: the run cannot resume exactly",
            dir.display()
        );
    }
    Ok(Restored {
        step: state.step,
        tokens: state.tokens,
        cfg: state.cfg,
        opt,
        tag: state.tag,
        frozen_hash: state.frozen_hash,
    })
}

/// Every parameter of `model` from the checkpoint's model files.
fn restore_all(dir: &Path, model: &mut Model) -> Result<()> {
    let saved = mckpt::load(dir)?;
    ensure!(
        saved.cfg.hidden_size == model.cfg.hidden_size
            && saved.cfg.num_hidden_layers == model.cfg.num_hidden_layers
            && saved.cfg.vocab_size == model.cfg.vocab_size
            && saved.cfg.experts() == model.cfg.experts(),
        "checkpoint at {} is for a different model shape",
        dir.display()
    );
    for p in model.params.params.iter_mut() {
        let Some(id) = saved.params.id(&p.name) else {
            bail!("checkpoint lacks parameter {}", p.name)
        };
        set_value(dir, p, saved.params.value(id))?;
    }
    Ok(())
}

/// The trained parameters of `model` from trained.safetensors, which must hold exactly those.
fn restore_trained(dir: &Path, model: &mut Model) -> Result<()> {
    let tensors = mckpt::read_tensors(&mckpt::tensor_files(dir, "trained")?, false)?;
    let mut by_name: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    for p in model.params.params.iter_mut().filter(|p| p.trainable) {
        let Some(v) = by_name.remove(&p.name) else {
            bail!(
                "{}: the checkpoint lacks trained parameter {} (it was written for another run)",
                dir.display(),
                p.name
            )
        };
        set_value(dir, p, &v)?;
    }
    if let Some(name) = by_name.keys().min() {
        bail!(
            "{}: the checkpoint trained {name}, which this run does not train",
            dir.display()
        );
    }
    Ok(())
}

fn set_value(dir: &Path, p: &mut crate::model::Param, v: &Tensor) -> Result<()> {
    ensure!(
        v.shape() == p.value.shape(),
        "{}: checkpoint parameter {} has shape {:?}, model {:?}",
        dir.display(),
        p.name,
        v.shape(),
        p.value.shape()
    );
    p.value = v.clone();
    Ok(())
}
