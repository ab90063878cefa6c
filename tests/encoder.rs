//! flexrun's BERT-family sentence encoder (src/model/encoder.rs) against reference embeddings of
//! all-MiniLM-L6-v2 (tests/fixtures/encoder_minilm.json: an independent float64 NumPy
//! implementation of BertModel + mean pooling + Normalize, tests/fixtures/make_encoder_fixture.py).
//! The encoder's files come from its PyPI package (tools/setup-test.sh unpacks them into
//! .pydeps/minilm); without them the test prints SKIP, and fails when FLEXRUN_REQUIRE_TEST_DEPS=1.

use flexrun::model::encoder::Encoder;
use std::path::{Path, PathBuf};

fn encoder_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(".pydeps/minilm");
    if d.join("model.safetensors").exists() {
        return Some(d);
    }
    assert!(
        std::env::var("FLEXRUN_REQUIRE_TEST_DEPS").is_err(),
        "the encoder is missing from .pydeps/minilm: run tools/setup-test.sh"
    );
    println!("SKIP: no encoder in .pydeps/minilm (tools/setup-test.sh installs it)");
    None
}

#[test]
fn minilm_embeddings_match_the_reference() {
    let Some(dir) = encoder_dir() else { return };
    let enc = Encoder::load(&dir).unwrap();
    assert_eq!((enc.width(), enc.max_len()), (384, 256));
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoder_minilm.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<f32> = case["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let got = enc.embed(text).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-4, "{text:?}: max |diff| {diff}");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised: {norm}");
    }
    // Different texts, different embeddings; a long text is truncated, not refused.
    let a = enc.embed("The cat sat on the mat.").unwrap();
    let b = enc.embed("def add(a, b): return a + b").unwrap();
    let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!(cos < 0.5, "unrelated texts: cosine {cos}");
    let long = "word ".repeat(5000);
    assert_eq!(enc.embed(&long).unwrap().len(), 384);
    assert_eq!(enc.hash().len(), 16);
}

