//! Merging: the public model and expert artifacts become one FlexOlmo checkpoint with no data
//! ([`merge`]); the manifest (`flexolmo.json`) records what it is made of.

use super::{expert::require_dense, *};
use crate::error::{Context, Result};
use crate::model::{
    checkpoint, expert_prefix, router_bias_name, router_row_name, Model, ParamStore,
};
use crate::tensor::{DType, Tensor};
use crate::{bail, ensure};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `flexolmo.json`: what a merged checkpoint is made of.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub public_hash: String,
    /// Expert 0 is the public FFN.
    pub experts: Vec<ManifestExpert>,
    pub top_k: usize,
    pub router_tuned: bool,
    /// False once anything touched every router row (router tuning): removing an expert then no
    /// longer equals a model that never had it.
    pub strict_opt_out: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestExpert {
    pub name: String,
    pub domain: String,
    pub tokens_seen: u64,
    /// Per-layer bias as merged (the artifact's plus any offset), when the expert has one.
    pub bias: Option<Vec<f32>>,
    /// Per-layer merge-time offset included in `bias` (`merge --bias-offset`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias_offset: Option<Vec<f32>>,
    pub source: String,
}

impl Manifest {
    /// The manifest of model directory `dir`, if it has one: expert 0 is `public`, every other
    /// name is a valid expert name ([`artifact::check_expert_name`]) and appears once.
    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let p = crate::fsutil::confined(dir, MANIFEST, "manifest")?;
        if !p.exists() {
            return Ok(None);
        }
        let text = crate::fsutil::read_text(&p, "manifest", crate::fsutil::MAX_JSON_BYTES)?;
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", p.display()))?;
        m.check().with_context(|| format!("{}", p.display()))?;
        Ok(Some(m))
    }

    fn check(&self) -> Result<()> {
        let first = self.experts.first().map(|e| e.name.as_str());
        ensure!(
            first == Some(artifact::PUBLIC_EXPERT),
            "expert 0 must be '{}' (the public model's FFN), not {first:?}",
            artifact::PUBLIC_EXPERT
        );
        ensure!(
            self.top_k >= 1 && self.top_k <= self.experts.len(),
            "top_k {} must be between 1 and the {} experts listed",
            self.top_k,
            self.experts.len()
        );
        for (i, e) in self.experts.iter().enumerate().skip(1) {
            artifact::check_expert_name(&e.name)?;
            artifact::check_domain(&e.domain)?;
            if self.experts[..i].iter().any(|x| x.name == e.name) {
                bail!("expert '{}' is listed twice", e.name);
            }
        }
        Ok(())
    }
}

/// A merge-time shift of one expert's router bias: `values` holds one number for every layer,
/// or one per layer. It lowers (or raises, up to 0) how often the expert is picked without
/// retraining it, and since it belongs to that expert alone, strict opt-out still holds.
#[derive(Clone, Debug, PartialEq)]
pub struct BiasOffset {
    pub expert: String,
    pub values: Vec<f32>,
}

impl BiasOffset {
    /// Parse `NAME=V` or `NAME=V0,V1,...` (one value per layer).
    pub fn parse(s: &str) -> Result<Self> {
        let (name, vals) = s
            .split_once('=')
            .with_context(|| format!("bias offset '{s}' is not NAME=V or NAME=V0,V1,..."))?;
        let values = vals
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .with_context(|| format!("bias offset '{s}': '{v}' is not a finite number"))
            })
            .collect::<Result<Vec<f32>>>()?;
        ensure!(!name.is_empty(), "bias offset '{s}' names no expert");
        Ok(BiasOffset {
            expert: name.to_string(),
            values,
        })
    }

    /// The offset at each of `layers` layers.
    fn per_layer(&self, layers: usize) -> Result<Vec<f32>> {
        match self.values.len() {
            1 => Ok(vec![self.values[0]; layers]),
            n if n == layers => Ok(self.values.clone()),
            n => bail!(
                "bias offset for '{}' has {n} values; give 1 or one per layer ({layers})",
                self.expert
            ),
        }
    }
}

