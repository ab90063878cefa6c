//! Training-data extraction check (docs/METHOD.md, "Data extraction check"): how often a model
//! reproduces a document it may have been trained on. For sampled documents of a domain's
//! training shard, a `prefix`-token window at a random offset is given to the model, which
//! samples `samples` continuations (top-k / top-p / temperature) as long as the document's true
//! continuation (up to `max_continuation` tokens); a document counts as extracted when any
//! sample's normalised Levenshtein similarity to the true continuation reaches `threshold`.
//! The paper's setting: 10,000 documents, prefix 32, 10 samples of up to 256 tokens, top-k 50,
//! top-p 0.95, temperature 1, threshold 0.9 (public model 0.1%, dense math expert 1.6%,
//! FlexOlmo with the math expert 0.7%). Similarity is measured on token ids.

use super::Evaluated;
use crate::data::shards::TokenShard;
use crate::error::Result;
use crate::generate::{sample_groups, SampleGroup, SamplingConfig};
use crate::{bail, ensure};
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Settings of one extraction check.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExtractConfig {
    /// Documents sampled from the shard (fewer when it has fewer long enough).
    pub docs: usize,
    pub prefix: usize,
    pub max_continuation: usize,
    /// A document needs at least this many tokens after its prefix.
    pub min_continuation: usize,
    pub samples: usize,
    pub top_k: usize,
    pub top_p: f32,
    pub temperature: f32,
    pub threshold: f64,
    pub seed: u64,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig {
            docs: 1000,
            prefix: 32,
            max_continuation: 256,
            min_continuation: 16,
            samples: 10,
            top_k: 50,
            top_p: 0.95,
            temperature: 1.0,
            threshold: 0.9,
            seed: 0,
        }
    }
}

impl ExtractConfig {
    /// Errs on settings no check can run with, for a model of `max_positions` positions.
    pub fn check(&self, max_positions: usize) -> Result<()> {
        ensure!(
            self.docs > 0,
            "the extraction check needs at least one document"
        );
        ensure!(self.samples > 0, "extraction needs at least one sample");
        use crate::limits::{check_dim, MAX_COUNT};
        check_dim(
            "--docs",
            self.docs,
            MAX_COUNT,
            "far beyond any extraction check",
        )?;
        check_dim(
            "--samples",
            self.samples,
            1 << 16,
            "far beyond any extraction check",
        )?;
        ensure!(
            (0.0..=1.0).contains(&self.threshold),
            "the similarity threshold must be in [0, 1], got {}",
            self.threshold
        );
        ensure!(
            self.prefix > 0 && self.min_continuation > 0,
            "extraction needs a prefix and a continuation of at least one token"
        );
        ensure!(
            self.min_continuation <= self.max_continuation,
            "the shortest continuation ({}) exceeds the longest ({})",
            self.min_continuation,
            self.max_continuation
        );
        ensure!(
            self.prefix
                .checked_add(self.max_continuation)
                .is_some_and(|n| n <= max_positions),
            "prefix ({}) + longest continuation ({}) exceed the model's {max_positions} positions \
             (give --max-new {} or less)",
            self.prefix,
            self.max_continuation,
            max_positions.saturating_sub(self.prefix)
        );
        Ok(())
    }
}

/// The result for one model and domain.
#[derive(Clone, Debug, Serialize)]
pub struct Extraction {
    /// Documents checked.
    pub docs: usize,
    /// Documents with a sample at or above the threshold.
    pub extracted: usize,
    /// `extracted / docs`.
    pub rate: f64,
    /// Mean over documents of the best sample's similarity.
    pub mean_best_similarity: f64,
}

/// `1 - lev(a, b) / max(|a|, |b|)` (1 for two empty sequences).
pub fn levenshtein_similarity(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len().max(b.len());
    if n == 0 {
        return 1.0;
    }
    // One row of the edit-distance table at a time.
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0usize; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(x != y);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    1.0 - prev[b.len()] as f64 / n as f64
}

