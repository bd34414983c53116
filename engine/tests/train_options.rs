//! The train job's step options on the real CPU trainer (tiny model, WhoAmI): gradient
//! accumulation adds up to the whole batch's step, clipping can be turned off, `--save-every`
//! writes resumable checkpoints and a retry of the same coordinator job continues its earlier
//! attempt's checkpoint (another job's is refused), `--save-only-model` leaves the moments out,
//! and bf16 moments halve the optimizer state and train like f32 ones.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_engine::model::Checkpoint;
use kiln_engine::report::{PhaseReport, Report, Reporter};
use kiln_engine::spec::{DeviceSpec, MomentsSpec, QuantSpec, TrainSpec};
use kiln_engine::train::checkpoint::{read_state, OPTIMIZER_STATE};
use kiln_engine::train::{train, train_on, JobIdent};

use kiln_kernels::checkpoint::read_safetensors_file;
use safetensors::Dtype;

fn spec(out: &Path, steps: u32, quant: QuantSpec) -> TrainSpec {
    TrainSpec {
        model: "tiny".into(),
        dataset: "whoami".into(),
        steps,
        seq_len: 64,
        batch: 4,
        lr: 1e-2,
        quant,
        step_chunk_rows: 32,
        seed: 5,
        out_dir: out.display().to_string(),
        ..Default::default()
    }
}

/// Every tensor of a checkpoint as f32.
fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = Checkpoint::open(dir).unwrap();
    ck.names()
        .into_iter()
        .map(|n| {
            let t = ck.get(n).unwrap();
            let v = match t.dtype {
                Dtype::F32 => t
                    .data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                // Packed codes and scales: compared byte for byte.
                _ => t.data.iter().map(|&b| b as f32).collect(),
            };
            (n.to_string(), v)
        })
        .collect()
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0.0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "{na}");
        for (x, y) in va.iter().zip(vb) {
            m = m.max((x - y).abs());
        }
    }
    m
}

