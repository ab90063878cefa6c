//! The FlexOlmo method: each data owner trains an expert FFN plus a router row against the frozen
//! public model ([`train_expert`]); the experts are merged without data ([`merge`]); any expert
//! can be left out at load time ([`load_model`] with a [`Selection`]); optionally the router rows
//! are tuned on proxy data ([`router_tune`]). Also the dense baselines: [`finetune`] (a dense
//! expert) and [`soup`] (parameter average).

pub mod artifact;
pub mod demo;

pub use artifact::{model_hash, ExpertArtifact, ExpertLayer, ExpertMeta};

use crate::autograd::Tape;
use crate::backend::cuda::{Device, GpuModel};
use crate::data::shards::{self, Dataset, TokenShard};
use crate::error::{Context, Result};
use crate::model::{
    checkpoint, expert_prefix, router_bias_name, router_row_name, Ffn, Model, ParamStore,
};
use crate::tensor::{DType, Tensor};
use crate::train::data::ShardBatches;
use crate::train::pretrain::VALID_TOKENS;
use crate::train::{Batches, TrainConfig, TrainSummary, Trainer};
use crate::{bail, ensure};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "flexolmo.json";

/// How the new expert's router row is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterInit {
    /// Mean of the public model's mean-pooled final hidden states over sampled domain documents.
    Domain,
    /// Normal(0, 0.02); the public row from a seed derived from the public model's hash so that
    /// every owner gets the same one.
    Random,
}

impl RouterInit {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "domain" => Ok(RouterInit::Domain),
            "random" => Ok(RouterInit::Random),
            other => bail!("unknown router init '{other}' (expected domain or random)"),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RouterInit::Domain => "domain",
            RouterInit::Random => "random",
        }
    }
}

/// Embedding of a domain: the unit-normalised mean over `n_docs` sampled documents of the
/// public model's mean-pooled final hidden states (documents truncated to `max_len` tokens),
/// computed by `gpu` (the same model on a GPU) when given.
pub fn domain_embedding(
    model: &Model,
    gpu: Option<&GpuModel>,
    shard: &TokenShard,
    n_docs: usize,
    max_len: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    let docs = shards::sample_docs(
        shard,
        n_docs,
        max_len.min(model.cfg.max_position_embeddings),
        seed,
    );
    ensure!(
        !docs.is_empty(),
        "{} has no documents to embed",
        shard.path().display()
    );
    let h = model.cfg.hidden_size;
    let mut acc = vec![0f64; h];
    for doc in &docs {
        let hid = match gpu {
            Some(g) => g.final_hidden(doc, 1, doc.len())?,
            None => {
                let mut tape = Tape::inference();
                let out = model.forward(&mut tape, doc, 1, doc.len(), None)?;
                tape.value(out.hidden).clone()
            }
        };
        for r in 0..hid.rows() {
            for (a, x) in acc.iter_mut().zip(hid.row(r)) {
                *a += *x as f64 / hid.rows() as f64;
            }
        }
    }
    let norm = acc.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    Ok(acc.iter().map(|x| (x / norm) as f32).collect())
}

/// Settings of one data owner's expert training run.
pub struct ExpertTrainOpts {
    pub public: PathBuf,
    pub data: PathBuf,
    /// Prepared public data, to embed r_pub (needed for `RouterInit::Domain`).
    pub public_data: Option<PathBuf>,
    pub name: String,
    pub domain: String,
    pub out: PathBuf,
    /// Run directory (log, resumable checkpoint).
    pub run_dir: PathBuf,
    pub router_init: RouterInit,
    pub embed_docs: usize,
    /// Initial bias; None trains without a bias.
    pub bias_init: Option<f32>,
    /// Fraction of training rows drawn from the public data (`public_data`): the router then
    /// also learns to leave public text to the public expert. 0 trains on the owner's data only.
    pub public_mix: f64,
    pub train: TrainConfig,
    pub resume: bool,
    pub quiet: bool,
}

fn require_dense(public: &Model, dir: &Path) -> Result<()> {
    ensure!(
        matches!(public.layers[0].ffn, Ffn::Dense(_)),
        "{} is a mixture-of-experts model; the public model must be a dense OLMo-2 model",
        dir.display()
    );
    Ok(())
}

