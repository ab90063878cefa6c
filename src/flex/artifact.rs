//! The expert artifact a data owner ships: per layer, the new expert FFN, its router row r_i and
//! bias b_i, plus the public router row r_pub it was trained beside, and metadata (name, domain,
//! tokens seen, hyperparameters, the hash of the public model it was trained against).
//! One safetensors file; metadata lives in the header under `flexrun_expert`.

use crate::error::{Context, Result};
use crate::fsutil::write_bytes_atomic;
use crate::hash::Fnv;
use crate::model::checkpoint::{read_tensors, safetensors_bytes};
use crate::model::Model;
use crate::tensor::{DType, Tensor};
use crate::{bail, ensure};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const ARTIFACT_FORMAT: u32 = 1;

/// The name of the public model's FFN in a merged model: no owner's expert may take it.
pub const PUBLIC_EXPERT: &str = "public";

/// A domain label is free text shown in reports: at most 256 characters, none of them control
/// characters (a newline or a direction override would forge lines of a report).
pub fn check_domain(domain: &str) -> Result<()> {
    ensure!(
        domain.chars().count() <= 256
            && !domain.chars().any(|c| {
                c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            }),
        "domain label {domain:?} is not valid: at most 256 characters, no control characters"
    );
    Ok(())
}

/// An expert's name must be selectable on every command line and in every request: 1 to 64
/// letters, digits, '_', '-' or '.', starting with a letter or digit, not only digits (bare
/// numbers select experts by index), and not `public`.
pub fn check_expert_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !name.chars().all(|c| c.is_ascii_digit());
    ensure!(
        ok,
        "expert name {name:?} is not valid: use 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or digit and not only digits"
    );
    ensure!(
        name != PUBLIC_EXPERT,
        "expert name '{PUBLIC_EXPERT}' is reserved for the public model's FFN"
    );
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExpertMeta {
    pub format: u32,
    pub name: String,
    pub domain: String,
    pub tokens_seen: u64,
    pub steps: u64,
    /// Hash of the public model (see [`model_hash`]) this expert was trained against.
    pub public_hash: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    /// "domain", "random" or "encoder".
    pub router_init: String,
    /// For "encoder": the encoder's content hash and the projection to the model's width
    /// (`HASH/identity` or `HASH/gaussian-DxH-v1`). Experts merged together must agree on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_encoder: Option<String>,
    /// Initial bias value, or None when trained without a bias.
    pub bias_init: Option<f32>,
    pub hyperparameters: serde_json::Value,
}

#[derive(Clone, Debug)]
pub struct ExpertLayer {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// `[1, H]`
    pub router: Tensor,
    pub bias: Option<f32>,
    /// `[1, H]`, the frozen public router row used during training.
    pub router_public: Tensor,
}

#[derive(Clone, Debug)]
pub struct ExpertArtifact {
    pub meta: ExpertMeta,
    pub layers: Vec<ExpertLayer>,
}

/// Content hash of a model: FNV-1a over every parameter's name, shape and f32 values, in name
/// order. Two models hash equal iff their weights are bit-identical (up to hash collisions).
pub fn model_hash(model: &Model) -> String {
    let mut ids: Vec<usize> = (0..model.params.len()).collect();
    ids.sort_by(|&a, &b| model.params.get(a).name.cmp(&model.params.get(b).name));
    let mut h = Fnv::default();
    for id in ids {
        let p = model.params.get(id);
        h.update(p.name.as_bytes());
        for d in p.value.shape() {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(bytemuck::cast_slice(p.value.to_dtype(DType::F32).data()));
    }
    h.hex()
}

impl ExpertArtifact {
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (l, x) in self.layers.iter().enumerate() {
            tensors.push((format!("layers.{l}.gate_proj.weight"), x.gate.clone()));
            tensors.push((format!("layers.{l}.up_proj.weight"), x.up.clone()));
            tensors.push((format!("layers.{l}.down_proj.weight"), x.down.clone()));
            tensors.push((format!("layers.{l}.router"), x.router.clone()));
            tensors.push((format!("layers.{l}.router_public"), x.router_public.clone()));
            if let Some(b) = x.bias {
                tensors.push((format!("layers.{l}.bias"), Tensor::from_vec(vec![b], &[1])));
            }
        }
        let meta = HashMap::from([(
            "flexrun_expert".to_string(),
            serde_json::to_string(&self.meta)?,
        )]);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_bytes_atomic(path, &safetensors_bytes(&tensors, DType::F32, Some(meta))?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let (file, _) = crate::fsutil::open_regular(path, "expert artifact")?;
        // SAFETY: read-only map of a regular file, dropped before returning; artifacts are
        // written atomically and never modified in place.
        let bytes = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping expert {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).with_context(|| {
            format!(
                "{} is not a valid expert artifact (safetensors)",
                path.display()
            )
        })?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("flexrun_expert"))
            .with_context(|| {
                format!(
                    "{} is a safetensors file but not a flexrun expert artifact",
                    path.display()
                )
            })?;
        let meta: ExpertMeta = serde_json::from_str(meta_json)
            .with_context(|| format!("{}: corrupt expert metadata", path.display()))?;
        check_expert_name(&meta.name).with_context(|| format!("{}", path.display()))?;
        check_domain(&meta.domain).with_context(|| format!("{}", path.display()))?;
        ensure!(
            meta.format == ARTIFACT_FORMAT,
            "{}: expert format {} (this build reads {ARTIFACT_FORMAT})",
            path.display(),
            meta.format
        );
        let mut by_name: HashMap<String, Tensor> = read_tensors(&[path.to_path_buf()], false)?
            .into_iter()
            .collect();
        let (h, i) = (meta.hidden_size, meta.intermediate_size);
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = by_name
                .remove(&name)
                .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
            ensure!(
                t.shape() == shape,
                "{}: tensor {name} has shape {:?}, expected {shape:?}",
                path.display(),
                t.shape()
            );
            Ok(t)
        };
        let mut layers = Vec::new();
        for l in 0..meta.num_layers {
            let gate = take(format!("layers.{l}.gate_proj.weight"), &[i, h])?;
            let up = take(format!("layers.{l}.up_proj.weight"), &[i, h])?;
            let down = take(format!("layers.{l}.down_proj.weight"), &[h, i])?;
            let router = take(format!("layers.{l}.router"), &[1, h])?;
            let router_public = take(format!("layers.{l}.router_public"), &[1, h])?;
            let bias = match take(format!("layers.{l}.bias"), &[1]) {
                Ok(b) => Some(b.data()[0]),
                Err(_) if meta.bias_init.is_none() => None,
                Err(e) => return Err(e),
            };
            layers.push(ExpertLayer {
                gate,
                up,
                down,
                router,
                bias,
                router_public,
            });
        }
        if let Some(extra) = by_name.keys().next() {
            bail!(
                "{}: unexpected tensor {extra} (the metadata says {} layers)",
                path.display(),
                meta.num_layers
            );
        }
        Ok(ExpertArtifact { meta, layers })
    }
}
