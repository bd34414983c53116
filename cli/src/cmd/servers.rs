//! `kiln coordinator` and `kiln agent`: flags → library config → the library's `run`, until
//! Ctrl-C or SIGTERM.

use super::{gib_to_bytes, shutdown_signal};
use crate::args::{AgentArgs, CoordinatorArgs};
use anyhow::Context;
use std::process::ExitCode;

/// Builds the coordinator's config from the TOML file (if any) and the flags.
pub fn coordinator_config(
    args: &CoordinatorArgs,
) -> anyhow::Result<kiln_coordinator::CoordinatorConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            kiln_coordinator::CoordinatorConfig::from_toml(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?
        }
        None => kiln_coordinator::CoordinatorConfig::default(),
    };
    // The flag wins over the file only when it was changed from its default or no file was given.
    if args.config.is_none() || args.data_dir != std::path::Path::new("./kiln-data") {
        config.data_dir = args.data_dir.clone();
    }
    if let Some(l) = args.lease_secs {
        config.lease_secs = l;
    }
    if args.token.is_some() {
        config.token = args.token.clone();
    }
    Ok(config)
}

/// `kiln coordinator`.
pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let config = coordinator_config(&args)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another coordinator running? use --listen)",
                args.listen
            )
        })?;
    tracing::info!(addr = %listener.local_addr()?, data_dir = %config.data_dir.display(), "kiln coordinator listening");
    kiln_coordinator::run(listener, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Parses `--gpus all|none|0,2`.
pub fn gpu_selection(s: &str) -> anyhow::Result<kiln_agent::GpuSelection> {
    match s.trim() {
        "all" => Ok(kiln_agent::GpuSelection::All),
        "none" | "" => Ok(kiln_agent::GpuSelection::None),
        list => {
            let idx = list
                .split(',')
                .map(|p| p.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!("--gpus {list:?}: expected all, none or indices like 0,2")
                })?;
            Ok(kiln_agent::GpuSelection::List(idx))
        }
    }
}

/// Builds the agent's config from the flags.
pub fn agent_config(args: &AgentArgs) -> anyhow::Result<kiln_agent::AgentConfig> {
    let exe = std::env::current_exe().context("finding the kiln executable for job processes")?;
    let mut config = kiln_agent::AgentConfig {
        coordinator: args.coordinator.clone(),
        gpus: gpu_selection(&args.gpus)?,
        gpu_limit_bytes: args.gpu_limit_gb.map(gib_to_bytes),
        mem_limit_bytes: args.mem_limit_gb.map(gib_to_bytes),
        poll_secs: args.poll_secs,
        over_secs: args.over_secs,
        job_command: vec![exe.into_os_string(), "job-exec".into()],
        work_dir: args.work_dir.clone(),
        token: args.token.clone(),
        allow_exec: args.allow_exec,
        exec_user: args.exec_user.clone(),
        data_roots: args.data_roots.clone(),
        log_cap_bytes: {
            if !(args.log_cap_mib.is_finite() && args.log_cap_mib > 0.0) {
                anyhow::bail!(
                    "--log-cap-mib must be a positive number (got {})",
                    args.log_cap_mib
                );
            }
            (args.log_cap_mib * (1u64 << 20) as f64) as u64
        },
        ..Default::default()
    };
    if let Some(n) = &args.name {
        config.name = n.clone();
    }
    Ok(config)
}

/// `kiln agent`.
pub async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = agent_config(&args)?;
    tracing::info!(coordinator = %config.coordinator, name = %config.name, "kiln agent starting");
    kiln_agent::run(config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_config_in_deploy_parses_and_validates() {
        let text = include_str!("../../../deploy/kiln.toml");
        let config = kiln_coordinator::CoordinatorConfig::from_toml(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.lease_secs, 10.0);
    }

    #[test]
    fn gpu_selection_parses_lists_and_rejects_junk() {
        assert!(matches!(
            super::gpu_selection("all").unwrap(),
            kiln_agent::GpuSelection::All
        ));
        assert!(matches!(
            super::gpu_selection("none").unwrap(),
            kiln_agent::GpuSelection::None
        ));
        assert!(matches!(
            super::gpu_selection("0,2").unwrap(),
            kiln_agent::GpuSelection::List(v) if v == vec![0, 2]
        ));
        assert!(super::gpu_selection("zero").is_err());
    }
}
