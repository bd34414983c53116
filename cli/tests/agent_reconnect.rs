//! The coordinator goes away and comes back: the agent reconnects with backoff, re-registers
//! telling which jobs it still runs (with their pids), and a job that finished while the
//! coordinator was down is reported after re-registration instead of being lost.

mod agent_harness;

use agent_harness::*;
use kiln_proto::v1::{agent_message::Msg, job_update::Update, JobState, RunningJob};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_reregisters_running_jobs_and_delivers_queued_ends() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut server = LinkServer::start();
    let agent = RunningAgent::start(cpu_agent(&server, dir.path(), "cpu-reconnect"));
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;

    // A long job, and a short one that will finish while the coordinator is down.
    server.assign(memtest_job(40, 8 * MIB, 1, 300.0, 1 << 30));
    server.assign(memtest_job(41, 8 * MIB, 1, 1.0, 1 << 30));
    let long_pid = server.started_pid(40, T).await;
    let short_pid = server.started_pid(41, T).await;

    server.stop();
    // The short job ends meanwhile; the agent keeps retrying (backoff capped at 0.5 s).
    assert!(
        wait_dead(short_pid, T).await,
        "short job did not end while the coordinator was down"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !agent.task.is_finished(),
        "the agent outlives its coordinator"
    );
    assert!(alive(long_pid), "running jobs survive a lost coordinator");
    server.restart();

    server
        .wait_until("re-registration", T, |s| s.connections() == 2)
        .await;
    let reg = server.registrations().pop().unwrap();
    assert_eq!(
        reg.running,
        vec![
            RunningJob {
                job_id: 40,
                attempt: 1,
                pid: long_pid,
                ended: false,
            },
            // Ended, but the coordinator has not been told yet: still listed.
            RunningJob {
                job_id: 41,
                attempt: 1,
                pid: short_pid,
                ended: true,
            },
        ]
    );
    // The short job's end arrives on the new connection, after the registration.
    let fin = server.finished(41, T).await;
    assert_eq!(fin.state, JobState::Succeeded as i32, "{fin:?}");
    let received = server.received();
    let reg_pos = received
        .iter()
        .rposition(|(_, m)| matches!(m.msg, Some(Msg::Register(_))))
        .unwrap();
    let end_pos = received
        .iter()
        .position(|(_, m)| {
            matches!(&m.msg, Some(Msg::Job(u)) if u.job_id == 41 && matches!(u.update, Some(Update::Finished(_))))
        })
        .unwrap();
    assert!(end_pos > reg_pos, "end sent after re-registering");
    assert_eq!(
        received[end_pos].0, received[reg_pos].0,
        "on the new connection"
    );

    // The long job is still controllable through the new connection.
    server.kill(40, 1, "cancelled after reconnect");
    let fin = server.finished(40, T).await;
    assert_eq!(fin.state, JobState::Cancelled as i32);
    assert!(wait_dead(long_pid, Duration::from_secs(5)).await);
    agent.shutdown().await.unwrap();
}
