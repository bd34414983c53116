//! One validation of every job spec and resource field, shared by the coordinator (SubmitJob
//! answers INVALID_ARGUMENT with the message), the CLI (before sending) and the agent (before
//! starting a job process, in depth). Each error names the field, the value and what is allowed.
//! Non-finite numbers are refused everywhere; paths may not climb out with `..`.

use crate::v1::{job_spec::Spec, ExecSpec, GenerateSpec, JobResources, JobSpec, TrainSpec};

/// Shortest guard poll interval, seconds (0 = the coordinator's default).
pub const MIN_POLL_SECS: f64 = 0.05;
/// Longest guard poll interval, seconds.
pub const MAX_POLL_SECS: f64 = 60.0;
pub use kiln_job::spec::{MAX_MEMTEST_BYTES, MAX_MEMTEST_STEPS, MAX_SECS};
/// Most new tokens of a generate job.
pub const MAX_NEW_TOKENS: u32 = 1 << 20;
/// Longest path or model name, bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Most attempts of a job.
pub const MAX_ATTEMPTS: u32 = 100;
/// Largest learning rate.
pub const MAX_LR: f64 = 10.0;
/// Largest gradient clipping threshold a train job may ask for.
pub const MAX_CLIP_GRAD: f64 = 1e6;

type Check = Result<(), String>;

fn range_f64(field: &str, v: f64, lo: f64, hi: f64) -> Check {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(())
    } else {
        // 1e308 reads better than its 309 digits.
        let shown = if v.is_finite() && v.abs() >= 1e9 {
            format!("{v:e}")
        } else {
            format!("{v}")
        };
        Err(format!(
            "{field} = {shown} is out of range: allowed {lo}..={hi}"
        ))
    }
}

fn range_u64(field: &str, v: u64, lo: u64, hi: u64) -> Check {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "{field} = {v} is out of range: allowed {lo}..={hi}"
        ))
    }
}

fn one_of(field: &str, v: &str, allowed: &[&str]) -> Check {
    if allowed.contains(&v) {
        Ok(())
    } else {
        Err(format!("{field} = {v:?} is not one of {allowed:?}"))
    }
}

/// A path (or model name) on the agent's host: non-empty, bounded, no NUL, no `..` component.
fn path(field: &str, v: &str) -> Check {
    if v.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if v.len() > MAX_PATH_LEN || v.contains('\0') {
        return Err(format!(
            "{field} is not a usable path (longer than {MAX_PATH_LEN} bytes or holds NUL)"
        ));
    }
    if std::path::Path::new(v)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "{field} = {v:?} climbs out with `..`: give the path without it"
        ));
    }
    Ok(())
}

/// Checks a job's resources (the coordinator fills a 0 poll_secs / max_attempts with defaults).
pub fn check_resources(r: &JobResources) -> Check {
    if r.budget_bytes == 0 {
        return Err("resources.budget_bytes must be > 0 (the guard needs a budget)".into());
    }
    range_u64("resources.gpus", r.gpus.into(), 0, 64)?;
    range_f64("resources.over_secs", r.over_secs, 0.0, MAX_SECS)?;
    if r.poll_secs != 0.0 {
        range_f64(
            "resources.poll_secs",
            r.poll_secs,
            MIN_POLL_SECS,
            MAX_POLL_SECS,
        )?;
    }
    range_u64(
        "resources.max_attempts",
        r.max_attempts.into(),
        0,
        MAX_ATTEMPTS.into(),
    )?;
    if r.on_kill_grow != 0.0 {
        range_f64("resources.on_kill_grow", r.on_kill_grow, 1.000_001, 16.0)
            .map_err(|e| format!("{e} (0 = a guard kill is final)"))?;
    }
    if r.max_budget_bytes != 0 && r.max_budget_bytes < r.budget_bytes {
        return Err(
            "resources.max_budget_bytes must be at least budget_bytes (or 0 for no cap)".into(),
        );
    }
    Ok(())
}

/// Checks a job spec: exactly one kind, every field within its range.
pub fn check_spec(spec: &JobSpec) -> Check {
    match &spec.spec {
        None => {
            Err("spec is empty: set exactly one of memtest, generate, train, export, exec".into())
        }
        Some(Spec::Memtest(m)) => {
            range_u64("memtest.bytes", m.bytes, 1, MAX_MEMTEST_BYTES)?;
            range_u64("memtest.steps", m.steps.into(), 1, MAX_MEMTEST_STEPS.into())?;
            range_f64("memtest.hold_secs", m.hold_secs, 0.0, MAX_SECS)?;
            range_f64("memtest.step_pause_secs", m.step_pause_secs, 0.0, MAX_SECS)
        }
        Some(Spec::Generate(g)) => check_generate(g),
        Some(Spec::Train(t)) => check_train(t),
        Some(Spec::Export(e)) => {
            path("export.checkpoint", &e.checkpoint)?;
            path("export.out_dir", &e.out_dir)?;
            one_of(
                "export.format",
                &e.format,
                &["safetensors", "nvfp4-modelopt", "nvfp4-compressed-tensors"],
            )
        }
        Some(Spec::Exec(e)) => check_exec(e),
    }
}

