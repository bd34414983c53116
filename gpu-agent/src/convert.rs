//! Translation between the wire protocol (`kiln_proto::v1`) and the job-process contract
//! (`kiln_engine::spec` / `kiln_engine::report`). Adding a job kind means one arm in
//! [`engine_spec`] and one in [`job_result`].

use crate::devices::MemSample;
use kiln_engine::report::{JobOutput, PhaseReport, Report};
use kiln_engine::spec::{self, DeviceSpec, JobRequest};
use kiln_proto::v1::{self, job_event::Event, job_result, job_spec};
use std::path::PathBuf;

/// The engine's spec for a protocol spec, or why this agent cannot run it.
pub fn engine_spec(spec: Option<&v1::JobSpec>) -> Result<spec::JobSpec, String> {
    match spec.and_then(|s| s.spec.as_ref()) {
        Some(job_spec::Spec::Memtest(m)) => Ok(spec::JobSpec::Memtest(spec::MemtestSpec {
            bytes: m.bytes,
            steps: m.steps,
            hold_secs: m.hold_secs,
            step_pause_secs: m.step_pause_secs,
        })),
        Some(job_spec::Spec::Generate(_)) => Err(unsupported("generate")),
        Some(job_spec::Spec::Train(_)) => Err(unsupported("train")),
        Some(job_spec::Spec::Export(_)) => Err(unsupported("export")),
        None => Err("the assignment carries no job spec (coordinator bug)".into()),
    }
}

fn unsupported(kind: &str) -> String {
    format!("this agent's engine cannot run {kind} jobs yet (upgrade the agent's kiln binary)")
}

/// The request written to the job process's stdin.
pub fn job_request(
    job: &v1::Job,
    device: DeviceSpec,
    work_dir: PathBuf,
) -> Result<JobRequest, String> {
    Ok(JobRequest {
        job_id: job.id,
        attempt: job.attempt,
        device,
        budget_bytes: job.resources.as_ref().map_or(0, |r| r.budget_bytes),
        work_dir,
        spec: engine_spec(job.spec.as_ref())?,
    })
}

/// The protocol result of a job's output.
pub fn job_result(output: JobOutput) -> v1::JobResult {
    let result = match output {
        JobOutput::Memtest {
            allocated_bytes,
            device,
        } => job_result::Result::Memtest(v1::MemtestResult {
            allocated_bytes,
            device,
        }),
    };
    v1::JobResult {
        result: Some(result),
    }
}

/// A phase sample: what the job measured of itself plus what the agent measured at relay time.
pub fn phase_sample(p: PhaseReport, mem: MemSample) -> v1::PhaseSample {
    v1::PhaseSample {
        phase: p.phase,
        step: p.step,
        at_ms: p.at_ms,
        pid_mem: mem.pid_mem,
        device_used: mem.device_used,
        device_total: mem.device_total,
        cuda_free: p.cuda_free,
        cuda_total: p.cuda_total,
        host_rss: p.host_rss,
        tensor_bytes: p.tensor_bytes.into_iter().collect(),
        metrics: p.metrics.into_iter().collect(),
    }
}

/// The event a report becomes (`None` for `Result`/`Error`, which end the job instead).
/// `mem` is called only for phase reports.
pub fn report_event(report: Report, mem: impl FnOnce() -> MemSample) -> Option<Event> {
    Some(match report {
        Report::Phase(p) => Event::Phase(phase_sample(p, mem())),
        Report::Log { line } => Event::Log(log_line("stdout", line)),
        Report::Token { id, text } => Event::Token(v1::TokenChunk { token_id: id, text }),
        Report::Progress {
            done,
            total,
            unit,
            message,
        } => Event::Progress(v1::Progress {
            done,
            total,
            unit,
            message,
        }),
        Report::Result(_) | Report::Error { .. } => return None,
    })
}

/// A log line event.
pub fn log_line(stream: &str, line: impl Into<String>) -> v1::LogLine {
    v1::LogLine {
        stream: stream.into(),
        line: line.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memtest_spec_converts_and_other_kinds_are_named() {
        let spec = v1::JobSpec {
            spec: Some(job_spec::Spec::Memtest(v1::MemtestSpec {
                bytes: 10,
                steps: 2,
                hold_secs: 1.5,
                step_pause_secs: 0.25,
            })),
        };
        match engine_spec(Some(&spec)).unwrap() {
            spec::JobSpec::Memtest(m) => {
                assert_eq!(
                    (m.bytes, m.steps, m.hold_secs, m.step_pause_secs),
                    (10, 2, 1.5, 0.25)
                )
            }
        }
        let train = v1::JobSpec {
            spec: Some(job_spec::Spec::Train(Default::default())),
        };
        assert!(engine_spec(Some(&train)).unwrap_err().contains("train"));
        assert!(engine_spec(None).is_err());
    }

    #[test]
    fn phase_report_gets_agent_memory() {
        let report = Report::Phase(PhaseReport {
            phase: "memtest_step".into(),
            step: 2,
            at_ms: 5,
            host_rss: 7,
            ..Default::default()
        });
        let mem = MemSample {
            pid_mem: 100,
            device_used: 200,
            device_total: 300,
        };
        let Some(Event::Phase(p)) = report_event(report, || mem) else {
            panic!("phase expected")
        };
        assert_eq!(
            (
                p.phase.as_str(),
                p.step,
                p.pid_mem,
                p.device_used,
                p.device_total,
                p.host_rss
            ),
            ("memtest_step", 2, 100, 200, 300, 7)
        );
        let err = Report::Error {
            message: "x".into(),
        };
        assert!(report_event(err, || unreachable!()).is_none());
    }
}
