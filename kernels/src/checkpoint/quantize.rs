//! `kiln quantize`: turn a Hugging Face checkpoint into an NVFP4 one, shard by shard (memory is
//! one input shard plus its output), on the CPU or the GPU with the same bytes out.
//!
//! What is quantized: 2-D `*.weight` tensors of linear layers (F32/F16/BF16, K % 16 == 0).
//! What is kept in its original dtype: embeddings (lookup tables, not matmuls), `lm_head` (the
//! output projection is the most accuracy-sensitive layer, and ModelOpt and llm-compressor
//! exclude it by default; it is listed in `exclude_modules` / `ignore`), norms, biases, MoE
//! routers, and any linear whose K is not a multiple of 16.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::Dtype;
use serde_json::Value;

use super::io::{list_shards, read_safetensors_file, write_safetensors_file, TensorData};
use super::layout::{modelopt_hf_quant_config, nvfp4_to_tensors, quantization_config, NvfpFormat};
use crate::cuda::CudaKernels;
use crate::nvfp4::Nvfp4Tensor;
use crate::KernelError;

/// Where the quantization runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantDevice {
    /// The CPU reference.
    Cpu,
    /// CUDA device 0 (bit-identical output); fails if CUDA is not usable.
    Cuda,
}

/// Options of [`quantize_checkpoint`].
#[derive(Clone, Copy, Debug)]
pub struct QuantizeOptions {
    /// Output layout.
    pub format: NvfpFormat,
    /// CPU or CUDA.
    pub device: QuantDevice,
}

/// Progress events (for a progress bar).
#[derive(Debug)]
pub enum QuantizeProgress<'a> {
    /// Before the first tensor: how much there is.
    Start {
        /// Tensors in the checkpoint.
        tensors: usize,
        /// Their bytes.
        bytes: u64,
    },
    /// One tensor done.
    Tensor {
        /// Its name.
        name: &'a str,
        /// Its input bytes.
        bytes: u64,
        /// Whether it was quantized.
        quantized: bool,
    },
}

/// What [`quantize_checkpoint`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct QuantizeSummary {
    /// Output layout name.
    pub format: String,
    /// "cpu" or the CUDA device name.
    pub device: String,
    /// Files written (weights, index, configs, copied tokenizer files).
    pub files_written: Vec<PathBuf>,
    /// Linear weights quantized.
    pub quantized: usize,
    /// Their bytes before / after.
    pub quantized_bytes_in: u64,
    /// Bytes of the NVFP4 tensors written for them.
    pub quantized_bytes_out: u64,
    /// Tensors kept as they were, by reason: reason → (count, bytes).
    pub kept: BTreeMap<String, (usize, u64)>,
    /// Linear-like layers left unquantized (`exclude_modules` / `ignore`).
    pub exclude_modules: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

/// The decision for one tensor.
enum Decision {
    Quantize,
    Keep { reason: &'static str, exclude: bool },
}

fn classify(name: &str, t: &TensorData) -> Decision {
    let keep = |reason, exclude| Decision::Keep { reason, exclude };
    if !name.ends_with(".weight") {
        return keep("not a weight (bias, buffer)", false);
    }
    if t.shape.len() != 2 {
        return keep("not 2-D (norm, conv, scalar)", false);
    }
    let module = &name[..name.len() - ".weight".len()];
    let last = module.rsplit('.').next().unwrap_or(module);
    if module.contains("embed") || last == "wte" || last == "wpe" {
        return keep("embedding (lookup table)", false);
    }
    if last == "lm_head" || last == "output" {
        return keep("lm_head (output projection, accuracy-sensitive)", true);
    }
    if module.contains("norm") {
        return keep("norm", false);
    }
    if last == "gate" || module.contains("router") {
        return keep("MoE router", true);
    }
    if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return keep("not a float dtype", true);
    }
    if !t.shape[1].is_multiple_of(16) {
        return keep("K not a multiple of 16", true);
    }
    Decision::Quantize
}

