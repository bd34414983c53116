//! `kiln-kernel-bench`: the kernel benchmark as a small standalone binary (same code as
//! `kiln bench kernels`), for carrying to a GPU machine without the whole CLI.
//!
//! Usage: `kiln-kernel-bench [--shapes 8192x8192,4864x896] [--samples N] [--json FILE]`

use std::process::ExitCode;

use kiln_kernels::bench::{self, BenchConfig};

fn main() -> ExitCode {
    let mut cfg = BenchConfig::default();
    let mut json: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--shapes" => match bench::parse_shapes(&val) {
                Ok(s) => cfg.shapes = s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
            "--samples" => cfg.samples = val.parse().unwrap_or(cfg.samples),
            "--json" => json = Some(val),
            "-h" | "--help" => {
                println!("kiln-kernel-bench [--shapes NxK,...] [--samples N] [--json FILE]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("error: unknown argument {other}");
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    match bench::run(&cfg, |line| eprintln!("{line}")) {
        Ok(report) => {
            print!("{}", report.to_text());
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&report).expect("report serializes");
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("error: writing {path}: {e}");
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
