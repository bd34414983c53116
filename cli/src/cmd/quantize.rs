//! `kiln quantize`: a Hugging Face checkpoint → an NVFP4 checkpoint, locally (no coordinator).
//! Thin: parses flags, shows a progress bar and prints the summary; the work is
//! `kiln_kernels::checkpoint::quantize_checkpoint`.

use anyhow::Context;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, CellAlignment, Table};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_kernels::checkpoint::{
    quantize_checkpoint, NvfpFormat, QuantDevice, QuantizeOptions, QuantizeProgress,
    QuantizeSummary,
};

use crate::args::{OutputFormat, QuantizeArgs, QuantizeDevice, QuantizeFormat};
use crate::output::bytes;

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
