//! Hugging Face interop: flexrun against logits recorded with transformers (tests/fixtures, made
//! by tests/fixtures/make_hf_fixtures.py), checkpoint round trips, bf16 weights kept in bf16,
//! upcycling a dense OLMo-2 model, and one-line errors for broken model directories.
//!
//! Saved models stay under `target/tmp/hf_parity/` so that `benches/torch/check_hf_load.py` can
//! load them with transformers afterwards.

use flexrun::autograd::Tape;
use flexrun::model::{checkpoint, Model};
use flexrun::tensor::{DType, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Tolerance against transformers' f32 logits (the fixtures README: an f32 runtime is within ~1e-5).
const HF_TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> Value {
    let path = fixture(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(exp: &Value) -> Vec<u32> {
    exp["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A nested JSON array of numbers, flattened in row-major order.
fn flat_f32(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat_f32).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn flat_u32(v: &Value) -> Vec<u32> {
    flat_f32(v).into_iter().map(|x| x as u32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits `[T, V]` of one sequence and the top-k expert indices of every MoE layer (`[L][T*k]`).
fn run(model: &Model, ids: &[u32]) -> (Tensor, Vec<Vec<u32>>) {
    let mut tape = Tape::inference();
    let out = model.forward(&mut tape, ids, 1, ids.len(), None).unwrap();
    let routing = out.routings.iter().map(|r| r.indices.clone()).collect();
    (tape.value(out.logits).clone(), routing)
}

/// Compare with transformers' logits and (for MoE models) routing; returns the max logit diff.
fn check_against(model: &Model, exp: &Value, what: &str) -> f32 {
    let (logits, routing) = run(model, &ids(exp));
    let d = max_diff(logits.data(), &flat_f32(&exp["logits"]));
    println!("{what}: max |logit diff| vs transformers = {d:.3e}");
    assert!(d <= HF_TOL, "{what}: max |logit diff| {d} > {HF_TOL}");
    if let Some(want) = exp["routing"]["top_k_index"].as_array() {
        assert_eq!(routing.len(), want.len(), "{what}: number of MoE layers");
        for (l, (got, want)) in routing.iter().zip(want).enumerate() {
            assert_eq!(got, &flat_u32(want), "{what}: top-k experts of layer {l}");
        }
    }
    d
}

/// A fresh directory under cargo's per-target temp dir (kept after the test for inspection).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("hf_parity")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A scratch copy of a fixture directory, to be corrupted by a test.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dir = scratch(tag);
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The tensors of a single-file checkpoint, edited and written back (f32).
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = checkpoint::read_tensors(std::slice::from_ref(&file), false).unwrap();
    edit(&mut tensors);
    std::fs::write(
        &file,
        checkpoint::safetensors_bytes(&tensors, DType::F32, None).unwrap(),
    )
    .unwrap();
}

/// Loading `dir` fails with a one-line message containing every one of `needles`.
fn assert_load_error(dir: &Path, needles: &[&str]) -> String {
    let msg = match checkpoint::load(dir) {
        Ok(_) => panic!("{} loaded, but it is broken", dir.display()),
        Err(e) => e.0,
    };
    println!("error: {msg}");
    assert!(!msg.contains('\n'), "the error should be one line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error should mention {n:?}: {msg}");
    }
    msg
}

#[test]
fn flexolmo_sharded_checkpoint_matches_transformers() {
    let m = checkpoint::load(&fixture("flexolmo_tiny")).unwrap();
    assert_eq!(
        (m.cfg.experts(), m.cfg.top_k(), m.cfg.kv_heads()),
        (4, 2, 2)
    );
    check_against(&m, &expected("flexolmo_tiny"), "flexolmo_tiny");
}

#[test]
fn flexolmo_fused_expert_layout_matches_transformers() {
    let fused = checkpoint::load(&fixture("flexolmo_fused")).unwrap();
    check_against(&fused, &expected("flexolmo_tiny"), "flexolmo_fused");
    // Both layouts hold the same weights: the models are the same, tensor for tensor.
    let split = checkpoint::load(&fixture("flexolmo_tiny")).unwrap();
    assert_eq!(
        checkpoint::hf_tensors(&fused).len(),
        checkpoint::hf_tensors(&split).len()
    );
    for ((na, a), (nb, b)) in checkpoint::hf_tensors(&fused)
        .iter()
        .zip(checkpoint::hf_tensors(&split).iter())
    {
        assert_eq!(na, nb);
        assert_eq!(a.data(), b.data(), "{na}");
    }
}

#[test]
fn olmo2_bf16_checkpoint_matches_transformers() {
    let m = checkpoint::load(&fixture("olmo2_tiny_bf16")).unwrap();
    assert!(!m.cfg.is_moe());
    check_against(&m, &expected("olmo2_tiny_bf16"), "olmo2_tiny_bf16");
}

#[test]
fn norm_topk_prob_variant_matches_transformers() {
    let mut m = checkpoint::load(&fixture("flexolmo_tiny")).unwrap();
    m.cfg.norm_topk_prob = true;
    let exp = expected("flexolmo_tiny");
    let mut variant = exp["norm_topk"].clone();
    variant["ids"] = exp["ids"].clone();
    check_against(&m, &variant, "flexolmo_tiny norm_topk_prob=true");
}

#[test]
fn opting_out_an_expert_matches_transformers_both_ways() {
    let exp = expected("flexolmo_tiny");
    let mut optout = exp["optout"].clone();
    optout["ids"] = exp["ids"].clone();
    assert_eq!(optout["excluded"], 2);
    let full = checkpoint::load(&fixture("flexolmo_tiny")).unwrap();
    let dropped = full.select_experts(&[0, 1, 3]).unwrap();
    check_against(&dropped, &optout, "flexolmo_tiny without expert 2");
    let direct = checkpoint::load(&fixture("flexolmo_tiny_optout2")).unwrap();
    check_against(&direct, &optout, "flexolmo_tiny_optout2");
    let (a, ra) = run(&dropped, &ids(&exp));
    let (b, rb) = run(&direct, &ids(&exp));
    assert_eq!(
        a.data(),
        b.data(),
        "dropping at run time and loading the opt-out checkpoint must agree bit for bit"
    );
    assert_eq!(ra, rb);
}

/// Names and values of every tensor in a model directory, in name order.
fn dir_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut t = checkpoint::read_tensors(&checkpoint::weight_files(dir).unwrap(), false).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn saved_checkpoints_reload_exactly_with_the_hf_tensor_set() {
    let exp = expected("flexolmo_tiny");
    for (name, kept) in [
        ("flexolmo_tiny", None),
        ("flexolmo_fused", None),
        ("flexolmo_tiny", Some(&[0usize, 1, 3][..])),
    ] {
        let mut m = checkpoint::load(&fixture(name)).unwrap();
        if let Some(keep) = kept {
            m = m.select_experts(keep).unwrap();
        }
        let out = scratch(&format!(
            "saved_{name}{}",
            if kept.is_some() { "_optout2" } else { "" }
        ));
        checkpoint::save(&m, &out, DType::F32).unwrap();
        let back = checkpoint::load(&out).unwrap();
        assert_eq!(back.cfg, {
            let mut c = m.cfg.clone();
            c.extra.insert("dtype".into(), "float32".into());
            c
        });
        assert_eq!(
            run(&m, &ids(&exp)).0.data(),
            run(&back, &ids(&exp)).0.data(),
            "{name}: logits after a round trip"
        );
        // A model without router biases is written as exactly the per-expert HF tensor set.
        let reference = if kept.is_some() {
            "flexolmo_tiny_optout2"
        } else {
            "flexolmo_tiny"
        };
        let (saved, want) = (dir_tensors(&out), dir_tensors(&fixture(reference)));
        let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&saved), names(&want), "{name}: saved tensor names");
        for ((n, a), (_, b)) in saved.iter().zip(&want) {
            assert_eq!(a.shape(), b.shape(), "{n}");
            assert_eq!(a.data(), b.data(), "{n}");
        }
    }
    // The bf16 OLMo-2 model saved in bf16 gives back the very same file contents.
    let m = checkpoint::load(&fixture("olmo2_tiny_bf16")).unwrap();
    let out = scratch("saved_olmo2_tiny_bf16");
    checkpoint::save(&m, &out, DType::BF16).unwrap();
    let (saved, want) = (dir_tensors(&out), dir_tensors(&fixture("olmo2_tiny_bf16")));
    assert_eq!(saved.len(), want.len());
    for ((n, a), (nb, b)) in saved.iter().zip(&want) {
        assert_eq!((n, a.data()), (nb, b.data()));
    }
}

#[test]
fn router_biases_are_saved_as_an_extra_tensor_and_reloaded() {
    let m = checkpoint::load(&fixture("flexolmo_tiny")).unwrap();
    let mut ps = m.params.clone();
    for l in 0..2 {
        ps.add(
            flexrun::model::router_bias_name(l, 1),
            Tensor::from_vec(vec![-0.7], &[1]),
        );
    }
    let biased = Model::from_params(m.cfg.clone(), ps).unwrap();
    let out = scratch("saved_biased");
    checkpoint::save(&biased, &out, DType::F32).unwrap();
    let names: Vec<String> = dir_tensors(&out).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"model.layers.0.mlp.gate.expert_bias".to_string()));
    assert_eq!(
        names.len(),
        dir_tensors(&fixture("flexolmo_tiny")).len() + 2
    );
    let back = checkpoint::load(&out).unwrap();
    let ids = ids(&expected("flexolmo_tiny"));
    let (a, b) = (run(&biased, &ids).0, run(&back, &ids).0);
    assert_eq!(a.data(), b.data());
    assert!(
        a.max_abs_diff(&run(&m, &ids).0) > 1e-3,
        "the bias changes the logits"
    );
}

#[test]
fn bf16_weights_kept_in_bf16_give_the_f32_logits() {
    let dir = fixture("olmo2_tiny_bf16");
    let f32_model = checkpoint::load(&dir).unwrap();
    let bf16_model = checkpoint::load_with(&dir, true).unwrap();
    let mut bf16_bytes = 0;
    for p in &bf16_model.params.params {
        let want = if p.name.contains("norm") {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(p.value.dtype(), want, "{}", p.name);
        bf16_bytes += p.value.numel() * p.value.dtype().size();
    }
    let file = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len() as usize;
    assert!(
        bf16_bytes < file + file / 10,
        "{bf16_bytes} bytes of parameters for a {file}-byte checkpoint"
    );
    let exp = expected("olmo2_tiny_bf16");
    let (a, b) = (
        run(&f32_model, &ids(&exp)).0,
        run(&bf16_model, &ids(&exp)).0,
    );
    let d = a.max_abs_diff(&b);
    println!("olmo2_tiny_bf16: keep_bf16 vs f32 load: max |logit diff| = {d:.3e}");
    assert!(d <= 1e-5, "keep_bf16 changes logits by {d}");
    check_against(&bf16_model, &exp, "olmo2_tiny_bf16 (keep_bf16)");
    // The fused-layout MoE rounded to bf16: its fused tensors are split without leaving bf16.
    let dir = copy_fixture("flexolmo_fused", "flexolmo_fused_bf16");
    let file = dir.join("model.safetensors");
    let tensors = checkpoint::read_tensors(std::slice::from_ref(&file), false).unwrap();
    let bytes = checkpoint::safetensors_bytes(&tensors, DType::BF16, None).unwrap();
    std::fs::write(&file, bytes).unwrap();
    let (a, b) = (
        checkpoint::load(&dir).unwrap(),
        checkpoint::load_with(&dir, true).unwrap(),
    );
    for name in [
        "model.layers.0.mlp.experts.3.up_proj.weight",
        "model.layers.1.mlp.experts.2.down_proj.weight",
    ] {
        assert_eq!(
            b.params.value(b.params.id(name).unwrap()).dtype(),
            DType::BF16,
            "{name}"
        );
    }
    let ids = ids(&expected("flexolmo_tiny"));
    let d = run(&a, &ids).0.max_abs_diff(&run(&b, &ids).0);
    assert!(d <= 1e-5, "keep_bf16 MoE changes logits by {d}");
}

#[test]
fn upcycled_olmo2_computes_the_dense_model() {
    let dense = checkpoint::load(&fixture("olmo2_tiny_bf16")).unwrap();
    let ids = ids(&expected("olmo2_tiny_bf16"));
    let want = run(&dense, &ids).0;
    for n in [1, 3, 4] {
        let moe = dense.upcycle(n).unwrap();
        assert!(moe.cfg.is_moe());
        assert_eq!((moe.cfg.experts(), moe.cfg.top_k()), (n, n));
        assert_eq!(moe.cfg.architectures, ["FlexOlmoForCausalLM"]);
        let (got, routing) = run(&moe, &ids);
        assert_eq!(routing.len(), 2);
        let d = got.max_abs_diff(&want);
        println!("olmo2_tiny_bf16 upcycled to {n} experts: max |logit diff| vs dense = {d:.3e}");
        assert!(d <= 1e-5, "{n} experts: {d}");
    }
    // Saved, it is an ordinary FlexOlmo checkpoint (benches/torch/check_hf_load.py loads it with
    // transformers).
    let out = scratch("saved_olmo2_upcycled4");
    checkpoint::save(&dense.upcycle(4).unwrap(), &out, DType::F32).unwrap();
    let back = checkpoint::load(&out).unwrap();
    assert_eq!(
        run(&back, &ids).0.data(),
        run(&dense.upcycle(4).unwrap(), &ids).0.data()
    );
    let e = back.upcycle(2).err().unwrap();
    assert!(e.0.contains("dense"), "{e}");
}

#[test]
fn unsupported_architecture_or_model_type_is_a_clear_error() {
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_model_type");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "mixtral".into());
        c.insert(
            "architectures".into(),
            serde_json::json!(["MixtralForCausalLM"]),
        );
    });
    assert_load_error(
        &dir,
        &[
            "config.json",
            "unsupported model_type 'mixtral'",
            "MixtralForCausalLM",
        ],
    );
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_architecture");
    edit_config(&dir, |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["Olmo2ForCausalLM"]),
        );
    });
    assert_load_error(
        &dir,
        &[
            "config.json",
            "unsupported architecture Olmo2ForCausalLM",
            "flex_olmo",
        ],
    );
}

