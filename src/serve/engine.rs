//! Continuous batching: one engine thread owns the model and every sequence's KV cache, and
//! runs decode steps over whatever sequences are running; requests join the batch between
//! steps and leave it when they finish, are cancelled or their client goes away.
//!
//! Each step is one [`Model::step_seqs`] over the running sequences: a newly admitted sequence
//! brings its whole prompt, the others one token each, and every sequence routes only over its
//! own allowed experts. The step is batch-invariant, so a sequence's tokens do not depend on
//! what else runs beside it: they are those of `flexrun generate` with the same settings.

use super::metrics::Metrics;
use crate::generate::{sample, SamplingConfig};
use crate::model::infer::{SeqCache, SeqStep};
use crate::model::Model;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// One request for the engine: a checked prompt and its settings.
pub struct Job {
    pub prompt: Vec<u32>,
    /// `max_new_tokens` and the stop token (the model's end of text) are the limits.
    pub sampling: SamplingConfig,
    /// `allowed[e]` for each expert of the model (`None`: every expert, or a dense model).
    pub allowed: Option<Vec<bool>>,
    pub events: UnboundedSender<Event>,
}

/// What the engine tells a request.
#[derive(Debug, PartialEq)]
pub enum Event {
    Token(u32),
    /// Finished: `true` when the model ended the text, `false` at the token limit.
    Done {
        stopped: bool,
    },
    /// The sequence was dropped: the message says why (a server error or shutdown).
    Failed(String),
}

/// Why a job was not accepted.
pub enum Refused {
    /// The queue is full: answer 429.
    Full,
    /// The server is shutting down: answer 503.
    ShuttingDown,
}

/// The handle the HTTP side holds.
pub struct Engine {
    tx: std::sync::Mutex<Option<std_mpsc::Sender<Job>>>,
    pub metrics: Arc<Metrics>,
    max_queue: u64,
    cancel: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Seq {
    job: Job,
    cache: SeqCache,
    next: Vec<u32>,
    produced: usize,
    rng: StdRng,
    done: bool,
}

impl Engine {
    /// Start the engine thread over `model` with at most `max_batch` running sequences and
    /// `max_queue` waiting ones.
    pub fn start(model: Arc<Model>, max_batch: usize, max_queue: usize) -> Engine {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let experts = if model.cfg.is_moe() {
            model.cfg.experts()
        } else {
            0
        };
        let metrics = Arc::new(Metrics::new(experts));
        let cancel = Arc::new(AtomicBool::new(false));
        let (m, c) = (metrics.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name("flexrun-engine".into())
            .spawn(move || run(&model, rx, max_batch, &m, &c))
            .expect("spawn the engine thread");
        Engine {
            tx: std::sync::Mutex::new(Some(tx)),
            metrics,
            max_queue: max_queue as u64,
            cancel,
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    /// Queue a job, or refuse it when the queue is full or the engine is stopping.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = tx.as_ref() else {
            return Err(Refused::ShuttingDown);
        };
        // Count first, so that concurrent submissions cannot overshoot the bound.
        if self.metrics.queued.fetch_add(1, Relaxed) >= self.max_queue {
            self.metrics.queued.fetch_sub(1, Relaxed);
            return Err(Refused::Full);
        }
        tx.send(job).map_err(|_| {
            self.metrics.queued.fetch_sub(1, Relaxed);
            Refused::ShuttingDown
        })
    }

    /// Stop taking jobs; running and queued ones finish (see [`Engine::cancel_all`]).
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// End every running and queued sequence now (each gets [`Event::Failed`]).
    pub fn cancel_all(&self) {
        self.cancel.store(true, Relaxed);
    }

    /// Sequences running or queued.
    pub fn in_flight(&self) -> u64 {
        self.metrics.running.load(Relaxed) + self.metrics.queued.load(Relaxed)
    }

    /// Close, and wait for the engine thread to finish what it has.
    pub fn join(&self) {
        self.close();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn run(
    model: &Model,
    rx: std_mpsc::Receiver<Job>,
    max_batch: usize,
    metrics: &Metrics,
    cancel: &AtomicBool,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut open = true;
    loop {
        if running.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(j) => waiting.push_back(j),
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(j) => waiting.push_back(j),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if cancel.load(Relaxed) {
            for j in waiting.drain(..) {
                metrics.queued.fetch_sub(1, Relaxed);
                let _ = j
                    .events
                    .send(Event::Failed("the server is shutting down".into()));
            }
            for s in running.drain(..) {
                let _ = s
                    .job
                    .events
                    .send(Event::Failed("the server is shutting down".into()));
            }
            metrics.running.store(0, Relaxed);
            if !open {
                return;
            }
            continue;
        }
        // Leave: clients that went away free their slot and cache before the step.
        running.retain(|s| !s.job.events.is_closed());
        // Join: the oldest waiting jobs, up to the batch size.
        while running.len() < max_batch {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            metrics.queued.fetch_sub(1, Relaxed);
            if job.events.is_closed() {
                continue;
            }
            let capacity = job.prompt.len() + job.sampling.max_new_tokens;
            match SeqCache::new(&model.cfg, capacity) {
                Ok(cache) => {
                    metrics
                        .prompt_tokens
                        .fetch_add(job.prompt.len() as u64, Relaxed);
                    running.push(Seq {
                        next: job.prompt.clone(),
                        rng: StdRng::seed_from_u64(job.sampling.seed),
                        job,
                        cache,
                        produced: 0,
                        done: false,
                    })
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        metrics.running.store(running.len() as u64, Relaxed);
        if running.is_empty() {
            continue;
        }
        step(model, &mut running, metrics);
        running.retain(|s| !s.done);
        metrics.running.store(running.len() as u64, Relaxed);
    }
}

/// One decode step of every running sequence; finished ones are marked `done`.
fn step(model: &Model, running: &mut [Seq], metrics: &Metrics) {
    let out = {
        let mut seqs: Vec<SeqStep<'_>> = running
            .iter_mut()
            .map(|s| SeqStep {
                ids: &s.next,
                cache: &mut s.cache,
                allowed: s.job.allowed.as_deref(),
            })
            .collect();
        model.step_seqs(&mut seqs)
    };
    metrics.steps.fetch_add(1, Relaxed);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            for s in running.iter_mut() {
                let _ = s.job.events.send(Event::Failed(e.to_string()));
                s.done = true;
            }
            return;
        }
    };
    for (c, r) in metrics.routed.iter().zip(&out.routed) {
        c.fetch_add(*r, Relaxed);
    }
    for (s, logits) in running.iter_mut().zip(out.logits) {
        if let Err(e) = crate::model::runner::finite(&logits) {
            let _ = s.job.events.send(Event::Failed(e.to_string()));
            s.done = true;
            continue;
        }
        // As `generate`: the sequence's own rng, the end-of-text token ends it (not sent).
        let tok = sample(&logits, &s.job.sampling, &mut s.rng);
        if Some(tok) == s.job.sampling.stop_token {
            let _ = s.job.events.send(Event::Done { stopped: true });
            s.done = true;
            continue;
        }
        metrics.generated_tokens.fetch_add(1, Relaxed);
        s.produced += 1;
        if s.job.events.send(Event::Token(tok)).is_err() {
            s.done = true;
            continue;
        }
        if s.produced >= s.job.sampling.max_new_tokens {
            let _ = s.job.events.send(Event::Done { stopped: false });
            s.done = true;
        }
        s.next.clear();
        s.next.push(tok);
    }
}