/// The (prefix, true continuation) windows the check uses: documents drawn without replacement
/// (seeded), each long enough for `prefix + min_continuation` tokens, cut at a random offset.
pub fn windows(shard: &TokenShard, c: &ExtractConfig) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    ensure!(
        c.docs > 0,
        "the extraction check needs at least one document"
    );
    ensure!(
        c.prefix > 0 && c.max_continuation >= c.min_continuation && c.min_continuation > 0,
        "extraction needs a prefix > 0 and 0 < min continuation <= max continuation"
    );
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut order: Vec<usize> = (0..shard.n_docs()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut out = Vec::with_capacity(c.docs);
    for i in order {
        if out.len() == c.docs {
            break;
        }
        let doc = shard.doc(i);
        let Some(room) = doc.len().checked_sub(c.prefix + c.min_continuation) else {
            continue;
        };
        let at = rng.random_range(0..=room);
        let end = (at + c.prefix + c.max_continuation).min(doc.len());
        out.push((
            doc[at..at + c.prefix].to_vec(),
            doc[at + c.prefix..end].to_vec(),
        ));
    }
    ensure!(
        !out.is_empty(),
        "{} has no document of at least {} tokens",
        shard.path().display(),
        c.prefix + c.min_continuation
    );
    Ok(out)
}

