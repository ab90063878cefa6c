//! `flexrun serve`: the OpenAI-compatible server.

use crate::opts::{DeviceOpts, SelectOpts};
use clap::Args;
use flexrun::backend::DeviceChoice;
use flexrun::error::Result;
use flexrun::serve::{policy::Policy, ServeConfig, Served, Server};
use flexrun::{data, ensure};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// The model directory; --exclude/--experts narrow what every request may use.
    #[command(flatten)]
    pub sel: SelectOpts,
    #[command(flatten)]
    pub device: DeviceOpts,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Sequences decoded together in one step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Requests waiting for a batch slot; past this, new requests get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// API keys and the experts each may use (JSON; see docs/SERVE.md).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Seconds running requests may take to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// The model's id in the API (default: the model directory's name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Tokenizer file (default: tokenizer.json in the model directory, if any).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    ensure!(
        a.device.device != DeviceChoice::Cuda,
        "serve runs on the CPU for now (the GPU decode step has no per-request expert mask yet): use --device cpu or auto"
    );
    ensure!(
        a.drain_timeout <= 3600,
        "--drain-timeout is in seconds, at most 3600"
    );
    let loaded = a.sel.load()?;
    let tokenizer = match &a.tokenizer {
        Some(p) => Some(data::Tokenizer::load(p)?),
        None => {
            let p = flexrun::fsutil::confined(&a.sel.model, "tokenizer.json", "tokenizer")?;
            match p.exists() {
                true => Some(data::Tokenizer::load(&p)?),
                false => None,
            }
        }
    };
    if let Some(t) = &tokenizer {
        ensure!(
            t.vocab_size() <= loaded.model.cfg.vocab_size,
            "the tokenizer has {} tokens, the model's vocabulary {}",
            t.vocab_size(),
            loaded.model.cfg.vocab_size
        );
    }
    let experts = loaded.expert_names.clone();
    let policy = match &a.policy {
        Some(p) => Some(Policy::load(p, &experts)?),
        None => None,
    };
    if loaded.manifest.as_ref().is_some_and(|m| !m.strict_opt_out) {
        flexrun::note!("note: this model was router-tuned: a request that excludes experts is not identical to a model that never had them");
    }
    let model_id = match &a.model_id {
        Some(id) => id.clone(),
        None => a
            .sel
            .model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "flexrun".into()),
    };
    let cfg = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        drain: Duration::from_secs(a.drain_timeout),
        model_id: model_id.clone(),
    };
    let served = Served {
        model: Arc::new(loaded.model),
        experts: experts.clone(),
        tokenizer: tokenizer.map(Arc::new),
        policy,
    };
    let open = served.policy.is_none();
    let server = Server::start(served, cfg, true)?;
    if open && !server.addr.ip().is_loopback() {
        flexrun::note!(
            "warning: serving on {} without --policy: anyone who can reach it may use every expert",
            server.addr
        );
    }
    outln!(
        "serving {model_id} on http://{} ({}; up to {} sequences per step, on the CPU)",
        server.addr,
        if experts.is_empty() {
            "a dense model".to_string()
        } else {
            format!("experts: {}", experts.join(", "))
        },
        a.max_batch
    );
    server.wait()?;
    outln!("flexrun serve: stopped");
    Ok(())
}
