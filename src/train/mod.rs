//! The training loop: gradient accumulation, clipping, AdamW, warmup + cosine schedule, periodic
//! validation, progress, and checkpoints that resume exactly.
//!
//! Determinism: batches are a pure function of (seed, step, micro-batch) and every reduction has a
//! fixed order, so a run resumed from a checkpoint produces the same losses as an uninterrupted one.

pub mod checkpoint;
mod config;
pub use config::TrainConfig;
pub mod data;
pub mod dp;
pub mod optim;
pub mod pretrain;

use crate::backend::cuda::Device;
use crate::backend::kernels::Kernels;
use crate::error::Result;
use crate::model::net::NetTrainer;
use crate::model::{LossCoefs, Model};
use crate::ops::host::Host;
use crate::tensor::Tensor;
use crate::{bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use optim::{lr_at, AdamW};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A source of training and validation batches (`inputs`, `targets`, both `[batch*seq]`).
pub trait Batches: Sync {
    fn train(&self, step: u64, micro: u64) -> Result<(Vec<u32>, Vec<u32>)>;
    fn valid(&self) -> Result<Vec<(Vec<u32>, Vec<u32>)>>;
    /// Rows of the training batch `(step, micro)` that are public text, on which the public
    /// anchor applies (see [`TrainConfig::public_anchor`]); empty for none.
    fn anchored(&self, _step: u64, _micro: u64) -> Vec<bool> {
        Vec::new()
    }
    /// Differentially private training ([`dp`]): the number of private records.
    fn dp_records(&self) -> Result<usize> {
        bail!("this training command has no differentially private mode")
    }
    /// The private records sampled at `step` with probability `q` each, and the public rows.
    fn dp_batch(&self, _step: u64, _q: f64) -> Result<dp::DpBatch> {
        bail!("this training command has no differentially private mode")
    }
}

/// One line of `train_log.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    pub step: u64,
    pub loss: f32,
    pub ce: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub valid_ce: Option<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub tokens: u64,
    pub final_ce: f32,
    pub valid_ce: Option<f32>,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Differentially private runs: the epsilon of the (epsilon, delta) guarantee after all
    /// steps so far, and the sampling rate it was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_epsilon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_sample_rate: Option<f64>,
    /// GPU runs: the most device memory live buffers held at once (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_bytes: Option<usize>,
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// DP-SGD's Gaussian noise of one step (standard deviation `std`) for every trainable parameter
/// of `model`, in id order, from a stream seeded by `(seed, step)`: the CPU and the GPU step
/// draw the same noise.
fn dp_noise(model: &Model, seed: u64, step: u64, std: f32) -> Vec<(usize, Tensor)> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(crate::hash::mix(&[
        seed,
        step,
        0x0D15_7A1C,
    ]));
    model
        .params
        .params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.trainable)
        .map(|(i, p)| (i, Tensor::randn(p.value.shape(), std, &mut rng)))
        .collect()
}

/// Where a run writes: its log and its resumable checkpoint.
/// The largest training log read back (a line per step is about 200 bytes).
const MAX_LOG_BYTES: u64 = 1 << 32;

pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("train_log.jsonl")
    }
    /// Whether the directory holds an earlier run that can be resumed: a checkpoint (a log
    /// without one is what a run killed before its first checkpoint leaves, and starts over).
    pub fn holds_run(&self) -> bool {
        self.checkpoint().exists() || self.dir.join(".checkpoint.old").exists()
    }
    /// Remove an earlier run's checkpoint and log (the rest of the directory stays), so that a
    /// pipeline that owns this directory can start the run over.
    pub fn clear(dir: &Path) -> Result<()> {
        let run = RunDir {
            dir: dir.to_path_buf(),
        };
        for d in [
            run.checkpoint(),
            dir.join(".checkpoint.old"),
            dir.join(".checkpoint.tmp"),
        ] {
            if d.exists() {
                std::fs::remove_dir_all(&d)
                    .map_err(|e| crate::Error(format!("removing {}: {e}", d.display())))?;
            }
        }
        if run.log().exists() {
            std::fs::remove_file(run.log())
                .map_err(|e| crate::Error(format!("removing {}: {e}", run.log().display())))?;
        }
        Ok(())
    }
}

