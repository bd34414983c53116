//! Starting and stopping a coordinator: open and recover the store, run the committer, the
//! scheduling loop and the lease loop, serve the gRPC services on the given listener until
//! the shutdown future fires (or a flush fails), then stop everything and flush.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kiln_proto::v1::agent_link_server::AgentLinkServer;
use kiln_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::committer::run_committer;
use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::rpc::{AgentLinkService, CoordinatorService};
use crate::shared::{Shared, SharedRef};
use crate::store::Store;

/// How often queued jobs are reconsidered even when nothing woke the scheduler (the
/// anti-starvation clock moves with time alone).
const SCHEDULE_TICK: Duration = Duration::from_secs(1);

/// Serves `kiln.v1.Coordinator`, `kiln.v1.AgentLink`, `grpc.health.v1.Health` and server
/// reflection (v1 and v1alpha) on `listener` until `shutdown` completes. Returns once the
/// server has stopped, every background task has ended and the store is flushed and closed,
/// so a new coordinator may open the same `data_dir` right away.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    config.validate().map_err(CoordinatorError::Config)?;
    let dir = config.data_dir.clone();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (stop_commit_tx, stop_commit_rx) = watch::channel(false);
    let recovered = {
        let dir = dir.clone();
        let rx = shutdown_rx.clone();
        tokio::task::spawn_blocking(move || {
            Store::open(&dir, config.fsync).and_then(|s| Shared::recover(s, config, rx))
        })
        .await
        .map_err(|e| CoordinatorError::Task(e.to_string()))?
    };
    let shared = Arc::new(recovered.map_err(|source| CoordinatorError::Open {
        dir: dir.clone(),
        source,
    })?);
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, dir = %dir.display(), "coordinator serving");

    let committer = tokio::spawn(run_committer(shared.clone(), stop_commit_rx));
    let scheduler = tokio::spawn(schedule_loop(shared.clone()));
    let leases = tokio::spawn(lease_loop(shared.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    health
        .set_serving::<AgentLinkServer<AgentLinkService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| CoordinatorError::Task(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| CoordinatorError::Task(format!("reflection: {e}")))?;

    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            // Dispatch latency matters more than packet count on this link.
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let mut failed = shared.commit_tx.subscribe();
    let signal_tx = shutdown_tx.clone();
    let signal = async move {
        tokio::select! {
            _ = shutdown => tracing::info!("coordinator shutting down"),
            _ = failed.wait_for(|s| s.failed.is_some()) => {
                tracing::error!("coordinator stopping: the store can no longer flush");
            }
        }
        let _ = signal_tx.send(true);
    };
    let auth = BearerAuth::new(shared.config.token.as_deref());
    let keepalive = Duration::from_secs_f64(shared.config.heartbeat_secs.max(1.0));
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive * 3))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::with_interceptor(
            CoordinatorService {
                shared: shared.clone(),
            },
            auth.clone(),
        ))
        .add_service(AgentLinkServer::with_interceptor(
            AgentLinkService {
                shared: shared.clone(),
            },
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, signal)
        .await;

    let _ = shutdown_tx.send(true);
    for task in [scheduler, leases] {
        task.await
            .map_err(|e| CoordinatorError::Task(e.to_string()))?;
    }
    let _ = stop_commit_tx.send(true);
    let committed = committer
        .await
        .map_err(|e| CoordinatorError::Task(e.to_string()))?;
    // Stream tasks end on the shutdown signal; wait for them to let go of the store so the
    // directory's lock is released when this returns.
    let mut shared = shared;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let final_flush = loop {
        match Arc::try_unwrap(shared) {
            Ok(only) => break only.store.flush(),
            Err(still_shared) => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!("coordinator tasks still hold the store after shutdown");
                    break still_shared.store.flush();
                }
                shared = still_shared;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    served?;
    committed?;
    final_flush?;
    tracing::info!(dir = %dir.display(), "coordinator stopped; store flushed");
    Ok(())
}

/// Checks `authorization: Bearer <token>` on every call when a token is configured.
#[derive(Clone)]
struct BearerAuth {
    expected: Option<Arc<str>>,
}

impl BearerAuth {
    fn new(token: Option<&str>) -> Self {
        BearerAuth {
            expected: token.map(|t| Arc::from(format!("Bearer {t}").as_str())),
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => Err(tonic::Status::unauthenticated(
                "wrong token: pass the coordinator's token with --token or KILN_TOKEN",
            )),
            None => Err(tonic::Status::unauthenticated(
                "this coordinator requires a token: pass it with --token or KILN_TOKEN",
            )),
        }
    }
}

/// Compares without an early exit, so response time does not leak the matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs scheduling passes when woken, and once a second regardless.
async fn schedule_loop(shared: SharedRef) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = shared.schedule_wake.notified() => {}
            _ = tokio::time::sleep(SCHEDULE_TICK) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let placed = shared.schedule_pass();
        if placed > 0 {
            tracing::debug!(placed, "scheduling pass");
        }
    }
}

/// Checks leases a few times per lease period.
async fn lease_loop(shared: SharedRef) {
    let mut shutdown = shared.shutdown.clone();
    let period = shared
        .config
        .lease()
        .div_f64(4.0)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.check_leases(),
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
