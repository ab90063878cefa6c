//! Checkpoint IO in the Hugging Face layout: `config.json` + `model.safetensors` (or shards with
//! `model.safetensors.index.json`), loadable by transformers and written the way it writes them.
//! Weights are memory-mapped while loading and each tensor is copied out once; f32, bf16 and f16
//! are read, and [`load_with`] can keep bf16 matrices in bf16 (the file's size in RAM). Router
//! rows are stored stacked as `mlp.gate.weight [E, H]` as in transformers; flexrun's per-expert
//! router biases, when present, as the extra tensor `mlp.gate.expert_bias [E]` (transformers
//! ignores it, so such a model is not the same model there). Both expert layouts are read:
//! per-expert (`mlp.experts.E.gate_proj.weight`) and fused (`mlp.experts.gate_up_proj [E, 2I, H]`,
//! `mlp.experts.down_proj [E, H, I]`); the per-expert one is written. A directory that does not
//! hold the model its config.json describes is an error naming the file or tensor at fault.

use super::{
    expert_prefix, parse_expert_param, router_bias_name, router_row_name, Config, ExpertPart, Ffn,
    Model, ParamStore,
};
use crate::error::{Context, Result};
use crate::fsutil::{confined, open_regular, read_text, write_bytes_atomic, MAX_JSON_BYTES};
use crate::tensor::{DType, Tensor};
use crate::{bail, ensure};
use half::{bf16, f16};
#[cfg(unix)]
use memmap2::UncheckedAdvice;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Convert one safetensors view to a tensor: f32 storage, or bf16 storage for a bf16 view when
/// `keep_bf16` (bf16 is converted straight from the mapped bytes otherwise, with no bf16 copy).
fn to_tensor(name: &str, view: &TensorView<'_>, keep_bf16: bool) -> Result<Tensor> {
    let shape = view.shape();
    let data = view.data();
    let t = match view.dtype() {
        StDtype::F32 => Tensor::from_vec(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            shape,
        ),
        StDtype::BF16 if keep_bf16 => Tensor::from_bf16(
            data.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                .collect(),
            shape,
        ),
        StDtype::BF16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            shape,
        ),
        StDtype::F16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            shape,
        ),
        other => {
            bail!("tensor {name} has unsupported dtype {other:?} (flexrun reads F32, BF16 and F16)")
        }
    };
    check_finite(name, &t)?;
    Ok(t)
}

/// Weights must be finite: a NaN or an infinity would turn every output it touches into NaN.
fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let bad = match t.bf16_data() {
        Some(v) => v.iter().position(|x| !x.to_f32().is_finite()),
        None => t.data().iter().position(|x| !x.is_finite()),
    };
    if let Some(at) = bad {
        bail!("tensor {name} holds a non-finite value (NaN or infinity) at element {at}");
    }
    Ok(())
}

/// The safetensors files of a model directory: the single file, or the shards of the index.
/// Every shard the index names must be a plain file name inside `dir` (see
/// [`crate::fsutil::confined`]).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    ensure!(
        dir.is_dir(),
        "model directory {} does not exist",
        dir.display()
    );
    tensor_files(dir, "model")
}

/// The safetensors files `{stem}.safetensors`, or the shards `{stem}.safetensors.index.json`
/// names, in `dir` (see [`write_tensor_files`]).
pub fn tensor_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = confined(dir, &format!("{stem}.safetensors"), "weights")?;
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = confined(dir, &format!("{stem}.safetensors.index.json"), "index")?;
    ensure!(
        index.exists(),
        "{} holds neither {stem}.safetensors nor {stem}.safetensors.index.json",
        dir.display()
    );
    let text = read_text(&index, "index", MAX_JSON_BYTES)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: the shard of tensor {tensor} is not a file name",
                index.display()
            )
        })?;
        files.push(file.to_string());
    }
    files.sort();
    files.dedup();
    ensure!(!files.is_empty(), "{} lists no tensors", index.display());
    let mut paths = Vec::new();
    for f in &files {
        let p = confined(dir, f, "shard").with_context(|| format!("{}", index.display()))?;
        ensure!(
            p.exists(),
            "shard {f} named in {} is missing",
            index.display()
        );
        paths.push(p);
    }
    Ok(paths)
}

