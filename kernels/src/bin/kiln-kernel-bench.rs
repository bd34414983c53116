//! `kiln-kernel-bench`: the kernel benchmark as a small standalone binary (same code as
//! `kiln bench kernels`), for carrying to a GPU machine without the whole CLI.
//!
//! Usage:
//! `kiln-kernel-bench [--shapes 8192x8192,4864x896] [--samples N] [--gemv-only] [--json FILE]`
//! (GPU; `--gemv-only` times only the GEMVs, e.g. under a profiler), or
//! `kiln-kernel-bench --cpu [--shapes NxK,...] [--ms 1,4,8,64] [--samples N] [--json FILE]`
//! (the CPU section: NVFP4 matmul on the CPU vs f32 dense; no GPU needed; `--shapes` adds
//! shapes to the Qwen2.5-0.5B linears).
//!
//! Built with `--features bench` the GPU run also times the probe kernels and every
//! experimental GEMV kernel (what `scripts/gpu-kernels.sh` expects); without it, the
//! production kernels only.

use std::process::ExitCode;

use kiln_kernels::bench::{self, BenchConfig, CpuBenchConfig};

const USAGE: &str =
    "kiln-kernel-bench [--cpu] [--shapes NxK,...] [--ms 1,4,8] [--samples N] [--json FILE]";

fn main() -> ExitCode {
    let mut cfg = BenchConfig::default();
    let mut cpu_cfg = CpuBenchConfig::default();
    let mut cpu = false;
    let mut json: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--cpu" => {
                cpu = true;
                i += 1;
                continue;
            }
            "--gemv-only" => {
                cfg.gemv_only = true;
                i += 1;
                continue;
            }
            "--shapes" => match bench::parse_shapes(&val) {
                Ok(s) => {
                    cpu_cfg.extra_shapes = s.clone();
                    cfg.shapes = s;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
            "--ms" => match val
                .split(',')
                .map(|t| t.trim().parse::<usize>().ok().filter(|&m| m > 0))
                .collect::<Option<Vec<_>>>()
            {
                Some(ms) => cpu_cfg.ms = ms,
                None => {
                    eprintln!("error: --ms takes positive integers like 1,4,8, got {val:?}");
                    return ExitCode::from(2);
                }
            },
            "--samples" => {
                cfg.samples = val.parse().unwrap_or(cfg.samples);
                cpu_cfg.samples = val.parse().unwrap_or(cpu_cfg.samples);
            }
            "--json" => json = Some(val),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("error: unknown argument {other}\nusage: {USAGE}");
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    let (text, value) = if cpu {
        let report = bench::run_cpu(&cpu_cfg, |line| eprintln!("{line}"));
        (report.to_text(), serde_json::to_value(&report))
    } else {
        match bench::run(&cfg, |line| eprintln!("{line}")) {
            Ok(report) => (report.to_text(), serde_json::to_value(&report)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    };
    print!("{text}");
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&value.expect("report serializes"))
            .expect("report serializes");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: writing {path}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
