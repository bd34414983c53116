//! Many jobs at once on one agent, as a busy box runs them: every job that does its work and
//! exits 0 must end SUCCEEDED with its result (a job's outcome may not depend on how fast the
//! agent drains its output), and no descriptor the agent opened for one job (its stdin, stdout
//! and stderr pipes, the coordinator socket) may leak into another job's process.

mod agent_harness;

use agent_harness::*;
use kiln_proto::v1::{job_result, job_update::Update, AgentMessage, JobFinished, JobState};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Every job's end, by job id, from what the agents sent (one pass over the messages).
fn ends(received: &[(usize, AgentMessage)]) -> HashMap<u64, JobFinished> {
    let mut out = HashMap::new();
    for (_, m) in received {
        if let Some(kiln_proto::v1::agent_message::Msg::Job(u)) = &m.msg {
            if let Some(Update::Finished(f)) = &u.update {
                out.entry(u.job_id).or_insert_with(|| f.clone());
            }
        }
    }
    out
}

/// Waits until `n` jobs have ended; panics with a count (not the whole message log) on timeout.
async fn wait_for_ends(
    server: &LinkServer,
    n: usize,
    timeout: Duration,
) -> HashMap<u64, JobFinished> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ends = ends(&server.received());
        if ends.len() >= n {
            return ends;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} jobs ended within {timeout:?}",
            ends.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_jobs_all_succeed() {
    init_logs();
    const JOBS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let agent = RunningAgent::start(cpu_agent(&server, dir.path(), "cpu-many"));
    server
        .wait_until("registration", Duration::from_secs(60), |s| {
            s.connections() == 1
        })
        .await;
    for id in 1..=JOBS {
        server.assign(memtest_job(id, MIB, 2, 0.3, 256 * MIB));
    }
    let ends = wait_for_ends(&server, JOBS as usize, Duration::from_secs(600)).await;
    let failed: BTreeMap<u64, String> = ends
        .iter()
        .filter(|(_, f)| f.state != JobState::Succeeded as i32)
        .map(|(id, f)| {
            (
                *id,
                format!("{:?}: {}", JobState::try_from(f.state), f.error),
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {JOBS} jobs did not succeed: {failed:#?}",
        failed.len()
    );
    for (id, f) in &ends {
        let Some(job_result::Result::Memtest(m)) = f.result.as_ref().and_then(|r| r.result.clone())
        else {
            panic!("job {id} succeeded without its result: {f:?}")
        };
        assert_eq!(m.allocated_bytes, MIB, "job {id}");
    }
    agent.shutdown().await.unwrap();
}

/// The descriptors open in this test process that a child inherits (no close-on-exec flag):
/// what the environment handed the test, which every child of it has as well.
fn inheritable_fds_of_this_process() -> HashSet<String> {
    let mut out = HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            if let Ok(target) = std::fs::read_link(e.path()) {
                out.insert(format!("{fd} -> {}", target.display()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_descriptor_leaks_into_other_jobs() {
    init_logs();
    const JOBS: u64 = 120;
    let inherited = inheritable_fds_of_this_process();
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let mut config = cpu_agent(&server, dir.path(), "cpu-fds");
    // Each job lists the descriptors it was started with (`ls -l` of the shell's fd directory
    // on stdout, one log line each; no redirection, which would make the shell save a copy of
    // its own stdout), then becomes the real job process.
    config.job_command = vec![
        "/bin/sh".into(),
        "-c".into(),
        r#"ls -l /proc/$$/fd; exec "$0" "$@""#.into(),
    ];
    config.job_command.extend(job_command());
    let agent = RunningAgent::start(config);
    server
        .wait_until("registration", Duration::from_secs(60), |s| {
            s.connections() == 1
        })
        .await;
    for id in 1..=JOBS {
        server.assign(memtest_job(id, MIB, 1, 0.2, 256 * MIB));
    }
    let ends = wait_for_ends(&server, JOBS as usize, Duration::from_secs(600)).await;
    // Each job's own descriptors, from its log lines.
    let mut fds: HashMap<u64, Vec<(u32, String)>> = HashMap::new();
    for (_, m) in server.received() {
        let Some(kiln_proto::v1::agent_message::Msg::Job(u)) = &m.msg else {
            continue;
        };
        let Some(Update::Event(e)) = &u.update else {
            continue;
        };
        let Some(kiln_proto::v1::job_event::Event::Log(l)) = &e.event else {
            continue;
        };
        // `lr-x------ 1 root root 64 Dec  4 07:14 0 -> pipe:[1234]`
        let Some((left, target)) = l.line.split_once(" -> ") else {
            continue;
        };
        let Some(Ok(fd)) = left.split_whitespace().last().map(str::parse::<u32>) else {
            continue;
        };
        if l.stream != "stdout" || !l.line.starts_with('l') {
            continue;
        }
        fds.entry(u.job_id)
            .or_default()
            .push((fd, target.to_string()));
    }
    assert_eq!(fds.len(), JOBS as usize, "every job listed its descriptors");
    // The pipes that are some job's stdin, stdout or stderr.
    let job_pipes: HashMap<String, u64> = fds
        .iter()
        .flat_map(|(id, list)| {
            list.iter()
                .filter(|(fd, _)| *fd <= 2)
                .map(move |(_, t)| (t.clone(), *id))
        })
        .collect();
    for (id, list) in &fds {
        let std: Vec<&String> = list
            .iter()
            .filter(|(fd, _)| *fd <= 2)
            .map(|(_, t)| t)
            .collect();
        assert_eq!(std.len(), 3, "job {id}: {list:?}");
        assert!(
            std.iter().all(|t| t.starts_with("pipe:[")),
            "job {id}: {list:?}"
        );
        for (fd, target) in list.iter().filter(|(fd, _)| *fd > 2) {
            assert!(
                !job_pipes.contains_key(target),
                "job {id} holds fd {fd} -> {target}, a standard stream of job {}",
                job_pipes[target]
            );
            assert!(
                inherited.contains(&format!("{fd} -> {target}")),
                "job {id} holds fd {fd} -> {target}, which the agent opened (inherited from the test: {inherited:?})"
            );
        }
    }
    assert!(ends.values().all(|f| f.state == JobState::Succeeded as i32));
    agent.shutdown().await.unwrap();
}
