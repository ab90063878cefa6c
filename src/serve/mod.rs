//! `flexrun serve`: an OpenAI-compatible HTTP server with continuous batching and per-request
//! expert opt-out.
//!
//! - [`api`]: the completions request and response, OpenAI's error shape, stop strings;
//! - [`engine`]: the engine thread and its continuous batch over the batch-invariant
//!   `model::infer` step, each sequence with its own expert mask;
//! - [`http`]: the routes on tokio + axum, streaming as server-sent events;
//! - [`policy`]: API keys and the experts each may use;
//! - [`metrics`]: Prometheus counters;
//! - [`client`]: a small blocking HTTP/1.1 client (the benchmark and the tests use it).
//!
//! The model runs on the CPU: the GPU decode step has no per-sequence expert mask or
//! per-sequence cache length yet.

pub mod api;
pub mod client;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod policy;

use crate::data::tokenizer::Tokenizer;
use crate::ensure;
use crate::error::{Context, Result};
use crate::model::Model;
use engine::Engine;
use policy::Policy;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// The largest running batch and waiting queue a server takes.
pub const MAX_BATCH: usize = 4096;
pub const MAX_QUEUE: usize = 1 << 16;

/// How to serve.
pub struct ServeConfig {
    pub host: String,
    /// 0: any free port (the bound address is reported).
    pub port: u16,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests waiting for a batch slot before new ones get 429.
    pub max_queue: usize,
    /// After SIGTERM or SIGINT: how long running requests may finish before they are cancelled.
    pub drain: Duration,
    /// The model's id in the API (`/v1/models`, the `model` field).
    pub model_id: String,
}

/// What is served: the model, its expert names and its tokenizer.
pub struct Served {
    pub model: Arc<Model>,
    /// Expert names in the model's order (empty for a dense model).
    pub experts: Vec<String>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub policy: Option<Policy>,
}

/// The state every request handler shares.
pub struct State {
    pub served: Served,
    pub cfg: ServeConfig,
    pub engine: Engine,
    pub draining: AtomicBool,
    /// Request bodies larger than this are refused (413).
    pub max_body: usize,
}

/// A running server: its address, and the way to stop it.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Bind and start serving on a thread of its own. With `signals`, SIGTERM and SIGINT
    /// start a graceful shutdown too.
    pub fn start(served: Served, cfg: ServeConfig, signals: bool) -> Result<Server> {
        ensure!(cfg.max_batch >= 1, "--max-batch must be at least 1");
        ensure!(
            cfg.max_batch <= MAX_BATCH,
            "--max-batch must be at most {MAX_BATCH}"
        );
        ensure!(
            cfg.max_queue <= MAX_QUEUE,
            "--max-queue must be at most {MAX_QUEUE}"
        );
        let mc = &served.model.cfg;
        // Every slot may hold a sequence of the whole context: that must fit, checked now.
        mc.check_cache_memory(cfg.max_batch, mc.max_position_embeddings)
            .context("--max-batch sequences of the full context do not fit in memory (lower --max-batch)")?;
        let listener = std::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let engine = Engine::start(served.model.clone(), cfg.max_batch, cfg.max_queue);
        let max_body = (16 * mc.max_position_embeddings).clamp(1 << 16, 8 << 20);
        let state = Arc::new(State {
            served,
            cfg,
            engine,
            draining: AtomicBool::new(false),
            max_body,
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("flexrun-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("cannot start the async runtime")?;
                rt.block_on(http::serve(listener, state, rx, signals))
            })
            .context("cannot start the server thread")?;
        Ok(Server {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Start a graceful shutdown (as SIGTERM does) and wait for it.
    pub fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait()
    }

    /// Wait until the server has shut down.
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => crate::bail!("the server thread failed"),
            None => Ok(()),
        }
    }
}
