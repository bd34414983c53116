//! Generation on the GPU engine against the CPU reference (ignored without a GPU; run them on a
//! GPU machine with `cargo test -p kiln-engine --test gpu_generation -- --ignored`, or through
//! `scripts/gpu-all.sh`).
//!
//! Tolerances. The GPU keeps activations in f32 (as the CPU) but the KV cache in bf16 (8
//! significant bits), sums in another order, and computes exp/sin/cos with the CUDA library; the
//! prompt path (more than 8 tokens) runs the linears through bf16 GEMMs. So the logits agree to
//! a few hundredths, not bit for bit: the checks are top-1 agreement per position and max
//! |Δlogit| against [`LOGIT_TOL_DECODE`] (one token at a time, f32 linears) and
//! [`LOGIT_TOL_PREFILL`] (bf16 GEMM linears). The CPU reference has the GPU's by-design
//! differences (bf16 embedding, NVFP4 head for tied embeddings: `Model::gpu_reference`).

mod common;

use std::ops::ControlFlow;

use common::*;
use kiln_engine::chat::ChatMessage;
use kiln_engine::chat_model::ChatModel;
use kiln_engine::engine::{Engine, EngineCache, LoadedModel};
use kiln_engine::generate::{ab::ab_compare, generate, GenerateOptions, Sequence};
use kiln_engine::model::{Architecture, LinearFormat, Logits, Model, ModelConfig};
use kiln_engine::session::Session;

/// Max |Δlogit| of a decode step (one token, f32 GEMV) against the CPU reference (measured on
/// the H200: 0.015–0.03 on the 2-layer models, 0.07 on the 24-layer 0.5B shape — bf16 keys and
/// values round at every layer).
const LOGIT_TOL_DECODE: f32 = 0.12;
/// Max |Δlogit| of a prompt's last position (bf16 GEMM linears) against the CPU reference
/// (measured: 0.04–0.05).
const LOGIT_TOL_PREFILL: f32 = 0.25;
/// Least fraction of positions whose top-1 token agrees with the CPU reference.
const TOP1_AGREEMENT: f64 = 0.95;

fn gpu() -> Engine {
    Engine::cuda(0).expect("these tests need a CUDA GPU (they are ignored without one)")
}

