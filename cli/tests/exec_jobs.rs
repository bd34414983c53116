//! Exec jobs end to end with real processes: a coordinator, CPU agents started with and
//! without `--allow-exec`, user commands (shell and Python) that report phases from inside
//! with `kiln phase` and the stdlib Python helper, the guard killing one that goes over its
//! budget, exit codes and signals, cancel with a grace period reaching a grandchild, logs
//! kept and capped.

mod common;

use common::{kiln_bin, Cluster};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// `kiln submit exec --gpus 0 … -- COMMAND…`; returns the job id.
fn submit_exec(c: &Cluster, flags: &[&str], command: &[&str]) -> u64 {
    let mut args = vec![
        "submit",
        "exec",
        "--gpus",
        "0",
        "--poll-secs",
        "0.1",
        "-o",
        "json",
    ];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(command);
    let out = c.kiln(&args);
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    job["id"].as_u64().unwrap()
}

/// A shell command line that runs `kiln phase` with these arguments.
fn phase(args: &str) -> String {
    format!("{} phase {args}", kiln_bin().display())
}

fn exec_cluster(mem_gb: f64) -> Cluster {
    let mut c = Cluster::start();
    c.start_agent_with("exec-1", mem_gb, &["--allow-exec", "--log-cap-mib", "0.05"]);
    c
}

#[test]
fn a_command_reports_phases_from_inside_and_succeeds() {
    let c = exec_cluster(4.0);
    let script = format!(
        "echo starting; {}; \
         python3 -c 'x = bytearray(96 << 20); open(\"ready\", \"w\").close(); import time; time.sleep(2)' & \
         while [ ! -e ready ]; do sleep 0.05; done; {}; wait; echo done >&2",
        phase("model_loaded --metric loss=1.5 --bytes weights=4096"),
        phase("forward_done --step 1"),
    );
    let id = submit_exec(&c, &["--budget-gb", "1"], &["sh", "-c", &script]);
    let job = c.wait_state(id, "SUCCEEDED", T);
    assert_eq!(job["kind"], "EXEC");
    assert_eq!(job["result"]["exit_code"], 0, "{job:#}");
    // Both phases, each completed with the agent's reading of the job's whole tree: the
    // second one while the Python child held 96 MiB.
    let rows = c.json(&["telemetry", &id.to_string()]);
    let phases: Vec<&serde_json::Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["source"] == "phase")
        .collect();
    let names: Vec<&str> = phases
        .iter()
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["model_loaded", "forward_done"], "{rows:#}");
    assert!(phases.iter().all(|r| r["pid_mem"].as_u64().unwrap() > 0));
    assert!(
        phases[1]["pid_mem"].as_u64().unwrap() > 96 << 20,
        "{:#}",
        phases[1]
    );
    assert_eq!(
        phases[0]["tensor_bytes"]["weights"], 4096,
        "{:#}",
        phases[0]
    );
    assert_eq!(phases[0]["metrics"]["loss"], 1.5, "{:#}", phases[0]);
    // Its output is the job's log.
    let logs = c.kiln(&["logs", &id.to_string()]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("starting") && text.contains("done"), "{text}");
    let tail = c.kiln(&["logs", &id.to_string(), "--tail", "1"]);
    assert_eq!(String::from_utf8_lossy(&tail.stdout).lines().count(), 1);
}

