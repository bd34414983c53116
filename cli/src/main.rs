//! `kiln`: the one binary. Parses flags, sets up logging, and hands each verb to its module in
//! `cmd/`. The coordinator, the agent and the job process are library code in their crates.

mod args;
mod client;
mod cmd;
mod output;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    // The job process reports on stdout; its logs go to stderr like everyone else's.
    let default_filter = match &cli.command {
        args::Command::Coordinator(_) | args::Command::Agent(_) | args::Command::JobExec => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Job processes write to a pipe the agent relays: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cmd::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", output::error_chain(&err));
            std::process::ExitCode::from(1)
        }
    }
}