/// Read every tensor of a set of safetensors files (memory-mapped; each tensor is copied out once,
/// in f32, or in bf16 for bf16 tensors when `keep_bf16`, and its mapped pages are released).
pub fn read_tensors(files: &[PathBuf], keep_bf16: bool) -> Result<Vec<(String, Tensor)>> {
    read_tensors_where(files, keep_bf16, |_| true)
}

/// [`read_tensors`] for the tensors whose name passes `keep` only (the others are not read and
/// may have any dtype: a BERT checkpoint's integer `position_ids`).
pub fn read_tensors_where(
    files: &[PathBuf],
    keep_bf16: bool,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for f in files {
        let (file, _) = open_regular(f, "weights file")?;
        // SAFETY: the map is read-only and dropped before this function returns; a concurrent
        // writer truncating the file is outside what any reader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", f.display()))?;
        let st = SafeTensors::deserialize(&mmap)
            .with_context(|| format!("{} is not a valid safetensors file", f.display()))?;
        let mut names: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| keep(n))
            .map(|s| s.to_string())
            .collect();
        names.sort();
        for name in names {
            let view = st
                .tensor(&name)
                .with_context(|| format!("{}: tensor {name}", f.display()))?;
            let t =
                to_tensor(&name, &view, keep_bf16).with_context(|| format!("{}", f.display()))?;
            // Release the pages just copied from this process (they stay in the page cache), so
            // that the peak resident size is the parameters, not the parameters plus the file.
            #[cfg(unix)]
            {
                let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                // SAFETY: MADV_DONTNEED on a read-only file mapping only drops pages; a later
                // read faults them in again from the file, so no data is lost.
                let _ = unsafe {
                    mmap.unchecked_advise_range(
                        UncheckedAdvice::DontNeed,
                        offset,
                        view.data().len(),
                    )
                };
            }
            out.push((name, t));
        }
    }
    Ok(out)
}

/// Rows `[start, start + n)` of `t` viewed as `[rows, cols]`, copied into an `[n, cols]` tensor
/// of the same dtype.
fn row_block(t: &Tensor, start: usize, n: usize) -> Tensor {
    let c = t.cols();
    match t.bf16_data() {
        Some(v) => Tensor::from_bf16(v[start * c..(start + n) * c].to_vec(), &[n, c]),
        None => t.slice_rows(start, n),
    }
}

/// Check that a stacked per-expert tensor (router rows, fused expert weights) has `want` as shape,
/// saying so plainly when only its expert count disagrees with config.json.
fn check_stacked(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    let got = t.shape();
    if got.len() == want.len() && got[1..] == want[1..] && got[0] != want[0] {
        bail!(
            "tensor {name} holds {} experts but config.json has num_experts = {}",
            got[0],
            want[0]
        );
    }
    ensure!(
        got == want,
        "tensor {name} has shape {got:?}, config.json implies {want:?}"
    );
    Ok(())
}

