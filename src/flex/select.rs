//! Opt-out at load time: a model directory with a [`Selection`] of experts ([`load_model`]).

use super::*;
use crate::ensure;
use crate::error::{Context, Result};
use crate::model::{checkpoint, Model};
use std::path::Path;

/// Which experts to keep when loading: `exclude` names (or indices for checkpoints without a
/// manifest) to drop, or `only` the listed ones.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub exclude: Vec<String>,
    pub only: Vec<String>,
    /// Override the checkpoint's top-k (clamped to the number of remaining experts).
    pub top_k: Option<usize>,
    /// Keep bf16 weights in bf16 (inference only: such a model cannot be trained).
    pub keep_bf16: bool,
}

pub struct Loaded {
    pub model: Model,
    pub manifest: Option<Manifest>,
    /// Names of the experts kept, in order (indices as strings without a manifest).
    pub expert_names: Vec<String>,
}

/// Load a model directory and apply an expert selection (opt-out at load time).
pub fn load_model(dir: &Path, sel: &Selection) -> Result<Loaded> {
    crate::ensure!(
        dir.is_dir(),
        "model directory {} does not exist",
        dir.display()
    );
    // The weights and the manifest come from one directory, even if a merge replaces it
    // meanwhile: an expert's name must never select another expert's weights.
    let pin = crate::fsutil::PinnedDir::open(dir)?;
    let model = checkpoint::load_with(pin.path(), sel.keep_bf16).map_err(|e| pin.explain(e))?;
    let manifest = Manifest::load(pin.path()).map_err(|e| pin.explain(e))?;
    if !model.cfg.is_moe() {
        ensure!(
            sel.exclude.is_empty() && sel.only.is_empty(),
            "{} is a dense model: it has no experts to select",
            dir.display()
        );
        return Ok(Loaded {
            model,
            manifest,
            expert_names: vec![],
        });
    }
    let e = model.cfg.experts();
    let names: Vec<String> = match &manifest {
        Some(m) => {
            ensure!(
                m.experts.len() == e,
                "{}: the manifest lists {} experts, the checkpoint has {e}",
                dir.display(),
                m.experts.len()
            );
            m.experts.iter().map(|x| x.name.clone()).collect()
        }
        None => (0..e).map(|i| i.to_string()).collect(),
    };
    let find = |n: &str| -> Result<usize> {
        names
            .iter()
            .position(|x| x == n)
            .or_else(|| {
                if manifest.is_some() {
                    None
                } else {
                    n.parse().ok().filter(|&i: &usize| i < e)
                }
            })
            .with_context(|| {
                format!(
                    "no expert '{n}' in {} (experts: {})",
                    dir.display(),
                    names.join(", ")
                )
            })
    };
    let mut keep: Vec<usize> = if sel.only.is_empty() {
        (0..e).collect()
    } else {
        sel.only.iter().map(|n| find(n)).collect::<Result<_>>()?
    };
    for x in &sel.exclude {
        let i = find(x)?;
        keep.retain(|&k| k != i);
    }
    keep.sort_unstable();
    keep.dedup();
    ensure!(!keep.is_empty(), "the selection leaves no expert");
    if let Some(m) = &manifest {
        if !m.strict_opt_out && keep.len() < e {
            crate::note!("note: {} was router-tuned; without expert(s) it is not identical to a model that never had them", dir.display());
        }
    }
    let mut model = if keep.len() == e {
        model
    } else {
        model.select_experts(&keep)?
    };
    if let Some(k) = sel.top_k {
        ensure!(k >= 1, "--expert-top-k must be at least 1");
        model.cfg.num_experts_per_tok = Some(k.min(keep.len()));
    }
    let mut manifest = manifest;
    if let Some(m) = manifest.as_mut() {
        m.experts = keep.iter().map(|&i| m.experts[i].clone()).collect();
        m.top_k = model.cfg.top_k();
    }
    Ok(Loaded {
        model,
        manifest,
        expert_names: keep.iter().map(|&i| names[i].clone()).collect(),
    })
}
