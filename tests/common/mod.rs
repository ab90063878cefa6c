//! Shared harness of the GPU kernel tests: the device of the test binary, SKIP without a GPU
//! (failure instead when FLEXRUN_REQUIRE_GPU=1), and the macro that instantiates one test body
//! for the cpu and cuda backends.
#![allow(dead_code)]

use flexrun::backend::cuda::Device;
use std::sync::OnceLock;

pub type R = flexrun::Result<()>;

pub enum Backend {
    Cpu,
    Cuda(&'static Device),
}

impl Backend {
    pub fn is_cpu(&self) -> bool {
        matches!(self, Backend::Cpu)
    }
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda(_) => "cuda",
        }
    }
}

/// The shared device of this test binary (tests run on several threads; the device's stream
/// orders their work), or why there is none.
pub fn cuda_device() -> Result<&'static Device, String> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    DEV.get_or_init(|| Device::new(0).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| e.clone())
}

/// Run `body` on the device, or print SKIP (panic when FLEXRUN_REQUIRE_GPU=1) without one.
pub fn with_cuda(name: &str, body: impl FnOnce(&'static Device) -> R) {
    match cuda_device() {
        Ok(dev) => body(dev).unwrap_or_else(|e| panic!("cuda: {name}: {e}")),
        Err(why) => {
            if std::env::var("FLEXRUN_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("FLEXRUN_REQUIRE_GPU=1 but no CUDA device: {why}");
            }
            println!("SKIP: no CUDA device ({why}): {name}");
        }
    }
}

/// Whether `dev` runs the Hopper (sm_90a) kernels; otherwise prints why test `name` skips them.
pub fn hopper(dev: &Device, name: &str) -> flexrun::Result<bool> {
    let cc = dev.compute_capability()?;
    if cc != (9, 0) {
        println!(
            "SKIP: {name} needs compute capability 9.0, this GPU is {}.{}",
            cc.0, cc.1
        );
    }
    Ok(cc == (9, 0))
}

pub fn run_cuda(name: &str, body: fn(&Backend) -> R) {
    with_cuda(name, |dev| body(&Backend::Cuda(dev)));
}

/// `backend_tests!(a, b)`: for each test body `fn a(&Backend) -> R`, a `cpu` and a `cuda` test.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() {
                super::$name(&$crate::common::Backend::Cpu).unwrap_or_else(|e| panic!("cpu: {}: {e}", stringify!($name)));
            }
            #[test]
            fn cuda() {
                $crate::common::run_cuda(stringify!($name), super::$name);
            }
        }
    )*};
}

/// `cuda_tests!(a, b)`: for each GPU-only test body `fn a(&Device) -> R`, a `cuda` test (SKIP
/// without a GPU, failure with FLEXRUN_REQUIRE_GPU=1).
#[macro_export]
macro_rules! cuda_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn cuda() {
                $crate::common::with_cuda(stringify!($name), super::$name);
            }
        }
    )*};
}

/// A small prepared dataset of the built-in corpus's public domain under `root` (a 300-token
/// tokenizer trained on it): `root/data`.
pub fn small_dataset(root: &std::path::Path) -> std::path::PathBuf {
    let corpus = root.join("corpus");
    flexrun::data::synth::write_corpus(
        &corpus,
        &flexrun::data::synth::SynthConfig {
            seed: 3,
            docs_per_domain: 40,
            valid_docs_per_domain: 5,
        },
    )
    .unwrap();
    let tok = root.join("tok.json");
    flexrun::data::tokenizer::train_bpe(&[corpus.join("public")], 300, &tok).unwrap();
    let t = flexrun::data::Tokenizer::load(&tok).unwrap();
    let out = root.join("data");
    flexrun::data::shards::prepare(&[corpus.join("public")], &t, &out, 0.1, 0, 0.0).unwrap();
    out
}

/// A random model for comparing executions: weights large enough that every block moves the
/// logits (norm weights around 1, projections of std 0.15, router rows of std `router_std`),
/// rounded to bf16 when `bf16` (as a GPU stores them), and, for MoE, a router bias per expert
/// (some positive: the router applies min(b, 0)).
pub fn test_model(
    cfg: flexrun::model::Config,
    seed: u64,
    router_std: f32,
    bf16: bool,
) -> flexrun::model::Model {
    use flexrun::model::{router_bias_name, Model};
    use flexrun::tensor::Tensor;
    use rand::{rngs::StdRng, SeedableRng};
    let mut m = Model::new_random(&cfg, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed + 1);
    for p in m.params.params.iter_mut() {
        let shape = p.value.shape().to_vec();
        let v = if p.name.contains("norm") {
            let noise = Tensor::randn(&shape, 0.2, &mut rng);
            Tensor::from_vec(noise.data().iter().map(|x| 1.0 + x).collect(), &shape)
        } else if p.name.contains("gate.weight[") {
            Tensor::randn(&shape, router_std, &mut rng)
        } else {
            Tensor::randn(&shape, 0.15, &mut rng)
        };
        p.value = if bf16 { v.round_bf16() } else { v };
    }
    if !cfg.is_moe() {
        return m;
    }
    let mut params = m.params.clone();
    for l in 0..cfg.num_hidden_layers {
        for e in 0..cfg.experts() {
            let b = [0.5, -0.7, -0.1, 0.0][e % 4] + 0.1 * l as f32;
            params.add(router_bias_name(l, e), Tensor::from_vec(vec![b], &[1]));
        }
    }
    Model::from_params(cfg, params).unwrap()
}

/// Per trained parameter, `(name, relative error, scale)` of the gradients `got` against
/// `want` (both `(id, gradient)` sorted by id; the same ids asserted): the L2 error over the L2
/// norm of `want` (the scale), or for a router bias (one nearly cancelling column sum of the
/// router-logit gradient) over the largest bias gradient's norm.
pub fn grad_errors(
    m: &flexrun::model::Model,
    got: &[(usize, flexrun::tensor::Tensor)],
    want: &[(usize, flexrun::tensor::Tensor)],
) -> Vec<(String, f64, f64)> {
    assert_eq!(
        got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        want.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "the same parameters get gradients"
    );
    let is_bias = |id: usize| m.params.get(id).name.contains(".bias[");
    let bias_scale = want
        .iter()
        .filter(|(id, _)| is_bias(*id))
        .map(|(_, g)| g.sq_norm().sqrt())
        .fold(0f64, f64::max);
    got.iter()
        .zip(want)
        .map(|((id, g), (_, w))| {
            let name = m.params.get(*id).name.clone();
            // (The tape gives a bias [1] its gradient as [1, 1]: compare values.)
            assert_eq!(g.numel(), w.numel(), "{name}: size");
            let d: f64 = g
                .data()
                .iter()
                .zip(w.data())
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm = w.sq_norm().sqrt();
            let scale = if is_bias(*id) { bias_scale } else { norm };
            (name, d.sqrt() / scale.max(1e-30), scale)
        })
        .collect()
}
