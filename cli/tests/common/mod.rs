//! A real Kiln cluster for integration tests: the `kiln` binary started as a coordinator and
//! as agents (real processes, real sockets on loopback, real sled files in a temp dir), and
//! helpers that run client verbs with `-o json` and read what they print. Everything is killed
//! when the cluster is dropped.
#![allow(dead_code)]

use serde_json::Value;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Coordinator + agents as child processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub coordinator: Option<Child>,
    pub agents: Vec<(String, Child)>,
    pub lease_secs: u64,
    /// The coordinator's bearer token, passed to every process when set.
    pub token: Option<String>,
}

impl Cluster {
    /// Starts a coordinator with a short lease and waits until it answers.
    pub fn start() -> Cluster {
        Self::start_with_token(None)
    }

    /// Starts a coordinator that requires `token` (when given) from clients and agents.
    pub fn start_with_token(token: Option<&str>) -> Cluster {
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            coordinator: None,
            agents: Vec::new(),
            lease_secs: 2,
            token: token.map(str::to_string),
        };
        c.start_coordinator();
        c
    }

    /// `Command` for the kiln binary with KILN_TOKEN set to the cluster's token (or unset).
    fn command(&self) -> Command {
        let mut cmd = Command::new(kiln_bin());
        match &self.token {
            Some(t) => cmd.env("KILN_TOKEN", t),
            None => cmd.env_remove("KILN_TOKEN"),
        };
        cmd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    /// (Re)starts the coordinator on the same port and data dir.
    pub fn start_coordinator(&mut self) {
        let log = self.log_file("coordinator");
        let child = self
            .command()
            .args(["coordinator", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.dir.path().join("coord"))
            .args(["--lease-secs", &self.lease_secs.to_string()])
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.kiln(&["agents", "-o", "json"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "coordinator did not come up: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the coordinator (no chance to flush anything).
    pub fn kill9_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts a CPU agent offering `mem_gb` GiB of host memory and waits until it is READY.
    pub fn start_agent(&mut self, name: &str, mem_gb: f64) {
        self.start_agent_with(name, mem_gb, &[]);
    }

    /// The same, with extra `kiln agent` flags.
    pub fn start_agent_with(&mut self, name: &str, mem_gb: f64, extra: &[&str]) {
        let log = self.log_file(&format!("agent-{name}"));
        let child = self
            .command()
            .args([
                "agent",
                "--coordinator",
                &self.url(),
                "--name",
                name,
                "--gpus",
                "none",
            ])
            .args(["--mem-limit-gb", &mem_gb.to_string(), "--poll-secs", "0.1"])
            // Relative, as in the README's quick start (the default is `./kiln-agent`): the
            // agent must resolve it once, not in each job's scratch directory.
            .current_dir(self.dir.path())
            .arg("--work-dir")
            .arg(format!("agent-{name}"))
            .args(extra)
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push((name.to_string(), child));
        self.wait_for(Duration::from_secs(20), || {
            let agents = self.json(&["agents"]);
            agents
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == name && a["status"] == "READY")
        });
    }

    /// SIGKILLs an agent process (its job processes die with it: the agent starts them with
    /// `PR_SET_PDEATHSIG`).
    pub fn kill9_agent(&mut self, name: &str) {
        let i = self.agents.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut child) = self.agents.remove(i);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The pid of an agent process.
    pub fn agent_pid(&self, name: &str) -> u32 {
        self.agents.iter().find(|(n, _)| n == name).unwrap().1.id()
    }

    /// Runs `kiln ARGS` against this cluster.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .env("KILN_COORDINATOR", self.url())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `kiln ARGS -o json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.kiln(&a);
        assert!(
            out.status.success(),
            "kiln {a:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kiln {a:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Submits a CPU memtest and returns its id.
    pub fn submit_memtest(&self, gib: f64, budget_gb: f64, hold_secs: f64, extra: &[&str]) -> u64 {
        let gib = gib.to_string();
        let budget = budget_gb.to_string();
        let hold = hold_secs.to_string();
        let mut args = vec![
            "submit",
            "memtest",
            "--gpus",
            "0",
            "--gib",
            &gib,
            "--steps",
            "4",
            "--budget-gb",
            &budget,
            "--hold-secs",
            &hold,
            "--step-pause-secs",
            "0.2",
            "--poll-secs",
            "0.1",
        ];
        args.extend_from_slice(extra);
        let job = self.json(&args);
        job["id"].as_u64().unwrap()
    }

    /// `kiln job ID -o json`.
    pub fn job(&self, id: u64) -> Value {
        self.json(&["job", &id.to_string()])
    }

    /// Waits until job `id` is in `state`, returning the record.
    pub fn wait_state(&self, id: u64, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id);
            if job["state"] == state {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {state}; last record {job:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `cond` until it holds.
    pub fn wait_for(&self, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "condition not met in {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tails of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<_> = text.lines().rev().take(40).collect();
                    s.push_str(&format!("--- {} (last 40 lines)\n", p.display()));
                    for l in tail.into_iter().rev() {
                        s.push_str(l);
                        s.push('\n');
                    }
                }
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            // SIGTERM lets the agent kill its job processes; then make sure.
            // SAFETY: sending a signal to a child we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(300));
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last line of `--follow -o json` output: the final job record (the lines before it
/// are the job's events).
pub fn final_job(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("--follow printed nothing");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

/// Pids of live processes whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command (which may contain spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<_> = rest.split_whitespace().collect();
        let state = fields[0];
        let parent: u32 = fields[1].parse().unwrap();
        if parent == ppid && state != "Z" {
            out.push(pid);
        }
    }
    out
}
