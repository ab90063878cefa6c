//! The transformer written once over the backend's kernel families
//! ([`crate::backend::kernels::Kernels`]): the forward with a KV cache ([`Net`], infer.rs), the
//! training loss and its backward (train.rs, with expert training's extra terms in extra.rs),
//! and the training step with DP-SGD ([`NetTrainer`], trainer.rs). `backend::cuda::Device` runs
//! it on a GPU, `ops::host::Host` on the CPU; the tape model of the parent module is the
//! reference it is checked against (tests/net.rs, tests/gpu_model.rs).

mod extra;
pub mod infer;
mod layout;
pub mod train;
pub mod trainer;

pub use infer::{Net, NetCache};
pub use layout::grad_from;
pub use train::{NetGrads, NetLoss};
pub use trainer::{NetTrainer, StepOut};

/// The model on the GPU.
pub type GpuNet<'d> = Net<'d, crate::backend::cuda::Device>;
/// The model on the CPU.
pub type HostNet<'d> = Net<'d, crate::ops::host::Host>;
