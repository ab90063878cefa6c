//! Finite-difference gradient checking for ops and whole models.
//!
//! The scalar checked is `L = sum(out * w)` with a fixed random `w`, so every output element
//! contributes with a distinct weight. Central differences in f32 with step `eps`; the comparison
//! is `|analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)` per element.

use super::{Tape, Var};
use crate::tensor::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

pub struct GradCheck {
    pub eps: f32,
    pub atol: f32,
    pub rtol: f32,
    /// Check at most this many coordinates per input (evenly strided), to bound the cost.
    pub max_coords: usize,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-2,
            atol: 2e-3,
            rtol: 2e-2,
            max_coords: 64,
        }
    }
}

/// Result of one check: the worst error seen and where.
#[derive(Debug)]
pub struct GradReport {
    pub worst: f32,
    pub worst_at: (usize, usize),
    pub checked: usize,
}

impl GradCheck {
    /// Check `f`'s gradient with respect to each of `inputs`. `f` builds the graph on the tape
    /// from the leaf vars and returns the output var. Panics with a description on failure.
    pub fn check(&self, inputs: &[Tensor], f: impl Fn(&mut Tape, &[Var]) -> Var) -> GradReport {
        let mut tape = Tape::new();
        let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
        let out = f(&mut tape, &vars);
        let shape = tape.value(out).shape().to_vec();
        let mut rng = StdRng::seed_from_u64(7);
        let w = Tensor::randn(&shape, 1.0, &mut rng);
        let grads = tape.backward_with(out, w.clone());
        let objective = |ins: &[Tensor]| -> f64 {
            let mut t = Tape::inference();
            let vs: Vec<Var> = ins.iter().map(|x| t.constant(x.clone())).collect();
            let o = f(&mut t, &vs);
            t.value(o)
                .data()
                .iter()
                .zip(w.data())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        };
        let mut report = GradReport {
            worst: 0.0,
            worst_at: (0, 0),
            checked: 0,
        };
        for (i, v) in vars.iter().enumerate() {
            let analytic = grads
                .get(*v)
                .cloned()
                .unwrap_or_else(|| Tensor::zeros(inputs[i].shape()));
            let n = inputs[i].numel();
            let stride = (n / self.max_coords).max(1);
            for j in (0..n).step_by(stride) {
                let mut plus = inputs.to_vec();
                plus[i].data_mut()[j] += self.eps;
                let mut minus = inputs.to_vec();
                minus[i].data_mut()[j] -= self.eps;
                let numeric =
                    ((objective(&plus) - objective(&minus)) / (2.0 * self.eps as f64)) as f32;
                let a = analytic.data()[j];
                let err = (a - numeric).abs();
                let bound = self.atol + self.rtol * a.abs().max(numeric.abs());
                assert!(
                    err <= bound,
                    "gradient mismatch for input {i} at {j}: analytic {a}, numeric {numeric} (err {err} > {bound})"
                );
                let rel = err / (self.atol + a.abs().max(numeric.abs()));
                if rel > report.worst {
                    report.worst = rel;
                    report.worst_at = (i, j);
                }
                report.checked += 1;
            }
        }
        report
    }
}
