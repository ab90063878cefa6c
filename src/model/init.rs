//! Random initialisation: [`Model::new_random`] (training from scratch; one sequential stream,
//! so a seed gives the same model on every machine) and [`Model::new_random_fast`] (benchmarks of
//! large shapes: parallel, optionally straight to bf16).

use super::{expert_prefix, layer_prefix, router_row_name, Config, Model, ParamStore, INIT_STD};
use crate::error::Result;
use crate::tensor::Tensor;
use rand::{rngs::StdRng, SeedableRng};

impl Model {
    /// A freshly initialised model (normal(0, INIT_STD) weights, unit norms), deterministic in `seed`.
    pub fn new_random(cfg: &Config, seed: u64) -> Result<Self> {
        cfg.validate()?;
        crate::limits::check_memory(
            &format!("a model of {} parameters", cfg.param_count()),
            4 * cfg.param_count(),
        )?;
        let mut rng = StdRng::seed_from_u64(seed);
        Self::random_with(cfg, |_, r, c| Tensor::randn(&[r, c], INIT_STD, &mut rng))
    }

    /// A random model for benchmarks of large shapes: the same distribution as [`Model::new_random`]
    /// (not the same values), drawn in parallel from per-tensor, per-block seeds (deterministic
    /// whatever the thread count), with matrices stored in bf16 when `bf16` (half the host memory;
    /// inference only).
    pub fn new_random_fast(cfg: &Config, seed: u64, bf16: bool) -> Result<Self> {
        use rayon::prelude::*;
        cfg.validate()?;
        let bytes = if bf16 { 2 } else { 4 };
        crate::limits::check_memory(
            &format!("a model of {} parameters", cfg.param_count()),
            bytes * cfg.param_count(),
        )?;
        const BLOCK: usize = 1 << 16;
        Self::random_with(cfg, |name, r, c| {
            let n = r * c;
            let tag = crate::hash::fnv1a(name.as_bytes());
            let blocks: Vec<Vec<f32>> = (0..n.div_ceil(BLOCK))
                .into_par_iter()
                .map(|b| {
                    let mut rng = StdRng::seed_from_u64(crate::hash::mix(&[seed, tag, b as u64]));
                    let len = BLOCK.min(n - b * BLOCK);
                    Tensor::randn(&[len], INIT_STD, &mut rng).into_vec()
                })
                .collect();
            let t = Tensor::from_vec(blocks.concat(), &[r, c]);
            if bf16 {
                t.to_dtype(crate::tensor::DType::BF16)
            } else {
                t
            }
        })
    }

    /// Every parameter of `cfg`, matrices from `mat(name, rows, cols)`, norms at one.
    fn random_with(
        cfg: &Config,
        mut mat: impl FnMut(&str, usize, usize) -> Tensor,
    ) -> Result<Self> {
        let (h, i_sz, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qw, kvw) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.kv_heads() * cfg.head_dim(),
        );
        let mut ps = ParamStore::default();
        let mut add = |ps: &mut ParamStore, name: String, r: usize, c: usize| {
            let t = mat(&name, r, c);
            ps.add(name, t)
        };
        add(&mut ps, "model.embed_tokens.weight".into(), v, h);
        for l in 0..cfg.num_hidden_layers {
            let p = layer_prefix(l);
            add(&mut ps, format!("{p}self_attn.q_proj.weight"), qw, h);
            add(&mut ps, format!("{p}self_attn.k_proj.weight"), kvw, h);
            add(&mut ps, format!("{p}self_attn.v_proj.weight"), kvw, h);
            add(&mut ps, format!("{p}self_attn.o_proj.weight"), h, qw);
            ps.add(
                format!("{p}self_attn.q_norm.weight"),
                Tensor::full(&[qw], 1.0),
            );
            ps.add(
                format!("{p}self_attn.k_norm.weight"),
                Tensor::full(&[kvw], 1.0),
            );
            ps.add(
                format!("{p}post_attention_layernorm.weight"),
                Tensor::full(&[h], 1.0),
            );
            ps.add(
                format!("{p}post_feedforward_layernorm.weight"),
                Tensor::full(&[h], 1.0),
            );
            for e in 0..cfg.experts() {
                let ep = expert_prefix(l, e, cfg.is_moe());
                add(&mut ps, format!("{ep}gate_proj.weight"), i_sz, h);
                add(&mut ps, format!("{ep}up_proj.weight"), i_sz, h);
                add(&mut ps, format!("{ep}down_proj.weight"), h, i_sz);
                if cfg.is_moe() {
                    add(&mut ps, router_row_name(l, e), 1, h);
                }
            }
        }
        ps.add("model.norm.weight", Tensor::full(&[h], 1.0));
        add(&mut ps, "lm_head.weight".into(), v, h);
        Self::from_params(cfg.clone(), ps)
    }
}