/// Compare GPU and CPU teacher-forced over `ids`: (top-1 agreement, max |Δlogit|).
fn teacher_forced(cpu: &Model, gpu_model: &LoadedModel, ids: &[u32]) -> (f64, f32) {
    let want = logits(cpu, ids);
    let mut cache = gpu_model.new_cache();
    let got = gpu_model
        .forward(ids, &mut cache, Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let argmax = |v: &[f32]| kiln_engine::generate::argmax(v);
    let agree = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    (agree as f64 / ids.len() as f64, max_diff(&want, &got))
}

fn check_model(name: &str, cpu_model: &Model, ids: &[u32]) {
    let reference = cpu_model.gpu_reference().unwrap();
    let g = LoadedModel::new(gpu(), cpu_model.clone()).unwrap();
    let (agree, diff) = teacher_forced(&reference, &g, ids);
    eprintln!(
        "{name}: teacher-forced over {} positions: top-1 agreement {:.1}%, max |Δlogit| {diff:.4}",
        ids.len(),
        agree * 100.0
    );
    assert!(agree >= TOP1_AGREEMENT, "{name}: top-1 agreement {agree}");
    assert!(diff < LOGIT_TOL_DECODE, "{name}: max |Δlogit| {diff}");
    // the prompt path: the last position of a batched forward
    let want = logits(&reference, ids);
    let mut cache = g.new_cache();
    let last = g.forward_last(ids, &mut cache).unwrap();
    let d = max_diff(&want[ids.len() - 1..], &[last]);
    eprintln!(
        "{name}: prefill of {} tokens: last-position max |Δlogit| {d:.4}",
        ids.len()
    );
    assert!(d < LOGIT_TOL_PREFILL, "{name}: prefill max |Δlogit| {d}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_the_cpu_reference_teacher_forced_on_every_architecture() {
    for arch in [
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Llama,
    ] {
        let m = random_model(&small_config(arch), LinearFormat::Nvfp4);
        check_model(&format!("{arch:?}"), &m, &prompt(80));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_the_cpu_reference_on_the_tiny_model_over_a_long_context() {
    let cm = ChatModel::tiny(&Default::default()).unwrap();
    // 300 positions: the decode attention runs over several splits
    check_model("tiny", cm.model.model(), &prompt(300));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matches_the_cpu_reference_on_a_qwen2_5_0_5b_shaped_model() {
    let m = kiln_engine::generate::bench::qwen_0_5b_random(&Engine::cpu()).unwrap();
    let cfg = ModelConfig::qwen2_5_0_5b();
    assert_eq!(
        (m.config().hidden_size, m.config().vocab_size),
        (cfg.hidden_size, cfg.vocab_size)
    );
    check_model("qwen2.5-0.5b-shape", &m, &prompt(24));
}

/// Cache vs replay on the GPU. A replay forwards the whole sequence again at every step, as a
/// prompt: past 8 tokens (`plan::short_prompt`) through the bf16 GEMMs, while the cached run
/// decodes each new token through the f32 GEMVs. So their logits differ by the prompt path's
/// rounding (measured on the H200: 0.042 over 14 steps), and greedy tokens can part where two
/// candidates are that close — a flip at step 13 here, which any logit difference can cause
/// (the cache's margin between the two picks is at most twice the difference). The check is
/// the logits of every step up to and including the first divergence.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cache_and_replay_agree_on_the_gpu() {
    let cm = ChatModel::load_on(&gpu(), "tiny", LinearFormat::Nvfp4).unwrap();
    let p = cm
        .encode_chat(&[ChatMessage::user("Who are you?")], true)
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 24,
        ..Default::default()
    };
    let r = ab_compare(&cm.model, &p, &opts).unwrap();
    eprintln!(
        "GPU cache vs replay: identical {}, max |Δlogit| {:.4}",
        r.tokens_identical, r.max_logit_diff
    );
    assert!(r.compared_steps >= 2, "{r:?}");
    assert!(r.max_logit_diff < LOGIT_TOL_PREFILL, "{r:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_replay_equals_plain_launches() {
    let m = random_model(&small_config(Architecture::Qwen2), LinearFormat::Nvfp4);
    let g = LoadedModel::new(gpu(), m).unwrap();
    let run = |graph: bool| -> (Vec<u32>, Vec<Vec<f32>>) {
        let mut seq = Sequence::new(&g);
        if !graph {
            seq.cache.reserve(64).unwrap();
            // make the GPU sequence live, then switch its graph off
            g.forward_last(&prompt(4), &mut seq.cache).unwrap();
            if let EngineCache::Cuda(kiln_engine::engine::CudaCache::Live(s)) = &mut seq.cache {
                s.set_use_graph(false);
            }
        } else {
            g.forward_last(&prompt(4), &mut seq.cache).unwrap();
        }
        seq.tokens = prompt(4);
        let opts = GenerateOptions {
            max_tokens: 20,
            record_logits: true,
            ..Default::default()
        };
        let out = generate(&g, &mut seq, &prompt(3), &opts, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        (out.tokens, out.step_logits)
    };
    let (ta, la) = run(true);
    let (tb, lb) = run(false);
    assert_eq!(ta, tb);
    assert_eq!(
        la, lb,
        "graph replay and plain launches must give the same bits"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_session_turn_after_a_restore_equals_a_full_recompute() {
    let cm = ChatModel::load_on(&gpu(), "tiny", LinearFormat::Nvfp4).unwrap();
    let opts = GenerateOptions {
        max_tokens: 12,
        ..Default::default()
    };
    let mut s = Session::new("gpu-test", &cm).unwrap();
    s.turn(&cm, "Hello there", &opts, &mut |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let kept = s.seq.clone();
    // through the host, as the session store does between jobs
    let host = s.seq.cache.to_host().unwrap();
    s.seq.cache = cm.model.engine().cache_from_host(host).unwrap();
    // turn 2's delta: its rendered user turn and assistant prefix
    let delta = cm
        .tokenizer
        .encode(
            &cm.template
                .delta(&s.messages, &ChatMessage::user("Tell me more"))
                .unwrap(),
        )
        .unwrap();
    let restored = s
        .seq
        .extend(&cm.model, &delta, kiln_engine::generate::KvMode::Cache)
        .unwrap()
        .unwrap();
    // the restore is exact (bf16 → f32 → bf16): the same logits as the cache that never left
    let mut unmoved = kept;
    let direct = unmoved
        .extend(&cm.model, &delta, kiln_engine::generate::KvMode::Cache)
        .unwrap()
        .unwrap();
    assert_eq!(
        restored, direct,
        "a restored cache must equal the one it was saved from"
    );
    // a full recompute of the conversation (one batched forward, fresh cache)
    let mut fresh = Sequence::new(&cm.model);
    let full = fresh
        .extend(
            &cm.model,
            &s.seq.tokens,
            kiln_engine::generate::KvMode::Cache,
        )
        .unwrap()
        .unwrap();
    let d = max_diff(std::slice::from_ref(&restored), std::slice::from_ref(&full));
    eprintln!("session turn 2 vs full recompute: max |Δlogit| {d:.4}");
    let argmax = kiln_engine::generate::argmax;
    assert_eq!(argmax(&restored), argmax(&full));
    assert!(
        d < LOGIT_TOL_PREFILL,
        "turn 2 vs a full recompute: max |Δlogit| {d}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_gpu_job_over_its_budget_fails_before_allocating_with_the_numbers() {
    use kiln_engine::spec::{DeviceSpec, GenerateSpec, JobRequest, JobSpec};
    let dir = tempfile::tempdir().unwrap();
    let req = JobRequest {
        job_id: 1,
        attempt: 1,
        device: DeviceSpec::Cuda(0),
        budget_bytes: 64 << 20,
        work_dir: dir.path().join("job-1"),
        sessions_dir: Some(dir.path().join("sessions")),
        sessions_budget_bytes: 0,
        spec: JobSpec::Generate(GenerateSpec {
            model: "tiny".into(),
            prompt: "Hi".into(),
            max_tokens: 8,
            ..Default::default()
        }),
    };
    let (reporter, _) = kiln_engine::report::Reporter::capture();
    let e = kiln_engine::exec::run_request(&req, &reporter)
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    assert!(
        e.contains("budget is 64.0 MiB") && e.contains("--budget-gb 1"),
        "{e}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sampling_on_the_gpu_is_seeded() {
    let cm = ChatModel::load_on(&gpu(), "tiny", LinearFormat::Nvfp4).unwrap();
    let p = cm.encode_chat(&[ChatMessage::user("Hi")], true).unwrap();
    let run = |seed: u64| {
        let opts = GenerateOptions {
            max_tokens: 32,
            sampling: kiln_engine::generate::SamplingParams {
                temperature: 1.5,
                top_k: 50,
                top_p: 0.95,
                seed,
            },
            ..Default::default()
        };
        let mut seq = Sequence::new(&cm.model);
        generate(&cm.model, &mut seq, &p, &opts, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .tokens
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a, b, "the same seed gives the same tokens");
    assert_ne!(a, c, "another seed gives other tokens");
    let greedy = {
        let mut seq = Sequence::new(&cm.model);
        generate(
            &cm.model,
            &mut seq,
            &p,
            &GenerateOptions {
                max_tokens: 32,
                ..Default::default()
            },
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap()
        .tokens
    };
    assert_ne!(
        a, greedy,
        "temperature 1.5 on an untrained model departs from greedy"
    );
}

/// The packed matrices of `m` once uploaded to the GPU engine.
fn gpu_linears(m: &Model) -> Vec<(String, kiln_kernels::Nvfp4Tensor, Vec<f32>)> {
    let loaded = LoadedModel::new(gpu(), m.clone()).unwrap();
    loaded.gpu().unwrap().download_linears().unwrap()
}

fn assert_same_linears(
    what: &str,
    want: &[(String, kiln_kernels::Nvfp4Tensor, Vec<f32>)],
    got: &[(String, kiln_kernels::Nvfp4Tensor, Vec<f32>)],
) {
    assert_eq!(want.len(), got.len(), "{what}");
    for ((name, a, sa), (_, b, sb)) in want.iter().zip(got) {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols), "{what}: {name} shape");
        let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(sa), bits(sb), "{what}: {name} tensor scales");
        assert!(a.scales == b.scales, "{what}: {name} block scales differ");
        assert!(a.packed == b.packed, "{what}: {name} codes differ");
    }
}

/// A float model is quantized by the GPU's kernel — when a model held dense is uploaded, and
/// when an f32 directory is loaded for the GPU engine — to exactly the bytes the CPU's quantize
/// makes (tied heads, q/k/v biases and untied heads included).
#[test]
#[ignore = "needs a CUDA GPU"]
fn float_models_are_quantized_on_the_gpu_to_the_cpus_bytes() {
    for arch in [Architecture::Qwen2, Architecture::Llama] {
        let cfg = small_config(arch);
        let want = gpu_linears(&random_model(&cfg, LinearFormat::Nvfp4));
        let dense = random_model(&cfg, LinearFormat::Dense);
        assert_same_linears(
            &format!("{arch:?} dense upload"),
            &want,
            &gpu_linears(&dense),
        );
        let dir = tempfile::tempdir().unwrap();
        save(&dense, dir.path(), &DENSE_F32);
        let g = gpu();
        let loaded = Model::load(dir.path(), &g.load_options(LinearFormat::Nvfp4)).unwrap();
        let got = gpu_linears(&loaded);
        assert_same_linears(&format!("{arch:?} f32 directory"), &want, &got);
        eprintln!(
            "{arch:?}: {} packed matrices identical to the CPU's",
            got.len()
        );
    }
}

/// Greedy tokens and every step's logits of `steps` decode steps after `prompt` in a cache of
/// `capacity` positions, with the decode fusion `fusion`, with or without the captured graph.
fn decode_run(
    m: &kiln_engine::cuda::CudaModel,
    prompt: &[u32],
    (steps, capacity): (usize, usize),
    (fusion, graph): (kiln_engine::cuda::DecodeFusion, bool),
) -> (Vec<u32>, Vec<Vec<f32>>) {
    use kiln_engine::cuda::CudaSequence;
    let mut seq = CudaSequence::new(m.kernels().clone(), m.config(), capacity).unwrap();
    seq.set_decode_fusion(fusion).unwrap();
    seq.set_use_graph(graph);
    let mut tok = seq.forward(m, prompt, true).unwrap().unwrap();
    let (mut toks, mut logits) = (vec![tok], Vec::new());
    for _ in 0..steps {
        tok = seq.forward(m, &[tok], true).unwrap().unwrap();
        toks.push(tok);
        logits.push(seq.logits().unwrap());
    }
    (toks, logits)
}

/// The fused decode GEMVs (norms, SwiGLU and the attention's combine folded into the GEMVs'
/// x load, the residual adds into their stores; and the form with SwiGLU apart) and the
/// persistent decode kernel give the separate kernels' bits: the same
/// tokens and the same logits, bit for bit, at every step — on the tiny model's real weights,
/// a 2-layer Llama, a 2-layer Qwen3 (q/k norm) and the Qwen2.5-0.5B shape, with the graph and
/// with plain launches. A
/// 20-token prompt (8-row batches) and a 5-token one lead in (prompts are never fused); the 0.5B
/// shape also in a 4,096-position cache, whose attention splits are too many for the o GEMV to
/// combine (the attention's own combine runs, the o GEMV only adds the residual).
#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_decode_steps_equal_the_separate_kernels() {
    use kiln_engine::cuda::{CudaModel, DecodeFusion};
    use std::sync::Arc;
    let k = Arc::new(kiln_kernels::cuda::CudaKernels::new(0).expect("a CUDA GPU"));
    let tiny = ChatModel::tiny(&Default::default()).unwrap();
    let llama = random_model(&small_config(Architecture::Llama), LinearFormat::Nvfp4);
    let qwen3 = random_model(&small_config(Architecture::Qwen3), LinearFormat::Nvfp4);
    let models = [
        (
            "tiny",
            CudaModel::from_model(k.clone(), tiny.model.model()).unwrap(),
        ),
        (
            "llama-2-layer",
            CudaModel::from_model(k.clone(), &llama).unwrap(),
        ),
        (
            "qwen3-2-layer",
            CudaModel::from_model(k.clone(), &qwen3).unwrap(),
        ),
        (
            "qwen2.5-0.5b-shape",
            CudaModel::random(k.clone(), &ModelConfig::qwen2_5_0_5b(), 7).unwrap(),
        ),
    ];
    for (name, m) in &models {
        let mut runs = vec![(prompt(20), 45), (prompt(5), 30)];
        if *name == "qwen2.5-0.5b-shape" {
            runs.push((prompt(20), 4096));
        }
        for (p, cap) in runs {
            let want = decode_run(m, &p, (24, cap), (DecodeFusion::Off, true));
            for (fusion, graph) in [
                (DecodeFusion::All, true),
                (DecodeFusion::All, false),
                (DecodeFusion::AllButSwiglu, true),
                (DecodeFusion::Persistent, true),
                (DecodeFusion::Persistent, false),
            ] {
                let got = decode_run(m, &p, (24, cap), (fusion, graph));
                assert_eq!(
                    got.0,
                    want.0,
                    "{name}, prompt {}, capacity {cap}, {fusion:?}, graph {graph}: tokens",
                    p.len()
                );
                let same = got
                    .1
                    .iter()
                    .zip(&want.1)
                    .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
                assert!(
                    same,
                    "{name}, prompt {}, capacity {cap}, {fusion:?}, graph {graph}: fused logits \
                     differ from the separate kernels' (max |Δ| {})",
                    p.len(),
                    max_diff(&got.1, &want.1)
                );
            }
        }
        eprintln!(
            "{name}: fused and persistent decode = separate kernels, bit for bit, 24 steps a run"
        );
    }
}

/// The prompt path's logits (and the first token) with the weight slabs dequantized serially
/// and overlapped with the GEMMs on a side stream are the same bits — the same GEMMs on the
/// same slabs, only ordered by events instead of by one stream. Slab sizes from one row of the
/// widest matrix (tiny model: every linear many slabs, both buffers in turn) to the jobs'
/// default; prompts
/// of one batch and of two (the second batch reuses the slabs after a join), and a Qwen2.5-0.5B
/// shape whose gate/up matrix is several default slabs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn overlapped_weight_slabs_give_the_serial_bits() {
    use kiln_engine::cuda::{CudaModel, CudaSequence};
    use std::sync::Arc;
    let k = Arc::new(kiln_kernels::cuda::CudaKernels::new(0).expect("a CUDA GPU"));
    let tiny = ChatModel::tiny(&Default::default()).unwrap();
    let models = [
        (
            "tiny",
            CudaModel::from_model(k.clone(), tiny.model.model()).unwrap(),
        ),
        (
            "qwen2.5-0.5b-shape",
            CudaModel::random(k.clone(), &ModelConfig::qwen2_5_0_5b(), 7).unwrap(),
        ),
    ];
    for (name, m) in &models {
        let cfg = m.config();
        let widest = cfg.hidden_size.max(cfg.intermediate_size);
        // (one-row slabs only on the tiny model: 0.5B would be ~300k GEMMs a prompt)
        let sizes = if *name == "tiny" {
            vec![widest, 300 * widest, 32 << 20]
        } else {
            vec![300 * widest, 32 << 20]
        };
        for slab_elems in sizes {
            // (the tiny model's context may be shorter than two batches)
            for n in [40, 2100.min(cfg.max_position_embeddings - 2)] {
                let p = prompt(n);
                let run = |overlap: bool| {
                    let mut seq = CudaSequence::new(m.kernels().clone(), cfg, n + 2).unwrap();
                    seq.set_prefill_scratch_elems(slab_elems);
                    seq.set_prefill_overlap(overlap);
                    let tok = seq.forward(m, &p, true).unwrap().unwrap();
                    (tok, seq.logits().unwrap())
                };
                let (serial, overlapped) = (run(false), run(true));
                assert_eq!(
                    serial.0, overlapped.0,
                    "{name}, {n} tokens, slab {slab_elems}"
                );
                let same = serial
                    .1
                    .iter()
                    .zip(&overlapped.1)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{name}, {n} tokens, slabs of {slab_elems} elements: overlapped logits \
                     differ from the serial ones (max |Δ| {})",
                    max_diff(
                        std::slice::from_ref(&serial.1),
                        std::slice::from_ref(&overlapped.1)
                    )
                );
            }
        }
        eprintln!("{name}: overlapped weight slabs = serial, bit for bit");
    }
}
