//! `flexrun bench`: throughput of the kernels, of decoding and of training steps.

use crate::opts::{DeviceOpts, SelectOpts};
use clap::Subcommand;
use flexrun::backend::{cuda, Device};
use flexrun::error::{Context, Result};
use flexrun::model::Config;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Flash attention forward and backward throughput on the GPU (causal, bf16, random inputs).
    Attention {
        /// Comma-separated sequence lengths.
        #[arg(long, default_value = "1024,2048,4096,8192,16384")]
        seq: String,
        /// Tokens per call: batch = max(1, tokens / seq).
        #[arg(long, default_value_t = 16384)]
        tokens: usize,
        #[arg(long, default_value_t = 16)]
        heads: usize,
        /// KV heads (GQA when fewer than --heads; default: --heads).
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long, default_value_t = 128)]
        hd: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[command(flatten)]
        device: DeviceOpts,
        #[arg(long)]
        json: bool,
    },
    /// Decode attention on the GPU (one new token per sequence against a KV cache, the split-KV
    /// kernel): GB/s of K and V read against the copy bandwidth measured in the same call.
    AttentionDecode {
        /// Comma-separated batch sizes (sequences decoding together).
        #[arg(long, default_value = "1,4,16,64")]
        batch: String,
        /// Comma-separated context lengths (cached positions, the new one included).
        #[arg(long, default_value = "1024,4096,16384,32768")]
        context: String,
        #[arg(long, default_value_t = 32)]
        heads: usize,
        /// KV heads (GQA when fewer than --heads; default: --heads).
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long, default_value_t = 128)]
        hd: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[command(flatten)]
        device: DeviceOpts,
        #[arg(long)]
        json: bool,
    },
    /// Grouped expert GEMMs of the MoE FFN (forward + backward) on the GPU: TFLOP/s per kernel,
    /// plus cuBLAS per-expert-loop and dense baselines.
    Moe {
        #[arg(long, default_value_t = 8)]
        experts: usize,
        #[arg(long, default_value_t = 4096)]
        tokens_per_expert: usize,
        #[arg(long, default_value_t = 4096)]
        hidden: usize,
        #[arg(long, default_value_t = 11008)]
        intermediate: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[command(flatten)]
        device: DeviceOpts,
        #[arg(long)]
        json: bool,
    },
    /// Greedy decoding with a KV cache: prefill and per-token throughput, the bytes a step must
    /// read and the fraction of the measured copy bandwidth it reaches (cpu, or cuda with
    /// flexrun's kernels), for a random model of a config or for a checkpoint.
    Decode {
        /// A model config (random bf16 weights on the GPU, f32 on the CPU).
        #[arg(long, required_unless_present = "model", conflicts_with = "model")]
        config: Option<PathBuf>,
        /// A checkpoint directory instead of --config.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Override the config's number of layers (quick runs of a large shape).
        #[arg(long)]
        layers: Option<usize>,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[command(flatten)]
        device: DeviceOpts,
        #[arg(long)]
        json: bool,
    },
    /// Full training steps (forward, backward, AdamW) on random tokens.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Time a data owner's expert-training step instead: the (dense) config is the frozen
        /// public model, upcycled to [public FFN, trained copy], with the demo's loss terms.
        #[arg(long)]
        expert: bool,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Micro-batches of --batch x --seq tokens per optimizer step.
        #[arg(long, default_value_t = 1)]
        grad_accum: usize,
        /// Keep only each layer's input and recompute its activations in the backward.
        #[arg(long)]
        recompute: bool,
        #[command(flatten)]
        device: DeviceOpts,
        #[arg(long)]
        json: bool,
    },
    /// `flexrun serve` on the loopback: the same streamed requests (cycling through expert
    /// selections) one after another, then from concurrent clients; tokens/s, p50/p99 latency
    /// and time to first token, and whether every request's tokens were the same both times.
    Serve {
        #[command(flatten)]
        sel: SelectOpts,
        /// Concurrent streaming clients (also the server's batch size).
        #[arg(long, default_value_t = 32)]
        clients: usize,
        #[arg(long, default_value_t = 64)]
        requests: usize,
        #[arg(long, default_value_t = 16)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Seconds any one request may take.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        device: DeviceOpts,
        #[arg(long)]
        json: bool,
    },
}

/// The GPU of a kernel benchmark (they time CUDA kernels only).
/// The comma-separated list of sizes given to `flag`.
fn sizes(flag: &str, list: &str) -> Result<Vec<usize>> {
    list.split(',')
        .map(|t| {
            t.trim().parse::<usize>().map_err(|_| {
                flexrun::error::Error(format!("{flag}: '{t}' is not a size (in {list})"))
            })
        })
        .collect()
}

