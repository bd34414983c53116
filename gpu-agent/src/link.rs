//! The agent's side of `AgentLink.Connect`: dial the coordinator, register (GPUs, host memory,
//! the jobs it still runs), then in one loop send heartbeats and queued job updates and act on
//! assignments and kills. When the stream breaks, reconnect with exponential backoff; job ends
//! sent shortly before a break are sent again after re-registering (the coordinator treats a
//! repeated end of a finished attempt as a no-op or a stale report).

use crate::job;
use crate::outbox::Outgoing;
use crate::state::AgentState;
use crate::AgentError;
use kiln_proto::v1::{
    agent_link_client::AgentLinkClient, agent_message::Msg, coordinator_message, AgentMessage, Gpu,
    Heartbeat, Register,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

/// How long the coordinator has to answer `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Job ends sent within this long before a break are sent again after reconnecting.
const RESEND_WINDOW: Duration = Duration::from_secs(10);
/// How long the shutdown path waits for jobs to die and their ends to be sent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Exponential backoff between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays start at `min` and double up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the shortest delay (after a successful registration).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// How one session with the coordinator ended.
enum SessionEnd {
    /// The agent is shutting down (jobs already killed and their ends flushed if possible).
    Shutdown,
    /// The stream broke after registration; reconnect soon.
    Broken(String),
}

/// Serves the coordinator until `shutdown` turns true. Never returns an error for an
/// unreachable coordinator: it keeps retrying.
pub async fn run(
    state: Arc<AgentState>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let invalid = |reason: String| AgentError::InvalidCoordinatorUrl {
        url: state.config.coordinator.clone(),
        reason,
    };
    let url = kiln_proto::address::coordinator_url(&state.config.coordinator).map_err(invalid)?;
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let mut backoff = Backoff::new(
        Duration::from_secs_f64(state.config.reconnect_min_secs),
        Duration::from_secs_f64(state.config.reconnect_max_secs),
    );
    let mut attempt: u64 = 0;
    let mut ever_registered = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        attempt += 1;
        match session(&state, &endpoint, &mut shutdown, &mut backoff).await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Broken(reason)) => {
                tracing::warn!(coordinator = %state.config.coordinator, %reason, "connection to the coordinator lost; reconnecting");
                attempt = 0;
                ever_registered = true;
            }
            // A wrong address or token at start is a configuration mistake: say so and stop.
            // Once registered, the same answer may be a proxy's hiccup: keep retrying.
            Err(Refusal::Config(e)) if !ever_registered => return Err(e(url.clone())),
            Err(Refusal::Config(e)) => {
                let delay = backoff.next_delay();
                tracing::error!(
                    attempt,
                    retry_in_secs = delay.as_secs_f64(),
                    "{}",
                    e(url.clone())
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Err(Refusal::Retry(reason)) => {
                let delay = backoff.next_delay();
                tracing::warn!(coordinator = %state.config.coordinator, attempt, retry_in_secs = delay.as_secs_f64(), %reason, "cannot reach the coordinator");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
    // Shutting down while disconnected: end the jobs; their ends cannot be sent.
    state.kill_all("agent shutting down");
    state.wait_idle(SHUTDOWN_GRACE).await;
    Ok(())
}

/// The registration message: GPUs, host memory, and every job not yet reported finished.
pub fn register_message(state: &AgentState) -> Register {
    let table = state.proc_table();
    let foreign = state.devices.foreign_usage(&state.kiln_pids(&table));
    Register {
        name: state.config.name.clone(),
        gpus: state
            .devices
            .gpus()
            .iter()
            .map(|g| Gpu {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                total_bytes: g.capacity_bytes,
                foreign_used_bytes: foreign.get(&g.index).copied().unwrap_or(0),
            })
            .collect(),
        host_mem_bytes: state.devices.host_capacity(),
        running: state.running(),
        version: env!("CARGO_PKG_VERSION").into(),
        nvml: state.devices.nvml_available(),
        allow_exec: state.config.allow_exec,
        sessions: state.session_ids(),
    }
}

fn heartbeat_message(state: &AgentState) -> Heartbeat {
    let table = state.proc_table();
    Heartbeat {
        foreign_used_bytes: state
            .devices
            .foreign_usage(&state.kiln_pids(&table))
            .into_iter()
            .collect(),
        sessions: state.session_ids(),
    }
}

fn msg(m: Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

/// Why a connection never got registered.
enum Refusal {
    /// The network or the coordinator is not there (yet): retry with backoff.
    Retry(String),
    /// The address or the token is wrong: the error, given the URL dialed.
    Config(Box<dyn Fn(String) -> AgentError + Send>),
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Refusal::Retry(reason)
    }
}

/// A refused call: a configuration mistake when the peer is not a coordinator or refuses the
/// token, otherwise worth retrying.
fn refusal(what: &str, s: tonic::Status) -> Refusal {
    if let Some(message) = kiln_proto::address::not_a_coordinator(&s) {
        return Refusal::Config(Box::new(move |url| AgentError::NotACoordinator {
            url,
            message: message.clone(),
        }));
    }
    if s.code() == tonic::Code::Unauthenticated {
        let message = s.message().to_string();
        return Refusal::Config(Box::new(move |url| AgentError::Unauthenticated {
            url,
            message: message.clone(),
        }));
    }
    Refusal::Retry(format!("{what}: {} ({:?})", s.message(), s.code()))
}

/// One connection: `Err` when it never got registered.
async fn session(
    state: &Arc<AgentState>,
    endpoint: &Endpoint,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<SessionEnd, Refusal> {
    let channel = endpoint.connect().await.map_err(|e| {
        let reason = format!("{e}: {}", source_chain(&e));
        match kiln_proto::address::not_a_coordinator_error(&reason) {
            Some(message) => Refusal::Config(Box::new(move |url| AgentError::NotACoordinator {
                url,
                message: message.clone(),
            })),
            None => Refusal::Retry(reason),
        }
    })?;
    let mut client = AgentLinkClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(256);
    let register = register_message(state);
    let running = register.running.len();
    tx.send(msg(Msg::Register(register)))
        .await
        .map_err(|_| "request stream closed".to_string())?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &state.config.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token contains characters not allowed in a header".to_string())?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut inbound = client
        .connect(request)
        .await
        .map_err(|s| refusal("Connect refused", s))?
        .into_inner();
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
        .await
        .map_err(|_| "the coordinator did not answer Register in time".to_string())?
        .map_err(|s| refusal("registration refused", s))?
        .ok_or_else(|| "the coordinator closed the stream at registration".to_string())?;
    let mut heartbeat_secs = state.config.heartbeat_secs;
    let mut pending_first = None;
    match first.msg {
        Some(coordinator_message::Msg::Registered(r)) => {
            if r.heartbeat_secs > 0 {
                heartbeat_secs = f64::from(r.heartbeat_secs);
            }
            tracing::info!(coordinator = %state.config.coordinator, name = %state.config.name, running, lease_secs = r.lease_secs, heartbeat_secs, "registered with the coordinator");
        }
        other => {
            tracing::warn!("the coordinator's first message was not Registered; continuing");
            pending_first = other;
        }
    }
    backoff.reset();
    if let Some(m) = pending_first {
        handle(state, m);
    }

    let mut heartbeat = tokio::time::interval(Duration::from_secs_f64(heartbeat_secs));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await; // the first tick is immediate; Register just said it all
                            // Job ends sent on this connection, kept for the resend window.
    let mut sent_ends: Vec<(Instant, Outgoing)> = Vec::new();
    let broken = |sent_ends: Vec<(Instant, Outgoing)>, reason: String| {
        let recent: Vec<Outgoing> = sent_ends
            .into_iter()
            .filter(|(at, _)| at.elapsed() <= RESEND_WINDOW)
            .map(|(_, o)| o)
            .collect();
        if !recent.is_empty() {
            tracing::info!(
                count = recent.len(),
                "job ends sent just before the break will be sent again"
            );
        }
        state.outbox.requeue_front(recent);
        Ok(SessionEnd::Broken(reason))
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                return Ok(shutdown_session(state, tx, inbound).await);
            }
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    if let Some(m) = m.msg {
                        handle(state, m);
                    }
                }
                Ok(None) => return broken(sent_ends, "the coordinator closed the stream".into()),
                Err(s) => return broken(sent_ends, format!("{} ({:?})", s.message(), s.code())),
            },
            out = state.outbox.pop() => {
                let is_end = out.is_finished();
                if tx.send(msg(Msg::Job(out.update.clone()))).await.is_err() {
                    state.outbox.requeue_front(vec![out]);
                    return broken(sent_ends, "request stream closed".into());
                }
                if is_end {
                    sent_ends.retain(|(at, _)| at.elapsed() <= RESEND_WINDOW);
                    sent_ends.push((Instant::now(), out));
                }
            }
            _ = heartbeat.tick() => {
                if tx.send(msg(Msg::Heartbeat(heartbeat_message(state)))).await.is_err() {
                    return broken(sent_ends, "request stream closed".into());
                }
            }
        }
    }
}