/// The 2-expert training model: [public FFN (frozen), copy (trained)], router rows
/// [r_pub (frozen), r_i (trained)], bias b_i (trained) when given.
pub fn expert_training_model(
    public: &Model,
    r_pub: &[f32],
    r_i: &[f32],
    bias: Option<f32>,
) -> Result<Model> {
    let up = public.upcycle(2)?;
    let mut ps: ParamStore = up.params.clone();
    let h = public.cfg.hidden_size;
    for l in 0..public.cfg.num_hidden_layers {
        for (e, row) in [(0, r_pub), (1, r_i)] {
            let id = ps
                .id(&router_row_name(l, e))
                .context("upcycled model lacks router rows")?;
            ps.params[id].value = Tensor::from_vec(row.to_vec(), &[1, h]);
        }
        if let Some(b) = bias {
            ps.add(router_bias_name(l, 1), Tensor::from_vec(vec![b], &[1]));
        }
    }
    ps.set_all_trainable(false);
    for l in 0..public.cfg.num_hidden_layers {
        let p = expert_prefix(l, 1, true);
        for n in ["gate_proj.weight", "up_proj.weight", "down_proj.weight"] {
            let id = ps.id(&format!("{p}{n}")).unwrap();
            ps.params[id].trainable = true;
            // Weight decay pulls the new FFN toward the public FFN it was copied from.
            ps.params[id].decay_to = Some(ps.params[id].value.clone());
        }
        let id = ps.id(&router_row_name(l, 1)).unwrap();
        ps.params[id].trainable = true;
        if let Some(id) = ps.id(&router_bias_name(l, 1)) {
            ps.params[id].trainable = true;
        }
    }
    Model::from_params(up.cfg.clone(), ps)
}

/// Router rows for the public expert and the new one, per `init`.
pub fn router_rows(
    public: &Model,
    hash: &str,
    opts: &ExpertTrainOpts,
    data: &Dataset,
    device: Option<&Device>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let h = public.cfg.hidden_size;
    let seed_pub = u64::from_str_radix(&hash[..16.min(hash.len())], 16).unwrap_or(0);
    match opts.router_init {
        RouterInit::Domain => {
            let pd = opts.public_data.as_ref().context(
                "--public-data is needed to embed the public domain (or use --router-init random)",
            )?;
            let pub_data = Dataset::open_for(pd, &opts.public, public.cfg.vocab_size)?;
            let max_len = opts.train.seq.max(64);
            let gpu = device.map(|d| GpuModel::upload(d, public)).transpose()?;
            let gpu = gpu.as_ref();
            let r_pub =
                domain_embedding(public, gpu, &pub_data.train, opts.embed_docs, max_len, 0)?;
            let r_i = domain_embedding(
                public,
                gpu,
                &data.train,
                opts.embed_docs,
                max_len,
                opts.train.seed,
            )?;
            Ok((r_pub, r_i))
        }
        RouterInit::Random => {
            let r_pub = Tensor::randn(
                &[h],
                crate::model::INIT_STD,
                &mut StdRng::seed_from_u64(seed_pub),
            )
            .into_vec();
            let r_i = Tensor::randn(
                &[h],
                crate::model::INIT_STD,
                &mut StdRng::seed_from_u64(opts.train.seed ^ 0x5EED),
            )
            .into_vec();
            Ok((r_pub, r_i))
        }
    }
}

/// Expert-training settings that cannot work, as one-line errors before any data is read: the
/// public share of the rows; the loss weights `[public anchor, router own-text, router
/// public-text, expert loudness]` (finite, >= 0; the anchor and the public-text loss act on
/// public rows, so they need a public share); the anchor's per-layer weights; the initial bias.
/// [`train_expert`] and the demo check them alike.
pub(crate) fn check_expert_settings(
    public_mix: f64,
    weights: [f32; 4],
    anchor_layers: &[f32],
    bias_init: Option<f32>,
) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&public_mix),
        "--public-mix must be in [0, 1), got {public_mix}"
    );
    let flags = [
        ("--public-anchor", true),
        ("--router-own", false),
        ("--router-public", true),
        ("--expert-loudness", false),
    ];
    for ((flag, on_public_rows), w) in flags.into_iter().zip(weights) {
        ensure!(
            w.is_finite() && w >= 0.0,
            "{flag} must be a finite weight >= 0, got {w}"
        );
        ensure!(
            !on_public_rows || w == 0.0 || public_mix > 0.0,
            "{flag} acts on public rows: it needs --public-mix > 0 and --public-data"
        );
    }
    ensure!(
        anchor_layers.iter().all(|w| w.is_finite() && *w >= 0.0),
        "--public-anchor-layers must be finite weights >= 0, got {anchor_layers:?}"
    );
    if let Some(b) = bias_init {
        ensure!(
            b.is_finite(),
            "--bias-init must be a finite number, got {b}"
        );
    }
    Ok(())
}

