//! Restarting a coordinator on the same data directory: every acknowledged job is back,
//! running jobs are reconciled when their agent reconnects, and jobs whose agent does not
//! come back within the lease are LOST and requeued.

mod common;

use std::collections::HashSet;

use common::*;
use kiln_coordinator::bench::{channel, register, AgentConn};
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{JobState, ListJobsRequest, RunningJob};

async fn restart(h: Harness, dir: &std::path::Path) -> Harness {
    h.server
        .stop()
        .await
        .expect("first coordinator stops cleanly");
    start(dir).await
}

#[tokio::test]
async fn every_acknowledged_job_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = CoordinatorClient::new(h.server.channel().await.unwrap());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..25 {
                let job = client
                    .submit_job(memtest_request(1, GIB))
                    .await
                    .unwrap()
                    .into_inner();
                ids.push(job.job.unwrap().id);
            }
            ids
        }));
    }
    let mut acked = HashSet::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 200);
    let mut h = restart(h, dir.path()).await;
    let listed = h
        .client
        .list_jobs(ListJobsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let listed: HashSet<u64> = listed.iter().map(|j| j.id).collect();
    assert_eq!(listed, acked);
    // New ids continue after the recovered ones.
    let next = submit(&mut h, 1, 1).await;
    assert!(next.id > *acked.iter().max().unwrap());
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_running_job_is_reconciled_when_its_agent_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    let running = submit(&mut h, 1, 8).await;
    let assigned_only = submit(&mut h, 1, 8).await;
    let too_big_now = submit(&mut h, 1, 75).await;
    assert_eq!(expect_assign(&mut a).await.id, running.id);
    assert_eq!(expect_assign(&mut a).await.id, assigned_only.id);
    a.started(running.id, 1, 100).unwrap();
    wait_state(&mut h, running.id, JobState::Running).await;
    drop(a);

    let mut h = restart(h, dir.path()).await;
    assert_eq!(get(&mut h, running.id).await.state(), JobState::Running);
    assert_eq!(
        get(&mut h, assigned_only.id).await.state(),
        JobState::Assigned
    );
    assert_eq!(get(&mut h, too_big_now.id).await.state(), JobState::Queued);

    // The agent comes back still running `running`, plus a job it should not have, plus the
    // end of a job it has not yet re-sent (its process is gone: no kill for that one).
    let mut reg = register("a", 1, 80 * GIB, 0);
    reg.running = vec![
        RunningJob {
            job_id: running.id,
            attempt: 1,
            pid: 100,
            ended: false,
        },
        RunningJob {
            job_id: 888_888,
            attempt: 1,
            pid: 102,
            ended: true,
        },
        RunningJob {
            job_id: 777_777,
            attempt: 3,
            pid: 101,
            ended: false,
        },
    ];
    let mut a = AgentConn::connect(channel(&h.server.url).await.unwrap(), reg)
        .await
        .unwrap();
    let kill = expect_kill(&mut a).await;
    assert_eq!(
        (kill.job_id, kill.attempt),
        (777_777, 3),
        "only the live stale job is killed"
    );
    // The assigned job the agent does not report is LOST and requeued as attempt 2.
    let again = expect_assign(&mut a).await;
    assert_eq!((again.id, again.attempt), (assigned_only.id, 2));

    tokio::time::sleep(std::time::Duration::from_millis(800)).await; // past the lease
    assert_eq!(get(&mut h, running.id).await.state(), JobState::Running);
    a.finished(running.id, 1, JobState::Succeeded).unwrap();
    wait_state(&mut h, running.id, JobState::Succeeded).await;
    assert_eq!(get(&mut h, too_big_now.id).await.state(), JobState::Queued);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_running_job_whose_agent_never_returns_is_lost_and_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    let job = submit(&mut h, 1, 8).await;
    expect_assign(&mut a).await;
    a.started(job.id, 1, 1).unwrap();
    wait_state(&mut h, job.id, JobState::Running).await;
    drop(a);
    let mut h = restart(h, dir.path()).await;
    let requeued = wait_state(&mut h, job.id, JobState::Queued).await;
    assert_eq!(requeued.attempt, 1);
    assert!(
        requeued.error.contains("did not reconnect"),
        "{}",
        requeued.error
    );
    let mut b = agent(&h, "b", 80, 0).await;
    let j = expect_assign(&mut b).await;
    assert_eq!((j.id, j.attempt), (job.id, 2));
    h.server.stop().await.unwrap();
}
