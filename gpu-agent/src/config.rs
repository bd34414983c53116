//! The agent's configuration ([`AgentConfig`]) and which GPUs it offers ([`GpuSelection`]).

use std::ffi::OsString;
use std::path::PathBuf;

/// Which GPUs the agent offers to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuSelection {
    /// Every GPU NVML reports; a CPU agent when NVML is unavailable.
    #[default]
    All,
    /// No GPUs: a CPU agent even on a GPU box.
    None,
    /// These NVML indices (NVML must work and every index must exist).
    List(Vec<u32>),
}

impl std::str::FromStr for GpuSelection {
    type Err = String;

    /// Parses `all`, `none` or a list of NVML indices like `0,2`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => Ok(Self::All),
            "none" | "" => Ok(Self::None),
            list => list
                .split(',')
                .map(|p| p.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .map(Self::List)
                .map_err(|_| {
                    format!("--gpus {list:?}: expected all, none or NVML indices like 0,2")
                }),
        }
    }
}

/// Everything the agent needs to run. `Default` gives a local agent: coordinator on
/// `http://127.0.0.1:7070`, named after the host, all GPUs, job processes started as
/// `<this executable> job-exec`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator URL the agent dials (`http://host:port`).
    pub coordinator: String,
    /// Agent name, unique among agents (default: the host name).
    pub name: String,
    /// GPUs to offer.
    pub gpus: GpuSelection,
    /// Caps each GPU's reported capacity at this many bytes (`--gpu-limit-gb`); `None` = the
    /// GPU's full memory.
    pub gpu_limit_bytes: Option<u64>,
    /// Host memory offered to CPU jobs (`--mem-limit-gb`); `None` = the host's MemTotal.
    pub mem_limit_bytes: Option<u64>,
    /// Seconds between guard polls when a job does not ask for its own (default 0.5).
    pub poll_secs: f64,
    /// Seconds over budget before the guard kills, when a job does not ask for its own
    /// (0 = at the first sample over; the default).
    pub over_secs: f64,
    /// Program and leading arguments of the job process; the agent writes the job request to
    /// its stdin. The `kiln` CLI passes `[current_exe, "job-exec"]`.
    pub job_command: Vec<OsString>,
    /// Directory under which each job attempt gets its own scratch directory.
    pub work_dir: PathBuf,
    /// First delay before reconnecting to a coordinator that went away (seconds).
    pub reconnect_min_secs: f64,
    /// Largest delay between reconnect attempts (seconds); delays double up to it.
    pub reconnect_max_secs: f64,
    /// Seconds between heartbeats when the coordinator does not say (its `Registered` wins).
    pub heartbeat_secs: f64,
    /// Byte budget of the generate sessions kept between jobs in `work_dir/sessions`
    /// (0 = the engine's default, 1 GiB); least recently used sessions are evicted beyond it.
    pub sessions_budget_bytes: u64,
    /// Most job updates kept while the coordinator is unreachable; beyond it the oldest log,
    /// phase and guard updates are dropped (job starts and ends never are).
    pub outbox_capacity: usize,
    /// Bearer token the coordinator requires (its `token` setting), if any.
    pub token: Option<String>,
    /// Run exec jobs (any command a user submits) on this box.
    pub allow_exec: bool,
    /// Log bytes (stdout + stderr lines) kept per job; output beyond it is dropped with a note.
    pub log_cap_bytes: u64,
    /// Run exec jobs as this user (and its primary group) instead of the agent's user; only an
    /// agent running as root can.
    pub exec_user: Option<String>,
    /// When not empty, every host path a job names must lie under one of these directories.
    pub data_roots: Vec<PathBuf>,
}

