//! Training batches from prepared token shards.

use super::Batches;
use crate::data::shards::{self, Dataset};
use crate::error::Result;

/// Random training windows (a pure function of seed, step and micro-batch) and fixed validation
/// windows of one prepared dataset.
pub struct ShardBatches<'a> {
    pub data: &'a Dataset,
    pub batch: usize,
    pub seq: usize,
    pub seed: u64,
    /// Upper bound on validation tokens per evaluation.
    pub valid_tokens: usize,
}

impl Batches for ShardBatches<'_> {
    fn train(&self, step: u64, micro: u64) -> Result<(Vec<u32>, Vec<u32>)> {
        shards::train_batch(
            &self.data.train,
            self.batch,
            self.seq,
            self.seed,
            step,
            micro,
        )
    }
    fn valid(&self) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        shards::valid_batches(&self.data.valid, self.batch, self.seq, self.valid_tokens)
    }
}
