//! `flexrun serve` end to end, on 127.0.0.1 only: servers are started as the user starts them
//! (the binary, `--port 0`), spoken to with flexrun's small HTTP client (and once with the
//! `openai` Python client), and stopped with SIGTERM.
//!
//! - a mixed-opt-out batch: every request's tokens are bit-identical to `flexrun generate` with
//!   the same experts and settings, whatever else was in the batch;
//! - streaming (server-sent events, `[DONE]`, usage), stop strings;
//! - the policy (401, 403 that names no other key's experts, metrics rights);
//! - every bad input is a 4xx with an OpenAI-style error, and the server keeps serving;
//! - a full server answers 429, a client that hangs up frees its slot, SIGTERM drains.

use flexrun::serve::client;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flexrun")
}

fn work() -> &'static Path {
    static W: OnceLock<PathBuf> = OnceLock::new();
    W.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("flexrun-serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// The quick demo's merged model (4 experts, a tokenizer), made once per test binary.
fn demo_model() -> &'static Path {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let out = work().join("demo");
        let o = Command::new(bin())
            .args(["demo", "--quick", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out.join("models/flexolmo-main")
    })
}

/// A larger random 4-expert model (top-2, no end-of-text token, 2048 positions) whose requests
/// take seconds: for the queue, hang-up and shutdown checks.
fn slow_model() -> &'static Path {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        use flexrun::flex::{Manifest, ManifestExpert};
        use flexrun::model::{checkpoint, Config, Model};
        let mut cfg = Config::flex_olmo(512, 256, 512, 4, 4, 4, 4, 2);
        cfg.max_position_embeddings = 2048;
        cfg.eos_token_id = None;
        let m = Model::new_random(&cfg, 7).unwrap();
        let dir = work().join("slow");
        checkpoint::save(&m, &dir, flexrun::tensor::DType::F32).unwrap();
        let experts = ["public", "news", "code", "math"]
            .iter()
            .map(|n| ManifestExpert {
                name: n.to_string(),
                domain: n.to_string(),
                tokens_seen: 0,
                bias: None,
                bias_offset: None,
                source: "random".into(),
            })
            .collect();
        let man = Manifest {
            public_hash: "random".into(),
            experts,
            top_k: 2,
            router_tuned: false,
            strict_opt_out: true,
        };
        std::fs::write(dir.join("flexolmo.json"), serde_json::to_vec(&man).unwrap()).unwrap();
        dir
    })
}

