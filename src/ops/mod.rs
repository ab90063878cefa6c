//! Differentiable ops: one file per op family, each holding its forward, its backward and the
//! CPU kernels they run. All activations are row-major `[rows, cols]` f32 tensors; attention
//! inputs are `[B*T, heads*hd]`, i.e. `[B, T, heads, hd]` in memory.

mod attention;
mod elementwise;
mod embedding;
pub mod host;
mod linear;
mod loss;
mod moe;
mod rmsnorm;
mod rope;
mod router;

pub use attention::{
    attention, attention_backward, attention_forward, attention_reference, AttnShape,
};
pub use elementwise::{add, add_scaled, cat_rows, scale, swiglu};
pub use embedding::embedding;
pub use linear::linear;
pub use loss::{
    cross_entropy, excess_energy, logsumexp_sq_mean, rel_sq_err, CrossEntropyOut, IGNORE,
};
pub use moe::{gather_rows, moe_combine};
pub use rmsnorm::rmsnorm;
pub use rope::{rope, RopeTable};
pub use router::{route, route_values, softmax_in_place, Routing};
