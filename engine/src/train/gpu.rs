//! A train job's steps on the GPU (a job placed on a GPU): the plan checked
//! against the job's budget before anything is allocated, the parameters uploaded to a
//! [`CudaTrainer`], and per step the phases `forward_done` and `backward_done` for each
//! micro-batch and `optimizer_done`, each with the trainer's tensor bytes by category and the
//! device's free memory (cuMemGetInfo). Checkpoints download the weights and moments into the
//! host parameter store first, so they are written exactly as the CPU path writes them.

use kiln_job::units::human_bytes as human;
use kiln_kernels::cpu::AdamWParams;

use super::params::ParamStore;
use super::{tag_micro, StepOutcome, TrainData};
use crate::cuda::train::{CudaTrainer, HostBatch, TrainPlan, TRAIN_FLASH_ATTENTION};
use crate::engine::CudaEngine;
use crate::error::Result;
use crate::model::ModelConfig;
use crate::report::{PhaseReport, Reporter};
use crate::spec::TrainSpec;

/// A phase sample with the trainer's bytes and the device's memory.
fn phase(gpu: &CudaTrainer, name: &str, step: u64) -> Result<PhaseReport> {
    gpu.sync()?;
    let b = gpu.bytes();
    let (free, total) = gpu.mem_info()?;
    let mut p = PhaseReport::now(name, step as u32).bytes([
        ("weights", b.weights),
        ("scales", b.scales),
        ("grads", b.grads),
        ("optimizer_state", b.optimizer_state),
        ("activations", b.activations),
    ]);
    p.cuda_free = free;
    p.cuda_total = total;
    Ok(p)
}

/// Check the plan of the longest micro-batch this run can make against `budget_bytes` (0: no
/// check), upload `store`, report `model_loaded`; returns the trainer and the plan.
#[allow(clippy::too_many_arguments)]
pub(super) fn start(
    engine: &CudaEngine,
    cfg: &ModelConfig,
    store: &ParamStore,
    spec: &TrainSpec,
    seq_len: usize,
    budget_bytes: u64,
    step: u64,
    reporter: &Reporter,
) -> Result<(CudaTrainer, TrainPlan)> {
    CudaTrainer::check_supported(cfg)?;
    // (if the flash kernels did not load, set_flash_attention below says so)
    let flash = TRAIN_FLASH_ATTENTION && engine.kernels().train_flash_load_error().is_none();
    let plan = TrainPlan::new(cfg, spec.quant, spec.moments, spec.batch as usize, seq_len)?
        .with_micro_batches(cfg, spec.micro_batches())
        .with_recompute(cfg, spec.recompute)
        .with_flash_attention(cfg, flash);
    if budget_bytes > 0 {
        plan.check(cfg, budget_bytes)?;
    }
    let t_up = std::time::Instant::now();
    let mut gpu = CudaTrainer::new(engine.kernels().clone(), cfg, store)?;
    gpu.set_seed(spec.seed);
    gpu.set_micro_batches(spec.micro_batches() as usize)?;
    gpu.set_recompute(spec.recompute);
    gpu.set_flash_attention(flash);
    // Every buffer of the longest micro-batch, allocated now: what the plan checked.
    gpu.reserve(spec.batch as usize, seq_len)?;
    let p = phase(&gpu, "model_loaded", step)?.metric("planned_bytes", plan.total() as f64);
    let (free, total) = (p.cuda_free, p.cuda_total);
    reporter.phase(p);
    reporter.log(format!(
        "training on cuda:{} ({}): planned {} at most (weights {}, gradients {}, optimizer state {}, activations {} for {}×{seq_len} tokens, {:?} attention), uploaded and allocated in {:.1} s; device memory free {} of {}",
        engine.ordinal(),
        engine.kernels().device_name(),
        human(plan.total()),
        human(plan.weights),
        human(plan.grads),
        human(plan.optimizer_state),
        human(plan.activations),
        spec.batch,
        plan.attention,
        t_up.elapsed().as_secs_f64(),
        human(free),
        human(total),
    ));
    Ok((gpu, plan))
}

/// One optimizer step on the GPU over the micro-batches of 1-based `step`.
pub(super) fn step(
    gpu: &mut CudaTrainer,
    data: &TrainData,
    spec: &TrainSpec,
    hp: AdamWParams,
    step: u64,
    reporter: &Reporter,
) -> Result<StepOutcome> {
    let (parts, denom) = data.step_samples(spec, step);
    let micro = parts.len();
    gpu.begin_step(hp, step, spec.clip_grad() as f32)?;
    let mut tokens = 0;
    for (mb, part) in parts.iter().enumerate() {
        let b = HostBatch::new(part, data.pad, denom)?;
        tokens += b.input_tokens;
        gpu.forward(&b)?;
        reporter.phase(tag_micro(phase(gpu, "forward_done", step)?, micro, mb));
        gpu.backward()?;
        reporter.phase(tag_micro(phase(gpu, "backward_done", step)?, micro, mb));
    }
    let st = gpu.finish_step()?;
    reporter.phase(
        phase(gpu, "optimizer_done", step)?
            .metric("loss", st.loss as f64)
            .metric("grad_norm", st.grad_norm as f64),
    );
    Ok(StepOutcome {
        loss: st.loss,
        grad_norm: st.grad_norm,
        input_tokens: tokens,
    })
}
