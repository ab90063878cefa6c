//! flexrun: FlexOlmo from scratch. Tensors, an autograd tape, CPU kernels (CUDA kernels in
//! `kernels/`), the OLMo-2 / FlexOlmo transformer, training, merging and generation.

pub mod error;
pub mod eval;
pub mod flex;
pub mod fsutil;
pub mod hash;
pub mod limits;

pub mod autograd;
pub mod backend;
pub mod bench;
pub mod data;
pub mod demo;
pub mod generate;
pub mod model;
pub mod ops;
pub mod serve;
pub mod tensor;
pub mod train;

pub use error::{Context, Error, Result};