/// A `flexrun serve` process; SIGTERM and a wait on drop.
struct Srv {
    child: Child,
    addr: SocketAddr,
    /// Kept open: the server prints a last line when it stops.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Srv {
    fn start(model: &Path, extra: &[&str]) -> Srv {
        let mut child = Command::new(bin())
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "no address: {line:?} {}",
                String::from_utf8_lossy(&o.stderr)
            )
        };
        Srv {
            child,
            addr,
            _stdout: stdout,
        }
    }

    fn post(&self, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let r = client::request(
            self.addr,
            "POST",
            "/v1/completions",
            headers,
            body.to_string().as_bytes(),
            T,
        )
        .unwrap();
        (r.status, r.json().unwrap())
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> client::Response {
        client::request(self.addr, "GET", path, headers, b"", T).unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        let m = self.get("/metrics", &[]).text();
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    fn term(&mut self) -> (i32, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(e) = self.child.stderr.as_mut() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (s.code().unwrap_or(-1), err);
            }
            assert!(start.elapsed() < T, "the server did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `flexrun generate --ids` with these settings: the token ids it prints.
fn generate(model: &Path, prompt: &[u32], new: usize, args: &[String]) -> Vec<u32> {
    let ids: Vec<String> = prompt.iter().map(|i| i.to_string()).collect();
    let o = Command::new(bin())
        .args(["generate", "--device", "cpu", "--model"])
        .arg(model)
        .args([
            "--ids",
            &ids.join(","),
            "--max-new-tokens",
            &new.to_string(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    s.trim()
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Requests with different expert sets, temperatures and seeds, sent together so that they share
/// decode steps: each one's tokens equal `flexrun generate` run alone with the same experts.
#[test]
fn a_mixed_opt_out_batch_is_bit_identical_to_generate() {
    let model = demo_model();
    let srv = Srv::start(model, &["--expert-top-k", "2", "--max-batch", "8"]);
    let selections: [(&str, Vec<&str>); 6] = [
        ("exclude", vec![]),
        ("exclude", vec!["code"]),
        ("exclude", vec!["math", "facts"]),
        ("experts", vec!["public"]),
        ("experts", vec!["code", "math"]),
        ("exclude", vec!["public"]),
    ];
    let mut cases = Vec::new();
    for (i, (field, names)) in selections.iter().enumerate() {
        for (temp, top_p, seed) in [(0.0, 1.0, 0u64), (0.9, 0.95, 17 + i as u64)] {
            let prompt: Vec<u32> = (0..(3 + i as u32 * 5))
                .map(|j| (j * 37 + i as u32) % 280 + 10)
                .collect();
            cases.push((
                field.to_string(),
                names.clone(),
                temp,
                top_p,
                seed,
                prompt,
                20 + 3 * i,
            ));
        }
    }
    let steps0 = srv.metric("flexrun_engine_steps_total");
    let results: Vec<(Vec<u32>, Vec<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(k, (field, names, temp, top_p, seed, prompt, new))| {
                let srv = &srv;
                s.spawn(move || {
                    let mut body = json!({"prompt": prompt, "max_tokens": new, "temperature": temp,
                        "top_p": top_p, "seed": seed, "return_token_ids": true});
                    body[field.as_str()] = json!(names);
                    if k % 2 == 1 {
                        body["stream"] = json!(true);
                        let mut toks = Vec::new();
                        let mut experts = Vec::new();
                        let st = client::stream(
                            srv.addr,
                            "/v1/completions",
                            &[],
                            body.to_string().as_bytes(),
                            T,
                            &mut |d| {
                                if d != "[DONE]" {
                                    let v: Value = serde_json::from_str(d).unwrap();
                                    toks.extend(ids(&v["choices"][0]["token_ids"]));
                                    experts = serde_json::from_value(v["experts"].clone()).unwrap();
                                }
                                true
                            },
                        )
                        .unwrap();
                        assert_eq!(st, 200);
                        (toks, experts)
                    } else {
                        let (st, v) = srv.post(&body, &[]);
                        assert_eq!(st, 200, "{v}");
                        (
                            ids(&v["choices"][0]["token_ids"]),
                            serde_json::from_value(v["experts"].clone()).unwrap(),
                        )
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let steps = srv.metric("flexrun_engine_steps_total") - steps0;
    let tokens: usize = results.iter().map(|r| r.0.len()).sum();
    assert!(
        steps < tokens as f64,
        "{steps} steps for {tokens} tokens: the requests were not batched together"
    );
    let all = ["public", "code", "facts", "math"];
    let mut distinct = std::collections::HashSet::new();
    for ((field, names, temp, top_p, seed, prompt, new), (got, experts)) in
        cases.iter().zip(&results)
    {
        let want_experts: Vec<&str> = if field == "experts" {
            names.clone()
        } else {
            all.iter().copied().filter(|n| !names.contains(n)).collect()
        };
        assert_eq!(experts, &want_experts, "{field} {names:?}");
        let mut args: Vec<String> = [
            "--expert-top-k",
            "2",
            "--temperature",
            &temp.to_string(),
            "--top-p",
            &top_p.to_string(),
            "--seed",
            &seed.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !names.is_empty() {
            args.push(format!(
                "--{}",
                if field == "experts" {
                    "experts"
                } else {
                    "exclude"
                }
            ));
            args.push(names.join(","));
        }
        let want = generate(model, prompt, *new, &args);
        assert_eq!(got, &want, "{field} {names:?} t={temp} seed={seed}");
        distinct.insert((prompt.clone(), got.clone()));
    }
    // The selections matter: the same prompt gives different tokens under different experts.
    assert!(distinct.len() > cases.len() / 2);
}

/// Streaming gives the same text as a plain response, ends with usage and `[DONE]`; stop
/// strings end a completion before them.
#[test]
fn streaming_usage_and_stop_strings() {
    let srv = Srv::start(demo_model(), &[]);
    let body = json!({"prompt": "def f(x):", "max_tokens": 24, "temperature": 0});
    let (st, plain) = srv.post(&body, &[]);
    assert_eq!(st, 200, "{plain}");
    let text = plain["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(
        plain["usage"]["completion_tokens"].as_u64().unwrap() as usize
            + plain["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        plain["usage"]["total_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(plain["object"], "text_completion");
    let mut b = body.clone();
    b["stream"] = json!(true);
    let r = client::request(
        srv.addr,
        "POST",
        "/v1/completions",
        &[],
        b.to_string().as_bytes(),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"], plain["usage"]);
    assert_eq!(
        last["choices"][0]["finish_reason"],
        plain["choices"][0]["finish_reason"]
    );
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    // A stop string taken from the middle of the text: the completion ends just before it.
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..5].iter().collect();
        let cut = &text[..text.find(&stop).unwrap()];
        for stream in [false, true] {
            let mut b = body.clone();
            b["stop"] = json!([stop]);
            b["stream"] = json!(stream);
            let r = client::request(
                srv.addr,
                "POST",
                "/v1/completions",
                &[],
                b.to_string().as_bytes(),
                T,
            )
            .unwrap();
            let (got, finish) = if stream {
                let ev = r.events();
                let cs: Vec<Value> = ev[..ev.len() - 1]
                    .iter()
                    .map(|d| serde_json::from_str(d).unwrap())
                    .collect();
                (
                    cs.iter()
                        .map(|c| c["choices"][0]["text"].as_str().unwrap())
                        .collect::<String>(),
                    cs.last().unwrap()["choices"][0]["finish_reason"].clone(),
                )
            } else {
                let v = r.json().unwrap();
                (
                    v["choices"][0]["text"].as_str().unwrap().to_string(),
                    v["choices"][0]["finish_reason"].clone(),
                )
            };
            assert_eq!(
                (got.as_str(), finish),
                (cut, json!("stop")),
                "stream {stream}, stop {stop:?}"
            );
        }
    }
}

/// API keys map to experts: no key gets the default, a key gets its experts, asking for more
/// is a 403 that names only what was asked; a bad key is 401; metrics need the right.
#[test]
fn the_policy_is_enforced() {
    let model = demo_model();
    let pol = work().join("policy.json");
    std::fs::write(
        &pol,
        r#"{"default": ["public"], "keys": [
            {"key": "acme-0123456789abcdef", "experts": ["public", "code"]},
            {"key": "ops-0123456789abcdef", "experts": "*", "metrics": true}]}"#,
    )
    .unwrap();
    let srv = Srv::start(model, &["--policy", pol.to_str().unwrap()]);
    let acme = [("Authorization", "Bearer acme-0123456789abcdef")];
    let ops = [("Authorization", "Bearer ops-0123456789abcdef")];
    let prompt = json!([20, 30, 40, 50]);
    let body =
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": true});
    let (st, v) = srv.post(&body, &[]);
    assert_eq!((st, v["experts"].clone()), (200, json!(["public"])));
    assert_eq!(
        ids(&v["choices"][0]["token_ids"]),
        generate(
            model,
            &[20, 30, 40, 50],
            12,
            &["--experts".into(), "public".into()]
        )
    );
    let (st, v) = srv.post(&body, &acme);
    assert_eq!((st, v["experts"].clone()), (200, json!(["public", "code"])));
    assert_eq!(
        ids(&v["choices"][0]["token_ids"]),
        generate(
            model,
            &[20, 30, 40, 50],
            12,
            &["--experts".into(), "public,code".into()]
        )
    );
    for (field, names) in [
        ("experts", json!(["math"])),
        ("exclude", json!(["facts"])),
        ("experts", json!(["nosuch"])),
    ] {
        let mut b = body.clone();
        b[field] = names.clone();
        let (st, v) = srv.post(&b, &acme);
        assert_eq!(st, 403, "{field} {names}: {v}");
        assert_eq!(v["error"]["type"], "permission_error");
        let msg = v["error"]["message"].as_str().unwrap();
        for other in ["public", "code", "facts", "math"] {
            if !names.to_string().contains(other) {
                assert!(!msg.contains(other), "the 403 names '{other}': {msg}");
            }
        }
    }
    let (st, v) = srv.post(&body, &[("Authorization", "Bearer acme-0123456789abcdeX")]);
    assert_eq!(
        (st, v["error"]["type"].clone()),
        (401, json!("authentication_error"))
    );
    let models = srv.get("/v1/models", &acme).json().unwrap();
    assert_eq!(models["data"][0]["experts"], json!(["public", "code"]));
    assert_eq!(srv.get("/metrics", &acme).status, 403);
    assert_eq!(srv.get("/metrics", &[]).status, 403);
    let m = srv.get("/metrics", &ops);
    assert_eq!(m.status, 200);
    assert!(m
        .text()
        .contains("flexrun_expert_routed_tokens_total{expert=\"code\"}"));
}

/// Each bad request is a 4xx with an OpenAI-style error, and the server answers the next good
/// one as before.
#[test]
fn bad_input_is_a_4xx_and_the_server_keeps_serving() {
    let srv = Srv::start(demo_model(), &[]);
    let good = json!({"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0});
    let (st, first) = srv.post(&good, &[]);
    assert_eq!(st, 200);
    let raw = |body: &[u8]| {
        let r = client::request(srv.addr, "POST", "/v1/completions", &[], body, T).unwrap();
        (r.status, r.json().unwrap())
    };
    let big = vec![b'x'; 10 << 20];
    for (body, status, what) in [
        (&b"{\"prompt\": "[..], 400, "truncated JSON"),
        (b"[]", 400, "not an object"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (
            br#"{"prompt": "a", "max_tokens": "five"}"#,
            400,
            "wrong type",
        ),
        (
            br#"{"prompt": "a", "temperature": -1}"#,
            400,
            "negative temperature",
        ),
        (br#"{"prompt": "a", "top_p": 0}"#, 400, "top_p 0"),
        (
            br#"{"prompt": "a", "exclude": ["sports"]}"#,
            400,
            "unknown expert",
        ),
        (br#"{"prompt": "a", "experts": []}"#, 400, "no expert left"),
        (br#"{"prompt": [1, 300]}"#, 400, "token id out of range"),
        (
            br#"{"prompt": [1, 18446744073709551615]}"#,
            400,
            "huge token id",
        ),
        (br#"{"prompt": ""}"#, 400, "empty prompt"),
        (br#"{"prompt": "a", "max_tokens": 0}"#, 400, "max_tokens 0"),
        (
            br#"{"prompt": "a", "max_tokens": 18446744073709551615}"#,
            400,
            "max_tokens past the context",
        ),
        (br#"{"prompt": "a", "n": 3}"#, 400, "n > 1"),
        (
            br#"{"prompt": "a", "model": "gpt-4"}"#,
            404,
            "another model",
        ),
        (&big[..], 413, "a 10 MiB body"),
    ] {
        let (st, v) = raw(body);
        assert_eq!(st, status, "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty() && !m.contains('\n')),
            "{what}: {v}"
        );
    }
    let long: Vec<u32> = vec![7; 256];
    let (st, v) = srv.post(&json!({"prompt": long}), &[]);
    assert_eq!(
        (st, v["error"]["param"].clone()),
        (400, json!("prompt")),
        "a prompt as long as the context"
    );
    let text_long = "ab ".repeat(2000);
    let (st, _) = srv.post(&json!({"prompt": text_long}), &[]);
    assert_eq!(st, 400, "a text prompt longer than the context");
    assert_eq!(srv.get("/v1/nothing", &[]).status, 404);
    assert_eq!(
        client::request(srv.addr, "DELETE", "/v1/completions", &[], b"", T)
            .unwrap()
            .status,
        405
    );
    // Garbage on the socket.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        let _ = s.write_all(b"\x00\x01GARBAGE\r\n\r\n");
    }
    let (st, again) = srv.post(&good, &[]);
    assert_eq!((st, &again["choices"]), (200, &first["choices"]));
    assert_eq!(srv.get("/health", &[]).json().unwrap()["status"], "ok");
}

/// With one slot and one queue place, a third concurrent request gets 429; a client that hangs
/// up mid-stream frees its slot at once; SIGTERM lets running requests finish and exits 0.
#[test]
fn a_full_server_answers_429_a_hang_up_frees_the_slot_and_sigterm_drains() {
    let mut srv = Srv::start(slow_model(), &["--max-batch", "1", "--max-queue", "1"]);
    let long = json!({"prompt": [1, 2, 3], "max_tokens": 2000, "temperature": 0, "stream": true});
    // A hang-up: read three tokens, then close the connection.
    let t0 = Instant::now();
    let mut n = 0;
    client::stream(
        srv.addr,
        "/v1/completions",
        &[],
        long.to_string().as_bytes(),
        T,
        &mut |_| {
            n += 1;
            n < 3
        },
    )
    .unwrap();
    let short = json!({"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0});
    let (st, _) = srv.post(&short, &[]);
    assert_eq!(st, 200);
    let freed = t0.elapsed();
    // The same long request to the end, for its duration.
    let t1 = Instant::now();
    let r = client::request(
        srv.addr,
        "POST",
        "/v1/completions",
        &[],
        json!({"prompt": [1, 2, 3], "max_tokens": 2000, "temperature": 0})
            .to_string()
            .as_bytes(),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let full = t1.elapsed();
    assert!(
        freed < full / 2,
        "the hung-up sequence kept its slot: {freed:?} vs {full:?} for a whole one"
    );
    // Saturate: one running, one queued, the rest refused.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|i| {
                let srv = &srv;
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(30 * i));
                    let b = json!({"prompt": [1, 2, 3], "max_tokens": 300, "temperature": 0});
                    srv.post(&b, &[]).0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.contains(&429) && statuses.contains(&200),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    // Every request has its answer; the engine frees the last slot between its steps, which may
    // come a moment after the answer was sent.
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.metric("flexrun_running_sequences") != 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(srv.metric("flexrun_running_sequences"), 0.0);
    // SIGTERM while a stream runs: it finishes, then the server exits 0.
    let addr = srv.addr;
    let h = std::thread::spawn(move || {
        let mut evs = Vec::new();
        let b = json!({"prompt": [1, 2, 3], "max_tokens": 400, "temperature": 0, "stream": true});
        client::stream(
            addr,
            "/v1/completions",
            &[],
            b.to_string().as_bytes(),
            T,
            &mut |d| {
                evs.push(d.to_string());
                true
            },
        )
        .unwrap();
        evs
    });
    std::thread::sleep(Duration::from_millis(150));
    let (code, err) = srv.term();
    assert_eq!(code, 0, "{err}");
    let evs = h.join().unwrap();
    assert_eq!(evs.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        evs.len(),
        402,
        "the running request finished: {} events",
        evs.len()
    );
}

/// Settings that cannot serve are one-line errors with exit 1 before anything is bound.
#[test]
fn bad_serve_settings_are_one_line_errors() {
    let model = demo_model();
    let bad_policy = work().join("bad-policy.json");
    std::fs::write(&bad_policy, r#"{"keys": [{"key": "k", "experts": "*"}]}"#).unwrap();
    let unknown = work().join("unknown-policy.json");
    std::fs::write(
        &unknown,
        r#"{"keys": [{"key": "0123456789abcdef-x", "experts": ["sports"]}]}"#,
    )
    .unwrap();
    let m = model.to_str().unwrap();
    for (args, want) in [
        (vec!["--device", "cuda"], "CPU"),
        (vec!["--max-batch", "0"], "max-batch"),
        (vec!["--max-batch", "100000"], "max-batch"),
        (vec!["--policy", "/nonexistent/policy.json"], "policy"),
        (
            vec!["--policy", bad_policy.to_str().unwrap()],
            "printable ASCII",
        ),
        (vec!["--policy", unknown.to_str().unwrap()], "sports"),
        (vec!["--exclude", "sports"], "sports"),
        (vec!["--host", "256.1.1.1"], "listen"),
    ] {
        let o = Command::new(bin())
            .args(["serve", "--port", "0", "--model", m])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.trim().lines().count() == 1 && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("0123456789abcdef"),
            "an error shows a key: {err}"
        );
    }
}

/// The official `openai` Python client works unchanged: plain and streamed completions, the
/// FlexOlmo fields through `extra_body`, and a 400 raised as its BadRequestError.
#[test]
fn the_openai_python_client_works_unchanged() {
    let deps = Path::new(env!("CARGO_MANIFEST_DIR")).join(".pydeps");
    let py = Command::new("python3")
        .env("PYTHONPATH", &deps)
        .args(["-c", "import openai"])
        .output();
    if !py.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("FLEXRUN_REQUIRE_TEST_DEPS").is_err(),
            "the openai package is missing: run tools/setup-test.sh"
        );
        println!(
            "SKIP: the openai Python package is not installed (tools/setup-test.sh installs it)"
        );
        return;
    }
    let model = demo_model();
    let srv = Srv::start(model, &["--model-id", "flexolmo-demo"]);
    let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
ids = [c.id for c in c.models.list().data]
r = c.completions.create(model="flexolmo-demo", prompt=[11, 12, 13], max_tokens=10, temperature=0,
                         extra_body={"exclude": ["code"], "return_token_ids": True})
s = "".join(ch.choices[0].text for ch in c.completions.create(
    model="flexolmo-demo", prompt=[11, 12, 13], max_tokens=10, temperature=0, stream=True,
    extra_body={"exclude": ["code"]}))
try:
    c.completions.create(model="flexolmo-demo", prompt="x", max_tokens=100000)
    err = None
except openai.BadRequestError as e:
    err = e.status_code
print(json.dumps({"models": ids, "text": r.choices[0].text, "stream": s,
                  "ids": r.choices[0].model_extra.get("token_ids"),
                  "experts": r.model_extra.get("experts"), "usage": r.usage.total_tokens, "err": err}))
"#;
    let o = Command::new("python3")
        .env("PYTHONPATH", &deps)
        .args(["-c", script, &format!("http://{}/v1", srv.addr)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["models"], json!(["flexolmo-demo"]));
    assert_eq!(v["text"], v["stream"]);
    assert_eq!(v["experts"], json!(["public", "facts", "math"]));
    assert_eq!(v["err"], 400);
    let want = generate(
        model,
        &[11, 12, 13],
        10,
        &["--exclude".into(), "code".into()],
    );
    assert_eq!(ids(&v["ids"]), want);
    assert_eq!(v["usage"], json!(3 + want.len()));
}

/// A load check on the loopback: `flexrun bench serve` with 16 concurrent streams (bounded in
/// count and time) finishes every request, and every request's tokens match its run alone.
#[test]
fn a_load_of_concurrent_streams_stays_bit_exact() {
    let o = Command::new(bin())
        .args(["bench", "serve", "--model"])
        .arg(demo_model())
        .args([
            "--expert-top-k",
            "2",
            "--clients",
            "16",
            "--requests",
            "48",
            "--max-tokens",
            "24",
        ])
        .args(["--timeout", "60", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["requests"], 48);
    assert_eq!(v["bit_exact"], 48, "{v}");
    assert_eq!(v["concurrent"]["tokens"], v["sequential"]["tokens"]);
    assert!(v["concurrent"]["tokens"].as_u64().unwrap() > 0);
    assert_eq!(v["concurrent"]["clients"], 16);
}