/// Files copied next to the weights when present.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Quantize the checkpoint at `input` (a model directory or one `.safetensors` file) into
/// `out_dir`. Errors name the file and the problem (missing, truncated, already quantized,
/// CUDA unavailable when asked for).
pub fn quantize_checkpoint(
    input: &Path,
    out_dir: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(QuantizeProgress<'_>),
) -> Result<QuantizeSummary, KernelError> {
    let t0 = Instant::now();
    let shards = list_shards(input)?;
    let headers: Vec<Vec<(String, u64)>> = shards
        .files
        .iter()
        .map(|f| read_header(f))
        .collect::<Result<_, _>>()?;
    let all_names: Vec<&String> = headers.iter().flatten().map(|(n, _)| n).collect();
    if let Some(n) = all_names.iter().find(|n| {
        n.ends_with(".weight_scale")
            || n.ends_with(".weight_packed")
            || n.ends_with(".weight_scale_2")
    }) {
        return Err(KernelError::checkpoint(
            input,
            format!("is already quantized (it has {n}); point --model at the original bf16/f16/f32 checkpoint"),
        ));
    }
    progress(QuantizeProgress::Start {
        tensors: all_names.len(),
        bytes: headers.iter().flatten().map(|(_, b)| *b).sum(),
    });
    let cuda = match opts.device {
        QuantDevice::Cpu => None,
        QuantDevice::Cuda => Some(CudaKernels::new(0)?),
    };
    std::fs::create_dir_all(out_dir)
        .map_err(|e| KernelError::io("creating the output directory", out_dir, e))?;
    if out_dir.canonicalize().ok() == shards.dir.as_ref().and_then(|d| d.canonicalize().ok()) {
        return Err(KernelError::InvalidArgument(format!(
            "--out {} is the input directory; choose a new directory",
            out_dir.display()
        )));
    }

    let mut summary = QuantizeSummary {
        format: opts.format.name().to_string(),
        device: cuda
            .as_ref()
            .map(|k| k.device_name().to_string())
            .unwrap_or_else(|| "cpu".into()),
        ..Default::default()
    };
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut total_size: u64 = 0;
    for file in &shards.files {
        let (tensors, metadata) = read_safetensors_file(file)?;
        let mut out: BTreeMap<String, TensorData> = BTreeMap::new();
        for (name, t) in tensors {
            let bytes = t.data.len() as u64;
            let quantized = match classify(&name, &t) {
                Decision::Keep { reason, exclude } => {
                    let e = summary.kept.entry(reason.to_string()).or_default();
                    e.0 += 1;
                    e.1 += bytes;
                    if exclude {
                        summary
                            .exclude_modules
                            .push(name.trim_end_matches(".weight").to_string());
                    }
                    out.insert(name.clone(), t);
                    false
                }
                Decision::Quantize => {
                    let q = quantize_tensor(&name, &t, cuda.as_ref(), file)?;
                    let prefix = &name[..name.len() - ".weight".len()];
                    for (n, d) in nvfp4_to_tensors(prefix, &q, opts.format) {
                        summary.quantized_bytes_out += d.data.len() as u64;
                        out.insert(n, d);
                    }
                    summary.quantized += 1;
                    summary.quantized_bytes_in += bytes;
                    true
                }
            };
            progress(QuantizeProgress::Tensor {
                name: &name,
                bytes,
                quantized,
            });
        }
        let out_name = match &shards.dir {
            Some(_) => file
                .file_name()
                .expect("shard has a file name")
                .to_string_lossy()
                .into_owned(),
            None => "model.safetensors".to_string(),
        };
        let out_path = out_dir.join(&out_name);
        for (n, d) in &out {
            weight_map.insert(n.clone(), out_name.clone());
            total_size += d.data.len() as u64;
        }
        let mut md = metadata.unwrap_or_default();
        md.entry("format".into()).or_insert_with(|| "pt".into());
        write_safetensors_file(&out_path, &out, Some(md))?;
        summary.files_written.push(out_path);
    }
    summary.exclude_modules.sort();
    summary.exclude_modules.dedup();

    if shards.files.len() > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
        summary.files_written.push(write_json(
            &out_dir.join("model.safetensors.index.json"),
            &index,
        )?);
    }
    let qc = quantization_config(opts.format, &summary.exclude_modules);
    let mut config: Value = match shards
        .dir
        .as_ref()
        .map(|d| d.join("config.json"))
        .filter(|p| p.exists())
    {
        Some(p) => {
            let text =
                std::fs::read_to_string(&p).map_err(|e| KernelError::io("reading", &p, e))?;
            serde_json::from_str(&text)
                .map_err(|e| KernelError::checkpoint(&p, format!("not valid JSON: {e}")))?
        }
        None => serde_json::json!({}),
    };
    if let Some(obj) = config.as_object_mut() {
        obj.insert("quantization_config".into(), qc);
    }
    summary
        .files_written
        .push(write_json(&out_dir.join("config.json"), &config)?);
    if opts.format == NvfpFormat::ModelOpt {
        let hq = modelopt_hf_quant_config(&summary.exclude_modules);
        summary
            .files_written
            .push(write_json(&out_dir.join("hf_quant_config.json"), &hq)?);
    }
    if let Some(dir) = &shards.dir {
        for f in SIDE_FILES {
            let src = dir.join(f);
            if src.exists() {
                let dst = out_dir.join(f);
                std::fs::copy(&src, &dst).map_err(|e| KernelError::io("copying", &src, e))?;
                summary.files_written.push(dst);
            }
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

fn quantize_tensor(
    name: &str,
    t: &TensorData,
    cuda: Option<&CudaKernels>,
    file: &Path,
) -> Result<Nvfp4Tensor, KernelError> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let locate = |e: KernelError| {
        match e {
        KernelError::NonFinite { row, col, value, .. } => KernelError::checkpoint(
            file,
            format!("tensor {name} has {value} at [{row}, {col}]; NVFP4 cannot store NaN/inf — the checkpoint is damaged"),
        ),
        other => other,
    }
    };
    match (cuda, t.dtype) {
        (Some(k), Dtype::BF16) => {
            let v: Vec<half::bf16> = t
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                .collect();
            k.quantize_bf16(&v, rows, cols).map_err(locate)
        }
        (Some(k), _) => k
            .quantize(&t.to_f32().expect("float dtype checked"), rows, cols)
            .map_err(locate),
        (None, _) => Nvfp4Tensor::quantize(&t.to_f32().expect("float dtype checked"), rows, cols)
            .map_err(locate),
    }
}

fn write_json(path: &Path, v: &Value) -> Result<PathBuf, KernelError> {
    let text = serde_json::to_string_pretty(v).expect("JSON value serializes");
    std::fs::write(path, text + "\n").map_err(|e| KernelError::io("writing", path, e))?;
    Ok(path.to_path_buf())
}

/// Read and check a safetensors header without reading the data: names and byte sizes, and a
/// clear error when the file is shorter than its header says (a truncated download).
fn read_header(path: &Path) -> Result<Vec<(String, u64)>, KernelError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| KernelError::io("opening", path, e))?;
    let file_len = f
        .metadata()
        .map_err(|e| KernelError::io("reading", path, e))?
        .len();
    let bad = |m: String| KernelError::checkpoint(path, m);
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad(format!("is {file_len} bytes, too short for a safetensors header; it is truncated or not a safetensors file")))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(bad(format!("declares a {n}-byte header but the file is {file_len} bytes; it is truncated or corrupt")));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)
        .map_err(|e| KernelError::io("reading", path, e))?;
    let json: HashMap<String, Value> = serde_json::from_slice(&h).map_err(|e| {
        bad(format!(
            "has a header that is not valid JSON ({e}); the file is corrupt"
        ))
    })?;
    let mut out = Vec::new();
    let mut end = 0u64;
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let offs = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
        let (a, b) = offs.ok_or_else(|| bad(format!("tensor {name} has no valid data_offsets")))?;
        end = end.max(b);
        out.push((name, b.saturating_sub(a)));
    }
    if 8 + n + end > file_len {
        return Err(bad(format!(
            "is {file_len} bytes but its header needs {} bytes; the file is truncated — download it again",
            8 + n + end
        )));
    }
    Ok(out)
}
