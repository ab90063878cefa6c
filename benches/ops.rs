//! CPU op benchmarks (criterion): the GEMM shapes of the `moe_small` training step, attention
//! forward+backward, fused cross-entropy forward+backward, and one whole training step.
//!
//! Run: `cargo bench --bench ops` (all), or filter, e.g. `cargo bench --bench ops -- gemm`.
//! Throughput is reported in FLOP/s for the compute-bound groups (`Throughput::Elements` counts
//! floating-point operations, so criterion's "elem/s" reads as FLOP/s) and in tokens/s for the
//! training step. Napkin math for moe_small (H=256, I=704, 4 layers, 4 experts top-2, V=4096,
//! B*T=2048): ~27 GFLOP forward, ~82 GFLOP per training step, of which 96% are the GEMMs below.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flexrun::autograd::Tape;
use flexrun::backend::cpu::matmul;
use flexrun::model::Config;
use flexrun::ops::{self, AttnShape};
use flexrun::tensor::Tensor;
use rand::{rngs::StdRng, SeedableRng};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

/// `(name, m, n, k, a_t, b_t)`: the per-step GEMMs of moe_small (an expert sees ~B*T*k/E = 1024
/// tokens). `linear` computes `y = x W^T` (b_t), `dx = dy W` (plain) and `dW = dy^T x` (a_t).
const GEMMS: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("attn_proj_fwd", 2048, 256, 256, false, true),
    ("attn_proj_dx", 2048, 256, 256, false, false),
    ("attn_proj_dw", 256, 256, 2048, true, false),
    ("expert_up_fwd", 1024, 704, 256, false, true),
    ("expert_up_dx", 1024, 256, 704, false, false),
    ("expert_up_dw", 704, 256, 1024, true, false),
    ("expert_down_fwd", 1024, 256, 704, false, true),
    ("expert_down_dw", 256, 704, 1024, true, false),
    ("ffn_dense_fwd", 2048, 704, 256, false, true),
    ("lm_head_fwd", 2048, 4096, 256, false, true),
    ("lm_head_dx", 2048, 256, 4096, false, false),
    ("lm_head_dw", 4096, 256, 2048, true, false),
];

fn gemm(c: &mut Criterion) {
    // Like `flexrun bench train`: freed buffers stay in the process (no page faults per call).
    flexrun::backend::cpu::tune_allocator();
    let mut g = c.benchmark_group("gemm");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut rng = StdRng::seed_from_u64(0);
    for &(name, m, n, k, at, bt) in GEMMS {
        let a = Tensor::randn(&[m * k], 1.0, &mut rng);
        let b = Tensor::randn(&[k * n], 1.0, &mut rng);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let id = BenchmarkId::new(name, format!("{m}x{n}x{k}"));
        g.bench_function(id, |bch| {
            bch.iter(|| {
                matmul(
                    m,
                    n,
                    k,
                    a.data(),
                    at,
                    b.data(),
                    bt,
                    black_box(&mut out),
                    false,
                )
            })
        });
    }
    g.finish();
}

/// Causal attention FLOPs (QK^T and PV over the causal half) for a forward pass; backward is
/// counted as 2.5x (S recomputed, dV, dP, dQ, dK).
fn attention_flops(s: &AttnShape) -> u64 {
    let pairs = (s.tq * (s.tq + 1) / 2 + s.tq * (s.tk - s.tq)) as u64;
    (s.b * s.nh) as u64 * pairs * s.hd as u64 * 4
}

fn attention(c: &mut Criterion) {
    flexrun::backend::cpu::tune_allocator();
    let mut g = c.benchmark_group("attention");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let (b, t, nh, nkv, hd) = (8, 256, 4, 4, 64);
    let s = AttnShape::causal(b, t, nh, nkv, hd);
    let mut rng = StdRng::seed_from_u64(1);
    let q = Tensor::randn(&[b * t, nh * hd], 1.0, &mut rng);
    let k = Tensor::randn(&[b * t, nkv * hd], 1.0, &mut rng);
    let v = Tensor::randn(&[b * t, nkv * hd], 1.0, &mut rng);
    let go = Tensor::randn(&[b * t, nh * hd], 1.0, &mut rng);
    let id = format!("B{b}_T{t}_h{nh}_kv{nkv}_hd{hd}");
    g.throughput(Throughput::Elements(attention_flops(&s)));
    g.bench_function(BenchmarkId::new("forward", &id), |bch| {
        bch.iter(|| ops::attention_forward(q.data(), k.data(), v.data(), s))
    });
    g.throughput(Throughput::Elements(attention_flops(&s) * 7 / 2));
    g.bench_function(BenchmarkId::new("forward_backward", &id), |bch| {
        bch.iter(|| {
            let mut tape = Tape::new();
            let (qv, kv, vv) = (
                tape.leaf(q.clone()),
                tape.leaf(k.clone()),
                tape.leaf(v.clone()),
            );
            let o = ops::attention(&mut tape, qv, kv, vv, s);
            tape.backward_with(o, go.clone())
        })
    });
    g.finish();
}

fn cross_entropy(c: &mut Criterion) {
    flexrun::backend::cpu::tune_allocator();
    let mut g = c.benchmark_group("cross_entropy");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    let (n, v) = (2048, 4096);
    let mut rng = StdRng::seed_from_u64(2);
    let logits = Tensor::randn(&[n, v], 2.0, &mut rng);
    let targets: Vec<u32> = (0..n as u32)
        .map(|i| (i * 2654435761u32) % v as u32)
        .collect();
    // Bytes: read logits twice (forward, backward), write the gradient once.
    g.throughput(Throughput::Bytes((3 * n * v * 4) as u64));
    g.bench_function(BenchmarkId::new("fwd_bwd", format!("{n}x{v}")), |bch| {
        bch.iter(|| {
            let mut tape = Tape::new();
            let l = tape.leaf(logits.clone());
            let out = ops::cross_entropy(&mut tape, l, &targets, 1e-5);
            tape.backward(out.loss)
        })
    });
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/moe_small.json");
    let cfg = Config::load(&path).expect("benches/configs/moe_small.json");
    let (batch, seq) = (8, 256);
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));
    g.throughput(Throughput::Elements((batch * seq) as u64));
    g.bench_function(
        BenchmarkId::new("moe_small", format!("b{batch}_t{seq}")),
        |bch| {
            // Time only the steps (forward, backward, clipping, AdamW), not the model's random init:
            // `flexrun::bench::train_step` reports each step's wall time.
            bch.iter_custom(|iters| {
                let spec = flexrun::bench::StepSpec::new(
                    flexrun::bench::TrainMode::Full,
                    batch,
                    seq,
                    iters as usize,
                    1,
                );
                let r = flexrun::bench::train_step(&cfg, &spec, &flexrun::backend::Device::cpu())
                    .expect("train step");
                Duration::from_secs_f64(r.step_ms_all.iter().sum::<f64>() / 1e3)
            })
        },
    );
    g.finish();
}

criterion_group!(benches, gemm, attention, cross_entropy, train_step);
criterion_main!(benches);