pub struct Trainer<'a> {
    pub model: &'a mut Model,
    pub cfg: TrainConfig,
    pub opt: AdamW,
    pub step: u64,
    pub tokens: u64,
    pub run: RunDir,
    pub quiet: bool,
    /// Extra JSON stored with each checkpoint (e.g. what the run is), returned on resume.
    pub tag: serde_json::Value,
    /// Stop (with a checkpoint) once this step is reached, as an interruption would.
    pub stop_at: Option<u64>,
    /// Train on this GPU (else on the CPU); either way the host model and optimizer state are
    /// brought up to date at each checkpoint.
    pub device: Option<&'a Device>,
    /// The frozen parameters' hash ([`checkpoint::frozen_hash`]), computed at the first
    /// checkpoint or resume: frozen parameters do not change during a run.
    frozen: std::sync::OnceLock<Option<String>>,
    _lock: crate::fsutil::PathLock,
}

impl<'a> Trainer<'a> {
    /// [`Trainer::new`] as the training commands set it up: the run's `tag` (what it trains,
    /// against what; a resumed checkpoint must carry the same), progress shown unless `quiet`,
    /// on `device` when given, continued from the run directory's checkpoint with `resume`.
    pub fn start(
        model: &'a mut Model,
        cfg: TrainConfig,
        dir: &Path,
        tag: serde_json::Value,
        quiet: bool,
        device: &'a crate::backend::Device,
        resume: bool,
    ) -> Result<Self> {
        let mut tr = Trainer::new(model, cfg, dir)?;
        tr.tag = tag;
        tr.quiet = quiet;
        tr.device = device.gpu();
        if resume {
            tr.resume()?;
        } else {
            // A log left by a run killed before its first checkpoint starts over.
            if !tr.run.holds_run() && tr.run.log().exists() {
                std::fs::remove_file(tr.run.log()).map_err(|e| {
                    crate::Error(format!("removing {}: {e}", tr.run.log().display()))
                })?;
            }
            ensure!(
                !tr.run.holds_run(),
                "{} already holds a training run; pass --resume to continue it, or remove it (or choose another directory) to start over",
                dir.display()
            );
        }
        Ok(tr)
    }

    pub fn new(model: &'a mut Model, cfg: TrainConfig, dir: &Path) -> Result<Self> {
        cfg.check()?;
        ensure!(
            model.params.trainable_numel() > 0,
            "nothing to train: every parameter is frozen"
        );
        crate::model::net::grad_from(model)?;
        ensure!(
            cfg.seq <= model.cfg.max_position_embeddings,
            "seq {} exceeds max_position_embeddings {}",
            cfg.seq,
            model.cfg.max_position_embeddings
        );
        // One process per run directory: a second one would interleave checkpoints and logs.
        let lock = crate::fsutil::PathLock::acquire(dir)?;
        // A model write into this directory that was interrupted (pretrain's run directory is
        // also its model directory) is finished first, so the run's checkpoint is in place.
        crate::fsutil::recover_interrupted(dir)?;
        // A run directory is new, empty, or an earlier run or model: never a dataset or a
        // directory of other files (a run's checkpoint and log would be mixed into them).
        crate::fsutil::check_model_out(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::Error(format!("creating {}: {e}", dir.display())))?;
        let run = RunDir {
            dir: dir.to_path_buf(),
        };
        for (p, what) in [
            (run.log(), "training log"),
            (run.checkpoint(), "checkpoint"),
        ] {
            if let Ok(m) = std::fs::metadata(&p) {
                let ok = if what == "checkpoint" {
                    m.is_dir()
                } else {
                    m.is_file()
                };
                ensure!(
                    ok,
                    "{} is not a {what} (not a regular {})",
                    p.display(),
                    if what == "checkpoint" {
                        "directory"
                    } else {
                        "file"
                    }
                );
            }
        }
        let opt = AdamW::new(cfg.adamw, model.params.len());
        Ok(Trainer {
            model,
            cfg,
            opt,
            step: 0,
            tokens: 0,
            run: RunDir {
                dir: dir.to_path_buf(),
            },
            quiet: false,
            tag: serde_json::Value::Null,
            stop_at: None,
            device: None,
            frozen: std::sync::OnceLock::new(),
            _lock: lock,
        })
    }

