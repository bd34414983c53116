//! Agents for benchmarks and tests: [`AgentConn`] is a real `AgentLink` gRPC client over a
//! socket with helpers to send reports, and [`spawn_sim_agent`] runs one that accepts every
//! assignment, reports it started and finished, and records when each assignment arrived.

use std::time::{Duration, Instant};

use kiln_proto::v1::agent_link_client::AgentLinkClient;
use kiln_proto::v1::{
    agent_message, coordinator_message, job_update, AgentMessage, CoordinatorMessage, Gpu,
    Heartbeat, JobFinished, JobResult, JobStarted, JobState, JobUpdate, MemtestResult, Register,
    Registered,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use super::BenchError;

/// Opens a gRPC channel to `url` (e.g. `http://127.0.0.1:7070`).
pub async fn channel(url: &str) -> Result<Channel, BenchError> {
    Ok(Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// A `Register` for an agent with `gpus` GPUs of `gpu_bytes` each and `host_bytes` of host
/// memory for CPU jobs.
pub fn register(name: &str, gpus: u32, gpu_bytes: u64, host_bytes: u64) -> Register {
    Register {
        name: name.to_string(),
        gpus: (0..gpus)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-sim-{name}-{i}"),
                name: "simulated GPU".into(),
                total_bytes: gpu_bytes,
                foreign_used_bytes: 0,
            })
            .collect(),
        host_mem_bytes: host_bytes,
        version: "sim".into(),
        nvml: gpus > 0,
        ..Default::default()
    }
}

/// One open `AgentLink.Connect` stream.
pub struct AgentConn {
    tx: mpsc::UnboundedSender<AgentMessage>,
    inbound: Streaming<CoordinatorMessage>,
    /// What the coordinator answered to Register.
    pub registered: Registered,
}

impl AgentConn {
    /// Connects, registers, and waits for `Registered`. A refused registration comes back
    /// as the gRPC status the coordinator sent.
    pub async fn connect(channel: Channel, register: Register) -> Result<AgentConn, BenchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Register(register)),
        })
        .map_err(|_| BenchError::Protocol("outbound channel closed".into()))?;
        let response = AgentLinkClient::new(channel)
            .connect(UnboundedReceiverStream::new(rx))
            .await?;
        let mut inbound = response.into_inner();
        let first = inbound.message().await?;
        match first.and_then(|m| m.msg) {
            Some(coordinator_message::Msg::Registered(registered)) => Ok(AgentConn {
                tx,
                inbound,
                registered,
            }),
            other => Err(BenchError::Protocol(format!(
                "expected Registered as the first message, got {other:?}"
            ))),
        }
    }

    /// Sends one message.
    pub fn send(&self, msg: agent_message::Msg) -> Result<(), BenchError> {
        self.tx
            .send(AgentMessage { msg: Some(msg) })
            .map_err(|_| BenchError::Protocol("the agent stream is closed".into()))
    }

    /// Sends a report about one attempt of one job.
    pub fn update(
        &self,
        job_id: u64,
        attempt: u32,
        update: job_update::Update,
    ) -> Result<(), BenchError> {
        self.send(agent_message::Msg::Job(JobUpdate {
            job_id,
            attempt,
            update: Some(update),
        }))
    }

    /// Reports the job's process started.
    pub fn started(&self, job_id: u64, attempt: u32, pid: u32) -> Result<(), BenchError> {
        self.update(
            job_id,
            attempt,
            job_update::Update::Started(JobStarted { pid }),
        )
    }

    /// Reports the job ended in `state`.
    pub fn finished(&self, job_id: u64, attempt: u32, state: JobState) -> Result<(), BenchError> {
        let result = (state == JobState::Succeeded).then(|| JobResult {
            result: Some(kiln_proto::v1::job_result::Result::Memtest(MemtestResult {
                allocated_bytes: 0,
                device: "sim".into(),
            })),
        });
        self.update(
            job_id,
            attempt,
            job_update::Update::Finished(JobFinished {
                state: state as i32,
                result,
                ..Default::default()
            }),
        )
    }

    /// Sends a heartbeat.
    pub fn heartbeat(&self) -> Result<(), BenchError> {
        self.send(agent_message::Msg::Heartbeat(Heartbeat::default()))
    }

    /// The next message from the coordinator (`None` when the stream ended).
    pub async fn recv(&mut self) -> Result<Option<CoordinatorMessage>, BenchError> {
        Ok(self.inbound.message().await?)
    }

    /// The next message, or an error after `timeout`.
    pub async fn recv_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<CoordinatorMessage>, BenchError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| {
                BenchError::Timeout(format!("no coordinator message within {timeout:?}"))
            })?
    }
}

/// Runs a simulated agent until its stream ends: every Assign is recorded on `assigned`
/// (job id and arrival time), reported started, and after `hold` reported SUCCEEDED.
/// Heartbeats go out at the interval the coordinator asked for.
pub fn spawn_sim_agent(
    mut conn: AgentConn,
    hold: Duration,
    assigned: mpsc::UnboundedSender<(u64, Instant)>,
) -> tokio::task::JoinHandle<Result<(), BenchError>> {
    tokio::spawn(async move {
        let beat = Duration::from_secs(conn.registered.heartbeat_secs.max(1) as u64);
        let mut heartbeat = tokio::time::interval(beat);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, u32)>();
        loop {
            tokio::select! {
                msg = conn.recv() => {
                    let Some(msg) = msg? else { return Ok(()) };
                    if let Some(coordinator_message::Msg::Assign(assign)) = msg.msg {
                        let job = assign.job.unwrap_or_default();
                        let _ = assigned.send((job.id, Instant::now()));
                        conn.started(job.id, job.attempt, 1)?;
                        if hold.is_zero() {
                            conn.finished(job.id, job.attempt, JobState::Succeeded)?;
                        } else {
                            let done = done_tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(hold).await;
                                let _ = done.send((job.id, job.attempt));
                            });
                        }
                    }
                }
                Some((job_id, attempt)) = done_rx.recv() => {
                    conn.finished(job_id, attempt, JobState::Succeeded)?;
                }
                _ = heartbeat.tick() => conn.heartbeat()?,
            }
        }
    })
}
