//! The coordinator's configuration: where its data lives and its timing and policy knobs,
//! read from TOML (every field optional) or built in code.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Configuration of a coordinator. Every field has a default, so an empty TOML file is valid.
///
/// ```toml
/// data_dir = "/var/lib/kiln"
/// lease_secs = 10
/// heartbeat_secs = 2
/// default_max_attempts = 3
/// default_poll_secs = 0.5
/// reserve_after_secs = 30
/// fsync = true
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CoordinatorConfig {
    /// Directory of the sled store (created if missing). Only one coordinator may use it at a
    /// time. Default `kiln-data` in the working directory.
    pub data_dir: PathBuf,
    /// Seconds an agent may be without a stream before its ASSIGNED/RUNNING jobs become LOST.
    /// Also how long, after a restart, jobs that were running wait for their agent to
    /// reconnect. An agent that keeps its stream open but sends nothing (no heartbeat) for
    /// `lease_secs + 3 × heartbeat_secs` is treated as disconnected. Default 10.
    pub lease_secs: f64,
    /// Seconds between heartbeats the coordinator asks agents for (sent to them rounded up to
    /// whole seconds, at least 1). Default 2.
    pub heartbeat_secs: f64,
    /// Attempts a job gets when its submit does not say (`resources.max_attempts = 0`): a LOST
    /// job is requeued as a new attempt while it has had fewer than this many. Default 3.
    pub default_max_attempts: u32,
    /// Guard poll interval given to jobs whose submit does not say (`poll_secs = 0`).
    /// Default 0.5.
    pub default_poll_secs: f64,
    /// Starvation bound: a queued job that has waited this many seconds and still fits nowhere
    /// reserves the capacity where it would fit soonest, so smaller jobs stop backfilling
    /// there until it runs. Default 30.
    pub reserve_after_secs: f64,
    /// Shared secret: when set, every call (users' and agents') must carry
    /// `authorization: Bearer <token>`, else UNAUTHENTICATED. Default none (no check); set it
    /// whenever the coordinator listens beyond loopback. `KILN_TOKEN` sets it from the CLI.
    pub token: Option<String>,
    /// Whether each group flush also `fdatasync`s the store's log file, so acknowledged
    /// changes survive power loss and not only a crash of the coordinator process. `false`
    /// trades that for speed on disks with slow syncs. Default true.
    pub fsync: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            data_dir: PathBuf::from("kiln-data"),
            lease_secs: 10.0,
            heartbeat_secs: 2.0,
            default_max_attempts: 3,
            default_poll_secs: 0.5,
            reserve_after_secs: 30.0,
            token: None,
            fsync: true,
        }
    }
}

impl CoordinatorConfig {
    /// Parses TOML text; missing fields take their defaults.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks that the values make sense, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("lease_secs", self.lease_secs),
            ("heartbeat_secs", self.heartbeat_secs),
            ("default_poll_secs", self.default_poll_secs),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "{name} must be a positive number of seconds, got {v}"
                ));
            }
        }
        if !(self.reserve_after_secs.is_finite() && self.reserve_after_secs >= 0.0) {
            return Err(format!(
                "reserve_after_secs must be >= 0, got {}",
                self.reserve_after_secs
            ));
        }
        if self.default_max_attempts == 0 {
            return Err("default_max_attempts must be at least 1".into());
        }
        Ok(())
    }

    /// The lease as a duration.
    pub(crate) fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_secs)
    }

    /// How long a connected agent may stay silent before its stream counts as broken.
    pub(crate) fn silence_limit(&self) -> Duration {
        Duration::from_secs_f64(self.lease_secs + 3.0 * self.heartbeat_secs)
    }

    /// Heartbeat interval as sent to agents (whole seconds, at least 1).
    pub(crate) fn heartbeat_wire_secs(&self) -> u32 {
        (self.heartbeat_secs.ceil() as u32).max(1)
    }

    /// Lease as sent to agents (whole seconds, at least 1).
    pub(crate) fn lease_wire_secs(&self) -> u32 {
        (self.lease_secs.ceil() as u32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_gives_defaults_and_integers_read_as_seconds() {
        assert_eq!(
            CoordinatorConfig::from_toml("").unwrap(),
            CoordinatorConfig::default()
        );
        let c = CoordinatorConfig::from_toml("lease_secs = 4\ndata_dir = \"/tmp/x\"").unwrap();
        assert_eq!(c.lease_secs, 4.0);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_values_are_named() {
        let c = CoordinatorConfig {
            lease_secs: 0.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("lease_secs"));
        let c = CoordinatorConfig {
            default_max_attempts: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("default_max_attempts"));
    }
}
