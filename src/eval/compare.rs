//! Where a model's held-out loss differs from a reference's (say, a merged FlexOlmo model and a
//! domain's dense expert): the gap split by target token, and by how often each target occurs
//! in the public model's training data. A FlexOlmo expert trains only FFN weights, so a token
//! the public model never learned to predict (its frozen output row untrained) shows up here.

use super::Evaluated;
use crate::data::shards::TokenShard;
use crate::data::Tokenizer;
use crate::ensure;
use crate::error::Result;
use serde::Serialize;

/// Bounds of the public-count buckets: `[0, 1)`, `[1, 100)`, `[100, 1000)`, `[1000, inf)`.
const BUCKETS: &[(u64, u64)] = &[(0, 1), (1, 100), (100, 1000), (1000, u64::MAX)];

/// Losses summed over a set of target positions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Part {
    /// What the positions share: a token's text, or a range of public counts.
    pub label: String,
    /// The token id (per-token rows only).
    pub id: Option<u32>,
    /// How often the token is a target in the public training data (per-token rows, with
    /// public data given).
    pub public_count: Option<u64>,
    pub positions: usize,
    /// Mean loss of the model and of the reference over these positions.
    pub model_loss: f64,
    pub reference_loss: f64,
    /// This part's share of the total gap (sum of model minus reference losses), in [-1, 1]
    /// mostly; 0 when there is no gap.
    pub share: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenGap {
    pub positions: usize,
    pub model_loss: f64,
    pub reference_loss: f64,
    /// By the target's count in public training data (empty without public data).
    pub by_public_count: Vec<Part>,
    /// The `top` target tokens with the largest share of the gap, largest first.
    pub tokens: Vec<Part>,
}

/// How often each id is a target (every position but a document's first) in `shard`.
pub fn target_counts(shard: &TokenShard, vocab: usize) -> Vec<u64> {
    let mut counts = vec![0u64; vocab];
    for i in 1..shard.len() {
        if let Some(c) = counts.get_mut(shard.get(i) as usize) {
            *c += 1;
        }
    }
    counts
}

/// The gap between `model` and `reference` on `batches` (windows of `seq` tokens), per target
/// token (`top` of them kept) and, with `public_counts`, per public-count bucket.
pub fn token_gap(
    model: &Evaluated,
    reference: &Evaluated,
    batches: &[(Vec<u32>, Vec<u32>)],
    seq: usize,
    public_counts: Option<&[u64]>,
    tok: &Tokenizer,
    top: usize,
) -> Result<TokenGap> {
    let a = model.token_losses(batches, seq)?;
    let b = reference.token_losses(batches, seq)?;
    let targets: Vec<u32> = batches
        .iter()
        .flat_map(|(_, t)| t.iter().copied())
        .collect();
    ensure!(
        a.len() == targets.len() && b.len() == targets.len(),
        "{} targets, {} and {} losses",
        targets.len(),
        a.len(),
        b.len()
    );
    let gap: f64 = a.iter().zip(&b).map(|(x, y)| x - y).sum();
    // Sums (model, reference, positions) per token id.
    let mut per_token = std::collections::BTreeMap::<u32, (f64, f64, usize)>::new();
    for ((&t, x), y) in targets.iter().zip(&a).zip(&b) {
        let e = per_token.entry(t).or_default();
        e.0 += x;
        e.1 += y;
        e.2 += 1;
    }
    let part = |label: String, (x, y, n): (f64, f64, usize)| Part {
        label,
        positions: n,
        model_loss: x / n.max(1) as f64,
        reference_loss: y / n.max(1) as f64,
        share: if gap != 0.0 { (x - y) / gap } else { 0.0 },
        ..Default::default()
    };
    let count = |t: u32| public_counts.map(|c| c.get(t as usize).copied().unwrap_or(0));
    let by_public_count = match public_counts {
        None => Vec::new(),
        Some(_) => BUCKETS
            .iter()
            .map(|&(lo, hi)| {
                let sums = per_token
                    .iter()
                    .filter(|(&t, _)| (lo..hi).contains(&count(t).unwrap_or(0)))
                    .fold((0.0, 0.0, 0), |s, (_, v)| (s.0 + v.0, s.1 + v.1, s.2 + v.2));
                let label = match hi {
                    1 => "never".to_string(),
                    u64::MAX => format!(">= {lo}"),
                    _ => format!("{lo}-{}", hi - 1),
                };
                part(label, sums)
            })
            .collect(),
    };
    let mut tokens = per_token
        .iter()
        .map(|(&t, &sums)| {
            Ok(Part {
                id: Some(t),
                public_count: count(t),
                ..part(format!("{:?}", tok.decode(&[t])?), sums)
            })
        })
        .collect::<Result<Vec<Part>>>()?;
    let excess = |p: &Part| (p.model_loss - p.reference_loss) * p.positions as f64;
    tokens.sort_by(|x, y| excess(y).total_cmp(&excess(x)).then(x.id.cmp(&y.id)));
    tokens.truncate(top);
    let n = targets.len().max(1) as f64;
    Ok(TokenGap {
        positions: targets.len(),
        model_loss: a.iter().sum::<f64>() / n,
        reference_loss: b.iter().sum::<f64>() / n,
        by_public_count,
        tokens,
    })
}

/// The gap as markdown: totals, then the public-count table (if any), then the top tokens.
pub fn markdown(g: &TokenGap) -> String {
    let rel = if g.reference_loss > 0.0 {
        format!(
            " ({:+.1}%)",
            100.0 * (g.model_loss / g.reference_loss - 1.0)
        )
    } else {
        String::new()
    };
    let mut s = format!(
        "{} target positions: model {:.4}, reference {:.4}, gap {:+.4}{rel}\n",
        g.positions,
        g.model_loss,
        g.reference_loss,
        g.model_loss - g.reference_loss
    );
    let row = |p: &Part, lead: &str| {
        format!(
            "| {lead} | {} | {:.3} | {:.3} | {:.1}% |\n",
            p.positions,
            p.model_loss,
            p.reference_loss,
            100.0 * p.share
        )
    };
    if !g.by_public_count.is_empty() {
        s.push_str("\n| target's count in public training data | positions | model loss | reference loss | share of the gap |\n|---|---:|---:|---:|---:|\n");
        for p in &g.by_public_count {
            s.push_str(&row(p, &p.label));
        }
    }
    s.push_str("\n| target token | public count | positions | model loss | reference loss | share of the gap |\n|---|---:|---:|---:|---:|---:|\n");
    for p in &g.tokens {
        let count = p.public_count.map_or("-".to_string(), |c| c.to_string());
        s.push_str(&row(
            p,
            &format!("`{}` | {count}", p.label.replace('|', "\\|")),
        ));
    }
    s
}
