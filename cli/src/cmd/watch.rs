//! `kiln watch ID` and `kiln submit … --follow`: stream a job's events (state changes, log
//! lines, phases, tokens, progress) until the job ends, riding out coordinator restarts, and
//! exit non-zero unless it succeeded. For people (the table format) it shows state changes,
//! the job's own messages, tokens, a progress bar and the first sample of each phase, then a
//! summary of the phases; `-v` shows every event, as `-o json` always does.

use crate::args::{JobIdArgs, OutputFormat};
use crate::client::{connect, status_error, Client};
use crate::output::{bytes, job_json};
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
    follow(&mut client, args.id, args.client.output, args.verbose).await
}

/// Prints events for people: one line per event, tokens inline, progress as a bar.
#[derive(Default)]
struct EventPrinter {
    bar: Option<ProgressBar>,
    in_tokens: bool,
    /// Every event (each phase sample, the job's stderr log lines, each progress update).
    verbose: bool,
    /// Print the job's stderr lines (with -v, and always for exec jobs).
    show_stderr: bool,
    /// Phases seen: name → (samples, peak pid_mem), in order of first appearance.
    phases: Vec<(String, u32, u64)>,
    /// The last progress fraction printed as a line (no terminal for a bar), in tenths.
    progress_tenths: Option<u64>,
}

impl EventPrinter {
    fn new(verbose: bool) -> Self {
        Self {
            verbose,
            ..Default::default()
        }
    }

    /// Notes a phase sample; true when it is the first of its name (worth a line).
    fn count_phase(&mut self, name: &str, pid_mem: u64) -> bool {
        match self.phases.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, count, peak)) => {
                *count += 1;
                *peak = (*peak).max(pid_mem);
                false
            }
            None => {
                self.phases.push((name.to_string(), 1, pid_mem));
                true
            }
        }
    }

    /// One line per phase name with its count and peak, when some phase repeated (with `-v`
    /// every sample was printed already).
    fn print_phase_summary(&self) {
        if self.verbose || self.phases.iter().all(|(_, n, _)| *n == 1) {
            return;
        }
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|(name, n, peak)| format!("{name} ×{n} (peak {})", bytes(*peak)))
            .collect();
        println!("  phases: {}", parts.join(", "));
    }

    fn end_tokens(&mut self) {
        if self.in_tokens {
            println!();
            self.in_tokens = false;
        }
    }

    fn print(&mut self, ev: &v1::JobEvent) {
        match &ev.event {
            Some(Event::Token(t)) => {
                print!("{}", printable(&t.text));
                let _ = std::io::stdout().flush();
                self.in_tokens = true;
            }
            Some(Event::Progress(p)) => {
                self.end_tokens();
                if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    // No terminal to draw a bar on (logs, pipes): a line per update with -v,
                    // else one per tenth of the work.
                    let tenths = (p.done * 10).checked_div(p.total);
                    if self.verbose || tenths.is_none() || tenths > self.progress_tenths {
                        self.progress_tenths = tenths;
                        println!("  progress {}/{} {} {}", p.done, p.total, p.unit, p.message);
                    }
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
            Some(Event::Log(l)) if l.stream == "stderr" && !self.show_stderr => {
                // The job's own diagnostics (timestamped tracing lines): `-v` shows them.
            }
            Some(Event::Phase(p)) if !self.count_phase(&p.phase, p.pid_mem) && !self.verbose => {}
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
                        // Attempt 0 is "not placed yet": no attempt to name.
                        let attempt = if ev.attempt == 0 {
                            String::new()
                        } else {
                            format!(" attempt {}", ev.attempt)
                        };
                        format!(
                            "job {}{attempt}: {}{reason}",
                            ev.job_id,
                            kiln_proto::state_name(st)
                        )
                    }
                    Event::Log(l) => format!("  | {}", l.line),
                    Event::Phase(p) => {
                        let tb = crate::output::tensor_bytes(&p.tensor_bytes, "=");
                        format!(
                            "  phase {} step {}: pid_mem {} device {} / {}{}",
                            p.phase,
                            p.step,
                            bytes(p.pid_mem),
                            bytes(p.device_used),
                            bytes(p.device_total),
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

/// Generated text as it may go to a terminal: control characters (an untrained model emits
/// any byte) and the replacement character of an incomplete UTF-8 piece are shown escaped
/// (`\u{7}`, `\u{fffd}`) instead of being written raw; newlines and tabs stay.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if (c.is_control() && c != '\n' && c != '\t') || c == char::REPLACEMENT_CHARACTER {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
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
    verbose: bool,
) -> anyhow::Result<ExitCode> {
    let mut after_seq = 0;
    let mut printer = EventPrinter::new(verbose);
    // An exec job's stderr is the user's own output, not Kiln's diagnostics: always shown.
    let job = client
        .get_job(v1::GetJobRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    printer.show_stderr = verbose || job.kind == v1::JobKind::Exec as i32;
    let mut broken_since: Option<Instant> = None;
    loop {
        let stream = client
            .watch_job(v1::WatchJobRequest {
                id,
                after_seq,
                ..Default::default()
            })
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
    if let Some(b) = printer.bar.take() {
        b.finish();
    }
    printer.print_phase_summary();
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

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn tokens_print_without_raw_control_bytes() {
        assert_eq!(printable("I am\tKiln\n"), "I am\tKiln\n");
        assert_eq!(
            printable("a\u{7}b\u{fffd}\u{1b}[2J"),
            "a\\u{7}b\\u{fffd}\\u{1b}[2J"
        );
    }
}
