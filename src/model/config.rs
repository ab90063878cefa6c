//! Model configuration, compatible with Hugging Face `config.json` for `FlexOlmoForCausalLM`
//! (model_type "flex_olmo") and `Olmo2ForCausalLM` (model_type "olmo2").

use crate::error::{Context, Result};
use crate::{bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Config {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers >= 5 puts the RoPE settings here (`{"rope_type": "default", "rope_theta": ..}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    /// Every other key is kept so that a loaded config.json is written back unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Config {
    /// Every token id in the vocabulary and `positions` within the model's positions.
    pub fn check_input(&self, ids: &[u32], positions: usize) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            crate::bail!(
                "token id {bad} is out of range for vocab_size {}",
                self.vocab_size
            );
        }
        ensure!(
            positions <= self.max_position_embeddings,
            "sequence of {positions} positions exceeds max_position_embeddings {}",
            self.max_position_embeddings
        );
        // The activations of a forward pass over these tokens: logits, their softmax and the
        // rows read from them, and what each layer keeps (projections, norms, attention, the FFN
        // of every expert a token uses).
        let per_token = 3 * self.vocab_size as u128
            + self.num_hidden_layers as u128
                * (16 * self.hidden_size as u128
                    + 6 * self.intermediate_size as u128 * self.top_k() as u128);
        crate::limits::check_memory(
            &format!("a forward pass over {} tokens", ids.len()),
            4 * ids.len() as u128 * per_token,
        )
    }

    /// Refuse a KV cache of `batch` sequences of `capacity` positions that this machine cannot hold.
    pub fn check_cache_memory(&self, batch: usize, capacity: usize) -> Result<()> {
        let bytes = 4
            * 2
            * self.num_hidden_layers as u128
            * batch as u128
            * capacity as u128
            * (self.kv_heads() * self.head_dim()) as u128;
        crate::limits::check_memory(
            &format!("a KV cache of {batch} x {capacity} positions"),
            bytes,
        )
    }

    /// A FlexOlmo MoE config with flexrun's defaults for the fields not given.
    #[allow(clippy::too_many_arguments)]
    pub fn flex_olmo(
        vocab: usize,
        hidden: usize,
        inter: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        experts: usize,
        top_k: usize,
    ) -> Self {
        Config {
            architectures: vec!["FlexOlmoForCausalLM".into()],
            model_type: "flex_olmo".into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: Some(500000.0),
            rope_parameters: None,
            max_position_embeddings: 4096,
            num_experts: Some(experts),
            num_experts_per_tok: Some(top_k),
            norm_topk_prob: false,
            tie_word_embeddings: false,
            eos_token_id: Some(0.into()),
            pad_token_id: Some(1.into()),
            bos_token_id: None,
            extra: Default::default(),
        }
    }

    /// A dense OLMo-2 config.
    pub fn olmo2(
        vocab: usize,
        hidden: usize,
        inter: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let mut c = Self::flex_olmo(vocab, hidden, inter, layers, heads, kv_heads, 1, 1);
        c.architectures = vec!["Olmo2ForCausalLM".into()];
        c.model_type = "olmo2".into();
        c.num_experts = None;
        c.num_experts_per_tok = None;
        c
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path, "config", crate::fsutil::MAX_JSON_BYTES)?;
        let cfg: Config = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid model config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    pub fn is_moe(&self) -> bool {
        self.model_type == "flex_olmo"
    }

    /// This dense config upcycled to a FlexOlmo MoE of `n_experts` experts, every one of them
    /// used by every token (`flex_olmo` / `FlexOlmoForCausalLM`, top-k = E, no renormalisation).
    pub fn upcycled(&self, n_experts: usize) -> Config {
        let mut cfg = self.clone();
        cfg.model_type = "flex_olmo".into();
        cfg.architectures = vec!["FlexOlmoForCausalLM".into()];
        cfg.num_experts = Some(n_experts);
        cfg.num_experts_per_tok = Some(n_experts);
        cfg.norm_topk_prob = false;
        cfg
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn experts(&self) -> usize {
        if self.is_moe() {
            self.num_experts.unwrap_or(1)
        } else {
            1
        }
    }

    pub fn top_k(&self) -> usize {
        if self.is_moe() {
            self.num_experts_per_tok.unwrap_or(1)
        } else {
            1
        }
    }

    pub fn rope_theta(&self) -> f64 {
        if let Some(t) = self.rope_theta {
            return t;
        }
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .unwrap_or(500000.0)
    }

    fn token_id(v: &Option<Value>) -> Option<u32> {
        match v {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
            _ => None,
        }
    }

    pub fn eos_id(&self) -> Option<u32> {
        Self::token_id(&self.eos_token_id)
    }

    pub fn pad_id(&self) -> Option<u32> {
        Self::token_id(&self.pad_token_id)
    }

    /// Every dimension within [`crate::limits`], before any arithmetic on them.
    fn check_sizes(&self) -> Result<()> {
        use crate::limits::*;
        check_dim(
            "vocab_size",
            self.vocab_size,
            MAX_VOCAB,
            "token ids are 32-bit",
        )?;
        let width = "the widest published models are about 25k";
        check_dim("hidden_size", self.hidden_size, MAX_HIDDEN, width)?;
        check_dim(
            "intermediate_size",
            self.intermediate_size,
            MAX_INTERMEDIATE,
            width,
        )?;
        check_dim(
            "num_hidden_layers",
            self.num_hidden_layers,
            MAX_LAYERS,
            "far beyond any model",
        )?;
        check_dim(
            "num_attention_heads",
            self.num_attention_heads,
            MAX_HEADS,
            "far beyond any model",
        )?;
        if let Some(kv) = self.num_key_value_heads {
            check_dim("num_key_value_heads", kv, MAX_HEADS, "far beyond any model")?;
        }
        if let Some(hd) = self.head_dim {
            check_dim("head_dim", hd, MAX_HEAD_DIM, "far beyond any model")?;
        }
        check_dim(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
            "flexrun precomputes the RoPE table of every position",
        )?;
        if let Some(e) = self.num_experts {
            check_dim(
                "num_experts",
                e,
                MAX_EXPERTS,
                "far beyond any mixture of experts",
            )?;
        }
        if self.num_attention_heads > 0 {
            let hd = self.head_dim();
            check_dim("head_dim", hd, MAX_HEAD_DIM, "far beyond any model")?;
            ensure!(
                hd >= 2,
                "head_dim must be at least 2 (RoPE rotates pairs), got {hd}"
            );
            // The RoPE table holds cos and sin of every (position, frequency) pair.
            check_dim(
                "max_position_embeddings x head_dim",
                self.max_position_embeddings * hd,
                MAX_ROPE_ENTRIES,
                "the RoPE table of every position is precomputed",
            )?;
        }
        Ok(())
    }

    /// Parameters of a model of this config (u128: no overflow at the limits).
    pub fn param_count(&self) -> u128 {
        let (h, i, v) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.vocab_size as u128,
        );
        let hd = self.head_dim() as u128;
        let (qw, kvw) = (
            self.num_attention_heads as u128 * hd,
            self.kv_heads() as u128 * hd,
        );
        let e = self.experts() as u128;
        let router = if self.is_moe() { e * (h + 1) } else { 0 };
        let layer = 2 * qw * h + 2 * kvw * h + qw + kvw + 2 * h + e * 3 * h * i + router;
        2 * v * h + h + self.num_hidden_layers as u128 * layer
    }

    /// A lower bound on the host memory that training this model on the CPU on `batch x seq`
    /// tokens takes (the host model and its copy on the CPU backend, f32 master weights,
    /// gradients and AdamW moments of the trained parameters, the activations the backward
    /// keeps), refused when over this machine's memory. `trained` is the number of trained
    /// parameters (None: all).
    pub fn check_training_memory(
        &self,
        batch: usize,
        seq: usize,
        trained: Option<u128>,
    ) -> Result<()> {
        crate::limits::check_dim(
            "--batch",
            batch,
            crate::limits::MAX_BATCH,
            "far beyond any step",
        )?;
        let params = self.param_count();
        let trained = trained.unwrap_or(params);
        let tokens = batch as u128 * seq as u128;
        let (h, i, v) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.vocab_size as u128,
        );
        let per_token =
            self.num_hidden_layers as u128 * (8 * h + 3 * i * self.top_k() as u128) + 2 * v;
        let bytes = 8 * params + 16 * trained + 4 * tokens * per_token;
        crate::limits::check_memory(
            &format!("training {} parameters on {batch} x {seq} tokens", params),
            bytes,
        )
    }

    /// Reject configs that cannot describe a working model, with the reason.
    pub fn validate(&self) -> Result<()> {
        match self.model_type.as_str() {
            "flex_olmo" | "olmo2" => {}
            other => bail!(
                "unsupported model_type '{other}' (architectures {:?}): flexrun runs flex_olmo (FlexOlmoForCausalLM) and olmo2 (Olmo2ForCausalLM)",
                self.architectures
            ),
        }
        self.check_sizes()?;
        ensure!(self.vocab_size > 0, "vocab_size must be positive");
        for (key, v) in [
            ("eos_token_id", &self.eos_token_id),
            ("pad_token_id", &self.pad_token_id),
            ("bos_token_id", &self.bos_token_id),
        ] {
            let ids: Vec<&Value> = match v {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a.iter().collect(),
                Some(x) => vec![x],
            };
            for id in ids {
                ensure!(
                    id.as_u64().is_some_and(|i| i < self.vocab_size as u64),
                    "{key} {id} is not a token id below vocab_size {}",
                    self.vocab_size
                );
            }
        }
        ensure!(self.hidden_size > 0, "hidden_size must be positive");
        ensure!(
            self.intermediate_size > 0,
            "intermediate_size must be positive"
        );
        ensure!(
            self.num_hidden_layers > 0,
            "num_hidden_layers must be positive"
        );
        let h = self.num_attention_heads;
        ensure!(h > 0, "num_attention_heads must be positive");
        if self.head_dim.is_none() {
            ensure!(
                self.hidden_size.is_multiple_of(h),
                "num_attention_heads ({h}) does not divide hidden_size ({})",
                self.hidden_size
            );
        }
        let kv = self.kv_heads();
        ensure!(
            kv > 0 && h.is_multiple_of(kv),
            "num_key_value_heads ({kv}) does not divide num_attention_heads ({h})"
        );
        ensure!(
            self.head_dim().is_multiple_of(2),
            "head dim {} must be even for RoPE",
            self.head_dim()
        );
        ensure!(
            (1e-12..=1.0).contains(&self.rms_norm_eps),
            "rms_norm_eps must be in [1e-12, 1] (a small constant added to the mean square), got {}",
            self.rms_norm_eps
        );
        ensure!(
            (1.0..1e30).contains(&self.rope_theta()),
            "rope_theta must be in [1, 1e30) (the RoPE base; models use 1e4 to 1e7), got {}",
            self.rope_theta()
        );
        ensure!(
            self.max_position_embeddings > 0,
            "max_position_embeddings must be positive"
        );
        if self.is_moe() {
            let e = self
                .num_experts
                .context("flex_olmo config lacks num_experts")?;
            let k = self
                .num_experts_per_tok
                .context("flex_olmo config lacks num_experts_per_tok")?;
            ensure!(e > 0, "num_experts must be positive");
            ensure!(
                k >= 1 && k <= e,
                "num_experts_per_tok ({k}) must be between 1 and num_experts ({e})"
            );
        }
        ensure!(
            !self.tie_word_embeddings,
            "tied word embeddings are not supported (OLMo-2 and FlexOlmo untie them)"
        );
        Ok(())
    }
}
