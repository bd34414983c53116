//! What the agent knows about its hardware: the GPUs it offers (from NVML) and the host's
//! memory, and how it measures a job's memory — NVML per-pid memory summed over the job's
//! process tree on a GPU, the tree's resident memory from /proc on the CPU.

use crate::config::{AgentConfig, GpuSelection};
use crate::procfs::{self, ProcEntry};
use crate::AgentError;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use std::collections::{HashMap, HashSet};

/// One GPU the agent offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index.
    pub index: u32,
    /// NVML UUID (`GPU-…`), used for CUDA_VISIBLE_DEVICES.
    pub uuid: String,
    /// Marketing name.
    pub name: String,
    /// Capacity offered: the GPU's memory, capped by `gpu_limit_bytes`.
    pub capacity_bytes: u64,
}

/// A job's memory at one instant, with the device it ran on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemSample {
    /// The job's own memory (NVML per-pid summed over its tree; tree RSS on the CPU).
    pub pid_mem: u64,
    /// Memory in use on the device by everyone (host used memory on the CPU).
    pub device_used: u64,
    /// The device's memory (host MemTotal on the CPU).
    pub device_total: u64,
}

/// The agent's hardware.
pub struct Devices {
    nvml: Option<Nvml>,
    gpus: Vec<GpuInfo>,
    host_capacity: u64,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("nvml", &self.nvml.is_some())
            .field("gpus", &self.gpus)
            .field("host_capacity", &self.host_capacity)
            .finish()
    }
}

impl Devices {
    /// Finds the GPUs the configuration selects, and the host memory offered to CPU jobs.
    pub fn discover(config: &AgentConfig) -> Result<Self, AgentError> {
        let host = procfs::host_memory();
        let host_capacity = match (config.mem_limit_bytes, &host) {
            (Some(limit), _) => limit,
            (None, Ok(m)) => m.total,
            (None, Err(e)) => {
                return Err(AgentError::HostMemory(std::io::Error::new(
                    e.kind(),
                    e.to_string(),
                )))
            }
        };
        if let (Some(limit), Ok(m)) = (config.mem_limit_bytes, &host) {
            if limit > m.total {
                tracing::warn!(
                    limit,
                    mem_total = m.total,
                    "--mem-limit-gb is above the host's MemTotal"
                );
            }
        }
        let wanted: Option<Vec<u32>> = match &config.gpus {
            GpuSelection::None => return Ok(Self::cpu_only(host_capacity)),
            GpuSelection::All => None,
            GpuSelection::List(list) => Some(list.clone()),
        };
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                if let Some(asked) = wanted {
                    return Err(AgentError::NvmlRequired {
                        asked,
                        reason: e.to_string(),
                    });
                }
                tracing::info!(error = %e, "NVML unavailable: running as a CPU agent");
                return Ok(Self::cpu_only(host_capacity));
            }
        };
        let count = nvml.device_count().map_err(|e| AgentError::Nvml {
            index: 0,
            reason: e.to_string(),
        })?;
        let indices = match wanted {
            None => (0..count).collect(),
            Some(list) => {
                if let Some(&index) = list.iter().find(|&&i| i >= count) {
                    return Err(AgentError::NoSuchGpu { index, count });
                }
                list
            }
        };
        let mut gpus = Vec::new();
        for index in indices {
            let nvml_err = |e: nvml_wrapper::error::NvmlError| AgentError::Nvml {
                index,
                reason: e.to_string(),
            };
            let dev = nvml.device_by_index(index).map_err(nvml_err)?;
            let total = dev.memory_info().map_err(nvml_err)?.total;
            gpus.push(GpuInfo {
                index,
                uuid: dev.uuid().map_err(nvml_err)?,
                name: dev.name().map_err(nvml_err)?,
                capacity_bytes: config.gpu_limit_bytes.map_or(total, |l| l.min(total)),
            });
        }
        for g in &gpus {
            tracing::info!(index = g.index, uuid = %g.uuid, name = %g.name, capacity = g.capacity_bytes, "GPU offered");
        }
        Ok(Self {
            nvml: Some(nvml),
            gpus,
            host_capacity,
        })
    }

    /// A CPU agent: no NVML, no GPUs.
    pub fn cpu_only(host_capacity: u64) -> Self {
        Self {
            nvml: None,
            gpus: Vec::new(),
            host_capacity,
        }
    }

    /// Whether NVML is in use.
    pub fn nvml_available(&self) -> bool {
        self.nvml.is_some()
    }

    /// The GPUs offered.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// The GPU with this NVML index, if offered.
    pub fn gpu(&self, index: u32) -> Option<&GpuInfo> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// Host memory offered to CPU jobs.
    pub fn host_capacity(&self) -> u64 {
        self.host_capacity
    }

    /// Per-process memory on GPU `index` (pid → bytes) and the device's (used, total).
    fn gpu_usage(&self, index: u32) -> Result<(HashMap<u32, u64>, u64, u64), String> {
        let nvml = self.nvml.as_ref().ok_or("NVML is not available")?;
        let dev = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let info = dev.memory_info().map_err(|e| e.to_string())?;
        let mut per_pid = HashMap::new();
        for p in dev.running_compute_processes().map_err(|e| e.to_string())? {
            if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                *per_pid.entry(p.pid).or_insert(0) += bytes;
            }
        }
        Ok((per_pid, info.used, info.total))
    }

    /// Measures the job whose process group is `pgid` on `gpus` (empty = a CPU job), from an
    /// already-read process table.
    pub fn sample_job(
        &self,
        table: &[ProcEntry],
        pgid: u32,
        gpus: &[u32],
    ) -> Result<MemSample, String> {
        let tree = procfs::tree_memory(table, pgid);
        if gpus.is_empty() {
            let host = procfs::host_memory().map_err(|e| e.to_string())?;
            return Ok(MemSample {
                pid_mem: tree.rss_bytes,
                device_used: host.used(),
                device_total: host.total,
            });
        }
        let pids: HashSet<u32> = tree.pids.into_iter().collect();
        let mut worst = MemSample::default();
        for &index in gpus {
            let (per_pid, used, total) = self.gpu_usage(index)?;
            warn_if_pids_invisible(table, &per_pid);
            let mine: u64 = per_pid
                .iter()
                .filter(|(pid, _)| pids.contains(pid))
                .map(|(_, b)| b)
                .sum();
            // The budget is per GPU: the GPU where the job uses most is the one that counts.
            if mine >= worst.pid_mem {
                worst = MemSample {
                    pid_mem: mine,
                    device_used: used,
                    device_total: total,
                };
            }
        }
        Ok(worst)
    }

    /// Memory each offered GPU spends on processes outside `kiln_pids` (device used minus
    /// Kiln's own processes' memory).
    pub fn foreign_usage(&self, kiln_pids: &HashSet<u32>) -> HashMap<u32, u64> {
        let mut out = HashMap::new();
        for g in &self.gpus {
            match self.gpu_usage(g.index) {
                Ok((per_pid, used, _)) => {
                    let kiln: u64 = per_pid
                        .iter()
                        .filter(|(pid, _)| kiln_pids.contains(pid))
                        .map(|(_, b)| b)
                        .sum();
                    out.insert(g.index, used.saturating_sub(kiln));
                }
                Err(e) => tracing::warn!(gpu = g.index, error = %e, "NVML read failed"),
            }
        }
        out
    }
}

