//! Finite-difference gradient checks for every op.

use flexrun::autograd::gradcheck::GradCheck;
use flexrun::ops::{self, AttnShape, RopeTable};
use flexrun::tensor::Tensor;
use rand::{rngs::StdRng, SeedableRng};
use std::sync::Arc;

fn rng() -> StdRng {
    StdRng::seed_from_u64(42)
}

#[test]
fn linear() {
    let mut r = rng();
    let x = Tensor::randn(&[5, 7], 1.0, &mut r);
    let w = Tensor::randn(&[3, 7], 0.5, &mut r);
    GradCheck::default().check(&[x, w], |t, v| ops::linear(t, v[0], v[1]));
}

#[test]
fn embedding() {
    let mut r = rng();
    let w = Tensor::randn(&[6, 4], 1.0, &mut r);
    GradCheck::default().check(&[w], |t, v| ops::embedding(t, v[0], &[3, 1, 3, 0, 5]));
}

#[test]
fn rmsnorm() {
    let mut r = rng();
    let x = Tensor::randn(&[4, 9], 1.0, &mut r);
    let w = Tensor::randn(&[9], 1.0, &mut r);
    GradCheck::default().check(&[x, w], |t, v| ops::rmsnorm(t, v[0], v[1], 1e-6));
}

#[test]
fn rope() {
    let mut r = rng();
    let x = Tensor::randn(&[2 * 3, 2 * 8], 1.0, &mut r);
    let table = Arc::new(RopeTable::new(8, 10000.0, 16));
    GradCheck::default().check(&[x], |t, v| ops::rope(t, v[0], &table, 3, 2));
}

#[test]
fn swiglu_add_scale() {
    let mut r = rng();
    let g = Tensor::randn(&[3, 5], 1.5, &mut r);
    let u = Tensor::randn(&[3, 5], 1.0, &mut r);
    GradCheck::default().check(&[g, u], |t, v| {
        let a = ops::swiglu(t, v[0], v[1]);
        let b = ops::add_scaled(t, a, v[1], -0.7);
        let c = ops::add(t, b, v[0]);
        ops::scale(t, c, 1.3)
    });
}

#[test]
fn cat_rows() {
    let mut r = rng();
    let a = Tensor::randn(&[1, 4], 1.0, &mut r);
    let b = Tensor::randn(&[2, 4], 1.0, &mut r);
    GradCheck::default().check(&[a, b], |t, v| ops::cat_rows(t, &[v[0], v[1]]));
}

#[test]
fn attention_causal_gqa() {
    for &(b, tt, nh, nkv, hd) in &[(1, 5, 2, 2, 4), (2, 7, 4, 2, 6), (1, 70, 2, 1, 4)] {
        let mut r = rng();
        let q = Tensor::randn(&[b * tt, nh * hd], 1.0, &mut r);
        let k = Tensor::randn(&[b * tt, nkv * hd], 1.0, &mut r);
        let v = Tensor::randn(&[b * tt, nkv * hd], 1.0, &mut r);
        let s = AttnShape::causal(b, tt, nh, nkv, hd);
        GradCheck {
            max_coords: 48,
            ..Default::default()
        }
        .check(&[q, k, v], |t, x| ops::attention(t, x[0], x[1], x[2], s));
    }
}

#[test]
fn cross_entropy_with_z_loss_and_ignore() {
    let mut r = rng();
    let logits = Tensor::randn(&[4, 6], 2.0, &mut r);
    GradCheck::default().check(&[logits], |t, v| {
        ops::cross_entropy(t, v[0], &[1, 5, u32::MAX, 0], 1e-2).loss
    });
}

#[test]
fn router_z_loss() {
    let mut r = rng();
    let z = Tensor::randn(&[5, 3], 1.0, &mut r);
    GradCheck::default().check(&[z], |t, v| ops::logsumexp_sq_mean(t, v[0]));
}

