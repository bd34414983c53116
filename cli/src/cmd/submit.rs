//! `kiln submit memtest|generate|train|export`: flags → SubmitJobRequest, print the accepted
//! job, and with --follow stream its events until it ends.

use super::{gib_to_bytes, print_json, watch};
use crate::args::{OutputFormat, SubmitArgs, SubmitCommon, SubmitKind};
use crate::client::{connect, status_error};
use crate::output::job_json;
use anyhow::bail;
use kiln_proto::v1::{self, job_spec::Spec};
use std::process::ExitCode;

/// The default memory budget when --budget-gb is not given, per kind.
fn default_budget_gb(kind: &SubmitKind) -> f64 {
    match kind {
        // memtest's natural budget is what it allocates plus room for the process itself.
        SubmitKind::Memtest(m) => m.gib + 1.0,
        SubmitKind::Generate(_) | SubmitKind::Export(_) => 4.0,
        SubmitKind::Train(_) => 8.0,
        SubmitKind::Exec(_) => 4.0,
    }
}

fn resources(common: &SubmitCommon, budget_gb: f64) -> anyhow::Result<v1::JobResources> {
    if !(budget_gb > 0.0 && budget_gb.is_finite()) {
        bail!("--budget-gb must be a positive number of GiB (got {budget_gb})");
    }
    if common.max_attempts == 0 {
        bail!("--max-attempts must be at least 1");
    }
    if common.poll_secs <= 0.0 || common.over_secs < 0.0 {
        bail!("--poll-secs must be > 0 and --over-secs must be ≥ 0");
    }
    let (on_kill_grow, max_budget_bytes) = match &common.on_kill {
        Some(policy) => parse_on_kill(policy, budget_gb)?,
        None => (0.0, 0),
    };
    Ok(v1::JobResources {
        gpus: common.gpus,
        budget_bytes: gib_to_bytes(budget_gb),
        over_secs: common.over_secs,
        poll_secs: common.poll_secs,
        max_attempts: common.max_attempts,
        on_kill_grow,
        max_budget_bytes,
    })
}

/// `grow=F[,max-budget-gb=Y]` → (F, Y in bytes or 0).
fn parse_on_kill(policy: &str, budget_gb: f64) -> anyhow::Result<(f64, u64)> {
    let (mut grow, mut max) = (None, 0);
    for part in policy.split(',') {
        match part.split_once('=') {
            Some(("grow", f)) => {
                let f: f64 = f.parse().map_err(|_| {
                    anyhow::anyhow!("--on-kill {policy:?}: grow={f} is not a number")
                })?;
                if !(f > 1.0 && f <= 16.0) {
                    bail!("--on-kill {policy:?}: grow must be more than 1 and at most 16");
                }
                grow = Some(f);
            }
            Some(("max-budget-gb", y)) => {
                let y: f64 = y.parse().map_err(|_| {
                    anyhow::anyhow!("--on-kill {policy:?}: max-budget-gb={y} is not a number")
                })?;
                if !(y.is_finite() && y >= budget_gb) {
                    bail!("--on-kill {policy:?}: max-budget-gb must be at least --budget-gb ({budget_gb})");
                }
                max = gib_to_bytes(y);
            }
            _ => bail!("--on-kill {policy:?}: write grow=F or grow=F,max-budget-gb=Y"),
        }
    }
    let grow = grow.ok_or_else(|| anyhow::anyhow!("--on-kill {policy:?}: grow=F is missing"))?;
    Ok((grow, max))
}

/// How `kiln submit` goes on after the job is accepted.
pub struct AfterSubmit {
    /// `--follow`.
    pub follow: bool,
    /// `--verbose`.
    pub verbose: bool,
}

