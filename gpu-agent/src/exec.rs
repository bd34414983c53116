//! Exec jobs: a user's own command (a PyTorch script, anything) run under the guard instead of
//! a `kiln job-exec` process. This module owns what differs from a built-in job: building the
//! command from the spec (argv, environment, working directory), the phase socket that
//! `kiln phase` and `python/kiln_phase.py` report to, and the reason a command failed.

use crate::config::ExecUser;
use kiln_job::phase::{ACK, PHASE_SOCKET_ENV};
use kiln_job::report::PhaseReport;
use kiln_proto::v1::ExecSpec;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

/// A phase from inside the job, and the answer to send once it is taken.
pub(crate) type PhaseMsg = (PhaseReport, oneshot::Sender<()>);

/// The file name of the phase socket in the job's directory.
const PHASE_SOCKET: &str = "phase.sock";

/// Longest path a Unix socket address holds (sun_path, with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// An exec job's command, ready to start.
pub(crate) struct ExecLaunch {
    /// The command with its arguments, environment and directory set.
    pub command: tokio::process::Command,
    /// argv[0], for messages.
    pub program: String,
    /// SIGTERM → SIGKILL delay on cancel.
    pub grace: Duration,
    /// Where the job reports phases.
    pub phase_socket: PathBuf,
}

/// Builds the command of an exec job whose scratch directory is `job_dir`. `agent_env` are the
/// variables the agent sets (they win over the user's).
pub(crate) fn launch(
    spec: &ExecSpec,
    job_dir: &Path,
    agent_env: &[(&str, String)],
    user: Option<ExecUser>,
) -> Result<ExecLaunch, String> {
    let program = spec
        .argv
        .first()
        .filter(|p| !p.is_empty())
        .ok_or("exec job without a command")?
        .clone();
    let workdir = if spec.workdir.is_empty() {
        job_dir.to_path_buf()
    } else {
        let dir = PathBuf::from(&spec.workdir);
        if !dir.is_dir() {
            return Err(format!(
                "--workdir {} does not exist on this agent (it is a path on the agent's host)",
                dir.display()
            ));
        }
        dir
    };
    let phase_socket = job_dir.join(PHASE_SOCKET);
    if phase_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "the phase socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); start the agent with a shorter --work-dir",
            phase_socket.display()
        ));
    }
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&spec.argv[1..])
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .envs(&spec.env);
    for (k, v) in agent_env {
        command.env(k, v);
    }
    command.env(PHASE_SOCKET_ENV, &phase_socket);
    if let Some(u) = user {
        // The job's scratch directory becomes the user's; std drops supplementary groups.
        std::os::unix::fs::chown(job_dir, Some(u.uid), Some(u.gid))
            .map_err(|e| format!("cannot give {} to the exec user: {e}", job_dir.display()))?;
        command.uid(u.uid).gid(u.gid);
    }
    Ok(ExecLaunch {
        command,
        program,
        grace: Duration::from_secs_f64(spec.grace_secs.clamp(0.0, 3600.0)),
        phase_socket,
    })
}

/// Listens on the job's phase socket and passes each phase on, answering `ok` once the job's
/// task has taken it. Runs until the task is aborted (at the job's end).
pub(crate) async fn serve_phases(listener: UnixListener, tx: mpsc::Sender<PhaseMsg>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (read, mut write) = conn.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match serde_json::from_str::<PhaseReport>(&line) {
                    Ok(p) if p.phase.is_empty() => "error: the phase has no name".to_string(),
                    Ok(p) => {
                        let (ack_tx, ack_rx) = oneshot::channel();
                        if tx.send((p, ack_tx)).await.is_err() || ack_rx.await.is_err() {
                            "error: the job has ended".to_string()
                        } else {
                            ACK.to_string()
                        }
                    }
                    Err(e) => format!("error: not a phase report: {e}"),
                };
                if write
                    .write_all(format!("{answer}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Binds the phase socket (a stale file from an earlier attempt is replaced).
pub(crate) fn bind_phase_socket(
    path: &Path,
    user: Option<ExecUser>,
) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot open the phase socket {}: {e}", path.display()))?;
    if let Some(u) = user {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(|e| format!("cannot give the phase socket to the exec user: {e}"))?;
    }
    Ok(listener)
}

/// Why an exec command that the agent did not end itself failed.
pub(crate) fn failure(status: ExitStatus, last_stderr: Option<String>) -> String {
    use std::os::unix::process::ExitStatusExt;
    let mut reason = match (status.code(), status.signal()) {
        (Some(code), _) => format!("the command exited with status {code}"),
        (_, Some(sig)) => format!(
            "the command was killed by signal {sig} ({})",
            crate::job_run::signal_name(sig)
        ),
        _ => format!("the command ended abnormally ({status})"),
    };
    if let Some(line) = last_stderr {
        reason.push_str("; last stderr line: ");
        reason.push_str(&line);
    }
    reason
}

/// The message for a command that could not be started.
pub(crate) fn spawn_error(program: &str, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "command {program:?} not found on this agent: give a path, or a program in the agent's PATH"
        ),
        std::io::ErrorKind::PermissionDenied => {
            format!("command {program:?} is not executable on this agent: {e}")
        }
        _ => format!("cannot start the command {program:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn failures_name_the_exit_code_or_signal() {
        assert_eq!(
            failure(ExitStatus::from_raw(3 << 8), Some("boom".into())),
            "the command exited with status 3; last stderr line: boom"
        );
        assert_eq!(
            failure(ExitStatus::from_raw(libc::SIGSEGV), None),
            "the command was killed by signal 11 (SIGSEGV)"
        );
        let e = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(spawn_error("nope", &e).contains("not found"));
    }

    #[test]
    fn a_missing_workdir_is_named() {
        let spec = ExecSpec {
            argv: vec!["true".into()],
            workdir: "/no/such/dir".into(),
            ..Default::default()
        };
        let err = launch(&spec, Path::new("/tmp"), &[], None).err().unwrap();
        assert!(
            err.contains("/no/such/dir") && err.contains("does not exist"),
            "{err}"
        );
    }
}
