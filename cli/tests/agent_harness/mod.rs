//! Test harness: a real tonic `AgentLink` server on a loopback port that plays the coordinator
//! (it records every message agents send and lets the test send assignments and kills), a real
//! agent started with `kiln_agent::run`, and job processes from the `kiln` binary's `job-exec` verb.
//!
//! The server runs on its own thread with its own runtime so a test can stop it abruptly
//! (dropping the runtime drops every connection, like a coordinator that died) and start a new
//! one on the same port.
#![allow(dead_code)]

use kiln_agent::{AgentConfig, GpuSelection};
use kiln_proto::v1::{
    self, agent_link_server::AgentLink, agent_link_server::AgentLinkServer, agent_message::Msg,
    coordinator_message, job_update::Update, AgentMessage, CoordinatorMessage, JobFinished,
    JobUpdate,
};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;

/// Where the messages from agents go, and how to reach the live connections. Survives
/// server restarts.
#[derive(Clone, Default)]
struct Hub {
    /// Every message received, with the connection number it came on.
    received: Arc<Mutex<Vec<(usize, AgentMessage)>>>,
    /// Senders of the open connections' response streams, with their connection numbers.
    conns: Arc<Mutex<Vec<(usize, ConnTx)>>>,
    /// Connections accepted so far (numbers are never reused, across restarts too).
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

type ConnTx = mpsc::UnboundedSender<Result<CoordinatorMessage, tonic::Status>>;

struct LinkService {
    hub: Hub,
}

#[tonic::async_trait]
impl AgentLink for LinkService {
    type ConnectStream =
        Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, tonic::Status>> + Send + 'static>>;

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| tonic::Status::invalid_argument("no Register"))?;
        if !matches!(first.msg, Some(Msg::Register(_))) {
            return Err(tonic::Status::invalid_argument(
                "first message must be Register",
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Registered(v1::Registered {
                lease_secs: 30,
                heartbeat_secs: 1,
            })),
        }))
        .unwrap();
        let conn = self
            .hub
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.hub.conns.lock().unwrap().push((conn, tx));
        self.hub.received.lock().unwrap().push((conn, first));
        let received = self.hub.received.clone();
        let conns = self.hub.conns.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                received.lock().unwrap().push((conn, m));
            }
            // The agent closed its side: end ours, as a coordinator does.
            conns.lock().unwrap().retain(|(c, _)| *c != conn);
        });
        Ok(tonic::Response::new(Box::pin(
            UnboundedReceiverStream::new(rx),
        )))
    }
}

