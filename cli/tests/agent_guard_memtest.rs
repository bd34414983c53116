//! memtest jobs through a real agent, real job processes and a real AgentLink stream: one
//! within budget succeeds with phase samples; one over budget with over_secs 0 is KILLED with
//! the guard's record, and the agent goes on to run the next job.

mod agent_harness;

use agent_harness::*;
use kiln_proto::v1::{job_result, JobState};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memtest_within_budget_succeeds_with_phase_samples() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    // A generate session kept from an earlier run is announced at registration.
    std::fs::create_dir_all(dir.path().join("sessions")).unwrap();
    std::fs::write(dir.path().join("sessions/chat-1.session.safetensors"), b"x").unwrap();
    let agent = RunningAgent::start(cpu_agent(&server, dir.path(), "cpu-ok"));
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;
    let reg = &server.registrations()[0];
    assert_eq!(reg.name, "cpu-ok");
    assert!(!reg.nvml && reg.gpus.is_empty());
    assert_eq!(reg.host_mem_bytes, 8 << 30);
    assert!(reg.running.is_empty());
    assert_eq!(reg.sessions, vec!["chat-1".to_string()]);

    server.assign(memtest_job(1, 64 * MIB, 4, 0.5, 1 << 30));
    let pid = server.started_pid(1, T).await;
    let fin = server.finished(1, T).await;
    assert_eq!(fin.state, JobState::Succeeded as i32, "{fin:?}");
    let Some(job_result::Result::Memtest(m)) = fin.result.and_then(|r| r.result) else {
        panic!("memtest result expected")
    };
    assert_eq!((m.allocated_bytes, m.device.as_str()), (64 * MIB, "host"));

    let updates = server.updates(1);
    let phases = phases(&updates);
    let names: Vec<(&str, u32)> = phases.iter().map(|p| (p.phase.as_str(), p.step)).collect();
    assert_eq!(
        names,
        vec![
            ("memtest_step", 1),
            ("memtest_step", 2),
            ("memtest_step", 3),
            ("memtest_step", 4),
            ("memtest_freed", 4)
        ]
    );
    // The agent measured the job's tree at each phase: after the last step it holds 64 MiB.
    let last_step = &phases[3];
    assert!(last_step.pid_mem >= 64 * MIB, "{last_step:?}");
    assert!(last_step.host_rss >= 64 * MIB, "{last_step:?}");
    assert!(last_step.device_total > 0 && last_step.device_used > 0);
    assert!(
        phases[0].pid_mem < last_step.pid_mem,
        "memory grew step by step"
    );
    assert!(fin.peak_mem >= 64 * MIB, "exact peak {}", fin.peak_mem);
    let guard = guard_samples(&updates);
    assert!(!guard.is_empty(), "guard time series relayed");
    assert!(guard.iter().all(|g| g.pid_mem <= fin.peak_mem));
    assert!(
        wait_dead(pid, Duration::from_secs(5)).await,
        "job process gone"
    );
    // The job's scratch directory is cleaned up.
    assert!(!dir.path().join("job-1-a1").exists());
    // Heartbeats flow (the stand-in coordinator asked for one per second).
    server
        .wait_until("a heartbeat", T, |s| {
            s.received().iter().any(|(_, m)| {
                matches!(
                    m.msg,
                    Some(kiln_proto::v1::agent_message::Msg::Heartbeat(_))
                )
            })
        })
        .await;
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memtest_over_budget_is_killed_and_the_agent_runs_the_next_job() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let agent = RunningAgent::start(cpu_agent(&server, dir.path(), "cpu-guard"));
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;

    // 512 MiB in 64 MiB steps against a 160 MiB budget, over_secs 0.
    let limit = 160 * MIB;
    server.assign(memtest_job(2, 512 * MIB, 8, 5.0, limit));
    let pid = server.started_pid(2, T).await;
    let fin = server.finished(2, T).await;
    assert_eq!(fin.state, JobState::Killed as i32, "{fin:?}");
    let kill = fin.kill.clone().expect("kill record");
    assert_eq!(kill.pid, pid);
    assert_eq!(kill.limit, limit);
    assert!(kill.pid_mem > limit, "{kill:?}");
    assert!(
        kill.pid_mem < 512 * MIB,
        "killed before the job got everything: {kill:?}"
    );
    assert!(kill.total_mem > 0 && kill.at_ms > 0);
    assert_eq!(
        kill.phase, "memtest_step",
        "the last phase the job reported"
    );
    assert!(fin.peak_mem >= kill.pid_mem);
    // Logged exactly the same way, and the sample at the kill was sent.
    let line = kiln_agent::kill_line(&kill);
    assert_eq!(
        line,
        format!(
            "guard: killed pid {}: pid_mem {} > limit {} (device used {}) in phase memtest_step",
            kill.pid,
            kiln_proto::human_bytes(kill.pid_mem),
            kiln_proto::human_bytes(kill.limit),
            kiln_proto::human_bytes(kill.total_mem),
        )
    );
    assert_eq!(fin.error, line);
    let updates = server.updates(2);
    assert!(
        logs(&updates).contains(&("agent".to_string(), line.clone())),
        "{:?}",
        logs(&updates)
    );
    assert_eq!(
        guard_samples(&updates).last().map(|g| g.pid_mem),
        Some(kill.pid_mem)
    );
    assert!(
        wait_dead(pid, Duration::from_secs(5)).await,
        "killed process gone"
    );
    // No memtest_freed: it never got there.
    assert!(phases(&updates).iter().all(|p| p.phase == "memtest_step"));

    // The agent is still there and runs the next job.
    assert!(!agent.task.is_finished());
    server.assign(memtest_job(3, 8 * MIB, 2, 0.0, 1 << 30));
    let fin = server.finished(3, T).await;
    assert_eq!(fin.state, JobState::Succeeded as i32, "{fin:?}");
    agent.shutdown().await.unwrap();
}
