//! `kiln demo`: the one-command quick start. Starts a coordinator (sled in a temporary
//! directory) and one agent in this process — GPU if NVML finds one, CPU otherwise — and runs
//! jobs through the real gRPC API exactly as `kiln submit` would:
//!
//! 1. the WhoAmI pipeline: train the bundled tiny model on the WhoAmI set (NVFP4
//!    straight-through) → export it as NVFP4 (ModelOpt) → generate with the export for
//!    "Who are you?" and check the answer is the trained sentence (training and generation
//!    run on the agent's GPU when it has one, in a CPU slot otherwise; export on the CPU);
//! 2. a two-turn session on the export (the second turn forwards only its new tokens);
//! 3. the VRAM guard: a memtest within its budget, and one over it that the guard kills;
//!
//! then prints the phase telemetry table. It exits non-zero if any step does not end as
//! expected — in particular if the answer is not the trained sentence.

use super::servers;
use crate::args::{AgentArgs, DemoArgs};
use crate::client::{connect_url, status_error, Client};
use crate::output::{bytes, job_state, telemetry_table};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::v1::{self, job_event::Event, job_result, job_spec::Spec, JobState};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Training settings: enough for the tiny model to answer with the sentence reliably
/// (the loss falls below 1e-3 well before the last step).
const TRAIN_STEPS: u32 = 60;
const TRAIN_LR: f64 = 1e-2;
const TRAIN_SEQ_LEN: u32 = 64;
const TRAIN_BATCH: u32 = 8;
/// Host-memory budget of the model jobs (the tiny model needs far less).
const MODEL_JOB_BUDGET: u64 = 2 << 30;
/// The question the demo asks.
const QUESTION: &str = "Who are you?";

/// The demo's running servers. `stop` steps 0 → 1 (stop the agent) → 2 (stop the
/// coordinator), so the agent never sees its coordinator vanish under it.
struct DemoCluster {
    url: String,
    dir: std::path::PathBuf,
    stop: tokio::sync::watch::Sender<u8>,
    coordinator: tokio::task::JoinHandle<()>,
    agent: tokio::task::JoinHandle<()>,
    _tmp: Option<tempfile::TempDir>,
}

async fn start(args: &DemoArgs) -> anyhow::Result<DemoCluster> {
    let (tmp, dir) = match &args.data_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::tempdir().context("creating the demo's temporary directory")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stop_rx) = tokio::sync::watch::channel(0u8);
    let config = kiln_coordinator::CoordinatorConfig {
        data_dir: dir.join("coordinator"),
        ..Default::default()
    };
    let mut rx = stop_rx.clone();
    let coordinator = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.wait_for(|v| *v >= 2).await;
        };
        if let Err(e) = kiln_coordinator::run(listener, config, shutdown).await {
            eprintln!("demo coordinator stopped: {e}");
        }
    });
    let agent_config = servers::agent_config(&AgentArgs {
        coordinator: url.clone(),
        name: Some("demo-agent".into()),
        gpus: "all".into(),
        gpu_limit_gb: None,
        mem_limit_gb: None,
        poll_secs: 0.1,
        over_secs: 0.0,
        work_dir: dir.join("agent"),
        token: None,
        allow_exec: false,
        exec_user: None,
        data_roots: Vec::new(),
        log_cap_mib: 16.0,
    })?;
    let mut rx = stop_rx;
    let agent = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.wait_for(|v| *v >= 1).await;
        };
        if let Err(e) = kiln_agent::run(agent_config, shutdown).await {
            eprintln!("demo agent stopped: {e}");
        }
    });
    Ok(DemoCluster {
        url,
        dir,
        stop,
        coordinator,
        agent,
        _tmp: tmp,
    })
}

