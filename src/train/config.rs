//! The settings of a training run, and their validation.

use super::dp;
use super::optim::AdamWConfig;
use crate::ensure;
use crate::error::Result;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    pub lr: f32,
    pub min_lr_ratio: f32,
    pub warmup: u64,
    pub adamw: AdamWConfig,
    pub clip: f32,
    pub seed: u64,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Write a resumable checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    pub z_loss: f32,
    pub router_z_loss: f32,
    /// Weight of the public anchor ([`crate::model::LossCoefs::public_anchor`]) on the rows
    /// [`Batches::anchored`] marks.
    #[serde(default)]
    pub public_anchor: f32,
    /// Per-layer weights of the public anchor (empty: 1 for every layer).
    #[serde(default)]
    pub public_anchor_layers: Vec<f32>,
    /// Weight of the router's own-text loss ([`crate::model::LossCoefs::router_own`]).
    #[serde(default)]
    pub router_own: f32,
    /// Weight of the router's public-text loss ([`crate::model::LossCoefs::router_public`]).
    #[serde(default)]
    pub router_public: f32,
    /// Weight of the expert loudness loss ([`crate::model::LossCoefs::expert_loudness`]).
    #[serde(default)]
    pub expert_loudness: f32,
    /// Differentially private training (DP-SGD, [`dp`]); None: ordinary training.
    #[serde(default)]
    pub dp: Option<dp::DpConfig>,
    /// Training keeps only each layer's input and recomputes the layer's activations in the
    /// backward (the same gradients, less memory, about one more forward a step). A memory
    /// setting: a run may resume with it changed.
    #[serde(default)]
    pub recompute: bool,
}

impl TrainConfig {
    /// Settings that cannot train, as a one-line error naming the flag, before any work.
    pub fn check(&self) -> Result<()> {
        ensure!(self.steps >= 1, "--steps must be at least 1");
        ensure!(
            self.batch > 0 && self.seq > 0 && self.grad_accum > 0,
            "--batch, --seq and --grad-accum must be positive"
        );
        crate::limits::check_dim(
            "--batch",
            self.batch,
            crate::limits::MAX_BATCH,
            "far beyond any step",
        )?;
        crate::limits::check_dim(
            "--seq",
            self.seq,
            crate::limits::MAX_POSITIONS,
            "the longest context flexrun allows",
        )?;
        crate::limits::check_dim(
            "--grad-accum",
            self.grad_accum,
            crate::limits::MAX_BATCH,
            "far beyond any step",
        )?;
        ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "--lr must be a positive number, got {}",
            self.lr
        );
        ensure!(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "--min-lr-ratio must be in [0, 1] (the final learning rate as a fraction of --lr), got {}",
            self.min_lr_ratio
        );
        let a = &self.adamw;
        ensure!(
            (0.0..1.0).contains(&a.beta1),
            "--beta1 must be in [0, 1), got {}",
            a.beta1
        );
        ensure!(
            (0.0..1.0).contains(&a.beta2),
            "--beta2 must be in [0, 1), got {}",
            a.beta2
        );
        ensure!(
            a.eps > 0.0 && a.eps.is_finite(),
            "AdamW eps must be positive"
        );
        ensure!(
            self.clip.is_finite() && self.clip >= 0.0,
            "--clip must be a finite norm >= 0 (0: no clipping), got {}",
            self.clip
        );
        let wd = a.weight_decay;
        ensure!(
            wd.is_finite() && wd >= 0.0,
            "--weight-decay must be a finite number >= 0, got {wd}"
        );
        for (flag, w) in [
            ("--z-loss", self.z_loss),
            ("--router-z-loss", self.router_z_loss),
        ] {
            ensure!(
                w.is_finite() && w >= 0.0,
                "{flag} must be a finite weight >= 0, got {w}"
            );
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        let loss = crate::model::LossCoefs::default();
        TrainConfig {
            steps: 200,
            batch: 8,
            seq: 128,
            grad_accum: 1,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup: 20,
            adamw: AdamWConfig::default(),
            clip: 1.0,
            seed: 0,
            eval_every: 0,
            save_every: 0,
            // The loss weights default as the model's loss does.
            z_loss: loss.z_loss,
            router_z_loss: loss.router_z_loss,
            public_anchor: loss.public_anchor,
            public_anchor_layers: loss.public_anchor_layers,
            router_own: loss.router_own,
            router_public: loss.router_public,
            expert_loudness: loss.expert_loudness,
            recompute: false,
            dp: None,
        }
    }
}
