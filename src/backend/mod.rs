//! Compute backends. `cpu` is the f32 reference and the CPU fast path.
pub mod cpu;
pub mod cuda;
