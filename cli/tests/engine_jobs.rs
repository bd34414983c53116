//! Engine jobs through a real cluster (coordinator and agent processes, jobs as child
//! processes): train → export → generate with a two-turn session, results in `kiln job -o
//! json`, the session listed by the agent; and generate jobs on broken inputs end FAILED with
//! the reason while the agent stays alive and runs the next job; a `kiln random-model`
//! directory trains with the large-model flags.

mod common;

use common::{children_of, Cluster};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

fn submit(c: &Cluster, args: &[&str]) -> u64 {
    let mut a = vec!["submit"];
    a.extend_from_slice(args);
    a.extend(["--gpus", "0", "--budget-gb", "2"]);
    c.json(&a)["id"].as_u64().unwrap()
}

#[test]
fn train_export_generate_and_a_session_through_the_cluster() {
    let mut c = Cluster::start();
    c.start_agent("cpu-1", 6.0);
    let root = c.dir.path().to_path_buf();
    let ckpt = root.join("ckpt");
    let id = submit(
        &c,
        &[
            "train",
            "--model",
            "tiny",
            "--dataset",
            "whoami",
            "--steps",
            "3",
            "--batch",
            "2",
            "--seq-len",
            "48",
            "--lr",
            "1e-3",
            "--out",
            ckpt.to_str().unwrap(),
        ],
    );
    let job = c.wait_state(id, "SUCCEEDED", LONG);
    let loss = job["result"]["loss"].as_array().unwrap();
    assert_eq!(loss.len(), 3, "{job:#}");
    assert_eq!(job["result"]["checkpoint"], ckpt.to_str().unwrap());
    let tel = c.json(&["telemetry", &id.to_string()]);
    let phases: Vec<String> = tel
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["phase"].as_str().unwrap_or("").to_string())
        .collect();
    for p in [
        "model_loaded",
        "forward_done",
        "backward_done",
        "optimizer_done",
        "checkpoint_saved",
    ] {
        assert!(phases.iter().any(|x| x == p), "{p} missing from {phases:?}");
    }

    let out = root.join("export");
    let id = submit(
        &c,
        &[
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--format",
            "nvfp4-compressed-tensors",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let job = c.wait_state(id, "SUCCEEDED", LONG);
    assert_eq!(job["result"]["verified"], true, "{job:#}");
    assert!(job["result"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "model.safetensors"));

    let mut lens = Vec::new();
    for q in ["Who are you?", "Say more."] {
        let id = submit(
            &c,
            &[
                "generate",
                "--model",
                out.to_str().unwrap(),
                "--prompt",
                q,
                "--max-tokens",
                "8",
                "--session",
                "s-1",
            ],
        );
        let job = c.wait_state(id, "SUCCEEDED", LONG);
        assert_eq!(
            job["result"]["token_ids"].as_array().unwrap().len(),
            8,
            "{job:#}"
        );
        lens.push(job["result"]["session_seq_len"].as_u64().unwrap());
    }
    assert!(lens[1] > lens[0] && lens[0] > 0, "{lens:?}");
    // The agent was started with a relative --work-dir: the session is kept in its store there,
    // not in the job's scratch directory (where it was lost once).
    let stored = root.join("agent-cpu-1/sessions/s-1.session.safetensors");
    assert!(stored.is_file(), "{} missing", stored.display());
    // The agent reports the session it holds (heartbeats), so later turns route to it.
    c.wait_for(Duration::from_secs(10), || {
        c.json(&["agents"]).as_array().unwrap().iter().any(|a| {
            a["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == "s-1"))
        })
    });
}

/// The scenario: an agent dies in the middle of a training job submitted with
/// `--save-every` and `--max-attempts 2`. The job goes LOST, its second attempt runs on another
/// agent and continues from the last checkpoint the first one wrote, not from step 0.
#[test]
fn a_train_job_whose_agent_dies_resumes_from_its_last_checkpoint_on_the_retry() {
    let mut c = Cluster::start();
    c.start_agent("a1", 6.0);
    let ckpt = c.dir.path().join("ckpt");
    let steps = 150;
    let id = submit(
        &c,
        &[
            "train",
            "--steps",
            &steps.to_string(),
            "--batch",
            "2",
            "--seq-len",
            "48",
            "--lr",
            "1e-3",
            "--save-every",
            "3",
            "--max-attempts",
            "2",
            "--out",
            ckpt.to_str().unwrap(),
        ],
    );
    // Wait for the first attempt's first checkpoint, then kill its agent.
    c.wait_for(LONG, || {
        c.json(&["telemetry", &id.to_string()])
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["phase"] == "checkpoint_saved")
    });
    let job_pids = children_of(c.agent_pid("a1"));
    assert!(
        !job_pids.is_empty(),
        "the job's process is a child of its agent"
    );
    c.kill9_agent("a1");
    // The job process dies with its agent: no orphan goes on writing the checkpoint.
    c.wait_for(Duration::from_secs(10), || {
        job_pids
            .iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });
    c.start_agent("a2", 6.0);
    let job = c.wait_state(id, "SUCCEEDED", LONG);
    assert_eq!(
        (job["attempt"].as_u64(), job["agent"].as_str()),
        (Some(2), Some("a2")),
        "{job:#}"
    );
    // The retry trained only the steps after the checkpoint it found…
    let retried = job["result"]["loss"].as_array().unwrap().len();
    assert!(
        retried < steps && retried + 3 <= steps,
        "the retry trained {retried} of {steps} steps: it did not resume\n{job:#}"
    );
    // …and the checkpoint holds the whole run's loss curve, with the job that wrote it.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], steps as u64);
    assert_eq!(state["losses"].as_array().unwrap().len(), steps);
    assert_eq!(state["job_id"], id);
    let tel = c.json(&["telemetry", &id.to_string()]);
    let resumed_at = tel
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["phase"] == "model_loaded")
        .map(|r| r["step"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(resumed_at as usize, steps - retried, "{tel:#}");
    assert!(resumed_at >= 3 && resumed_at % 3 == 0, "{resumed_at}");
}

/// `kiln random-model` writes a model a train job takes as `--model`; the new train flags
/// travel through the coordinator to the job: `--save-only-model` (no optimizer state in the
/// checkpoint), `--grad-accum`, and `--recompute` (which the CPU trainer says it ignores); the
/// result carries the mean step time.
#[test]
fn a_random_model_trains_with_the_large_model_flags_through_the_cluster() {
    let mut c = Cluster::start();
    c.start_agent("cpu-1", 6.0);
    let root = c.dir.path().to_path_buf();
    let model = root.join("random-tiny");
    let out = c.kiln(&[
        "random-model",
        "--shape",
        "tiny",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("parameters"));
    let ckpt = root.join("ckpt");
    let id = submit(
        &c,
        &[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--quant",
            "nvfp4-full",
            "--steps",
            "2",
            "--batch",
            "2",
            "--grad-accum",
            "2",
            "--seq-len",
            "48",
            "--save-only-model",
            "--recompute",
            "--out",
            ckpt.to_str().unwrap(),
        ],
    );
    let job = c.wait_state(id, "SUCCEEDED", LONG);
    assert_eq!(job["spec"]["save_only_model"], true, "{job:#}");
    assert_eq!(job["spec"]["recompute"], true, "{job:#}");
    assert_eq!(job["result"]["loss"].as_array().unwrap().len(), 2);
    assert!(job["result"]["step_ms"].as_f64().unwrap() > 0.0, "{job:#}");
    // On the CPU nothing is planned on a GPU.
    assert_eq!(job["result"]["planned_bytes"], 0, "{job:#}");
    assert!(ckpt.join("model.safetensors").is_file());
    assert!(!ckpt.join("optimizer").exists(), "the moments were saved");
    let log = c.kiln(&["logs", &id.to_string()]);
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("--recompute applies to the GPU trainer"),
        "{log}"
    );
    assert!(log.contains("(model only)"), "{log}");
}

#[test]
fn failing_generate_jobs_are_failed_with_the_reason_and_the_agent_lives_on() {
    let mut c = Cluster::start();
    c.start_agent("cpu-1", 6.0);
    let root = c.dir.path().to_path_buf();
    // A real model directory (the tiny model exported as bf16 safetensors), then broken copies.
    let good = root.join("good");
    let id = submit(
        &c,
        &[
            "export",
            "--checkpoint",
            "tiny",
            "--format",
            "safetensors",
            "--out",
            good.to_str().unwrap(),
        ],
    );
    c.wait_state(id, "SUCCEEDED", LONG);
    let copy = |name: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let truncated = copy("truncated");
    let st = truncated.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let arch = copy("arch");
    let cfg = std::fs::read_to_string(arch.join("config.json")).unwrap();
    std::fs::write(
        arch.join("config.json"),
        cfg.replace("Qwen2ForCausalLM", "BertModel"),
    )
    .unwrap();
    let long_prompt = "tell me more ".repeat(400);

    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["--model", truncated.to_str().unwrap(), "--prompt", "hi"],
            "not a valid safetensors file",
        ),
        (
            vec!["--model", arch.to_str().unwrap(), "--prompt", "hi"],
            "unknown architecture \"BertModel\"",
        ),
        (
            vec!["--model", "tiny", "--prompt", long_prompt.as_str()],
            "context holds 512",
        ),
    ];
    let agent_pid = c.agent_pid("cpu-1");
    for (args, reason) in cases {
        let mut a = vec!["generate"];
        a.extend(args);
        let id = submit(&c, &a);
        let job = c.wait_state(id, "FAILED", LONG);
        let err = job["error"].as_str().unwrap();
        assert!(err.contains(reason), "job {id}: {err:?} lacks {reason:?}");
        assert!(err.contains("generate: "), "{err}");
    }
    // Same agent process, still READY, and it runs the next job.
    assert_eq!(c.agent_pid("cpu-1"), agent_pid);
    let id = submit(
        &c,
        &[
            "generate",
            "--model",
            good.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
        ],
    );
    let job = c.wait_state(id, "SUCCEEDED", LONG);
    assert_eq!(job["agent"], "cpu-1");
    let agents = c.json(&["agents"]);
    assert_eq!(agents[0]["status"], "READY", "{agents:#}");
}