    /// Continue from the run directory's checkpoint: parameters, optimizer moments, step, tokens.
    /// The training config must match the one the checkpoint was written with (steps may grow),
    /// and so must the run's tag (e.g. the public model an expert is trained against), when both
    /// have one: a checkpoint restores every weight, frozen ones included.
    pub fn resume(&mut self) -> Result<()> {
        let ck = checkpoint::read(&self.run.checkpoint(), self.model)?;
        if !ck.tag.is_null() && !self.tag.is_null() && ck.tag != self.tag {
            bail!(
                "cannot resume {}: its checkpoint was written for other inputs ({})",
                self.run.dir.display(),
                json_diff(&self.tag, &ck.tag)
            );
        }
        if ck.frozen_hash.as_deref() != self.frozen_hash() && ck.frozen_hash.is_some() {
            bail!(
                "cannot resume {}: its checkpoint was trained against other frozen weights than this run's (another public model, or other trained parameters)",
                self.run.dir.display()
            );
        }
        let mut saved = ck.cfg.clone();
        saved.steps = self.cfg.steps;
        saved.eval_every = self.cfg.eval_every;
        saved.save_every = self.cfg.save_every;
        saved.recompute = self.cfg.recompute;
        if saved != self.cfg {
            bail!(
                "cannot resume {}: the training settings differ from the checkpoint's ({})",
                self.run.dir.display(),
                settings_diff(&self.cfg, &saved)
            );
        }
        ensure!(
            ck.step <= self.cfg.steps,
            "checkpoint is at step {} beyond --steps {}",
            ck.step,
            self.cfg.steps
        );
        self.opt = ck.opt;
        self.step = ck.step;
        self.tokens = ck.tokens;
        // Drop log lines written after the checkpoint (an interrupted run).
        let log = self.run.log();
        if let Ok(text) = crate::fsutil::read_text(&log, "training log", MAX_LOG_BYTES) {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<LogEntry>(l)
                        .map(|e| e.step <= self.step)
                        .unwrap_or(false)
                })
                .collect();
            let mut s = kept.join("\n");
            if !s.is_empty() {
                s.push('\n');
            }
            crate::fsutil::write_bytes_atomic(&log, s.as_bytes())?;
        }
        Ok(())
    }

    pub fn save_checkpoint(&self) -> Result<()> {
        checkpoint::write(
            &self.run.checkpoint(),
            self.model,
            &self.opt,
            &self.cfg,
            self.step,
            self.tokens,
            &self.tag,
            self.frozen_hash(),
        )
    }

    /// See [`Trainer::frozen`].
    fn frozen_hash(&self) -> Option<&str> {
        self.frozen
            .get_or_init(|| checkpoint::frozen_hash(self.model))
            .as_deref()
    }

    /// Run until `cfg.steps`; returns a summary. Writes `train_log.jsonl` and checkpoints.
    /// The steps run on [`Trainer::device`] when it is set, else on the CPU: the same model,
    /// loss and step ([`NetTrainer`]) on either backend.
    pub fn run(&mut self, data: &dyn Batches) -> Result<TrainSummary> {
        match self.device {
            Some(dev) => {
                dev.reset_peak_memory();
                self.run_on(dev, data)
            }
            // On a rayon worker, so the CPU kernels' parallel loops fork and join inside the
            // pool instead of each one injecting a job from outside and putting the calling
            // thread to sleep until it completes (~6% of a small MoE step on 2 cores).
            None => {
                let r = rayon::scope(|_| self.run_on(&Host, data));
                // The step's buffers stay cached only while training.
                crate::ops::host::release_cached();
                r
            }
        }
    }

    fn run_on<K: Kernels>(&mut self, dev: &K, data: &dyn Batches) -> Result<TrainSummary> {
        let c = self.cfg.clone();
        let coefs = LossCoefs {
            z_loss: c.z_loss,
            router_z_loss: c.router_z_loss,
            public_anchor: c.public_anchor,
            public_anchor_layers: c.public_anchor_layers.clone(),
            router_own: c.router_own,
            router_public: c.router_public,
            expert_loudness: c.expert_loudness,
        };
        let tokens_per_step = (c.batch * c.seq * c.grad_accum) as u64;
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(c.steps)
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix("train");
        bar.set_position(self.step);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run.log())
            .map_err(|e| crate::Error(format!("opening {}: {e}", self.run.log().display())))?;
        let start = Instant::now();
        let start_step = self.step;
        let mut last_ce = f32::NAN;
        let mut valid_ce = None;
        let end = self.stop_at.map_or(c.steps, |s| s.min(c.steps));
        // DP-SGD: the sampling rate of the private records.
        let dp_rate = match &c.dp {
            Some(dp) => {
                dp.check()?;
                ensure!(
                    c.grad_accum == 1,
                    "differentially private training takes no gradient accumulation"
                );
                let n = data.dp_records()?;
                ensure!(n > 0, "no private records to train on");
                let q = (dp.rows as f64 / n as f64).min(1.0);
                Some((q, q * n as f64))
            }
            None => None,
        };
        let mut g = NetTrainer::from_host(dev, self.model, &self.opt, c.clip)?;
        g.model.set_recompute(c.recompute);
        while self.step < end {
            let lr = lr_at(self.step, c.lr, c.warmup, c.steps, c.min_lr_ratio);
            let o = match (&c.dp, dp_rate) {
                (Some(dp), Some((q, expected))) => {
                    let batch = data.dp_batch(self.step, q)?;
                    let noise = dp_noise(self.model, c.seed, self.step, dp.noise * dp.clip);
                    let public = (batch.public_rows > 0)
                        .then(|| (&batch.public.0[..], &batch.public.1[..], batch.public_rows));
                    g.dp_step(
                        &batch.private,
                        public,
                        c.seq,
                        lr,
                        &coefs,
                        dp.clip,
                        &noise,
                        expected + batch.public_rows as f64,
                    )?
                }
                _ => {
                    let micro = (0..c.grad_accum as u64)
                        .map(|m| data.train(self.step, m))
                        .collect::<Result<Vec<_>>>()?;
                    let anchored: Vec<Vec<bool>> = (0..c.grad_accum as u64)
                        .map(|m| data.anchored(self.step, m))
                        .collect();
                    g.step(&micro, &anchored, c.batch, c.seq, lr, &coefs)?
                }
            };
            let (loss, gnorm) = (o.loss, o.grad_norm);
            last_ce = o.ce;
            if !loss.is_finite() {
                bail!("training diverged at step {}: loss is {loss}", self.step);
            }
            self.step += 1;
            self.tokens += tokens_per_step;
            let mut entry = LogEntry {
                step: self.step,
                loss,
                ce: last_ce,
                lr,
                grad_norm: gnorm,
                tokens: self.tokens,
                valid_ce: None,
            };
            let validate =
                (c.eval_every > 0 && self.step % c.eval_every == 0) || self.step == c.steps;
            let save = (c.save_every > 0 && self.step % c.save_every == 0) || self.step == end;
            if save {
                g.to_host(self.model, &mut self.opt)?;
            }
            if validate {
                // Validation's buffers have other sizes than the step's.
                dev.release_cached();
                valid_ce = g.valid_ce(&data.valid()?, c.seq)?;
                entry.valid_ce = valid_ce;
            }
            writeln!(log, "{}", serde_json::to_string(&entry)?)?;
            let elapsed = start.elapsed().as_secs_f64();
            let tps = (self.step - start_step) as f64 * tokens_per_step as f64 / elapsed.max(1e-9);
            let v = valid_ce.map(|v| format!(" val {v:.3}")).unwrap_or_default();
            let mem = match self.device {
                Some(dev) => format!(" mem {:.2} GiB", gib(dev.pool_stats().peak_in_use)),
                None => String::new(),
            };
            let msg = format!("loss {loss:.3}{v} lr {lr:.1e} {tps:.0} tok/s{mem}");
            bar.set_position(self.step);
            if !self.quiet
                && bar.is_hidden()
                && (self.step % (c.steps / 10).max(1) == 0 || self.step == end)
            {
                // No terminal (logs, CI): a plain progress line every tenth of the run.
                let eta = (c.steps - self.step) as f64 * tokens_per_step as f64 / tps.max(1e-9);
                crate::note!("step {}/{} {msg} eta {eta:.0}s", self.step, c.steps);
            }
            bar.set_message(msg);
            if save {
                self.save_checkpoint()?;
            }
        }
        bar.finish();
        drop(log);
        // The loss curve of the whole run (resumed parts included), as an image.
        let entries = read_log(&self.run.log())?;
        let svg = loss_chart_svg(
            &format!("Training loss, {}", self.run.dir.display()),
            &[("", &entries)],
        );
        crate::fsutil::write_bytes_atomic(&self.run.dir.join("loss.svg"), svg.as_bytes())?;
        let seconds = start.elapsed().as_secs_f64();
        let trained = (self.step - start_step) * tokens_per_step;
        Ok(TrainSummary {
            steps: self.step,
            tokens: self.tokens,
            final_ce: last_ce,
            valid_ce,
            seconds,
            tokens_per_s: trained as f64 / seconds.max(1e-9),
            dp_epsilon: c
                .dp
                .as_ref()
                .zip(dp_rate)
                .map(|(dp, (q, _))| dp::epsilon(q, dp.noise as f64, self.step, dp.delta)),
            dp_sample_rate: dp_rate.map(|(q, _)| q),
            peak_device_bytes: self.device.map(|d| d.pool_stats().peak_in_use),
        })
    }
}