#[test]
fn missing_config_is_a_clear_error() {
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_no_config");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_load_error(&dir, &["err_no_config", "has no config.json"]);
    let e = checkpoint::load(&dir.join("nowhere")).err().unwrap();
    assert!(e.0.contains("does not exist"), "{e}");
}

#[test]
fn missing_shard_is_a_clear_error() {
    let dir = copy_fixture("flexolmo_tiny", "err_missing_shard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert_load_error(
        &dir,
        &[
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "missing",
        ],
    );
}

#[test]
fn truncated_safetensors_file_is_a_clear_error() {
    let dir = copy_fixture("flexolmo_tiny", "err_truncated");
    let shard = dir.join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    for keep in [len - 100, 5] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap()
            .set_len(keep)
            .unwrap();
        assert_load_error(
            &dir,
            &[
                "model-00002-of-00002.safetensors",
                "not a valid safetensors file",
            ],
        );
    }
}

#[test]
fn tensor_with_the_wrong_shape_is_a_clear_error() {
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_shape");
    let name = "model.layers.1.self_attn.k_proj.weight";
    edit_tensors(&dir, |t| {
        let slot = t.iter_mut().find(|(n, _)| n == name).unwrap();
        slot.1 = Tensor::zeros(&[16, 64]);
    });
    assert_load_error(&dir, &[name, "[16, 64]", "[32, 64]"]);
    let dir = copy_fixture("flexolmo_fused", "err_shape_fused");
    let name = "model.layers.0.mlp.experts.gate_up_proj";
    edit_tensors(&dir, |t| {
        let slot = t.iter_mut().find(|(n, _)| n == name).unwrap();
        slot.1 = Tensor::zeros(&[4, 48, 64]);
    });
    assert_load_error(&dir, &[name, "[4, 48, 64]", "[4, 96, 64]"]);
}