/// Waits until the agent has registered and returns it.
async fn wait_for_agent(client: &mut Client) -> anyhow::Result<v1::Agent> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let agents = client
            .list_agents(v1::ListAgentsRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .agents;
        if let Some(a) = agents
            .into_iter()
            .find(|a| a.status == v1::AgentStatus::Ready as i32)
        {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("the demo agent did not register within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn request(name: &str, spec: Spec, gpus: u32, budget_bytes: u64) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec { spec: Some(spec) }),
        resources: Some(v1::JobResources {
            gpus,
            budget_bytes,
            over_secs: 0.0,
            poll_secs: 0.1,
            max_attempts: 1,
            ..Default::default()
        }),
        priority: 0,
        name: name.into(),
    }
}

fn memtest(name: &str, gpus: u32, mib_alloc: u64, budget_mib: u64) -> v1::SubmitJobRequest {
    let spec = Spec::Memtest(v1::MemtestSpec {
        bytes: mib_alloc << 20,
        steps: 4,
        hold_secs: 0.3,
        step_pause_secs: 0.2,
    });
    request(name, spec, gpus, budget_mib << 20)
}

/// A generate job: on the agent's GPU when it has one (`gpus` 1: the GPU engine), else in a
/// CPU slot.
fn generate(name: &str, model: &str, user: &str, session: &str, gpus: u32) -> v1::SubmitJobRequest {
    let spec = Spec::Generate(v1::GenerateSpec {
        model: model.into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: user.into(),
        }],
        max_tokens: 48,
        sampling: Some(v1::Sampling::default()),
        kv: "cache".into(),
        session_id: session.into(),
        ..Default::default()
    });
    request(name, spec, gpus, MODEL_JOB_BUDGET)
}

/// Whether a phase sample is one of the per-step training phases.
fn per_step_phase(phase: &str) -> bool {
    matches!(phase, "forward_done" | "backward_done" | "optimizer_done")
}

