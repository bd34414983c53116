//! Leases: an agent that goes away loses its jobs after the lease; they are requeued as new
//! attempts and finish elsewhere, and run out of attempts per the retry policy.

mod common;

use common::*;
use kiln_proto::v1::{job_event, JobEvent, JobState};

fn state_trail(events: &[JobEvent]) -> Vec<(JobState, u32)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::State(s)) => Some((s.state(), e.attempt)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn agent_loss_requeues_the_job_which_succeeds_on_a_second_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    let job = submit(&mut h, 1, 4).await;
    let j = expect_assign(&mut a).await;
    a.started(j.id, 1, 11).unwrap();
    wait_state(&mut h, job.id, JobState::Running).await;

    drop(a); // the stream breaks; the lease (0.5 s) runs out
    let mut b = agent(&h, "b", 80, 0).await;
    let again = expect_assign(&mut b).await;
    assert_eq!(
        (again.id, again.attempt, again.agent.as_str()),
        (job.id, 2, "b")
    );
    b.started(job.id, 2, 12).unwrap();
    b.finished(job.id, 2, JobState::Succeeded).unwrap();
    let done = wait_state(&mut h, job.id, JobState::Succeeded).await;
    assert_eq!(done.attempt, 2);

    let events: Vec<JobEvent> = events_after(&mut h, job.id, 0).await;
    assert_eq!(
        state_trail(&events),
        vec![
            (JobState::Queued, 0),
            (JobState::Assigned, 1),
            (JobState::Running, 1),
            (JobState::Lost, 1),
            (JobState::Queued, 1),
            (JobState::Assigned, 2),
            (JobState::Running, 2),
            (JobState::Succeeded, 2),
        ]
    );
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_out_of_attempts_stays_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut req = memtest_request(1, GIB);
    req.resources.as_mut().unwrap().max_attempts = 1;
    let job = h
        .client
        .submit_job(req)
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut a = agent(&h, "a", 80, 0).await;
    expect_assign(&mut a).await;
    drop(a);
    let lost = wait_state(&mut h, job.id, JobState::Lost).await;
    assert!(lost.error.contains("no attempts left"), "{}", lost.error);
    assert!(lost.finished_at_ms > 0);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_quick_reconnect_keeps_the_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    let job = submit(&mut h, 1, 1).await;
    let j = expect_assign(&mut a).await;
    a.started(j.id, 1, 5).unwrap();
    wait_state(&mut h, job.id, JobState::Running).await;
    drop(a);
    let mut reg = kiln_coordinator::bench::register("a", 1, 80 * GIB, 0);
    reg.running.push(kiln_proto::v1::RunningJob {
        job_id: job.id,
        attempt: 1,
        pid: 5,
        ended: false,
    });
    // Reconnect (retrying while the old stream is still being torn down).
    let a = loop {
        let ch = kiln_coordinator::bench::channel(&h.server.url)
            .await
            .unwrap();
        match kiln_coordinator::bench::AgentConn::connect(ch, reg.clone()).await {
            Ok(conn) => break conn,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    tokio::time::sleep(std::time::Duration::from_millis(800)).await; // past the lease
    assert_eq!(get(&mut h, job.id).await.state(), JobState::Running);
    a.finished(job.id, 1, JobState::Succeeded).unwrap();
    wait_state(&mut h, job.id, JobState::Succeeded).await;
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_connected_but_silent_agent_loses_its_stream_and_then_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    // Silence limit = lease + 3 × heartbeat = 0.3 + 0.3 s.
    let config = kiln_coordinator::CoordinatorConfig {
        lease_secs: 0.3,
        heartbeat_secs: 0.1,
        ..config(dir.path())
    };
    let mut h = start_with(config).await;
    let mut a = agent(&h, "quiet", 80, 0).await;
    let job = submit(&mut h, 1, 1).await;
    expect_assign(&mut a).await;
    // Never heartbeat: the coordinator closes the stream, then the lease runs out.
    let end = a.recv_timeout(WAIT).await.unwrap();
    assert!(end.is_none(), "expected the stream to end, got {end:?}");
    let requeued = wait_state(&mut h, job.id, JobState::Queued).await;
    assert!(requeued.error.contains("lease"), "{}", requeued.error);
    h.server.stop().await.unwrap();
}
