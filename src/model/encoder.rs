//! A BERT-family sentence encoder on flexrun's own tensors and CPU kernels, for the router
//! embeddings of FlexOlmo (each domain's router row from the mean embedding of its documents).
//!
//! Reads a sentence-transformers directory (`config.json` of a `bert` model, `model.safetensors`,
//! `tokenizer.json`, `modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`), e.g.
//! all-MiniLM-L6-v2 or bge-small: word + absolute position + token-type embeddings, LayerNorm,
//! post-norm layers of bidirectional multi-head attention and an exact-GELU FFN (every linear
//! with a bias), mean pooling over the tokens (or the [CLS] row), and the L2 normalisation when
//! the pipeline has a `Normalize` module. Texts are truncated to `max_seq_length` tokens,
//! [CLS] and [SEP] included, as sentence-transformers does.

use super::checkpoint;
use crate::backend::cpu::{rows_abt, simd};
use crate::ensure;
use crate::error::{Context, Result};
use crate::fsutil::{confined, read_text, MAX_JSON_BYTES};
use crate::tensor::Tensor;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Deserialize)]
struct BertConfig {
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-12
}

fn default_act() -> String {
    "gelu".into()
}

/// A loaded encoder.
pub struct Encoder {
    cfg: BertConfig,
    w: HashMap<String, Tensor>,
    tokenizer: tokenizers::Tokenizer,
    max_len: usize,
    mean_pool: bool,
    normalize: bool,
    hash: String,
}