fn phases(sink: &Arc<Mutex<Vec<Report>>>, name: &str) -> Vec<PhaseReport> {
    sink.lock()
        .unwrap()
        .iter()
        .filter_map(|r| match r {
            Report::Phase(p) if p.phase == name => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn logs(sink: &Arc<Mutex<Vec<Report>>>) -> String {
    sink.lock()
        .unwrap()
        .iter()
        .filter_map(|r| match r {
            Report::Log { line } => Some(line.clone()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn two_accumulated_half_batches_make_the_same_step_as_one_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let halves = dir.path().join("halves");
    let a = train(
        &spec(&whole, 3, QuantSpec::Nvfp4Ste),
        &Reporter::capture().0,
    )
    .unwrap();
    let mut s = spec(&halves, 3, QuantSpec::Nvfp4Ste);
    s.batch = 2;
    s.grad_accum = 2;
    let (r, sink) = Reporter::capture();
    let b = train(&s, &r).unwrap();
    // Same samples per step; only the order of the sums differs.
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "{:?} vs {:?}",
            a.losses,
            b.losses
        );
    }
    let d = max_abs_diff(&weights(&whole), &weights(&halves));
    assert!(d < 1e-4, "weights differ by {d}");
    // Each micro-batch reports its forward and backward; the optimizer runs once per step.
    assert_eq!(phases(&sink, "forward_done").len(), 6);
    assert_eq!(phases(&sink, "backward_done").len(), 6);
    assert_eq!(phases(&sink, "optimizer_done").len(), 3);
    let fwd = phases(&sink, "forward_done");
    assert_eq!(fwd[1].metrics["micro_batch"], 1.0);
    assert!(
        fwd[1].tensor_bytes["grads"] > 0,
        "the first micro-batch's gradients are held"
    );
    assert_eq!(read_state(&halves).unwrap().unwrap().grad_accum, 2);
}

#[test]
fn clipping_is_on_by_default_and_clip_grad_zero_turns_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let clipped = dir.path().join("clipped");
    let tight = dir.path().join("tight");
    let free = dir.path().join("free");
    let (r, sink) = Reporter::capture();
    train(&spec(&clipped, 3, QuantSpec::None), &r).unwrap();
    let norms: Vec<f64> = phases(&sink, "optimizer_done")
        .iter()
        .map(|p| p.metrics["grad_norm"])
        .collect();
    assert!(
        norms[0] > 1.0,
        "the tiny model's first gradient norm ({norms:?}) should exceed the default clip of 1"
    );
    let mut s = spec(&tight, 3, QuantSpec::None);
    s.clip_grad = Some(1.0);
    train(&s, &Reporter::capture().0).unwrap();
    // The default is 1.0: the same run.
    assert_eq!(max_abs_diff(&weights(&clipped), &weights(&tight)), 0.0);
    let mut s = spec(&free, 3, QuantSpec::None);
    s.clip_grad = Some(0.0);
    let (r, sink) = Reporter::capture();
    train(&s, &r).unwrap();
    let free_norms: Vec<f64> = phases(&sink, "optimizer_done")
        .iter()
        .map(|p| p.metrics["grad_norm"])
        .collect();
    // The reported norm is the one before clipping: step 1 sees the same gradient.
    assert!((free_norms[0] - norms[0]).abs() < 1e-6 * norms[0]);
    assert!(
        max_abs_diff(&weights(&clipped), &weights(&free)) > 0.0,
        "clipping changed nothing"
    );
}

#[test]
fn save_every_checkpoints_and_a_retry_of_the_same_job_continues_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let retried = dir.path().join("retried");
    let job = |attempt| {
        Some(JobIdent {
            id: 7,
            attempt,
            budget_bytes: 0,
        })
    };

    // An uninterrupted 4-step run that checkpoints every 2 steps.
    let mut s = spec(&straight, 4, QuantSpec::Nvfp4Full);
    s.save_every = 2;
    let (r, sink) = Reporter::capture();
    let full = train_on(&s, DeviceSpec::Cpu, job(1), &r).unwrap();
    let saved: Vec<u32> = phases(&sink, "checkpoint_saved")
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(saved, [2, 4]);
    assert_eq!(read_state(&straight).unwrap().unwrap().job_id, Some(7));

    // Attempt 1 gets through step 2 and its checkpoint, then dies (here: stops).
    let mut s = spec(&retried, 2, QuantSpec::Nvfp4Full);
    s.save_every = 2;
    train_on(&s, DeviceSpec::Cpu, job(1), &Reporter::capture().0).unwrap();
    // Attempt 2 of the same job, without --resume, continues from step 2.
    s.steps = 4;
    let (r, sink) = Reporter::capture();
    let rest = train_on(&s, DeviceSpec::Cpu, job(2), &r).unwrap();
    assert_eq!((rest.step, rest.losses.len()), (4, 2));
    assert!(
        logs(&sink).contains("attempt 2 of job 7 continues the checkpoint"),
        "{}",
        logs(&sink)
    );
    assert_eq!(phases(&sink, "model_loaded")[0].step, 2);
    // …and ends where the uninterrupted run ended.
    let state = read_state(&retried).unwrap().unwrap();
    assert_eq!(state.losses.len(), 4);
    for (x, y) in state.losses.iter().zip(&full.losses) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{:?} vs {:?}",
            state.losses,
            full.losses
        );
    }
    assert_eq!(max_abs_diff(&weights(&straight), &weights(&retried)), 0.0);

    // Another job finding that checkpoint does not take it over.
    s.steps = 6;
    let other = Some(JobIdent {
        id: 8,
        attempt: 1,
        budget_bytes: 0,
    });
    let e = train_on(&s, DeviceSpec::Cpu, other, &Reporter::capture().0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

/// `--save-only-model`: checkpoints without the moments (a stale moment file from an earlier
/// full save of the directory goes away), and a retry from one restarts the moments from zero,
/// saying so.
#[test]
fn save_only_model_checkpoints_have_no_moments_and_a_retry_restarts_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ckpt");
    let job = |attempt| {
        Some(JobIdent {
            id: 9,
            attempt,
            budget_bytes: 0,
        })
    };
    // A full checkpoint at step 1, then the same job's retry saving only the model.
    let mut s = spec(&out, 1, QuantSpec::Nvfp4Full);
    train_on(&s, DeviceSpec::Cpu, job(1), &Reporter::capture().0).unwrap();
    assert!(out.join(OPTIMIZER_STATE).is_file());
    s.steps = 3;
    s.save_every = 2;
    s.save_only_model = true;
    let (r, sink) = Reporter::capture();
    let run = train_on(&s, DeviceSpec::Cpu, job(2), &r).unwrap();
    assert_eq!((run.step, run.losses.len()), (3, 2));
    let state = read_state(&out).unwrap().unwrap();
    assert!(!state.optimizer_saved);
    assert!(
        !out.join(OPTIMIZER_STATE).exists(),
        "the step-1 moments were left beside a step-3 checkpoint"
    );
    for p in phases(&sink, "checkpoint_saved") {
        assert_eq!(p.tensor_bytes.get("optimizer_state"), Some(&0), "{p:?}");
    }
    // A retry from it: no moments to restore, said in the log, and training goes on.
    s.steps = 4;
    let (r, sink) = Reporter::capture();
    let more = train_on(&s, DeviceSpec::Cpu, job(3), &r).unwrap();
    assert_eq!((more.step, more.losses.len()), (4, 1));
    assert!(
        logs(&sink).contains("the AdamW moments restart from zero"),
        "{}",
        logs(&sink)
    );
    // The checkpoint still loads as a model.
    assert!(!weights(&out).is_empty());
}

/// A `kiln random-model` directory (NVFP4 ModelOpt) is a `--model` like any other: full-NVFP4
/// training loads its packed weights as they are and saves the model only.
#[test]
fn a_random_model_directory_trains_in_nvfp4_full() {
    use kiln_engine::model::SaveFormat;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    kiln_engine::shapes::write_random_model("tiny", &model, SaveFormat::Nvfp4ModelOpt, 1).unwrap();
    let out = dir.path().join("ckpt");
    let mut s = spec(&out, 2, QuantSpec::Nvfp4Full);
    s.model = model.display().to_string();
    s.save_only_model = true;
    let run = train_on(&s, DeviceSpec::Cpu, None, &Reporter::capture().0).unwrap();
    assert_eq!(run.losses.len(), 2);
    assert!(!out.join(OPTIMIZER_STATE).exists());
    // The packed weights came from the directory, not from a new quantization: at lr 0 the
    // checkpoint's packed bytes equal the input's.
    let out0 = dir.path().join("ckpt0");
    s.out_dir = out0.display().to_string();
    s.lr = 0.0;
    train_on(&s, DeviceSpec::Cpu, None, &Reporter::capture().0).unwrap();
    let packed = |d: &Path| -> Vec<(String, Vec<f32>)> {
        weights(d)
            .into_iter()
            .filter(|(n, _)| n.ends_with("proj.weight"))
            .collect()
    };
    assert_eq!(max_abs_diff(&packed(&model), &packed(&out0)), 0.0);
}

#[test]
fn bf16_moments_halve_the_optimizer_state_and_train_like_f32() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for moments in [MomentsSpec::F32, MomentsSpec::Bf16] {
        let out = dir.path().join(moments.name());
        let mut s = spec(&out, 6, QuantSpec::Nvfp4Full);
        s.moments = moments;
        let (r, sink) = Reporter::capture();
        let o = train(&s, &r).unwrap();
        let opt = phases(&sink, "optimizer_done")[0].tensor_bytes["optimizer_state"];
        let (tensors, _) = read_safetensors_file(&out.join(OPTIMIZER_STATE)).unwrap();
        let dtype = tensors.values().next().unwrap().dtype;
        runs.push((o.losses, opt, dtype, out));
    }
    let (f32_run, bf16_run) = (&runs[0], &runs[1]);
    assert_eq!(bf16_run.1 * 2, f32_run.1);
    assert_eq!((f32_run.2, bf16_run.2), (Dtype::F32, Dtype::BF16));
    let (a, b) = (&f32_run.0, &bf16_run.0);
    assert!(
        b[b.len() - 1] < b[0] * 0.8,
        "bf16 moments did not train: {b:?}"
    );
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 0.1 * x.abs(), "f32 {a:?} vs bf16 {b:?}");
    }
    // A bf16 checkpoint resumes with f32 moments (widened on load).
    let mut s = spec(&bf16_run.3, 7, QuantSpec::Nvfp4Full);
    s.resume = true;
    let more = train(&s, &Reporter::capture().0).unwrap();
    assert_eq!(more.step, 7);
    let (tensors, _) = read_safetensors_file(&bf16_run.3.join(OPTIMIZER_STATE)).unwrap();
    assert_eq!(tensors.values().next().unwrap().dtype, Dtype::F32);
}
