//! User-facing names of protocol enums: `QUEUED`, `MEMTEST`… (the proto names without their
//! type prefix), and parsing them back. JSON output and CLI flags use these.

use crate::v1::{AgentStatus, JobKind, JobState, TelemetrySource};

/// Strips `PREFIX_` from a proto enum name.
fn strip<'a>(full: &'a str, prefix: &str) -> &'a str {
    full.strip_prefix(prefix).unwrap_or(full)
}

/// Upper-case name of a job state, e.g. `RUNNING`.
pub fn state_name(state: JobState) -> &'static str {
    strip(state.as_str_name(), "JOB_STATE_")
}

/// Parses `running`, `RUNNING` or `JOB_STATE_RUNNING`.
pub fn parse_state(s: &str) -> Option<JobState> {
    let up = s.to_ascii_uppercase();
    JobState::from_str_name(&up)
        .or_else(|| JobState::from_str_name(&format!("JOB_STATE_{up}")))
        .filter(|s| *s != JobState::Unspecified)
}

/// Upper-case name of a job kind, e.g. `MEMTEST`.
pub fn kind_name(kind: JobKind) -> &'static str {
    strip(kind.as_str_name(), "JOB_KIND_")
}

/// Parses `memtest`, `MEMTEST` or `JOB_KIND_MEMTEST`.
pub fn parse_kind(s: &str) -> Option<JobKind> {
    let up = s.to_ascii_uppercase();
    JobKind::from_str_name(&up)
        .or_else(|| JobKind::from_str_name(&format!("JOB_KIND_{up}")))
        .filter(|k| *k != JobKind::Unspecified)
}

/// Upper-case name of an agent status, e.g. `DRAINING`.
pub fn agent_status_name(status: AgentStatus) -> &'static str {
    strip(status.as_str_name(), "AGENT_STATUS_")
}

/// Lower-case name of a telemetry source: `phase` or `guard`.
pub fn source_name(source: TelemetrySource) -> &'static str {
    match source {
        TelemetrySource::Phase => "phase",
        TelemetrySource::Guard => "guard",
        TelemetrySource::Unspecified => "unspecified",
    }
}

/// Whether a state is terminal for the job (LOST counts: a retry makes a new attempt).
pub fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded
            | JobState::Failed
            | JobState::Cancelled
            | JobState::Killed
            | JobState::Lost
    )
}

/// Bytes as people read them (the one formatter; it lives in `kiln_job`).
pub use kiln_job::units::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [JobState::Queued, JobState::Killed, JobState::Lost] {
            assert_eq!(parse_state(state_name(s)), Some(s));
            assert_eq!(parse_state(&state_name(s).to_lowercase()), Some(s));
        }
        assert_eq!(parse_state("bogus"), None);
        assert_eq!(parse_state("unspecified"), None);
        assert_eq!(kind_name(JobKind::Memtest), "MEMTEST");
        assert_eq!(parse_kind("train"), Some(JobKind::Train));
    }
}