/// An expert artifact can be written at `out`: not a directory, and named like a file.
pub fn check_artifact_out(out: &Path) -> Result<()> {
    ensure!(
        out.file_name().is_some() && !out.as_os_str().to_string_lossy().ends_with('/'),
        "--out {} must name a file (the expert artifact, .safetensors)",
        out.display()
    );
    ensure!(
        !out.is_dir(),
        "--out {} is a directory; it must name the expert artifact file (.safetensors)",
        out.display()
    );
    Ok(())
}

/// Train one expert against the frozen public model on the owner's data only; write the artifact.
///
/// With `device`, the training runs on that GPU ([`crate::backend::cuda::GpuTrainer`]: only the
/// new FFN, r_i and b_i hold gradients and optimizer state there too).
pub fn train_expert(
    opts: &ExpertTrainOpts,
    device: Option<&Device>,
) -> Result<(ExpertArtifact, TrainSummary)> {
    let t = &opts.train;
    artifact::check_expert_name(&opts.name)?;
    t.check()?;
    check_artifact_out(&opts.out)?;
    // One writer per artifact: a second run for the same --out is refused now, not at the end.
    let _lock = crate::fsutil::PathLock::acquire(&opts.out)?;
    check_expert_settings(
        opts.public_mix,
        [
            t.public_anchor,
            t.router_own,
            t.router_public,
            t.expert_loudness,
        ],
        &t.public_anchor_layers,
        opts.bias_init,
    )?;
    if let Some(dp) = &t.dp {
        dp.check()?;
    }
    ensure!(
        opts.embed_docs > 0 || !matches!(opts.router_init, RouterInit::Domain),
        "--embed-docs must be at least 1 (the documents the router embedding averages)"
    );
    let layer_w = &opts.train.public_anchor_layers;
    let public = checkpoint::load(&opts.public)?;
    require_dense(&public, &opts.public)?;
    ensure!(
        layer_w.is_empty() || layer_w.len() == public.cfg.num_hidden_layers,
        "--public-anchor-layers has {} weights but the public model has {} layers",
        layer_w.len(),
        public.cfg.num_hidden_layers
    );
    let data = Dataset::open_for(&opts.data, &opts.public, public.cfg.vocab_size)?;
    let hash = model_hash(&public);
    let pub_data = match (&opts.public_data, opts.public_mix > 0.0) {
        (Some(p), true) => Some(Dataset::open_for(p, &opts.public, public.cfg.vocab_size)?),
        (None, true) => bail!("--public-mix needs --public-data"),
        _ => None,
    };
    let (r_pub, r_i) = router_rows(&public, &hash, opts, &data, device)?;
    let mut model = expert_training_model(&public, &r_pub, &r_i, opts.bias_init)?;
    let summary = {
        let tag = serde_json::json!({
            "kind": "expert",
            "name": opts.name,
            "public_hash": hash,
            "data": data.fingerprint(),
            "public_data": pub_data.as_ref().map(Dataset::fingerprint),
        });
        let mut tr = Trainer::start(
            &mut model,
            opts.train.clone(),
            &opts.run_dir,
            tag,
            opts.quiet,
            device,
            opts.resume,
        )?;
        let mut sets = vec![(&data, 1.0 - opts.public_mix)];
        if let Some(p) = &pub_data {
            sets.push((p, opts.public_mix));
        }
        let batches = MixedBatches {
            sets,
            valid_sets: vec![0],
            anchor_sets: if pub_data.is_some() { vec![1] } else { vec![] },
            private_set: Some(0),
            batch: opts.train.batch,
            seq: opts.train.seq,
            seed: opts.train.seed,
        };
        tr.run(&batches)?
    };
    let layers = model
        .layers
        .iter()
        .map(|layer| {
            let Ffn::Moe(ex) = &layer.ffn else {
                unreachable!("expert model is MoE")
            };
            let (e0, e1) = (ex[0], ex[1]);
            let v = |id: usize| model.params.value(id).clone();
            ExpertLayer {
                gate: v(e1.ffn.gate),
                up: v(e1.ffn.up),
                down: v(e1.ffn.down),
                router: v(e1.router),
                bias: e1.bias.map(|b| model.params.value(b).data()[0]),
                router_public: v(e0.router),
            }
        })
        .collect();
    let meta = ExpertMeta {
        format: artifact::ARTIFACT_FORMAT,
        name: opts.name.clone(),
        domain: opts.domain.clone(),
        tokens_seen: summary.tokens,
        steps: summary.steps,
        public_hash: hash,
        hidden_size: public.cfg.hidden_size,
        intermediate_size: public.cfg.intermediate_size,
        num_layers: public.cfg.num_hidden_layers,
        router_init: opts.router_init.as_str().into(),
        bias_init: opts.bias_init,
        hyperparameters: serde_json::json!({
            "train": opts.train,
            "public_mix": opts.public_mix,
            "embed_docs": opts.embed_docs,
            "dp_epsilon": summary.dp_epsilon,
            "dp_sample_rate": summary.dp_sample_rate,
        }),
    };
    let art = ExpertArtifact { meta, layers };
    art.save(&opts.out)?;
    Ok((art, summary))
}

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
        for (i, e) in self.experts.iter().enumerate().skip(1) {
            artifact::check_expert_name(&e.name)?;
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
    let public = checkpoint::load(public_dir)?;
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
    let tok = tokenizer_from.join("tokenizer.json");
    if tok.exists() {
        extra.push((
            "tokenizer.json",
            crate::fsutil::read_regular(&tok, "tokenizer", crate::fsutil::MAX_JSON_BYTES)?,
        ));
    }
    checkpoint::save_with(model, out, DType::F32, &extra)
}

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
    let model = checkpoint::load_with(dir, sel.keep_bf16)?;
    let manifest = Manifest::load(dir)?;
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
            eprintln!("note: {} was router-tuned; without expert(s) it is not identical to a model that never had them", dir.display());
        }
    }
    let mut model = if keep.len() == e {
        model
    } else {
        model.select_experts(&keep)?
    };
    if let Some(k) = sel.top_k {
        ensure!(k >= 1, "--top-k must be at least 1");
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

/// Batches drawn from several datasets: each row comes from dataset j with probability
/// `weights[j] / sum(weights)`, decided by a hash of (seed, step, micro, row), so batches stay a
/// pure function of the step. Validation uses the datasets listed in `valid_sets`.
pub struct MixedBatches<'a> {
    pub sets: Vec<(&'a Dataset, f64)>,
    pub valid_sets: Vec<usize>,
    /// Sets whose rows are public text, for the public anchor ([`Batches::anchored`]).
    pub anchor_sets: Vec<usize>,
    /// The set whose records differentially private training protects (the owner's data).
    pub private_set: Option<usize>,
    pub batch: usize,
    pub seq: usize,
    pub seed: u64,
}

impl MixedBatches<'_> {
    /// Which set row `r` of batch `(step, micro)` is drawn from.
    fn set_of(&self, step: u64, micro: u64, r: u64) -> usize {
        let total: f64 = self.sets.iter().map(|s| s.1).sum();
        let u = (crate::hash::mix(&[self.seed, step, micro, r]) >> 11) as f64 / (1u64 << 53) as f64
            * total;
        let mut acc = 0.0;
        let k = self.sets.iter().position(|s| {
            acc += s.1;
            u < acc
        });
        k.unwrap_or(self.sets.len() - 1)
    }
}

