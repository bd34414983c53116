//! `kiln bench kernels`: the NVFP4 kernel benchmark on CUDA device 0. Thin: the validation and
//! timing live in `kiln_kernels::bench`; this prints the table.

use std::path::PathBuf;

use anyhow::Context;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, CellAlignment, Table};
use kiln_kernels::bench::{self, BenchConfig, BenchReport};

/// `kiln bench kernels`: validate each CUDA kernel against the CPU reference, then time it.
///
/// Per kernel and shape it prints the median time, the effective bandwidth (bytes the kernel
/// must move / time), that as a share of the device-to-device copy bandwidth measured in the
/// same run, and for the GEMV and large-M matmul the speed-up over cuBLAS bf16 on the same
/// shape in the same run. Per shape it also times a pure read of the GEMV's weight bytes (the
/// ceiling any GEMV of that size can reach; also as chained launches, the ceiling for a decode
/// chain) and the default GEMV as chained launches (programmatic dependent launch, each checked
/// bit-identical to a plain launch first). Built with `--features bench-variants` it also
/// prints "probe" rows that run parts of the GEMV schedule (loads only, no decode, no x
/// staging; not GEMVs) to show where the time goes, and every other GEMV kernel that can take
/// the shape. Needs a CUDA GPU; fails clearly without one.
#[derive(Debug, clap::Args)]
pub struct BenchKernelsArgs {
    /// Shapes as N×K (output × input features), comma-separated; K must be a multiple of 32.
    /// Default: 8192x8192,4864x896,896x4864,151936x896,18944x3584,3584x18944.
    #[arg(long, value_name = "NxK,...")]
    pub shapes: Option<String>,
    /// Timed samples per kernel (the median is reported; each sample is ≥ 0.5 ms of launches).
    #[arg(long, default_value_t = 25)]
    pub samples: usize,
    /// Rows of x for the dequantize + cuBLASLt (large-M) row.
    #[arg(long, default_value_t = 256)]
    pub large_m: usize,
    /// Seed of the random inputs (printed with the results so a run can be repeated).
    #[arg(long, default_value_t = 0x6b696c6e)]
    pub seed: u64,
    /// Also write the full report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Run `kiln bench kernels` (blocking).
pub fn run(args: BenchKernelsArgs) -> anyhow::Result<()> {
    let mut cfg = BenchConfig {
        samples: args.samples,
        large_m: args.large_m,
        seed: args.seed,
        ..BenchConfig::default()
    };
    if let Some(s) = &args.shapes {
        cfg.shapes = bench::parse_shapes(s).map_err(anyhow::Error::msg)?;
    }
    let report = bench::run(&cfg, |line| eprintln!("{line}"))?;
    print_report(&report);
    if !cfg!(feature = "bench-variants") {
        println!(
            "(default kernels only: build with `--features bench-variants` for the probe rows and \
             every other GEMV kernel)"
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_report(r: &BenchReport) {
    println!(
        "device: {}   copy bandwidth (read + write): {:.0} GB/s   seed: {:#x}",
        r.device, r.copy_gbps, r.seed
    );
    for c in &r.checks {
        println!("validated {c}");
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "kernel",
        "shape",
        "median µs",
        "GB/s",
        "% of copy",
        "vs cuBLAS bf16",
        "note",
    ]);
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    for row in &r.rows {
        t.add_row(vec![
            Cell::new(&row.kernel),
            Cell::new(&row.shape),
            right(format!("{:.2}", row.median_us)),
            right(format!("{:.0}", row.gbps)),
            right(format!("{:.1}%", row.pct_of_copy)),
            right(
                row.speedup_vs_baseline
                    .map(|x| format!("{x:.2}x"))
                    .unwrap_or_else(|| "-".into()),
            ),
            Cell::new(&row.note),
        ]);
    }
    println!("{t}");
}
