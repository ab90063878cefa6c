//! Data: the built-in synthetic corpus FlexMix, the byte-level BPE tokenizer, and token shards.
//!
//! The pipeline is `synth::write_corpus` (or any `.txt`/`.jsonl` text) -> `tokenizer::train_bpe`
//! -> `shards::prepare` -> `shards::Dataset::open` -> `shards::train_batch`. Each FlexOlmo data
//! owner runs `prepare` over its own domain directory only.

pub mod shards;
pub mod synth;
mod text;
pub mod tokenizer;

pub use shards::{Dataset, Meta, TokenShard};
pub use tokenizer::Tokenizer;