#[test]
fn the_python_helper_reports_phases() {
    let c = exec_cluster(4.0);
    let helper = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    let code = "import kiln_phase, sys\n\
                kiln_phase.phase('model_loaded', bytes={'weights': 1 << 20})\n\
                kiln_phase.phase('optimizer_done', step=3, metrics={'loss': 0.25})\n\
                print('reported')";
    let id = submit_exec(
        &c,
        &["--budget-gb", "1", "--env", &format!("PYTHONPATH={helper}")],
        &["python3", "-c", code],
    );
    c.wait_state(id, "SUCCEEDED", T);
    let rows = c.json(&["telemetry", &id.to_string(), "--phase", "optimizer_done"]);
    let row = &rows.as_array().unwrap()[0];
    assert_eq!(
        (row["step"].as_u64(), row["metrics"]["loss"].as_f64()),
        (Some(3), Some(0.25))
    );
    // Outside a job the helper and the verb say so and fail.
    let out = std::process::Command::new("python3")
        .args(["-c", "import kiln_phase; kiln_phase.phase('x')"])
        .env("PYTHONPATH", helper)
        .env_remove("KILN_PHASE_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a Kiln exec job"));
    let out = c.kiln(&["phase", "model_loaded"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a Kiln exec job"));
}

#[test]
fn over_budget_is_killed_and_failures_say_why() {
    let c = exec_cluster(4.0);
    let hog = submit_exec(
        &c,
        &["--budget-gb", "0.1"],
        &[
            "python3",
            "-c",
            "x = bytearray(400 << 20); import time; time.sleep(30)",
        ],
    );
    let job = c.wait_state(hog, "KILLED", T);
    assert!(job["kill"]["pid_mem"].as_u64().unwrap() > job["kill"]["limit"].as_u64().unwrap());
    let exit3 = submit_exec(
        &c,
        &["--budget-gb", "0.5"],
        &["sh", "-c", "echo oops >&2; exit 3"],
    );
    let job = c.wait_state(exit3, "FAILED", T);
    assert_eq!(
        job["error"], "the command exited with status 3; last stderr line: oops",
        "{job:#}"
    );
    let missing = submit_exec(&c, &["--budget-gb", "0.5"], &["no-such-command-kiln"]);
    let job = c.wait_state(missing, "FAILED", T);
    assert!(
        job["error"].as_str().unwrap().contains("not found"),
        "{job:#}"
    );
    let segv = submit_exec(&c, &["--budget-gb", "0.5"], &["sh", "-c", "kill -SEGV $$"]);
    let job = c.wait_state(segv, "FAILED", T);
    assert!(
        job["error"].as_str().unwrap().contains("SIGSEGV"),
        "{job:#}"
    );
    // A working directory that does not exist on the agent.
    let nowhere = submit_exec(
        &c,
        &["--budget-gb", "0.5", "--workdir", "/no/such/dir"],
        &["true"],
    );
    let job = c.wait_state(nowhere, "FAILED", T);
    assert!(
        job["error"].as_str().unwrap().contains("/no/such/dir"),
        "{job:#}"
    );
}

#[test]
fn cancel_terms_then_kills_the_tree_and_logs_are_capped() {
    let c = exec_cluster(4.0);
    let pids = tempfile::tempdir().unwrap();
    // The command ignores SIGTERM and leaves a grandchild: after the grace period both die.
    let script = format!(
        "trap '' TERM; sleep 300 & echo $! > {d}/grandchild; echo $$ > {d}/leader; wait",
        d = pids.path().display()
    );
    let id = submit_exec(
        &c,
        &["--budget-gb", "0.5", "--grace-secs", "3"],
        &["sh", "-c", &script],
    );
    c.wait_state(id, "RUNNING", T);
    let read = |f: &str| -> u32 {
        let path = pids.path().join(f);
        c.wait_for(T, || {
            std::fs::read_to_string(&path).is_ok_and(|s| s.ends_with('\n'))
        });
        std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (leader, grandchild) = (read("leader"), read("grandchild"));
    let out = c.kiln(&["cancel", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_state(id, "CANCELLED", T);
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
    };
    // SIGTERM first: the command ignores it and lives on within its grace period…
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alive(leader) && alive(grandchild),
        "killed before its grace period ended"
    );
    // …then SIGKILL takes the whole tree.
    c.wait_for(Duration::from_secs(15), || {
        !alive(leader) && !alive(grandchild)
    });

    // 0.05 MiB of log per job on this agent: the rest is dropped with a note.
    let noisy = submit_exec(
        &c,
        &["--budget-gb", "0.5"],
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done",
        ],
    );
    c.wait_state(noisy, "SUCCEEDED", T);
    let logs = String::from_utf8_lossy(&c.kiln(&["logs", &noisy.to_string()]).stdout).to_string();
    assert!(
        logs.contains("line-0") && !logs.contains("line-19999"),
        "not capped"
    );
    assert!(logs.contains("log cap"), "no note of the cap");
}

#[test]
fn only_agents_that_allow_exec_run_exec_jobs() {
    let mut c = Cluster::start();
    c.start_agent("plain-1", 2.0);
    let out = c.kiln(&[
        "submit",
        "exec",
        "--gpus",
        "0",
        "--budget-gb",
        "0.5",
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--allow-exec"), "{err}");
    // With one exec agent too, exec jobs go there and nowhere else.
    c.start_agent_with("exec-2", 2.0, &["--allow-exec"]);
    let id = submit_exec(&c, &["--budget-gb", "0.5"], &["true"]);
    let job = c.wait_state(id, "SUCCEEDED", T);
    assert_eq!(job["agent"], "exec-2");
    let agents = c.json(&["agents"]);
    let allow: Vec<(String, bool)> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["allow_exec"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(allow.contains(&("plain-1".into(), false)) && allow.contains(&("exec-2".into(), true)));
}

#[test]
fn a_killed_job_retries_with_a_grown_budget_and_keeps_every_attempt() {
    let c = exec_cluster(4.0);
    let id = submit_exec(
        &c,
        &[
            "--budget-gb",
            "0.2",
            "--on-kill",
            "grow=3",
            "--max-attempts",
            "3",
        ],
        &[
            "python3",
            "-c",
            "x = bytearray(320 << 20); import time; time.sleep(0.5)",
        ],
    );
    let job = c.wait_state(id, "SUCCEEDED", T);
    assert_eq!(job["attempt"], 2, "{job:#}");
    let gib = 1u64 << 30;
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    assert_eq!(attempts[0]["state"], "KILLED");
    assert_eq!(
        attempts[0]["budget_bytes"],
        (0.2 * gib as f64).round() as u64
    );
    assert!(
        attempts[0]["kill"]["pid_mem"].as_u64().unwrap()
            > attempts[0]["budget_bytes"].as_u64().unwrap()
    );
    assert_eq!(attempts[1]["state"], "SUCCEEDED");
    let first = attempts[0]["budget_bytes"].as_u64().unwrap();
    assert_eq!(attempts[1]["budget_bytes"], first * 3, "grown ×3");
    assert_eq!(job["budget_bytes"], attempts[1]["budget_bytes"]);
    // The human view lists both attempts.
    let shown = String::from_utf8_lossy(&c.kiln(&["job", &id.to_string()]).stdout).to_string();
    assert!(
        shown.contains("1. KILLED") && shown.contains("2. SUCCEEDED"),
        "{shown}"
    );
    // A cap at the first budget means a kill is final; a bad policy is refused at submit.
    let capped = submit_exec(
        &c,
        &[
            "--budget-gb",
            "0.2",
            "--on-kill",
            "grow=2,max-budget-gb=0.2",
        ],
        &[
            "python3",
            "-c",
            "x = bytearray(320 << 20); import time; time.sleep(0.5)",
        ],
    );
    let job = c.wait_state(capped, "KILLED", T);
    assert_eq!(job["attempt"], 1, "{job:#}");
    let out = c.kiln(&[
        "submit",
        "exec",
        "--gpus",
        "0",
        "--on-kill",
        "grow=0.5",
        "--",
        "true",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than 1"));
}

#[test]
fn exec_user_runs_commands_as_that_user() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut c = Cluster::start();
    if !root {
        // Switching users needs root: the agent refuses to start, saying so.
        let out = c.kiln(&[
            "agent",
            "--gpus",
            "none",
            "--allow-exec",
            "--exec-user",
            "nobody",
        ]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs the agent to run as root"));
        return;
    }
    // The test's directory must be reachable by the unprivileged user, and so must the kiln
    // binary the job runs (`kiln phase`): a copy there, since the checkout holding the build
    // may not be (a `mktemp -d` clone is 0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kiln = c.dir.path().join("kiln");
    std::fs::copy(kiln_bin(), &kiln).unwrap();
    std::fs::set_permissions(&kiln, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.start_agent_with(
        "exec-nobody",
        2.0,
        &["--allow-exec", "--exec-user", "nobody"],
    );
    let script = format!("id -u; {} phase as_nobody", kiln.display());
    let id = submit_exec(&c, &["--budget-gb", "0.5"], &["sh", "-c", &script]);
    c.wait_state(id, "SUCCEEDED", T);
    let logs = String::from_utf8_lossy(&c.kiln(&["logs", &id.to_string()]).stdout).to_string();
    let uid: u32 = logs.lines().next().unwrap().trim().parse().unwrap();
    assert_ne!(uid, 0, "{logs}");
    let rows = c.json(&["telemetry", &id.to_string(), "--phase", "as_nobody"]);
    assert_eq!(
        rows.as_array().unwrap().len(),
        1,
        "the phase socket works for that user"
    );
    let out = c.kiln(&[
        "agent",
        "--gpus",
        "none",
        "--allow-exec",
        "--exec-user",
        "no-such-user-kiln",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such user"));
}

#[test]
fn data_roots_keep_jobs_to_their_paths() {
    let mut c = Cluster::start();
    let root = c.dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    c.start_agent_with(
        "rooted",
        2.0,
        &["--allow-exec", "--data-root", root.to_str().unwrap()],
    );
    let outside = submit_exec(&c, &["--budget-gb", "0.5", "--workdir", "/tmp"], &["true"]);
    let job = c.wait_state(outside, "FAILED", T);
    let err = job["error"].as_str().unwrap();
    assert!(err.contains("outside this agent's data roots"), "{err}");
    let inside = submit_exec(
        &c,
        &["--budget-gb", "0.5", "--workdir", root.to_str().unwrap()],
        &["true"],
    );
    c.wait_state(inside, "SUCCEEDED", T);
}
