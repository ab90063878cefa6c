//! The server's counters, and their Prometheus text exposition (`GET /metrics`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Upper bounds (seconds) of the time-to-first-token histogram's buckets.
const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Metrics {
    /// Responses by status class: 2xx, 4xx, 5xx.
    pub ok: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub running: AtomicU64,
    pub queued: AtomicU64,
    pub steps: AtomicU64,
    /// Per expert: (token, layer) routings.
    pub routed: Vec<AtomicU64>,
    ttft: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn new(experts: usize) -> Self {
        Metrics {
            routed: (0..experts).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    pub fn status(&self, code: u16) {
        match code {
            200..=299 => &self.ok,
            400..=499 => &self.client_errors,
            _ => &self.server_errors,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn time_to_first_token(&self, seconds: f64) {
        let mut h = self.ttft.lock().unwrap_or_else(|p| p.into_inner());
        for (c, &b) in h.counts.iter_mut().zip(&TTFT_BUCKETS) {
            if seconds <= b {
                *c += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// The Prometheus text format; `experts` names the per-expert series.
    pub fn render(&self, experts: &[String]) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        counter(
            "flexrun_requests_total",
            "Completion requests answered, by status class.",
            "counter",
            [
                ("2xx", &self.ok),
                ("4xx", &self.client_errors),
                ("5xx", &self.server_errors),
            ]
            .iter()
            .map(|(c, v)| (format!("{{status=\"{c}\"}}"), v.load(Relaxed)))
            .collect(),
        );
        for (name, help, kind, v) in [
            (
                "flexrun_prompt_tokens_total",
                "Prompt tokens prefilled.",
                "counter",
                &self.prompt_tokens,
            ),
            (
                "flexrun_generation_tokens_total",
                "Tokens generated.",
                "counter",
                &self.generated_tokens,
            ),
            (
                "flexrun_engine_steps_total",
                "Batched decode steps run.",
                "counter",
                &self.steps,
            ),
            (
                "flexrun_running_sequences",
                "Sequences in the running batch.",
                "gauge",
                &self.running,
            ),
            (
                "flexrun_queued_sequences",
                "Sequences waiting for a batch slot.",
                "gauge",
                &self.queued,
            ),
        ] {
            counter(name, help, kind, vec![(String::new(), v.load(Relaxed))]);
        }
        counter(
            "flexrun_expert_routed_tokens_total",
            "Tokens routed to each expert, summed over layers.",
            "counter",
            experts
                .iter()
                .zip(&self.routed)
                .map(|(n, v)| (format!("{{expert=\"{n}\"}}"), v.load(Relaxed)))
                .collect(),
        );
        let h = self.ttft.lock().unwrap_or_else(|p| p.into_inner());
        let name = "flexrun_time_to_first_token_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Time from a request's arrival to its first token.\n# TYPE {name} histogram"
        );
        for (c, b) in h.counts.iter().zip(TTFT_BUCKETS) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(s, "{name}_sum {}", h.sum);
        let _ = writeln!(s, "{name}_count {}", h.count);
        s
    }
}
