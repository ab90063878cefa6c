//! Hostile and careless input, one table row per case: each must end in a one-line error with
//! exit status 1 (never a panic, an abort, a hang or a backtrace) before any long work, or, for
//! races and interruptions, leave the old state or the new one, never a mix.
//!
//! The cases share one `demo --quick` working directory (a public model, prepared data, expert
//! artifacts, a merged model) and the fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flexrun")
}

/// Runs flexrun with a 120 s limit (a hang fails the case instead of the whole run).
fn flexrun(args: &[String]) -> (i32, String, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{args:?} hangs (killed after 120 s)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flexrun-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A finished `demo --quick`, made once for every test of this file.
fn demo() -> &'static Path {
    static DEMO: OnceLock<PathBuf> = OnceLock::new();
    DEMO.get_or_init(|| {
        let w = tmp("demo");
        let (code, _, err) = flexrun(&["demo".into(), "--quick".into(), "--out".into(), s(&w)]);
        assert_eq!(code, 0, "demo --quick: {err}");
        w
    })
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Holds the lock another flexrun process would hold while writing `target`.
fn hold_lock(target: &Path) -> std::fs::File {
    use std::os::unix::io::AsRawFd;
    let parent = target.parent().unwrap();
    std::fs::create_dir_all(parent).unwrap();
    let lock = parent.join(format!(
        ".{}.lock",
        target.file_name().unwrap().to_string_lossy()
    ));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock)
        .unwrap();
    // SAFETY: flock on a descriptor owned here.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    f
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// A part of the one-line error.
    needle: &'static str,
}

fn case(name: &'static str, args: &[&str], needle: &'static str) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
        needle,
    }
}

