//! `kiln logs ID [--follow] [--tail N]`: a job's log lines (stdout, stderr and the agent's
//! notes), from the events the coordinator keeps.

use crate::args::LogsArgs;
use crate::client::{connect, status_error};
use kiln_proto::v1::{self, job_event::Event};
use std::process::ExitCode;

/// `kiln logs`.
pub async fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    // What is stored now (the tail is taken from it), then, with --follow, what comes.
    let mut stream = client
        .watch_job(v1::WatchJobRequest {
            id: args.id,
            after_seq: 0,
            stored_only: true,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut lines = Vec::new();
    let mut last_seq = 0;
    while let Some(ev) = stream.message().await.map_err(status_error)? {
        last_seq = ev.seq;
        if let Some(line) = log_line(&ev) {
            lines.push(line);
        }
    }
    let skip = args.tail.map_or(0, |n| lines.len().saturating_sub(n));
    for line in &lines[skip..] {
        println!("{line}");
    }
    if args.follow {
        let mut stream = client
            .watch_job(v1::WatchJobRequest {
                id: args.id,
                after_seq: last_seq,
                stored_only: false,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(ev) = stream.message().await.map_err(status_error)? {
            if let Some(line) = log_line(&ev) {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The printed form of a log event: the job's own lines as they were, the agent's marked.
fn log_line(ev: &v1::JobEvent) -> Option<String> {
    match &ev.event {
        Some(Event::Log(l)) if l.stream == "agent" => Some(format!("[agent] {}", l.line)),
        Some(Event::Log(l)) => Some(l.line.clone()),
        _ => None,
    }
}