/// Map checkpoint tensors (HF names) to flexrun's parameter store for `cfg`: router rows are
/// split per expert, fused expert tensors are split into per-expert matrices, norm weights and
/// router rows become f32, and everything else keeps the dtype it was read in.
pub fn params_from_hf(cfg: &Config, tensors: Vec<(String, Tensor)>) -> Result<ParamStore> {
    let (h, i_sz) = (cfg.hidden_size, cfg.intermediate_size);
    let e = cfg.experts();
    let mut ps = ParamStore::default();
    let add = |ps: &mut ParamStore, name: String, t: Tensor, from: &str| -> Result<()> {
        ensure!(
            ps.id(&name).is_none(),
            "{name} is defined twice in the checkpoint, the second time by tensor {from} (are per-expert and fused expert layouts mixed?)"
        );
        ps.add(name, t);
        Ok(())
    };
    for (name, t) in tensors {
        let Some(rest) = name.strip_prefix("model.layers.") else {
            match name.as_str() {
                "model.embed_tokens.weight" | "lm_head.weight" => {
                    add(&mut ps, name.clone(), t, &name)?
                }
                "model.norm.weight" => add(&mut ps, name.clone(), t.to_dtype(DType::F32), &name)?,
                _ => bail!("unexpected tensor {name} for a {} model", cfg.model_type),
            }
            continue;
        };
        let (l, part) = rest
            .split_once('.')
            .with_context(|| format!("bad tensor name {name}"))?;
        let l: usize = l
            .parse()
            .ok()
            .with_context(|| format!("bad layer index in tensor {name}"))?;
        ensure!(
            l < cfg.num_hidden_layers,
            "tensor {name} is for layer {l} but config.json has num_hidden_layers = {}",
            cfg.num_hidden_layers
        );
        match part {
            "mlp.gate.weight" if cfg.is_moe() => {
                check_stacked(&name, &t, &[e, h])?;
                let t = t.to_dtype(DType::F32);
                for ex in 0..e {
                    add(&mut ps, router_row_name(l, ex), t.slice_rows(ex, 1), &name)?;
                }
            }
            "mlp.gate.expert_bias" if cfg.is_moe() => {
                check_stacked(&name, &t, &[e])?;
                let t = t.to_dtype(DType::F32);
                for ex in 0..e {
                    add(
                        &mut ps,
                        router_bias_name(l, ex),
                        Tensor::from_vec(vec![t.data()[ex]], &[1]),
                        &name,
                    )?;
                }
            }
            "mlp.experts.gate_up_proj" if cfg.is_moe() => {
                check_stacked(&name, &t, &[e, 2 * i_sz, h])?;
                for ex in 0..e {
                    let p = expert_prefix(l, ex, true);
                    add(
                        &mut ps,
                        format!("{p}gate_proj.weight"),
                        row_block(&t, 2 * i_sz * ex, i_sz),
                        &name,
                    )?;
                    add(
                        &mut ps,
                        format!("{p}up_proj.weight"),
                        row_block(&t, 2 * i_sz * ex + i_sz, i_sz),
                        &name,
                    )?;
                }
            }
            "mlp.experts.down_proj" if cfg.is_moe() => {
                check_stacked(&name, &t, &[e, h, i_sz])?;
                for ex in 0..e {
                    add(
                        &mut ps,
                        format!("{}down_proj.weight", expert_prefix(l, ex, true)),
                        row_block(&t, h * ex, h),
                        &name,
                    )?;
                }
            }
            _ if !cfg.is_moe()
                && (part.starts_with("mlp.experts.") || part.starts_with("mlp.gate.")) =>
            {
                bail!("tensor {name} belongs to a mixture-of-experts model but config.json describes a dense {} model", cfg.model_type)
            }
            _ if part.ends_with("norm.weight") => {
                add(&mut ps, name.clone(), t.to_dtype(DType::F32), &name)?
            }
            _ => {
                if let Some((_, ex, _)) = parse_expert_param(&name) {
                    ensure!(ex < e, "tensor {name} belongs to expert {ex} but config.json has num_experts = {e}");
                }
                add(&mut ps, name.clone(), t, &name)?;
            }
        }
    }
    Ok(ps)
}

/// The architecture named in config.json must be the one its model_type runs.
fn check_architecture(cfg: &Config, cfg_path: &Path) -> Result<()> {
    let want = if cfg.is_moe() {
        "FlexOlmoForCausalLM"
    } else {
        "Olmo2ForCausalLM"
    };
    if let Some(a) = cfg.architectures.iter().find(|a| a.as_str() != want) {
        bail!(
            "{}: unsupported architecture {a} for model_type '{}' (flexrun runs FlexOlmoForCausalLM with flex_olmo and Olmo2ForCausalLM with olmo2)",
            cfg_path.display(),
            cfg.model_type
        );
    }
    Ok(())
}

