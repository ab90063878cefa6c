//! A bounded fuzz run of every loader a checkpoint reaches: config.json, the shard index, the
//! safetensors files of a model, an expert artifact and a prepared dataset's meta and shards.
//! Each case is a mutation of a valid file (bit flips, overwritten bytes, truncation, extension,
//! huge header lengths, random JSON edits) or random bytes; the loaders must return an error or a
//! model, never panic, abort or hang. A watchdog fails the run if one case takes more than 20 s.
//!
//! FLEXRUN_FUZZ_SECS sets the time budget (default 20 s); FLEXRUN_FUZZ_SEED the seed.

use flexrun::flex::ExpertArtifact;
use flexrun::model::checkpoint;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// One mutation of `bytes`.
fn mutate(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.random_range(0..9) {
        0 => {
            // Flip a few bits.
            for _ in 0..rng.random_range(1..8) {
                if !b.is_empty() {
                    let i = rng.random_range(0..b.len());
                    b[i] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => {
            // Truncate.
            let n = rng.random_range(0..=b.len());
            b.truncate(n);
        }
        2 => {
            // Extend with random bytes.
            for _ in 0..rng.random_range(1..256) {
                b.push(rng.random());
            }
        }
        3 if b.len() >= 8 => {
            // A huge or odd safetensors header length.
            let v: u64 = match rng.random_range(0..4) {
                0 => u64::MAX,
                1 => 1 << 40,
                2 => rng.random_range(0..64),
                _ => b.len() as u64 + rng.random_range(0..16),
            };
            b[..8].copy_from_slice(&v.to_le_bytes());
        }
        4 => {
            // Overwrite a run of bytes inside the first 4 KiB (the header, for safetensors).
            if !b.is_empty() {
                let end = b.len().min(4096);
                let i = rng.random_range(0..end);
                for j in i..(i + rng.random_range(1..32)).min(b.len()) {
                    b[j] = rng.random();
                }
            }
        }
        5 => {
            // Replace a digit run by a huge number (shapes, offsets, sizes in JSON).
            let s = String::from_utf8_lossy(&b).to_string();
            let digits: Vec<usize> = s
                .char_indices()
                .filter(|(_, c)| c.is_ascii_digit())
                .map(|(i, _)| i)
                .collect();
            if let Some(&i) = digits.get(rng.random_range(0..digits.len().max(1))) {
                let big = ["999999999999", "18446744073709551615", "0", "-1", "1e300"]
                    [rng.random_range(0..5)];
                let mut t = s.clone();
                t.replace_range(i..i + 1, big);
                b = t.into_bytes();
            }
        }
        6 => {
            // Swap a JSON string value for a hostile one.
            let s = String::from_utf8_lossy(&b).to_string();
            let quotes: Vec<usize> = s.match_indices('"').map(|(i, _)| i).collect();
            if quotes.len() >= 2 {
                let k = rng.random_range(0..quotes.len() - 1);
                let (a, z) = (quotes[k] + 1, quotes[k + 1]);
                let evil =
                    ["../x", "/etc/passwd", "", "\\u0000", "a/b", ".."][rng.random_range(0..6)];
                let mut t = s.clone();
                t.replace_range(a..z, evil);
                b = t.into_bytes();
            }
        }
        7 => {
            // Random bytes of a random length.
            let n = rng.random_range(0..512);
            b = (0..n).map(|_| rng.random()).collect();
        }
        _ => {
            // Duplicate a slice (repeated keys, repeated tensors).
            if b.len() > 2 {
                let i = rng.random_range(0..b.len() - 1);
                let j = rng.random_range(i + 1..=b.len().min(i + 200));
                let piece = b[i..j].to_vec();
                b.splice(i..i, piece);
            }
        }
    }
    b
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn loaders_never_panic_abort_or_hang_on_mutated_files() {
    let secs: u64 = std::env::var("FLEXRUN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FLEXRUN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let root = std::env::temp_dir().join(format!("flexrun-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();

    // Valid inputs to mutate: a sharded MoE model, a single-file bf16 dense model, an expert
    // artifact (written from the dense model's layers), a prepared dataset.
    let sharded = fixture("flexolmo_tiny");
    let dense = fixture("olmo2_tiny_bf16");
    let public = checkpoint::load(&dense).unwrap();
    let art_path = root.join("expert.safetensors");
    {
        use flexrun::flex::{ExpertLayer, ExpertMeta};
        let h = public.cfg.hidden_size;
        let i = public.cfg.intermediate_size;
        let t = |r: usize, c: usize| flexrun::tensor::Tensor::zeros(&[r, c]);
        let layers = (0..public.cfg.num_hidden_layers)
            .map(|_| ExpertLayer {
                gate: t(i, h),
                up: t(i, h),
                down: t(h, i),
                router: t(1, h),
                bias: Some(-2.0),
                router_public: t(1, h),
            })
            .collect();
        let meta = ExpertMeta {
            format: flexrun::flex::artifact::ARTIFACT_FORMAT,
            name: "code".into(),
            domain: "code".into(),
            tokens_seen: 1,
            steps: 1,
            public_hash: "0".into(),
            hidden_size: h,
            intermediate_size: i,
            num_layers: public.cfg.num_hidden_layers,
            router_init: "domain".into(),
            router_encoder: None,
            bias_init: Some(-2.0),
            hyperparameters: serde_json::json!({}),
        };
        ExpertArtifact { meta, layers }.save(&art_path).unwrap();
    }
    let art_bytes = std::fs::read(&art_path).unwrap();
    let data_dir = root.join("data");
    {
        let docs: Vec<Vec<u32>> = (0..20)
            .map(|d| (0..(5 + d)).map(|t| (t * 7 + d) as u32 % 50).collect())
            .collect();
        std::fs::create_dir_all(&data_dir).unwrap();
        flexrun::data::shards::write_shard(&data_dir.join("train.bin"), &docs, 64).unwrap();
        flexrun::data::shards::write_shard(&data_dir.join("valid.bin"), &docs[..3], 64).unwrap();
        let n = |d: &[Vec<u32>]| d.iter().map(Vec::len).sum::<usize>();
        let meta = serde_json::json!({
            "format_version": 1, "vocab_size": 64, "eos_id": 0, "token_bytes": 2,
            "train_tokens": n(&docs), "train_docs": 20, "valid_tokens": n(&docs[..3]), "valid_docs": 3,
            "tokenizer_hash": "0", "sources": ["x.txt"], "valid_fraction": 0.1, "seed": 0,
        });
        std::fs::write(data_dir.join("meta.json"), meta.to_string()).unwrap();
    }
    flexrun::data::shards::Dataset::open(&data_dir).expect("the unmutated dataset opens");

    // What each case mutates: (directory to copy, file in it), or the artifact.
    let targets: Vec<(Option<&Path>, &str)> = vec![
        (Some(&sharded), "config.json"),
        (Some(&sharded), "model.safetensors.index.json"),
        (Some(&sharded), "model-00001-of-00002.safetensors"),
        (Some(&dense), "config.json"),
        (Some(&dense), "model.safetensors"),
        (Some(&data_dir), "meta.json"),
        (Some(&data_dir), "train.bin"),
        (None, "expert.safetensors"),
    ];

    // Watchdog: the case counter must move at least every 20 s.
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    {
        let (progress, done) = (progress.clone(), done.clone());
        std::thread::spawn(move || {
            let mut last = (0, Instant::now());
            while done.load(Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(200));
                let p = progress.load(Ordering::Relaxed);
                if p != last.0 {
                    last = (p, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(20) {
                    eprintln!("fuzz case {p} hangs (over 20 s)");
                    std::process::abort();
                }
            }
        });
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let (mut cases, mut ok, mut errs) = (0u64, 0u64, 0u64);
    let work = root.join("case");
    while start.elapsed() < Duration::from_secs(secs) {
        let (dir, file) = targets[rng.random_range(0..targets.len())];
        let result = match dir {
            Some(dir) => {
                copy_dir(dir, &work);
                let orig = std::fs::read(work.join(file)).unwrap();
                let bytes = mutate(&orig, &mut rng);
                std::fs::write(work.join(file), &bytes).unwrap();
                std::panic::catch_unwind(|| {
                    if dir == data_dir.as_path() {
                        flexrun::data::shards::Dataset::open(&work).map(|_| ())
                    } else {
                        checkpoint::load_with(&work, cases % 2 == 0).map(|_| ())
                    }
                })
            }
            None => {
                let p = root.join("case.safetensors");
                std::fs::write(&p, mutate(&art_bytes, &mut rng)).unwrap();
                std::panic::catch_unwind(|| ExpertArtifact::load(&p).map(|_| ()))
            }
        };
        match result {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                assert!(!e.0.contains('\n'), "a multi-line error: {e}");
                errs += 1
            }
            Err(_) => panic!(
                "case {cases} (seed {seed}): a loader panicked on a mutation of {file}; rerun with FLEXRUN_FUZZ_SEED={seed}"
            ),
        }
        cases += 1;
        progress.store(cases, Ordering::Relaxed);
    }
    done.store(1, Ordering::Relaxed);
    println!("fuzzed {cases} cases in {secs} s: {ok} loaded, {errs} refused with one-line errors");
    assert!(cases >= 100, "only {cases} cases ran");
    assert!(
        errs > 0,
        "no mutation was refused: the mutations do not reach the loaders"
    );
    let _ = std::fs::remove_dir_all(&root);
}
