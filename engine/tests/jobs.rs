//! The generate, train and export jobs through the job-process entry (`exec::run_request`):
//! phases, streamed tokens, results, sessions kept in the request's session directory, and
//! clear errors for broken checkpoints, unknown architectures, over-long prompts and bad
//! datasets.

mod common;

use std::path::{Path, PathBuf};

use kiln_engine::chat::ChatMessage;
use kiln_engine::exec::run_request;
use kiln_engine::model::{DenseDtype, SaveFormat, SaveOptions};
use kiln_engine::report::{JobOutput, Report, Reporter};
use kiln_engine::spec::{
    DeviceSpec, ExportFormat, ExportSpec, GenerateSpec, JobRequest, JobSpec, KvSpec, QuantSpec,
    TrainSpec,
};
use safetensors::tensor::TensorView;

fn request(work: &Path, spec: JobSpec) -> JobRequest {
    JobRequest {
        job_id: 1,
        attempt: 1,
        device: DeviceSpec::Cpu,
        budget_bytes: 1 << 30,
        work_dir: work.join("job-1"),
        sessions_dir: Some(work.join("sessions")),
        sessions_budget_bytes: 0,
        spec,
    }
}

fn gen_spec(model: &str, user: &str) -> GenerateSpec {
    GenerateSpec {
        model: model.into(),
        messages: vec![ChatMessage::user(user)],
        max_tokens: 12,
        ..Default::default()
    }
}

fn run(req: &JobRequest) -> (Result<JobOutput, String>, Vec<Report>) {
    let (reporter, reports) = Reporter::capture();
    let out = run_request(req, &reporter).map_err(|e| e.to_string());
    let r = reports.lock().unwrap().clone();
    (out, r)
}

#[test]
fn generate_job_streams_tokens_and_reports_phases() {
    let dir = tempfile::tempdir().unwrap();
    let (out, reports) = run(&request(
        dir.path(),
        JobSpec::Generate(gen_spec("tiny", "Who are you?")),
    ));
    let JobOutput::Generate {
        text,
        token_ids,
        prefill_ms,
        session_seq_len,
        ..
    } = out.unwrap()
    else {
        panic!("generate output expected")
    };
    assert_eq!(
        common::phase_names(&reports),
        ["model_loaded", "prefill_done", "decode_done"]
    );
    let Some(Report::Phase(loaded)) = reports.first() else {
        panic!()
    };
    assert!(loaded.tensor_bytes["weights"] > 0 && loaded.tensor_bytes["scales"] > 0);
    let streamed: Vec<u32> = reports
        .iter()
        .filter_map(|r| match r {
            Report::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, token_ids);
    assert_eq!(token_ids.len(), 12);
    assert!(prefill_ms > 0.0 && !text.is_empty());
    assert_eq!(session_seq_len, 0);
}

#[test]
fn ab_mode_reports_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = gen_spec("tiny", "Hello");
    s.kv = KvSpec::Ab;
    let (out, _) = run(&request(dir.path(), JobSpec::Generate(s)));
    let JobOutput::Generate {
        ab_tokens_agree,
        ab_max_logit_diff,
        token_ids,
        ..
    } = out.unwrap()
    else {
        panic!()
    };
    assert!(ab_tokens_agree);
    assert!(ab_max_logit_diff < 1e-3, "{ab_max_logit_diff}");
    assert_eq!(token_ids.len(), 12);
}

#[test]
fn session_turns_continue_in_the_session_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut lens = Vec::new();
    for user in ["Who are you?", "And what do you do?"] {
        let mut s = gen_spec("tiny", user);
        s.session_id = "chat-1".into();
        let (out, _) = run(&request(dir.path(), JobSpec::Generate(s)));
        let JobOutput::Generate {
            session_seq_len, ..
        } = out.unwrap()
        else {
            panic!()
        };
        lens.push(session_seq_len);
    }
    assert!(lens[0] > 0 && lens[1] > lens[0], "{lens:?}");
    assert!(dir
        .path()
        .join("sessions/chat-1.session.safetensors")
        .is_file());
    // Without sessions_dir, the store is `sessions` next to the work directory.
    let mut req = request(dir.path(), JobSpec::Generate(gen_spec("tiny", "x")));
    req.sessions_dir = None;
    assert_eq!(req.sessions_dir(), dir.path().join("sessions"));
}

