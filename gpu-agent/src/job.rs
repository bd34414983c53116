//! One job attempt from assignment to end: start the job process in its own process group with
//! the request on stdin, relay its report lines and output as events, run the guard on every
//! poll, kill the whole tree when the guard or the coordinator says so, and turn the way it
//! ended into `JobFinished`. A job that crashes only ends its own task.

use crate::convert;
use crate::devices::MemSample;
use crate::guard::{Guard, GuardPolicy, SampleThrottle, Verdict};
use crate::outbox::Outgoing;
use crate::procfs::{self, ProcEntry};
use crate::state::{AgentState, JobKey};
use kiln_engine::memory::now_ms;
use kiln_engine::report::{parse_line, JobOutput, Report};
use kiln_engine::spec::DeviceSpec;
use kiln_proto::v1::{
    self, job_event::Event, job_update::Update, GuardSample, JobEvent, JobFinished, JobStarted,
    JobState, JobUpdate, KillRecord,
};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// How long to keep reading a job's output after its process ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts running an assigned job in the background (ignores a duplicate assignment).
pub fn start(state: &Arc<AgentState>, job: v1::Job) {
    let key = (job.id, job.attempt);
    let (kill_tx, kill_rx) = mpsc::unbounded_channel();
    if !state.insert(key, kill_tx) {
        tracing::warn!(
            job_id = key.0,
            attempt = key.1,
            "duplicate assignment ignored"
        );
        return;
    }
    tracing::info!(job_id = key.0, attempt = key.1, gpus = ?job.gpu_indices, "job assigned");
    let state = state.clone();
    tokio::spawn(async move {
        let (pid, finished) = match Launch::prepare(&state, &job) {
            Ok(launch) => launch.run(&state, kill_rx).await,
            Err(reason) => (0, failed(reason, 0)),
        };
        let job_state = JobState::try_from(finished.state).unwrap_or(JobState::Unspecified);
        tracing::info!(job_id = key.0, attempt = key.1, pid, state = ?job_state, error = %finished.error, peak_mem = finished.peak_mem, "job ended");
        state.finish(key, pid, finished);
        let _ = std::fs::remove_dir_all(job_dir(&state, key));
    });
}

fn failed(reason: String, peak_mem: u64) -> JobFinished {
    JobFinished {
        state: JobState::Failed as i32,
        error: reason,
        peak_mem,
        ..Default::default()
    }
}

fn job_dir(state: &AgentState, key: JobKey) -> PathBuf {
    state
        .config
        .work_dir
        .join(format!("job-{}-a{}", key.0, key.1))
}

/// Everything decided before the process starts.
struct Launch {
    key: JobKey,
    /// NVML indices (empty = a CPU job).
    gpus: Vec<u32>,
    policy: GuardPolicy,
    request_json: Vec<u8>,
    command: tokio::process::Command,
}

impl Launch {
    fn prepare(state: &AgentState, job: &v1::Job) -> Result<Self, String> {
        let key = (job.id, job.attempt);
        let resources = job.resources.unwrap_or_default();
        let gpus = job.gpu_indices.clone();
        let mut uuids = Vec::new();
        let mut capacity = state.devices.host_capacity();
        for &i in &gpus {
            let gpu = state.devices.gpu(i).ok_or_else(|| {
                let offered: Vec<u32> = state.devices.gpus().iter().map(|g| g.index).collect();
                format!("assigned GPU {i}, which this agent does not offer (it offers {offered:?})")
            })?;
            uuids.push(gpu.uuid.clone());
            capacity = if uuids.len() == 1 {
                gpu.capacity_bytes
            } else {
                capacity.min(gpu.capacity_bytes)
            };
        }
        let device = if gpus.is_empty() {
            DeviceSpec::Cpu
        } else {
            DeviceSpec::Cuda(0)
        };
        let policy = GuardPolicy::for_job(
            resources.budget_bytes,
            resources.over_secs,
            resources.poll_secs,
            state.config.over_secs,
            state.config.poll_secs,
            capacity,
        );
        let dir = job_dir(state, key);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create the job directory {}: {e}", dir.display()))?;
        let request = convert::job_request(job, device, dir.clone(), &state.sessions)?;
        let request_json = serde_json::to_vec(&request).map_err(|e| e.to_string())?;

        let program = &state.config.job_command[0];
        let mut command = tokio::process::Command::new(program);
        command
            .args(&state.config.job_command[1..])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // CPU jobs see no GPU, so they cannot take device memory the guard does not watch.
            .env("CUDA_VISIBLE_DEVICES", uuids.join(","))
            .env("KILN_JOB_ID", key.0.to_string())
            .env("KILN_JOB_ATTEMPT", key.1.to_string())
            .env("KILN_WORK_DIR", &dir)
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; between fork and exec nothing else runs.
        unsafe {
            command.pre_exec(|| {
                // If the agent is killed without its shutdown path (SIGKILL), the kernel kills
                // the job leader too; the normal shutdown path kills the whole tree.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(Self {
            key,
            gpus,
            policy,
            request_json,
            command,
        })
    }

    /// Runs the process to its end; returns its pid and how it ended.
    async fn run(
        mut self,
        state: &Arc<AgentState>,
        mut kill_rx: mpsc::UnboundedReceiver<String>,
    ) -> (u32, JobFinished) {
        let program = state.config.job_command[0].to_string_lossy().into_owned();
        let mut child = match self.command.spawn() {
            Ok(c) => c,
            Err(e) => {
                return (
                    0,
                    failed(format!("cannot start the job process {program:?}: {e}"), 0),
                )
            }
        };
        let pid = child.id().unwrap_or(0);
        state.set_pid(self.key, pid);
        let mut run = JobRun::new(state.clone(), self.key, pid, self.gpus, self.policy);
        run.push(Update::Started(JobStarted { pid }));
        tracing::info!(
            job_id = self.key.0,
            attempt = self.key.1,
            pid,
            limit = self.policy.limit_bytes,
            over_secs = self.policy.over_secs,
            poll_secs = self.policy.poll_secs,
            "job process started"
        );

        if let Some(mut stdin) = child.stdin.take() {
            let json = std::mem::take(&mut self.request_json);
            tokio::spawn(async move {
                // A job that dies before reading its request is reported by its exit.
                let _ = stdin.write_all(&json).await;
                let _ = stdin.shutdown().await;
            });
        }
        let (line_tx, mut line_rx) = mpsc::channel(1024);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(read_lines(out, Stream::Stdout, line_tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(read_lines(err, Stream::Stderr, line_tx));
        }

        let mut ticker = tokio::time::interval(Duration::from_secs_f64(self.policy.poll_secs));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lines_open = true;
        let mut kill_open = true;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                reason = kill_rx.recv(), if kill_open && run.end.is_none() => match reason {
                    Some(reason) => run.cancel(reason),
                    None => kill_open = false,
                },
                _ = ticker.tick(), if run.end.is_none() => run.poll(),
                line = line_rx.recv(), if lines_open => match line {
                    Some((stream, line)) => run.on_line(stream, line),
                    None => lines_open = false,
                },
            }
        };
        // Nothing of the job may outlive it: its leader is gone, end the rest of the tree.
        procfs::kill_tree(pid, &run.known);
        if lines_open {
            let drain = async {
                while let Some((stream, line)) = line_rx.recv().await {
                    run.on_line(stream, line);
                }
            };
            if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
                tracing::warn!(
                    job_id = self.key.0,
                    pid,
                    "job output still open after its exit; stopped reading"
                );
            }
        }
        let finished = match status {
            Ok(status) => run.finished(status),
            Err(e) => failed(
                format!("waiting for the job process failed: {e}"),
                run.guard.peak(),
            ),
        };
        (pid, finished)
    }
}

