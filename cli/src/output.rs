//! How data verbs print: the stable JSON form of jobs, agents and telemetry rows (field names
//! follow the proto, snake_case; enum values are the upper-case names of the proto enums), and the
//! human tables.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, Table};
use kiln_proto::v1::{self, job_result, job_spec, JobKind, JobState};
use kiln_proto::{agent_status_name, kind_name, source_name, state_name};
use serde_json::{json, Value};

/// An error and its causes on one line, `a: b: c`, leaving out a cause whose text the message
/// before it already holds (library errors often print their source themselves).
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    let mut last = out.clone();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !last.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
        last = c;
    }
    out
}

/// Bytes in human units (GiB from 1 GiB up); the one formatter of every table and line.
pub use kiln_proto::human_bytes as bytes;

/// A phase sample's non-zero tensor categories as `{category}{sep}{bytes}`, sorted by category.
pub fn tensor_bytes(
    tensor_bytes: &std::collections::HashMap<String, u64>,
    sep: &str,
) -> Vec<String> {
    let mut tb: Vec<_> = tensor_bytes
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}{sep}{}", bytes(*v)))
        .collect();
    tb.sort();
    tb
}

/// The state of a job as users see it.
pub fn job_state(job: &v1::Job) -> &'static str {
    state_name(JobState::try_from(job.state).unwrap_or(JobState::Unspecified))
}

/// The kind of a job as users see it.
pub fn job_kind(job: &v1::Job) -> &'static str {
    kind_name(JobKind::try_from(job.kind).unwrap_or(JobKind::Unspecified))
}

fn kill_json(k: &v1::KillRecord) -> Value {
    json!({
        "pid": k.pid, "pid_mem": k.pid_mem, "total_mem": k.total_mem,
        "limit": k.limit, "phase": k.phase, "at_ms": k.at_ms,
    })
}

fn spec_json(spec: Option<&v1::JobSpec>) -> Value {
    match spec.and_then(|s| s.spec.as_ref()) {
        Some(job_spec::Spec::Memtest(m)) => json!({
            "bytes": m.bytes, "steps": m.steps, "hold_secs": m.hold_secs,
            "step_pause_secs": m.step_pause_secs,
        }),
        Some(job_spec::Spec::Generate(g)) => json!({
            "model": g.model, "prompt": g.prompt,
            "messages": g.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "max_tokens": g.max_tokens,
            "sampling": g.sampling.as_ref().map(|s| json!({
                "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed,
            })),
            "kv": g.kv, "session_id": g.session_id, "device": g.device,
        }),
        Some(job_spec::Spec::Train(t)) => json!({
            "model": t.model, "dataset": t.dataset, "steps": t.steps, "seq_len": t.seq_len,
            "batch": t.batch, "lr": t.lr, "quant": t.quant, "step_chunk_rows": t.step_chunk_rows,
            "seed": t.seed, "out_dir": t.out_dir, "resume": t.resume, "device": t.device,
            "save_every": t.save_every, "grad_accum": t.grad_accum, "clip_grad": t.clip_grad,
            "moments": t.moments, "save_only_model": t.save_only_model, "recompute": t.recompute,
        }),
        Some(job_spec::Spec::Export(e)) => json!({
            "checkpoint": e.checkpoint, "format": e.format, "out_dir": e.out_dir,
        }),
        Some(job_spec::Spec::Exec(e)) => json!({
            "argv": e.argv, "env": e.env, "workdir": e.workdir, "grace_secs": e.grace_secs,
        }),
        None => Value::Null,
    }
}

fn result_json(result: Option<&v1::JobResult>, ab: bool) -> Value {
    match result.and_then(|r| r.result.as_ref()) {
        Some(job_result::Result::Memtest(m)) => json!({
            "allocated_bytes": m.allocated_bytes, "device": m.device,
        }),
        Some(job_result::Result::Generate(g)) => {
            let mut v = json!({
                "text": g.text, "token_ids": g.token_ids, "prefill_ms": g.prefill_ms,
                "decode_tokens_per_s": g.decode_tokens_per_s, "session_seq_len": g.session_seq_len,
            });
            // The A/B fields mean something only for `--kv ab` jobs.
            if ab {
                v["ab_tokens_agree"] = g.ab_tokens_agree.into();
                v["ab_max_logit_diff"] = g.ab_max_logit_diff.into();
            }
            v
        }
        Some(job_result::Result::Train(t)) => json!({
            "loss": t.loss, "checkpoint": t.checkpoint, "tokens_per_s": t.tokens_per_s,
            "planned_bytes": t.planned_bytes, "step_ms": t.step_ms,
        }),
        Some(job_result::Result::Export(e)) => json!({
            "files": e.files, "tensor_count": e.tensor_count, "verified": e.verified,
        }),
        Some(job_result::Result::Exec(e)) => json!({ "exit_code": e.exit_code }),
        None => Value::Null,
    }
}

