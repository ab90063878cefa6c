//! Checkpoint IO in the Hugging Face layout: `config.json` + `model.safetensors` (or shards with
//! `model.safetensors.index.json`). Weights are memory-mapped while loading; f32, bf16 and f16 are
//! read. Router rows are stored stacked as `mlp.gate.weight [E, H]` as in transformers; flexrun's
//! per-expert router biases, when present, as `mlp.gate.expert_bias [E]` (transformers ignores
//! that tensor). Both expert layouts are read: per-expert (`mlp.experts.E.gate_proj.weight`) and
//! fused (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`).

use super::{expert_prefix, parse_expert_param, router_bias_name, router_row_name, Config, ExpertPart, Model, ParamStore};
use crate::error::{Context, Result};
use crate::fsutil::write_bytes_atomic;
use crate::tensor::{DType, Tensor};
use crate::{bail, ensure};
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Convert one safetensors view to a tensor (f32 compute storage, or bf16 kept as bf16 when
/// `keep_bf16`).
fn to_tensor(name: &str, view: &TensorView<'_>, keep_bf16: bool) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let n: usize = shape.iter().product();
    let data = view.data();
    let t = match view.dtype() {
        StDtype::F32 => {
            ensure!(data.len() == n * 4, "tensor {name}: {} bytes for shape {shape:?}", data.len());
            Tensor::from_vec(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(), &shape)
        }
        StDtype::BF16 => {
            ensure!(data.len() == n * 2, "tensor {name}: {} bytes for shape {shape:?}", data.len());
            let v: Vec<bf16> = data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
            let t = Tensor::from_bf16(v, &shape);
            if keep_bf16 {
                t
            } else {
                t.to_dtype(DType::F32)
            }
        }
        StDtype::F16 => {
            ensure!(data.len() == n * 2, "tensor {name}: {} bytes for shape {shape:?}", data.len());
            Tensor::from_vec(data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(), &shape)
        }
        other => bail!("tensor {name} has unsupported dtype {other:?} (expected F32, BF16 or F16)"),
    };
    Ok(t)
}

/// The safetensors files of a model directory: the single file, or the shards of the index.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    ensure!(dir.is_dir(), "model directory {} does not exist", dir.display());
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    ensure!(index.exists(), "{} holds neither model.safetensors nor model.safetensors.index.json", dir.display());
    let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", index.display()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        ensure!(p.exists(), "shard {} named in {} is missing", p.display(), index.display());
    }
    Ok(paths)
}

/// Read every tensor of a set of safetensors files (memory-mapped).
pub fn read_tensors(files: &[PathBuf], keep_bf16: bool) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for f in files {
        let file = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        // SAFETY: the map is read-only and dropped before this function returns; a concurrent
        // writer truncating the file is outside what any reader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", f.display()))?;
        let st = SafeTensors::deserialize(&mmap).with_context(|| format!("{} is not a valid safetensors file", f.display()))?;
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        for name in names {
            let view = st.tensor(&name).with_context(|| format!("{}: tensor {name}", f.display()))?;
            out.push((name.clone(), to_tensor(&name, &view, keep_bf16).with_context(|| format!("{}", f.display()))?));
        }
    }
    Ok(out)
}

/// Map checkpoint tensors (HF names) to flexrun's parameter store for `cfg`.
pub fn params_from_hf(cfg: &Config, tensors: Vec<(String, Tensor)>) -> Result<ParamStore> {
    let (h, i_sz) = (cfg.hidden_size, cfg.intermediate_size);
    let e = cfg.experts();
    let mut ps = ParamStore::default();
    let mut seen = HashMap::new();
    for (name, t) in tensors {
        if seen.insert(name.clone(), ()).is_some() {
            bail!("tensor {name} appears twice in the checkpoint");
        }
        let Some(rest) = name.strip_prefix("model.layers.") else {
            match name.as_str() {
                "model.embed_tokens.weight" | "lm_head.weight" => {
                    ps.add(name, t);
                }
                "model.norm.weight" => {
                    ps.add(name, t.to_dtype(DType::F32));
                }
                _ => bail!("unexpected tensor {name} for a {} model", cfg.model_type),
            }
            continue;
        };
        let (l, part) = rest.split_once('.').context(format!("bad tensor name {name}"))?;
        let l: usize = l.parse().ok().context(format!("bad layer index in tensor {name}"))?;
        ensure!(l < cfg.num_hidden_layers, "tensor {name}: layer {l} but the config has {} layers", cfg.num_hidden_layers);
        match part {
            "mlp.gate.weight" if cfg.is_moe() => {
                ensure!(t.shape() == [e, h], "tensor {name} has shape {:?}, config implies [{e}, {h}]", t.shape());
                let t = t.to_dtype(DType::F32);
                for ex in 0..e {
                    ps.add(router_row_name(l, ex), t.slice_rows(ex, 1));
                }
            }
            "mlp.gate.expert_bias" if cfg.is_moe() => {
                ensure!(t.numel() == e, "tensor {name} has {} entries for {e} experts", t.numel());
                let t = t.to_dtype(DType::F32);
                for ex in 0..e {
                    ps.add(router_bias_name(l, ex), Tensor::from_vec(vec![t.data()[ex]], &[1]));
                }
            }
            "mlp.experts.gate_up_proj" if cfg.is_moe() => {
                ensure!(t.shape() == [e, 2 * i_sz, h], "tensor {name} has shape {:?}, config implies [{e}, {}, {h}]", t.shape(), 2 * i_sz);
                let t = t.to_dtype(DType::F32);
                let per = 2 * i_sz * h;
                for ex in 0..e {
                    let blk = &t.data()[ex * per..(ex + 1) * per];
                    let p = expert_prefix(l, ex, true);
                    ps.add(format!("{p}gate_proj.weight"), Tensor::from_vec(blk[..i_sz * h].to_vec(), &[i_sz, h]));
                    ps.add(format!("{p}up_proj.weight"), Tensor::from_vec(blk[i_sz * h..].to_vec(), &[i_sz, h]));
                }
            }
            "mlp.experts.down_proj" if cfg.is_moe() => {
                ensure!(t.shape() == [e, h, i_sz], "tensor {name} has shape {:?}, config implies [{e}, {h}, {i_sz}]", t.shape());
                let t = t.to_dtype(DType::F32);
                for ex in 0..e {
                    let blk = t.data()[ex * h * i_sz..(ex + 1) * h * i_sz].to_vec();
                    ps.add(format!("{}down_proj.weight", expert_prefix(l, ex, true)), Tensor::from_vec(blk, &[h, i_sz]));
                }
            }
            _ if part.ends_with("norm.weight") || part.ends_with("layernorm.weight") => {
                ps.add(name, t.to_dtype(DType::F32));
            }
            _ => {
                if let Some((_, ex, _)) = parse_expert_param(&name) {
                    ensure!(ex < e, "tensor {name} names expert {ex} but the config has {e} experts");
                }
                ps.add(name, t);
            }
        }
    }
    Ok(ps)
}