/// A running server instance.
struct ServerInstance {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The stand-in coordinator's AgentLink side.
pub struct LinkServer {
    pub addr: SocketAddr,
    hub: Hub,
    instance: Option<ServerInstance>,
    /// The listener of the first start (bound to port 0 to pick the port).
    first_listener: Option<std::net::TcpListener>,
}

impl LinkServer {
    /// Starts on a free loopback port.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut s = Self {
            addr,
            hub: Hub::default(),
            instance: None,
            first_listener: Some(listener),
        };
        s.restart();
        s
    }

    /// The URL agents dial.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) {
        assert!(self.instance.is_none(), "already running");
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let hub = self.hub.clone();
        let addr = self.addr;
        let first = self.first_listener.take();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.spawn(async move {
                let listener = match first {
                    Some(l) => tokio::net::TcpListener::from_std(l).unwrap(),
                    None => loop {
                        match tokio::net::TcpListener::bind(addr).await {
                            Ok(l) => break l,
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    },
                };
                let _ = ready_tx.send(());
                tonic::transport::Server::builder()
                    .add_service(AgentLinkServer::new(LinkService { hub }))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
            let _ = stop_rx.recv();
            // Dropping the runtime drops every connection at once: a coordinator that died.
            rt.shutdown_background();
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("link server did not start");
        self.instance = Some(ServerInstance {
            stop: Some(stop_tx),
            thread: Some(thread),
        });
    }

    /// Stops abruptly; connections break.
    pub fn stop(&mut self) {
        if let Some(mut inst) = self.instance.take() {
            drop(inst.stop.take());
            if let Some(t) = inst.thread.take() {
                t.join().unwrap();
            }
            self.hub.conns.lock().unwrap().clear();
        }
    }

    fn send(&self, msg: coordinator_message::Msg) {
        let conns = self.hub.conns.lock().unwrap();
        let (_, tx) = conns.last().expect("no agent connected");
        tx.send(Ok(CoordinatorMessage { msg: Some(msg) }))
            .expect("connection closed");
    }

    /// Sends an assignment on the newest connection.
    pub fn assign(&self, job: v1::Job) {
        self.send(coordinator_message::Msg::Assign(v1::Assign {
            job: Some(job),
        }));
    }

    /// Sends a kill on the newest connection.
    pub fn kill(&self, job_id: u64, attempt: u32, reason: &str) {
        self.send(coordinator_message::Msg::Kill(v1::Kill {
            job_id,
            attempt,
            reason: reason.into(),
        }));
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<(usize, AgentMessage)> {
        self.hub.received.lock().unwrap().clone()
    }

    /// Number of connections made so far (across restarts).
    pub fn connections(&self) -> usize {
        self.received()
            .iter()
            .filter(|(_, m)| matches!(m.msg, Some(Msg::Register(_))))
            .count()
    }

    /// The registrations received, in order.
    pub fn registrations(&self) -> Vec<v1::Register> {
        self.received()
            .into_iter()
            .filter_map(|(_, m)| match m.msg {
                Some(Msg::Register(r)) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// The updates received about one job, in order.
    pub fn updates(&self, job_id: u64) -> Vec<JobUpdate> {
        self.received()
            .into_iter()
            .filter_map(|(_, m)| match m.msg {
                Some(Msg::Job(u)) if u.job_id == job_id => Some(u),
                _ => None,
            })
            .collect()
    }

    /// Waits until `pred` holds over the received messages.
    pub async fn wait_until(&self, what: &str, timeout: Duration, pred: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !pred(self) {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; received: {:#?}",
                    self.received()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the job's pid (its Started update).
    pub async fn started_pid(&self, job_id: u64, timeout: Duration) -> u32 {
        self.wait_until(&format!("job {job_id} to start"), timeout, |s| {
            s.updates(job_id)
                .iter()
                .any(|u| matches!(u.update, Some(Update::Started(_))))
        })
        .await;
        self.updates(job_id)
            .iter()
            .find_map(|u| match &u.update {
                Some(Update::Started(st)) => Some(st.pid),
                _ => None,
            })
            .unwrap()
    }

    /// Waits for the job's end.
    pub async fn finished(&self, job_id: u64, timeout: Duration) -> JobFinished {
        self.wait_until(&format!("job {job_id} to finish"), timeout, |s| {
            s.updates(job_id)
                .iter()
                .any(|u| matches!(u.update, Some(Update::Finished(_))))
        })
        .await;
        finished_of(&self.updates(job_id)).unwrap()
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first end among updates.
pub fn finished_of(updates: &[JobUpdate]) -> Option<JobFinished> {
    updates.iter().find_map(|u| match &u.update {
        Some(Update::Finished(f)) => Some(f.clone()),
        _ => None,
    })
}

/// Phase samples among updates.
pub fn phases(updates: &[JobUpdate]) -> Vec<v1::PhaseSample> {
    updates
        .iter()
        .filter_map(|u| match &u.update {
            Some(Update::Event(v1::JobEvent {
                event: Some(v1::job_event::Event::Phase(p)),
                ..
            })) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// Log lines among updates, as (stream, line).
pub fn logs(updates: &[JobUpdate]) -> Vec<(String, String)> {
    updates
        .iter()
        .filter_map(|u| match &u.update {
            Some(Update::Event(v1::JobEvent {
                event: Some(v1::job_event::Event::Log(l)),
                ..
            })) => Some((l.stream.clone(), l.line.clone())),
            _ => None,
        })
        .collect()
}

/// Guard samples among updates.
pub fn guard_samples(updates: &[JobUpdate]) -> Vec<v1::GuardSample> {
    updates
        .iter()
        .filter_map(|u| match &u.update {
            Some(Update::Guard(g)) => Some(*g),
            _ => None,
        })
        .collect()
}

/// The job process every test agent starts: the `kiln` binary's `job-exec` verb
/// (`KILN_JOB_EXEC` overrides the binary's path, for test binaries carried to another machine).
pub fn job_command() -> Vec<std::ffi::OsString> {
    let kiln =
        std::env::var_os("KILN_JOB_EXEC").unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln").into());
    vec![kiln, "job-exec".into()]
}

/// A CPU agent config for `server`, working in `dir`.
pub fn cpu_agent(server: &LinkServer, dir: &std::path::Path, name: &str) -> AgentConfig {
    AgentConfig {
        coordinator: server.url(),
        name: name.into(),
        gpus: GpuSelection::None,
        mem_limit_bytes: Some(8 << 30),
        poll_secs: 0.05,
        job_command: job_command(),
        work_dir: dir.to_path_buf(),
        reconnect_min_secs: 0.05,
        reconnect_max_secs: 0.5,
        heartbeat_secs: 1.0,
        ..Default::default()
    }
}

/// A running agent and the switch that stops it.
pub struct RunningAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), kiln_agent::AgentError>>,
}

impl RunningAgent {
    /// Starts `kiln_agent::run` in the background.
    pub fn start(config: AgentConfig) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kiln_agent::run(config, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            task,
        }
    }

    /// Fires the shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> Result<(), kiln_agent::AgentError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("agent did not stop")
            .unwrap()
    }
}

/// A memtest job for a CPU slot.
pub fn memtest_job(id: u64, bytes: u64, steps: u32, hold_secs: f64, budget: u64) -> v1::Job {
    v1::Job {
        id,
        kind: v1::JobKind::Memtest as i32,
        attempt: 1,
        spec: Some(v1::JobSpec {
            spec: Some(v1::job_spec::Spec::Memtest(v1::MemtestSpec {
                bytes,
                steps,
                hold_secs,
                step_pause_secs: 0.15,
            })),
        }),
        resources: Some(v1::JobResources {
            gpus: 0,
            budget_bytes: budget,
            over_secs: 0.0,
            poll_secs: 0.05,
            max_attempts: 1,
            ..Default::default()
        }),
        state: v1::JobState::Assigned as i32,
        ..Default::default()
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    kiln_agent::procfs::is_alive(pid)
}

/// Waits until `pid` is gone.
pub async fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while alive(pid) {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Logs for tests (`KILN_LOG=debug cargo test`), once.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