/// Whether a job is a generate job run with `--kv ab`.
fn is_ab(job: &v1::Job) -> bool {
    matches!(job.spec.as_ref().and_then(|s| s.spec.as_ref()), Some(job_spec::Spec::Generate(g)) if g.kv == "ab")
}

/// The stable JSON form of a job.
pub fn job_json(job: &v1::Job) -> Value {
    let res = job.resources.unwrap_or_default();
    let mut v = json!({
        "id": job.id,
        "name": job.name,
        "kind": job_kind(job),
        "state": job_state(job),
        "attempt": job.attempt,
        "priority": job.priority,
        "gpus": res.gpus,
        "budget_bytes": res.budget_bytes,
        "over_secs": res.over_secs,
        "poll_secs": res.poll_secs,
        "max_attempts": res.max_attempts,
        "agent": job.agent,
        "gpu_indices": job.gpu_indices,
        "submitted_at_ms": job.submitted_at_ms,
        "started_at_ms": job.started_at_ms,
        "finished_at_ms": job.finished_at_ms,
        "error": job.error,
        "peak_mem": job.peak_mem,
        "session_id": job.session_id,
        "spec": spec_json(job.spec.as_ref()),
        "result": result_json(job.result.as_ref(), is_ab(job)),
    });
    if let Some(k) = &job.kill {
        v["kill"] = kill_json(k);
    }
    v["attempts"] = job
        .attempts
        .iter()
        .map(|a| {
            let mut r = json!({
                "attempt": a.attempt, "agent": a.agent, "gpu_indices": a.gpu_indices,
                "budget_bytes": a.budget_bytes, "started_at_ms": a.started_at_ms,
                "finished_at_ms": a.finished_at_ms,
                "state": kiln_proto::state_name(a.state()), "error": a.error,
                "peak_mem": a.peak_mem,
            });
            if let Some(k) = &a.kill {
                r["kill"] = kill_json(k);
            }
            r
        })
        .collect::<Vec<_>>()
        .into();
    v
}

/// A table of jobs.
pub fn jobs_table(jobs: &[v1::Job]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header([
        "ID", "KIND", "STATE", "ATTEMPT", "PRIO", "GPUS", "BUDGET", "PEAK", "AGENT", "NAME",
    ]);
    for j in jobs {
        let res = j.resources.unwrap_or_default();
        t.add_row(vec![
            Cell::new(j.id),
            Cell::new(job_kind(j)),
            Cell::new(job_state(j)),
            Cell::new(j.attempt),
            Cell::new(j.priority),
            Cell::new(res.gpus),
            Cell::new(bytes(res.budget_bytes)),
            Cell::new(if j.peak_mem > 0 {
                bytes(j.peak_mem)
            } else {
                "-".into()
            }),
            Cell::new(if j.agent.is_empty() { "-" } else { &j.agent }),
            Cell::new(&j.name),
        ]);
    }
    t
}

/// The stable JSON form of an agent.
pub fn agent_json(a: &v1::Agent) -> Value {
    let status = v1::AgentStatus::try_from(a.status).unwrap_or(v1::AgentStatus::Unspecified);
    json!({
        "name": a.name,
        "status": agent_status_name(status),
        "nvml": a.nvml,
        "allow_exec": a.allow_exec,
        "host_mem_bytes": a.host_mem_bytes,
        "last_seen_ms": a.last_seen_ms,
        "running_jobs": a.running_jobs,
        "sessions": a.sessions,
        "version": a.version,
        "gpus": a.gpus.iter().map(|g| json!({
            "index": g.index, "uuid": g.uuid, "name": g.name,
            "total_bytes": g.total_bytes, "foreign_used_bytes": g.foreign_used_bytes,
        })).collect::<Vec<_>>(),
    })
}

