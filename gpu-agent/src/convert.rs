//! Translation between the wire protocol (`kiln_proto::v1`) and the job-process contract
//! (`kiln_job::spec` / `kiln_job::report`). Adding a job kind means one arm in
//! [`engine_spec`] and one in [`job_result()`].

use crate::devices::MemSample;
use kiln_job::report::{JobOutput, PhaseReport, Report};
use kiln_job::spec::{self, DeviceSpec, JobRequest};
use kiln_proto::v1::{self, job_event::Event, job_result, job_spec};
use std::path::PathBuf;

/// The engine's spec for a protocol spec, or why this agent cannot run it.
pub fn engine_spec(spec: Option<&v1::JobSpec>) -> Result<spec::JobSpec, String> {
    Ok(match spec.and_then(|s| s.spec.as_ref()) {
        Some(job_spec::Spec::Memtest(m)) => spec::JobSpec::Memtest(spec::MemtestSpec {
            bytes: m.bytes,
            steps: m.steps,
            hold_secs: m.hold_secs,
            step_pause_secs: m.step_pause_secs,
        }),
        Some(job_spec::Spec::Generate(g)) => spec::JobSpec::Generate(spec::GenerateSpec {
            model: g.model.clone(),
            prompt: g.prompt.clone(),
            messages: g
                .messages
                .iter()
                .map(|m| spec::ChatMessageSpec {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
            max_tokens: g.max_tokens,
            sampling: g
                .sampling
                .map(|s| spec::SamplingSpec {
                    temperature: s.temperature,
                    top_k: s.top_k,
                    top_p: s.top_p,
                    seed: s.seed,
                })
                .unwrap_or_default(),
            kv: spec::KvSpec::parse(&g.kv)?,
            session_id: g.session_id.clone(),
            device: g.device.clone(),
        }),
        Some(job_spec::Spec::Train(t)) => spec::JobSpec::Train(spec::TrainSpec {
            model: t.model.clone(),
            dataset: t.dataset.clone(),
            steps: t.steps,
            seq_len: t.seq_len,
            batch: t.batch,
            lr: t.lr,
            quant: spec::QuantSpec::parse(&t.quant)?,
            step_chunk_rows: t.step_chunk_rows,
            seed: t.seed,
            out_dir: t.out_dir.clone(),
            resume: t.resume,
            device: t.device.clone(),
            save_every: t.save_every,
            grad_accum: t.grad_accum,
            clip_grad: t.clip_grad,
            moments: spec::MomentsSpec::parse(&t.moments)?,
            save_only_model: t.save_only_model,
            recompute: t.recompute,
        }),
        Some(job_spec::Spec::Export(e)) => spec::JobSpec::Export(spec::ExportSpec {
            checkpoint: e.checkpoint.clone(),
            format: spec::ExportFormat::parse(&e.format)?,
            out_dir: e.out_dir.clone(),
        }),
        Some(job_spec::Spec::Exec(_)) => {
            return Err(
                "exec jobs run their own command, not a kiln job process (agent bug)".into(),
            )
        }
        None => return Err("the assignment carries no job spec (coordinator bug)".into()),
    })
}

/// Where a job process finds the agent's sessions and their byte budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionsPlace {
    /// The session store directory.
    pub dir: PathBuf,
    /// Its byte budget (0 = the engine's default).
    pub budget_bytes: u64,
}

/// The request written to the job process's stdin.
pub fn job_request(
    job: &v1::Job,
    device: DeviceSpec,
    work_dir: PathBuf,
    sessions: &SessionsPlace,
) -> Result<JobRequest, String> {
    Ok(JobRequest {
        job_id: job.id,
        attempt: job.attempt,
        device,
        budget_bytes: job.resources.as_ref().map_or(0, |r| r.budget_bytes),
        work_dir,
        sessions_dir: Some(sessions.dir.clone()),
        sessions_budget_bytes: sessions.budget_bytes,
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
        JobOutput::Generate {
            text,
            token_ids,
            prefill_ms,
            decode_tokens_per_s,
            session_seq_len,
            ab_tokens_agree,
            ab_max_logit_diff,
        } => job_result::Result::Generate(v1::GenerateResult {
            text,
            token_ids,
            prefill_ms,
            decode_tokens_per_s,
            session_seq_len,
            ab_tokens_agree,
            ab_max_logit_diff,
        }),
        JobOutput::Train {
            loss,
            checkpoint,
            tokens_per_s,
            planned_bytes,
            step_ms,
        } => job_result::Result::Train(v1::TrainResult {
            loss,
            checkpoint,
            tokens_per_s,
            planned_bytes,
            step_ms,
        }),
        JobOutput::Export {
            files,
            tensor_count,
            verified,
        } => job_result::Result::Export(v1::ExportResult {
            files,
            tensor_count,
            verified,
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
    fn every_kind_converts_and_bad_enums_are_named() {
        let memtest = v1::JobSpec {
            spec: Some(job_spec::Spec::Memtest(v1::MemtestSpec {
                bytes: 10,
                steps: 2,
                hold_secs: 1.5,
                step_pause_secs: 0.25,
            })),
        };
        let spec::JobSpec::Memtest(m) = engine_spec(Some(&memtest)).unwrap() else {
            panic!("memtest expected")
        };
        assert_eq!(
            (m.bytes, m.steps, m.hold_secs, m.step_pause_secs),
            (10, 2, 1.5, 0.25)
        );
        let generate = v1::JobSpec {
            spec: Some(job_spec::Spec::Generate(v1::GenerateSpec {
                model: "tiny".into(),
                messages: vec![v1::ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                }],
                max_tokens: 5,
                sampling: Some(v1::Sampling {
                    temperature: 0.5,
                    top_k: 3,
                    top_p: 0.9,
                    seed: 7,
                }),
                kv: "ab".into(),
                session_id: "s1".into(),
                ..Default::default()
            })),
        };
        let spec::JobSpec::Generate(g) = engine_spec(Some(&generate)).unwrap() else {
            panic!("generate expected")
        };
        assert_eq!(g.kv, spec::KvSpec::Ab);
        assert_eq!((g.sampling.top_k, g.sampling.seed), (3, 7));
        assert_eq!(
            (g.messages[0].role.as_str(), g.session_id.as_str()),
            ("user", "s1")
        );
        let train = v1::JobSpec {
            spec: Some(job_spec::Spec::Train(v1::TrainSpec {
                quant: "nvfp4-full".into(),
                steps: 3,
                ..Default::default()
            })),
        };
        let spec::JobSpec::Train(t) = engine_spec(Some(&train)).unwrap() else {
            panic!("train expected")
        };
        assert_eq!((t.quant, t.steps), (spec::QuantSpec::Nvfp4Full, 3));
        let bad_export = v1::JobSpec {
            spec: Some(job_spec::Spec::Export(v1::ExportSpec {
                format: "gguf".into(),
                ..Default::default()
            })),
        };
        assert!(engine_spec(Some(&bad_export)).unwrap_err().contains("gguf"));
        assert!(engine_spec(None).is_err());
    }

    #[test]
    fn outputs_become_results() {
        let r = job_result(JobOutput::Train {
            loss: vec![2.0, 1.5],
            checkpoint: "/ck".into(),
            tokens_per_s: 10.0,
            planned_bytes: 5,
            step_ms: 2.5,
        });
        let Some(job_result::Result::Train(t)) = r.result else {
            panic!("train result expected")
        };
        assert_eq!((t.loss, t.checkpoint.as_str()), (vec![2.0, 1.5], "/ck"));
        assert_eq!((t.planned_bytes, t.step_ms), (5, 2.5));
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
