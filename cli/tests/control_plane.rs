//! The control plane end to end, with real processes: `kiln coordinator`, `kiln agent` (CPU
//! agents: host memory stands in for GPU memory, the guard reads /proc) and client verbs.

mod common;

use common::{children_of, Cluster};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn memtest_succeeds_with_phase_samples_in_telemetry() {
    let mut c = Cluster::start();
    c.start_agent("a1", 2.0);
    let out = c.kiln(&[
        "submit",
        "memtest",
        "--gpus",
        "0",
        "--gib",
        "0.125",
        "--steps",
        "2",
        "--budget-gb",
        "1",
        "--hold-secs",
        "0.2",
        "--follow",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "follow exited non-zero: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --follow -o json prints one JSON document per line: events, then the final job.
    let last = common::final_job(&out);
    assert_eq!(last["state"], "SUCCEEDED", "{last:#}");
    assert_eq!(last["attempt"], 1);
    assert_eq!(last["kind"], "MEMTEST");
    let id = last["id"].as_u64().unwrap();
    let rows = c.json(&["telemetry", &id.to_string()]);
    let rows = rows.as_array().unwrap();
    let steps: Vec<_> = rows
        .iter()
        .filter(|r| r["phase"] == "memtest_step")
        .collect();
    assert_eq!(steps.len(), 2, "one phase sample per step: {rows:#?}");
    for r in &steps {
        assert!(r["pid_mem"].as_u64().unwrap() > 0, "{r:#}");
        assert!(r["device_total"].as_u64().unwrap() > 0, "{r:#}");
        assert!(r["device_used"].as_u64().is_some(), "{r:#}");
    }
    // The second step holds twice the memory of the first.
    assert!(steps[1]["pid_mem"].as_u64() > steps[0]["pid_mem"].as_u64());
    // --plot draws the guard's series and the phases to a real PNG.
    let png = c.dir.path().join("mem.png");
    let out = c.kiln(&[
        "telemetry",
        &id.to_string(),
        "--plot",
        png.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "not a drawn PNG"
    );
    let csv = c.kiln(&["telemetry", &id.to_string(), "-o", "csv"]);
    assert!(String::from_utf8_lossy(&csv.stdout).starts_with("job_id,attempt,agent"));
}

#[test]
fn memtest_over_budget_is_killed_and_the_agent_lives_on() {
    let mut c = Cluster::start();
    c.start_agent("a1", 4.0);
    let out = c.kiln(&[
        "submit",
        "memtest",
        "--gpus",
        "0",
        "--gib",
        "1",
        "--steps",
        "4",
        "--budget-gb",
        "0.3",
        "--over-secs",
        "0",
        "--poll-secs",
        "0.1",
        "--step-pause-secs",
        "0.3",
        "--hold-secs",
        "2",
        "--follow",
        "-o",
        "json",
    ]);
    assert!(
        !out.status.success(),
        "a killed job must make --follow exit non-zero"
    );
    let job = common::final_job(&out);
    assert_eq!(job["state"], "KILLED", "{job:#}");
    let kill = &job["kill"];
    let (pid_mem, limit) = (
        kill["pid_mem"].as_u64().unwrap(),
        kill["limit"].as_u64().unwrap(),
    );
    assert!(
        pid_mem > limit,
        "pid_mem {pid_mem} must exceed limit {limit}"
    );
    assert_eq!(limit, (0.3f64 * (1u64 << 30) as f64).round() as u64);
    assert!(kill["pid"].as_u64().unwrap() > 0);
    assert!(kill["total_mem"].as_u64().unwrap() >= pid_mem);
    assert!(
        kill["phase"].as_str().unwrap().starts_with("memtest"),
        "{kill:#}"
    );
    // The killed job's chart (the kill marked on it); into a missing directory, a plain error.
    let killed = job["id"].as_u64().unwrap().to_string();
    let svg = c.dir.path().join("killed.svg");
    let out = c.kiln(&["telemetry", &killed, "--plot", svg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawn.contains("KILLED") && drawn.contains("guard kill"),
        "kill not marked"
    );
    let missing = c.dir.path().join("no-such-dir/mem.png");
    let out = c.kiln(&["telemetry", &killed, "--plot", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot write") && err.contains("no such directory"),
        "{err}"
    );
    // The agent survived and runs the next job.
    let id = c.submit_memtest(0.05, 1.0, 0.0, &[]);
    c.wait_state(id, "SUCCEEDED", T);
}

#[test]
fn jobs_that_fit_share_capacity_and_a_third_waits() {
    let mut c = Cluster::start();
    c.start_agent("a1", 1.0);
    let ids: Vec<u64> = (0..3)
        .map(|_| c.submit_memtest(0.05, 0.45, 3.0, &[]))
        .collect();
    c.wait_for(T, || {
        let running = c.json(&["jobs", "--state", "RUNNING"]);
        running.as_array().unwrap().len() == 2
    });
    let queued = c.json(&["jobs", "--state", "QUEUED"]);
    assert_eq!(queued.as_array().unwrap().len(), 1, "{queued:#}");
    for id in ids {
        c.wait_state(id, "SUCCEEDED", T);
    }
}

#[test]
fn impossible_budget_is_rejected_at_submit() {
    let mut c = Cluster::start();
    c.start_agent("a1", 1.0);
    let out = c.kiln(&[
        "submit",
        "memtest",
        "--gpus",
        "0",
        "--gib",
        "0.1",
        "--budget-gb",
        "500",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resource exhausted"), "{err}");
    let jobs = c.json(&["jobs"]);
    assert!(
        jobs.as_array().unwrap().is_empty(),
        "a rejected job must not be stored"
    );
}

#[test]
fn unknown_job_id_is_not_found() {
    let c = Cluster::start();
    for verb in ["job", "cancel", "watch", "telemetry"] {
        let out = c.kiln(&[verb, "424242"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not found"), "kiln {verb}: {err}");
    }
}

/// A loopback server that answers every connection with a plain HTTP/1.1 error, as a web
/// server at the wrong port would; returns its address.
fn plain_http_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            // Keep the connection open (keep-alive) until the client gives up on it.
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    addr.to_string()
}

#[test]
fn addresses_are_forgiving_and_wrong_ones_are_named() {
    let c = Cluster::start();
    // host:port without a scheme reaches the coordinator.
    let hostport = c.url().trim_start_matches("http://").to_string();
    let out = c.kiln(&["agents", "--coordinator", &hostport]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Something that is not a coordinator is called that, once, without "error: error:".
    let http = plain_http_server();
    let out = c.kiln(&["jobs", "--coordinator", &http]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // (Which of the two messages depends on whether the HTTP/1 answer arrived before the
    // call was sent; both name the likely cause.)
    assert!(err.contains("not a Kiln coordinator"), "{err}");
    assert!(!err.contains("error: error"), "{err}");
    // An agent pointed at it stops with that error instead of retrying forever.
    let out = std::process::Command::new(common::kiln_bin())
        .args([
            "agent",
            "--gpus",
            "none",
            "--coordinator",
            &http,
            "--work-dir",
        ])
        .arg(c.dir.path().join("wrong-agent"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("not a Kiln coordinator"), "{err}");
}

#[test]
fn a_closed_stdout_ends_a_verb_quietly() {
    let mut c = Cluster::start();
    c.start_agent("cpu-pipe", 2.0);
    let id = c.submit_memtest(0.01, 0.5, 0.0, &[]);
    c.wait_state(id, "SUCCEEDED", T);
    // `kiln watch ID -o json | head -0`: the reader is gone before the first line.
    let mut child = std::process::Command::new(common::kiln_bin())
        .args([
            "watch",
            &id.to_string(),
            "-o",
            "json",
            "--coordinator",
            &c.url(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cancel_of_a_running_job_kills_its_process() {
    let mut c = Cluster::start();
    c.start_agent("a1", 2.0);
    let id = c.submit_memtest(0.05, 0.5, 60.0, &[]);
    c.wait_state(id, "RUNNING", T);
    let agent_pid = c.agent_pid("a1");
    c.wait_for(T, || !children_of(agent_pid).is_empty());
    let job = c.json(&["cancel", &id.to_string()]);
    assert_eq!(job["state"], "CANCELLED");
    c.wait_for(Duration::from_secs(10), || {
        children_of(agent_pid).is_empty()
    });
    // Cancelling again is a precondition failure, not a silent success.
    let out = c.kiln(&["cancel", &id.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed precondition"));
}

#[test]
fn cancel_of_a_queued_job() {
    let mut c = Cluster::start();
    c.start_agent("a1", 0.5);
    let blocker = c.submit_memtest(0.05, 0.45, 5.0, &[]);
    c.wait_state(blocker, "RUNNING", T);
    let queued = c.submit_memtest(0.05, 0.45, 0.0, &[]);
    assert_eq!(c.job(queued)["state"], "QUEUED");
    assert_eq!(
        c.json(&["cancel", &queued.to_string()])["state"],
        "CANCELLED"
    );
    c.wait_state(blocker, "SUCCEEDED", T);
    assert_eq!(
        c.job(queued)["state"],
        "CANCELLED",
        "a cancelled job must never run"
    );
}

#[test]
fn coordinator_kill9_loses_nothing_and_reconciles_the_running_job() {
    let mut c = Cluster::start();
    c.start_agent("a1", 1.0);
    // One long job fills the agent; the others queue behind it.
    let running = c.submit_memtest(0.05, 0.9, 4.0, &[]);
    c.wait_state(running, "RUNNING", T);
    let queued: Vec<u64> = (0..5)
        .map(|_| c.submit_memtest(0.02, 0.9, 0.0, &[]))
        .collect();
    c.kill9_coordinator();
    c.start_coordinator();
    // Every acknowledged job is there.
    for id in queued.iter().chain([&running]) {
        let job = c.job(*id);
        assert_ne!(job["state"], "LOST", "{job:#}");
    }
    // The running job is reconciled with its agent (same attempt) and finishes.
    let job = c.wait_state(running, "SUCCEEDED", T);
    assert_eq!(
        job["attempt"], 1,
        "the agent reconnected in time; no retry was needed"
    );
    for id in queued {
        c.wait_state(id, "SUCCEEDED", T);
    }
}

#[test]
fn a_dead_agents_job_is_lost_then_retried_on_another_agent() {
    let mut c = Cluster::start();
    c.start_agent("a1", 1.0);
    let id = c.submit_memtest(0.05, 0.5, 3.0, &[]);
    let job = c.wait_state(id, "RUNNING", T);
    assert_eq!(job["agent"], "a1");
    c.kill9_agent("a1");
    c.start_agent("a2", 1.0);
    // Lease runs out → LOST → requeued as attempt 2 → placed on a2.
    c.wait_for(T, || {
        let j = c.job(id);
        j["attempt"] == 2 && j["agent"] == "a2"
    });
    // It finishes there, and the event log shows the loss.
    let out = c.kiln(&["watch", &id.to_string(), "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("\"LOST\""), "{log}");
    assert_eq!(c.job(id)["state"], "SUCCEEDED");
}

#[test]
fn drained_agent_gets_no_new_jobs() {
    let mut c = Cluster::start();
    c.start_agent("a1", 1.0);
    let agent = c.json(&["drain", "a1"]);
    assert_eq!(agent["status"], "DRAINING");
    let id = c.submit_memtest(0.02, 0.2, 0.0, &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.job(id)["state"], "QUEUED");
    c.start_agent("a2", 1.0);
    let job = c.wait_state(id, "SUCCEEDED", T);
    assert_eq!(job["agent"], "a2");
    let out = c.kiln(&["drain", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn a_resumed_agent_gets_jobs_again() {
    let mut c = Cluster::start();
    c.start_agent("a1", 1.0);
    assert_eq!(c.json(&["drain", "a1"])["status"], "DRAINING");
    let id = c.submit_memtest(0.02, 0.2, 0.0, &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.job(id)["state"], "QUEUED");
    let agent = c.json(&["drain", "--resume", "a1"]);
    assert_eq!(agent["status"], "READY");
    let job = c.wait_state(id, "SUCCEEDED", T);
    assert_eq!(job["agent"], "a1");
}

#[test]
fn a_coordinator_with_a_token_refuses_calls_without_it() {
    let mut c = Cluster::start_with_token(Some("s3cret"));
    c.start_agent("a1", 1.0); // the agent passes the token too, or it could not register
    let id = c.submit_memtest(0.02, 0.5, 0.0, &[]);
    c.wait_state(id, "SUCCEEDED", T);
    let mut anonymous = std::process::Command::new(common::kiln_bin());
    let out = anonymous
        .args(["jobs", "--coordinator", &c.url()])
        .env_remove("KILN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthenticated"));
    let wrong = std::process::Command::new(common::kiln_bin())
        .args(["jobs", "--coordinator", &c.url(), "--token", "nope"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong token"));
}
