//! `kiln quantize`: a Hugging Face checkpoint → an NVFP4 checkpoint, locally (no coordinator).
//! Thin: parses flags, shows a progress bar and prints the summary; the work is
//! `kiln_kernels::checkpoint::quantize_checkpoint`.

use std::path::PathBuf;

use anyhow::Context;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, CellAlignment, Table};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_kernels::checkpoint::{
    quantize_checkpoint, NvfpFormat, QuantDevice, QuantizeOptions, QuantizeProgress,
    QuantizeSummary,
};

use crate::args::OutputFormat;
use crate::output::bytes;

/// Output layout of `kiln quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeFormat {
    /// NVIDIA ModelOpt layout: `weight` (U8 codes), `weight_scale` (F8_E4M3 per 16 inputs),
    /// `weight_scale_2` (F32 tensor scale) and hf_quant_config.json.
    #[value(name = "nvfp4-modelopt")]
    ModelOpt,
    /// compressed-tensors `nvfp4-pack-quantized` layout: `weight_packed`, `weight_scale`,
    /// `weight_global_scale` (the reciprocal tensor scale); quantization_config in config.json.
    #[value(name = "nvfp4-compressed-tensors")]
    CompressedTensors,
}

/// Where the quantization runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeDevice {
    /// The CPU reference (always available).
    Cpu,
    /// CUDA device 0; fails with a clear error if CUDA is not usable (never falls back).
    Cuda,
}

/// `kiln quantize`: turn a Hugging Face checkpoint into an NVFP4 one.
///
/// Linear-layer weights (2-D `*.weight`, K a multiple of 16) are quantized to NVFP4 (E2M1
/// values, one E4M3 scale per 16 inputs, one F32 tensor scale; ModelOpt rounding, bit-exact).
/// Embeddings, lm_head, norms and biases are kept in their original dtype (lm_head stays full
/// precision because the output projection is the most accuracy-sensitive layer; it is listed
/// in exclude_modules / ignore). config.json and tokenizer files are copied. The CPU and CUDA
/// paths write identical bytes.
#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// The model: a Hugging Face directory (config.json, model.safetensors or sharded
    /// model-*.safetensors with model.safetensors.index.json) or one .safetensors file.
    #[arg(long, value_name = "DIR|FILE.safetensors")]
    pub model: PathBuf,
    /// Output directory (created; must not be the input directory).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Checkpoint layout to write.
    #[arg(long, value_enum, default_value_t = QuantizeFormat::ModelOpt)]
    pub format: QuantizeFormat,
    /// Run the quantization on the CPU or on CUDA device 0 (same bytes either way).
    #[arg(long, value_enum, default_value_t = QuantizeDevice::Cpu)]
    pub device: QuantizeDevice,
    /// Output format of the summary: a table, or JSON for scripts (csv prints JSON).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// The same as `-o json` (kept for scripts written before `-o`).
    #[arg(long, hide = true)]
    pub json: bool,
}

/// Run `kiln quantize` (blocking).
pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    let opts = QuantizeOptions {
        format: match args.format {
            QuantizeFormat::ModelOpt => NvfpFormat::ModelOpt,
            QuantizeFormat::CompressedTensors => NvfpFormat::CompressedTensors,
        },
        device: match args.device {
            QuantizeDevice::Cpu => QuantDevice::Cpu,
            QuantizeDevice::Cuda => QuantDevice::Cuda,
        },
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {msg}",
        )
        .expect("valid template"),
    );
    let (mut done_q, mut done_k) = (0usize, 0usize);
    let summary = quantize_checkpoint(&args.model, &args.out, &opts, &mut |p| match p {
        QuantizeProgress::Start { bytes, .. } => bar.set_length(bytes),
        QuantizeProgress::Tensor {
            name,
            bytes,
            quantized,
        } => {
            if quantized {
                done_q += 1;
            } else {
                done_k += 1;
            }
            bar.inc(bytes);
            bar.set_message(format!("{done_q} quantized, {done_k} kept · {name}"));
        }
    });
    bar.finish_and_clear();
    let summary = summary.with_context(|| format!("quantizing {}", args.model.display()))?;
    if args.json || args.output != OutputFormat::Table {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, &args.out);
    }
    Ok(())
}

fn print_summary(s: &QuantizeSummary, out: &std::path::Path) {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(vec!["tensors", "count", "bytes in", "bytes out"]);
    t.add_row(vec![
        Cell::new("quantized to NVFP4 (linear weights)"),
        Cell::new(s.quantized).set_alignment(CellAlignment::Right),
        Cell::new(bytes(s.quantized_bytes_in)).set_alignment(CellAlignment::Right),
        Cell::new(bytes(s.quantized_bytes_out)).set_alignment(CellAlignment::Right),
    ]);
    for (reason, (n, b)) in &s.kept {
        t.add_row(vec![
            Cell::new(format!("kept: {reason}")),
            Cell::new(n).set_alignment(CellAlignment::Right),
            Cell::new(bytes(*b)).set_alignment(CellAlignment::Right),
            Cell::new(bytes(*b)).set_alignment(CellAlignment::Right),
        ]);
    }
    let kept_b: u64 = s.kept.values().map(|(_, b)| b).sum();
    t.add_row(vec![
        Cell::new("total"),
        Cell::new(s.quantized + s.kept.values().map(|(n, _)| n).sum::<usize>())
            .set_alignment(CellAlignment::Right),
        Cell::new(bytes(s.quantized_bytes_in + kept_b)).set_alignment(CellAlignment::Right),
        Cell::new(bytes(s.quantized_bytes_out + kept_b)).set_alignment(CellAlignment::Right),
    ]);
    println!("{t}");
    println!(
        "format {} on {} in {:.1} s; wrote {} files to {}",
        s.format,
        s.device,
        s.seconds,
        s.files_written.len(),
        out.display()
    );
    if !s.exclude_modules.is_empty() {
        println!(
            "left unquantized (exclude_modules): {}",
            s.exclude_modules.join(", ")
        );
    }
}
