//! Attempt numbers as fencing tokens, and cancellation of queued, running and finished jobs.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::v1::{CancelJobRequest, JobState};
use tonic::Code;

#[tokio::test]
async fn a_stale_attempt_report_is_rejected_and_answered_with_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    let job = submit(&mut h, 1, 1).await;
    let j = expect_assign(&mut a).await;
    a.started(j.id, j.attempt, 7).unwrap();
    wait_state(&mut h, j.id, JobState::Running).await;

    // A report from an attempt that is not current: not applied, and Kill comes back.
    a.finished(job.id, j.attempt + 1, JobState::Succeeded)
        .unwrap();
    let kill = expect_kill(&mut a).await;
    assert_eq!((kill.job_id, kill.attempt), (job.id, j.attempt + 1));
    assert_eq!(kill.reason, "stale attempt");
    assert_eq!(get(&mut h, job.id).await.state(), JobState::Running);

    // A report about a job the coordinator never heard of.
    a.started(424_242, 1, 8).unwrap();
    let kill = expect_kill(&mut a).await;
    assert_eq!((kill.job_id, kill.attempt), (424_242, 1));

    // A report about the right attempt from the wrong agent is stale too.
    let b = agent(&h, "b", 80, 0).await;
    let mut b = b;
    b.finished(job.id, j.attempt, JobState::Succeeded).unwrap();
    let kill = expect_kill(&mut b).await;
    assert_eq!(kill.job_id, job.id);
    assert_eq!(get(&mut h, job.id).await.state(), JobState::Running);

    // The current attempt's report is applied.
    a.finished(job.id, j.attempt, JobState::Succeeded).unwrap();
    wait_state(&mut h, job.id, JobState::Succeeded).await;
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_running_sends_kill_and_ignores_the_late_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 0, 10).await;
    let job = submit(&mut h, 0, 6).await;
    let j = expect_assign(&mut a).await;
    a.started(j.id, j.attempt, 99).unwrap();
    wait_state(&mut h, j.id, JobState::Running).await;

    let cancelled = h
        .client
        .cancel_job(CancelJobRequest { id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert!(cancelled.finished_at_ms > 0);
    let kill = expect_kill(&mut a).await;
    assert_eq!(
        (kill.job_id, kill.attempt, kill.reason.as_str()),
        (job.id, 1, "cancelled")
    );

    // The budget stays held until the process is confirmed gone: a 6 GiB job must wait.
    let next_job = submit(&mut h, 0, 6).await;
    expect_silence(&mut a, Duration::from_millis(300)).await;
    // The killed process reports on its way out: ignored (no Kill), and the budget is freed.
    a.finished(job.id, 1, JobState::Cancelled).unwrap();
    let assigned = expect_assign(&mut a).await;
    assert_eq!(assigned.id, next_job.id);
    assert_eq!(get(&mut h, job.id).await.state(), JobState::Cancelled);

    // Cancelling a finished job is a precondition failure.
    let err = h
        .client
        .cancel_job(CancelJobRequest { id: job.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("CANCELLED"), "{}", err.message());
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_queued_is_immediate_and_never_placed() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let job = submit(&mut h, 1, 1).await;
    let c = h
        .client
        .cancel_job(CancelJobRequest { id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.state(), JobState::Cancelled);
    let mut a = agent(&h, "a", 80, 0).await;
    expect_silence(&mut a, Duration::from_millis(300)).await;
    h.server.stop().await.unwrap();
}
