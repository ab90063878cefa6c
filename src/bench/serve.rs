//! `flexrun bench serve`: a server on the loopback, the same requests sent one after another and
//! then by N concurrent streaming clients. Reports tokens/s of both, latency and time to first
//! token (p50/p99), and checks that every request's tokens were the same both times (a mixed
//! opt-out batch changes nothing).

use crate::ensure;
use crate::error::Result;
use crate::serve::{client, ServeConfig, Served, Server};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct ServeBench {
    pub clients: usize,
    pub requests: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    /// No request may take longer than this.
    pub timeout: Duration,
}

/// One pass over the requests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pass {
    pub clients: usize,
    pub seconds: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ServeReport {
    pub sequential: Pass,
    pub concurrent: Pass,
    pub speedup: f64,
    /// Requests whose tokens were the same alone and in the concurrent batch.
    pub bit_exact: usize,
    pub requests: usize,
    /// Expert selections the requests cycled through.
    pub selections: Vec<String>,
}

struct Outcome {
    ids: Vec<u32>,
    latency: f64,
    ttft: f64,
}

/// Run the benchmark against `served` (started here on 127.0.0.1, any free port).
pub fn serve(served: Served, b: &ServeBench) -> Result<ServeReport> {
    ensure!(
        (1..=256).contains(&b.clients),
        "--clients must be between 1 and 256"
    );
    ensure!(
        (1..=10_000).contains(&b.requests),
        "--requests must be between 1 and 10000"
    );
    let cfg = &served.model.cfg;
    ensure!(
        b.prompt_tokens >= 1 && b.max_tokens >= 1,
        "--prompt-tokens and --max-tokens must be at least 1"
    );
    ensure!(
        b.prompt_tokens + b.max_tokens <= cfg.max_position_embeddings,
        "--prompt-tokens + --max-tokens exceed the model's context of {}",
        cfg.max_position_embeddings
    );
    let vocab = cfg.vocab_size as u64;
    let experts = served.experts.clone();
    // All experts, each expert left out in turn, and the public expert alone.
    let mut selections: Vec<(String, Value)> = vec![("all".into(), json!({}))];
    if experts.len() > 1 {
        for e in &experts {
            selections.push((format!("-{e}"), json!({"exclude": [e]})));
        }
        selections.push((experts[0].clone(), json!({"experts": [experts[0]]})));
    }
    let bodies: Vec<String> = (0..b.requests)
        .map(|r| {
            let prompt: Vec<u64> = (0..b.prompt_tokens as u64)
                .map(|j| crate::hash::mix(&[r as u64, j]) % vocab)
                .collect();
            let mut body = json!({
                "prompt": prompt, "max_tokens": b.max_tokens, "temperature": b.temperature,
                "seed": r, "stream": true, "return_token_ids": true,
            });
            for (k, v) in selections[r % selections.len()].1.as_object().unwrap() {
                body[k] = v.clone();
            }
            body.to_string()
        })
        .collect();
    let server = Server::start(
        served,
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 0,
            max_batch: b.clients,
            max_queue: b.requests,
            drain: Duration::from_secs(5),
            model_id: "bench".into(),
        },
        false,
    )?;
    let addr = server.addr;
    let run = |clients: usize| -> Result<(Pass, Vec<Vec<u32>>)> {
        let next = AtomicUsize::new(0);
        let out: Mutex<Vec<Option<Outcome>>> =
            Mutex::new((0..bodies.len()).map(|_| None).collect());
        let err: Mutex<Option<crate::Error>> = Mutex::new(None);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..clients {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= bodies.len() || err.lock().unwrap().is_some() {
                        return;
                    }
                    match one(addr, &bodies[i], b.timeout) {
                        Ok(o) => out.lock().unwrap()[i] = Some(o),
                        Err(e) => {
                            *err.lock().unwrap() = Some(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = err.into_inner().unwrap() {
            return Err(e);
        }
        let secs = t0.elapsed().as_secs_f64();
        let outs: Vec<Outcome> = out.into_inner().unwrap().into_iter().flatten().collect();
        let tokens: usize = outs.iter().map(|o| o.ids.len()).sum();
        let mut lat: Vec<f64> = outs.iter().map(|o| o.latency * 1e3).collect();
        let mut ttft: Vec<f64> = outs.iter().map(|o| o.ttft * 1e3).collect();
        Ok((
            Pass {
                clients,
                seconds: secs,
                tokens,
                tokens_per_s: tokens as f64 / secs,
                latency_p50_ms: pct(&mut lat, 0.5),
                latency_p99_ms: pct(&mut lat, 0.99),
                ttft_p50_ms: pct(&mut ttft, 0.5),
                ttft_p99_ms: pct(&mut ttft, 0.99),
            },
            outs.into_iter().map(|o| o.ids).collect(),
        ))
    };
    let seq = run(1);
    let conc = seq.as_ref().ok().map(|_| run(b.clients));
    let stopped = server.stop();
    let (seq, seq_ids) = seq?;
    let (conc, conc_ids) = conc.expect("ran after the sequential pass")?;
    stopped?;
    let bit_exact = seq_ids
        .iter()
        .zip(&conc_ids)
        .filter(|(a, b)| a == b)
        .count();
    Ok(ServeReport {
        speedup: conc.tokens_per_s / seq.tokens_per_s,
        sequential: seq,
        concurrent: conc,
        bit_exact,
        requests: b.requests,
        selections: selections.into_iter().map(|s| s.0).collect(),
    })
}

/// One streamed request: its tokens, its latency and time to first token (seconds).
fn one(addr: std::net::SocketAddr, body: &str, timeout: Duration) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut ttft = None;
    let mut ids = Vec::new();
    let mut failed = None;
    let status = client::stream(
        addr,
        "/v1/completions",
        &[],
        body.as_bytes(),
        timeout,
        &mut |d| {
            if d == "[DONE]" {
                return true;
            }
            match serde_json::from_str::<Value>(d) {
                Ok(v) if v.get("error").is_none() => {
                    ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                    if let Some(a) = v["choices"][0]["token_ids"].as_array() {
                        ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32));
                    }
                    true
                }
                _ => {
                    failed = Some(d.to_string());
                    false
                }
            }
        },
    )?;
    ensure!(
        status == 200 && failed.is_none(),
        "a benchmark request failed ({status}): {}",
        failed.unwrap_or_default()
    );
    Ok(Outcome {
        ids,
        latency: t0.elapsed().as_secs_f64(),
        ttft: ttft.unwrap_or(0.0),
    })
}

/// The `q` quantile (nearest rank) of `v`.
fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}