/// Load a model directory (config.json + weights). `keep_bf16` keeps bf16 matrices in bf16.
pub fn load(dir: &Path) -> Result<Model> {
    load_with(dir, false)
}

pub fn load_with(dir: &Path, keep_bf16: bool) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    ensure!(cfg_path.exists(), "{} has no config.json", dir.display());
    let cfg = Config::load(&cfg_path)?;
    let files = weight_files(dir)?;
    let tensors = read_tensors(&files, keep_bf16)?;
    let ps = params_from_hf(&cfg, tensors).with_context(|| format!("{}", dir.display()))?;
    Model::from_params(cfg, ps).with_context(|| format!("{}", dir.display()))
}

/// Tensors of `model` under Hugging Face names (router rows stacked, biases stacked when any).
pub fn hf_tensors(model: &Model) -> Vec<(String, Tensor)> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut routers: BTreeMap<usize, BTreeMap<usize, Tensor>> = BTreeMap::new();
    let mut biases: BTreeMap<usize, BTreeMap<usize, f32>> = BTreeMap::new();
    for p in &model.params.params {
        match parse_expert_param(&p.name) {
            Some((l, e, ExpertPart::Router)) => {
                routers.entry(l).or_default().insert(e, p.value.clone());
            }
            Some((l, e, ExpertPart::Bias)) => {
                biases.entry(l).or_default().insert(e, p.value.to_dtype(DType::F32).data()[0]);
            }
            _ => {
                out.insert(p.name.clone(), p.value.clone());
            }
        }
    }
    let e = model.cfg.experts();
    for (l, rows) in routers {
        let parts: Vec<&Tensor> = rows.values().collect();
        out.insert(format!("model.layers.{l}.mlp.gate.weight"), Tensor::cat_rows(&parts));
    }
    for (l, b) in biases {
        let v: Vec<f32> = (0..e).map(|x| b.get(&x).copied().unwrap_or(0.0)).collect();
        out.insert(format!("model.layers.{l}.mlp.gate.expert_bias"), Tensor::from_vec(v, &[e]));
    }
    out.into_iter().collect()
}

/// Serialise named tensors to safetensors bytes in `dtype`.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], dtype: DType, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let bytes = match dtype {
                DType::F32 => bytemuck::cast_slice::<f32, u8>(t.to_dtype(DType::F32).data()).to_vec(),
                DType::BF16 => {
                    let b = t.to_dtype(DType::BF16);
                    bytemuck::cast_slice::<bf16, u8>(b.bf16_data().unwrap()).to_vec()
                }
            };
            (n.clone(), t.shape().to_vec(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
    };
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(st_dtype, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::tensor::serialize(views, metadata)?)
}

/// Write `model` as `dir/config.json` + `dir/model.safetensors` (atomically, each file).
pub fn save(model: &Model, dir: &Path, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cfg = model.cfg.clone();
    cfg.extra.insert(
        "torch_dtype".into(),
        match dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
        }
        .into(),
    );
    let bytes = safetensors_bytes(&hf_tensors(model), dtype, Some(HashMap::from([("format".into(), "pt".into())])))?;
    write_bytes_atomic(&dir.join("model.safetensors"), &bytes)?;
    write_bytes_atomic(&dir.join("config.json"), cfg.to_json().as_bytes())?;
    Ok(())
}