/// A GPU benchmark's rows as one JSON object with the framework and device.
fn json_rows(dev: &cuda::Device, rows: &impl serde::Serialize) -> Result<()> {
    outln!(
        "{}",
        serde_json::json!({ "framework": "flexrun", "device": dev.name()?, "rows": rows })
    );
    Ok(())
}

fn gpu_only<'a>(device: &'a Device, what: &str) -> Result<&'a cuda::Device> {
    device
        .gpu()
        .with_context(|| format!("{what}: it needs a GPU (--device cuda), and none is in use"))
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Attention {
            seq,
            tokens,
            heads,
            kv_heads,
            hd,
            iters,
            warmup,
            device,
            json,
        } => {
            let seqs = sizes("--seq", &seq)?;
            let device = device.open()?;
            let dev = gpu_only(&device, "bench attention times the CUDA flash kernels")?;
            let cfg = flexrun::bench::attention::BenchConfig {
                seqs,
                tokens,
                heads,
                kv_heads: kv_heads.unwrap_or(heads),
                hd,
                iters,
                warmup,
            };
            let rows = flexrun::bench::attention::bench_attention(dev, &cfg)?;
            if json {
                json_rows(dev, &rows)?;
            } else {
                outln!(
                    "{}: causal bf16 attention, {heads} heads ({} kv) of {hd}",
                    dev.name()?,
                    cfg.kv_heads
                );
                for r in &rows {
                    outln!(
                        "seq {:>6} x batch {:>3}: fwd {:8.3} ms {:6.1} TFLOP/s | bwd {:8.3} ms {:6.1} TFLOP/s ({})",
                        r.seq, r.batch, r.fwd_ms, r.fwd_tflops, r.bwd_ms, r.bwd_tflops, r.fwd_kernel
                    );
                }
            }
        }
        BenchCmd::AttentionDecode {
            batch,
            context,
            heads,
            kv_heads,
            hd,
            iters,
            warmup,
            device,
            json,
        } => {
            let cfg = flexrun::bench::attention::DecodeConfig {
                batches: sizes("--batch", &batch)?,
                contexts: sizes("--context", &context)?,
                heads,
                kv_heads: kv_heads.unwrap_or(heads),
                hd,
                iters,
                warmup,
            };
            let device = device.open()?;
            let dev = gpu_only(
                &device,
                "bench attention-decode times the CUDA decode kernel",
            )?;
            let rows = flexrun::bench::attention::bench_decode_attention(dev, &cfg)?;
            if json {
                json_rows(dev, &rows)?;
            } else {
                outln!(
                    "{}: decode attention, {heads} heads ({} kv) of {hd}; copy bandwidth {:.0} GB/s",
                    dev.name()?,
                    cfg.kv_heads,
                    rows.first().map_or(0.0, |r| r.copy_gb_per_s)
                );
                for r in &rows {
                    outln!(
                        "batch {:>3} x context {:>6}: {:9.1} us {:7.0} GB/s ({:4.0}% of copy, {} chunks)",
                        r.batch, r.context, r.us, r.gb_per_s, 100.0 * r.fraction, r.chunks
                    );
                }
            }
        }
        BenchCmd::Moe {
            experts,
            tokens_per_expert,
            hidden,
            intermediate,
            iters,
            warmup,
            device,
            json,
        } => {
            let device = device.open()?;
            let dev = gpu_only(&device, "bench moe times the CUDA grouped GEMM kernels")?;
            let r = flexrun::bench::moe::bench_grouped(
                dev,
                experts,
                tokens_per_expert,
                hidden,
                intermediate,
                iters,
                warmup,
            )?;
            if json {
                outln!("{}", serde_json::to_string(&r)?);
            } else {
                outln!(
                    "{}: {} experts x {} tokens, H={} I={}",
                    r.device,
                    r.experts,
                    r.tokens_per_expert,
                    r.hidden,
                    r.intermediate
                );
                for op in &r.ops {
                    outln!("  {:<22} {:9.3} ms {:8.1} TFLOP/s", op.op, op.ms, op.tflops);
                }
            }
        }
        BenchCmd::Decode {
            config,
            model,
            layers,
            batch,
            prompt,
            new_tokens,
            device,
            json,
        } => {
            flexrun::ensure!(
                layers.is_none() || config.is_some(),
                "--layers overrides the layer count of a --config (not of a --model)"
            );
            let device = device.open()?;
            let (what, m) = match (&config, &model) {
                (Some(c), _) => {
                    let mut cfg = Config::load(c)?;
                    if let Some(l) = layers {
                        flexrun::ensure!(l >= 1, "--layers must be at least 1");
                        cfg.num_hidden_layers = l;
                    }
                    let m =
                        flexrun::model::Model::new_random_fast(&cfg, 0, device.gpu().is_some())?;
                    (c.display().to_string(), m)
                }
                (None, Some(dir)) => {
                    let sel = SelectOpts {
                        model: dir.clone(),
                        exclude: vec![],
                        experts: vec![],
                        expert_top_k: None,
                    };
                    (dir.display().to_string(), sel.load()?.model)
                }
                (None, None) => flexrun::bail!("give --config or --model"),
            };
            let r = flexrun::bench::decode(&m, batch, prompt, new_tokens, &device)?;
            if json {
                outln!("{}", serde_json::to_string(&r)?);
            } else {
                outln!(
                    "{what} on {}: batch {batch}, prompt {prompt}, {} params: prefill {:.1} ms ({:.0} tokens/s), decode {:.2} ms/step ({:.0} tokens/s)",
                    r.device,
                    r.params,
                    r.prefill_ms,
                    r.prefill_tokens_per_s,
                    r.step_ms,
                    r.decode_tokens_per_s
                );
                outln!(
                    "  a step reads {:.1} MB of weights{} + {:.1} MB of KV cache: {:.1} GB/s, {:.0}% of the roofline (measured here: copy {:.1} GB/s{})",
                    r.weight_bytes_per_step / 1e6,
                    if m.cfg.is_moe() {
                        format!(
                            " ({:.2} experts a layer, {})",
                            r.experts_hit,
                            if r.experts_hit_measured { "measured" } else { "bound" }
                        )
                    } else {
                        String::new()
                    },
                    r.kv_bytes_per_step / 1e6,
                    r.achieved_gb_per_s,
                    100.0 * r.roofline_fraction,
                    r.copy_gb_per_s,
                    r.read_gb_per_s.map(|x| format!(", read {x:.1} GB/s")).unwrap_or_default()
                );
            }
        }
        BenchCmd::Train {
            config,
            expert,
            batch,
            seq,
            steps,
            warmup,
            grad_accum,
            recompute,
            device,
            json,
        } => {
            let cfg = Config::load(&config)?;
            let mode = if expert {
                flexrun::bench::TrainMode::Expert
            } else {
                flexrun::bench::TrainMode::Full
            };
            let device = device.open()?;
            let spec = flexrun::bench::StepSpec {
                grad_accum,
                recompute,
                ..flexrun::bench::StepSpec::new(mode, batch, seq, steps, warmup)
            };
            let r = flexrun::bench::train_step(&cfg, &spec, &device)?;
            if json {
                outln!("{}", serde_json::to_string(&r)?);
            } else {
                let mfu = match (r.model_tflops, r.mfu) {
                    (Some(t), Some(m)) => format!(", {t:.1} TFLOP/s, MFU {:.1}%", 100.0 * m),
                    (Some(t), None) => format!(", {t:.1} TFLOP/s"),
                    _ => String::new(),
                };
                let mem = r
                    .peak_device_bytes
                    .map(|b| {
                        format!(
                            ", peak device memory {:.2} GiB",
                            b as f64 / (1u64 << 30) as f64
                        )
                    })
                    .unwrap_or_default();
                outln!(
                    "{} on {}: batch {batch} x seq {seq} x {grad_accum} micro-batches, {} params: {:.1} ms/step, {:.0} tokens/s{mfu}{mem}",
                    config.display(),
                    r.device,
                    r.params,
                    r.step_ms,
                    r.tokens_per_s,
                );
            }
        }
        BenchCmd::Serve {
            sel,
            clients,
            requests,
            prompt_tokens,
            max_tokens,
            temperature,
            timeout,
            device,
            json,
        } => {
            device.cpu_only("serve")?;
            let loaded = sel.load()?;
            let served = flexrun::serve::Served {
                model: std::sync::Arc::new(loaded.model),
                experts: loaded.expert_names,
                tokenizer: None,
                policy: None,
            };
            let b = flexrun::bench::serve::ServeBench {
                clients,
                requests,
                prompt_tokens,
                max_tokens,
                temperature,
                timeout: std::time::Duration::from_secs(timeout),
            };
            let r = flexrun::bench::serve::serve(served, &b)?;
            if json {
                outln!("{}", serde_json::to_string(&r)?);
            } else {
                outln!(
                    "{} requests ({prompt_tokens} prompt tokens, up to {max_tokens} new, temperature {temperature}), experts cycling through {}, on the CPU",
                    r.requests,
                    r.selections.join(" ")
                );
                for p in [&r.sequential, &r.concurrent] {
                    outln!(
                        "{:>3} client(s): {:6} tokens in {:6.2} s = {:8.1} tokens/s | latency p50 {:8.1} ms p99 {:8.1} ms | first token p50 {:7.1} ms p99 {:7.1} ms",
                        p.clients, p.tokens, p.seconds, p.tokens_per_s, p.latency_p50_ms,
                        p.latency_p99_ms, p.ttft_p50_ms, p.ttft_p99_ms
                    );
                }
                outln!(
                    "speed-up {:.1}x; bit-exact alone and batched: {}/{} requests",
                    r.speedup,
                    r.bit_exact,
                    r.requests
                );
            }
        }
    }
    Ok(())
}
