//! One job attempt from assignment to end: start the job process in its own process group with
//! the request on stdin, read its output, poll the guard, pass kill requests on, and clean up
//! the tree after it ends (`job_run` holds what is decided about each line and sample). A job
//! that crashes only ends its own task.

use crate::convert;
use crate::exec;
use crate::guard::GuardPolicy;
use crate::job_run::{failed, JobRun, Stream};
use crate::procfs;
use crate::state::{AgentState, JobKey};
use kiln_job::report::{read_outcome, OUTCOME_FILE_ENV};
use kiln_job::spec::DeviceSpec;
use kiln_proto::v1::{self, job_spec, job_update::Update, JobFinished, JobStarted, JobState};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// How long to keep reading a job's output after its whole process tree is gone. The outcome
/// does not depend on this (it comes from the outcome file); only log lines still in the pipe
/// are lost when it runs out.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The job's outcome file in its job directory (see `kiln_job::report::write_outcome`).
const OUTCOME_FILE: &str = "outcome.json";

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
    command: tokio::process::Command,
    /// The program started, for messages.
    program: String,
    body: Body,
}

/// What differs between a built-in job and an exec job.
enum Body {
    /// A `kiln job-exec` process: its request goes to stdin; its outcome comes from a file.
    Builtin {
        request_json: Vec<u8>,
        /// Where the job writes its outcome before it exits.
        outcome_file: PathBuf,
    },
    /// A user's command: its exit status is its outcome; it may report phases on a socket.
    Exec {
        grace: Duration,
        phase_socket: PathBuf,
    },
}

impl Launch {
    fn prepare(state: &AgentState, job: &v1::Job) -> Result<Self, String> {
        let key = (job.id, job.attempt);
        let resources = job.resources.unwrap_or_default();
        // The coordinator checked these at submit; a job from anywhere else is checked again.
        kiln_proto::validate::check_spec(&job.spec.clone().unwrap_or_default())
            .and_then(|()| kiln_proto::validate::check_resources(&resources))
            .map_err(|e| format!("invalid job: {e}"))?;
        if let Some(spec) = &job.spec {
            crate::data_roots::check(spec, &state.config.data_roots)?;
        }
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
        // CPU jobs see no GPU, so they cannot take device memory the guard does not watch.
        let agent_env = [
            ("CUDA_VISIBLE_DEVICES", uuids.join(",")),
            ("KILN_JOB_ID", key.0.to_string()),
            ("KILN_ATTEMPT", key.1.to_string()),
            ("KILN_JOB_ATTEMPT", key.1.to_string()),
            ("KILN_WORK_DIR", dir.display().to_string()),
        ];
        if let Some(job_spec::Spec::Exec(spec)) = job.spec.as_ref().and_then(|s| s.spec.as_ref()) {
            if !state.config.allow_exec {
                return Err(
                    "this agent does not run exec jobs (start it with --allow-exec)".into(),
                );
            }
            let exec = exec::launch(spec, &dir, &agent_env, state.exec_user)?;
            let mut command = exec.command;
            common_setup(&mut command);
            return Ok(Self {
                key,
                gpus,
                policy,
                command,
                program: exec.program,
                body: Body::Exec {
                    grace: exec.grace,
                    phase_socket: exec.phase_socket,
                },
            });
        }
        let outcome_file = dir.join(OUTCOME_FILE);
        // Only this attempt's process may decide this attempt's outcome.
        match std::fs::remove_file(&outcome_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot clear {}: {e}", outcome_file.display())),
        }
        let request = convert::job_request(job, device, dir.clone(), &state.sessions)?;
        let request_json = serde_json::to_vec(&request).map_err(|e| e.to_string())?;

        let program = &state.config.job_command[0];
        let mut command = tokio::process::Command::new(program);
        command
            .args(&state.config.job_command[1..])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .envs(agent_env)
            .env(OUTCOME_FILE_ENV, &outcome_file);
        common_setup(&mut command);
        Ok(Self {
            key,
            gpus,
            policy,
            command,
            program: program.to_string_lossy().into_owned(),
            body: Body::Builtin {
                request_json,
                outcome_file,
            },
        })
    }

