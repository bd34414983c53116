//! The job process → agent channel: one JSON document per line on stdout, each prefixed with
//! [`REPORT_PREFIX`]. Anything else the process prints is relayed as a log line. The agent
//! parses these with [`parse_line`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Prefix of a report line on the job's stdout.
pub const REPORT_PREFIX: &str = "@@kiln ";

/// Memory at a phase boundary, as measured from inside the job process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseReport {
    /// Phase name (`model_loaded`, `forward_done`, …).
    pub phase: String,
    /// Step within the job (0 when not applicable).
    pub step: u32,
    /// Unix epoch milliseconds.
    pub at_ms: u64,
    /// cuMemGetInfo free (0 on CPU).
    pub cuda_free: u64,
    /// cuMemGetInfo total (0 on CPU).
    pub cuda_total: u64,
    /// Resident set size of the job process.
    pub host_rss: u64,
    /// Tensor bytes by category (weights, scales, grads, optimizer_state, activations, kv_cache).
    pub tensor_bytes: BTreeMap<String, u64>,
    /// Free-form numbers (loss, seq_len…).
    pub metrics: BTreeMap<String, f64>,
}

impl PhaseReport {
    /// A sample of `phase` at `step` taken now: time and host RSS filled in (the CUDA fields
    /// stay 0 on the CPU path).
    pub fn now(phase: &str, step: u32) -> Self {
        PhaseReport {
            phase: phase.to_string(),
            step,
            at_ms: crate::memory::now_ms(),
            host_rss: crate::memory::self_rss_bytes(),
            ..Default::default()
        }
    }

    /// With these tensor bytes by category.
    pub fn bytes<'a>(mut self, categories: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        for (k, v) in categories {
            self.tensor_bytes.insert(k.to_string(), v);
        }
        self
    }

    /// With a metric.
    pub fn metric(mut self, name: &str, value: f64) -> Self {
        self.metrics.insert(name.to_string(), value);
        self
    }
}

/// The result of a successful job, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobOutput {
    /// memtest finished.
    Memtest {
        /// Bytes allocated.
        allocated_bytes: u64,
        /// "cuda" or "host".
        device: String,
    },
    /// generate finished (field names as in the proto's `GenerateResult`).
    Generate {
        /// The generated text (special tokens removed).
        text: String,
        /// The generated token ids (the stop token included when one ended it).
        token_ids: Vec<u32>,
        /// Prefill time, ms.
        prefill_ms: f64,
        /// Decode speed, tokens/s.
        decode_tokens_per_s: f64,
        /// Session sequence length after this turn (0 without a session).
        session_seq_len: u32,
        /// With kv = ab: cache and replay produced identical greedy tokens.
        ab_tokens_agree: bool,
        /// With kv = ab: the largest |logit difference| between cache and replay.
        ab_max_logit_diff: f32,
    },
    /// train finished (proto `TrainResult`).
    Train {
        /// Loss after each step of this job, in order.
        loss: Vec<f32>,
        /// The checkpoint directory written.
        checkpoint: String,
        /// Training throughput (tokens forwarded per second).
        tokens_per_s: f64,
    },
    /// export finished (proto `ExportResult`).
    Export {
        /// Files written, relative to the output directory.
        files: Vec<String>,
        /// Tensors written.
        tensor_count: u32,
        /// The export was loaded back and matched the source.
        verified: bool,
    },
}

/// One message from the job process to its agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    /// A phase boundary.
    Phase(PhaseReport),
    /// A line of human-readable output.
    Log {
        /// The text.
        line: String,
    },
    /// A generated token.
    Token {
        /// Token id.
        id: u32,
        /// Its text.
        text: String,
    },
    /// Progress of long work.
    Progress {
        /// Units done.
        done: u64,
        /// Units in all (0 = unknown).
        total: u64,
        /// Unit name.
        unit: String,
        /// Short message.
        message: String,
    },
    /// The job succeeded with this output (the last report of a successful job).
    Result(JobOutput),
    /// The job failed (the last report of a failed job); the process exits non-zero.
    Error {
        /// What went wrong and how to fix it.
        message: String,
    },
}

/// Writes reports to stdout (the default), or collects them in memory for tests
/// ([`Reporter::capture`]). Cheap to clone; each report is one `write` + flush.
#[derive(Debug, Clone, Default)]
pub struct Reporter {
    /// `None`: stdout. `Some`: reports are appended here instead.
    captured: Option<Arc<Mutex<Vec<Report>>>>,
}

impl Reporter {
    /// A reporter that writes report lines to stdout (what a job process uses).
    pub fn stdout() -> Self {
        Self::default()
    }

    /// A reporter that keeps the reports in memory, and the handle to read them back.
    pub fn capture() -> (Self, Arc<Mutex<Vec<Report>>>) {
        let sink = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                captured: Some(sink.clone()),
            },
            sink,
        )
    }

    /// Sends one report. Errors writing stdout (agent gone) are ignored: the job goes on and
    /// the guard or the agent's exit handling decides its fate.
    pub fn send(&self, report: &Report) {
        if let Some(sink) = &self.captured {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(report.clone());
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(format_line(report).as_bytes());
        let _ = out.flush();
    }

    /// Sends a log line.
    pub fn log(&self, line: impl Into<String>) {
        self.send(&Report::Log { line: line.into() });
    }

    /// Sends a phase report.
    pub fn phase(&self, phase: PhaseReport) {
        self.send(&Report::Phase(phase));
    }

    /// Sends a progress report.
    pub fn progress(&self, done: u64, total: u64, unit: &str, message: impl Into<String>) {
        self.send(&Report::Progress {
            done,
            total,
            unit: unit.to_string(),
            message: message.into(),
        });
    }
}

/// The stdout line of one report, newline included.
pub fn format_line(report: &Report) -> String {
    let mut line = String::from(REPORT_PREFIX);
    line.push_str(&serde_json::to_string(report).expect("reports always serialize"));
    line.push('\n');
    line
}

/// Parses one stdout line of a job process: `Some(report)` for a report line, `None` for a
/// plain line (to be relayed as a log line) or a malformed report.
pub fn parse_line(line: &str) -> Option<Report> {
    let json = line.strip_prefix(REPORT_PREFIX)?;
    serde_json::from_str(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_a_line() {
        let r = Report::Progress {
            done: 3,
            total: 10,
            unit: "steps".into(),
            message: "loss 1.5".into(),
        };
        let line = format_line(&r);
        assert!(line.ends_with('\n'));
        assert_eq!(parse_line(line.trim_end()), Some(r));
        assert_eq!(parse_line("hello"), None);
        assert_eq!(parse_line("@@kiln {broken"), None);
    }
}
