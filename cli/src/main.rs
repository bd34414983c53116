//! `kiln`: the one binary. Parses flags, sets up logging, and hands each verb to its module in
//! `cmd/`. The coordinator, the agent and the job process are library code in their crates.

mod args;
mod client;
mod cmd;
mod output;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    quiet_on_closed_stdout();
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

/// A verb whose reader went away (`kiln watch 7 -o json | head -1`) ends quietly with status
/// 141, as a Unix tool killed by SIGPIPE does, instead of a panic and a backtrace. SIGPIPE itself
/// stays ignored (Rust's default): a socket write to a closed peer must return an error, not kill
/// the process.
fn quiet_on_closed_stdout() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info)
    }));
}
