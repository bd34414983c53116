//! The model-load benchmark (`kiln bench engine --device cuda --load-model DIR`): how long a
//! Hugging Face directory takes to become a model on the GPU when its float linears are
//! quantized by the host's cores (the baseline) and by the GPU's quantize kernel, in the same
//! run, after checking that both paths put the same bytes on the GPU.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kiln_kernels::cuda::CudaKernels;
use serde::Serialize;

use super::CudaModel;
use crate::error::{EngineError, Result};
use crate::model::{Checkpoint, GpuQuantizer, LinearFormat, LoadOptions, Model, ModelConfig};

/// One way of loading: the median over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct LoadRow {
    /// Where the float linears were quantized.
    pub quantized_on: String,
    /// Reading the safetensors files into memory, ms.
    pub read_ms: f64,
    /// Building the host model from them (float linears quantized), ms.
    pub quantize_ms: f64,
    /// Uploading that model to the GPU, ms.
    pub upload_ms: f64,
    /// All three.
    pub total_ms: f64,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct LoadBench {
    /// The GPU.
    pub device: String,
    /// The directory.
    pub model: String,
    /// Runs per path.
    pub runs: usize,
    /// The host's cores (baseline), then the GPU's kernel.
    pub rows: Vec<LoadRow>,
}

/// Load `dir` `runs` times each way, check both give the same GPU bytes, time them.
pub fn run_load_bench(
    k: Arc<CudaKernels>,
    dir: &Path,
    runs: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<LoadBench> {
    let runs = runs.max(1);
    let mut rows = Vec::new();
    let mut first: Option<Vec<(String, kiln_kernels::Nvfp4Tensor, Vec<f32>)>> = None;
    for (name, quantizer) in [
        ("host cores", None),
        ("GPU kernel", Some(GpuQuantizer(k.clone()))),
    ] {
        let opts = LoadOptions {
            format: LinearFormat::Nvfp4,
            quantizer,
            ..Default::default()
        };
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let (mut read, mut host, mut upload) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let t = Instant::now();
            let ckpt = Checkpoint::open(dir)?;
            read.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let model = Model::from_checkpoint(&cfg, &ckpt, &opts)?;
            drop(ckpt);
            host.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let gpu = CudaModel::from_model(k.clone(), &model)?;
            k.synchronize()?;
            upload.push(t.elapsed().as_secs_f64() * 1e3);
            progress(&format!(
                "{name} run {}: read {:.0} ms, quantize {:.0} ms, upload {:.0} ms",
                run + 1,
                read[run],
                host[run],
                upload[run]
            ));
            if run == 0 {
                let got = gpu.download_linears()?;
                match &first {
                    None => first = Some(got),
                    Some(want) => check_same(want, &got)?,
                }
            }
        }
        let (r, h, u) = (median(&mut read), median(&mut host), median(&mut upload));
        rows.push(LoadRow {
            quantized_on: name.into(),
            read_ms: r,
            quantize_ms: h,
            upload_ms: u,
            total_ms: r + h + u,
        });
    }
    Ok(LoadBench {
        device: k.device_name().to_string(),
        model: dir.display().to_string(),
        runs,
        rows,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn check_same(
    want: &[(String, kiln_kernels::Nvfp4Tensor, Vec<f32>)],
    got: &[(String, kiln_kernels::Nvfp4Tensor, Vec<f32>)],
) -> Result<()> {
    for ((name, a, sa), (_, b, sb)) in want.iter().zip(got) {
        let same_scales = sa
            .iter()
            .map(|x| x.to_bits())
            .eq(sb.iter().map(|x| x.to_bits()));
        if !(same_scales && a.packed == b.packed && a.scales == b.scales) {
            return Err(EngineError::InvalidArgument(format!(
                "the GPU quantize kernel and the host's quantize disagree on {name}: a bug, \
                 please report it"
            )));
        }
    }
    Ok(())
}

impl LoadBench {
    /// The table, the host's cores as the baseline.
    pub fn to_table(&self) -> String {
        let mut t = super::bench::table(vec![
            "float linears quantized on",
            "read files ms",
            "build + quantize ms",
            "upload ms",
            "total ms",
            "× faster than host cores",
        ]);
        let base = self.rows[0].total_ms;
        for r in &self.rows {
            t.add_row(vec![
                r.quantized_on.clone(),
                format!("{:.0}", r.read_ms),
                format!("{:.0}", r.quantize_ms),
                format!("{:.0}", r.upload_ms),
                format!("{:.0}", r.total_ms),
                format!("{:.2}", base / r.total_ms),
            ]);
        }
        format!(
            "Loading {} for {} (median of {} runs; identical GPU bytes both ways)\n{t}",
            self.model, self.device, self.runs
        )
    }
}
