//! AdamW with decoupled weight decay (PyTorch semantics), global grad-norm clipping, and the
//! warmup + cosine learning-rate schedule.

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

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &[(usize, Tensor)]) -> f32 {
    grads.iter().map(|(_, g)| g.sq_norm()).sum::<f64>().sqrt() as f32
}

/// Scale gradients so their global norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [(usize, Tensor)], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for (_, g) in grads.iter_mut() {
            g.data_mut().iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio` at `total`.
pub fn lr_at(step: u64, peak: f32, warmup: u64, total: u64, min_ratio: f32) -> f32 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f32 / span as f32).min(1.0);
    let cos = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(0, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-6);
        assert!((lr_at(9, 1.0, 10, 100, 0.1) - 1.0).abs() < 1e-6);
        assert!((lr_at(10, 1.0, 10, 100, 0.1) - 1.0).abs() < 1e-6);
        assert!((lr_at(100, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-6);
        assert!(lr_at(55, 1.0, 10, 100, 0.1) < 0.6 && lr_at(55, 1.0, 10, 100, 0.1) > 0.5);
    }

    #[test]
    fn adamw_matches_hand_computed_step() {
        let mut ps = ParamStore::default();
        ps.add("w", Tensor::from_vec(vec![1.0, -2.0, 0.5, 0.0], &[2, 2]));
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            1,
        );
        let g = Tensor::from_vec(vec![0.5, -1.0, 0.0, 2.0], &[2, 2]);
        opt.update(&mut ps, &[(0, g.clone())], 0.01);
        // First step: m_hat = g, v_hat = g^2, update = sign(g) (0 where g = 0).
        let expect = [
            1.0 * (1.0 - 0.001) - 0.01,
            -2.0 * (1.0 - 0.001) + 0.01,
            0.5 * (1.0 - 0.001),
            -0.01,
        ];
        for (a, b) in ps.value(0).data().iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn weight_decay_pulls_toward_the_decay_target() {
        let mut ps = ParamStore::default();
        ps.add("w", Tensor::from_vec(vec![1.0, -2.0, 0.5, 3.0], &[2, 2]));
        ps.params[0].decay_to = Some(Tensor::from_vec(vec![1.0, 0.0, 1.5, 2.0], &[2, 2]));
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg, 1);
        opt.update(&mut ps, &[(0, Tensor::zeros(&[2, 2]))], 0.1);
        // No gradient: only the decay acts, w - lr * wd * (w - target).
        let expect = [1.0, -2.0 + 0.1, 0.5 + 0.05, 3.0 - 0.05];
        for (a, b) in ps.value(0).data().iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