/// NVML names processes by their pid in the host's PID namespace. When the agent runs in
/// another one (a container without `--pid=host`), none of them match the job's tree and the
/// guard would read 0 bytes: say so, once, with the fix.
fn warn_if_pids_invisible(table: &[ProcEntry], per_pid: &HashMap<u32, u64>) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if per_pid.is_empty() || WARNED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let visible: HashSet<u32> = table.iter().map(|e| e.pid).collect();
    let invisible: Vec<u32> = per_pid
        .keys()
        .copied()
        .filter(|p| !visible.contains(p))
        .collect();
    if !invisible.is_empty() && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            pids = ?invisible,
            "NVML reports GPU processes that are not in this /proc: if the agent runs in a \
             container, give it the host PID namespace (--pid=host) or the guard cannot \
             attribute GPU memory to its jobs"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_none_is_a_cpu_agent_with_host_capacity() {
        let config = AgentConfig {
            gpus: GpuSelection::None,
            mem_limit_bytes: Some(3 << 30),
            ..Default::default()
        };
        let d = Devices::discover(&config).unwrap();
        assert!(!d.nvml_available());
        assert!(d.gpus().is_empty());
        assert_eq!(d.host_capacity(), 3 << 30);
        let d = Devices::discover(&AgentConfig {
            gpus: GpuSelection::None,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.host_capacity(), procfs::host_memory().unwrap().total);
    }

    #[test]
    fn explicit_gpu_list_without_nvml_is_a_clear_error() {
        if Nvml::init().is_ok() {
            eprintln!("skipping: NVML works here");
            return;
        }
        let err = Devices::discover(&AgentConfig {
            gpus: GpuSelection::List(vec![0]),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, AgentError::NvmlRequired { .. }), "{err}");
        assert!(err.to_string().contains("--gpus none"), "{err}");
        // `all` falls back to a CPU agent instead.
        let d = Devices::discover(&AgentConfig::default()).unwrap();
        assert!(!d.nvml_available());
    }

    #[test]
    fn cpu_sample_is_the_tree_rss() {
        let d = Devices::cpu_only(1 << 30);
        let me = std::process::id();
        let table = procfs::read_all();
        // This test process is the leader of nothing, but tree_of includes the pid itself.
        let s = d.sample_job(&table, me, &[]).unwrap();
        assert!(s.pid_mem > 0);
        assert!(s.device_total >= s.device_used && s.device_used > 0);
        assert!(d.sample_job(&table, me, &[0]).is_err(), "no NVML here");
    }
}