fn check_generate(g: &GenerateSpec) -> Check {
    path("generate.model", &g.model)?;
    if g.prompt.is_empty() && g.messages.is_empty() {
        return Err("generate needs a prompt or messages".into());
    }
    for (i, m) in g.messages.iter().enumerate() {
        one_of(
            &format!("generate.messages[{i}].role"),
            &m.role,
            &["system", "user", "assistant"],
        )?;
    }
    range_u64(
        "generate.max_tokens",
        g.max_tokens.into(),
        1,
        MAX_NEW_TOKENS.into(),
    )?;
    if let Some(s) = &g.sampling {
        range_f64(
            "generate.sampling.temperature",
            s.temperature.into(),
            0.0,
            100.0,
        )?;
        range_f64("generate.sampling.top_p", s.top_p.into(), 0.0, 1.0)?;
        range_u64("generate.sampling.top_k", s.top_k.into(), 0, 1 << 20)?;
    }
    one_of("generate.kv", &g.kv, &["", "cache", "replay", "ab"])?;
    one_of("generate.device", &g.device, &["", "cpu", "cuda"])?;
    if !g.session_id.is_empty() {
        kiln_job::sessions::check_session_id(&g.session_id)
            .map_err(|e| format!("generate.session_id: {e}"))?;
    }
    Ok(())
}

fn check_train(t: &TrainSpec) -> Check {
    path("train.model", &t.model)?;
    path("train.dataset", &t.dataset)?;
    path("train.out_dir", &t.out_dir)?;
    range_u64("train.steps", t.steps.into(), 1, 10_000_000)?;
    range_u64("train.seq_len", t.seq_len.into(), 1, 1 << 20)?;
    range_u64("train.batch", t.batch.into(), 1, 1 << 16)?;
    if !(t.lr.is_finite() && t.lr >= 0.0 && t.lr <= MAX_LR) {
        return Err(format!(
            "train.lr = {} is out of range: allowed 0 to {MAX_LR}",
            t.lr
        ));
    }
    one_of(
        "train.quant",
        &t.quant,
        &["", "nvfp4-ste", "nvfp4-full", "none"],
    )?;
    range_u64(
        "train.step_chunk_rows",
        t.step_chunk_rows.into(),
        0,
        1 << 20,
    )?;
    one_of("train.device", &t.device, &["", "cpu", "cuda"])?;
    range_u64("train.save_every", t.save_every.into(), 0, 10_000_000)?;
    range_u64("train.grad_accum", t.grad_accum.into(), 0, 4096)?;
    if let Some(c) = t.clip_grad {
        if !(c.is_finite() && (0.0..=MAX_CLIP_GRAD).contains(&c)) {
            return Err(format!(
                "train.clip_grad = {c} is out of range: allowed 0 (no clipping) to {MAX_CLIP_GRAD}"
            ));
        }
    }
    one_of("train.moments", &t.moments, &["", "f32", "bf16"])
}