/// Every tensor read must be a parameter of the model: a leftover means the checkpoint is not
/// the model its config describes (for example a shared expert, which FlexOlmo does not have).
fn check_all_used(model: &Model) -> Result<()> {
    let mut used = vec![false; model.params.len()];
    let mut ids = vec![model.embed, model.final_norm, model.lm_head];
    for layer in &model.layers {
        ids.extend([
            layer.q,
            layer.k,
            layer.v,
            layer.o,
            layer.q_norm,
            layer.k_norm,
            layer.post_attn_norm,
            layer.post_ffn_norm,
        ]);
        match &layer.ffn {
            Ffn::Dense(f) => ids.extend([f.gate, f.up, f.down]),
            Ffn::Moe(experts) => {
                for x in experts {
                    ids.extend([x.ffn.gate, x.ffn.up, x.ffn.down, x.router]);
                    ids.extend(x.bias);
                }
            }
        }
    }
    for id in ids {
        used[id] = true;
    }
    if let Some(p) = model
        .params
        .params
        .iter()
        .zip(&used)
        .find_map(|(p, &u)| (!u).then_some(p))
    {
        bail!(
            "tensor {} is not part of a {} model with {} expert(s) as config.json describes",
            p.name,
            model.cfg.model_type,
            model.cfg.experts()
        );
    }
    Ok(())
}

/// Load a model directory (config.json + weights) with every weight in f32.
pub fn load(dir: &Path) -> Result<Model> {
    load_with(dir, false)
}

/// Load a model directory. With `keep_bf16`, bf16 weight matrices (embeddings, projections,
/// experts, lm_head) stay bf16 in memory, so a bf16 checkpoint takes its file size in RAM rather
/// than twice that; such a model runs inference (the ops convert tiles to f32) but cannot be
/// trained. Norm weights and router rows are always f32.
pub fn load_with(dir: &Path, keep_bf16: bool) -> Result<Model> {
    ensure!(
        dir.is_dir(),
        "model directory {} does not exist",
        dir.display()
    );
    let cfg_path = confined(dir, "config.json", "config")?;
    ensure!(cfg_path.exists(), "{} has no config.json", dir.display());
    let cfg = Config::load(&cfg_path)?;
    check_architecture(&cfg, &cfg_path)?;
    let files = weight_files(dir)?;
    let tensors = read_tensors(&files, keep_bf16)?;
    let ps = params_from_hf(&cfg, tensors).with_context(|| format!("{}", dir.display()))?;
    let model = Model::from_params(cfg, ps).with_context(|| format!("{}", dir.display()))?;
    check_all_used(&model).with_context(|| format!("{}", dir.display()))?;
    Ok(model)
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
                biases
                    .entry(l)
                    .or_default()
                    .insert(e, p.value.to_dtype(DType::F32).data()[0]);
            }
            _ => {
                out.insert(p.name.clone(), p.value.clone());
            }
        }
    }
    let e = model.cfg.experts();
    for (l, rows) in routers {
        let parts: Vec<&Tensor> = rows.values().collect();
        out.insert(
            format!("model.layers.{l}.mlp.gate.weight"),
            Tensor::cat_rows(&parts),
        );
    }
    for (l, b) in biases {
        let v: Vec<f32> = (0..e).map(|x| b.get(&x).copied().unwrap_or(0.0)).collect();
        out.insert(
            format!("model.layers.{l}.mlp.gate.expert_bias"),
            Tensor::from_vec(v, &[e]),
        );
    }
    out.into_iter().collect()
}

/// Serialise named tensors to safetensors bytes in `dtype`.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let bytes = match dtype {
                DType::F32 => {
                    bytemuck::cast_slice::<f32, u8>(t.to_dtype(DType::F32).data()).to_vec()
                }
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

/// The largest weight file [`save`] writes: transformers' default `max_shard_size` ("5GB").
/// A larger model is written as shards `model-00001-of-0000N.safetensors` with
/// `model.safetensors.index.json`, as transformers writes it.
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Write `model`'s files, `config.json` and its weights (`model.safetensors`, or shards of at
/// most [`MAX_SHARD_BYTES`] and their index), into the existing directory `dir` (each file
/// atomically). For a model directory as a whole, use [`save`].
pub fn write_files(model: &Model, dir: &Path, dtype: DType) -> Result<()> {
    write_files_sharded(model, dir, dtype, MAX_SHARD_BYTES)
}

