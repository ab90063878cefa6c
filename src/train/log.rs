//! A run's log read back (`train_log.jsonl`) and the loss curves drawn from it.

use super::{LogEntry, MAX_LOG_BYTES};
use crate::error::Result;
use std::path::Path;

/// The entries of a `train_log.jsonl`, one per step (a step logged again after a resume from an
/// earlier checkpoint keeps its last entry), in step order.
pub fn read_log(path: &Path) -> Result<Vec<LogEntry>> {
    let text = crate::fsutil::read_text(path, "training log", MAX_LOG_BYTES)?;
    let mut by_step = std::collections::BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let e: LogEntry = serde_json::from_str(line)
            .map_err(|err| crate::Error(format!("{} line {}: {err}", path.display(), i + 1)))?;
        by_step.insert(e.step, e);
    }
    Ok(by_step.into_values().collect())
}

/// Loss curves of training runs as an SVG line chart: per run, its training cross-entropy
/// (smoothed; the raw per-step values are noisy) and its validation cross-entropy (dots),
/// labelled with the run's name (none for a single run).
pub fn loss_chart_svg(title: &str, runs: &[(&str, &[LogEntry])]) -> String {
    use crate::eval::plot::{ema, line_chart_svg, Series};
    let mut series = Vec::new();
    for (name, entries) in runs {
        let ce: Vec<f64> = entries.iter().map(|e| e.ce as f64).collect();
        let smooth = ema(&ce, 0.9);
        let label = |part: &str| match name.is_empty() {
            true => part.to_string(),
            false => format!("{name} ({part})"),
        };
        series.push(Series {
            name: label("train"),
            points: entries
                .iter()
                .zip(smooth)
                .map(|(e, y)| (e.step as f64, y))
                .collect(),
            dots: false,
        });
        let valid: Vec<(f64, f64)> = entries
            .iter()
            .filter_map(|e| e.valid_ce.map(|v| (e.step as f64, v as f64)))
            .collect();
        if !valid.is_empty() {
            series.push(Series {
                name: label("valid"),
                points: valid,
                dots: true,
            });
        }
    }
    line_chart_svg(title, "step", "cross-entropy (nats)", &series)
}
