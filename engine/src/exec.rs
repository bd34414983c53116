//! The job process: the body of the hidden `kiln job-exec` subcommand. It reads one
//! [`JobRequest`] as JSON from stdin, runs it, and tells the agent what happened through report
//! lines on stdout ([`Reporter`]); the last report is `Result` or `Error`, and it is also written
//! durably to the outcome file the agent names ([`crate::report::OUTCOME_FILE_ENV`]) before the
//! process exits. Logs go to stderr.
//!
//! Adding a job kind: add its variant to [`JobSpec`] and [`crate::report::JobOutput`], an error
//! variant to [`ExecError`], and one arm to the match in [`run_request`].

use crate::report::{JobOutput, Report, Reporter, OUTCOME_FILE_ENV};
use crate::spec::{JobRequest, JobSpec};
use std::io::Read;

/// Exit code of a job that succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit code of a job that failed (the last report says why).
pub const EXIT_FAILED: i32 = 1;
/// Exit code when the request on stdin could not be read or parsed.
pub const EXIT_BAD_REQUEST: i32 = 2;
/// Exit code when the job panicked.
pub const EXIT_PANICKED: i32 = 101;

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// stdin could not be read.
    #[error("job-exec: reading the job request from stdin failed: {0}")]
    ReadRequest(#[from] std::io::Error),
    /// stdin did not hold a valid job request.
    #[error("job-exec: the job request on stdin is not valid JSON for this kiln version: {0} (agent and job binary must be the same kiln build)")]
    ParseRequest(#[from] serde_json::Error),
    /// The memtest job failed.
    #[error(transparent)]
    Memtest(#[from] crate::memtest::MemtestError),
    /// The generate job failed.
    #[error("generate: {0}")]
    Generate(crate::error::EngineError),
    /// The train job failed.
    #[error("train: {0}")]
    Train(crate::error::EngineError),
    /// The export job failed.
    #[error("export: {0}")]
    Export(crate::error::EngineError),
}

/// Runs one request to completion (no reporting of the outcome; see [`job_process_main`]).
pub fn run_request(request: &JobRequest, reporter: &Reporter) -> Result<JobOutput, ExecError> {
    match &request.spec {
        JobSpec::Memtest(spec) => Ok(crate::memtest::run(spec, request.device, reporter)?),
        JobSpec::Generate(spec) => {
            crate::generate::job::run_job(request, spec, reporter).map_err(ExecError::Generate)
        }
        JobSpec::Train(spec) => {
            crate::train::run_job(request, spec, reporter).map_err(ExecError::Train)
        }
        JobSpec::Export(spec) => crate::export::run_job(spec, reporter).map_err(ExecError::Export),
    }
}

/// Parses a request from the JSON text the agent wrote to stdin.
pub fn parse_request(text: &str) -> Result<JobRequest, ExecError> {
    Ok(serde_json::from_str(text)?)
}

/// The `kiln job-exec` entry point: reads the request from stdin, runs it, reports `Result` or
/// `Error` last, and returns the process exit code (0 success, non-zero failure).
pub fn job_process_main() -> i32 {
    init_stderr_logging();
    let reporter = Reporter::stdout();
    let mut text = String::new();
    let request = match std::io::stdin()
        .read_to_string(&mut text)
        .map_err(ExecError::from)
        .and_then(|_| parse_request(&text))
    {
        Ok(r) => r,
        Err(e) => return fail(&reporter, &e, EXIT_BAD_REQUEST),
    };
    let span = tracing::info_span!("job", id = request.job_id, attempt = request.attempt);
    let _enter = span.enter();
    tracing::info!(device = ?request.device, pid = std::process::id(), "job process started");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_request(&request, &reporter)
    }));
    match outcome {
        Ok(Ok(output)) => {
            finish(&reporter, &Report::Result(output));
            tracing::info!("job succeeded");
            EXIT_OK
        }
        Ok(Err(e)) => fail(&reporter, &e, EXIT_FAILED),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            let message = format!("job-exec: the job panicked: {what} (this is a bug in kiln)");
            tracing::error!("{message}");
            finish(&reporter, &Report::Error { message });
            EXIT_PANICKED
        }
    }
}

fn fail(reporter: &Reporter, error: &ExecError, code: i32) -> i32 {
    let message = error.to_string();
    tracing::error!("{message}");
    finish(reporter, &Report::Error { message });
    code
}

/// Reports the job's outcome: first durably to the outcome file the agent named (what decides
/// the job's end), then on stdout (what `--follow` shows at once).
fn finish(reporter: &Reporter, outcome: &Report) {
    if let Some(path) = std::env::var_os(OUTCOME_FILE_ENV) {
        let path = std::path::PathBuf::from(path);
        if let Err(e) = crate::report::write_outcome(&path, outcome) {
            tracing::error!(
                "cannot write the job outcome to {}: {e}; the agent will only see it on stdout",
                path.display()
            );
        }
    }
    reporter.send(outcome);
}

/// Sends tracing output to stderr (stdout is the report channel). Does nothing when the binary
/// already installed a subscriber (the `kiln` CLI does). Filter: `KILN_LOG`, default `info`.
fn init_stderr_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DeviceSpec, MemtestSpec};

    #[test]
    fn request_round_trips_and_runs_memtest() {
        let request = JobRequest {
            job_id: 7,
            attempt: 2,
            device: DeviceSpec::Cpu,
            budget_bytes: 1 << 30,
            work_dir: std::env::temp_dir(),
            sessions_dir: None,
            sessions_budget_bytes: 0,
            spec: JobSpec::Memtest(MemtestSpec {
                bytes: 1 << 20,
                steps: 2,
                hold_secs: 0.0,
                step_pause_secs: 0.0,
            }),
        };
        let parsed = parse_request(&serde_json::to_string(&request).unwrap()).unwrap();
        assert_eq!(parsed.job_id, 7);
        assert_eq!(parsed.device, DeviceSpec::Cpu);
        let (reporter, _reports) = Reporter::capture();
        let out = run_request(&parsed, &reporter).unwrap();
        assert_eq!(
            out,
            JobOutput::Memtest {
                allocated_bytes: 1 << 20,
                device: "host".into()
            }
        );
    }

    #[test]
    fn malformed_request_names_the_problem() {
        let err = parse_request("{\"job_id\": 1}").unwrap_err();
        assert!(matches!(err, ExecError::ParseRequest(_)));
        assert!(err.to_string().contains("missing field"), "{err}");
    }
}