/// Bad encoder directories are one-line errors, before anything runs.
#[test]
fn bad_encoder_directories_are_refused() {
    let Some(dir) = encoder_dir() else { return };
    let tmp = std::env::temp_dir().join(format!("flexrun-encoder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let copy = |name: &str| {
        let dst = tmp.join(name);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(dir.join(name), dst).unwrap();
    };
    let err = |d: &Path| {
        Encoder::load(d)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err(&tmp.join("nope")).contains("does not exist"));
    assert!(err(&tmp).contains("config.json"));
    copy("config.json");
    assert!(err(&tmp).contains("tokenizer"));
    copy("tokenizer.json");
    assert!(err(&tmp).contains("model.safetensors"));
    std::fs::write(
        tmp.join("model.safetensors"),
        b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    assert!(err(&tmp).contains("lacks"), "{}", err(&tmp));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    assert!(err(&tmp).contains("not a BERT"));
    for e in [err(&tmp), err(&tmp.join("nope"))] {
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

fn flexrun(args: &[&str]) -> (i32, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_flexrun"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// `train-expert --router-init encoder`: the router rows come from the encoder's embeddings of
/// the owner's (and the public) documents, projected to the model's width; the artifact names
/// the encoder; experts from one encoder merge, an encoder expert and a public-model one do not.
#[test]
fn encoder_router_init_trains_records_and_guards_the_merge() {
    let Some(dir) = encoder_dir() else { return };
    let enc = dir.to_str().unwrap();
    let tmp = std::env::temp_dir().join(format!("flexrun-encinit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let w = tmp.join("w");
    let (code, _, err) = flexrun(&["demo", "--quick", "--out", w.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let p = |rel: &str| w.join(rel).to_str().unwrap().to_string();
    let art = |name: &str, init: &str| -> (i32, String) {
        let out = tmp.join(format!("{name}-{init}.safetensors"));
        let mut args = vec![
            "train-expert".to_string(),
            "--public".into(),
            p("models/public"),
            "--data".into(),
            p(&format!("data/{name}")),
            "--public-data".into(),
            p("data/public"),
            "--name".into(),
            name.into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--steps".into(),
            "2".into(),
            "--batch".into(),
            "2".into(),
            "--seq".into(),
            "16".into(),
            "--embed-docs".into(),
            "3".into(),
            "--router-init".into(),
            init.into(),
            "--quiet".into(),
        ];
        if init == "encoder" {
            args.extend(["--encoder".into(), enc.into()]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = flexrun(&a);
        (
            code,
            if code == 0 {
                out.to_str().unwrap().to_string()
            } else {
                err
            },
        )
    };
    let (c1, code_enc) = art("code", "encoder");
    assert_eq!(c1, 0, "{code_enc}");
    let (c2, math_enc) = art("math", "encoder");
    assert_eq!(c2, 0, "{math_enc}");
    let (c3, math_dom) = art("math", "domain");
    assert_eq!(c3, 0, "{math_dom}");
    let meta = flexrun::flex::ExpertArtifact::load(Path::new(&code_enc))
        .unwrap()
        .meta;
    assert_eq!(meta.router_init, "encoder");
    let rec = meta.router_encoder.unwrap();
    assert!(rec.ends_with("/gaussian-384x32-v1"), "{rec}");
    let merged = tmp.join("merged");
    let (code, _, err) = flexrun(&[
        "merge",
        "--public",
        &p("models/public"),
        "--experts",
        &code_enc,
        &math_enc,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = flexrun(&[
        "merge",
        "--public",
        &p("models/public"),
        "--experts",
        &code_enc,
        &math_dom,
        "--out",
        tmp.join("mixed").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("different embeddings") && err.trim().lines().count() == 1,
        "{err}"
    );
    // Settings that cannot work.
    let (public, code_data, pdata) = (p("models/public"), p("data/code"), p("data/public"));
    let x = tmp.join("x.safetensors");
    let base = [
        "train-expert",
        "--public",
        &public,
        "--data",
        &code_data,
        "--name",
        "code",
        "--out",
        x.to_str().unwrap(),
    ];
    for (extra, needle) in [
        (
            vec!["--router-init", "encoder", "--public-data", &pdata],
            "--encoder",
        ),
        (vec!["--encoder", enc], "--router-init encoder"),
        (
            vec![
                "--router-init",
                "encoder",
                "--encoder",
                "/nonexistent",
                "--public-data",
                &pdata,
            ],
            "does not exist",
        ),
    ] {
        let mut a: Vec<&str> = base.to_vec();
        a.extend(extra.iter().copied());
        let (code, _, err) = flexrun(&a);
        assert_eq!(code, 1, "{a:?}: {err}");
        assert!(
            err.contains(needle) && err.trim().lines().count() == 1,
            "{a:?}: {err}"
        );
    }
}

/// Prompt routing with the encoder's embeddings of the queries (`eval --route-encoder`).
#[test]
fn prompt_routing_on_encoder_embeddings() {
    let Some(dir) = encoder_dir() else { return };
    let tmp = std::env::temp_dir().join(format!("flexrun-encroute-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let w = tmp.join("w");
    let (code, _, err) = flexrun(&["demo", "--quick", "--out", w.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let p = |rel: &str| w.join(rel).to_str().unwrap().to_string();
    let route = format!(
        "public={},code={},math={}",
        p("models/public"),
        p("models/dense-code"),
        p("models/dense-math")
    );
    let (dp, dc, dm) = (
        format!("public={}", p("data/public")),
        format!("code={}", p("data/code")),
        format!("math={}", p("data/math")),
    );
    let (code, out, err) = flexrun(&[
        "eval",
        "--route",
        &route,
        "--route-encoder",
        dir.to_str().unwrap(),
        "--data",
        &dp,
        &dc,
        &dm,
        "--tokens",
        "64",
        "--seq",
        "16",
        "--tasks",
        "0",
        "--route-queries",
        "4",
        "--route-prompt",
        "12",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| prompt routing |"), "{out}");
    let (code, _, err) = flexrun(&[
        "eval",
        "--model",
        &p("models/public"),
        "--route-encoder",
        dir.to_str().unwrap(),
        "--data",
        &dp,
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--route") && err.trim().lines().count() == 1,
        "{err}"
    );
}
