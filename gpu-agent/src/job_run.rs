//! The state of one running job process while the agent watches it: relaying its report lines
//! and output as events (phase samples completed with the agent's own memory reading), running
//! the guard on every sample and killing the tree when it says so, and turning the way the
//! process ended into `JobFinished`.

use crate::convert;
use crate::devices::MemSample;
use crate::guard::{Guard, GuardPolicy, SampleThrottle, Verdict};
use crate::outbox::Outgoing;
use crate::procfs::{self, ProcEntry};
use crate::state::{AgentState, JobKey};
use kiln_job::memory::now_ms;
use kiln_job::report::{parse_line, JobOutput, PhaseReport, Report};
use kiln_proto::v1::{
    job_event::Event, job_update::Update, GuardSample, JobEvent, JobFinished, JobState, JobUpdate,
    KillRecord,
};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

/// Which output a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// The job's stdout (report lines and plain output).
    Stdout,
    /// The job's stderr.
    Stderr,
}

/// Why the agent ended a job itself.
pub(crate) enum End {
    /// The coordinator (or the agent's shutdown) cancelled it.
    Cancelled(String),
    /// The guard killed it; the record and the log line that says so.
    Killed(KillRecord, String),
}

/// The state of one running job process.
pub(crate) struct JobRun {
    state: Arc<AgentState>,
    key: JobKey,
    pid: u32,
    gpus: Vec<u32>,
    guard: Guard,
    throttle: SampleThrottle,
    last_phase: String,
    result: Option<JobOutput>,
    error_report: Option<String>,
    last_stderr: Option<String>,
    /// Whether the outcome (`Result` or `Error`) also came as a stdout line.
    outcome_on_stdout: bool,
    end: Option<End>,
    sample_failed: bool,
    /// Every process seen in the job's tree so far (killed with it even once orphaned).
    known: Vec<ProcEntry>,
    /// `Some` for an exec job: the SIGTERM → SIGKILL delay when it is cancelled.
    exec_grace: Option<Duration>,
    /// When a cancelled exec job that got SIGTERM is SIGKILLed.
    sigkill_at: Option<tokio::time::Instant>,
    /// Log bytes relayed so far, and whether the cap was reached.
    log_bytes: u64,
    log_capped: bool,
}

impl JobRun {
    pub(crate) fn new(
        state: Arc<AgentState>,
        key: JobKey,
        pid: u32,
        gpus: Vec<u32>,
        policy: GuardPolicy,
        exec_grace: Option<Duration>,
    ) -> Self {
        Self {
            state,
            key,
            pid,
            gpus,
            guard: Guard::new(policy),
            throttle: SampleThrottle::default(),
            last_phase: String::new(),
            result: None,
            error_report: None,
            last_stderr: None,
            outcome_on_stdout: false,
            end: None,
            sample_failed: false,
            known: Vec::new(),
            exec_grace,
            sigkill_at: None,
            log_bytes: 0,
            log_capped: false,
        }
    }

    /// Whether the agent already decided to end the job (guard kill or cancel).
    pub(crate) fn ending(&self) -> bool {
        self.end.is_some()
    }

    /// Every process seen in the job's tree so far.
    pub(crate) fn known(&self) -> &[ProcEntry] {
        &self.known
    }

    /// The exact peak of the job's memory.
    pub(crate) fn peak(&self) -> u64 {
        self.guard.peak()
    }

    pub(crate) fn push(&self, update: Update) {
        self.state.outbox.push(Outgoing {
            update: JobUpdate {
                job_id: self.key.0,
                attempt: self.key.1,
                update: Some(update),
            },
            pid: self.pid,
        });
    }

    fn event(&self, at_ms: u64, event: Event) {
        self.push(Update::Event(JobEvent {
            job_id: self.key.0,
            seq: 0,
            at_ms,
            attempt: self.key.1,
            event: Some(event),
        }));
    }

    fn agent_log(&self, line: String) {
        self.event(now_ms(), Event::Log(convert::log_line("agent", line)));
    }