/// The tiny model saved as a dense f32 directory.
fn tiny_dir(root: &Path) -> PathBuf {
    let d = root.join("tiny-f32");
    let m = kiln_engine::tiny::model(
        kiln_engine::model::LinearFormat::Dense,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    common::save(
        &m,
        &d,
        &SaveOptions {
            format: SaveFormat::Dense,
            dense_dtype: DenseDtype::F32,
            max_shard_bytes: None,
        },
    );
    d
}

/// Rewrite `dir`'s model.safetensors through `edit` (name, shape, bytes) → kept tensors.
fn rewrite(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, TensorView<'_>)> = ts
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &p).unwrap();
}

fn generate_error(root: &Path, model: &Path) -> String {
    let (out, _) = run(&request(
        root,
        JobSpec::Generate(gen_spec(model.to_str().unwrap(), "hi")),
    ));
    out.unwrap_err()
}

#[test]
fn broken_checkpoints_fail_with_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let good = tiny_dir(root.path());
    let copy = |name: &str| -> PathBuf {
        let d = root.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    // The intact copy works.
    assert!(run(&request(
        root.path(),
        JobSpec::Generate(gen_spec(good.to_str().unwrap(), "hi"))
    ))
    .0
    .is_ok());

    let d = copy("truncated");
    let st = d.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    std::fs::write(&st, &full[..full.len() / 2]).unwrap();
    let e = generate_error(root.path(), &d);
    assert!(
        e.starts_with("generate: ")
            && e.contains("not a valid safetensors file")
            && e.contains("model.safetensors"),
        "{e}"
    );

    let d = copy("corrupt");
    std::fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk",
    )
    .unwrap();
    let e = generate_error(root.path(), &d);
    assert!(e.contains("not a valid safetensors file"), "{e}");

    let d = copy("missing");
    rewrite(&d, |ts| {
        ts.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    let e = generate_error(root.path(), &d);
    assert!(
        e.contains("tensor model.layers.1.mlp.up_proj.weight is missing"),
        "{e}"
    );

    let d = copy("shape");
    rewrite(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|(n, _, _)| n == "model.layers.0.self_attn.o_proj.weight")
            .unwrap();
        t.1 = vec![64, 256];
    });
    let e = generate_error(root.path(), &d);
    assert!(
        e.contains("model.layers.0.self_attn.o_proj.weight")
            && e.contains("[64, 256]")
            && e.contains("[128, 128]"),
        "{e}"
    );
    // Export fails fast on the same input, naming the tensor and both shapes.
    let (out, _) = run(&request(
        root.path(),
        JobSpec::Export(ExportSpec {
            checkpoint: d.display().to_string(),
            format: ExportFormat::Nvfp4ModelOpt,
            out_dir: root.path().join("never").display().to_string(),
        }),
    ));
    let e = out.unwrap_err();
    assert!(
        e.starts_with("export: ") && e.contains("[64, 256]") && e.contains("[128, 128]"),
        "{e}"
    );
    assert!(!root.path().join("never/model.safetensors").exists());

    let d = copy("arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("Qwen2ForCausalLM", "MambaForCausalLM"),
    )
    .unwrap();
    let e = generate_error(root.path(), &d);
    assert!(
        e.contains("unknown architecture \"MambaForCausalLM\"") && e.contains("LlamaForCausalLM"),
        "{e}"
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let long = "word ".repeat(3000);
    let (out, _) = run(&request(
        root.path(),
        JobSpec::Generate(gen_spec("tiny", &long)),
    ));
    let e = out.unwrap_err();
    assert!(e.contains("the model's context holds 512"), "{e}");
}

fn train_spec(out: &Path, dataset: &str) -> TrainSpec {
    TrainSpec {
        model: "tiny".into(),
        dataset: dataset.into(),
        steps: 2,
        seq_len: 64,
        batch: 2,
        lr: 1e-3,
        quant: QuantSpec::Nvfp4Full,
        step_chunk_rows: 16,
        seed: 3,
        out_dir: out.display().to_string(),
        resume: false,
        device: String::new(),
        ..Default::default()
    }
}

