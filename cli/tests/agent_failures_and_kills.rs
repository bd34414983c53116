//! Jobs that go wrong and jobs that are stopped: a crashing job process and a job that reports
//! an error are FAILED with the reason; a Kill from the coordinator ends the whole process group
//! (descendants that left the group too) as CANCELLED; shutting the agent down ends its jobs.

mod agent_harness;

use agent_harness::*;
use kiln_proto::v1::JobState;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_job_fails_with_the_signal_and_the_agent_lives_on() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let mut config = cpu_agent(&server, dir.path(), "cpu-crash");
    config.job_command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "cat > /dev/null; echo 'about to crash' >&2; kill -SEGV $$".into(),
    ];
    let agent = RunningAgent::start(config);
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;
    server.assign(memtest_job(10, MIB, 1, 0.0, 1 << 30));
    let fin = server.finished(10, T).await;
    assert_eq!(fin.state, JobState::Failed as i32, "{fin:?}");
    assert_eq!(
        fin.error,
        "job process crashed: killed by signal 11 (SIGSEGV); last stderr line: about to crash"
    );
    assert!(logs(&server.updates(10)).contains(&("stderr".into(), "about to crash".into())));
    // A second crash: the agent is unaffected.
    server.assign(memtest_job(11, MIB, 1, 0.0, 1 << 30));
    let fin = server.finished(11, T).await;
    assert_eq!(fin.state, JobState::Failed as i32);
    assert!(!agent.task.is_finished());
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_error_report_fails_the_job_with_its_message() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let agent = RunningAgent::start(cpu_agent(&server, dir.path(), "cpu-error"));
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;
    // The job process reports an error (a model that is not there): the job fails with it.
    let mut job = memtest_job(12, MIB, 1, 0.0, 1 << 30);
    job.kind = kiln_proto::v1::JobKind::Generate as i32;
    job.spec = Some(kiln_proto::v1::JobSpec {
        spec: Some(kiln_proto::v1::job_spec::Spec::Generate(
            kiln_proto::v1::GenerateSpec {
                model: "/no/such/model-kiln".into(),
                prompt: "hi".into(),
                max_tokens: 4,
                ..Default::default()
            },
        )),
    });
    server.assign(job);
    let fin = server.finished(12, T).await;
    assert_eq!(fin.state, JobState::Failed as i32);
    assert!(
        fin.error.starts_with("generate: ") && fin.error.contains("/no/such/model-kiln"),
        "{}",
        fin.error
    );
    // An invalid spec (steps 0) is refused by the agent's own check, naming the field.
    server.assign(memtest_job(14, MIB, 0, 0.0, 1 << 30));
    let fin = server.finished(14, T).await;
    assert_eq!(fin.state, JobState::Failed as i32);
    assert!(fin.error.contains("memtest.steps = 0"), "{}", fin.error);
    // A spec the agent cannot translate fails before any process starts, with the reason.
    let mut job = memtest_job(13, MIB, 1, 0.0, 1 << 30);
    job.spec = Some(kiln_proto::v1::JobSpec {
        spec: Some(kiln_proto::v1::job_spec::Spec::Export(
            kiln_proto::v1::ExportSpec {
                checkpoint: "tiny".into(),
                format: "gguf".into(),
                out_dir: dir.path().join("out").display().to_string(),
            },
        )),
    });
    job.kind = kiln_proto::v1::JobKind::Export as i32;
    server.assign(job);
    let fin = server.finished(13, T).await;
    assert_eq!(fin.state, JobState::Failed as i32);
    assert!(fin.error.contains("gguf"), "{}", fin.error);
    let started = server.updates(13).iter().any(|u| {
        matches!(
            u.update,
            Some(kiln_proto::v1::job_update::Update::Started(_))
        )
    });
    assert!(!started, "no process for an untranslatable spec");
    agent.shutdown().await.unwrap();
}

/// Reads a pid the job's wrapper script wrote into its work directory.
async fn read_pid(path: &std::path::Path) -> u32 {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no pid in {path:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_from_the_coordinator_ends_the_whole_process_group() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let pids = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let mut config = cpu_agent(&server, dir.path(), "cpu-kill");
    // The job starts two grandchildren (one in its group, one that left it with setsid), then
    // becomes the real job process.
    config.job_command = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "sleep 300 & echo $! > {d}/in-group; setsid sleep 300 & echo $! > {d}/escaped; exec \"$0\" \"$@\"",
            d = pids.path().display()
        )
        .into(),
    ];
    config.job_command.extend(job_command());
    let agent = RunningAgent::start(config);
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;
    server.assign(memtest_job(20, 16 * MIB, 2, 300.0, 1 << 30));
    let pid = server.started_pid(20, T).await;
    let in_group = read_pid(&pids.path().join("in-group")).await;
    let escaped = read_pid(&pids.path().join("escaped")).await;
    server
        .wait_until("the job's first phase", T, |s| {
            !phases(&s.updates(20)).is_empty()
        })
        .await;
    assert!(alive(pid) && alive(in_group) && alive(escaped));

    server.kill(20, 1, "cancelled by user");
    let fin = server.finished(20, T).await;
    assert_eq!(fin.state, JobState::Cancelled as i32, "{fin:?}");
    assert_eq!(fin.error, "cancelled by user");
    for p in [pid, in_group, escaped] {
        assert!(
            wait_dead(p, Duration::from_secs(5)).await,
            "pid {p} survived the kill"
        );
    }
    // A kill for a job the agent does not run is ignored.
    server.kill(999, 1, "stale attempt");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!agent.task.is_finished());
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_kills_its_jobs_and_reports_them() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let agent = RunningAgent::start(cpu_agent(&server, dir.path(), "cpu-shutdown"));
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;
    server.assign(memtest_job(30, 8 * MIB, 1, 300.0, 1 << 30));
    let pid = server.started_pid(30, T).await;
    agent.shutdown().await.unwrap();
    assert!(
        wait_dead(pid, Duration::from_secs(5)).await,
        "job outlived the agent"
    );
    let fin = server.finished(30, T).await;
    assert_eq!(fin.state, JobState::Cancelled as i32);
    assert_eq!(fin.error, "agent shutting down");
}
