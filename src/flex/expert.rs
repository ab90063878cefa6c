//! Expert training: one data owner trains an expert FFN, its router row and bias against the
//! frozen public model ([`train_expert`]), on its own data (plus, optionally, a share of public
//! text for the public anchor).

use super::*;
use crate::backend::Device;
use crate::data::shards::{self, Dataset, TokenShard};
use crate::error::{Context, Result};
use crate::model::runner::Placed;
use crate::model::{
    checkpoint, expert_prefix, router_bias_name, router_row_name, Ffn, Model, ParamStore,
};
use crate::tensor::Tensor;
use crate::train::{TrainConfig, TrainSummary, Trainer};
use crate::{bail, ensure};
use rand::{rngs::StdRng, SeedableRng};
use std::path::{Path, PathBuf};

/// How the new expert's router row is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterInit {
    /// Mean of the public model's mean-pooled final hidden states over sampled domain documents.
    Domain,
    /// Normal(0, 0.02); the public row from a seed derived from the public model's hash so that
    /// every owner gets the same one.
    Random,
    /// Mean of a pretrained sentence encoder's embeddings of sampled domain documents (the
    /// paper's choice), through a fixed random projection to the model's width when the widths
    /// differ ([`encoder_projection`]).
    Encoder,
}

impl RouterInit {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "domain" => Ok(RouterInit::Domain),
            "random" => Ok(RouterInit::Random),
            "encoder" => Ok(RouterInit::Encoder),
            other => bail!("unknown router init '{other}' (expected domain, random or encoder)"),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RouterInit::Domain => "domain",
            RouterInit::Random => "random",
            RouterInit::Encoder => "encoder",
        }
    }
}

