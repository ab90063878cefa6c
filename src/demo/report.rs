//! The demo's acceptance checks and its report (results.md).

use super::{BoundGap, Check, DemoReport};
use crate::eval::extract::Extraction;
use crate::eval::{self, routing, Row};

fn find<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.model == name || (name == "FlexOlmo" && r.model.starts_with("FlexOlmo (")))
}

fn loss(r: &Row, d: &str) -> f64 {
    r.scores
        .iter()
        .find(|s| s.domain == d)
        .map(|s| s.loss)
        .unwrap_or(f64::NAN)
}

fn acc(r: &Row, d: &str) -> f64 {
    r.scores
        .iter()
        .find(|s| s.domain == d)
        .and_then(|s| s.accuracy)
        .unwrap_or(f64::NAN)
}

/// The FlexOlmo acceptance criteria, each with the numbers behind it.
pub fn acceptance(rows: &[Row], closed: &[&str]) -> Vec<Check> {
    let (Some(public), Some(flex), Some(soup), Some(btm)) = (
        find(rows, "public"),
        find(rows, "FlexOlmo"),
        find(rows, "soup"),
        find(rows, "BTM"),
    ) else {
        return vec![];
    };
    let mut out = Vec::new();
    let worse: Vec<String> = closed
        .iter()
        .filter(|d| loss(flex, d) >= loss(public, d))
        .map(|d| d.to_string())
        .collect();
    out.push(Check {
        name: "FlexOlmo beats the public model on every closed domain".into(),
        passed: worse.is_empty(),
        detail: closed
            .iter()
            .map(|d| format!("{d} {:.3} vs {:.3}", loss(flex, d), loss(public, d)))
            .collect::<Vec<_>>()
            .join(", "),
    });
    // Every baseline of the table that combines the dense experts (BTX and prompt routing when
    // the table has them).
    let baselines: Vec<&Row> = [
        Some(soup),
        Some(btm),
        find(rows, "BTX"),
        find(rows, "prompt routing"),
    ]
    .into_iter()
    .flatten()
    .collect();
    out.push(Check {
        name: format!(
            "FlexOlmo's average loss beats {}",
            baselines
                .iter()
                .map(|r| r.model.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        passed: baselines.iter().all(|b| flex.avg_loss < b.avg_loss),
        detail: std::iter::once(format!("FlexOlmo {:.4}", flex.avg_loss))
            .chain(
                baselines
                    .iter()
                    .map(|b| format!("{} {:.4}", b.model, b.avg_loss)),
            )
            .collect::<Vec<_>>()
            .join(", "),
    });
    for x in closed {
        let Some(opt) = find(rows, &format!("FlexOlmo without {x}")) else {
            continue;
        };
        let own = loss(opt, x) / loss(flex, x) - 1.0;
        let acc_text = if acc(flex, x).is_nan() {
            String::new()
        } else {
            format!(
                ", acc {:.0}% -> {:.0}% (public {:.0}%)",
                100.0 * acc(flex, x),
                100.0 * acc(opt, x),
                100.0 * acc(public, x)
            )
        };
        let others: Vec<(String, f64)> = rows[0]
            .scores
            .iter()
            .map(|s| s.domain.clone())
            .filter(|d| d != x)
            .map(|d| {
                let r = (loss(opt, &d) / loss(flex, &d) - 1.0).abs();
                (d, r)
            })
            .collect();
        let max_other = others.iter().map(|o| o.1).fold(0.0, f64::max);
        out.push(Check {
            name: format!("opting out '{x}' hurts {x} only"),
            passed: own > 0.05 && max_other < 0.02 && toward_public(flex, opt, public, x),
            detail: format!(
                "{x} loss {:+.1}%{acc_text}; other domains max change {:.2}% ({})",
                100.0 * own,
                100.0 * max_other,
                others
                    .iter()
                    .map(|(d, r)| format!("{d} {:.2}%", 100.0 * r))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    out
}

/// Each merged model's gap to the FFN-only bound on every closed domain: the dense experts
/// first (how far the bound itself is from a dense expert), then FlexOlmo, each expert opted out
/// (on the domains it keeps) and every ablation. Empty when the table has no bound rows.
pub fn bound_gaps(rows: &[Row], ablations: &[Row], closed: &[&str]) -> Vec<BoundGap> {
    let bounds: Vec<(&str, f64)> = closed
        .iter()
        .filter_map(|d| find(rows, &format!("FFN-only {d}")).map(|b| (*d, loss(b, d))))
        .collect();
    if bounds.is_empty() {
        return vec![];
    }
    let gap = |r: &Row, skip: Option<&str>| BoundGap {
        model: r.model.clone(),
        gaps: bounds
            .iter()
            .filter(|(d, _)| Some(*d) != skip)
            .map(|(d, b)| (d.to_string(), loss(r, d) / b - 1.0))
            .collect(),
    };
    let mut out = Vec::new();
    for d in closed {
        if let Some(r) = find(rows, &format!("dense {d}")) {
            out.push(BoundGap {
                model: r.model.clone(),
                gaps: bounds
                    .iter()
                    .filter(|(b, _)| b == d)
                    .map(|(d, b)| (d.to_string(), loss(r, d) / b - 1.0))
                    .collect(),
            });
        }
    }
    if let Some(f) = find(rows, "FlexOlmo") {
        out.push(gap(f, None));
    }
    for d in closed {
        if let Some(r) = find(rows, &format!("FlexOlmo without {d}")) {
            out.push(gap(r, Some(d)));
        }
    }
    out.extend(ablations.iter().map(|r| gap(r, None)));
    out
}

/// Markdown: one row per model, one column per closed domain ("-" where a model has no figure).
fn bound_markdown(gaps: &[BoundGap], rows: &[Row], closed: &[&str]) -> String {
    let mut s = String::from("| model |");
    for d in closed {
        s.push_str(&format!(" {d} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(closed.len()));
    s.push_str("\n| FFN-only bound (loss) |");
    for d in closed {
        match find(rows, &format!("FFN-only {d}")) {
            Some(b) => s.push_str(&format!(" {:.4} |", loss(b, d))),
            None => s.push_str(" - |"),
        }
    }
    s.push('\n');
    for g in gaps {
        s.push_str(&format!("| {} |", g.model));
        for d in closed {
            match g.gaps.iter().find(|(x, _)| x == d) {
                Some((_, r)) => s.push_str(&format!(" {:+.1}% |", 100.0 * r)),
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Whether opting out leaves task accuracy on `d` at least as close to the public model's as
/// the full model's (true without tasks).
fn toward_public(flex: &Row, opt: &Row, public: &Row, d: &str) -> bool {
    let p = acc(public, d);
    p.is_nan() || (acc(opt, d) - p).abs() <= (acc(flex, d) - p).abs()
}

/// results.md: the main table, the checks, ablations and the routing table.
pub fn render(r: &DemoReport, experts: &[String]) -> String {
    let c = &r.config;
    let mut s = format!(
        "## FlexOlmo on {}\n\nPublic model: dense OLMo-2, H={} L={} heads={} I={}, vocab {}, seq {}; \
         public pretraining {} steps, each expert {} steps (trained alone on its domain), dense experts {} steps; \
         batch {}, seed {}. Merged FlexOlmo: top-{} of {} experts. Held-out loss per domain (lower is better) and exact-match task accuracy (%), evaluated on {}.\n\n",
        c.corpus.as_ref().map(|p| format!("the corpus in {}", p.display())).unwrap_or("the built-in FlexMix corpus".into()),
        c.hidden, c.layers, c.heads, c.intermediate, c.vocab, c.seq, c.public_steps, c.expert_steps, c.dense_steps, c.batch, c.seed, c.top_k, experts.len(), r.eval_device
    );
    s.push_str(&eval::markdown(&r.rows));
    s.push_str(&format!(
        "\nBaselines: soup averages the dense experts' weights; BTM mixes the {} dense experts with the lowest context loss at each position; \
         BTX makes the public and dense FFNs the experts of one MoE (top-{}), averages every other weight and trains only its router, {} steps on public data; \
         prompt routing sends each window to one model (public or a dense expert) by a classifier on the public model's mean hidden state of its first {} tokens, \
         trained on {} documents per domain; it sent held-out windows to their own domain's model at: {}.\n",
        c.btm_top_k,
        c.top_k.min(experts.len()),
        c.btx_steps,
        c.route_prompt,
        c.route_queries,
        r.prompt_routing
            .iter()
            .map(|(d, a)| format!("{d} {:.0}%", 100.0 * a))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s.push_str("\n### Acceptance checks\n\n");
    for ch in &r.checks {
        s.push_str(&format!(
            "- [{}] {}: {}\n",
            if ch.passed { "x" } else { " " },
            ch.name,
            ch.detail
        ));
    }
    if !r.bound.is_empty() {
        let closed: Vec<&str> = r
            .rows
            .iter()
            .filter_map(|x| x.model.strip_prefix("FFN-only "))
            .collect();
        s.push_str(&format!(
            "\n### Gap to the FFN-only bound\n\nAn expert trains FFN weights only, so the public model with only its FFNs fine-tuned on a \
             domain ({} steps at the experts' learning rate {}, the dense experts' seeds; no MoE, no public rows, no anchor) bounds what \
             any expert can reach there. Each model's held-out loss relative to that bound (a dense expert, which also trains the \
             embeddings, attention, norms and output layer, is below it):\n\n",
            c.dense_steps, c.expert_lr
        ));
        s.push_str(&bound_markdown(&r.bound, &r.rows, &closed));
    }
    if !r.ablations.is_empty() {
        s.push_str("\n### Ablations\n\n");
        s.push_str(&eval::markdown(&r.ablations));
    }
    s.push_str("\n### Routing (per layer: fraction of tokens using each expert, and in brackets its mean router probability)\n\n");
    s.push_str(&routing::markdown(&r.routing, experts));
    if !r.extraction.is_empty() {
        let c = &r.config;
        s.push_str(&format!(
            "\n### Data extraction (training documents reproduced: {} per domain, a 32-token prefix at a random offset, 10 samples of as many tokens as the true continuation, up to {}, top-k 50, top-p 0.95; extracted at normalised Levenshtein similarity >= 0.9)\n\n",
            c.extract_docs, c.extract_max_new
        ));
        s.push_str("| domain | public | dense expert | FlexOlmo | FlexOlmo without it |\n|---|---:|---:|---:|---:|\n");
        let cell = |x: &Extraction| {
            format!(
                " {:.1}% ({}/{}; similarity {:.2}) |",
                100.0 * x.rate,
                x.extracted,
                x.docs,
                x.mean_best_similarity
            )
        };
        for row in &r.extraction {
            s.push_str(&format!("| {} |", row.domain));
            for x in [
                &row.public,
                &row.dense,
                &row.flexolmo,
                &row.flexolmo_without,
            ] {
                s.push_str(&cell(x));
            }
            s.push('\n');
        }
    }
    s.push_str(&format!("\nTotal time {:.0} s.\n", r.seconds));
    s
}
