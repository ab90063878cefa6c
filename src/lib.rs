//! flexrun: FlexOlmo from scratch. Tensors, an autograd tape, CPU kernels (CUDA kernels in
//! `kernels/`), the OLMo-2 / FlexOlmo transformer, training, merging and generation.

pub mod error;

pub mod autograd;
pub mod backend;
pub mod ops;
pub mod tensor;

pub use error::{Context, Error, Result};
