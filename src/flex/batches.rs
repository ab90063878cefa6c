//! Training batches drawn from several prepared datasets ([`MixedBatches`]).

use crate::data::shards::{self, Dataset};
use crate::error::{Context, Result};
use crate::train::pretrain::VALID_TOKENS;
use crate::train::Batches;
use rand::{rngs::StdRng, SeedableRng};

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