    /// Measures the job now; `None` (after one warning) when it cannot be measured.
    fn sample(&mut self) -> Option<MemSample> {
        let table = self.state.proc_table_with(self.pid);
        for e in procfs::tree_of(&table, self.pid) {
            if !self
                .known
                .iter()
                .any(|k| k.pid == e.pid && k.start_time == e.start_time)
            {
                self.known.push(e.clone());
            }
        }
        match self.state.devices.sample_job(&table, self.pid, &self.gpus) {
            Ok(s) => Some(s),
            Err(e) => {
                if !self.sample_failed {
                    self.sample_failed = true;
                    let line = format!("guard: cannot measure the job's memory: {e}; the budget is not enforced while this lasts");
                    tracing::error!(job_id = self.key.0, pid = self.pid, "{line}");
                    self.agent_log(line);
                }
                None
            }
        }
    }

    /// One guard poll.
    pub(crate) fn poll(&mut self) {
        if let Some(mem) = self.sample() {
            self.observe(mem);
        }
    }

    /// Runs the guard on a sample; sends it downsampled; kills when the guard says so.
    fn observe(&mut self, mem: MemSample) {
        if self.end.is_some() {
            return;
        }
        let now = self.state.now_secs();
        let verdict = self.guard.observe(now, mem.pid_mem);
        let sample = GuardSample {
            at_ms: now_ms(),
            pid_mem: mem.pid_mem,
            device_used: mem.device_used,
            device_total: mem.device_total,
        };
        if verdict == Verdict::Kill {
            // Kill first, report after: the budget is hard.
            procfs::kill_tree(self.pid, &self.known);
            self.throttle.force(now, mem.pid_mem);
            self.push(Update::Guard(sample));
            let limit = self.guard.policy().limit_bytes;
            let record = KillRecord {
                pid: self.pid,
                pid_mem: mem.pid_mem,
                total_mem: mem.device_used,
                limit,
                phase: self.last_phase.clone(),
                at_ms: sample.at_ms,
            };
            let line = kill_line(&record);
            tracing::info!(job_id = self.key.0, attempt = self.key.1, "{line}");
            self.agent_log(line.clone());
            self.end = Some(End::Killed(record, line));
        } else if self.throttle.should_send(now, mem.pid_mem) {
            self.push(Update::Guard(sample));
        }
    }

    pub(crate) fn cancel(&mut self, reason: String) {
        match self.exec_grace.filter(|g| !g.is_zero()) {
            Some(grace) => {
                // An exec job gets SIGTERM and its grace period to clean up, then SIGKILL.
                procfs::signal_tree(self.pid, &self.known, libc::SIGTERM);
                self.sigkill_at = Some(tokio::time::Instant::now() + grace);
                tracing::info!(job_id = self.key.0, attempt = self.key.1, pid = self.pid, %reason, grace_secs = grace.as_secs_f64(), "job sent SIGTERM on request");
                self.agent_log(format!(
                    "sent SIGTERM to pid {} on request ({reason}); SIGKILL in {:.1} s",
                    self.pid,
                    grace.as_secs_f64()
                ));
            }
            None => {
                procfs::kill_tree(self.pid, &self.known);
                tracing::info!(job_id = self.key.0, attempt = self.key.1, pid = self.pid, %reason, "job killed on request");
                self.agent_log(format!("killed pid {} on request: {reason}", self.pid));
            }
        }
        self.end = Some(End::Cancelled(reason));
    }

    /// When a cancelled exec job that got SIGTERM is to be SIGKILLed, if it is.
    pub(crate) fn sigkill_at(&self) -> Option<tokio::time::Instant> {
        self.sigkill_at
    }

    /// The grace period of a cancelled exec job is over: SIGKILL what is left of it.
    pub(crate) fn grace_over(&mut self) {
        self.sigkill_at = None;
        procfs::kill_tree(self.pid, &self.known);
        self.agent_log(format!(
            "grace period over: killed pid {} and its tree",
            self.pid
        ));
    }

