//! `kiln watch ID` and `kiln submit … --follow`: stream a job's events (state changes, log
//! lines, phases, tokens, progress) until the job ends, riding out coordinator restarts, and
//! exit non-zero unless it succeeded.

use crate::args::{JobIdArgs, OutputFormat};
use crate::client::{connect, status_error, Client};
use crate::output::{job_json, mib};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::v1::{self, job_event::Event, JobState};
use serde_json::json;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long a broken watch keeps trying to reconnect (the coordinator may be restarting).
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// `kiln watch ID`.
pub async fn run(args: JobIdArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    follow(&mut client, args.id, args.client.output).await
}

/// Prints events for people: one line per event, tokens inline, progress as a bar.
#[derive(Default)]
struct EventPrinter {
    bar: Option<ProgressBar>,
    in_tokens: bool,
}

impl EventPrinter {
    fn end_tokens(&mut self) {
        if self.in_tokens {
            println!();
            self.in_tokens = false;
        }
    }

    fn print(&mut self, ev: &v1::JobEvent) {
        match &ev.event {
            Some(Event::Token(t)) => {
                print!("{}", t.text);
                let _ = std::io::stdout().flush();
                self.in_tokens = true;
            }
            Some(Event::Progress(p)) => {
                self.end_tokens();
                if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    // No terminal to draw a bar on (logs, pipes): one line per update.
                    println!("  progress {}/{} {} {}", p.done, p.total, p.unit, p.message);
                    return;
                }
                let bar = self.bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(p.total.max(1));
                    b.set_style(
                        ProgressStyle::with_template("  {bar:30} {pos}/{len} {msg} [{elapsed}]")
                            .expect("valid template"),
                    );
                    b
                });
                if p.total > 0 {
                    bar.set_length(p.total);
                }
                bar.set_position(p.done);
                bar.set_message(format!("{} {}", p.unit, p.message));
            }
            Some(other) => {
                self.end_tokens();
                let line = match other {
                    Event::State(s) => {
                        if let Some(b) = self.bar.take() {
                            b.finish();
                        }
                        let st = JobState::try_from(s.state).unwrap_or(JobState::Unspecified);
                        let reason = if s.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", s.reason)
                        };
                        format!(
                            "job {} attempt {}: {}{reason}",
                            ev.job_id,
                            ev.attempt,
                            kiln_proto::state_name(st)
                        )
                    }
                    Event::Log(l) => format!("  | {}", l.line),
                    Event::Phase(p) => {
                        let tb = crate::output::tensor_mib(&p.tensor_bytes, "=");
                        format!(
                            "  phase {} step {}: pid_mem {} device {} / {}{}",
                            p.phase,
                            p.step,
                            mib(p.pid_mem),
                            mib(p.device_used),
                            mib(p.device_total),
                            if tb.is_empty() {
                                String::new()
                            } else {
                                format!(" [{}]", tb.join(" "))
                            }
                        )
                    }
                    Event::Token(_) | Event::Progress(_) => unreachable!(),
                };
                // `suspend` clears the bar, prints, and redraws it; unlike `ProgressBar::println`
                // it prints even when the bar is hidden.
                match &self.bar {
                    Some(b) => b.suspend(|| println!("{line}")),
                    None => println!("{line}"),
                }
            }
            None => {}
        }
    }
}

fn event_json(ev: &v1::JobEvent) -> serde_json::Value {
    let mut v =
        json!({"job_id": ev.job_id, "seq": ev.seq, "at_ms": ev.at_ms, "attempt": ev.attempt});
    match &ev.event {
        Some(Event::State(s)) => {
            let st = JobState::try_from(s.state).unwrap_or(JobState::Unspecified);
            v["type"] = "state".into();
            v["state"] = kiln_proto::state_name(st).into();
            v["reason"] = s.reason.clone().into();
        }
        Some(Event::Log(l)) => {
            v["type"] = "log".into();
            v["stream"] = l.stream.clone().into();
            v["line"] = l.line.clone().into();
        }
        Some(Event::Phase(p)) => {
            v["type"] = "phase".into();
            v["phase"] = p.phase.clone().into();
            v["step"] = p.step.into();
            v["pid_mem"] = p.pid_mem.into();
            v["device_used"] = p.device_used.into();
            v["device_total"] = p.device_total.into();
            v["tensor_bytes"] = json!(p
                .tensor_bytes
                .iter()
                .collect::<std::collections::BTreeMap<_, _>>());
            v["metrics"] = json!(p
                .metrics
                .iter()
                .collect::<std::collections::BTreeMap<_, _>>());
        }
        Some(Event::Token(t)) => {
            v["type"] = "token".into();
            v["token_id"] = t.token_id.into();
            v["text"] = t.text.clone().into();
        }
        Some(Event::Progress(p)) => {
            v["type"] = "progress".into();
            v["done"] = p.done.into();
            v["total"] = p.total.into();
            v["unit"] = p.unit.clone().into();
            v["message"] = p.message.clone().into();
        }
        None => {}
    }
    v
}

/// Streams events of job `id` until the job is final; returns 0 only for SUCCEEDED.
pub async fn follow(
    client: &mut Client,
    id: u64,
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let mut after_seq = 0;
    let mut printer = EventPrinter::default();
    let mut broken_since: Option<Instant> = None;
    loop {
        let stream = client
            .watch_job(v1::WatchJobRequest { id, after_seq })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if broken_since.get_or_insert_with(Instant::now).elapsed() > RECONNECT_FOR {
                    return Err(status_error(status));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(status) => return Err(status_error(status)),
        };
        let ended = loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    broken_since = None;
                    after_seq = after_seq.max(ev.seq);
                    match output {
                        OutputFormat::Table => printer.print(&ev),
                        _ => println!("{}", event_json(&ev)),
                    }
                }
                Ok(None) => break true,
                Err(status) => {
                    tracing::warn!(%status, "watch stream broke; reconnecting");
                    break false;
                }
            }
        };
        if ended {
            break;
        }
        if broken_since.get_or_insert_with(Instant::now).elapsed() > RECONNECT_FOR {
            anyhow::bail!("lost the coordinator while watching job {id} and could not reconnect for {RECONNECT_FOR:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    printer.end_tokens();
    let job = client
        .get_job(v1::GetJobRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    match output {
        OutputFormat::Table => super::jobs::print_job(&job),
        // One JSON document per line: the events above, then the final job record.
        _ => println!("{}", job_json(&job)),
    }
    Ok(if job.state == JobState::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
