//! The demo's two routed baselines beside the soup and BTM: BTX (the dense experts' FFNs as one
//! MoE, the router trained on public data) and prompt-based routing (a classifier on the query
//! picks one dense expert, or the public model).

use super::{step, train_cfg, DemoConfig, Work};
use crate::backend::Device;
use crate::data::shards::{self, Dataset};
use crate::error::Result;
use crate::eval::routed::{PromptRouter, QueryEmbedder};
use crate::eval::DomainEval;
use crate::model::runner::Runner;
use crate::train::RunDir;
use std::path::PathBuf;

/// Build and train the BTX model of the public model and the dense experts; returns its
/// directory.
pub(super) fn train_btx(
    c: &DemoConfig,
    w: &Work,
    dense_dirs: &[(String, PathBuf)],
    quiet: bool,
    device: &Device,
) -> Result<PathBuf> {
    step(
        "baseline: BTX (the dense experts' FFNs as one MoE, its router trained on public data)",
        quiet,
    );
    let out = w.p("models/btx");
    RunDir::clear(&w.p("runs/btx"))?;
    crate::flex::btx(
        &w.p("models/public"),
        dense_dirs,
        &[w.p("data/public")],
        c.top_k.min(dense_dirs.len() + 1),
        &train_cfg(c, c.btx_steps, c.lr, c.seed + 40),
        &out,
        &w.p("runs/btx"),
        false,
        quiet,
        device,
    )?;
    Ok(out)
}

/// Train the prompt router on what a model builder may see: `c.route_queries` documents of
/// public text and as many labelled queries per closed domain, from the training splits. The
/// classes are the domains in order (public first), each routed to its model.
pub(super) fn prompt_router(
    c: &DemoConfig,
    embed: Runner<'_>,
    sets: &[(String, Dataset)],
) -> Result<PromptRouter> {
    let mut examples = Vec::new();
    for (k, (_, ds)) in sets.iter().enumerate() {
        for doc in shards::sample_docs(&ds.train, c.route_queries, c.route_prompt, c.seed + 50) {
            if !doc.is_empty() {
                examples.push((doc, k));
            }
        }
    }
    let classes = sets.iter().map(|(d, _)| d.clone()).collect();
    PromptRouter::train(
        QueryEmbedder::Model(embed),
        &examples,
        classes,
        c.route_prompt,
    )
}

/// Per domain, the fraction of its held-out windows the router sends to the domain's own model.
pub(super) fn routing_accuracy(
    router: &PromptRouter,
    embed: Runner<'_>,
    domains: &[DomainEval],
    seq: usize,
) -> Result<Vec<(String, f64)>> {
    domains
        .iter()
        .map(|d| {
            let own = router.classes.iter().position(|c| c == &d.name);
            let windows: Vec<&[u32]> = d
                .batches
                .iter()
                .flat_map(|(i, _)| i.chunks(seq.max(1)))
                .collect();
            let hits = windows
                .iter()
                .map(|w| {
                    router
                        .route(QueryEmbedder::Model(embed), w)
                        .map(|k| Some(k) == own)
                })
                .collect::<Result<Vec<bool>>>()?;
            let rate = hits.iter().filter(|&&h| h).count() as f64 / hits.len().max(1) as f64;
            Ok((d.name.clone(), rate))
        })
        .collect()
}
