//! The BTX baseline (Branch-Train-MiX): the dense experts' FFNs become the experts of one MoE,
//! beside the public model's FFN; every other weight (embeddings, attention, norms, LM head) is
//! the uniform average of the public model and the dense experts; the router is then trained on
//! public data only, since the closed domains' data never leaves their owners. Unlike FlexOlmo,
//! the dense experts changed every weight, so no expert can be opted out exactly (the manifest
//! says `strict_opt_out: false`).

use super::baselines::{soup, train_router};
use super::{model_hash, write_model, Manifest, ManifestExpert};
use crate::backend::Device;
use crate::data::shards::Dataset;
use crate::ensure;
use crate::error::{Context, Result};
use crate::model::{checkpoint, expert_prefix, parse_expert_param, ExpertPart, Model};
use crate::train::{TrainConfig, TrainSummary};
use std::path::{Path, PathBuf};

/// The untrained BTX model: experts `[public FFN, dense_1 FFN, ...]`, every other weight the
/// average of all members, router rows zero (uniform routing), no bias, `top_k` of them a token.
pub fn btx_model(public: &Model, dense: &[&Model], top_k: usize) -> Result<Model> {
    ensure!(!dense.is_empty(), "BTX needs at least one dense expert");
    ensure!(
        !public.cfg.is_moe() && dense.iter().all(|m| !m.cfg.is_moe()),
        "BTX merges dense models (the public model and dense fine-tunes of it)"
    );
    let members: Vec<&Model> = std::iter::once(public)
        .chain(dense.iter().copied())
        .collect();
    let n = members.len();
    ensure!(
        (1..=n).contains(&top_k),
        "--top-k {top_k} must be between 1 and the {n} experts (public and {} dense)",
        n - 1
    );
    let owned: Vec<Model> = members.iter().map(|m| (*m).clone()).collect();
    let avg = soup(&owned)?;
    let mut moe = avg.upcycle(n)?;
    for p in moe.params.params.iter_mut() {
        if let Some((l, e, ExpertPart::Ffn(rest))) = parse_expert_param(&p.name) {
            let name = format!("{}{rest}", expert_prefix(l, 0, false));
            let src = members[e]
                .params
                .id(&name)
                .with_context(|| format!("BTX: a member lacks {name}"))?;
            p.value = members[e].params.value(src).clone();
        }
    }
    moe.cfg.num_experts_per_tok = Some(top_k);
    Ok(moe)
}

/// Build the BTX model of `public_dir` and the named dense experts, train its router on
/// `public_data`, and write it to `out` with a manifest naming the experts.
#[allow(clippy::too_many_arguments)]
pub fn btx(
    public_dir: &Path,
    dense: &[(String, PathBuf)],
    public_data: &[PathBuf],
    top_k: usize,
    tcfg: &TrainConfig,
    out: &Path,
    run_dir: &Path,
    resume: bool,
    quiet: bool,
    device: &Device,
) -> Result<TrainSummary> {
    tcfg.check()?;
    ensure!(
        !dense.is_empty(),
        "BTX needs at least one dense expert (--dense NAME=DIR)"
    );
    ensure!(
        !public_data.is_empty(),
        "BTX trains its router on public data: give --data"
    );
    for (i, (name, _)) in dense.iter().enumerate() {
        super::artifact::check_expert_name(name)?;
        ensure!(
            !dense[..i].iter().any(|(n, _)| n == name),
            "expert '{name}' is given twice"
        );
    }
    crate::fsutil::check_model_out(out)?;
    let mut inputs: Vec<&Path> = vec![public_dir];
    inputs.extend(dense.iter().map(|(_, p)| p.as_path()));
    inputs.extend(public_data.iter().map(PathBuf::as_path));
    crate::fsutil::check_not_input(out, "--out", &inputs)?;
    let public = checkpoint::load(public_dir)?;
    let models: Vec<Model> = dense
        .iter()
        .map(|(_, p)| {
            let m = checkpoint::load(p)?;
            ensure!(
                m.cfg.vocab_size == public.cfg.vocab_size
                    && m.cfg.hidden_size == public.cfg.hidden_size
                    && m.cfg.num_hidden_layers == public.cfg.num_hidden_layers
                    && m.cfg.intermediate_size == public.cfg.intermediate_size,
                "{} is not a fine-tune of {}: its shape differs",
                p.display(),
                public_dir.display()
            );
            Ok(m)
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&Model> = models.iter().collect();
    let mut model = btx_model(&public, &refs, top_k)?;
    let sets: Vec<Dataset> = public_data
        .iter()
        .map(|d| Dataset::open_for(d, public_dir, public.cfg.vocab_size))
        .collect::<Result<_>>()?;
    let tag = serde_json::json!({
        "kind": "btx",
        "public_hash": model_hash(&public),
        "experts": models.iter().map(model_hash).collect::<Vec<_>>(),
        "data": sets.iter().map(Dataset::fingerprint).collect::<Vec<_>>(),
        "top_k": top_k,
    });
    let summary = train_router(&mut model, &sets, tcfg, run_dir, tag, resume, quiet, device)?;
    let expert = |name: &str, domain: &str, source: &Path| ManifestExpert {
        name: name.into(),
        domain: domain.into(),
        tokens_seen: 0,
        bias: None,
        bias_offset: None,
        source: source.display().to_string(),
    };
    let mut experts = vec![expert(super::artifact::PUBLIC_EXPERT, "public", public_dir)];
    experts.extend(dense.iter().map(|(n, p)| expert(n, n, p)));
    let manifest = Manifest {
        public_hash: model_hash(&public),
        experts,
        top_k,
        router_tuned: true,
        strict_opt_out: false,
    };
    write_model(&model, Some(&manifest), public_dir, out)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    /// Expert e of the BTX model is member e's FFN, the rest is the members' average, and with
    /// zero router rows and every expert a token the model computes the mean of the experts'
    /// FFN outputs over the averaged trunk.
    #[test]
    fn btx_takes_each_ffn_and_averages_the_rest() {
        let cfg = Config::olmo2(50, 16, 24, 2, 2, 2);
        let public = Model::new_random(&cfg, 1).unwrap();
        let d1 = Model::new_random(&cfg, 2).unwrap();
        let d2 = Model::new_random(&cfg, 3).unwrap();
        let m = btx_model(&public, &[&d1, &d2], 2).unwrap();
        assert_eq!((m.cfg.experts(), m.cfg.top_k()), (3, 2));
        let get = |m: &Model, n: &str| m.params.value(m.params.id(n).unwrap()).data().to_vec();
        for (e, src) in [&public, &d1, &d2].iter().enumerate() {
            for part in ["gate_proj.weight", "up_proj.weight", "down_proj.weight"] {
                assert_eq!(
                    get(&m, &format!("model.layers.1.mlp.experts.{e}.{part}")),
                    get(src, &format!("model.layers.1.mlp.{part}"))
                );
            }
        }
        let q = "model.layers.0.self_attn.q_proj.weight";
        let want: Vec<f32> = (0..get(&public, q).len())
            .map(|i| [&public, &d1, &d2].iter().map(|m| get(m, q)[i] / 3.0).sum())
            .collect();
        assert_eq!(get(&m, q), want);
        assert!(btx_model(&public, &[], 1).is_err());
        assert!(btx_model(&public, &[&d1], 3).is_err());
        assert!(
            btx_model(&m, &[&d1], 1).is_err(),
            "an MoE is not a BTX member"
        );
    }
}