pub use crate::model::mean_ce;

mod log;
pub use log::{loss_chart_svg, read_log};

/// The settings in which `now` differs from `saved`, as `name now X, checkpoint Y` (nested
/// settings dotted: `adamw.beta2`), for a one-line error.
fn settings_diff(now: &TrainConfig, saved: &TrainConfig) -> String {
    match (serde_json::to_value(now), serde_json::to_value(saved)) {
        (Ok(a), Ok(b)) => json_diff(&a, &b),
        _ => "unreadable settings".into(),
    }
}

/// [`settings_diff`] of two JSON values (a key missing on one side counts as null).
fn json_diff(now: &serde_json::Value, saved: &serde_json::Value) -> String {
    use serde_json::Value;
    fn walk(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys = x.keys().chain(y.keys().filter(|k| !x.contains_key(*k)));
                for k in keys {
                    let (va, vb) = (x.get(k), y.get(k));
                    let (va, vb) = (va.unwrap_or(&Value::Null), vb.unwrap_or(&Value::Null));
                    walk(&format!("{prefix}{k}."), va, vb, out);
                }
            }
            _ if a != b => out.push(format!(
                "{} now {a}, checkpoint {b}",
                prefix.trim_end_matches('.')
            )),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", now, saved, &mut out);
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_diff_names_what_changed() {
        let saved = TrainConfig::default();
        let mut now = saved.clone();
        now.batch = saved.batch + 1;
        now.adamw.beta2 = 0.99;
        let d = settings_diff(&now, &saved);
        assert!(
            d.contains(&format!(
                "batch now {}, checkpoint {}",
                now.batch, saved.batch
            )),
            "{d}"
        );
        assert!(d.contains("adamw.beta2 now 0.99"), "{d}");
        assert_eq!(d.matches("now").count(), 2, "{d}");
        assert_eq!(settings_diff(&saved, &saved), "");
    }
}