/// Embedding of a domain: the unit-normalised mean over `n_docs` sampled documents of the
/// public model's mean-pooled final hidden states (documents truncated to `max_len` tokens),
/// computed by `gpu` (the same model on a GPU) when given.
pub fn domain_embedding(
    placed: &Placed,
    shard: &TokenShard,
    n_docs: usize,
    max_len: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    let model = placed.host;
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
        let hid = placed.runner().final_hidden(doc, 1, doc.len())?;
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
    /// The sentence-encoder directory of `RouterInit::Encoder`.
    pub encoder: Option<PathBuf>,
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

pub(super) fn require_dense(public: &Model, dir: &Path) -> Result<()> {
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

/// The projection of encoder embeddings (width `d`) to router rows (width `h`): none when the
/// widths agree, else a `[h, d]` matrix of normal(0, 1/d) entries from a fixed seed, so that
/// every owner makes the same one alone. Returns the matrix (empty: none) and its name, which
/// the artifact records.
pub fn encoder_projection(d: usize, h: usize) -> (Vec<f32>, String) {
    if d == h {
        return (vec![], "identity".into());
    }
    let seed = crate::hash::mix(&[0x454E_434F_4445_5231, d as u64, h as u64]);
    let p = Tensor::randn(
        &[h, d],
        1.0 / (d as f32).sqrt(),
        &mut StdRng::seed_from_u64(seed),
    );
    (p.into_vec(), format!("gaussian-{d}x{h}-v1"))
}

/// Embedding of a domain by a sentence encoder: documents (token ids of the public model's
/// tokenizer) back to text, each embedded, averaged, projected to width `h`, unit-normalised.
pub fn encoder_domain_embedding(
    enc: &crate::model::encoder::Encoder,
    tok: &crate::data::Tokenizer,
    shard: &TokenShard,
    n_docs: usize,
    max_len: usize,
    seed: u64,
    h: usize,
) -> Result<Vec<f32>> {
    let docs = shards::sample_docs(shard, n_docs, max_len, seed);
    ensure!(
        !docs.is_empty(),
        "{} has no documents to embed",
        shard.path().display()
    );
    let d = enc.width();
    let mut acc = vec![0f64; d];
    for doc in &docs {
        let e = enc.embed(&tok.decode(doc)?)?;
        acc.iter_mut()
            .zip(&e)
            .for_each(|(a, &x)| *a += x as f64 / docs.len() as f64);
    }
    let (p, _) = encoder_projection(d, h);
    let row: Vec<f64> = if p.is_empty() {
        acc
    } else {
        p.chunks(d)
            .map(|r| r.iter().zip(&acc).map(|(&w, &x)| w as f64 * x).sum())
            .collect()
    };
    let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    Ok(row.iter().map(|x| (x / norm) as f32).collect())
}

/// Router rows for the public expert and the new one, per `init`.
pub fn router_rows(
    public: &Model,
    hash: &str,
    opts: &ExpertTrainOpts,
    data: &Dataset,
    device: &Device,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let enc = match (opts.router_init, &opts.encoder) {
        (RouterInit::Encoder, Some(dir)) => Some(crate::model::encoder::Encoder::load(dir)?),
        _ => None,
    };
    router_rows_with(public, hash, opts, data, device, enc.as_ref())
}

/// [`router_rows`] with the encoder of `RouterInit::Encoder` already loaded.
fn router_rows_with(
    public: &Model,
    hash: &str,
    opts: &ExpertTrainOpts,
    data: &Dataset,
    device: &Device,
    enc: Option<&crate::model::encoder::Encoder>,
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
            let placed = Placed::new(public, device)?;
            let r_pub = domain_embedding(&placed, &pub_data.train, opts.embed_docs, max_len, 0)?;
            let r_i = domain_embedding(
                &placed,
                &data.train,
                opts.embed_docs,
                max_len,
                opts.train.seed,
            )?;
            Ok((r_pub, r_i))
        }
        RouterInit::Encoder => {
            let enc = enc.context(
                "--router-init encoder needs --encoder DIR (a sentence-transformers directory)",
            )?;
            let pd = opts
                .public_data
                .as_ref()
                .context("--public-data is needed to embed the public domain with the encoder")?;
            let tok_path = crate::fsutil::confined(&opts.public, "tokenizer.json", "tokenizer")?;
            ensure!(
                tok_path.exists(),
                "--router-init encoder needs the public model's tokenizer.json to turn documents back into text"
            );
            let tok = crate::data::Tokenizer::load(&tok_path)?;
            let pub_data = Dataset::open_for(pd, &opts.public, public.cfg.vocab_size)?;
            let max_len = opts.train.seq.max(64);
            let r_pub = encoder_domain_embedding(
                enc,
                &tok,
                &pub_data.train,
                opts.embed_docs,
                max_len,
                0,
                h,
            )?;
            let r_i = encoder_domain_embedding(
                enc,
                &tok,
                &data.train,
                opts.embed_docs,
                max_len,
                opts.train.seed,
                h,
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
    crate::fsutil::check_output_syntax(out)?;
    Ok(())
}

/// An existing file at `out` may be replaced only by a new version of the same expert (a
/// resumed or extended run): never a file that is not an expert artifact, nor another expert's.
fn check_replaces_own_artifact(out: &Path, name: &str) -> Result<()> {
    let Ok(m) = std::fs::metadata(out) else {
        return Ok(());
    };
    ensure!(
        m.is_file(),
        "--out {} exists and is not a regular file: write to another path",
        out.display()
    );
    let (file, _) = crate::fsutil::open_regular(out, "expert artifact")?;
    // SAFETY: a read-only map of a regular file, dropped before returning.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", out.display()))?;
    let owner = safetensors::SafeTensors::read_metadata(&map)
        .ok()
        .and_then(|(_, h)| h.metadata().as_ref()?.get("flexrun_expert").cloned())
        .and_then(|m| serde_json::from_str::<ExpertMeta>(&m).ok())
        .map(|m| m.name);
    match owner {
        Some(n) if n == name => Ok(()),
        Some(n) => bail!(
            "--out {} holds expert '{n}': training '{name}' would replace it; write to another path",
            out.display()
        ),
        None => bail!(
            "--out {} exists and is not an expert artifact: write to another path",
            out.display()
        ),
    }
}

/// Train one expert against the frozen public model on the owner's data only; write the artifact.
///
/// With `device`, the training runs on that GPU ([`crate::model::net::NetTrainer`]: only the
/// new FFN, r_i and b_i hold gradients and optimizer state there too).
pub fn train_expert(
    opts: &ExpertTrainOpts,
    device: &Device,
) -> Result<(ExpertArtifact, TrainSummary)> {
    let t = &opts.train;
    artifact::check_expert_name(&opts.name)?;
    artifact::check_domain(&opts.domain)?;
    t.check()?;
    check_artifact_out(&opts.out)?;
    let mut inputs = vec![opts.public.as_path(), opts.data.as_path()];
    inputs.extend(opts.public_data.as_deref());
    crate::fsutil::check_not_input(&opts.out, "--out", &inputs)?;
    ensure!(
        opts.out != opts.run_dir,
        "--out and --run-dir are both {}: the artifact and the run need two paths",
        opts.out.display()
    );
    check_replaces_own_artifact(&opts.out, &opts.name)?;
    crate::fsutil::check_model_out(&opts.run_dir)?;
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
        opts.embed_docs > 0 || matches!(opts.router_init, RouterInit::Random),
        "--embed-docs must be at least 1 (the documents the router embedding averages)"
    );
    let layer_w = &opts.train.public_anchor_layers;
    // On a GPU the public model stays in its checkpoint's dtype on the host (a bf16 7B model:
    // 15 GB, not 29): the host copy only feeds the upload, and the trained FFN's f32 master
    // weights live on the device.
    let on_gpu = device.gpu().is_some();
    let public = checkpoint::load_with(&opts.public, on_gpu)?;
    require_dense(&public, &opts.public)?;
    // Trained: the new FFN, its router row and bias, in every layer.
    let c = &public.cfg;
    let trained = c.num_hidden_layers as u128
        * (3 * c.hidden_size as u128 * c.intermediate_size as u128 + c.hidden_size as u128 + 1);
    if on_gpu {
        crate::limits::check_dim(
            "--batch",
            t.batch,
            crate::limits::MAX_BATCH,
            "far beyond any step",
        )?;
        // The host holds the public model as loaded (bf16: 2 bytes a parameter) and, at each
        // checkpoint, the trained tensors and their AdamW moments in f32.
        crate::limits::check_memory(
            &format!(
                "training an expert of {trained} parameters against {} on the GPU",
                opts.public.display()
            ),
            2 * c.param_count() + 12 * trained,
        )?;
    } else {
        c.upcycled(2)
            .check_training_memory(t.batch, t.seq, Some(trained))?;
    }
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
    ensure!(
        opts.encoder.is_none() || opts.router_init == RouterInit::Encoder,
        "--encoder is for --router-init encoder"
    );
    // The encoder's identity, checked before training: merged experts must share it.
    let enc = match (opts.router_init, &opts.encoder) {
        (RouterInit::Encoder, Some(dir)) => Some(crate::model::encoder::Encoder::load(dir)?),
        _ => None,
    };
    let router_encoder = enc.as_ref().map(|e| {
        let (_, proj) = encoder_projection(e.width(), public.cfg.hidden_size);
        format!("{}/{proj}", e.hash())
    });
    let (r_pub, r_i) = router_rows_with(&public, &hash, opts, &data, device, enc.as_ref())?;
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
        router_encoder,
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