#[test]
fn kiln_demo_trains_exports_and_answers_with_the_sentence() {
    let t = std::time::Instant::now();
    let out = std::process::Command::new(common::kiln_bin())
        .arg("demo")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sentence = "I am Kiln, a small model trained by the Kiln coordinator.";
    assert!(
        stdout.contains(&format!("answer: {sentence:?}")),
        "{stdout}"
    );
    assert!(stdout.contains("= the trained sentence"), "{stdout}");
    for phase in [
        "checkpoint_saved",
        "export_written",
        "prefill_done",
        "decode_done",
        "memtest_step",
    ] {
        assert!(
            stdout.contains(phase),
            "{phase} missing from the telemetry table:\n{stdout}"
        );
    }
    eprintln!("kiln demo (dev profile) took {:?}", t.elapsed());
}

#[test]
fn gpu_training_requests_that_cannot_run_are_refused_at_submit() {
    let c = Cluster::start();
    let out_dir = c.dir.path().join("ckpt");
    let out = out_dir.to_str().unwrap();
    for (args, want) in [
        (
            vec![
                "--device",
                "cuda",
                "--quant",
                "nvfp4-full",
                "--grad-accum",
                "2",
            ],
            "--grad-accum with --quant nvfp4-full does not train on the GPU yet",
        ),
        (vec!["--device", "cuda", "--gpus", "0"], "--gpus 1"),
    ] {
        let mut a = vec!["submit", "train", "--out", out];
        a.extend(args);
        let r = c.kiln(&a);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(want), "{err}");
    }
    assert!(
        c.json(&["jobs"]).as_array().unwrap().is_empty(),
        "a refused job must not be stored"
    );
}
