//! Phases reported from inside an exec job: the agent listens on a Unix socket in the job's
//! directory and names it in [`PHASE_SOCKET_ENV`]; a client (`kiln phase`, or the stdlib-only
//! `python/kiln_phase.py`) connects, writes one [`PhaseReport`] as a JSON line and reads `ok`
//! back once the agent has taken it. The agent completes the sample with its own reading of the
//! job's memory (NVML per pid over the whole process tree, or the tree's RSS), as for the
//! built-in jobs' phases.

use crate::report::PhaseReport;
use std::io::{BufRead, BufReader, Write};

/// The environment variable that holds the phase socket's path inside an exec job.
pub const PHASE_SOCKET_ENV: &str = "KILN_PHASE_SOCKET";

/// The agent's answer to a phase it took.
pub const ACK: &str = "ok";

/// Why a phase could not be sent.
#[derive(Debug)]
pub enum PhaseError {
    /// Not inside an exec job: the socket variable is not set.
    NotInAJob,
    /// The socket could not be reached or the agent did not answer.
    Io(std::path::PathBuf, std::io::Error),
    /// The agent answered something else than `ok`.
    Refused(String),
}

impl std::fmt::Display for PhaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PhaseError::NotInAJob => write!(
                f,
                "not inside a Kiln exec job ({PHASE_SOCKET_ENV} is not set): `kiln phase` reports a phase of the exec job it runs in"
            ),
            PhaseError::Io(path, e) => write!(
                f,
                "cannot reach the agent's phase socket {}: {e} (did the job end?)",
                path.display()
            ),
            PhaseError::Refused(answer) => write!(f, "the agent refused the phase: {answer}"),
        }
    }
}

impl std::error::Error for PhaseError {}

/// Sends one phase to the agent of the exec job this process runs in, and waits until the
/// agent has taken it.
pub fn send(report: &PhaseReport) -> Result<(), PhaseError> {
    let path = std::env::var_os(PHASE_SOCKET_ENV).ok_or(PhaseError::NotInAJob)?;
    let path = std::path::PathBuf::from(path);
    let io = |e| PhaseError::Io(path.clone(), e);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(io)?;
    let mut line = serde_json::to_string(report).expect("phase reports always serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    match answer.trim_end() {
        ACK => Ok(()),
        other => Err(PhaseError::Refused(other.to_string())),
    }
}