impl Batches for MixedBatches<'_> {
    fn anchored(&self, step: u64, micro: u64) -> Vec<bool> {
        (0..self.batch as u64)
            .map(|r| self.anchor_sets.contains(&self.set_of(step, micro, r)))
            .collect()
    }

    fn train(&self, step: u64, micro: u64) -> Result<(Vec<u32>, Vec<u32>)> {
        let (mut inp, mut tgt) = (Vec::new(), Vec::new());
        for r in 0..self.batch as u64 {
            let set = self.sets[self.set_of(step, micro, r)].0;
            let (i, t) =
                shards::train_batch(&set.train, 1, self.seq, self.seed ^ (r << 32), step, micro)?;
            inp.extend(i);
            tgt.extend(t);
        }
        Ok((inp, tgt))
    }
    /// The private records: the documents of the owner's training shard.
    fn dp_records(&self) -> Result<usize> {
        let p = self
            .private_set
            .context("this data has no private set for differentially private training")?;
        Ok(self.sets[p].0.train.n_docs())
    }

    /// The owner's documents sampled at `step` (each with probability `q`), one window of each
    /// (at a random offset; a shorter document whole, its targets padded with `IGNORE`), and as
    /// many public rows as the batch's public share (drawn as in ordinary training, from the
    /// other sets).
    fn dp_batch(&self, step: u64, q: f64) -> Result<crate::train::dp::DpBatch> {
        use rand::Rng;
        let p = self
            .private_set
            .context("this data has no private set for differentially private training")?;
        let shard = &self.sets[p].0.train;
        let seq = self.seq;
        let private = crate::train::dp::poisson_sample(shard.n_docs(), q, self.seed, step)
            .into_iter()
            .map(|i| {
                let doc = shard.doc(i);
                if doc.len() > seq {
                    let mut rng = StdRng::seed_from_u64(crate::hash::mix(&[
                        self.seed, step, i as u64, 0xD0C,
                    ]));
                    let at = rng.random_range(0..=doc.len() - seq - 1);
                    (
                        doc[at..at + seq].to_vec(),
                        doc[at + 1..at + seq + 1].to_vec(),
                    )
                } else {
                    let mut inp = doc[..doc.len() - 1].to_vec();
                    let mut tgt = doc[1..].to_vec();
                    inp.resize(seq, *doc.last().unwrap_or(&0));
                    tgt.resize(seq, crate::ops::IGNORE);
                    (inp, tgt)
                }
            })
            .collect();
        let others: Vec<usize> = (0..self.sets.len()).filter(|&j| j != p).collect();
        let total: f64 = self.sets.iter().map(|s| s.1).sum();
        let share: f64 = others.iter().map(|&j| self.sets[j].1).sum::<f64>() / total;
        let rows = (self.batch as f64 * share).round() as usize;
        let (mut inp, mut tgt) = (Vec::new(), Vec::new());
        for r in 0..rows {
            let set = self.sets[others[r % others.len()]].0;
            let (i, t) = shards::train_batch(
                &set.train,
                1,
                self.seq,
                self.seed ^ ((r as u64) << 32) ^ 0xD9,
                step,
                0,
            )?;
            inp.extend(i);
            tgt.extend(t);
        }
        Ok(crate::train::dp::DpBatch {
            private,
            public: (inp, tgt),
            public_rows: rows,
        })
    }

    fn valid(&self) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut out = Vec::new();
        for &j in &self.valid_sets {
            out.extend(shards::valid_batches(
                &self.sets[j].0.valid,
                self.batch,
                self.seq,
                VALID_TOKENS / self.valid_sets.len(),
            )?);
        }
        Ok(out)
    }
}

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
    device: Option<&Device>,
) -> Result<TrainSummary> {
    tcfg.check()?;
    crate::fsutil::check_model_out(out)?;
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
    for p in model.params.params.iter_mut() {
        p.trainable = p.name.contains(".mlp.gate.");
    }
    let summary = {
        let tag = serde_json::json!({
            "kind": "router-tune",
            "model_hash": tuned_hash,
            "data": sets.iter().map(Dataset::fingerprint).collect::<Vec<_>>(),
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
        let b = MixedBatches {
            sets: sets.iter().map(|d| (d, 1.0)).collect(),
            valid_sets: (0..sets.len()).collect(),
            anchor_sets: vec![],
            private_set: None,
            batch: tcfg.batch,
            seq: tcfg.seq,
            seed: tcfg.seed,
        };
        tr.run(&b)?
    };
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
    device: Option<&Device>,
) -> Result<(Model, TrainSummary)> {
    ensure!(
        only.iter().all(|s| !s.is_empty()),
        "--only takes non-empty parameter name parts"
    );
    tcfg.check()?;
    crate::fsutil::check_model_out(out)?;
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