    /// Runs the process to its end; returns its pid and how it ended.
    async fn run(
        mut self,
        state: &Arc<AgentState>,
        mut kill_rx: mpsc::UnboundedReceiver<String>,
    ) -> (u32, JobFinished) {
        let (phase_tx, mut phase_rx) = mpsc::channel::<exec::PhaseMsg>(16);
        let mut phase_server = None;
        if let Body::Exec { phase_socket, .. } = &self.body {
            match exec::bind_phase_socket(phase_socket, state.exec_user) {
                Ok(listener) => {
                    phase_server = Some(tokio::spawn(exec::serve_phases(listener, phase_tx)))
                }
                Err(reason) => return (0, failed(reason, 0)),
            }
        }
        let mut child = match self.command.spawn() {
            Ok(c) => c,
            Err(e) => {
                let reason = match self.body {
                    Body::Exec { .. } => exec::spawn_error(&self.program, &e),
                    Body::Builtin { .. } => {
                        format!("cannot start the job process {:?}: {e}", self.program)
                    }
                };
                return (0, failed(reason, 0));
            }
        };
        let pid = child.id().unwrap_or(0);
        state.set_pid(self.key, pid);
        let exec_grace = match &self.body {
            Body::Exec { grace, .. } => Some(*grace),
            Body::Builtin { .. } => None,
        };
        let mut run = JobRun::new(
            state.clone(),
            self.key,
            pid,
            self.gpus,
            self.policy,
            exec_grace,
        );
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

        if let (Some(mut stdin), Body::Builtin { request_json, .. }) =
            (child.stdin.take(), &mut self.body)
        {
            let json = std::mem::take(request_json);
            tokio::spawn(async move {
                // A job that dies before reading its request is reported by its exit.
                let _ = stdin.write_all(&json).await;
                let _ = stdin.shutdown().await;
            });
        }
        let (line_tx, mut line_rx) = mpsc::channel(1024);
        let pipes: Vec<u64> = [
            child.stdout.as_ref().map(|p| p.as_raw_fd()),
            child.stderr.as_ref().map(|p| p.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        .filter_map(procfs::fd_inode)
        .collect();
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
            let sigkill_at = run.sigkill_at();
            tokio::select! {
                status = child.wait() => break status,
                reason = kill_rx.recv(), if kill_open && !run.ending() => match reason {
                    Some(reason) => run.cancel(reason),
                    None => kill_open = false,
                },
                _ = tokio::time::sleep_until(sigkill_at.unwrap_or_else(tokio::time::Instant::now)), if sigkill_at.is_some() => {
                    run.grace_over()
                }
                Some((phase, ack)) = phase_rx.recv() => {
                    run.on_phase(phase);
                    let _ = ack.send(());
                }
                _ = ticker.tick(), if !run.ending() => run.poll(),
                line = line_rx.recv(), if lines_open => match line {
                    Some((stream, line)) => run.on_line(stream, line),
                    None => lines_open = false,
                },
            }
        };
        // A kill that raced the exit (the agent killed the tree, then sent the reason) still
        // decides how the job ended: it was cancelled, not crashed.
        if !run.ending() {
            if let Ok(reason) = kill_rx.try_recv() {
                run.cancel(reason);
            }
        }
        // Nothing of the job may outlive it: its leader is gone, end the rest of the tree.
        procfs::kill_tree(pid, run.known());
        if let Some(server) = phase_server {
            server.abort();
        }
        let from_file = match &self.body {
            Body::Builtin { outcome_file, .. } => match read_outcome(outcome_file) {
                Ok(Some(outcome)) => {
                    run.on_outcome(outcome);
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    run.outcome_unreadable(outcome_file, e);
                    false
                }
            },
            Body::Exec { .. } => false,
        };
        let exited_at = std::time::Instant::now();
        if lines_open {
            let drain = async {
                while let Some((stream, line)) = line_rx.recv().await {
                    run.on_line(stream, line);
                }
            };
            if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
                let holders = procfs::pipe_holders(&pipes);
                tracing::warn!(
                    job_id = self.key.0,
                    pid,
                    ?holders,
                    "job output still open {DRAIN_TIMEOUT:?} after its process tree ended; stopped reading its logs (the outcome is not affected)"
                );
            }
        }
        if from_file && !run.outcome_on_stdout() {
            tracing::warn!(
                job_id = self.key.0,
                pid,
                waited_ms = exited_at.elapsed().as_millis() as u64,
                "the job's outcome came only from its outcome file: its stdout did not deliver it"
            );
        } else {
            tracing::debug!(
                job_id = self.key.0,
                pid,
                drained_ms = exited_at.elapsed().as_millis() as u64,
                "job output drained"
            );
        }
        let finished = match status {
            Ok(status) => run.finished(status),
            Err(e) => failed(
                format!("waiting for the job process failed: {e}"),
                run.peak(),
            ),
        };
        (pid, finished)
    }
}

/// What every job's process gets: its own process group (the guard kills the group), no
/// stdin/stdout/stderr shared with the agent, and death with the agent.
fn common_setup(command: &mut tokio::process::Command) {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
