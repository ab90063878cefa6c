//! Global grad-norm clipping and the warmup + cosine learning-rate schedule; the optimizer itself,
//! AdamW, belongs to the model's training step ([`crate::model::adamw`]).

pub use crate::model::adamw::{AdamW, AdamWConfig};
use crate::tensor::Tensor;

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
    use crate::model::ParamStore;

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