    /// A phase reported from inside an exec job (its phase socket): completed with the
    /// agent's reading of the whole tree, as every phase is.
    pub(crate) fn on_phase(&mut self, mut phase: PhaseReport) {
        if phase.at_ms == 0 {
            phase.at_ms = now_ms();
        }
        // The reporter (`kiln phase`, a helper) is not the job: the job's host memory is its
        // tree's.
        phase.host_rss =
            procfs::tree_memory(&self.state.proc_table_with(self.pid), self.pid).rss_bytes;
        self.on_report(Report::Phase(phase));
    }

    /// Relays a line of the job's output as a log event, until the job's log cap.
    fn log(&mut self, source: &str, line: String) {
        if self.log_capped {
            return;
        }
        self.log_bytes += line.len() as u64 + 1;
        let cap = self.state.config.log_cap_bytes;
        if self.log_bytes > cap {
            self.log_capped = true;
            self.agent_log(format!(
                "the job's output passed {} ({cap} bytes, the agent's log cap); the rest is not kept (the job goes on)",
                kiln_proto::human_bytes(cap)
            ));
            return;
        }
        self.event(now_ms(), Event::Log(convert::log_line(source, line)));
    }

    /// Takes the outcome the job wrote to its outcome file (the same report its last stdout
    /// line carries; the file wins, since stdout may not be read to its end).
    pub(crate) fn on_outcome(&mut self, outcome: Report) {
        match outcome {
            Report::Result(out) => self.result = Some(out),
            Report::Error { message } => self.error_report = Some(message),
            _ => {}
        }
    }

    /// Whether the outcome came on stdout as well (false when only the file had it).
    pub(crate) fn outcome_on_stdout(&self) -> bool {
        self.outcome_on_stdout
    }

    /// Notes (in the job's log and the agent's) that the outcome file could not be read.
    pub(crate) fn outcome_unreadable(&self, path: &std::path::Path, error: std::io::Error) {
        let line = format!(
            "cannot read the job's outcome file {}: {error}",
            path.display()
        );
        tracing::error!(job_id = self.key.0, attempt = self.key.1, "{line}");
        self.agent_log(line);
    }

    pub(crate) fn on_line(&mut self, stream: Stream, line: String) {
        if stream == Stream::Stderr {
            if !line.trim().is_empty() {
                self.last_stderr = Some(line.clone());
            }
            self.log("stderr", line);
            return;
        }
        // An exec job's stdout is its own: nothing on it is a report.
        let report = match self.exec_grace {
            None => parse_line(&line),
            Some(_) => None,
        };
        let Some(report) = report else {
            self.log("stdout", line);
            return;
        };
        self.on_report(report);
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Result(out) => {
                self.outcome_on_stdout = true;
                self.result = Some(out)
            }
            Report::Error { message } => {
                self.outcome_on_stdout = true;
                self.error_report = Some(message)
            }
            Report::Phase(p) => {
                let at_ms = p.at_ms;
                self.last_phase = p.phase.clone();
                let mem = if self.end.is_none() {
                    self.sample()
                } else {
                    None
                };
                let mut mem_for_event = mem.unwrap_or_default();
                // The report can arrive after a fast job's process has exited: on a CPU slot
                // the job's own RSS reading (taken at the boundary) is the same quantity.
                if self.gpus.is_empty() && mem_for_event.pid_mem == 0 {
                    mem_for_event.pid_mem = p.host_rss;
                }
                if let Some(ev) = convert::report_event(Report::Phase(p), || mem_for_event) {
                    self.event(at_ms, ev);
                }
                // A phase boundary is a sample like any poll.
                if let Some(mem) = mem {
                    self.observe(mem);
                }
            }
            other => {
                if let Some(ev) = convert::report_event(other, MemSample::default) {
                    self.event(now_ms(), ev);
                }
            }
        }
    }

    pub(crate) fn finished(self, status: ExitStatus) -> JobFinished {
        let peak_mem = self.guard.peak();
        match self.end {
            Some(End::Killed(record, line)) => JobFinished {
                state: JobState::Killed as i32,
                kill: Some(record),
                error: line,
                peak_mem,
                ..Default::default()
            },
            Some(End::Cancelled(reason)) => JobFinished {
                state: JobState::Cancelled as i32,
                error: reason,
                peak_mem,
                ..Default::default()
            },
            None if self.exec_grace.is_some() => {
                if status.success() {
                    JobFinished {
                        state: JobState::Succeeded as i32,
                        result: Some(kiln_proto::v1::JobResult {
                            result: Some(kiln_proto::v1::job_result::Result::Exec(
                                kiln_proto::v1::ExecResult { exit_code: 0 },
                            )),
                        }),
                        peak_mem,
                        ..Default::default()
                    }
                } else {
                    failed(crate::exec::failure(status, self.last_stderr), peak_mem)
                }
            }
            None => match (self.result, status.success()) {
                (Some(out), true) => JobFinished {
                    state: JobState::Succeeded as i32,
                    result: Some(convert::job_result(out)),
                    peak_mem,
                    ..Default::default()
                },
                (result, _) => failed(
                    failure_reason(
                        self.error_report,
                        status,
                        result.is_some(),
                        self.last_stderr,
                    ),
                    peak_mem,
                ),
            },
        }
    }
}