/// Which output a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

async fn read_lines(
    out: impl AsyncRead + Unpin,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) {
    let mut reader = BufReader::new(out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']).to_string();
                if tx.send((stream, line)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Why the agent ended a job itself.
enum End {
    /// The coordinator (or the agent's shutdown) cancelled it.
    Cancelled(String),
    /// The guard killed it; the record and the log line that says so.
    Killed(KillRecord, String),
}

/// The state of one running job process.
struct JobRun {
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
    end: Option<End>,
    sample_failed: bool,
    /// Every process seen in the job's tree so far (killed with it even once orphaned).
    known: Vec<ProcEntry>,
}

impl JobRun {
    fn new(
        state: Arc<AgentState>,
        key: JobKey,
        pid: u32,
        gpus: Vec<u32>,
        policy: GuardPolicy,
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
            end: None,
            sample_failed: false,
            known: Vec::new(),
        }
    }

    fn push(&self, update: Update) {
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
        let table = procfs::read_all();
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
    fn poll(&mut self) {
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
            let line = format!(
                "guard: killed pid={} pid_mem={} total_mem={} limit={} phase={}",
                record.pid, record.pid_mem, record.total_mem, record.limit, record.phase
            );
            tracing::warn!(job_id = self.key.0, attempt = self.key.1, pid = record.pid, pid_mem = record.pid_mem, total_mem = record.total_mem, limit = record.limit, phase = %record.phase, "{line}");
            self.agent_log(line.clone());
            self.end = Some(End::Killed(record, line));
        } else if self.throttle.should_send(now, mem.pid_mem) {
            self.push(Update::Guard(sample));
        }
    }

    fn cancel(&mut self, reason: String) {
        procfs::kill_tree(self.pid, &self.known);
        tracing::info!(job_id = self.key.0, attempt = self.key.1, pid = self.pid, %reason, "job killed on request");
        self.agent_log(format!("killed pid={} on request: {reason}", self.pid));
        self.end = Some(End::Cancelled(reason));
    }

    fn on_line(&mut self, stream: Stream, line: String) {
        if stream == Stream::Stderr {
            self.event(
                now_ms(),
                Event::Log(convert::log_line("stderr", line.clone())),
            );
            if !line.trim().is_empty() {
                self.last_stderr = Some(line);
            }
            return;
        }
        let Some(report) = parse_line(&line) else {
            self.event(now_ms(), Event::Log(convert::log_line("stdout", line)));
            return;
        };
        match report {
            Report::Result(out) => self.result = Some(out),
            Report::Error { message } => self.error_report = Some(message),
            Report::Phase(p) => {
                let at_ms = p.at_ms;
                self.last_phase = p.phase.clone();
                let mem = if self.end.is_none() {
                    self.sample()
                } else {
                    None
                };
                let mem_for_event = mem.unwrap_or_default();
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

    fn finished(self, status: ExitStatus) -> JobFinished {
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

fn signal_name(sig: i32) -> &'static str {
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
