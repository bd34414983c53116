//! Readings a job process takes of itself for its phase reports: resident set size from /proc,
//! the page size, the wall clock in milliseconds, and how long ago the process started.

/// Resident set size of this process in bytes (0 where /proc is unavailable).
pub fn self_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page_size())
        .unwrap_or(0)
}

/// The system page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since this process started (from /proc: its start time in clock ticks since
/// boot against the system's uptime; None where /proc is unavailable). Resolution: one clock
/// tick (10 ms on most systems).
pub fn process_age_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // the fields after the command name, which may hold spaces, start after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    // field 22 (starttime) is the 20th after the name
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime_s: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    Some(((uptime_s - start_ticks / hz as f64) * 1e3).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_younger_than_the_machine_and_ages() {
        let a = process_age_ms().expect("/proc is available on Linux");
        std::thread::sleep(std::time::Duration::from_millis(60));
        let b = process_age_ms().unwrap();
        assert!(a >= 0.0 && b > a, "{a} then {b}");
        assert!(self_rss_bytes() > 0 && page_size() >= 4096 && now_ms() > 0);
    }
}
