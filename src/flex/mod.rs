//! The FlexOlmo method: each data owner trains an expert FFN plus a router row against the frozen
//! public model ([`train_expert`]); the experts are merged without data ([`merge`]); any expert
//! can be left out at load time ([`load_model`] with a [`Selection`]); optionally the router rows
//! are tuned on proxy data ([`router_tune`]). Also the baselines: [`finetune`] (a dense
//! expert), [`soup`] (parameter average) and [`btx`] (the dense experts' FFNs as one MoE with a
//! router trained on public data).

pub mod artifact;
mod baselines;
mod batches;
mod btx;

mod expert;
mod merge;
mod select;

pub use artifact::{model_hash, ExpertArtifact, ExpertLayer, ExpertMeta};
pub use baselines::{finetune, router_tune, soup};
pub use batches::MixedBatches;
pub use btx::{btx, btx_model};
pub(crate) use expert::check_expert_settings;
pub use expert::{
    check_artifact_out, domain_embedding, expert_training_model, router_rows, train_expert,
    ExpertTrainOpts, RouterInit,
};
pub use merge::{merge, write_model, BiasOffset, Manifest, ManifestExpert};
pub use select::{load_model, Loaded, Selection};

pub const MANIFEST: &str = "flexolmo.json";
