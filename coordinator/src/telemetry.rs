//! Telemetry ingestion and queries: job events from agents (phase samples also become
//! telemetry rows), the guard's downsampled time series (with the job's exact peak kept on
//! the job record), and QueryTelemetry's filters.

use kiln_proto::v1::{
    job_event, GuardSample, JobEvent, PhaseSample, QueryTelemetryRequest, TelemetryRow,
    TelemetrySource,
};

use crate::error::ApiError;
use crate::shared::{Shared, State};
use crate::store::Store;

/// Default and largest number of rows per query.
const DEFAULT_LIMIT: usize = 10_000;

/// The GPU a job's telemetry is filed under (-1 for a host slot).
fn gpu_of(state: &State, job_id: u64) -> i32 {
    state.jobs[&job_id]
        .job
        .gpu_indices
        .first()
        .map_or(-1, |&g| g as i32)
}

/// Stores an event an agent relayed from a job. The coordinator numbers it; a phase sample
/// also becomes a telemetry row. State changes are the coordinator's to make, so an agent's
/// state event is dropped with a warning.
pub(crate) fn record_job_event(
    state: &mut State,
    store: &Store,
    job_id: u64,
    event: JobEvent,
    now: u64,
) -> Result<(), ApiError> {
    let at = if event.at_ms == 0 { now } else { event.at_ms };
    let Some(body) = event.event else {
        return Ok(());
    };
    if let job_event::Event::State(_) = body {
        tracing::warn!(job_id, "ignored a state change event from an agent");
        return Ok(());
    }
    if let job_event::Event::Phase(sample) = &body {
        let mut sample: PhaseSample = sample.clone();
        if sample.at_ms == 0 {
            sample.at_ms = at;
        }
        let active = state.jobs.get_mut(&job_id).expect("current job");
        active.last_phase = sample.phase.clone();
        let row = TelemetryRow {
            job_id,
            attempt: active.job.attempt,
            agent: active.job.agent.clone(),
            gpu_index: gpu_of(state, job_id),
            source: TelemetrySource::Phase as i32,
            sample: Some(sample),
        };
        store.put_telemetry(&row)?;
    }
    state.record_event(store, job_id, body, at)?;
    Ok(())
}

/// Stores a guard poll (already downsampled by the agent) and keeps the job's exact peak.
pub(crate) fn record_guard_sample(
    state: &mut State,
    store: &Store,
    job_id: u64,
    guard: GuardSample,
    now: u64,
) -> Result<(), ApiError> {
    let gpu_index = gpu_of(state, job_id);
    let active = state.jobs.get_mut(&job_id).expect("current job");
    let row = TelemetryRow {
        job_id,
        attempt: active.job.attempt,
        agent: active.job.agent.clone(),
        gpu_index,
        source: TelemetrySource::Guard as i32,
        sample: Some(PhaseSample {
            phase: active.last_phase.clone(),
            at_ms: if guard.at_ms == 0 { now } else { guard.at_ms },
            pid_mem: guard.pid_mem,
            device_used: guard.device_used,
            device_total: guard.device_total,
            ..Default::default()
        }),
    };
    let new_peak = guard.pid_mem > active.job.peak_mem;
    if new_peak {
        active.job.peak_mem = guard.pid_mem;
        let job = active.job.clone();
        state.write_job(store, &job)?;
    }
    store.put_telemetry(&row)?;
    state.dirty = true;
    Ok(())
}

/// Whether a row passes the query's filters.
fn matches(req: &QueryTelemetryRequest, row: &TelemetryRow) -> bool {
    let sample = row.sample.clone().unwrap_or_default();
    (req.include_guard || row.source() == TelemetrySource::Phase)
        && (req.agent.is_empty() || row.agent == req.agent)
        && (!req.has_gpu || row.gpu_index == req.gpu_index)
        && (req.phase.is_empty() || sample.phase == req.phase)
        && (req.since_ms == 0 || sample.at_ms >= req.since_ms)
        && (req.until_ms == 0 || sample.at_ms < req.until_ms)
}

impl Shared {
    /// Telemetry rows matching every filter, in time order, at most `limit`.
    pub async fn query_telemetry(
        &self,
        req: QueryTelemetryRequest,
    ) -> Result<Vec<TelemetryRow>, ApiError> {
        self.barrier().await?;
        let limit = match req.limit as usize {
            0 => DEFAULT_LIMIT,
            n => n,
        };
        let job = (req.job_id != 0).then_some(req.job_id);
        let mut rows = Vec::new();
        for row in self.store.telemetry(job) {
            let row = row?;
            if matches(&req, &row) {
                rows.push(row);
            }
        }
        // One job's rows are already in time order; several jobs' rows interleave.
        rows.sort_by_key(|r| r.sample.as_ref().map_or(0, |s| s.at_ms));
        rows.truncate(limit);
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(source: TelemetrySource, phase: &str, at: u64, gpu: i32) -> TelemetryRow {
        TelemetryRow {
            job_id: 1,
            agent: "a".into(),
            gpu_index: gpu,
            source: source as i32,
            sample: Some(PhaseSample {
                phase: phase.into(),
                at_ms: at,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn filters_combine() {
        let phase = row(TelemetrySource::Phase, "forward_done", 10, 0);
        let guard = row(TelemetrySource::Guard, "forward_done", 20, 0);
        let all = QueryTelemetryRequest::default();
        assert!(matches(&all, &phase));
        assert!(!matches(&all, &guard), "guard rows only with include_guard");
        let with_guard = QueryTelemetryRequest {
            include_guard: true,
            ..Default::default()
        };
        assert!(matches(&with_guard, &guard));
        let gpu1 = QueryTelemetryRequest {
            has_gpu: true,
            gpu_index: 1,
            ..Default::default()
        };
        assert!(!matches(&gpu1, &phase));
        let range = QueryTelemetryRequest {
            since_ms: 11,
            until_ms: 30,
            include_guard: true,
            ..Default::default()
        };
        assert!(!matches(&range, &phase));
        assert!(matches(&range, &guard));
        let other_phase = QueryTelemetryRequest {
            phase: "model_loaded".into(),
            ..Default::default()
        };
        assert!(!matches(&other_phase, &phase));
        let other_agent = QueryTelemetryRequest {
            agent: "b".into(),
            ..Default::default()
        };
        assert!(!matches(&other_agent, &phase));
    }
}
