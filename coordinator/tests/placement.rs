//! Placement through the real server: budgets sharing one capacity, priority order, drain.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::v1::{AgentStatus, JobState, ListAgentsRequest, ListJobsRequest};

#[tokio::test]
async fn two_jobs_that_fit_run_together_and_a_third_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    // A CPU agent's host memory stands in for a GPU: 10 GiB, jobs of 4 GiB.
    let mut a = agent(&h, "cpu", 0, 10).await;
    let jobs = [
        submit(&mut h, 0, 4).await,
        submit(&mut h, 0, 4).await,
        submit(&mut h, 0, 4).await,
    ];
    let first = expect_assign(&mut a).await;
    let second = expect_assign(&mut a).await;
    assert_eq!((first.id, second.id), (jobs[0].id, jobs[1].id));
    assert!(first.gpu_indices.is_empty());
    a.started(first.id, 1, 1).unwrap();
    a.started(second.id, 1, 2).unwrap();
    wait_state(&mut h, first.id, JobState::Running).await;
    wait_state(&mut h, second.id, JobState::Running).await;
    expect_silence(&mut a, Duration::from_millis(300)).await;
    assert_eq!(get(&mut h, jobs[2].id).await.state(), JobState::Queued);

    let agents = h
        .client
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].status(), AgentStatus::Ready);
    assert_eq!(agents[0].running_jobs, vec![first.id, second.id]);

    a.finished(first.id, 1, JobState::Succeeded).unwrap();
    let third = expect_assign(&mut a).await;
    assert_eq!(third.id, jobs[2].id);

    // Filters and paging on ListJobs, newest first.
    let page = h
        .client
        .list_jobs(ListJobsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![jobs[2].id, jobs[1].id]
    );
    let rest = h
        .client
        .list_jobs(ListJobsRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![jobs[0].id]
    );
    assert!(rest.next_page_token.is_empty());
    let succeeded = h
        .client
        .list_jobs(ListJobsRequest {
            states: vec![JobState::Succeeded as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        succeeded.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![jobs[0].id]
    );
    let on_cpu = h
        .client
        .list_jobs(ListJobsRequest {
            agent: "cpu".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_cpu.jobs.len(), 3);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn higher_priority_runs_first_then_submission_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    // Queue before any agent exists so the scheduler sees all three at once.
    let low = submit(&mut h, 1, 8).await;
    let mut req = memtest_request(1, 8 * GIB);
    req.priority = 10;
    let high = h
        .client
        .submit_job(req)
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let low2 = submit(&mut h, 1, 8).await;
    let mut a = agent(&h, "a", 10, 0).await; // room for one at a time
    let order = [high.id, low.id, low2.id];
    for want in order {
        let j = expect_assign(&mut a).await;
        assert_eq!(j.id, want);
        a.finished(j.id, j.attempt, JobState::Succeeded).unwrap();
    }
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_draining_agent_gets_no_new_work_but_its_jobs_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    let first = submit(&mut h, 1, 1).await;
    let j = expect_assign(&mut a).await;
    a.started(j.id, 1, 1).unwrap();
    let drained = drain(&mut h, "a", false).await;
    assert_eq!(drained.status(), AgentStatus::Draining);
    let waiting = submit(&mut h, 1, 1).await;
    expect_silence(&mut a, Duration::from_millis(300)).await;
    a.finished(first.id, 1, JobState::Succeeded).unwrap();
    wait_state(&mut h, first.id, JobState::Succeeded).await;
    assert_eq!(get(&mut h, waiting.id).await.state(), JobState::Queued);
    let mut b = agent(&h, "b", 80, 0).await;
    assert_eq!(expect_assign(&mut b).await.id, waiting.id);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_resumed_agent_gets_work_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    assert_eq!(
        drain(&mut h, "a", false).await.status(),
        AgentStatus::Draining
    );
    let waiting = submit(&mut h, 1, 1).await;
    expect_silence(&mut a, Duration::from_millis(300)).await;
    let resumed = drain(&mut h, "a", true).await;
    assert_eq!(resumed.status(), AgentStatus::Ready);
    assert_eq!(expect_assign(&mut a).await.id, waiting.id);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_that_waited_too_long_stops_backfill_until_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = kiln_coordinator::CoordinatorConfig {
        reserve_after_secs: 0.2,
        ..config(dir.path())
    };
    let mut h = start_with(config).await;
    let mut a = agent(&h, "cpu", 0, 10).await;
    let running = submit(&mut h, 0, 6).await;
    assert_eq!(expect_assign(&mut a).await.id, running.id);
    let big = submit(&mut h, 0, 8).await; // 4 GiB free: waits
    let early_small = submit(&mut h, 0, 2).await; // backfills at once: big has not waited long
    assert_eq!(expect_assign(&mut a).await.id, early_small.id);
    a.finished(early_small.id, 1, JobState::Succeeded).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // big is now starving
    let late_small = submit(&mut h, 0, 2).await;
    expect_silence(&mut a, Duration::from_millis(1500)).await; // reserved for big
    a.finished(running.id, 1, JobState::Succeeded).unwrap();
    assert_eq!(expect_assign(&mut a).await.id, big.id);
    a.finished(big.id, 1, JobState::Succeeded).unwrap();
    assert_eq!(expect_assign(&mut a).await.id, late_small.id);
    h.server.stop().await.unwrap();
}
