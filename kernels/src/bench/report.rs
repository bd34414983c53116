//! The plain-text report and the shape-list parser.

use super::BenchReport;

impl BenchReport {
    /// A plain-text table (for the benchmark binary and logs).
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "device: {}\ncopy bandwidth: {:.0} GB/s (read + write)\nseed: {:#x}\n\n",
            self.device, self.copy_gbps, self.seed
        );
        for c in &self.checks {
            s.push_str(&format!("check  {c}\n"));
        }
        s.push_str(&format!(
            "\n{:<46} {:>12} {:>11} {:>9} {:>7} {:>9}  {}\n",
            "kernel", "shape", "median us", "GB/s", "% copy", "vs base", "note"
        ));
        for r in &self.rows {
            s.push_str(&format!(
                "{:<46} {:>12} {:>11.2} {:>9.0} {:>6.1}% {:>9}  {}\n",
                r.kernel,
                r.shape,
                r.median_us,
                r.gbps,
                r.pct_of_copy,
                r.speedup_vs_baseline
                    .map(|x| format!("{x:.2}x"))
                    .unwrap_or_else(|| "-".into()),
                r.note
            ));
        }
        s
    }
}

/// Parse `8192x8192,4864x896` into shapes.
pub fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>, String> {
    s.split(',')
        .map(|p| {
            let (a, b) = p
                .trim()
                .split_once(['x', 'X'])
                .ok_or_else(|| format!("shape {p:?} is not NxK"))?;
            let n = a.trim().parse().map_err(|_| format!("bad N in {p:?}"))?;
            let k: usize = b.trim().parse().map_err(|_| format!("bad K in {p:?}"))?;
            if k == 0 || !k.is_multiple_of(32) || n == 0 {
                return Err(format!(
                    "shape {p:?}: N must be > 0 and K a positive multiple of 32"
                ));
            }
            Ok((n, k))
        })
        .collect()
}