#[test]
fn route_topk_with_bias_and_renorm() {
    // Logits spread out enough that a finite-difference step never flips the top-k choice.
    let z = Tensor::from_vec(
        vec![
            2.0, 0.5, -1.0, 0.1, -0.3, 1.2, 0.0, 2.5, -2.0, 1.0, 0.4, -0.8,
        ],
        &[3, 4],
    );
    // Away from the kink of min(b, 0) at 0; the positive entry gets no gradient.
    let bias = Tensor::from_vec(vec![-0.2, -0.5, -1.5, 0.7], &[4]);
    for renorm in [false, true] {
        GradCheck::default().check(&[z.clone(), bias.clone()], |t, v| {
            ops::route(t, v[0], Some(v[1]), 2, renorm).0
        });
    }
}

#[test]
fn rel_sq_err_over_marked_rows() {
    let mut r = rng();
    let a = Tensor::randn(&[4, 3], 1.0, &mut r);
    let b = Tensor::randn(&[4, 3], 1.0, &mut r);
    let rows = Arc::new(vec![true, false, true, true]);
    GradCheck::default().check(&[a.clone(), b.clone()], |t, v| {
        ops::rel_sq_err(t, v[0], v[1], &rows)
    });
    // The value: unmarked rows count for nothing; no marked row gives 0.
    let mut tape = flexrun::autograd::Tape::new();
    let (va, vb) = (tape.constant(a.clone()), tape.constant(b.clone()));
    let e = ops::rel_sq_err(&mut tape, va, vb, &rows);
    let got = tape.value(e).data()[0];
    let (mut s, mut n) = (0f64, 0f64);
    for i in [0, 2, 3] {
        for j in 0..3 {
            let (x, y) = (a.row(i)[j] as f64, b.row(i)[j] as f64);
            s += (x - y) * (x - y);
            n += y * y;
        }
    }
    assert!((got as f64 - s / n).abs() < 1e-5, "{got} vs {}", s / n);
    let none = Arc::new(vec![false; 4]);
    let e = ops::rel_sq_err(&mut tape, va, vb, &none);
    assert_eq!(tape.value(e).data()[0], 0.0);
}

#[test]
fn excess_energy_is_a_hinge_on_the_energy_ratio() {
    let mut r = rng();
    let a = Tensor::randn(&[4, 3], 1.5, &mut r);
    let b = Tensor::randn(&[4, 3], 1.0, &mut r);
    let energy = |t: &Tensor| t.data().iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
    assert!(energy(&a) > 1.2 * energy(&b), "the check needs a louder a");
    GradCheck::default().check(&[a.clone(), b.clone()], |t, v| {
        ops::excess_energy(t, v[0], v[1])
    });
    let mut tape = flexrun::autograd::Tape::new();
    let (va, vb) = (tape.constant(a.clone()), tape.constant(b.clone()));
    let e = ops::excess_energy(&mut tape, va, vb);
    let want = energy(&a) / energy(&b) - 1.0;
    let got = tape.value(e).data()[0] as f64;
    assert!((got - want).abs() < 1e-5 * want.max(1.0), "{got} vs {want}");
    // Quieter than b: no loss and no gradient.
    let e = ops::excess_energy(&mut tape, vb, va);
    assert_eq!(tape.value(e).data()[0], 0.0);
    let g = tape.backward(e);
    assert!(g.get(vb).is_none_or(|g| g.data().iter().all(|&x| x == 0.0)));
}

#[test]
fn gather_and_combine() {
    let mut r = rng();
    let x = Tensor::randn(&[4, 3], 1.0, &mut r);
    let z = Tensor::from_vec(
        vec![
            2.0, 0.5, -1.0, 0.1, -0.3, 1.2, 0.0, 2.5, -2.0, 1.0, 0.4, -0.8,
        ],
        &[4, 3],
    );
    let wexp: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(&[3, 3], 1.0, &mut r))
        .collect();
    GradCheck::default().check(
        &[x, z, wexp[0].clone(), wexp[1].clone(), wexp[2].clone()],
        |t, v| {
            let (w, routing) = ops::route(t, v[1], None, 2, false);
            let routing = Arc::new(routing);
            let outs: Vec<Option<_>> = (0..3)
                .map(|e| {
                    let toks = Arc::new(routing.expert_tokens[e].clone());
                    (!toks.is_empty()).then(|| {
                        let xe = ops::gather_rows(t, v[0], &toks);
                        ops::linear(t, xe, v[2 + e])
                    })
                })
                .collect();
            ops::moe_combine(t, &outs, w, &routing)
        },
    );
}
