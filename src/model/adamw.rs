//! AdamW with decoupled weight decay (PyTorch semantics) on f32 master weights, for the trainable
//! parameters of a [`ParamStore`]; weight decay can pull toward a target instead of zero
//! (`Param::decay_to`). The GPU step ([`crate::model::net::NetTrainer`]) runs the same update
//! with the fused AdamW kernel.

use crate::model::ParamStore;
use crate::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Optimizer state for each trainable parameter: first and second moments, f32.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    /// Per parameter id: `(m, v)`, allocated on first update.
    pub moments: Vec<Option<(Vec<f32>, Vec<f32>)>>,
}

/// Weight decay applies to matrices (rank >= 2), not to norms, biases or router biases.
fn decays(t: &Tensor) -> bool {
    t.shape().len() >= 2 && t.shape().iter().all(|&d| d > 1)
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, n_params: usize) -> Self {
        AdamW {
            cfg,
            step: 0,
            moments: vec![None; n_params],
        }
    }

    /// One update with learning rate `lr`; `grads` are `(param id, grad)` of trainable params.
    pub fn update(&mut self, params: &mut ParamStore, grads: &[(usize, Tensor)], lr: f32) {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (id, g) in grads {
            let p = &mut params.params[*id];
            debug_assert!(p.trainable);
            let n = p.value.numel();
            let (m, v) = self.moments[*id].get_or_insert_with(|| (vec![0f32; n], vec![0f32; n]));
            let wd = if decays(&p.value) {
                c.weight_decay
            } else {
                0.0
            };
            let w = p.value.data_mut();
            let target: Option<&[f32]> = p.decay_to.as_ref().map(|t| {
                assert_eq!(t.numel(), n, "decay target of {} has another size", p.name);
                t.data()
            });
            const CH: usize = 1 << 14;
            w.par_chunks_mut(CH)
                .zip(m.par_chunks_mut(CH))
                .zip(v.par_chunks_mut(CH))
                .zip(g.data().par_chunks(CH))
                .enumerate()
                .for_each(|(ci, (((w, m), v), g))| {
                    let t = target.map(|t| &t[ci * CH..ci * CH + w.len()]);
                    for i in 0..w.len() {
                        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                        let mh = m[i] / bc1;
                        let vh = v[i] / bc2;
                        w[i] -= lr * wd * (w[i] - t.map_or(0.0, |t| t[i]));
                        w[i] -= lr * mh / (vh.sqrt() + c.eps);
                    }
                });
        }
    }
}
