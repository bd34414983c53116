//! The benchmark's numbers and the table they print as, next to the targets, the
//! baseline measured in the same run, and Slurm's documented rate for context.

use std::fmt;
use std::time::Duration;

use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};

use super::BenchOptions;

/// Slurm's documented validated job submission rate, jobs/s (context, not measured here).
pub const SLURM_VALIDATED_JOBS_PER_S: f64 = 500.0;
/// Target: durable submits per second on the 2-core machine.
pub const TARGET_SUBMITS_PER_S: f64 = 2_000.0;
/// Target: dispatch latency p99 with 100 agents.
pub const TARGET_DISPATCH_P99: Duration = Duration::from_millis(50);
/// Target: recovery time with 10,000 queued jobs.
pub const TARGET_RECOVERY: Duration = Duration::from_secs(2);

/// What one run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// The options it ran with.
    pub options: BenchOptions,
    /// Logical CPUs of this machine.
    pub cpus: usize,
    /// Whether this build has debug assertions (an unoptimized or test build).
    pub debug_build: bool,
    /// Baseline: raw sled insert + flush + fdatasync per operation, ops/s.
    pub baseline_flush_per_op: f64,
    /// Durable submits per second (acknowledged = flushed), concurrent clients, no agents.
    pub submits_per_s: f64,
    /// Acknowledged submits per sled flush in the throughput phase (group commit batching).
    pub submits_per_flush: f64,
    /// Dispatch latency, median.
    pub dispatch_p50: Duration,
    /// Dispatch latency, 99th percentile.
    pub dispatch_p99: Duration,
    /// Dispatch latency, worst.
    pub dispatch_max: Duration,
    /// Submit rate reached during the dispatch phase, jobs/s.
    pub dispatch_submit_rate: f64,
    /// Submit rate while queueing the recovery jobs, jobs/s.
    pub recovery_submits_per_s: f64,
    /// Restart → first successful call.
    pub recovery_serving: Duration,
    /// Restart → every queued job listed.
    pub recovery_all_listed: Duration,
    /// Jobs found after the restart (all acknowledged ones, or the run fails).
    pub recovered: usize,
}

impl BenchReport {
    pub(super) fn new(options: &BenchOptions) -> BenchReport {
        BenchReport {
            options: options.clone(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            debug_build: cfg!(debug_assertions),
            baseline_flush_per_op: 0.0,
            submits_per_s: 0.0,
            submits_per_flush: 0.0,
            dispatch_p50: Duration::ZERO,
            dispatch_p99: Duration::ZERO,
            dispatch_max: Duration::ZERO,
            dispatch_submit_rate: 0.0,
            recovery_submits_per_s: 0.0,
            recovery_serving: Duration::ZERO,
            recovery_all_listed: Duration::ZERO,
            recovered: 0,
        }
    }

    /// Whether every target was met.
    pub fn meets_targets(&self) -> bool {
        self.submits_per_s >= TARGET_SUBMITS_PER_S
            && self.dispatch_p99 < TARGET_DISPATCH_P99
            && self.recovery_all_listed < TARGET_RECOVERY
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "Kiln scheduler benchmark — {} CPUs, {} build, coordinator + simulated agents in \
             one process over loopback gRPC, sled on local disk",
            self.cpus,
            if self.debug_build { "debug" } else { "release" }
        )?;
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(140);
        table.set_header(vec!["measure", "measured", "target", "context", "verdict"]);
        table.add_row(vec![
            format!(
                "durable submits/s ({} jobs, {} clients)",
                o.submit_jobs, o.submit_clients
            ),
            format!("{:.0}/s", self.submits_per_s),
            format!("≥ {TARGET_SUBMITS_PER_S:.0}/s"),
            format!(
                "baseline: raw sled insert + flush + fdatasync per op {:.0}/s; group commit: {:.1} \
                 submits per flush, {:.1}× the baseline; Slurm validated: \
                 {SLURM_VALIDATED_JOBS_PER_S:.0}/s",
                self.baseline_flush_per_op,
                self.submits_per_flush,
                self.submits_per_s / self.baseline_flush_per_op.max(1e-9)
            ),
            verdict(self.submits_per_s >= TARGET_SUBMITS_PER_S).into(),
        ]);
        table.add_row(vec![
            format!(
                "dispatch latency p50 / p99 / max ({} agents, {} jobs, {} clients)",
                o.agents, o.dispatch_jobs, o.dispatch_clients
            ),
            format!(
                "{} / {} / {}",
                ms(self.dispatch_p50),
                ms(self.dispatch_p99),
                ms(self.dispatch_max)
            ),
            format!("p99 < {}", ms(TARGET_DISPATCH_P99)),
            format!(
                "submit → Assign received by the agent; submits at {:.0}/s; each job also \
                 reports started and finished",
                self.dispatch_submit_rate
            ),
            verdict(self.dispatch_p99 < TARGET_DISPATCH_P99).into(),
        ]);
        table.add_row(vec![
            format!("restart recovery ({} queued jobs)", o.recovery_jobs),
            format!(
                "{} to serve, {} to list all",
                ms(self.recovery_serving),
                ms(self.recovery_all_listed)
            ),
            format!("< {}", ms(TARGET_RECOVERY)),
            format!(
                "{} of {} acknowledged jobs back (queued at {:.0}/s)",
                self.recovered, o.recovery_jobs, self.recovery_submits_per_s
            ),
            verdict(self.recovery_all_listed < TARGET_RECOVERY).into(),
        ]);
        write!(f, "{table}")
    }
}