/// A table of agents, one row per GPU (or one row for a CPU agent).
pub fn agents_table(agents: &[v1::Agent]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(["AGENT", "STATUS", "DEVICE", "CAPACITY", "FOREIGN", "JOBS"]);
    for a in agents {
        let status = v1::AgentStatus::try_from(a.status).unwrap_or(v1::AgentStatus::Unspecified);
        let jobs = a
            .running_jobs
            .iter()
            .map(|j| j.to_string())
            .collect::<Vec<_>>()
            .join(",");
        t.add_row(vec![
            Cell::new(&a.name),
            Cell::new(agent_status_name(status)),
            Cell::new("host (gpus=0)"),
            Cell::new(bytes(a.host_mem_bytes)),
            Cell::new("-"),
            Cell::new(&jobs),
        ]);
        for g in &a.gpus {
            t.add_row(vec![
                Cell::new(""),
                Cell::new(""),
                Cell::new(format!("gpu{} {}", g.index, g.name)),
                Cell::new(bytes(g.total_bytes)),
                Cell::new(bytes(g.foreign_used_bytes)),
                Cell::new(""),
            ]);
        }
    }
    t
}

/// The stable JSON form of a telemetry row (flattened: sample fields at the top level).
pub fn telemetry_json(r: &v1::TelemetryRow) -> Value {
    let s = r.sample.clone().unwrap_or_default();
    let source =
        v1::TelemetrySource::try_from(r.source).unwrap_or(v1::TelemetrySource::Unspecified);
    json!({
        "job_id": r.job_id,
        "attempt": r.attempt,
        "agent": r.agent,
        "gpu_index": r.gpu_index,
        "source": source_name(source),
        "phase": s.phase,
        "step": s.step,
        "at_ms": s.at_ms,
        "pid_mem": s.pid_mem,
        "device_used": s.device_used,
        "device_total": s.device_total,
        "cuda_free": s.cuda_free,
        "cuda_total": s.cuda_total,
        "host_rss": s.host_rss,
        "tensor_bytes": s.tensor_bytes.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "metrics": s.metrics.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// CSV of telemetry rows (tensor bytes as `category=bytes` pairs joined by `;`).
pub fn telemetry_csv(rows: &[v1::TelemetryRow]) -> String {
    let mut out = String::from(
        "job_id,attempt,agent,gpu_index,source,phase,step,at_ms,pid_mem,device_used,device_total,cuda_free,cuda_total,host_rss,tensor_bytes\n",
    );
    for r in rows {
        let s = r.sample.clone().unwrap_or_default();
        let source =
            v1::TelemetrySource::try_from(r.source).unwrap_or(v1::TelemetrySource::Unspecified);
        let mut tb: Vec<_> = s
            .tensor_bytes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        tb.sort();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.job_id,
            r.attempt,
            r.agent,
            r.gpu_index,
            source_name(source),
            s.phase,
            s.step,
            s.at_ms,
            s.pid_mem,
            s.device_used,
            s.device_total,
            s.cuda_free,
            s.cuda_total,
            s.host_rss,
            tb.join(";")
        ));
    }
    out
}

/// A table of telemetry rows; times are relative to the first row.
pub fn telemetry_table(rows: &[v1::TelemetryRow]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header([
        "JOB",
        "T+S",
        "SOURCE",
        "PHASE",
        "STEP",
        "PID MEM",
        "DEVICE USED",
        "DEVICE TOTAL",
        "TENSORS",
    ]);
    let t0 = rows
        .iter()
        .filter_map(|r| r.sample.as_ref())
        .map(|s| s.at_ms)
        .min()
        .unwrap_or(0);
    for r in rows {
        let s = r.sample.clone().unwrap_or_default();
        let source =
            v1::TelemetrySource::try_from(r.source).unwrap_or(v1::TelemetrySource::Unspecified);
        let tb = tensor_bytes(&s.tensor_bytes, " ");
        t.add_row(vec![
            Cell::new(r.job_id),
            Cell::new(format!(
                "{:.2}",
                (s.at_ms.saturating_sub(t0)) as f64 / 1000.0
            )),
            Cell::new(source_name(source)),
            Cell::new(&s.phase),
            Cell::new(s.step),
            Cell::new(bytes(s.pid_mem)),
            Cell::new(bytes(s.device_used)),
            Cell::new(bytes(s.device_total)),
            Cell::new(tb.join(", ")),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// Prints its source in its own message, as many library errors do.
    #[derive(Debug)]
    struct Repeats(std::io::Error);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "reading x: {}", self.0)
        }
    }

    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Repeats(io())).context("quantizing m");
        assert_eq!(error_chain(&e), "quantizing m: reading x: no such file");
        let e = anyhow::Error::new(io())
            .context("loading")
            .context("running");
        assert_eq!(error_chain(&e), "running: loading: no such file");
    }
}