/// Shutdown while connected: kill every job, send what is queued (their ends included) for a
/// short grace period, then close the request stream and wait for the coordinator to close its
/// side, so nothing queued is cut off in flight.
async fn shutdown_session(
    state: &Arc<AgentState>,
    tx: mpsc::Sender<AgentMessage>,
    mut inbound: tonic::Streaming<kiln_proto::v1::CoordinatorMessage>,
) -> SessionEnd {
    tracing::info!(
        jobs = state.live_jobs(),
        "agent shutting down: killing running jobs"
    );
    state.kill_all("agent shutting down");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let flush = async {
        loop {
            while let Some(out) = state.outbox.try_pop() {
                if tx.send(msg(Msg::Job(out.update))).await.is_err() {
                    return;
                }
            }
            if state.live_jobs() == 0 && state.outbox.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout_at(deadline, flush).await;
    drop(tx);
    let close = async {
        // Assignments arriving now are not started; the coordinator requeues them.
        while let Ok(Some(_)) = inbound.message().await {}
    };
    if tokio::time::timeout(Duration::from_secs(2), close)
        .await
        .is_err()
    {
        tracing::debug!("the coordinator kept the stream open after the agent closed its side");
    }
    SessionEnd::Shutdown
}

fn handle(state: &Arc<AgentState>, m: coordinator_message::Msg) {
    match m {
        coordinator_message::Msg::Assign(a) => match a.job {
            Some(job) => job::start(state, job),
            None => tracing::warn!("Assign without a job ignored"),
        },
        coordinator_message::Msg::Kill(k) => {
            if !state.kill(k.job_id, k.attempt, &k.reason) {
                tracing::info!(job_id = k.job_id, attempt = k.attempt, reason = %k.reason, "kill for a job this agent does not run; ignored");
            }
        }
        coordinator_message::Msg::Registered(_) => {
            tracing::debug!("repeated Registered ignored");
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let got: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, vec![250, 500, 1000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(250));
    }
}