/// [`write_files`] with shards of at most `max_shard` bytes (a tensor larger than that gets a
/// shard of its own). Only one shard's bytes are held in memory at a time.
pub fn write_files_sharded(
    model: &Model,
    dir: &Path,
    dtype: DType,
    max_shard: usize,
) -> Result<()> {
    let mut cfg = model.cfg.clone();
    // transformers >= 4.56 reads `dtype` (`torch_dtype` is its deprecated alias): keep one, true.
    cfg.extra.remove("torch_dtype");
    cfg.extra.insert(
        "dtype".into(),
        match dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
        }
        .into(),
    );
    write_tensor_files(dir, "model", &hf_tensors(model), dtype, max_shard)?;
    write_bytes_atomic(&dir.join("config.json"), cfg.to_json().as_bytes())?;
    Ok(())
}

/// Write the model directory `dir`: `config.json` + `model.safetensors`, and `extra` files
/// (name, bytes) beside them, as one directory that replaces what `dir` held as a whole (see
/// [`crate::fsutil::write_dir_atomic`]: no stale model file survives, a training run in it is
/// kept, and a concurrent writer of the same directory is refused).
pub fn save_with(model: &Model, dir: &Path, dtype: DType, extra: &[(&str, Vec<u8>)]) -> Result<()> {
    crate::fsutil::write_dir_atomic(dir, |tmp| {
        write_files(model, tmp, dtype)?;
        for (name, bytes) in extra {
            write_bytes_atomic(&tmp.join(name), bytes)?;
        }
        Ok(())
    })
}

/// Write `tensors` into `dir` as `{stem}.safetensors`, or, above `max_shard` bytes, as shards
/// `{stem}-0000k-of-0000n.safetensors` (consecutive tensors, each shard within the size; a
/// tensor larger than that alone) with `{stem}.safetensors.index.json` mapping every tensor to
/// its shard, as transformers writes them; each file atomically, one shard's bytes in memory at
/// a time. [`tensor_files`] finds them again.
pub fn write_tensor_files(
    dir: &Path,
    stem: &str,
    tensors: &[(String, Tensor)],
    dtype: DType,
    max_shard: usize,
) -> Result<()> {
    let elem = match dtype {
        DType::F32 => 4,
        DType::BF16 => 2,
    };
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0usize;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let b = t.numel() * elem;
        if size > 0 && size + b > max_shard {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push(i);
        size += b;
    }
    let meta = || Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards.len() == 1 {
        let bytes = safetensors_bytes(tensors, dtype, meta())?;
        return write_bytes_atomic(&dir.join(format!("{stem}.safetensors")), &bytes);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (k, ids) in shards.iter().enumerate() {
        let name = format!("{stem}-{:05}-of-{n:05}.safetensors", k + 1);
        let part: Vec<(String, Tensor)> = ids.iter().map(|&i| tensors[i].clone()).collect();
        for (t, v) in &part {
            weight_map.insert(t.clone(), name.clone().into());
            total += v.numel() * elem;
        }
        write_bytes_atomic(&dir.join(&name), &safetensors_bytes(&part, dtype, meta())?)?;
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    write_bytes_atomic(
        &dir.join(format!("{stem}.safetensors.index.json")),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )
}

/// [`save`] with weight shards of at most `max_shard` bytes ([`write_files_sharded`]).
pub fn save_sharded(model: &Model, dir: &Path, dtype: DType, max_shard: usize) -> Result<()> {
    crate::fsutil::write_dir_atomic(dir, |tmp| write_files_sharded(model, tmp, dtype, max_shard))
}

/// [`save_with`] and no extra files.
pub fn save(model: &Model, dir: &Path, dtype: DType) -> Result<()> {
    save_with(model, dir, dtype, &[])
}