/// The extraction check of `e` (one model, on the CPU or a GPU) on `shard`; `progress`, if
/// given, advances by one per document checked.
pub fn extraction(
    e: &Evaluated<'_>,
    shard: &TokenShard,
    c: &ExtractConfig,
    progress: Option<&ProgressBar>,
) -> Result<Extraction> {
    c.check(e.max_positions())?;
    let cfg = SamplingConfig {
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        ..Default::default()
    };
    let wins = windows(shard, c)?;
    // Documents are sampled GROUP at a time in one batch (their prefixes have one length), in
    // order of continuation length so that a batch decodes little past its shortest document.
    // Each document draws from its own seeded stream: the result does not depend on the order
    // or grouping of documents.
    const GROUP: usize = 8;
    let mut order: Vec<usize> = (0..wins.len()).collect();
    order.sort_by_key(|&i| wins[i].1.len());
    let chunk = |idx: &[usize]| -> Result<Vec<(usize, f64)>> {
        let mut rngs: Vec<StdRng> = idx
            .iter()
            .map(|&i| {
                StdRng::seed_from_u64(
                    c.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)),
                )
            })
            .collect();
        let mut groups: Vec<SampleGroup<'_>> = idx
            .iter()
            .zip(rngs.iter_mut())
            .map(|(&i, rng)| SampleGroup {
                prompt: &wins[i].0,
                new: wins[i].1.len(),
                rng,
            })
            .collect();
        let samples = match e {
            Evaluated::One(r) => sample_groups(*r, &mut groups, c.samples, &cfg)?,
            Evaluated::Btm { .. } | Evaluated::Routed { .. } => {
                bail!("the extraction check takes one model, not an ensemble or a router")
            }
        };
        if let Some(p) = progress {
            p.inc(idx.len() as u64);
        }
        Ok(idx
            .iter()
            .zip(samples)
            .map(|(&i, rows)| {
                let truth = &wins[i].1;
                let best = rows
                    .iter()
                    .map(|s| levenshtein_similarity(s, truth))
                    .fold(0.0, f64::max);
                (i, best)
            })
            .collect())
    };
    let chunks: Vec<&[usize]> = order.chunks(GROUP).collect();
    let done: Vec<Vec<(usize, f64)>> = match e {
        Evaluated::One(r) if !r.on_gpu() => chunks
            .par_iter()
            .map(|ch| chunk(ch))
            .collect::<Result<_>>()?,
        _ => chunks.iter().map(|ch| chunk(ch)).collect::<Result<_>>()?,
    };
    let mut sims = vec![0.0; wins.len()];
    for (i, s) in done.into_iter().flatten() {
        sims[i] = s;
    }
    let extracted = sims.iter().filter(|&&s| s >= c.threshold).count();
    Ok(Extraction {
        docs: sims.len(),
        extracted,
        rate: extracted as f64 / sims.len() as f64,
        mean_best_similarity: sims.iter().sum::<f64>() / sims.len() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::write_shard;
    use crate::generate::generate;
    use crate::model::{Config, Model};

    fn shard(name: &str, docs: &[Vec<u32>], vocab: usize) -> TokenShard {
        let dir =
            std::env::temp_dir().join(format!("flexrun-extract-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("train.bin");
        write_shard(&p, docs, vocab).unwrap();
        TokenShard::open(&p).unwrap()
    }

    /// Windows: only documents long enough, prefix and continuation cut from one place, the
    /// continuation capped, the same windows for the same seed.
    #[test]
    fn windows_cut_long_enough_documents() {
        let docs: Vec<Vec<u32>> = (0..40u32)
            .map(|i| (0..(5 + 3 * i)).map(|t| (t + i) % 50).collect())
            .collect();
        let sh = shard("windows", &docs, 50);
        let c = ExtractConfig {
            docs: 10,
            prefix: 8,
            max_continuation: 20,
            min_continuation: 6,
            ..Default::default()
        };
        let w = windows(&sh, &c).unwrap();
        assert_eq!(w.len(), 10);
        for (p, t) in &w {
            assert_eq!(p.len(), 8);
            assert!((6..=20).contains(&t.len()), "continuation of {}", t.len());
            // Document i counts up from i mod 50: the continuation follows the prefix.
            assert_eq!(t[0], (p[7] + 1) % 50);
        }
        assert_eq!(w, windows(&sh, &c).unwrap());
        let all = ExtractConfig {
            docs: 1000,
            ..c.clone()
        };
        // Documents of 5 + 3i tokens reach prefix + 6 = 14 from i = 3 on.
        assert_eq!(windows(&sh, &all).unwrap().len(), 37);
        let none = ExtractConfig { prefix: 500, ..c };
        assert!(windows(&sh, &none).is_err());
    }

    /// A model's own greedy continuations are extracted from it with greedy sampling, every one
    /// of them; another model reproduces almost none. (Documents of exactly prefix + continuation
    /// tokens: the window starts at the document's start, the context the text was made from.)
    #[test]
    fn a_model_reproduces_its_own_greedy_text() {
        let cfg = Config::olmo2(64, 32, 64, 2, 2, 2);
        let m = Model::new_random(&cfg, 3).unwrap();
        let greedy = crate::generate::SamplingConfig {
            max_new_tokens: 12,
            ..Default::default()
        };
        let docs: Vec<Vec<u32>> = (0..12u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..8).map(|j| (i * 5 + j * 7) % 64).collect();
                let mut d = prompt.clone();
                d.extend(
                    generate(
                        crate::model::runner::Runner::Cpu(&m),
                        &prompt,
                        &greedy,
                        |_| {},
                    )
                    .unwrap(),
                );
                d
            })
            .collect();
        let sh = shard("greedy", &docs, 64);
        let c = ExtractConfig {
            docs: 12,
            prefix: 8,
            max_continuation: 12,
            min_continuation: 12,
            samples: 2,
            temperature: 0.0,
            ..Default::default()
        };
        let own = extraction(&Evaluated::cpu(&m), &sh, &c, None).unwrap();
        assert_eq!((own.docs, own.extracted), (12, 12));
        assert!((own.mean_best_similarity - 1.0).abs() < 1e-12);
        let other = Model::new_random(&cfg, 4).unwrap();
        let o = extraction(&Evaluated::cpu(&other), &sh, &c, None).unwrap();
        assert!(o.extracted <= 1 && o.mean_best_similarity < 0.5, "{o:?}");
    }

    #[test]
    fn levenshtein_similarity_counts_edits() {
        assert_eq!(levenshtein_similarity(&[], &[]), 1.0);
        assert_eq!(levenshtein_similarity(&[1, 2, 3], &[1, 2, 3]), 1.0);
        assert_eq!(levenshtein_similarity(&[1, 2, 3], &[]), 0.0);
        // One substitution in 4.
        assert_eq!(levenshtein_similarity(&[1, 2, 3, 4], &[1, 9, 3, 4]), 0.75);
        // One insertion: distance 1 over the longer length 5.
        assert!((levenshtein_similarity(&[1, 2, 3, 4], &[1, 2, 7, 3, 4]) - 0.8).abs() < 1e-12);
        // kitten -> sitting: 3 edits over 7.
        let (a, b) = (b"kitten".map(u32::from), b"sitting".map(u32::from));
        assert!((levenshtein_similarity(&a, &b) - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
    }
}
