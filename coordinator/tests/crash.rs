//! Durability across `kill -9`: a coordinator runs in a child process (this test binary
//! re-executed), is SIGKILLed while clients are submitting and a job is running, and a new
//! coordinator on the same directory must have every acknowledged job and state change.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_coordinator::bench::RunningCoordinator;
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{JobState, ListJobsRequest};

const CHILD_ENV: &str = "KILN_CRASH_CHILD_DIR";

/// In the child process: serve on a loopback port (written to `<dir>/port`) until killed.
#[tokio::test]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // Only does something when re-executed by the test below.
    };
    let dir = std::path::PathBuf::from(dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    std::fs::write(dir.join("port.tmp"), port.to_string()).unwrap();
    std::fs::rename(dir.join("port.tmp"), dir.join("port")).unwrap();
    kiln_coordinator::run(listener, config(&dir.join("data")), std::future::pending())
        .await
        .unwrap();
}

fn spawn_child(dir: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("re-execute the test binary as the coordinator")
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn acknowledged_jobs_and_states_survive_kill_9() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(spawn_child(dir.path()));
    let deadline = Instant::now() + WAIT;
    let port = loop {
        if let Ok(p) = std::fs::read_to_string(dir.path().join("port")) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the child coordinator did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let url = format!("http://127.0.0.1:{port}");
    let ch = kiln_coordinator::bench::channel(&url).await.unwrap();
    let mut client = CoordinatorClient::new(ch.clone());

    // A running job whose RUNNING state was acknowledged (we saw it).
    let reg = kiln_coordinator::bench::register("a", 1, 80 * GIB, 0);
    let mut a = kiln_coordinator::bench::AgentConn::connect(ch.clone(), reg)
        .await
        .unwrap();
    let running = client
        .submit_job(memtest_request(1, 8 * GIB))
        .await
        .unwrap()
        .into_inner();
    let running = running.job.unwrap();
    let j = expect_assign(&mut a).await;
    a.started(j.id, j.attempt, 321).unwrap();
    let deadline = Instant::now() + WAIT;
    while client
        .get_job(kiln_proto::v1::GetJobRequest { id: running.id })
        .await
        .unwrap()
        .into_inner()
        .state()
        != JobState::Running
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Submitters keep going; the coordinator is killed under them.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = CoordinatorClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for _ in 0..10_000 {
                // 80 GiB does not fit next to the running 8 GiB job: these stay QUEUED.
                match c.submit_job(memtest_request(1, 80 * GIB)).await {
                    Ok(r) => acked.push(r.into_inner().job.unwrap().id),
                    Err(_) => break, // the coordinator is gone
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.0.kill().expect("SIGKILL the coordinator");
    child.0.wait().unwrap();
    let mut acked = HashSet::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(
        acked.len() > 10,
        "only {} submits before the kill",
        acked.len()
    );
    eprintln!("{} submits acknowledged before SIGKILL", acked.len());
    drop(a);

    let server = RunningCoordinator::start(config(&dir.path().join("data")))
        .await
        .unwrap();
    let mut client = server.client().await.unwrap();
    let mut listed = HashSet::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_jobs(ListJobsRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.jobs.iter().map(|j| (j.id, j.state())));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let ids: HashSet<u64> = listed.iter().map(|(id, _)| *id).collect();
    let missing: Vec<&u64> = acked.iter().filter(|id| !ids.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged jobs lost: {missing:?}",
        missing.len()
    );
    assert!(
        listed.contains(&(running.id, JobState::Running)),
        "the running job's state is kept"
    );
    server.stop().await.unwrap();
}