/// The line that says the guard killed a job (its error and its log), in human units; the
/// record keeps the exact bytes.
pub fn kill_line(k: &KillRecord) -> String {
    use kiln_proto::human_bytes as h;
    format!(
        "guard: killed pid {}: pid_mem {} > limit {} (device used {}) in phase {}",
        k.pid,
        h(k.pid_mem),
        h(k.limit),
        h(k.total_mem),
        if k.phase.is_empty() { "-" } else { &k.phase }
    )
}

/// A FAILED end with this reason.
pub(crate) fn failed(reason: String, peak_mem: u64) -> JobFinished {
    JobFinished {
        state: JobState::Failed as i32,
        error: reason,
        peak_mem,
        ..Default::default()
    }
}

/// Why a job that the agent did not end itself failed.
pub fn failure_reason(
    error_report: Option<String>,
    status: ExitStatus,
    had_result: bool,
    last_stderr: Option<String>,
) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(message) = error_report {
        return message;
    }
    let mut reason = match (status.code(), status.signal()) {
        (_, Some(sig)) => {
            let name = signal_name(sig);
            if sig == libc::SIGKILL {
                format!("job process was killed by signal {sig} ({name}) from outside the agent; the kernel's OOM killer does this when the host runs out of memory")
            } else {
                format!("job process crashed: killed by signal {sig} ({name})")
            }
        }
        (Some(0), _) if had_result => {
            "job process reported a result but its exit was not clean".into()
        }
        (Some(0), _) => "job process exited with status 0 without reporting a result".into(),
        (Some(code), _) if had_result => {
            format!("job process reported a result but exited with status {code}")
        }
        (Some(code), _) => {
            format!("job process exited with status {code} without reporting an error")
        }
        (None, None) => format!("job process ended abnormally ({status})"),
    };
    if let Some(line) = last_stderr {
        reason.push_str("; last stderr line: ");
        reason.push_str(&line);
    }
    reason
}

pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn failure_reasons_say_what_happened() {
        let segv = ExitStatus::from_raw(libc::SIGSEGV);
        assert_eq!(
            failure_reason(None, segv, false, None),
            "job process crashed: killed by signal 11 (SIGSEGV)"
        );
        let exit3 = ExitStatus::from_raw(3 << 8);
        assert_eq!(
            failure_reason(None, exit3, false, Some("boom".into())),
            "job process exited with status 3 without reporting an error; last stderr line: boom"
        );
        assert_eq!(
            failure_reason(Some("memtest: bad".into()), exit3, false, None),
            "memtest: bad"
        );
        let ok = ExitStatus::from_raw(0);
        assert!(failure_reason(None, ok, false, None).contains("without reporting a result"));
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert!(failure_reason(None, killed, false, None).contains("OOM killer"));
    }
}