/// Merge the public model and expert artifacts into one FlexOlmo MoE: experts [public, e_1..e_n],
/// router rows [r_pub, r_1..r_n], biases (each plus its [`BiasOffset`], if any). No data is
/// read. Refuses experts trained against another public model or with other shapes.
pub fn merge(
    public_dir: &Path,
    experts: &[PathBuf],
    top_k: usize,
    offsets: &[BiasOffset],
    out: &Path,
) -> Result<(Model, Manifest)> {
    ensure!(!experts.is_empty(), "merge needs at least one expert");
    crate::fsutil::check_model_out(out)?;
    let mut inputs: Vec<&Path> = vec![public_dir];
    inputs.extend(experts.iter().map(PathBuf::as_path));
    crate::fsutil::check_not_input(out, "--out", &inputs)?;
    // A bf16 public checkpoint stays bf16 in memory (a 7B model: 15 GB, not 29); the merged
    // files are written in f32 from the same values.
    let public = checkpoint::load_with(public_dir, true)?;
    require_dense(&public, public_dir)?;
    let hash = model_hash(&public);
    let arts: Vec<ExpertArtifact> = experts
        .iter()
        .map(|p| ExpertArtifact::load(p))
        .collect::<Result<_>>()?;
    let cfg = &public.cfg;
    for (a, p) in arts.iter().zip(experts) {
        ensure!(
            a.meta.public_hash == hash,
            "expert '{}' ({}) was trained against a different public model (hash {}, {} has {})",
            a.meta.name,
            p.display(),
            a.meta.public_hash,
            public_dir.display(),
            hash
        );
        ensure!(
            a.meta.hidden_size == cfg.hidden_size
                && a.meta.intermediate_size == cfg.intermediate_size
                && a.meta.num_layers == cfg.num_hidden_layers,
            "expert '{}' ({}) has shapes H={} I={} L={} but the public model has H={} I={} L={}",
            a.meta.name,
            p.display(),
            a.meta.hidden_size,
            a.meta.intermediate_size,
            a.meta.num_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        );
    }
    for (i, a) in arts.iter().enumerate() {
        if let Some(b) = arts[..i].iter().find(|b| b.meta.name == a.meta.name) {
            bail!("two experts are named '{}'", b.meta.name);
        }
        let enc = |x: &ExpertArtifact| {
            x.meta
                .router_encoder
                .clone()
                .unwrap_or_else(|| format!("the public model ({} init)", x.meta.router_init))
        };
        ensure!(
            a.meta.router_encoder == arts[0].meta.router_encoder,
            "experts '{}' and '{}' have router rows from different embeddings ({} vs {}): their routers cannot be compared",
            arts[0].meta.name,
            a.meta.name,
            enc(&arts[0]),
            enc(a)
        );
        for (l, (x, y)) in a.layers.iter().zip(&arts[0].layers).enumerate() {
            ensure!(
                x.router_public.data() == y.router_public.data(),
                "experts '{}' and '{}' were trained with different public router rows (layer {l}): they disagree on r_pub",
                a.meta.name,
                arts[0].meta.name
            );
        }
    }
    let layers = cfg.num_hidden_layers;
    let mut shift: Vec<Option<Vec<f32>>> = vec![None; arts.len()];
    for o in offsets {
        let i = arts
            .iter()
            .position(|a| a.meta.name == o.expert)
            .with_context(|| {
                let names: Vec<&str> = arts.iter().map(|a| a.meta.name.as_str()).collect();
                format!(
                    "bias offset for '{}', but the experts are [{}]",
                    o.expert,
                    names.join(", ")
                )
            })?;
        ensure!(
            shift[i].is_none(),
            "two bias offsets for expert '{}'",
            o.expert
        );
        shift[i] = Some(o.per_layer(layers)?);
    }
    // Per expert and layer: the artifact's bias plus the offset (None: the expert has no bias).
    let biases: Vec<Option<Vec<f32>>> = arts
        .iter()
        .zip(&shift)
        .map(|(a, sh)| {
            (a.meta.bias_init.is_some() || sh.is_some()).then(|| {
                (0..layers)
                    .map(|l| a.layers[l].bias.unwrap_or(0.0) + sh.as_ref().map_or(0.0, |v| v[l]))
                    .collect()
            })
        })
        .collect();
    for (a, b) in arts.iter().zip(&biases) {
        if let Some(b) = b {
            ensure!(
                b.iter().all(|x| x.is_finite()),
                "expert '{}': its bias plus --bias-offset is not a finite number",
                a.meta.name
            );
        }
    }
    let n = arts.len() + 1;
    ensure!(
        top_k >= 1 && top_k <= n,
        "--top-k {top_k} must be between 1 and the number of experts ({n})"
    );
    let mut model = public.upcycle(n)?;
    let mut ps = model.params.clone();
    let any_bias = biases.iter().any(Option::is_some);
    for l in 0..layers {
        let set = |ps: &mut ParamStore, name: String, t: &Tensor| {
            let id = ps
                .id(&name)
                .expect("upcycled model has every expert tensor");
            ps.params[id].value = t.clone();
        };
        set(
            &mut ps,
            router_row_name(l, 0),
            &arts[0].layers[l].router_public,
        );
        for (i, a) in arts.iter().enumerate() {
            let e = i + 1;
            let x = &a.layers[l];
            let p = expert_prefix(l, e, true);
            set(&mut ps, format!("{p}gate_proj.weight"), &x.gate);
            set(&mut ps, format!("{p}up_proj.weight"), &x.up);
            set(&mut ps, format!("{p}down_proj.weight"), &x.down);
            set(&mut ps, router_row_name(l, e), &x.router);
        }
        if any_bias {
            ps.add(router_bias_name(l, 0), Tensor::zeros(&[1]));
            for (i, b) in biases.iter().enumerate() {
                let b = b.as_ref().map_or(0.0, |b| b[l]);
                ps.add(router_bias_name(l, i + 1), Tensor::from_vec(vec![b], &[1]));
            }
        }
    }
    let mut mcfg = model.cfg.clone();
    mcfg.num_experts_per_tok = Some(top_k);
    model = Model::from_params(mcfg, ps)?;
    let mut manifest_experts = vec![ManifestExpert {
        name: artifact::PUBLIC_EXPERT.into(),
        domain: "public".into(),
        tokens_seen: 0,
        bias: None,
        bias_offset: None,
        source: public_dir.display().to_string(),
    }];
    for (((a, p), bias), sh) in arts.iter().zip(experts).zip(biases).zip(shift) {
        manifest_experts.push(ManifestExpert {
            name: a.meta.name.clone(),
            domain: a.meta.domain.clone(),
            tokens_seen: a.meta.tokens_seen,
            bias,
            bias_offset: sh,
            source: p.display().to_string(),
        });
    }
    let manifest = Manifest {
        public_hash: hash,
        experts: manifest_experts,
        top_k,
        router_tuned: false,
        strict_opt_out: true,
    };
    write_model(&model, Some(&manifest), public_dir, out)?;
    Ok((model, manifest))
}

/// Save a model directory: weights, config, manifest, and the tokenizer of `tokenizer_from`.
pub fn write_model(
    model: &Model,
    manifest: Option<&Manifest>,
    tokenizer_from: &Path,
    out: &Path,
) -> Result<()> {
    let mut extra = Vec::new();
    if let Some(m) = manifest {
        extra.push((MANIFEST, serde_json::to_string_pretty(m)?.into_bytes()));
    }
    let tok = crate::fsutil::confined(tokenizer_from, "tokenizer.json", "tokenizer")?;
    if tok.exists() {
        extra.push((
            "tokenizer.json",
            crate::fsutil::read_regular(&tok, "tokenizer", crate::fsutil::MAX_JSON_BYTES)?,
        ));
    }
    checkpoint::save_with(model, out, DType::F32, &extra)
}