/// Turns the parsed flags into a request; validates what the coordinator cannot know.
pub fn build_request(kind: &SubmitKind) -> anyhow::Result<(v1::SubmitJobRequest, AfterSubmit)> {
    let common = match kind {
        SubmitKind::Memtest(a) => &a.common,
        SubmitKind::Generate(a) => &a.common,
        SubmitKind::Train(a) => &a.common,
        SubmitKind::Export(a) => &a.common,
        SubmitKind::Exec(a) => &a.common,
    };
    let spec = match kind {
        SubmitKind::Memtest(m) => {
            if m.gib.is_nan() || m.gib <= 0.0 || m.steps == 0 {
                bail!("memtest needs --gib > 0 and --steps ≥ 1");
            }
            Spec::Memtest(v1::MemtestSpec {
                bytes: gib_to_bytes(m.gib),
                steps: m.steps,
                hold_secs: m.hold_secs,
                step_pause_secs: m.step_pause_secs,
            })
        }
        SubmitKind::Generate(g) => {
            if !["cache", "replay", "ab"].contains(&g.kv.as_str()) {
                bail!("--kv must be cache, replay or ab (got {:?})", g.kv);
            }
            let (prompt, messages) = if g.raw {
                (g.prompt.clone(), vec![])
            } else {
                let mut msgs = Vec::new();
                if let Some(sys) = &g.system {
                    msgs.push(v1::ChatMessage {
                        role: "system".into(),
                        content: sys.clone(),
                    });
                }
                msgs.push(v1::ChatMessage {
                    role: "user".into(),
                    content: g.prompt.clone(),
                });
                (String::new(), msgs)
            };
            Spec::Generate(v1::GenerateSpec {
                model: g.model.clone(),
                prompt,
                messages,
                max_tokens: g.max_tokens,
                sampling: Some(v1::Sampling {
                    temperature: g.temperature,
                    top_k: g.top_k,
                    top_p: g.top_p,
                    seed: g.seed,
                }),
                kv: g.kv.clone(),
                session_id: g.session.clone().unwrap_or_default(),
                device: g.device.clone(),
            })
        }
        SubmitKind::Train(t) => {
            if !["nvfp4-ste", "nvfp4-full", "none"].contains(&t.quant.as_str()) {
                bail!(
                    "--quant must be nvfp4-ste, nvfp4-full or none (got {:?})",
                    t.quant
                );
            }
            if t.steps == 0 || t.batch == 0 || t.seq_len < 2 || t.step_chunk_rows == 0 {
                bail!("--steps, --batch and --step-chunk-rows must be ≥ 1 and --seq-len ≥ 2");
            }
            if t.grad_accum == 0 {
                bail!("--grad-accum must be ≥ 1 (1 = one batch per step)");
            }
            if !(t.clip_grad.is_finite() && t.clip_grad >= 0.0) {
                bail!(
                    "--clip-grad must be a number ≥ 0 (0 = no clipping; got {})",
                    t.clip_grad
                );
            }
            if !["f32", "bf16"].contains(&t.moments.as_str()) {
                bail!("--moments must be f32 or bf16 (got {:?})", t.moments);
            }
            if t.device == "cuda" && t.quant == "nvfp4-full" && t.grad_accum > 1 {
                bail!(
                    "--grad-accum with --quant nvfp4-full does not train on the GPU yet (each layer is updated during backward): use --grad-accum 1 with a larger --batch, or --device cpu"
                );
            }
            if t.device == "cuda" && common.gpus == 0 {
                bail!("--device cuda trains on the GPU the job is placed on: submit with --gpus 1 (not --gpus 0)");
            }
            Spec::Train(v1::TrainSpec {
                model: t.model.clone(),
                dataset: t.dataset.clone(),
                steps: t.steps,
                seq_len: t.seq_len,
                batch: t.batch,
                lr: t.lr,
                quant: t.quant.clone(),
                step_chunk_rows: t.step_chunk_rows,
                seed: t.seed,
                out_dir: t.out.clone(),
                resume: t.resume,
                device: t.device.clone(),
                save_every: t.save_every,
                grad_accum: t.grad_accum,
                clip_grad: Some(t.clip_grad),
                moments: t.moments.clone(),
                save_only_model: t.save_only_model,
                recompute: t.recompute,
            })
        }
        SubmitKind::Export(e) => {
            if !["safetensors", "nvfp4-modelopt", "nvfp4-compressed-tensors"]
                .contains(&e.format.as_str())
            {
                bail!(
                    "--format must be safetensors, nvfp4-modelopt or nvfp4-compressed-tensors (got {:?})",
                    e.format
                );
            }
            Spec::Export(v1::ExportSpec {
                checkpoint: e.checkpoint.clone(),
                format: e.format.clone(),
                out_dir: e.out.clone(),
            })
        }
        SubmitKind::Exec(x) => {
            let mut env = std::collections::HashMap::new();
            for kv in &x.env {
                let Some((k, v)) = kv.split_once('=') else {
                    bail!("--env {kv:?}: write NAME=VALUE");
                };
                env.insert(k.to_string(), v.to_string());
            }
            if !(x.grace_secs.is_finite() && (0.0..=3600.0).contains(&x.grace_secs)) {
                bail!(
                    "--grace-secs must be between 0 and 3600 (got {})",
                    x.grace_secs
                );
            }
            Spec::Exec(v1::ExecSpec {
                argv: x.command.clone(),
                env,
                workdir: x.workdir.clone().unwrap_or_default(),
                grace_secs: x.grace_secs,
            })
        }
    };
    let budget = common.budget_gb.unwrap_or_else(|| default_budget_gb(kind));
    let req = v1::SubmitJobRequest {
        spec: Some(v1::JobSpec { spec: Some(spec) }),
        resources: Some(resources(common, budget)?),
        priority: common.priority,
        name: common.name.clone(),
    };
    // The coordinator's own checks, before anything is sent.
    if let Some(spec) = &req.spec {
        kiln_proto::validate::check_spec(spec).map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
    }
    if let Some(r) = &req.resources {
        kiln_proto::validate::check_resources(r)
            .map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
    }
    let after = AfterSubmit {
        follow: common.follow,
        verbose: common.verbose,
    };
    Ok((req, after))
}

/// `kiln submit`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let (req, after) = build_request(&args.kind)?;
    let mut client = connect(&args.client).await?;
    let job = client
        .submit_job(req)
        .await
        .map_err(status_error)?
        .into_inner()
        .job
        .ok_or_else(|| {
            anyhow::anyhow!("the coordinator accepted the job but returned no record")
        })?;
    if after.follow {
        if args.client.output == OutputFormat::Table {
            eprintln!(
                "submitted job {} ({})",
                job.id,
                crate::output::job_state(&job)
            );
        }
        return watch::follow(&mut client, job.id, args.client.output, after.verbose).await;
    }
    match args.client.output {
        OutputFormat::Table => println!(
            "submitted job {} ({})",
            job.id,
            crate::output::job_state(&job)
        ),
        _ => print_json(&job_json(&job)),
    }
    Ok(ExitCode::SUCCESS)
}
