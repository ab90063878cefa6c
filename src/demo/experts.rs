//! The demo's training of FlexOlmo experts (one per closed domain, then the merge) and the
//! loss-curve image of every run.

use super::{step, train_cfg, DemoConfig, Work};
use crate::backend::Device;
use crate::error::Result;
use crate::flex::{merge, train_expert, ExpertTrainOpts, RouterInit};
use crate::fsutil::write_bytes_atomic;
use crate::train::{RunDir, TrainConfig};
use std::path::PathBuf;

/// Train one set of experts (one per closed domain) with the given router init and bias, merge.
#[allow(clippy::too_many_arguments)]
pub(super) fn experts_and_merge(
    c: &DemoConfig,
    w: &Work,
    closed: &[String],
    tag: &str,
    init: RouterInit,
    bias: Option<f32>,
    quiet: bool,
    device: &Device,
) -> Result<PathBuf> {
    let mut arts = Vec::new();
    for (i, d) in closed.iter().enumerate() {
        step(
            &format!("train expert '{d}' ({tag}) on {d} data only"),
            quiet,
        );
        let out = w.p(&format!("experts/{tag}/{d}.safetensors"));
        let opts = ExpertTrainOpts {
            public: w.p("models/public"),
            data: w.p(&format!("data/{d}")),
            public_data: Some(w.p("data/public")),
            name: d.clone(),
            domain: d.clone(),
            out: out.clone(),
            run_dir: w.p(&format!("runs/expert-{tag}-{d}")),
            router_init: init,
            encoder: (init == RouterInit::Encoder)
                .then(|| c.encoder.clone())
                .flatten(),
            embed_docs: c.embed_docs,
            bias_init: bias,
            public_mix: c.public_mix,
            train: TrainConfig {
                public_anchor: c.public_anchor,
                public_anchor_layers: c.anchor_layers(),
                router_own: c.router_own,
                router_public: c.router_public,
                expert_loudness: c.expert_loudness,
                ..train_cfg(c, c.expert_steps, c.expert_lr, c.seed + 10 + i as u64)
            },
            resume: false,
            quiet,
        };
        // The demo owns its run directories: each run starts over.
        RunDir::clear(&opts.run_dir)?;
        train_expert(&opts, device)?;
        arts.push(out);
    }
    let dir = w.p(&format!("models/flexolmo-{tag}"));
    step(
        &format!(
            "merge public + {} experts ({tag}) into {}",
            arts.len(),
            dir.display()
        ),
        quiet,
    );
    merge(
        &w.p("models/public"),
        &arts,
        c.top_k.min(arts.len() + 1),
        &[],
        &dir,
    )?;
    Ok(dir)
}

/// Every training run's loss curve in one image, `loss_curves.svg`: public pretraining, each
/// dense expert and each FlexOlmo expert.
pub(super) fn write_loss_curves(w: &Work, closed: &[String]) -> Result<()> {
    use crate::train::{loss_chart_svg, read_log, LogEntry};
    let mut logs = vec![("public".to_string(), w.p("models/public/train_log.jsonl"))];
    for d in closed {
        logs.push((
            format!("dense {d}"),
            w.p(&format!("runs/dense-{d}/train_log.jsonl")),
        ));
        logs.push((
            format!("expert {d}"),
            w.p(&format!("runs/expert-main-{d}/train_log.jsonl")),
        ));
    }
    let entries: Vec<(String, Vec<LogEntry>)> = logs
        .into_iter()
        .map(|(n, p)| Ok((n, read_log(&p)?)))
        .collect::<Result<_>>()?;
    let runs: Vec<(&str, &[LogEntry])> =
        entries.iter().map(|(n, e)| (n.as_str(), &e[..])).collect();
    let svg = loss_chart_svg("Training loss of every run in the demo", &runs);
    write_bytes_atomic(&w.p("loss_curves.svg"), svg.as_bytes())
}