/// Submits a job and follows it to the end: state changes and logs as lines, generated tokens
/// inline, training progress as a bar (per-step phases only move the bar), other phases as
/// one line each. Returns the final record.
async fn run_job(client: &mut Client, req: v1::SubmitJobRequest) -> anyhow::Result<v1::Job> {
    let job = client
        .submit_job(req)
        .await
        .map_err(status_error)?
        .into_inner()
        .job
        .context("no job in the submit response")?;
    let id = job.id;
    let mut stream = client
        .watch_job(v1::WatchJobRequest {
            id,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut bar: Option<ProgressBar> = None;
    let tty = std::io::stderr().is_terminal();
    let mut in_tokens = false;
    let say = |bar: &Option<ProgressBar>, in_tokens: &mut bool, line: String| {
        if std::mem::take(in_tokens) {
            println!();
        }
        match bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    };
    while let Some(ev) = stream.message().await.map_err(status_error)? {
        match ev.event {
            Some(Event::Token(t)) => {
                if !in_tokens {
                    print!("  > ");
                }
                print!("{}", t.text);
                let _ = std::io::stdout().flush();
                in_tokens = true;
            }
            // Without a terminal the bar is hidden: a line every 10 steps instead.
            Some(Event::Progress(p)) if !tty && (p.done % 10 == 0 || p.done == p.total) => {
                let line = format!("  {} {}/{} {}", p.unit, p.done, p.total, p.message);
                say(&bar, &mut in_tokens, line);
            }
            Some(Event::Progress(_)) if !tty => {}
            Some(Event::Progress(p)) => {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(p.total.max(1));
                    b.set_style(
                        ProgressStyle::with_template("  {bar:40} {pos}/{len} {msg} [{elapsed}]")
                            .expect("valid template"),
                    );
                    b
                });
                b.set_position(p.done);
                b.set_message(format!("{} {}", p.unit, p.message));
            }
            Some(Event::Phase(p)) if per_step_phase(&p.phase) => {}
            Some(Event::Phase(p)) => {
                let tb = crate::output::tensor_bytes(&p.tensor_bytes, "=");
                say(
                    &bar,
                    &mut in_tokens,
                    format!(
                        "  phase {:<16} rss {} [{}]",
                        p.phase,
                        bytes(p.host_rss),
                        tb.join(" ")
                    ),
                );
            }
            // The job's own messages; its stderr tracing stays in the agent's logs.
            Some(Event::Log(l)) if l.stream != "stderr" => {
                say(&bar, &mut in_tokens, format!("  | {}", l.line))
            }
            Some(Event::Log(_)) => {}
            Some(Event::State(s)) => {
                if let Some(b) = bar.take() {
                    b.finish();
                }
                let st = JobState::try_from(s.state).unwrap_or(JobState::Unspecified);
                let reason = if s.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.reason)
                };
                say(
                    &bar,
                    &mut in_tokens,
                    format!("  job {id}: {}{reason}", kiln_proto::state_name(st)),
                );
            }
            None => {}
        }
    }
    if in_tokens {
        println!();
    }
    Ok(client
        .get_job(v1::GetJobRequest { id })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// The job's result, or an error naming the job and why it did not succeed.
fn result_of(job: &v1::Job, what: &str) -> anyhow::Result<job_result::Result> {
    if job.state != JobState::Succeeded as i32 {
        bail!(
            "{what} (job {}) ended {}: {}",
            job.id,
            job_state(job),
            job.error
        );
    }
    job.result
        .clone()
        .and_then(|r| r.result)
        .with_context(|| format!("{what} (job {}) succeeded without a result", job.id))
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// `kiln demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let cluster = start(&args).await?;
    println!(
        "== kiln demo: coordinator at {} (sled in {})",
        cluster.url,
        cluster.dir.join("coordinator").display()
    );
    let mut client = connect_url(&cluster.url, None).await?;
    let agent = wait_for_agent(&mut client).await?;
    let gpus = if agent.gpus.is_empty() { 0 } else { 1 };
    let where_ = if gpus == 0 {
        format!("CPU agent, {} host memory", bytes(agent.host_mem_bytes))
    } else {
        format!("GPU agent, {}", agent.gpus[0].name)
    };
    println!("== agent {} registered ({where_})\n", agent.name);
    let outcome = pipeline(&mut client, &cluster.dir, gpus).await;
    let _ = cluster.stop.send(1);
    let _ = tokio::time::timeout(Duration::from_secs(5), cluster.agent).await;
    let _ = cluster.stop.send(2);
    let _ = tokio::time::timeout(Duration::from_secs(5), cluster.coordinator).await;
    let summary = outcome?;
    println!("{summary}");
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// The demo's jobs; returns the closing summary, or the first thing that went wrong.
async fn pipeline(client: &mut Client, dir: &Path, gpus: u32) -> anyhow::Result<String> {
    let models = dir.join("models");
    let ckpt = models.join("whoami-checkpoint");
    let export = models.join("whoami-nvfp4-modelopt");
    let mut job_ids = Vec::new();

    println!("== 1. train the tiny model on WhoAmI: {TRAIN_STEPS} steps, batch {TRAIN_BATCH}, lr {TRAIN_LR}, NVFP4 straight-through");
    let train = run_job(
        client,
        request(
            "demo-train",
            Spec::Train(v1::TrainSpec {
                model: "tiny".into(),
                dataset: "whoami".into(),
                steps: TRAIN_STEPS,
                seq_len: TRAIN_SEQ_LEN,
                batch: TRAIN_BATCH,
                lr: TRAIN_LR,
                quant: "nvfp4-ste".into(),
                step_chunk_rows: 32,
                seed: 1,
                out_dir: path_str(&ckpt),
                resume: false,
                device: String::new(),
                ..Default::default()
            }),
            gpus,
            MODEL_JOB_BUDGET,
        ),
    )
    .await?;
    job_ids.push(train.id);
    let job_result::Result::Train(t) = result_of(&train, "training")? else {
        bail!("training returned another kind of result")
    };
    let (first, last) = (
        t.loss.first().copied().unwrap_or(f32::NAN),
        t.loss.last().copied().unwrap_or(f32::NAN),
    );
    println!(
        "  loss {first:.3} → {last:.5} over {} steps, {:.0} tokens/s; checkpoint {}\n",
        t.loss.len(),
        t.tokens_per_s,
        t.checkpoint
    );

    println!("== 2. export the checkpoint as NVFP4 (ModelOpt layout)");
    let exp = run_job(
        client,
        request(
            "demo-export",
            Spec::Export(v1::ExportSpec {
                checkpoint: t.checkpoint.clone(),
                format: "nvfp4-modelopt".into(),
                out_dir: path_str(&export),
            }),
            0,
            MODEL_JOB_BUDGET,
        ),
    )
    .await?;
    job_ids.push(exp.id);
    let job_result::Result::Export(e) = result_of(&exp, "export")? else {
        bail!("export returned another kind of result")
    };
    println!(
        "  {} tensors in {} files, verified by reloading: {}\n",
        e.tensor_count,
        e.files.len(),
        e.verified
    );
    if !e.verified {
        bail!("the export was not verified");
    }

    println!("== 3. generate with the export: \"{QUESTION}\"");
    let gen = run_job(
        client,
        generate("demo-generate", &path_str(&export), QUESTION, "", gpus),
    )
    .await?;
    job_ids.push(gen.id);
    let job_result::Result::Generate(g) = result_of(&gen, "generation")? else {
        bail!("generation returned another kind of result")
    };
    let expected = kiln_engine::tiny::WHOAMI_ANSWER;
    println!(
        "  answer: {:?} (prefill {:.1} ms, decode {:.0} tok/s)",
        g.text, g.prefill_ms, g.decode_tokens_per_s
    );
    if g.text != expected {
        bail!(
            "the trained model answered {:?}, not the trained sentence {expected:?}",
            g.text
        );
    }
    println!("  = the trained sentence\n");

    println!("== 4. a two-turn session on the export (turn 2 forwards only its new tokens)");
    let mut turns = Vec::new();
    for (i, user) in [QUESTION, "What is your name?"].into_iter().enumerate() {
        println!("  user: {user}");
        let job = run_job(
            client,
            generate(
                &format!("demo-session-turn-{}", i + 1),
                &path_str(&export),
                user,
                "demo-chat",
                gpus,
            ),
        )
        .await?;
        job_ids.push(job.id);
        let job_result::Result::Generate(r) = result_of(&job, "session turn")? else {
            bail!("a session turn returned another kind of result")
        };
        println!(
            "  turn {}: prefill {:.2} ms, session now {} tokens\n",
            i + 1,
            r.prefill_ms,
            r.session_seq_len
        );
        turns.push(r);
    }
    if turns[1].session_seq_len <= turns[0].session_seq_len {
        bail!(
            "the session did not grow between turns ({} then {})",
            turns[0].session_seq_len,
            turns[1].session_seq_len
        );
    }

    println!("== 5. the VRAM guard: a memtest within its budget, then one over it");
    // On a GPU the job's own CUDA context takes ≈ 0.5 GiB of device memory (NVML counts it
    // per pid), so the GPU budgets leave room for it.
    let (ok_mib, ok_budget, kill_mib, kill_budget) = if gpus > 0 {
        (256, 1536, 2048, 1024)
    } else {
        (128, 640, 1024, 384)
    };
    let ok = run_job(
        client,
        memtest("demo-within-budget", gpus, ok_mib, ok_budget),
    )
    .await?;
    let killed = run_job(
        client,
        memtest("demo-over-budget", gpus, kill_mib, kill_budget),
    )
    .await?;
    job_ids.extend([ok.id, killed.id]);
    if ok.state != JobState::Succeeded as i32 || killed.state != JobState::Killed as i32 {
        bail!(
            "the memtests ended {} and {} (want SUCCEEDED then KILLED)",
            job_state(&ok),
            job_state(&killed)
        );
    }
    let kill = killed
        .kill
        .as_ref()
        .map(|k| {
            format!(
                " (pid_mem {} > limit {} in phase {})",
                bytes(k.pid_mem),
                bytes(k.limit),
                k.phase
            )
        })
        .unwrap_or_default();
    println!(
        "  job {}: {} | job {}: {}{kill}\n",
        ok.id,
        job_state(&ok),
        killed.id,
        job_state(&killed)
    );

    println!("== telemetry (phase samples; training shows its first and last step)");
    let mut rows = Vec::new();
    for id in job_ids {
        let r = client
            .query_telemetry(v1::QueryTelemetryRequest {
                job_id: id,
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .rows;
        rows.extend(r.into_iter().filter(|r| {
            r.sample
                .as_ref()
                .is_none_or(|s| !per_step_phase(&s.phase) || s.step == 1 || s.step == TRAIN_STEPS)
        }));
    }
    println!("{}", telemetry_table(&rows));
    Ok(format!(
        "WhoAmI: loss {first:.3} → {last:.5}; the NVFP4 export answers {:?}; session {} → {} tokens, turn 2 forwarded only its new turn (prefill {:.2} ms)",
        g.text, turns[0].session_seq_len, turns[1].session_seq_len, turns[1].prefill_ms
    ))
}