/// An account exec jobs run as: resolved once at agent start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl ExecUser {
    /// Looks `name` up in the system's user database; the agent must run as root to switch.
    pub fn resolve(name: &str) -> Result<Self, crate::AgentError> {
        let bad = |m: String| crate::AgentError::InvalidConfig(m);
        let c = std::ffi::CString::new(name)
            .map_err(|_| bad(format!("--exec-user {name:?} holds a NUL byte")))?;
        // SAFETY: getpwnam reads the user database; the result is used before any other call
        // that could overwrite its static buffer (the agent resolves this once, at start).
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if pw.is_null() {
            return Err(bad(format!(
                "--exec-user {name:?}: no such user on this host"
            )));
        }
        // SAFETY: pw is non-null and points to a valid passwd entry (see above).
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(bad(format!(
                "--exec-user {name:?} needs the agent to run as root (it switches each exec job to that user)"
            )));
        }
        Ok(Self { uid, gid })
    }
}

/// Default [`AgentConfig::log_cap_bytes`]: 16 MiB per job.
pub const DEFAULT_LOG_CAP_BYTES: u64 = 16 << 20;

impl Default for AgentConfig {
    fn default() -> Self {
        let mut job_command = Vec::new();
        if let Ok(exe) = std::env::current_exe() {
            job_command.push(exe.into_os_string());
            job_command.push("job-exec".into());
        }
        Self {
            coordinator: "http://127.0.0.1:7070".into(),
            name: crate::procfs::hostname(),
            gpus: GpuSelection::All,
            gpu_limit_bytes: None,
            mem_limit_bytes: None,
            poll_secs: 0.5,
            over_secs: 0.0,
            job_command,
            work_dir: std::env::temp_dir().join("kiln-agent"),
            reconnect_min_secs: 0.25,
            reconnect_max_secs: 10.0,
            heartbeat_secs: 2.0,
            sessions_budget_bytes: 0,
            allow_exec: false,
            log_cap_bytes: DEFAULT_LOG_CAP_BYTES,
            exec_user: None,
            data_roots: Vec::new(),
            outbox_capacity: 10_000,
            token: None,
        }
    }
}

impl AgentConfig {
    /// Checks the values that would otherwise fail later and obscurely.
    pub fn validate(&self) -> Result<(), crate::AgentError> {
        let bad = |m: String| Err(crate::AgentError::InvalidConfig(m));
        if self.job_command.is_empty() {
            return bad(
                "job_command is empty: give the job program (e.g. [kiln, job-exec])".into(),
            );
        }
        if self.name.trim().is_empty() {
            return bad("name is empty: give --name".into());
        }
        for (field, v) in [
            ("poll_secs", self.poll_secs),
            ("reconnect_min_secs", self.reconnect_min_secs),
            ("reconnect_max_secs", self.reconnect_max_secs),
            ("heartbeat_secs", self.heartbeat_secs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!(
                    "{field} must be a positive number of seconds, got {v}"
                ));
            }
        }
        if !(self.over_secs.is_finite() && self.over_secs >= 0.0) {
            return bad(format!("over_secs must be >= 0, got {}", self.over_secs));
        }
        if self.reconnect_max_secs < self.reconnect_min_secs {
            return bad("reconnect_max_secs must be >= reconnect_min_secs".into());
        }
        if self.gpu_limit_bytes == Some(0) || self.mem_limit_bytes == Some(0) {
            return bad("a memory limit of 0 bytes offers nothing; leave it unset instead".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_selection_parses() {
        assert_eq!("all".parse::<GpuSelection>().unwrap(), GpuSelection::All);
        assert_eq!("none".parse::<GpuSelection>().unwrap(), GpuSelection::None);
        assert_eq!(
            " 0, 2".parse::<GpuSelection>().unwrap(),
            GpuSelection::List(vec![0, 2])
        );
        assert!("0,x".parse::<GpuSelection>().is_err());
    }

    #[test]
    fn default_config_is_valid_and_bad_values_are_named() {
        let c = AgentConfig::default();
        assert_eq!(c.coordinator, "http://127.0.0.1:7070");
        assert_eq!(c.poll_secs, 0.5);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.poll_secs = 0.0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("poll_secs"));
        let mut bad = c;
        bad.job_command.clear();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("job_command"));
    }
}