fn check_exec(e: &ExecSpec) -> Check {
    match e.argv.first() {
        None => return Err("exec.argv is empty: give the command to run".into()),
        Some(p) if p.is_empty() => {
            return Err("exec.argv[0] is empty: give the command to run".into())
        }
        _ => {}
    }
    if e.argv.iter().any(|a| a.contains('\0')) {
        return Err("exec.argv holds a NUL byte".into());
    }
    for (k, v) in &e.env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok || v.contains('\0') {
            return Err(format!(
                "exec.env: {k:?} is not a valid variable (names are letters, digits and '_', not starting with a digit)"
            ));
        }
    }
    if !e.workdir.is_empty() && !std::path::Path::new(&e.workdir).is_absolute() {
        return Err(format!(
            "exec.workdir {:?} must be an absolute path on the agent's host",
            e.workdir
        ));
    }
    range_f64("exec.grace_secs", e.grace_secs, 0.0, 3600.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ExportSpec, MemtestSpec, Sampling};
    use proptest::prelude::*;

    fn memtest(bytes: u64, steps: u32, hold: f64) -> JobSpec {
        JobSpec {
            spec: Some(Spec::Memtest(MemtestSpec {
                bytes,
                steps,
                hold_secs: hold,
                step_pause_secs: 0.0,
            })),
        }
    }

    /// A valid train spec changed by `f`.
    fn train(f: impl FnOnce(&mut TrainSpec)) -> JobSpec {
        let mut t = TrainSpec {
            model: "tiny".into(),
            dataset: "whoami".into(),
            out_dir: "/tmp/x".into(),
            steps: 1,
            seq_len: 8,
            batch: 1,
            lr: 1e-3,
            ..Default::default()
        };
        f(&mut t);
        JobSpec {
            spec: Some(Spec::Train(t)),
        }
    }

    #[test]
    fn a_zero_learning_rate_and_the_step_options_pass() {
        for spec in [
            train(|t| t.lr = 0.0),
            train(|t| {
                t.save_every = 10;
                t.grad_accum = 4;
                t.clip_grad = Some(0.0);
                t.moments = "bf16".into();
            }),
        ] {
            assert_eq!(check_spec(&spec), Ok(()), "{spec:?}");
        }
    }

    #[test]
    fn hostile_values_are_named() {
        let cases: Vec<(JobSpec, &str)> = vec![
            (memtest(1, 1, 1e308), "memtest.hold_secs"),
            (memtest(1, 1, f64::NAN), "memtest.hold_secs"),
            (memtest(1, u32::MAX, 0.0), "memtest.steps"),
            (memtest(u64::MAX, 1, 0.0), "memtest.bytes"),
            (memtest(1, 0, 0.0), "memtest.steps"),
            (
                JobSpec {
                    spec: Some(Spec::Generate(GenerateSpec {
                        model: "../../../../etc".into(),
                        prompt: "hi".into(),
                        max_tokens: 4,
                        ..Default::default()
                    })),
                },
                "climbs out",
            ),
            (
                JobSpec {
                    spec: Some(Spec::Generate(GenerateSpec {
                        model: "tiny".into(),
                        prompt: "hi".into(),
                        max_tokens: 4,
                        sampling: Some(Sampling {
                            top_p: 7.0,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                },
                "generate.sampling.top_p",
            ),
            (train(|t| t.lr = f64::NAN), "train.lr"),
            (train(|t| t.lr = -1e-3), "train.lr"),
            (train(|t| t.clip_grad = Some(-1.0)), "train.clip_grad"),
            (
                train(|t| t.clip_grad = Some(f64::INFINITY)),
                "train.clip_grad",
            ),
            (train(|t| t.moments = "fp8".into()), "train.moments"),
            (train(|t| t.grad_accum = 5000), "train.grad_accum"),
            (
                JobSpec {
                    spec: Some(Spec::Export(ExportSpec {
                        checkpoint: "/c".into(),
                        out_dir: "/o".into(),
                        format: "gguf".into(),
                    })),
                },
                "export.format",
            ),
        ];
        for (spec, field) in cases {
            let err = check_spec(&spec).unwrap_err();
            assert!(err.contains(field), "{err} should name {field}");
        }
        assert!(check_spec(&memtest(1 << 20, 4, 1.0)).is_ok());
        let r = JobResources {
            budget_bytes: 1,
            poll_secs: 1e-9,
            ..Default::default()
        };
        assert!(check_resources(&r)
            .unwrap_err()
            .contains("resources.poll_secs"));
        let r = JobResources {
            budget_bytes: 1,
            over_secs: f64::INFINITY,
            ..Default::default()
        };
        assert!(check_resources(&r)
            .unwrap_err()
            .contains("resources.over_secs"));
    }

    proptest! {
        /// Any memtest values: a clear answer, never a panic, and accepted values are in range.
        #[test]
        fn memtest_values_never_panic(bytes in any::<u64>(), steps in any::<u32>(), hold in any::<f64>()) {
            let ok = check_spec(&memtest(bytes, steps, hold)).is_ok();
            prop_assert_eq!(ok, (1..=MAX_MEMTEST_BYTES).contains(&bytes)
                && (1..=MAX_MEMTEST_STEPS).contains(&steps)
                && hold.is_finite() && (0.0..=MAX_SECS).contains(&hold));
        }

        #[test]
        fn resources_never_panic(budget in any::<u64>(), poll in any::<f64>(), over in any::<f64>(), grow in any::<f64>()) {
            let r = JobResources { budget_bytes: budget, poll_secs: poll, over_secs: over, on_kill_grow: grow, ..Default::default() };
            let _ = check_resources(&r);
        }
    }
}