#[test]
fn unsupported_dtype_is_a_clear_error() {
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_dtype");
    let file = dir.join("model.safetensors");
    let tensors = checkpoint::read_tensors(std::slice::from_ref(&file), false).unwrap();
    let name = "model.layers.0.self_attn.v_proj.weight";
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let b: Vec<u8> = if n == name {
                t.data()
                    .iter()
                    .flat_map(|&x| ((x * 1000.0) as i32).to_le_bytes())
                    .collect()
            } else {
                t.data().iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            (n.clone(), t.shape().to_vec(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let dtype = if n == name {
                safetensors::Dtype::I32
            } else {
                safetensors::Dtype::F32
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&file, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    assert_load_error(&dir, &["model.safetensors", name, "unsupported dtype I32"]);
}

#[test]
fn expert_count_disagreeing_with_the_weights_is_a_clear_error() {
    for (layout, have) in [("flexolmo_tiny_optout2", 3), ("flexolmo_fused", 4)] {
        for claimed in [have - 1, have + 1] {
            let dir = copy_fixture(layout, &format!("err_experts_{layout}_{claimed}"));
            edit_config(&dir, |c| {
                c.insert("num_experts".into(), claimed.into());
            });
            let msg = assert_load_error(&dir, &[&format!("num_experts = {claimed}")]);
            assert!(
                msg.contains(&format!("holds {have} experts")) || msg.contains("belongs to expert"),
                "{msg}"
            );
        }
    }
}

#[test]
fn weights_of_another_model_shape_are_a_clear_error() {
    // MoE weights under a dense olmo2 config: the router is not part of such a model.
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_moe_as_dense");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "olmo2".into());
        c.insert(
            "architectures".into(),
            serde_json::json!(["Olmo2ForCausalLM"]),
        );
    });
    assert_load_error(
        &dir,
        &["err_moe_as_dense", "mlp.experts.", "dense olmo2 model"],
    );
    // A tensor the config does not know, even inside a layer.
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_extra_tensor");
    edit_tensors(&dir, |t| {
        t.push((
            "model.layers.0.mlp.shared_expert.weight".into(),
            Tensor::zeros(&[2]),
        ))
    });
    assert_load_error(
        &dir,
        &[
            "model.layers.0.mlp.shared_expert.weight",
            "not part of a flex_olmo model",
        ],
    );
    // A weight that is absent.
    let dir = copy_fixture("flexolmo_tiny_optout2", "err_missing_tensor");
    edit_tensors(&dir, |t| {
        t.retain(|(n, _)| n != "model.layers.1.self_attn.q_norm.weight")
    });
    assert_load_error(
        &dir,
        &[
            "err_missing_tensor",
            "lacks tensor model.layers.1.self_attn.q_norm.weight",
        ],
    );
}