#[test]
fn bad_datasets_fail_naming_the_file_and_line() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("ckpt");
    let missing = root.path().join("nope.jsonl");
    let (r, _) = run(&request(
        root.path(),
        JobSpec::Train(train_spec(&out, missing.to_str().unwrap())),
    ));
    let e = r.unwrap_err();
    assert!(
        e.starts_with("train: ") && e.contains("nope.jsonl") && e.contains("cannot read"),
        "{e}"
    );
    let bad = root.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n{\"messages\": 5}\n").unwrap();
    let (r, _) = run(&request(
        root.path(),
        JobSpec::Train(train_spec(&out, bad.to_str().unwrap())),
    ));
    let e = r.unwrap_err();
    assert!(e.contains("bad.jsonl line 2"), "{e}");
}

#[test]
fn full_nvfp4_training_runs_as_a_job_and_its_checkpoint_generates() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("ckpt");
    let (r, reports) = run(&request(
        root.path(),
        JobSpec::Train(train_spec(&out, "whoami")),
    ));
    let JobOutput::Train {
        loss, checkpoint, ..
    } = r.unwrap()
    else {
        panic!()
    };
    assert_eq!(loss.len(), 2);
    let opt = reports
        .iter()
        .find_map(|r| match r {
            Report::Phase(p) if p.phase == "optimizer_done" => Some(p.clone()),
            _ => None,
        })
        .unwrap();
    // Packed weights: scales are reported; the optimizer's scratch is one chunk of 16 rows.
    assert!(opt.tensor_bytes["scales"] > 0);
    assert!(opt.tensor_bytes["activations"] <= 16 * 384 * 4);
    // The checkpoint is an NVFP4 model directory a generate job can use.
    assert!(Path::new(&checkpoint)
        .join("hf_quant_config.json")
        .is_file());
    assert!(run(&request(
        root.path(),
        JobSpec::Generate(gen_spec(&checkpoint, "hi"))
    ))
    .0
    .is_ok());
}

#[test]
fn a_generate_job_never_falls_back_to_the_cpu_silently() {
    let root = tempfile::tempdir().unwrap();
    // asked for CUDA, placed on the CPU
    let mut spec = gen_spec("tiny", "Hi");
    spec.device = "cuda".into();
    let (out, _) = run(&request(root.path(), JobSpec::Generate(spec)));
    let e = out.unwrap_err();
    assert!(e.contains("--gpus 1") && e.contains("--device cpu"), "{e}");
    // placed on a GPU: it runs there, or (where CUDA cannot be used, as on a machine without
    // a GPU) fails naming why — never a CPU run
    let mut req = request(root.path(), JobSpec::Generate(gen_spec("tiny", "Hi")));
    req.device = DeviceSpec::Cuda(0);
    let (out, reports) = run(&req);
    match out {
        Ok(_) => assert!(
            reports.iter().any(
                |r| matches!(r, Report::Log { line } if line.contains("generating on cuda:0"))
            ),
            "a GPU job must say it ran on the GPU"
        ),
        Err(e) => assert!(e.contains("cannot use CUDA device 0"), "{e}"),
    }
}

#[test]
fn a_train_job_asking_for_cuda_trains_on_its_gpu_or_fails_naming_why() {
    let root = tempfile::tempdir().unwrap();
    let out_dir = root.path().join("ckpt");
    let mut spec = train_spec(&out_dir, "whoami");
    spec.quant = QuantSpec::Nvfp4Ste;
    spec.device = "cuda".into();
    // placed on the CPU: refused, with the way out
    let (out, _) = run(&request(root.path(), JobSpec::Train(spec.clone())));
    let e = out.unwrap_err();
    assert!(e.contains("--gpus 1") && e.contains("--device cpu"), "{e}");
    // placed on a GPU: trains there (saying so), or fails naming why CUDA cannot be used
    let mut req = request(root.path(), JobSpec::Train(spec.clone()));
    req.device = DeviceSpec::Cuda(0);
    let (out, reports) = run(&req);
    match out {
        Ok(_) => assert!(
            reports
                .iter()
                .any(|r| matches!(r, Report::Log { line } if line.contains("training on cuda:0"))),
            "a GPU train job must say it ran on the GPU"
        ),
        Err(e) => assert!(e.contains("cannot use CUDA device 0"), "{e}"),
    }
    // nvfp4-full does not train on the GPU yet: a clear error where CUDA is usable
    spec.quant = QuantSpec::Nvfp4Full;
    let mut req = request(root.path(), JobSpec::Train(spec));
    req.device = DeviceSpec::Cuda(0);
    let e = run(&req).0.unwrap_err();
    assert!(
        e.contains("nvfp4-full") || e.contains("cannot use CUDA device 0"),
        "{e}"
    );
}
