//! Differentially private training (DP-SGD) for a data owner's expert: every step samples the
//! owner's training documents independently with probability q (Poisson sampling), takes one
//! window of each, clips each document's gradient to norm `clip`, adds Gaussian noise of
//! standard deviation `noise * clip` to their sum and divides by the expected number of
//! documents; public rows (public data, no privacy needed) join unclipped. The privacy loss is
//! tracked with the Renyi-DP accountant of the sampled Gaussian mechanism (Mironov, Talwar,
//! Zhang 2019; integer orders) and converted to (epsilon, delta). The unit of privacy is one
//! document of the owner's training data: each contributes at most one clipped gradient a step.

use crate::ensure;
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// DP-SGD settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DpConfig {
    /// Noise multiplier sigma: the noise's standard deviation over the clipping norm.
    pub noise: f32,
    /// Per-record gradient norm bound C.
    pub clip: f32,
    /// Expected private documents per step (q times the number of documents).
    pub rows: usize,
    /// The delta of the reported (epsilon, delta).
    pub delta: f64,
}

impl DpConfig {
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.noise.is_finite() && self.noise > 0.0,
            "--dp-noise must be a positive number, got {}",
            self.noise
        );
        ensure!(
            self.clip.is_finite() && self.clip > 0.0,
            "--dp-clip must be a positive number, got {}",
            self.clip
        );
        ensure!(
            self.rows > 0,
            "differentially private training needs at least one expected private row per step"
        );
        ensure!(
            self.delta > 0.0 && self.delta < 1.0,
            "--dp-delta must be in (0, 1), got {}",
            self.delta
        );
        Ok(())
    }
}

/// The orders the accountant minimises over.
const ORDERS: std::ops::RangeInclusive<u32> = 2..=256;

fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// Renyi DP of order `alpha` (an integer >= 2) of one step of the sampled Gaussian mechanism
/// with sampling rate `q` and noise multiplier `sigma`:
/// `log(sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))) / (alpha - 1)`.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: u32) -> f64 {
    let a = alpha as f64;
    if q >= 1.0 {
        return a / (2.0 * sigma * sigma);
    }
    if q <= 0.0 {
        return 0.0;
    }
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let mut log_binom = 0.0; // log C(alpha, k), updated incrementally
    let mut acc = f64::NEG_INFINITY;
    for k in 0..=alpha {
        if k > 0 {
            log_binom += ((alpha - k + 1) as f64).ln() - (k as f64).ln();
        }
        let kf = k as f64;
        let term = log_binom + (a - kf) * l1q + kf * lq + (kf * kf - kf) / (2.0 * sigma * sigma);
        acc = log_add(acc, term);
    }
    acc / (a - 1.0)
}

/// The (epsilon, delta) guarantee after `steps` steps at sampling rate `q` and noise multiplier
/// `sigma`: `min over alpha of steps * RDP(alpha) + log(1/delta) / (alpha - 1)`.
pub fn epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> f64 {
    if steps == 0 {
        return 0.0;
    }
    ORDERS
        .map(|a| {
            steps as f64 * rdp_sampled_gaussian(q, sigma, a) + (1.0 / delta).ln() / (a as f64 - 1.0)
        })
        .fold(f64::INFINITY, f64::min)
}

/// The records (windows) sampled at one step and the public rows that join them.
pub struct DpBatch {
    /// (inputs, targets) of each sampled private record.
    pub private: Vec<(Vec<u32>, Vec<u32>)>,
    /// Public rows (inputs, targets, `[rows * seq]` each) and their number.
    pub public: (Vec<u32>, Vec<u32>),
    pub public_rows: usize,
}

/// Indices of the records sampled at `step`: each of `n` records independently with probability
/// `q`, from a stream seeded by `(seed, step)` (geometric gaps: O(q n) work).
pub fn poisson_sample(n: usize, q: f64, seed: u64, step: u64) -> Vec<usize> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(crate::hash::mix(&[seed, step, 0xD1FF_5A3B]));
    if q >= 1.0 {
        return (0..n).collect();
    }
    let mut out = Vec::new();
    if q <= 0.0 {
        return out;
    }
    let l1q = (-q).ln_1p();
    let mut i = 0usize;
    loop {
        // The gap to the next sampled record is geometric: floor(ln(u) / ln(1 - q)).
        let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let gap = (u.ln() / l1q).floor();
        if !gap.is_finite() || gap >= (n - i) as f64 {
            break;
        }
        i += gap as usize;
        out.push(i);
        i += 1;
        if i >= n {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_batches_are_the_gaussian_mechanism() {
        // q = 1: RDP(alpha) = alpha / (2 sigma^2), whatever the order.
        for a in [2, 5, 32] {
            let want = a as f64 / (2.0 * 1.5 * 1.5);
            assert!((rdp_sampled_gaussian(1.0, 1.5, a) - want).abs() < 1e-12);
            // The binomial sum at q just below 1 agrees.
            assert!((rdp_sampled_gaussian(1.0 - 1e-12, 1.5, a) - want).abs() < 1e-6);
        }
    }

    #[test]
    fn epsilon_matches_the_known_setting_and_moves_the_right_way() {
        // Abadi et al. (2016): q = 0.01, sigma = 4, 10,000 steps gives (1.26, 1e-5).
        let e = epsilon(0.01, 4.0, 10_000, 1e-5);
        assert!((1.2..1.32).contains(&e), "epsilon {e}");
        // TF Privacy's MNIST tutorial: q = 256/60000, sigma 1.1, 60 epochs: epsilon 3.01.
        let m = epsilon(256.0 / 60000.0, 1.1, 60 * 60000 / 256, 1e-5);
        assert!((2.9..3.1).contains(&m), "epsilon {m}");
        assert!(epsilon(0.01, 4.0, 20_000, 1e-5) > e);
        assert!(epsilon(0.01, 8.0, 10_000, 1e-5) < e);
        assert!(epsilon(0.02, 4.0, 10_000, 1e-5) > e);
        assert_eq!(epsilon(0.01, 4.0, 0, 1e-5), 0.0);
    }

    #[test]
    fn poisson_sampling_has_the_right_rate_and_is_reproducible() {
        let (n, q) = (2000, 0.05);
        let total: usize = (0..200).map(|s| poisson_sample(n, q, 7, s).len()).sum();
        let mean = total as f64 / 200.0;
        // Expected 100 a step, standard error of the mean ~0.7.
        assert!((mean - 100.0).abs() < 4.0, "mean {mean}");
        let s = poisson_sample(n, q, 7, 3);
        assert_eq!(s, poisson_sample(n, q, 7, 3));
        assert!(s.windows(2).all(|w| w[0] < w[1]) && s.iter().all(|&i| i < n));
        assert_ne!(s, poisson_sample(n, q, 7, 4));
        assert_eq!(poisson_sample(5, 1.0, 0, 0), vec![0, 1, 2, 3, 4]);
        assert!(poisson_sample(5, 0.0, 0, 0).is_empty());
    }
}
