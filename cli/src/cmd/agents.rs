//! `kiln agents` and `kiln drain [--resume] AGENT`.

use super::print_json;
use crate::args::{ClientOnlyArgs, DrainArgs, OutputFormat};
use crate::client::{connect, status_error};
use crate::output::{agent_json, agents_table};
use kiln_proto::v1;
use std::process::ExitCode;

/// `kiln agents`.
pub async fn list(args: ClientOnlyArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    let agents = client
        .list_agents(v1::ListAgentsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .agents;
    match args.client.output {
        OutputFormat::Table => println!("{}", agents_table(&agents)),
        _ => print_json(&serde_json::Value::Array(
            agents.iter().map(agent_json).collect(),
        )),
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln drain [--resume] AGENT`.
pub async fn drain(args: DrainArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    let agent = client
        .drain_agent(v1::DrainAgentRequest {
            name: args.agent.clone(),
            resume: args.resume,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match args.client.output {
        OutputFormat::Table if args.resume => println!(
            "agent {} is back in service: new jobs may be placed on it",
            agent.name
        ),
        OutputFormat::Table => println!(
            "agent {} is draining: no new jobs; {} running job(s) will finish \
             (`kiln drain --resume {}` undoes this)",
            agent.name,
            agent.running_jobs.len(),
            agent.name
        ),
        _ => print_json(&agent_json(&agent)),
    }
    Ok(ExitCode::SUCCESS)
}
