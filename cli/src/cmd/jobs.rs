//! `kiln jobs`, `kiln job ID`, `kiln cancel ID`.

use super::print_json;
use crate::args::{JobIdArgs, JobsArgs, OutputFormat};
use crate::client::{connect, status_error};
use crate::output::{bytes, job_json, job_kind, job_state, jobs_table};
use anyhow::anyhow;
use kiln_proto::v1;
use std::process::ExitCode;

/// `kiln jobs`.
pub async fn list(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let states = args
        .states
        .iter()
        .map(|s| {
            kiln_proto::parse_state(s)
                .map(|s| s as i32)
                .ok_or_else(|| anyhow!("unknown state {s:?}: use QUEUED, ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED, KILLED or LOST"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kind = match &args.kind {
        Some(k) => kiln_proto::parse_kind(k)
            .ok_or_else(|| anyhow!("unknown kind {k:?}: use memtest, generate, train or export"))?
            as i32,
        None => 0,
    };
    let mut client = connect(&args.client).await?;
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    while jobs.len() < args.limit {
        let resp = client
            .list_jobs(v1::ListJobsRequest {
                states: states.clone(),
                kind,
                page_size: (args.limit - jobs.len()).min(1000) as u32,
                page_token: page_token.clone(),
                agent: args.agent.clone().unwrap_or_default(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        jobs.extend(resp.jobs);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    jobs.truncate(args.limit);
    match args.client.output {
        OutputFormat::Table => println!("{}", jobs_table(&jobs)),
        _ => print_json(&serde_json::Value::Array(
            jobs.iter().map(job_json).collect(),
        )),
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one job for people.
pub fn print_job(job: &v1::Job) {
    let res = job.resources.unwrap_or_default();
    println!("job {} ({}) {}", job.id, job_kind(job), job_state(job));
    if !job.name.is_empty() {
        println!("  name:      {}", job.name);
    }
    println!(
        "  attempt:   {} of at most {}",
        job.attempt, res.max_attempts
    );
    if res.gpus == 0 {
        println!(
            "  resources: CPU slot, budget {} of host memory, priority {}",
            bytes(res.budget_bytes),
            job.priority
        );
    } else {
        println!(
            "  resources: {} GPU(s), budget {} per GPU, priority {}",
            res.gpus,
            bytes(res.budget_bytes),
            job.priority
        );
    }
    if !job.agent.is_empty() {
        println!("  agent:     {} gpus {:?}", job.agent, job.gpu_indices);
    }
    if job.peak_mem > 0 {
        println!("  peak mem:  {}", bytes(job.peak_mem));
    }
    if let Some(k) = &job.kill {
        println!(
            "  killed:    pid {}: pid_mem {} > limit {} (device used {}) in phase {}",
            k.pid,
            bytes(k.pid_mem),
            bytes(k.limit),
            bytes(k.total_mem),
            if k.phase.is_empty() { "-" } else { &k.phase }
        );
    }
    if !job.error.is_empty() {
        println!("  error:     {}", job.error);
    }
    if job.attempts.len() > 1 {
        println!("  attempts:");
        for a in &job.attempts {
            let what = match &a.kill {
                Some(k) => format!(
                    "pid_mem {} > limit {} in phase {}",
                    bytes(k.pid_mem),
                    bytes(k.limit),
                    if k.phase.is_empty() { "-" } else { &k.phase }
                ),
                None => a.error.clone(),
            };
            println!(
                "    {}. {:<9} on {} budget {}, peak {}{}",
                a.attempt,
                kiln_proto::state_name(a.state()),
                if a.agent.is_empty() { "-" } else { &a.agent },
                bytes(a.budget_bytes),
                bytes(a.peak_mem),
                if what.is_empty() {
                    String::new()
                } else {
                    format!(": {what}")
                }
            );
        }
    }
    let mut v = job_json(job);
    if let Some(loss) = v["result"]["loss"]
        .as_array()
        .filter(|l| l.len() > 4)
        .cloned()
    {
        // A long loss curve reads better as its ends; `-o json` has every step.
        let (first, last) = (&loss[0], &loss[loss.len() - 1]);
        v["result"]["loss"] = format!("{first} → {last} over {} steps", loss.len()).into();
    }
    if !v["result"].is_null() {
        println!("  result:    {}", v["result"]);
    }
}

/// `kiln job ID`.
pub async fn show(args: JobIdArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    let job = client
        .get_job(v1::GetJobRequest { id: args.id })
        .await
        .map_err(status_error)?
        .into_inner();
    match args.client.output {
        OutputFormat::Table => print_job(&job),
        _ => print_json(&job_json(&job)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln cancel ID`.
pub async fn cancel(args: JobIdArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    let job = client
        .cancel_job(v1::CancelJobRequest { id: args.id })
        .await
        .map_err(status_error)?
        .into_inner();
    match args.client.output {
        OutputFormat::Table => println!("job {} {}", job.id, job_state(&job)),
        _ => print_json(&job_json(&job)),
    }
    Ok(ExitCode::SUCCESS)
}
