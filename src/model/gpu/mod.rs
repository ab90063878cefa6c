//! The model on the GPU: the OLMo-2 / FlexOlmo forward ([`GpuModel`], with a KV cache for
//! decoding) and the training loss, its backward and the optimizer step ([`GpuTrainer`]), on
//! flexrun's CUDA kernels (`crate::backend::cuda`). The CPU model of the parent module is the
//! reference these follow (tests/gpu_model.rs).

mod extra;
pub mod infer;
pub mod train;
pub mod trainer;

pub use infer::{GpuKvCache, GpuModel};
pub use train::{GpuGrads, GpuLoss};
pub use trainer::{GpuTrainer, StepOut};
