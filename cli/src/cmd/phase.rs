//! `kiln phase NAME …`: report a phase from inside an exec job to its agent (over the socket
//! named in KILN_PHASE_SOCKET); the agent adds its own reading of the job's memory.

use crate::args::PhaseArgs;
use anyhow::{bail, Context};
use kiln_job::report::PhaseReport;

/// `kiln phase`.
pub fn run(args: PhaseArgs) -> anyhow::Result<()> {
    let mut report = PhaseReport::now(&args.name, args.step);
    report.host_rss = 0; // the agent measures the job's tree; this process is not the job
    for m in &args.metrics {
        let (k, v) = pair(m, "--metric")?;
        let v: f64 = v
            .parse()
            .with_context(|| format!("--metric {m:?}: the value is not a number"))?;
        report.metrics.insert(k.to_string(), v);
    }
    for b in &args.bytes {
        let (k, v) = pair(b, "--bytes")?;
        let v: u64 = v
            .parse()
            .with_context(|| format!("--bytes {b:?}: the value is not a whole number of bytes"))?;
        report.tensor_bytes.insert(k.to_string(), v);
    }
    if args.name.trim().is_empty() {
        bail!("the phase needs a name (e.g. model_loaded)");
    }
    kiln_job::phase::send(&report)?;
    Ok(())
}

fn pair<'a>(s: &'a str, flag: &str) -> anyhow::Result<(&'a str, &'a str)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k, v)),
        _ => bail!("{flag} {s:?}: write NAME=VALUE"),
    }
}
