//! Bad input at the command line: a one-line error on stderr, exit status 1, never a panic.

use std::path::PathBuf;
use std::process::Command;

fn flexrun(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flexrun"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn assert_clean_error(args: &[&str], needle: &str) {
    let (code, _, err) = flexrun(args);
    assert_eq!(code, 1, "{args:?} should fail with status 1; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{args:?} panicked: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?} should print one line: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flexrun-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn missing_and_corrupt_inputs() {
    let d = tmp("bad");
    let ds = d.to_str().unwrap();
    // Outputs go to a path that does not exist yet, outside the inputs (`ds` holds files that
    // are not a model, and is passed as every input).
    let fresh = tmp("bad-out").join("out");
    let fresh = fresh.to_str().unwrap();
    assert_clean_error(
        &["generate", "--model", "/nonexistent/model", "--ids", "1,2"],
        "does not exist",
    );
    assert_clean_error(
        &[
            "data",
            "prepare",
            "--input",
            ds,
            "--tokenizer",
            "/nonexistent/tok.json",
            "--out",
            ds,
        ],
        "tok.json",
    );
    assert_clean_error(
        &["pretrain", "--data", "/nonexistent/data", "--out", ds],
        "meta.json",
    );
    // A truncated safetensors file.
    let m = d.join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(
        format!("{}/config.json", fixture("flexolmo_tiny_optout2")),
        m.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(format!(
        "{}/model.safetensors",
        fixture("flexolmo_tiny_optout2")
    ))
    .unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &["logits", "--model", m.to_str().unwrap(), "--ids", "1,2"],
        "safetensors",
    );
    // A corrupt config.
    std::fs::write(m.join("config.json"), "{ not json").unwrap();
    assert_clean_error(
        &["logits", "--model", m.to_str().unwrap(), "--ids", "1,2"],
        "config",
    );
    // An expert artifact that is not one.
    assert_clean_error(
        &[
            "merge",
            "--public",
            &fixture("olmo2_tiny_bf16"),
            "--experts",
            m.join("config.json").to_str().unwrap(),
            "--out",
            fresh,
        ],
        "not a valid expert artifact",
    );
    // A malformed merge-time bias offset is refused before anything is read.
    assert_clean_error(
        &[
            "merge",
            "--public",
            ds,
            "--experts",
            ds,
            "--out",
            fresh,
            "--bias-offset",
            "math=-1,x",
        ],
        "'x' is not a finite number",
    );
    // Expert-training settings are checked before anything is read.
    let expert = |extra: &[&str]| {
        let mut args = vec![
            "train-expert",
            "--public",
            ds,
            "--data",
            ds,
            "--name",
            "x",
            "--out",
            fresh,
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |extra: &[&str], needle: &str| {
        let args = expert(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_error(&refs, needle);
    };
    run(&["--public-anchor", "1"], "needs --public-mix");
    run(
        &["--public-anchor=-1", "--public-mix", "0.25"],
        "finite weight",
    );
    run(&["--public-mix", "1.5"], "--public-mix must be");
    run(
        &[
            "--public-anchor",
            "1",
            "--public-mix",
            "0.25",
            "--public-anchor-layers",
            "4,-1",
        ],
        "--public-anchor-layers must be finite weights",
    );
    run(
        &["--router-own=-0.3"],
        "--router-own must be a finite weight",
    );
    run(
        &["--router-public", "0.3"],
        "--router-public acts on public rows",
    );
    run(
        &["--expert-loudness=-1"],
        "--expert-loudness must be a finite weight",
    );
    run(
        &["--bias-init", "nan"],
        "--bias-init must be a finite number",
    );
    run(&["--embed-docs", "0"], "--embed-docs must be at least 1");
    // A demo model that cannot exist is refused before any work is done.
    let demo_dir = tmp("demo-shape");
    let demo_out = demo_dir.join("w");
    let demo_out = demo_out.to_str().unwrap();
    assert_clean_error(
        &["demo", "--quick", "--out", demo_out, "--hidden", "130"],
        "must be even for RoPE",
    );
    assert_clean_error(
        &[
            "demo",
            "--quick",
            "--out",
            demo_out,
            "--layers",
            "3",
            "--public-anchor-layers",
            "1,2",
        ],
        "2 public-anchor layer weights for 3 layers",
    );
    for (setting, needle) in [
        ("--expert-steps=0", "--expert-steps must be at least 1"),
        ("--public-mix=1", "--public-mix must be in [0, 1)"),
        (
            "--public-anchor=-1",
            "--public-anchor must be a finite weight",
        ),
    ] {
        assert_clean_error(&["demo", "--quick", "--out", demo_out, setting], needle);
    }
    assert!(!demo_dir.join("w").join("corpus").exists());
    assert_clean_error(
        &["demo", "--quick", "--out", demo_out, "--top-k", "5"],
        "--top-k 5 must be at most the number of experts (4",
    );
    // A partial fine-tune that names no parameter is refused before any data is read.
    assert_clean_error(
        &[
            "finetune",
            "--public",
            &fixture("olmo2_tiny_bf16"),
            "--data",
            ds,
            "--out",
            fresh,
            "--only",
            "no_such_weight",
        ],
        "no parameter of",
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn out_of_range_ids_and_bad_selections() {
    let model = fixture("flexolmo_tiny");
    assert_clean_error(
        &["logits", "--model", &model, "--ids", "1,96"],
        "token id 96 is out of range",
    );
    assert_clean_error(
        &["logits", "--model", &model, "--ids", "1,x"],
        "'x' is not a token id",
    );
    assert_clean_error(
        &["logits", "--model", &model, "--ids", "1,,2"],
        "'' is not a token id",
    );
    // Benchmark size lists are checked before any device is opened.
    assert_clean_error(
        &["bench", "attention-decode", "--batch", "1,x"],
        "--batch: 'x' is not a size",
    );
    assert_clean_error(
        &["bench", "attention", "--seq", "1024,,2048"],
        "--seq: '' is not a size",
    );
    assert_clean_error(
        &["logits", "--model", &model, "--ids", "1", "--exclude", "7"],
        "no expert '7'",
    );
    assert_clean_error(
        &[
            "logits",
            "--model",
            &model,
            "--ids",
            "1",
            "--exclude",
            "0,1,2,3",
        ],
        "leaves no expert",
    );
    assert_clean_error(
        &[
            "generate",
            "--model",
            &fixture("olmo2_tiny_bf16"),
            "--ids",
            "1",
            "--exclude",
            "0",
        ],
        "dense model",
    );
    assert_clean_error(
        &[
            "bench",
            "train",
            "--config",
            &format!("{model}/config.json"),
            "--device",
            "tpu",
        ],
        "invalid value 'tpu' for '--device",
    );
    assert_clean_error(
        &[
            "extract",
            "--model",
            &fixture("flexolmo_tiny"),
            "--data",
            "no-such-data-dir",
            "--max-new",
            "64",
        ],
        "no-such-data-dir",
    );
    for (flag, value, needle) in [
        ("--docs", "0", "at least one document"),
        ("--samples", "0", "at least one sample"),
        ("--threshold", "1.5", "threshold must be in [0, 1]"),
        ("--max-new", "4000", "positions"),
    ] {
        assert_clean_error(
            &[
                "extract",
                "--model",
                &fixture("flexolmo_tiny"),
                "--data",
                &fixture("flexolmo_tiny"),
                flag,
                value,
            ],
            needle,
        );
    }
    // DP-SGD settings are checked before any file is read.
    for (flag, value) in [("--dp-noise", "0"), ("--dp-clip", "0"), ("--dp-delta", "2")] {
        let mut args = vec![
            "train-expert",
            "--public",
            "missing",
            "--data",
            "missing",
            "--name",
            "x",
            "--out",
            "x.safetensors",
            flag,
            value,
        ];
        if flag != "--dp-noise" {
            args.extend(["--dp-noise", "1"]);
        }
        assert_clean_error(&args, &flag[2..]);
    }
    let out = std::env::temp_dir().join("flexrun-cli-demo-device");
    assert_clean_error(
        &[
            "demo",
            "--quick",
            "--device",
            "tpu",
            "--out",
            out.to_str().unwrap(),
        ],
        "invalid value 'tpu' for '--device",
    );
    // Without a GPU (CI), --device cuda is a one-line error, not a panic.
    if flexrun::backend::cuda::Device::new(0).is_err() {
        assert_clean_error(
            &[
                "logits",
                "--model",
                &fixture("flexolmo_tiny"),
                "--ids",
                "1,2",
                "--device",
                "cuda",
            ],
            "--device cuda",
        );
        // Training commands too, before any work.
        let dir = std::env::temp_dir().join("flexrun-cli-train-device");
        let out = dir.join("x.safetensors");
        for cmd in [
            vec![
                "train-expert",
                "--public",
                "missing-public",
                "--data",
                "missing-data",
                "--name",
                "x",
                "--out",
                out.to_str().unwrap(),
                "--device",
                "cuda",
            ],
            vec![
                "router-tune",
                "--model",
                "missing-model",
                "--data",
                "missing-data",
                "--out",
                dir.to_str().unwrap(),
                "--device",
                "cuda",
            ],
        ] {
            assert_clean_error(&cmd, "--device cuda");
        }
    }
}

#[test]
fn logits_and_opt_out_from_the_command_line() {
    let (code, out, err) = flexrun(&[
        "logits",
        "--model",
        &fixture("flexolmo_tiny"),
        "--ids",
        "3,17,42",
        "--exclude",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].as_array().unwrap().len(), 96);
    let (_, direct, _) = flexrun(&[
        "logits",
        "--model",
        &fixture("flexolmo_tiny_optout2"),
        "--ids",
        "3,17,42",
        "--json",
    ]);
    assert_eq!(
        out, direct,
        "--exclude 2 equals the checkpoint without expert 2"
    );
}

/// A reader that stops early (`flexrun logits ... | head -c 10`) ends flexrun quietly, as it
/// would any Unix tool: no panic, no backtrace.
#[test]
fn closed_stdout_is_not_a_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let ids: Vec<String> = (0..64).map(|i| (i % 90).to_string()).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flexrun"))
        .args([
            "logits",
            "--model",
            &fixture("flexolmo_tiny"),
            "--ids",
            &ids.join(","),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe's read end is closed here; the rest of the output has nowhere to go.
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "flexrun panicked on a closed stdout: {err}"
    );
}

/// `bench decode` on the CPU: prefill and per-token throughput of a tiny model, as JSON.
#[test]
fn bench_decode_reports_throughput() {
    let (code, out, err) = flexrun(&[
        "bench",
        "decode",
        "--config",
        &format!("{}/config.json", fixture("flexolmo_tiny")),
        "--batch",
        "2",
        "--prompt",
        "5",
        "--new-tokens",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["batch"], 2);
    assert_eq!(v["new_tokens"], 3);
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "step_ms",
        "weight_bytes_per_step",
        "kv_bytes_per_step",
        "achieved_gb_per_s",
        "copy_gb_per_s",
        "read_gb_per_s",
        "roofline_fraction",
    ] {
        let x = v[key].as_f64().unwrap();
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    assert!(v["device"].as_str().unwrap().starts_with("cpu"));
    // The tiny fixture is a MoE: the CPU step reports the experts it used.
    assert_eq!(v["experts_hit_measured"], true);
    let hit = v["experts_hit"].as_f64().unwrap();
    assert!((1.0..=4.0).contains(&hit), "{hit}");
    // A checkpoint, and a config with fewer layers.
    let (code, out, err) = flexrun(&[
        "bench",
        "decode",
        "--model",
        &fixture("flexolmo_tiny"),
        "--batch",
        "1",
        "--prompt",
        "3",
        "--new-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (code, out, err) = flexrun(&[
        "bench",
        "decode",
        "--config",
        &format!("{}/config.json", fixture("flexolmo_tiny")),
        "--layers",
        "1",
        "--batch",
        "1",
        "--prompt",
        "3",
        "--new-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let one: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        one["params"].as_u64() < m["params"].as_u64(),
        "{one} vs {m}"
    );
    assert_clean_error(
        &[
            "bench",
            "decode",
            "--model",
            &fixture("flexolmo_tiny"),
            "--layers",
            "1",
        ],
        "--config",
    );
    assert_clean_error(
        &["bench", "decode", "--config", "/nonexistent.json"],
        "nonexistent",
    );
}

/// `bench train --expert` on the CPU: an expert-training step against a dense public config
/// (the upcycled model holds the copy's parameters too); an MoE config is a one-line error.
#[test]
fn bench_train_expert_reports_throughput() {
    let dense = format!("{}/config.json", fixture("olmo2_tiny_bf16"));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench", "train", "--config", &dense, "--batch", "4", "--seq", "16", "--steps", "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = flexrun(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let (full, expert) = (run(&[]), run(&["--expert"]));
    let p = |v: &serde_json::Value| v["params"].as_u64().unwrap();
    // One more FFN per layer (2 x 3 x 64 x 48) and two router rows and a bias per layer.
    assert_eq!(p(&expert), p(&full) + 2 * (3 * 64 * 48 + 2 * 64 + 1));
    let t = expert["tokens_per_s"].as_f64().unwrap();
    assert!(t.is_finite() && t > 0.0, "tokens_per_s = {t}");
    assert_clean_error(
        &[
            "bench",
            "train",
            "--expert",
            "--config",
            &format!("{}/config.json", fixture("flexolmo_tiny")),
        ],
        "dense",
    );
    let cfg = format!("{}/config.json", fixture("flexolmo_tiny"));
    for setting in ["--batch=0", "--seq=0"] {
        assert_clean_error(
            &["bench", "train", "--config", &cfg, setting],
            "--batch, --seq and --steps must be positive",
        );
    }
}

/// A model meets data or settings it was not made for, on a finished quick demo: data
/// tokenized with another tokenizer, a generation longer than the model's positions (refused
/// before the prompt is echoed), and a resume with other settings (the error names them).
#[test]
fn mismatched_data_and_settings() {
    let d = tmp("mismatch");
    let w = d.join("w");
    let ws = w.to_str().unwrap();
    let (code, _, err) = flexrun(&["demo", "--quick", "--out", ws]);
    assert_eq!(code, 0, "{err}");
    let p = |rel: &str| w.join(rel).to_str().unwrap().to_string();
    let corpus = p("corpus/code/train.jsonl");
    let tok2 = d.join("tok2.json");
    let other = d.join("code-other-tokenizer");
    for args in [
        vec!["tokenizer", "train", "--input", &corpus, "--vocab", "300"],
        vec!["data", "prepare", "--input", &corpus],
    ] {
        let mut args = args;
        let (tok2, other) = (tok2.to_str().unwrap(), other.to_str().unwrap());
        if args[0] == "tokenizer" {
            args.extend(["--out", tok2]);
        } else {
            args.extend(["--tokenizer", tok2, "--out", other]);
        }
        let (code, _, err) = flexrun(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    let other = other.to_str().unwrap();
    let merged = p("models/flexolmo-main");
    let domain = format!("code={other}");
    for args in [
        vec![
            "eval", "--model", &merged, "--data", &domain, "--tasks", "0",
        ],
        vec![
            "analyze-routing",
            "--model",
            &merged,
            "--data",
            &domain,
            "--out",
            &p("routing-other.svg"),
        ],
        vec![
            "extract",
            "--model",
            &merged,
            "--data",
            other,
            "--docs",
            "1",
            "--max-new",
            "32",
        ],
        vec![
            "finetune",
            "--public",
            &p("models/public"),
            "--data",
            other,
            "--out",
            &p("models/dense-other"),
            "--steps",
            "1",
        ],
    ] {
        assert_clean_error(
            &args,
            "was tokenized with a different tokenizer than the model",
        );
    }
    // The same data with the model's own tokenizer passes.
    let (code, _, err) = flexrun(&[
        "eval",
        "--model",
        &merged,
        "--data",
        &format!("code={}", p("data/code")),
        "--tasks",
        "0",
    ]);
    assert_eq!(code, 0, "{err}");

    let args = [
        "generate",
        "--model",
        &merged,
        "--prompt",
        "def",
        "--max-new-tokens",
        "99999",
    ];
    assert_clean_error(&args, "exceed max_position_embeddings");
    let (_, out, _) = flexrun(&args);
    assert_eq!(out, "", "nothing is printed before the error");
    // Sampling and ensemble settings that mean nothing are refused, before any output.
    for (setting, needle) in [
        (
            "--temperature=-1",
            "temperature must be a finite number >= 0",
        ),
        (
            "--temperature=inf",
            "temperature must be a finite number >= 0",
        ),
        ("--top-p=0", "top-p must be in (0, 1]"),
        ("--top-p=1.5", "top-p must be in (0, 1]"),
    ] {
        let args = ["generate", "--model", &merged, "--prompt", "def", setting];
        assert_clean_error(&args, needle);
        assert_eq!(flexrun(&args).1, "", "{setting}: nothing is printed");
    }
    let (pub_data, out) = (p("data/public"), d.join("bad-pretrain"));
    for (setting, needle) in [
        ("--clip=-1", "--clip must be a finite norm >= 0"),
        (
            "--weight-decay=-1",
            "--weight-decay must be a finite number >= 0",
        ),
    ] {
        let args = [
            "pretrain",
            "--data",
            &pub_data,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "1",
            setting,
        ];
        assert_clean_error(&args, needle);
    }
    let expert = p("experts/main/code.safetensors");
    assert_clean_error(
        &[
            "merge",
            "--public",
            &p("models/public"),
            "--experts",
            &expert,
            "--out",
            out.to_str().unwrap(),
            "--top-k",
            "3",
        ],
        "--top-k 3 must be between 1 and the number of experts (2)",
    );
    let (dense, data) = (p("models/dense-code"), format!("code={}", p("data/code")));
    // Fewer tokens than one window: an error, not a loss of 0.
    assert_clean_error(
        &[
            "eval", "--model", &merged, "--data", &data, "--tasks", "0", "--tokens", "8",
        ],
        "code: no window of",
    );
    let btm = format!("{dense},{dense}");
    for (setting, needle) in [
        (
            "--btm-temperature=0",
            "BTM temperature must be a finite number > 0",
        ),
        ("--btm-top-k=0", "at least one model per position"),
    ] {
        assert_clean_error(
            &[
                "eval", "--btm", &btm, "--data", &data, "--tasks", "0", setting,
            ],
            needle,
        );
    }

    // The quick demo pretrained its public model at batch 4 x seq 32.
    let public_cfg = p("models/public/config.json");
    assert_clean_error(
        &[
            "pretrain",
            "--data",
            &p("data/public"),
            "--out",
            &p("models/public"),
            "--config",
            &public_cfg,
            "--batch",
            "2",
            "--seq",
            "32",
            "--warmup",
            "1",
            "--steps",
            "20",
            "--resume",
        ],
        "differ from the checkpoint's (batch now 2, checkpoint 4)",
    );

    // An expert's run resumed against another public model (of the same shape) is refused: its
    // checkpoint holds the first public model's weights.
    let other_public = d.join("other-public");
    let other_public = other_public.to_str().unwrap();
    let (code, _, err) = flexrun(&[
        "pretrain",
        "--data",
        &p("data/public"),
        "--out",
        other_public,
        "--config",
        &public_cfg,
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq",
        "16",
        "--seed",
        "5",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    std::fs::copy(
        p("models/public/tokenizer.json"),
        d.join("other-public/tokenizer.json"),
    )
    .unwrap();
    let expert = d.join("e.safetensors");
    let expert = expert.to_str().unwrap();
    let (code_data, public_data) = (p("data/code"), p("data/public"));
    let train = |public: &str, steps: &str, resume: bool| {
        let mut args = vec![
            "train-expert",
            "--public",
            public,
            "--data",
            &code_data,
            "--public-data",
            &public_data,
            "--name",
            "c",
            "--out",
            expert,
            "--steps",
            steps,
            "--batch",
            "2",
            "--seq",
            "16",
            "--save-every",
            "2",
            "--quiet",
        ];
        if resume {
            args.push("--resume");
        }
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let corpus_public = p("models/public");
    let args = train(&corpus_public, "2", false);
    let (code, _, err) = flexrun(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let args = train(other_public, "4", true);
    assert_clean_error(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "its checkpoint was written for other inputs (public_hash now",
    );
    // Nor on another owner's data.
    let mut args = train(&corpus_public, "4", true);
    let i = args.iter().position(|a| a == "--data").unwrap();
    args[i + 1] = p("data/math");
    assert_clean_error(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "its checkpoint was written for other inputs (data now",
    );
    let args = train(&corpus_public, "4", true);
    let (code, _, err) = flexrun(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "the same public model and data resume: {err}");
    // The expert's checkpoint holds its trained tensors only (the frozen public weights are
    // rebuilt from --public and checked by hash).
    let ck = d.join("e.run/checkpoint");
    assert!(ck.join("trained.safetensors").exists());
    assert!(!ck.join("model.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn compare_splits_the_gap_to_a_reference_by_token() {
    let d = tmp("compare");
    let w = d.join("w");
    let (code, _, err) = flexrun(&["demo", "--quick", "--out", w.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let p = |rel: &str| w.join(rel).to_str().unwrap().to_string();
    let json = d.join("gap.json");
    let (code, out, err) = flexrun(&[
        "compare",
        "--model",
        &p("models/flexolmo-main"),
        "--reference",
        &p("models/dense-code"),
        "--data",
        &p("data/code"),
        "--public",
        &p("data/public"),
        "--top",
        "5",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| target token |"), "{out}");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    // The model's mean loss is eval's, and the parts add up to the whole.
    let eval_json = d.join("eval.json");
    let (code, _, err) = flexrun(&[
        "eval",
        "--model",
        &p("models/flexolmo-main"),
        "--data",
        &format!("code={}", p("data/code")),
        "--tasks",
        "0",
        "--json",
        eval_json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&eval_json).unwrap()).unwrap();
    assert!((f(&g["model_loss"]) - f(&e["scores"][0]["loss"])).abs() < 1e-9);
    let buckets = g["by_public_count"].as_array().unwrap();
    assert_eq!(buckets.len(), 4);
    let n: u64 = buckets
        .iter()
        .map(|b| b["positions"].as_u64().unwrap())
        .sum();
    assert_eq!(n, g["positions"].as_u64().unwrap());
    let share: f64 = buckets.iter().map(|b| f(&b["share"])).sum();
    assert!((share - 1.0).abs() < 1e-9, "shares sum to {share}");
    let mean = |key: &str| {
        buckets
            .iter()
            .map(|b| f(&b[key]) * b["positions"].as_f64().unwrap())
            .sum::<f64>()
            / n as f64
    };
    assert!((mean("model_loss") - f(&g["model_loss"])).abs() < 1e-9);
    assert!((mean("reference_loss") - f(&g["reference_loss"])).abs() < 1e-9);
    let tokens = g["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    let excess = |t: &serde_json::Value| {
        (f(&t["model_loss"]) - f(&t["reference_loss"])) * t["positions"].as_f64().unwrap()
    };
    assert!(tokens.windows(2).all(|w| excess(&w[0]) >= excess(&w[1])));

    // Against itself there is no gap; a model of another vocabulary is refused.
    let (code, out, err) = flexrun(&[
        "compare",
        "--model",
        &p("models/dense-code"),
        "--reference",
        &p("models/dense-code"),
        "--data",
        &p("data/code"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gap +0.0000 (+0.0%)"), "{out}");
    assert_clean_error(
        &[
            "compare",
            "--model",
            &p("models/dense-code"),
            "--reference",
            &fixture("flexolmo_tiny"),
            "--data",
            &p("data/code"),
        ],
        "tokens",
    );
}

/// The BTX and prompt-routing baselines from the command line: `btx` writes a merged model
/// whose experts are the public and dense FFNs (it generates, and says strict opt-out does not
/// hold), `eval --route` scores a routed ensemble; bad settings are one-line errors.
#[test]
fn btx_and_prompt_routing_baselines() {
    let d = tmp("btx");
    let w = d.join("w");
    let (code, _, err) = flexrun(&["demo", "--quick", "--out", w.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let p = |rel: &str| w.join(rel).to_str().unwrap().to_string();
    let out = d.join("btx");
    let out_s = out.to_str().unwrap();
    let (public, code_m, math_m) = (
        p("models/public"),
        p("models/dense-code"),
        p("models/dense-math"),
    );
    let (dc, dm) = (format!("code={code_m}"), format!("math={math_m}"));
    let pdata = p("data/public");
    let base = [
        "btx", "--public", &public, "--data", &pdata, "--steps", "3", "--batch", "2", "--seq",
        "16", "--quiet",
    ];
    let mut ok: Vec<&str> = base.to_vec();
    ok.extend(["--dense", &dc, &dm, "--out", out_s]);
    let (code, stdout, err) = flexrun(&ok);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("top-3"), "{stdout}");
    let manifest = std::fs::read_to_string(out.join("flexolmo.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let names: Vec<&str> = m["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["public", "code", "math"]);
    assert_eq!(m["strict_opt_out"], false);
    let (code, stdout, err) = flexrun(&[
        "generate",
        "--model",
        out_s,
        "--ids",
        "5,6,7",
        "--max-new-tokens",
        "4",
        "--exclude",
        "math",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!stdout.trim().is_empty());
    let other = d.join("btx2");
    let other_s = other.to_str().unwrap();
    for (extra, needle) in [
        (vec!["--dense", &dc, &dc, "--out", other_s], "given twice"),
        (vec!["--dense", "public=x", "--out", other_s], "reserved"),
        (
            vec!["--dense", &dc, "--top-k", "3", "--out", other_s],
            "--top-k 3",
        ),
        (vec!["--dense", "code", "--out", other_s], "NAME=DIR"),
        (vec!["--dense", &dc, "--out", &public], "--out"),
    ] {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        assert_clean_error(&args, needle);
    }
    let route = format!("public={public},code={code_m},math={math_m}");
    let (dp, dcd, dmd) = (
        format!("public={pdata}"),
        format!("code={}", p("data/code")),
        format!("math={}", p("data/math")),
    );
    let (code, stdout, err) = flexrun(&[
        "eval",
        "--route",
        &route,
        "--data",
        &dp,
        &dcd,
        &dmd,
        "--tokens",
        "64",
        "--seq",
        "16",
        "--tasks",
        "0",
        "--route-queries",
        "4",
        "--route-prompt",
        "8",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("| prompt routing |"), "{stdout}");
    assert_clean_error(
        &["eval", "--route", &format!("code={code_m}"), "--data", &dcd],
        "named public",
    );
    assert_clean_error(
        &["eval", "--route", &route, "--data", &dp, &dcd],
        "no --data domain named math",
    );
    assert_clean_error(
        &["eval", "--route", &route, "--model", &public, "--data", &dp],
        "cannot be used with",
    );
}
