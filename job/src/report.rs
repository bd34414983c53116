//! The job process → agent channel: one JSON document per line on stdout, each prefixed with
//! [`REPORT_PREFIX`]. Anything else the process prints is relayed as a log line. The agent
//! parses these with [`parse_line`].
//!
//! The job's outcome (its last report, `Result` or `Error`) also goes to the file the agent
//! names in [`OUTCOME_FILE_ENV`], written and fsync'd before the process exits
//! ([`write_outcome`]). Stdout is a stream the agent may stop reading (a descriptor another
//! process still holds, a starved reader); the file is what decides how the job ended.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Prefix of a report line on the job's stdout.
pub const REPORT_PREFIX: &str = "@@kiln ";

/// The environment variable in which the agent names the job's outcome file.
pub const OUTCOME_FILE_ENV: &str = "KILN_OUTCOME_FILE";

/// Writes a job's outcome (its final report) to `path` durably: a temporary file beside it is
/// written and fsync'd, renamed over `path`, and the directory fsync'd, so a reader sees either
/// no file or the whole report, also after a crash of the machine.
pub fn write_outcome(path: &std::path::Path, report: &Report) -> std::io::Result<()> {
    let json = serde_json::to_vec(report).expect("reports always serialize");
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Makes the rename durable; a directory that cannot be opened is no reason to fail.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads an outcome written by [`write_outcome`]: `Ok(None)` when there is no file (the job
/// ended before it wrote one), an error when the file is there but is not a final report.
pub fn read_outcome(path: &std::path::Path) -> std::io::Result<Option<Report>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice(&bytes) {
        Ok(r @ (Report::Result(_) | Report::Error { .. })) => Ok(Some(r)),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the outcome file holds a report that is not a result or an error",
        )),
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
    }
}

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
        /// On a GPU: the bytes planned there before allocating (0 on the CPU).
        #[serde(default)]
        planned_bytes: u64,
        /// Mean wall time of this job's optimizer steps, ms.
        #[serde(default)]
        step_ms: f64,
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

    #[test]
    fn outcome_file_round_trips_and_rejects_what_is_not_an_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outcome.json");
        assert!(read_outcome(&path).unwrap().is_none());
        let done = Report::Result(JobOutput::Memtest {
            allocated_bytes: 5,
            device: "host".into(),
        });
        write_outcome(&path, &done).unwrap();
        assert_eq!(read_outcome(&path).unwrap(), Some(done));
        assert!(!path.with_extension("tmp").exists());
        write_outcome(&path, &Report::Log { line: "x".into() }).unwrap();
        assert!(read_outcome(&path).is_err());
        std::fs::write(&path, b"{torn").unwrap();
        assert!(read_outcome(&path).is_err());
    }
}