/// Runs every row; reports every failing row by name, not only the first.
fn run_table(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in &cases {
        let (code, _, err) = flexrun(&c.args);
        let one_line = err.trim_end().lines().count() == 1;
        let clean = !err.contains("panicked") && !err.contains("backtrace");
        if code != 1 || !one_line || !clean || !err.contains(c.needle) {
            failures.push(format!(
                "[{}] exit {code}, expected 1 and one line containing {:?}; stderr: {}",
                c.name, c.needle, err
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn write_json(p: &Path, v: &serde_json::Value) {
    std::fs::write(p, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Causes 1, 4, 6, 11, 12: files a checkpoint or a dataset names.
#[test]
fn hostile_checkpoints_and_datasets() {
    let d = tmp("files");
    let w = demo();
    let mut cases = Vec::new();

    // 1. Shard names that leave the model directory: a parent path, an absolute path, a link.
    std::fs::write(d.join("outside.safetensors"), b"secret").unwrap();
    for (name, shard) in [
        ("index: ../ shard", "../outside.safetensors".to_string()),
        ("index: absolute shard", s(&d.join("outside.safetensors"))),
        (
            "index: shard in a subdirectory",
            "sub/x.safetensors".to_string(),
        ),
    ] {
        let m = d.join(format!("trav-{}", cases.len()));
        copy_dir(&fixture("flexolmo_tiny"), &m);
        let idx = m.join("model.safetensors.index.json");
        let mut v = read_json(&idx);
        let map = v["weight_map"].as_object_mut().unwrap();
        let first = map.keys().next().unwrap().clone();
        map.insert(first, shard.into());
        write_json(&idx, &v);
        cases.push(Case {
            name,
            args: vec![
                "logits".into(),
                "--model".into(),
                s(&m),
                "--ids".into(),
                "1".into(),
            ],
            needle: "is not a plain file name",
        });
    }
    let m = d.join("trav-link");
    copy_dir(&fixture("flexolmo_tiny"), &m);
    std::fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        d.join("outside.safetensors"),
        m.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    cases.push(case(
        "index: shard linked outside",
        &["logits", "--model", &s(&m), "--ids", "1"],
        "leaves the model directory",
    ));

    // 4. Sizes in files, refused before anything is allocated.
    let m = d.join("maxpos");
    copy_dir(&fixture("olmo2_tiny_bf16"), &m);
    let mut v = read_json(&m.join("config.json"));
    v["max_position_embeddings"] = 1_000_000_000_000u64.into();
    write_json(&m.join("config.json"), &v);
    cases.push(case(
        "config: max_position_embeddings 10^12",
        &["logits", "--model", &s(&m), "--ids", "1"],
        "max_position_embeddings = 1000000000000 is larger than flexrun allows",
    ));
    let data = d.join("bigvocab");
    copy_dir(&w.join("data/public"), &data);
    let mut v = read_json(&data.join("meta.json"));
    v["vocab_size"] = 1_000_000_000u64.into();
    write_json(&data.join("meta.json"), &v);
    cases.push(case(
        "meta: vocab_size 10^9",
        &[
            "pretrain",
            "--data",
            &s(&data),
            "--out",
            &s(&d.join("o1")),
            "--steps",
            "1",
        ],
        "vocab_size = 1000000000 is larger than flexrun allows",
    ));

    // 6. A FIFO where a file is expected, and a device as an expert artifact.
    let m = d.join("fifo-config");
    copy_dir(&fixture("olmo2_tiny_bf16"), &m);
    std::fs::remove_file(m.join("config.json")).unwrap();
    mkfifo(&m.join("config.json"));
    cases.push(case(
        "FIFO as config.json",
        &["logits", "--model", &s(&m), "--ids", "1"],
        "not a regular file",
    ));
    let m = d.join("fifo-shard");
    copy_dir(&fixture("olmo2_tiny_bf16"), &m);
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    mkfifo(&m.join("model.safetensors"));
    cases.push(case(
        "FIFO as the weights",
        &["logits", "--model", &s(&m), "--ids", "1"],
        "not a regular file",
    ));
    let data = d.join("fifo-data");
    copy_dir(&w.join("data/code"), &data);
    std::fs::remove_file(data.join("train.bin")).unwrap();
    mkfifo(&data.join("train.bin"));
    cases.push(case(
        "FIFO as a token shard",
        &[
            "eval",
            "--model",
            &s(&w.join("models/public")),
            "--data",
            &format!("code={}", s(&data)),
            "--tasks",
            "0",
        ],
        "not a regular file",
    ));
    let fifo_tok = d.join("fifo-tok.json");
    mkfifo(&fifo_tok);
    cases.push(case(
        "FIFO as a tokenizer",
        &[
            "data",
            "prepare",
            "--input",
            &s(&w.join("corpus/code")),
            "--tokenizer",
            &s(&fifo_tok),
            "--out",
            &s(&d.join("o2")),
        ],
        "not a regular file",
    ));
    let fifo_txt = d.join("fifo.txt");
    mkfifo(&fifo_txt);
    cases.push(case(
        "FIFO as a text input",
        &[
            "data",
            "prepare",
            "--input",
            &s(&fifo_txt),
            "--tokenizer",
            &s(&w.join("tokenizer.json")),
            "--out",
            &s(&d.join("o3")),
        ],
        "not a regular file",
    ));
    cases.push(case(
        "/dev/zero as an expert artifact",
        &[
            "merge",
            "--public",
            &s(&w.join("models/public")),
            "--experts",
            "/dev/zero",
            "--out",
            &s(&d.join("o4")),
        ],
        "not a regular file",
    ));

    // 11. Non-finite weights and a nonsensical epsilon.
    let m = d.join("nan");
    {
        use flexrun::model::checkpoint;
        let mut model = checkpoint::load(&fixture("flexolmo_tiny_optout2")).unwrap();
        let id = model
            .params
            .id("model.layers.1.self_attn.v_proj.weight")
            .unwrap();
        model.params.params[id].value.data_mut()[5] = f32::NAN;
        checkpoint::save(&model, &m, flexrun::tensor::DType::F32).unwrap();
    }
    cases.push(case(
        "NaN in a weight",
        &["logits", "--model", &s(&m), "--ids", "1"],
        "tensor model.layers.1.self_attn.v_proj.weight holds a non-finite value",
    ));
    let m = d.join("eps");
    copy_dir(&fixture("olmo2_tiny_bf16"), &m);
    let mut v = read_json(&m.join("config.json"));
    v["rms_norm_eps"] = 1e300.into();
    write_json(&m.join("config.json"), &v);
    cases.push(case(
        "rms_norm_eps 1e300",
        &["logits", "--model", &s(&m), "--ids", "1"],
        "rms_norm_eps must be in [1e-12, 1]",
    ));

    // 12. A hand-edited manifest naming one expert twice (or a hostile name).
    let merged = w.join("models/flexolmo-main");
    for (name, edit, needle) in [
        ("manifest: duplicate expert name", 2usize, "is listed twice"),
        ("manifest: expert name with a comma", 1, "is not valid"),
        (
            "manifest: expert 0 is not public",
            0,
            "expert 0 must be 'public'",
        ),
    ] {
        let m = d.join(format!("manifest-{edit}"));
        copy_dir(&merged, &m);
        let mut v = read_json(&m.join("flexolmo.json"));
        let experts = v["experts"].as_array_mut().unwrap();
        match edit {
            2 => {
                let n = experts[1]["name"].clone();
                experts[2]["name"] = n;
            }
            1 => experts[1]["name"] = "x,y".into(),
            _ => experts[0]["name"] = "shared".into(),
        }
        write_json(&m.join("flexolmo.json"), &v);
        cases.push(Case {
            name,
            args: vec![
                "logits".into(),
                "--model".into(),
                s(&m),
                "--ids".into(),
                "1".into(),
                "--exclude".into(),
                "code".into(),
            ],
            needle,
        });
    }
    run_table(cases);
}

/// Causes 4, 7, 10, 13, 14: arguments, refused before any work.
#[test]
fn careless_arguments() {
    let d = tmp("args");
    let w = demo();
    let public = s(&w.join("models/public"));
    let code_data = s(&w.join("data/code"));
    let pub_data = s(&w.join("data/public"));
    let expert = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train-expert",
            "--public",
            &public,
            "--data",
            &code_data,
            "--name",
            name,
            "--out",
            &s(&d.join("e.safetensors")),
            "--steps",
            "1",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let pretrain = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["pretrain", "--data", &pub_data, "--out", &s(&d.join("p"))]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        if !extra.contains(&"--steps") {
            a.extend(["--steps".to_string(), "1".to_string()]);
        }
        a
    };
    let cases = vec![
        // 4. Sizes from arguments.
        Case {
            name: "pretrain --batch 10^9",
            args: pretrain(&["--batch", "1000000000"]),
            needle: "--batch = 1000000000 is larger than flexrun allows",
        },
        Case {
            name: "pretrain --batch 10^5 x --seq 1024",
            args: pretrain(&["--batch", "100000", "--seq", "1024", "--max-pos", "1024"]),
            needle: "GiB of memory",
        },
        Case {
            name: "pretrain --hidden 10^9",
            args: pretrain(&["--hidden", "1000000000"]),
            needle: "hidden_size = 1000000000 is larger than flexrun allows",
        },
        Case {
            name: "pretrain --hidden 60000 --layers 64",
            args: pretrain(&["--hidden", "60000", "--layers", "64", "--heads", "60"]),
            needle: "GiB of memory",
        },
        case(
            "tokenizer --vocab 10^9",
            &[
                "tokenizer",
                "train",
                "--input",
                &s(&w.join("corpus/public")),
                "--vocab",
                "1000000000",
                "--out",
                &s(&d.join("t.json")),
            ],
            "--vocab = 1000000000 is larger than flexrun allows",
        ),
        case(
            "bench decode --batch 10^9",
            &[
                "bench",
                "decode",
                "--config",
                &s(&fixture("olmo2_tiny_bf16/config.json")),
                "--batch",
                "1000000000",
            ],
            "--batch = 1000000000 is larger than flexrun allows",
        ),
        case(
            "bench decode --new-tokens 10^9",
            &[
                "bench",
                "decode",
                "--config",
                &s(&fixture("olmo2_tiny_bf16/config.json")),
                "--new-tokens",
                "1000000000",
            ],
            "exceed max_position_embeddings",
        ),
        case(
            "bench train --batch 10^9",
            &[
                "bench",
                "train",
                "--config",
                &s(&fixture("olmo2_tiny_bf16/config.json")),
                "--batch",
                "1000000000",
                "--seq",
                "8",
            ],
            "--batch = 1000000000 is larger",
        ),
        // 7. Expert names that cannot be selected later.
        Case {
            name: "name with a comma",
            args: expert("x,y", &[]),
            needle: "expert name \"x,y\" is not valid",
        },
        Case {
            name: "name with =",
            args: expert("k=v", &[]),
            needle: "is not valid",
        },
        Case {
            name: "name with a newline",
            args: expert("a\nb", &[]),
            needle: "is not valid",
        },
        Case {
            name: "name public",
            args: expert("public", &[]),
            needle: "reserved",
        },
        Case {
            name: "name of digits",
            args: expert("12", &[]),
            needle: "is not valid",
        },
        Case {
            name: "empty name",
            args: expert("", &[]),
            needle: "is not valid",
        },
        // 10. Hyperparameters that cannot train, and empty data.
        Case {
            name: "--beta1 1.5",
            args: pretrain(&["--beta1", "1.5"]),
            needle: "--beta1 must be in [0, 1)",
        },
        Case {
            name: "--beta2 1",
            args: pretrain(&["--beta2", "1"]),
            needle: "--beta2 must be in [0, 1)",
        },
        Case {
            name: "--beta1 -0.1",
            args: pretrain(&["--beta1=-0.1"]),
            needle: "--beta1 must be in [0, 1)",
        },
        Case {
            name: "--min-lr-ratio 2",
            args: pretrain(&["--min-lr-ratio", "2"]),
            needle: "--min-lr-ratio must be in [0, 1]",
        },
        Case {
            name: "--steps 0",
            args: pretrain(&["--steps", "0"]),
            needle: "--steps must be at least 1",
        },
        Case {
            name: "--z-loss NaN",
            args: pretrain(&["--z-loss", "NaN"]),
            needle: "--z-loss must be a finite weight",
        },
        Case {
            name: "train-expert --beta2 1",
            args: expert("code", &["--beta2", "1"]),
            needle: "--beta2 must be in [0, 1)",
        },
        case(
            "data synth --docs 0",
            &["data", "synth", "--out", &s(&d.join("c")), "--docs", "0"],
            "--docs must be at least 1",
        ),
        // 13. An artifact path that is a directory, refused before training.
        case(
            "train-expert --out DIR",
            &[
                "train-expert",
                "--public",
                &public,
                "--data",
                &code_data,
                "--name",
                "code",
                "--out",
                &s(&d),
                "--steps",
                "1",
            ],
            "is a directory",
        ),
        // A model written over a directory that holds something else.
        case(
            "merge --out over foreign files",
            &[
                "merge",
                "--public",
                &public,
                "--experts",
                &s(&w.join("experts/main/code.safetensors")),
                "--out",
                &s(&w.join("corpus")),
            ],
            "not a flexrun model",
        ),
        // 14. Argument-parser errors are one line with exit 1 too.
        case(
            "unknown flag",
            &["generate", "--bogus"],
            "unexpected argument '--bogus'",
        ),
        case(
            "missing arguments",
            &["train-expert"],
            "the following required arguments were not provided: --public",
        ),
        case(
            "bad number",
            &["generate", "--model", "x", "--temperature", "abc"],
            "invalid value 'abc'",
        ),
        case("no command", &[], "no command given"),
    ];
    // Each case fails before any work: the whole table runs in seconds.
    let t = Instant::now();
    run_table(cases);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "validation is slow: {:?}",
        t.elapsed()
    );
    assert!(!d.join("e.safetensors").exists() && !d.join("p").join("config.json").exists());
}

/// Causes 2, 3, 8, 9: concurrent writers, stale files, runs that cannot resume exactly.
#[test]
fn races_stale_files_and_resume() {
    let d = tmp("races");
    let w = demo();
    let public = s(&w.join("models/public"));
    let code = s(&w.join("experts/main/code.safetensors"));
    let math = s(&w.join("experts/main/math.safetensors"));
    let out = d.join("merged");
    let merge = |experts: &[&str]| {
        let mut a: Vec<String> = ["merge", "--public", &public, "--out", &s(&out), "--experts"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(experts.iter().map(|x| x.to_string()));
        a
    };
    let mut cases = Vec::new();

    // 2. A merge while another process writes the same --out is refused, leaving the old model.
    let (c, _, e) = flexrun(&merge(&[&code, &math]));
    assert_eq!(c, 0, "{e}");
    let before = std::fs::read(out.join("flexolmo.json")).unwrap();
    let held = hold_lock(&out);
    cases.push(Case {
        name: "concurrent merge into one --out",
        args: merge(&[&code]),
        needle: "is being written by another flexrun process",
    });
    // 8. Two expert trainings with one --out.
    let art = d.join("e.safetensors");
    let held_art = hold_lock(&art);
    cases.push(case(
        "concurrent train-expert into one --out",
        &[
            "train-expert",
            "--public",
            &public,
            "--data",
            &s(&w.join("data/code")),
            "--name",
            "code",
            "--out",
            &s(&art),
            "--steps",
            "1",
        ],
        "is being written by another flexrun process",
    ));
    run_table(std::mem::take(&mut cases));
    drop((held, held_art));
    assert_eq!(std::fs::read(out.join("flexolmo.json")).unwrap(), before);

    // A second merge into the same directory replaces it whole: no file of the first survives.
    std::fs::write(out.join("model-00001-of-00009.safetensors"), b"stale shard").unwrap();
    std::fs::write(out.join(".config.json.tmp4242"), b"leftover").unwrap();
    let (c, _, e) = flexrun(&merge(&[&math]));
    assert_eq!(c, 0, "{e}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "flexolmo.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    let (c, _, e) = flexrun(&[
        "logits".into(),
        "--model".into(),
        s(&out),
        "--ids".into(),
        "1".into(),
        "--exclude".into(),
        "math".into(),
    ]);
    assert_eq!(c, 0, "{e}");
    cases.push(case(
        "the replaced merge has no 'code' expert",
        &[
            "logits",
            "--model",
            &s(&out),
            "--ids",
            "1",
            "--exclude",
            "code",
        ],
        "no expert 'code'",
    ));
    run_table(std::mem::take(&mut cases));

    // 3. A dense model written over a merged one leaves no stale manifest.
    let (c, _, e) = flexrun(&[
        "soup".into(),
        "--models".into(),
        public.clone(),
        "--out".into(),
        s(&out),
    ]);
    assert_eq!(c, 0, "{e}");
    assert!(!out.join("flexolmo.json").exists(), "stale flexolmo.json");
    cases.push(case(
        "no stale manifest after soup",
        &[
            "logits",
            "--model",
            &s(&out),
            "--ids",
            "1",
            "--exclude",
            "math",
        ],
        "is a dense model",
    ));

    // 9. A run directory: a new run over it without --resume is refused; a resume whose
    // optimizer file lost the moments is refused.
    let run = d.join("pre");
    let pretrain = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "pretrain",
            "--data",
            &s(&w.join("data/public")),
            "--out",
            &s(&run),
            "--save-every",
            "1",
            "--batch",
            "2",
            "--seq",
            "16",
            "--quiet",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        if !extra.contains(&"--steps") {
            a.extend(["--steps".to_string(), "2".to_string()]);
        }
        a
    };
    let (c, _, e) = flexrun(&pretrain(&[]));
    assert_eq!(c, 0, "{e}");
    cases.push(Case {
        name: "re-run without --resume",
        args: pretrain(&[]),
        needle: "already holds a training run; pass --resume",
    });
    let opt = run.join("checkpoint/optimizer.safetensors");
    let empty = safetensors::tensor::serialize(
        Vec::<(String, safetensors::tensor::TensorView)>::new(),
        None,
    )
    .unwrap();
    std::fs::write(&opt, empty).unwrap();
    cases.push(Case {
        name: "resume without optimizer moments",
        args: pretrain(&["--resume", "--steps", "3"]),
        needle: "cannot resume exactly",
    });
    run_table(cases);
}

/// A second round of hostile input: sizes hidden in products and sums, loops, expansion, outputs
/// that cannot be written or would overwrite inputs.
#[test]
fn second_round() {
    let d = tmp("round2");
    let w = demo();
    let public = s(&w.join("models/public"));
    let merged = s(&w.join("models/flexolmo-main"));
    let math = s(&w.join("experts/main/math.safetensors"));
    let tok = s(&w.join("tokenizer.json"));
    let max = u64::MAX.to_string();
    let mut cases = Vec::new();
    // Sizes: the RoPE table, a fine-tune's batch, counts, sums that wrap.
    cases.push(case(
        "RoPE table of 2^21 positions x head dim 4096",
        &[
            "pretrain",
            "--data",
            &s(&w.join("data/public")),
            "--out",
            &s(&d.join("p")),
            "--hidden",
            "4096",
            "--heads",
            "1",
            "--layers",
            "1",
            "--intermediate",
            "8",
            "--max-pos",
            "2097152",
            "--steps",
            "1",
        ],
        "max_position_embeddings x head_dim",
    ));
    cases.push(case(
        "finetune --batch 2^20 x --seq 256",
        &[
            "finetune",
            "--public",
            &public,
            "--data",
            &s(&w.join("data/math")),
            "--out",
            &s(&d.join("f")),
            "--steps",
            "1",
            "--batch",
            "1048576",
            "--seq",
            "256",
        ],
        "GiB of memory",
    ));
    cases.push(case(
        "data synth --docs 2^64-1",
        &["data", "synth", "--out", &s(&d.join("c")), "--docs", &max],
        "--docs = 18446744073709551615 is larger",
    ));
    cases.push(case(
        "eval --tasks 10^12",
        &[
            "eval",
            "--model",
            &merged,
            "--data",
            &format!("math={}", s(&w.join("data/math"))),
            "--tasks",
            "1000000000000",
        ],
        "--tasks = 1000000000000 is larger",
    ));
    cases.push(case(
        "extract --docs 10^12",
        &[
            "extract",
            "--model",
            &merged,
            "--data",
            &s(&w.join("data/math")),
            "--docs",
            "1000000000000",
        ],
        "--docs = 1000000000000 is larger",
    ));
    cases.push(case(
        "extract --max-new 2^64-1 (wraps)",
        &[
            "extract",
            "--model",
            &merged,
            "--data",
            &s(&w.join("data/math")),
            "--docs",
            "2",
            "--prefix",
            "1",
            "--max-new",
            &max,
            "--min-new",
            "1",
        ],
        "exceed the model's",
    ));
    cases.push(case(
        "generate --max-new-tokens 2^64-1 (wraps)",
        &[
            "generate",
            "--model",
            &merged,
            "--ids",
            "1,2",
            "--max-new-tokens",
            &max,
        ],
        "exceed max_position_embeddings",
    ));
    cases.push(case(
        "bench train --warmup 2^64-1",
        &[
            "bench",
            "train",
            "--config",
            &s(&fixture("olmo2_tiny_bf16/config.json")),
            "--warmup",
            &max,
            "--batch",
            "1",
            "--seq",
            "8",
        ],
        "--warmup",
    ));
    cases.push(case(
        "--threads 10^8",
        &[
            "--threads",
            "100000000",
            "logits",
            "--model",
            &merged,
            "--ids",
            "3",
        ],
        "--threads = 100000000 is larger",
    ));
    // Configs whose values become 0 or infinity in f32.
    for (name, key, value, needle) in [
        (
            "head_dim 0",
            "head_dim",
            serde_json::json!(0),
            "head_dim must be at least 2",
        ),
        (
            "rope_theta 1e-300",
            "rope_theta",
            serde_json::json!(1e-300),
            "rope_theta must be in [1",
        ),
        (
            "rms_norm_eps 1e-300",
            "rms_norm_eps",
            serde_json::json!(1e-300),
            "rms_norm_eps must be in [1e-12",
        ),
    ] {
        let m = d.join(format!("cfg-{key}"));
        copy_dir(&fixture("olmo2_tiny_bf16"), &m);
        let mut v = read_json(&m.join("config.json"));
        v[key] = value;
        write_json(&m.join("config.json"), &v);
        cases.push(Case {
            name,
            args: vec![
                "logits".into(),
                "--model".into(),
                s(&m),
                "--ids".into(),
                "1".into(),
            ],
            needle,
        });
    }
    // A tokenizer that multiplies text, and one linked from outside the model directory.
    let m = d.join("tok-expand");
    copy_dir(&w.join("models/public"), &m);
    let mut v = read_json(&m.join("tokenizer.json"));
    v["normalizer"] = serde_json::json!({"type": "Replace", "pattern": {"String": "a"}, "content": "b".repeat(100_000)});
    write_json(&m.join("tokenizer.json"), &v);
    cases.push(case(
        "Replace rule of 100 kB",
        &["generate", "--model", &s(&m), "--prompt", "aaaa"],
        "a Replace rule writes 100000 bytes",
    ));
    let m = d.join("tok-link");
    copy_dir(&w.join("models/public"), &m);
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    std::fs::write(d.join("secret.json"), "{}").unwrap();
    std::os::unix::fs::symlink(d.join("secret.json"), m.join("tokenizer.json")).unwrap();
    cases.push(case(
        "tokenizer.json linked outside",
        &[
            "merge",
            "--public",
            &s(&m),
            "--experts",
            &math,
            "--out",
            &s(&d.join("o-link")),
        ],
        "leaves the model directory",
    ));
    // A training log that is a FIFO.
    let run = d.join("fifo-run");
    std::fs::create_dir_all(&run).unwrap();
    mkfifo(&run.join("train_log.jsonl"));
    cases.push(case(
        "FIFO as train_log.jsonl",
        &[
            "pretrain",
            "--data",
            &s(&w.join("data/public")),
            "--out",
            &s(&run),
            "--steps",
            "1",
            "--batch",
            "2",
            "--seq",
            "16",
        ],
        "is not a training log",
    ));
    // Outputs that would overwrite inputs, or a directory of another kind.
    cases.push(case(
        "merge --out = --public",
        &[
            "merge",
            "--public",
            &public,
            "--experts",
            &math,
            "--out",
            &public,
        ],
        "would overwrite an input",
    ));
    cases.push(case(
        "train-expert --out inside --public",
        &[
            "train-expert",
            "--public",
            &public,
            "--data",
            &s(&w.join("data/math")),
            "--name",
            "m",
            "--out",
            &s(&w.join("models/public/model.safetensors")),
            "--steps",
            "1",
        ],
        "would overwrite an input",
    ));
    let corpus_file = s(&w.join("corpus/math/train.jsonl"));
    cases.push(case(
        "tokenizer train --out = its input",
        &[
            "tokenizer",
            "train",
            "--input",
            &corpus_file,
            "--vocab",
            "300",
            "--out",
            &corpus_file,
        ],
        "would overwrite an input",
    ));
    cases.push(case(
        "data prepare --out a model directory",
        &[
            "data",
            "prepare",
            "--input",
            &s(&w.join("corpus/math")),
            "--tokenizer",
            &tok,
            "--out",
            &public,
        ],
        "not a prepared dataset",
    ));
    run_table(cases);

    // Output that cannot be written: one line, exit 1, no panic.
    let out = Command::new(bin())
        .args(["logits", "--model", &merged, "--ids", "3"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write the output") && err.trim_end().lines().count() == 1,
        "{err}"
    );

    // A corpus with a link back up the tree is read once, not until the path is too long.
    let c = d.join("loop");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("a.txt"), "one document here\n").unwrap();
    std::fs::write(c.join("b.txt"), "another document\n").unwrap();
    std::os::unix::fs::symlink(".", c.join("self")).unwrap();
    std::os::unix::fs::symlink(".", c.join("again")).unwrap();
    let (code, stdout, err) = flexrun(&[
        "data".into(),
        "prepare".into(),
        "--input".into(),
        s(&c),
        "--tokenizer".into(),
        tok.clone(),
        "--out".into(),
        s(&d.join("loop-data")),
        "--valid-fraction".into(),
        "0".into(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("(2 docs)"), "{stdout}");

    // A word of 200k letters does not make BPE training quadratic.
    let long = d.join("long.txt");
    std::fs::write(
        &long,
        format!("{}\n\nsome ordinary words\n", "a".repeat(200_000)),
    )
    .unwrap();
    let t = Instant::now();
    let (code, _, err) = flexrun(&[
        "tokenizer".into(),
        "train".into(),
        "--input".into(),
        s(&long),
        "--vocab".into(),
        "300".into(),
        "--out".into(),
        s(&d.join("long-tok.json")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "tokenizer train took {:?}",
        t.elapsed()
    );

    // A run killed before its first checkpoint left only a log: a new run starts over.
    let run = d.join("killed");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("train_log.jsonl"), "{\"step\":1}\n").unwrap();
    let (code, _, err) = flexrun(&[
        "pretrain".into(),
        "--data".into(),
        s(&w.join("data/public")),
        "--out".into(),
        s(&run),
        "--steps".into(),
        "1".into(),
        "--batch".into(),
        "2".into(),
        "--seq".into(),
        "16".into(),
        "--quiet".into(),
    ]);
    assert_eq!(code, 0, "{err}");

    // Inference sized beyond memory is refused before allocating.
    let cfg = flexrun::model::Config::olmo2(1 << 24, 64, 64, 1, 1, 1);
    let e = cfg.check_input(&vec![0u32; 1 << 20], 1).unwrap_err().0;
    assert!(e.contains("GiB of memory"), "{e}");
}

/// A third round: single-file outputs over the files of models, datasets and inputs, and metadata
/// that contradicts itself.
#[test]
fn third_round() {
    let d = tmp("round3");
    let w = demo();
    // Work on copies: a failing case must not damage the shared demo.
    let public = d.join("public");
    copy_dir(&w.join("models/public"), &public);
    let merged = d.join("merged");
    copy_dir(&w.join("models/flexolmo-main"), &merged);
    let data = d.join("math");
    copy_dir(&w.join("data/math"), &data);
    let corpus = d.join("corpus");
    copy_dir(&w.join("corpus/math"), &corpus);
    let (p, m, dm) = (s(&public), s(&merged), s(&data));
    let domain = format!("math={dm}");
    let dense = s(&w.join("models/dense-math"));
    let mut cases = vec![
        case(
            "eval --json over the weights",
            &[
                "eval",
                "--model",
                &p,
                "--data",
                &domain,
                "--tasks",
                "0",
                "--json",
                &s(&public.join("model.safetensors")),
            ],
            "would overwrite a weights file",
        ),
        case(
            "eval --json over a manifest",
            &[
                "eval",
                "--model",
                &p,
                "--data",
                &domain,
                "--tasks",
                "0",
                "--json",
                &s(&merged.join("flexolmo.json")),
            ],
            "would overwrite a file of",
        ),
        case(
            "analyze-routing --out over config.json",
            &[
                "analyze-routing",
                "--model",
                &m,
                "--data",
                &domain,
                "--out",
                &s(&merged.join("config.json")),
            ],
            "would overwrite a file of",
        ),
        case(
            "extract --json over a shard",
            &[
                "extract",
                "--model",
                &p,
                "--data",
                &dm,
                "--docs",
                "2",
                "--json",
                &s(&data.join("train.bin")),
            ],
            "would overwrite a file of",
        ),
        case(
            "compare --json over meta.json",
            &[
                "compare",
                "--model",
                &m,
                "--reference",
                &p,
                "--data",
                &dm,
                "--json",
                &s(&data.join("meta.json")),
            ],
            "would overwrite a file of",
        ),
        case(
            "tokenizer train --out over config.json",
            &[
                "tokenizer",
                "train",
                "--input",
                &s(&corpus),
                "--vocab",
                "300",
                "--out",
                &s(&public.join("config.json")),
            ],
            "would overwrite a file of",
        ),
        case(
            "tokenizer train --out over a corpus file in an input directory",
            &[
                "tokenizer",
                "train",
                "--input",
                &s(&corpus),
                "--vocab",
                "300",
                "--out",
                &s(&corpus.join("train.jsonl")),
            ],
            "would overwrite an input",
        ),
        case(
            "soup --out = one of its models",
            &["soup", "--models", &format!("{p},{dense}"), "--out", &p],
            "would overwrite an input",
        ),
        case(
            "train-expert --domain with a newline",
            &[
                "train-expert",
                "--public",
                &p,
                "--data",
                &dm,
                "--name",
                "m",
                "--domain",
                "a\nb",
                "--out",
                &s(&d.join("e.safetensors")),
            ],
            "domain label",
        ),
    ];
    // Metadata that contradicts itself.
    let cfg_case =
        |name: &'static str, key: &str, value: serde_json::Value, needle: &'static str| {
            let dir = d.join(format!("cfg-{key}"));
            copy_dir(&w.join("models/public"), &dir);
            let mut v = read_json(&dir.join("config.json"));
            v[key] = value;
            write_json(&dir.join("config.json"), &v);
            Case {
                name,
                args: vec![
                    "logits".into(),
                    "--model".into(),
                    s(&dir),
                    "--ids".into(),
                    "1".into(),
                ],
                needle,
            }
        };
    cases.push(cfg_case(
        "eos_token_id beyond the vocabulary",
        "eos_token_id",
        serde_json::json!(99999),
        "eos_token_id 99999 is not a token id",
    ));
    cases.push(cfg_case(
        "negative pad_token_id",
        "pad_token_id",
        serde_json::json!(-5),
        "pad_token_id -5 is not a token id",
    ));
    let mm = d.join("manifest-topk");
    copy_dir(&w.join("models/flexolmo-main"), &mm);
    let mut v = read_json(&mm.join("flexolmo.json"));
    v["top_k"] = 99.into();
    write_json(&mm.join("flexolmo.json"), &v);
    cases.push(case(
        "manifest top_k 99",
        &["logits", "--model", &s(&mm), "--ids", "1"],
        "top_k 99 must be between 1",
    ));
    let dd = d.join("meta-width");
    copy_dir(&w.join("data/math"), &dd);
    let mut v = read_json(&dd.join("meta.json"));
    v["token_bytes"] = 4.into();
    write_json(&dd.join("meta.json"), &v);
    cases.push(case(
        "meta token_bytes against the shards",
        &[
            "eval",
            "--model",
            &p,
            "--data",
            &format!("math={}", s(&dd)),
            "--tasks",
            "0",
        ],
        "token_bytes 4 but",
    ));
    run_table(cases);
    // Every protected file is as it was.
    for (dir, from) in [
        (&public, "models/public"),
        (&merged, "models/flexolmo-main"),
        (&data, "data/math"),
    ] {
        for f in [
            "config.json",
            "model.safetensors",
            "flexolmo.json",
            "train.bin",
            "meta.json",
        ] {
            if w.join(from).join(f).exists() {
                assert_eq!(
                    std::fs::read(dir.join(f)).unwrap(),
                    std::fs::read(w.join(from).join(f)).unwrap(),
                    "{from}/{f} changed"
                );
            }
        }
    }
}

/// A fourth round: outputs onto special files, trailing `/.`, corpora over models and datasets,
/// weights overwritten by reports, a dataset replaced while its own tokenizer is the input.
#[test]
fn fourth_round() {
    let d = tmp("round4");
    let w = demo();
    let public = d.join("public");
    copy_dir(&w.join("models/public"), &public);
    let data = d.join("math");
    copy_dir(&w.join("data/math"), &data);
    let experts = d.join("experts");
    copy_dir(&w.join("experts/main"), &experts);
    let (p, dm) = (s(&public), s(&data));
    let domain = format!("math={dm}");
    let fifo = d.join("out.fifo");
    mkfifo(&fifo);
    let cases = vec![
        case(
            "eval --json onto a FIFO",
            &[
                "eval",
                "--model",
                &p,
                "--data",
                &domain,
                "--tasks",
                "0",
                "--json",
                &s(&fifo),
            ],
            "is not a regular file",
        ),
        case(
            "tokenizer train --out onto a FIFO",
            &[
                "tokenizer",
                "train",
                "--input",
                &s(&w.join("corpus/math")),
                "--vocab",
                "300",
                "--out",
                &s(&fifo),
            ],
            "is not a regular file",
        ),
        case(
            "eval --json over an expert artifact",
            &[
                "eval",
                "--model",
                &p,
                "--data",
                &domain,
                "--tasks",
                "0",
                "--json",
                &s(&experts.join("code.safetensors")),
            ],
            "would overwrite a weights file",
        ),
        case(
            "merge --out DIR/.",
            &[
                "merge",
                "--public",
                &p,
                "--experts",
                &s(&experts.join("code.safetensors")),
                "--out",
                &format!("{}/.", s(&d.join("m"))),
            ],
            "without a trailing",
        ),
        case(
            "soup --out DIR/",
            &[
                "soup",
                "--models",
                &p,
                "--out",
                &format!("{}/", s(&d.join("soup"))),
            ],
            "without a trailing",
        ),
        case(
            "data synth --out a dataset",
            &["data", "synth", "--out", &dm, "--docs", "2"],
            "not a corpus written by data synth",
        ),
        case(
            "data synth --out a model",
            &["data", "synth", "--out", &p, "--docs", "2"],
            "not a corpus written by data synth",
        ),
        case(
            "data prepare with the output's own tokenizer",
            &[
                "data",
                "prepare",
                "--input",
                &s(&w.join("corpus/math")),
                "--tokenizer",
                &s(&data.join("tokenizer.json")),
                "--out",
                &dm,
            ],
            "would overwrite an input",
        ),
    ];
    run_table(cases);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo_like());
    for f in ["code.safetensors", "math.safetensors"] {
        assert_eq!(
            std::fs::read(experts.join(f)).unwrap(),
            std::fs::read(w.join("experts/main").join(f)).unwrap()
        );
    }
    assert!(
        !d.join(".m.tmp").exists() && !d.join(".soup.tmp").exists(),
        "no staging directory left"
    );
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

/// A fifth round: run files replaced by reports, another expert's artifact replaced by training,
/// a demo into a directory it did not make.
#[test]
fn fifth_round() {
    let d = tmp("round5");
    let w = demo();
    let public = d.join("public");
    copy_dir(&w.join("models/public"), &public);
    let experts = d.join("experts");
    copy_dir(&w.join("experts/main"), &experts);
    std::fs::write(d.join("notes.txt"), "mine").unwrap();
    // A checkpoint directory, as a training run leaves it.
    std::fs::create_dir_all(public.join("checkpoint")).unwrap();
    std::fs::write(public.join("checkpoint/trainer_state.json"), "{}").unwrap();
    let merged = s(&w.join("models/flexolmo-main"));
    let domain = format!("code={}", s(&w.join("data/code")));
    let cases = vec![
        case(
            "analyze-routing --out over a run's loss.svg",
            &[
                "analyze-routing",
                "--model",
                &merged,
                "--data",
                &domain,
                "--out",
                &s(&public.join("loss.svg")),
            ],
            "would overwrite a file of the model, run or dataset",
        ),
        case(
            "tokenizer train --out over a run's log",
            &[
                "tokenizer",
                "train",
                "--input",
                &s(&w.join("corpus/code")),
                "--vocab",
                "300",
                "--out",
                &s(&public.join("train_log.jsonl")),
            ],
            "would overwrite a file of the model, run or dataset",
        ),
        case(
            "eval --json over a checkpoint's state",
            &[
                "eval",
                "--model",
                &merged,
                "--data",
                &domain,
                "--tasks",
                "0",
                "--json",
                &s(&public.join("checkpoint/trainer_state.json")),
            ],
            "would overwrite a file of the model, run or dataset",
        ),
        case(
            "train-expert over another expert's artifact",
            &[
                "train-expert",
                "--public",
                &s(&public),
                "--data",
                &s(&w.join("data/math")),
                "--name",
                "math",
                "--out",
                &s(&experts.join("code.safetensors")),
                "--steps",
                "1",
            ],
            "holds expert 'code'",
        ),
        case(
            "train-expert over a file that is not an artifact",
            &[
                "train-expert",
                "--public",
                &s(&public),
                "--data",
                &s(&w.join("data/math")),
                "--name",
                "math",
                "--out",
                &s(&d.join("notes.txt")),
                "--steps",
                "1",
            ],
            "is not an expert artifact",
        ),
        case(
            "demo into a directory it did not make",
            &["demo", "--quick", "--out", &s(&d)],
            "not an earlier demo",
        ),
        case(
            "train-expert --run-dir a dataset",
            &[
                "train-expert",
                "--public",
                &s(&public),
                "--data",
                &s(&w.join("data/math")),
                "--name",
                "math",
                "--out",
                &s(&d.join("new.safetensors")),
                "--run-dir",
                &s(&w.join("data/code")),
                "--steps",
                "1",
            ],
            "not a flexrun model or run",
        ),
        case(
            "train-expert --run-dir the experts' directory",
            &[
                "train-expert",
                "--public",
                &s(&public),
                "--data",
                &s(&w.join("data/math")),
                "--name",
                "math",
                "--out",
                &s(&d.join("new2.safetensors")),
                "--run-dir",
                &s(&experts),
                "--steps",
                "1",
            ],
            "not a flexrun model or run",
        ),
    ];
    run_table(cases);
    assert_eq!(
        std::fs::read_to_string(d.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read(experts.join("code.safetensors")).unwrap(),
        std::fs::read(w.join("experts/main/code.safetensors")).unwrap()
    );
}