impl Encoder {
    /// Load a sentence-transformers directory (see the module docs). Every weight is checked
    /// against the config's shapes before anything runs.
    pub fn load(dir: &Path) -> Result<Encoder> {
        ensure!(
            dir.is_dir(),
            "encoder directory {} does not exist",
            dir.display()
        );
        let json = |name: &str| -> Result<Option<serde_json::Value>> {
            let mut p = dir.to_path_buf();
            for part in name.split('/') {
                p = confined(&p, part, "encoder file")?;
            }
            if !p.exists() {
                return Ok(None);
            }
            let t = read_text(&p, "encoder file", MAX_JSON_BYTES)?;
            Ok(Some(
                serde_json::from_str(&t).with_context(|| format!("{} is corrupt", p.display()))?,
            ))
        };
        let cfg_v = json("config.json")?
            .with_context(|| format!("{} has no config.json", dir.display()))?;
        let cfg: BertConfig = serde_json::from_value(cfg_v.clone())
            .with_context(|| format!("{}/config.json is not a BERT config", dir.display()))?;
        ensure!(
            cfg.model_type == "bert",
            "{}: model_type {} is not a BERT-family encoder",
            dir.display(),
            cfg.model_type
        );
        ensure!(
            cfg.hidden_act == "gelu"
                && cfg.position_embedding_type.as_deref().unwrap_or("absolute") == "absolute",
            "{}: flexrun's encoder runs exact GELU and absolute positions, not {} / {:?}",
            dir.display(),
            cfg.hidden_act,
            cfg.position_embedding_type
        );
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        ensure!(
            nh > 0 && h % nh == 0 && h <= crate::limits::MAX_HIDDEN,
            "{}: hidden size {h} and {nh} heads do not fit",
            dir.display()
        );
        crate::limits::check_dim(
            "encoder layers",
            cfg.num_hidden_layers,
            crate::limits::MAX_LAYERS,
            "far beyond any encoder",
        )?;
        crate::limits::check_dim(
            "encoder positions",
            cfg.max_position_embeddings,
            crate::limits::MAX_POSITIONS,
            "far beyond any encoder",
        )?;
        let modules = json("modules.json")?;
        let normalize = modules.as_ref().is_some_and(|m| {
            m.as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    x["type"]
                        .as_str()
                        .is_some_and(|t| t.ends_with(".Normalize"))
                })
            })
        });
        let pooling = json("1_Pooling/config.json")?;
        let mean_pool = pooling
            .as_ref()
            .is_none_or(|p| p["pooling_mode_mean_tokens"].as_bool().unwrap_or(true));
        if let Some(p) = &pooling {
            ensure!(
                mean_pool || p["pooling_mode_cls_token"].as_bool() == Some(true),
                "{}: only mean or [CLS] pooling is supported",
                dir.display()
            );
        }
        let max_len = json("sentence_bert_config.json")?
            .and_then(|c| c["max_seq_length"].as_u64())
            .map_or(cfg.max_position_embeddings, |m| m as usize)
            .min(cfg.max_position_embeddings);
        let tok_path = confined(dir, "tokenizer.json", "tokenizer")?;
        let tok_bytes = crate::fsutil::read_regular(&tok_path, "tokenizer", 64 << 20)?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&tok_bytes).map_err(|e| {
            crate::Error(format!(
                "{} is not a valid tokenizer: {e}",
                tok_path.display()
            ))
        })?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| crate::Error(format!("{}: {e}", tok_path.display())))?;
        tokenizer.with_padding(None);
        let weights = confined(dir, "model.safetensors", "weights")?;
        let tensors = checkpoint::read_tensors_where(std::slice::from_ref(&weights), false, |n| {
            !n.ends_with("position_ids") && !n.starts_with("pooler.")
        })?;
        let w: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(n, t)| (n.strip_prefix("bert.").unwrap_or(&n).to_string(), t))
            .collect();
        let mut hash = crate::hash::Fnv::default();
        hash.update(&tok_bytes);
        hash.update(serde_json::to_string(&cfg_v)?.as_bytes());
        let mut names: Vec<&String> = w.keys().collect();
        names.sort();
        for n in names {
            hash.update(n.as_bytes());
            hash.update(bytemuck::cast_slice(w[n].data()));
        }
        let enc = Encoder {
            cfg,
            w,
            tokenizer,
            max_len,
            mean_pool,
            normalize,
            hash: hash.hex(),
        };
        enc.check_shapes()
            .with_context(|| format!("{}", weights.display()))?;
        Ok(enc)
    }

    fn check_shapes(&self) -> Result<()> {
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let vocab = self.tokenizer.get_vocab_size(true);
        let mut want: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.position_embeddings.weight".into(),
                vec![self.cfg.max_position_embeddings, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..self.cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            for m in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
            ] {
                want.push((format!("{p}{m}.weight"), vec![h, h]));
                want.push((format!("{p}{m}.bias"), vec![h]));
            }
            want.push((format!("{p}intermediate.dense.weight"), vec![i, h]));
            want.push((format!("{p}intermediate.dense.bias"), vec![i]));
            want.push((format!("{p}output.dense.weight"), vec![h, i]));
            want.push((format!("{p}output.dense.bias"), vec![h]));
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                want.push((format!("{p}{n}.weight"), vec![h]));
                want.push((format!("{p}{n}.bias"), vec![h]));
            }
        }
        for (n, shape) in &want {
            let t = self
                .w
                .get(n)
                .with_context(|| format!("the encoder lacks {n}"))?;
            ensure!(
                t.shape() == &shape[..],
                "encoder tensor {n} is {:?}, expected {shape:?}",
                t.shape()
            );
        }
        let we = self
            .w
            .get("embeddings.word_embeddings.weight")
            .context("the encoder lacks embeddings.word_embeddings.weight")?;
        ensure!(
            we.shape().len() == 2 && we.cols() == h && we.rows() >= vocab,
            "the encoder's word embeddings {:?} do not cover its tokenizer's {vocab} tokens",
            we.shape()
        );
        let te = self
            .w
            .get("embeddings.token_type_embeddings.weight")
            .context("the encoder lacks embeddings.token_type_embeddings.weight")?;
        ensure!(
            te.shape().len() == 2 && te.cols() == h && te.rows() >= 1,
            "bad token-type embeddings {:?}",
            te.shape()
        );
        Ok(())
    }

    /// The embedding width.
    pub fn width(&self) -> usize {
        self.cfg.hidden_size
    }

    /// A content hash of the encoder (weights, config, tokenizer): what the router rows of
    /// experts that are merged together must share.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The longest input in tokens, [CLS] and [SEP] included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The sentence embedding of `text`.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| crate::Error(format!("encoder tokenizer: {e}")))?;
        let ids: Vec<u32> = enc.get_ids().to_vec();
        ensure!(!ids.is_empty(), "the encoder's tokenizer gave no token");
        self.embed_ids(&ids)
    }

    fn t(&self, n: &str) -> &Tensor {
        &self.w[n]
    }

    /// The sentence embedding of token ids (with [CLS] and [SEP] already in place).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (h, nh) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let hd = h / nh;
        let n = ids.len();
        ensure!(
            n <= self.cfg.max_position_embeddings,
            "{n} tokens exceed the encoder's {} positions",
            self.cfg.max_position_embeddings
        );
        let we = self.t("embeddings.word_embeddings.weight");
        ensure!(
            ids.iter().all(|&i| (i as usize) < we.rows()),
            "a token id is outside the encoder's vocabulary"
        );
        let eps = self.cfg.layer_norm_eps as f32;
        let (pe, te) = (
            self.t("embeddings.position_embeddings.weight"),
            self.t("embeddings.token_type_embeddings.weight"),
        );
        let mut x = vec![0f32; n * h];
        for (r, &id) in ids.iter().enumerate() {
            let row = &mut x[r * h..(r + 1) * h];
            for (j, v) in row.iter_mut().enumerate() {
                *v = we.row(id as usize)[j] + pe.row(r)[j] + te.row(0)[j];
            }
        }
        layer_norm(
            &mut x,
            self.t("embeddings.LayerNorm.weight").data(),
            self.t("embeddings.LayerNorm.bias").data(),
            eps,
        );
        for l in 0..self.cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let lin = |x: &[f32], m: &str| -> Vec<f32> {
                let mut y = rows_abt(x, n, self.t(&format!("{p}{m}.weight")));
                let b = self.t(&format!("{p}{m}.bias")).data();
                for row in y.chunks_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(a, c)| *a += c);
                }
                y
            };
            let (q, k, v) = (
                lin(&x, "attention.self.query"),
                lin(&x, "attention.self.key"),
                lin(&x, "attention.self.value"),
            );
            let scale = 1.0 / (hd as f32).sqrt();
            let mut ctx = vec![0f32; n * h];
            let mut s = vec![0f32; n];
            for head in 0..nh {
                let c = head * hd..(head + 1) * hd;
                for i in 0..n {
                    let qi = &q[i * h..(i + 1) * h][c.clone()];
                    for (j, sj) in s.iter_mut().enumerate() {
                        *sj = simd::dot(qi, &k[j * h..(j + 1) * h][c.clone()]) * scale;
                    }
                    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut z = 0f32;
                    for sj in s.iter_mut() {
                        *sj = (*sj - m).exp();
                        z += *sj;
                    }
                    let out = &mut ctx[i * h..(i + 1) * h][c.clone()];
                    for (j, &sj) in s.iter().enumerate() {
                        let w = sj / z;
                        out.iter_mut()
                            .zip(&v[j * h..(j + 1) * h][c.clone()])
                            .for_each(|(a, b)| *a += w * b);
                    }
                }
            }
            let mut a = lin(&ctx, "attention.output.dense");
            a.iter_mut().zip(&x).for_each(|(a, b)| *a += b);
            layer_norm(
                &mut a,
                self.t(&format!("{p}attention.output.LayerNorm.weight"))
                    .data(),
                self.t(&format!("{p}attention.output.LayerNorm.bias"))
                    .data(),
                eps,
            );
            let mut inter = lin(&a, "intermediate.dense");
            inter.iter_mut().for_each(|x| *x = gelu(*x));
            let mut o = lin(&inter, "output.dense");
            o.iter_mut().zip(&a).for_each(|(o, a)| *o += a);
            layer_norm(
                &mut o,
                self.t(&format!("{p}output.LayerNorm.weight")).data(),
                self.t(&format!("{p}output.LayerNorm.bias")).data(),
                eps,
            );
            x = o;
        }
        let mut e = vec![0f32; h];
        if self.mean_pool {
            let mut acc = vec![0f64; h];
            for row in x.chunks(h) {
                acc.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
            }
            e.iter_mut()
                .zip(&acc)
                .for_each(|(e, a)| *e = (a / n as f64) as f32);
        } else {
            e.copy_from_slice(&x[..h]);
        }
        if self.normalize {
            let norm = e
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            e.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
        }
        ensure!(
            e.iter().all(|v| v.is_finite()),
            "the encoder's output is not finite"
        );
        Ok(e)
    }
}

/// LayerNorm of each row in place: `(x - mean) / sqrt(var + eps) * w + b` (biased variance).
fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_mut(d) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let r = 1.0 / (var + eps as f64).sqrt();
        for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
            *v = ((*v as f64 - mean) * r) as f32 * w + b;
        }
    }
}

/// Exact GELU, `x / 2 * (1 + erf(x / sqrt 2))`.
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// erf to about 1e-15 relative: a Taylor series near zero, the continued fraction of erfc
/// beyond.
fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(a) = 2/sqrt(pi) * sum_k (-1)^k a^(2k+1) / (k! (2k+1))
        let mut term = a;
        let mut sum = a;
        let a2 = a * a;
        for k in 1..80 {
            term *= -a2 / k as f64;
            let t = term / (2 * k + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) / (a + 1/2 / (a + 1 / (a + 3/2 / (a + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-13,
                "erf({x}) = {} vs {want}",
                erf(x)
            );
        }
    }
}
