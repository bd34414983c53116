//! A job's life through the real API: submit → assign → started → phases → finished, with
//! telemetry history, the event stream, validation errors and the health/reflection services.

mod common;

use common::*;
use futures::StreamExt;
use kiln_proto::v1::{
    job_event, job_update, GetJobRequest, GuardSample, JobEvent, JobState, PhaseSample,
    QueryTelemetryRequest, TelemetrySource, WatchJobRequest,
};
use tonic::Code;

fn phase(name: &str, pid_mem: u64) -> job_update::Update {
    job_update::Update::Event(JobEvent {
        event: Some(job_event::Event::Phase(PhaseSample {
            phase: name.into(),
            pid_mem,
            device_used: pid_mem + GIB,
            device_total: 80 * GIB,
            ..Default::default()
        })),
        ..Default::default()
    })
}

#[tokio::test]
async fn submit_assign_run_succeed_with_telemetry_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "gpu-a", 80, 0).await;
    assert_eq!(a.registered.lease_secs, 1);

    let job = submit(&mut h, 1, 10).await;
    assert_eq!(job.state(), JobState::Queued);
    assert!(job.id > 0);

    let assigned = expect_assign(&mut a).await;
    assert_eq!((assigned.id, assigned.attempt), (job.id, 1));
    assert_eq!(assigned.agent, "gpu-a");
    assert_eq!(assigned.gpu_indices, vec![0]);
    assert_eq!(assigned.resources.as_ref().unwrap().poll_secs, 0.5);
    wait_state(&mut h, job.id, JobState::Assigned).await;

    a.started(job.id, 1, 4242).unwrap();
    wait_state(&mut h, job.id, JobState::Running).await;
    a.update(job.id, 1, phase("model_loaded", 2 * GIB)).unwrap();
    let guard = |at_ms, pid_mem| {
        job_update::Update::Guard(GuardSample {
            at_ms,
            pid_mem,
            device_used: pid_mem,
            device_total: 80 * GIB,
        })
    };
    a.update(job.id, 1, guard(1, 3 * GIB)).unwrap();
    a.update(job.id, 1, guard(2, 7 * GIB)).unwrap(); // the peak
    a.update(job.id, 1, guard(3, 5 * GIB)).unwrap();
    a.update(job.id, 1, phase("forward_done", 6 * GIB)).unwrap();
    a.finished(job.id, 1, JobState::Succeeded).unwrap();
    let done = wait_state(&mut h, job.id, JobState::Succeeded).await;
    assert_eq!(done.peak_mem, 7 * GIB, "the guard's exact peak is kept");
    assert!(done.result.is_some());
    assert!(done.finished_at_ms >= done.started_at_ms && done.started_at_ms > 0);

    let phases = h
        .client
        .query_telemetry(QueryTelemetryRequest {
            job_id: job.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    let names: Vec<&str> = phases
        .iter()
        .map(|r| r.sample.as_ref().unwrap().phase.as_str())
        .collect();
    assert_eq!(names, vec!["model_loaded", "forward_done"]);
    assert!(phases
        .iter()
        .all(|r| r.source() == TelemetrySource::Phase && r.agent == "gpu-a"));
    assert_eq!(phases[0].sample.as_ref().unwrap().pid_mem, 2 * GIB);
    assert_eq!(phases[0].sample.as_ref().unwrap().device_total, 80 * GIB);

    let with_guard = h
        .client
        .query_telemetry(QueryTelemetryRequest {
            job_id: job.id,
            include_guard: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(with_guard.len(), 5);
    let at: Vec<u64> = with_guard
        .iter()
        .map(|r| r.sample.as_ref().unwrap().at_ms)
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] <= w[1]),
        "rows in time order: {at:?}"
    );
    let only_forward = h
        .client
        .query_telemetry(QueryTelemetryRequest {
            phase: "forward_done".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(only_forward.len(), 1);

    // The whole event log, gap-free from 1, ending at the terminal state; the stream ends.
    let events: Vec<JobEvent> = events_after(&mut h, job.id, 0).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let states: Vec<JobState> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(job_event::Event::State(s)) => Some(s.state()),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        vec![
            JobState::Queued,
            JobState::Assigned,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    let after: Vec<JobEvent> = events_after(&mut h, job.id, 3).await;
    assert_eq!(after.first().map(|e| e.seq), Some(4));
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn watch_streams_live_events_until_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let mut a = agent(&h, "a", 80, 0).await;
    let job = submit(&mut h, 1, 1).await;
    let mut watch = h
        .client
        .watch_job(WatchJobRequest {
            id: job.id,
            after_seq: 0,
            stored_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.seq, 1);
    let j = expect_assign(&mut a).await;
    a.started(j.id, j.attempt, 1).unwrap();
    a.update(j.id, j.attempt, phase("prefill_done", GIB))
        .unwrap();
    a.finished(j.id, j.attempt, JobState::Failed).unwrap();
    let rest: Vec<JobEvent> = tokio::time::timeout(WAIT, watch.map(|e| e.unwrap()).collect())
        .await
        .expect("the stream ends after the terminal state");
    assert_eq!(rest.len(), 4, "ASSIGNED, RUNNING, phase, FAILED: {rest:?}");
    assert!(matches!(rest[2].event, Some(job_event::Event::Phase(_))));
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_the_right_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;

    // Nobody registered yet: any budget is accepted and queued.
    let early = submit(&mut h, 1, 1000).await;
    assert_eq!(early.state(), JobState::Queued);

    let _a = agent(&h, "a", 80, 16).await;
    let err = h
        .client
        .get_job(GetJobRequest { id: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .client
        .cancel_job(kiln_proto::v1::CancelJobRequest { id: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let err = h
        .client
        .submit_job(memtest_request(1, 81 * GIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("80.00 GiB"), "{}", err.message());
    let err = h
        .client
        .submit_job(memtest_request(0, 17 * GIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("16.00 GiB"), "{}", err.message());
    let err = h
        .client
        .submit_job(memtest_request(2, GIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    let err = h
        .client
        .submit_job(memtest_request(1, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut no_spec = memtest_request(1, GIB);
    no_spec.spec = None;
    let err = h.client.submit_job(no_spec).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = h
        .client
        .drain_agent(kiln_proto::v1::DrainAgentRequest {
            name: "nobody".into(),
            resume: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let ch = h.server.channel().await.unwrap();
    let mut health = HealthClient::new(ch.clone());
    for service in ["", "kiln.v1.Coordinator", "kiln.v1.AgentLink"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(ch);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "kiln.v1.Coordinator",
        "kiln.v1.AgentLink",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn hostile_specs_are_refused_at_submit_naming_the_field() {
    use kiln_proto::v1::{job_spec::Spec, GenerateSpec, JobSpec, MemtestSpec, Sampling};
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path()).await;
    let memtest = |bytes: u64, steps: u32, hold_secs: f64| {
        let mut r = memtest_request(1, GIB);
        r.spec = Some(JobSpec {
            spec: Some(Spec::Memtest(MemtestSpec {
                bytes,
                steps,
                hold_secs,
                step_pause_secs: 0.0,
            })),
        });
        r
    };
    let generate = |model: &str, sampling: Option<Sampling>, kv: &str| {
        let mut r = memtest_request(1, GIB);
        r.spec = Some(JobSpec {
            spec: Some(Spec::Generate(GenerateSpec {
                model: model.into(),
                prompt: "hi".into(),
                max_tokens: 4,
                sampling,
                kv: kv.into(),
                ..Default::default()
            })),
        });
        r
    };
    let mut tiny_poll = memtest_request(1, GIB);
    tiny_poll.resources.as_mut().unwrap().poll_secs = 1e-9;
    let cases = vec![
        (memtest(1 << 20, 1, 1e308), "memtest.hold_secs"),
        (memtest(1 << 20, 1, f64::NAN), "memtest.hold_secs"),
        (memtest(1 << 20, u32::MAX, 0.0), "memtest.steps"),
        (memtest(u64::MAX, 1, 0.0), "memtest.bytes"),
        (memtest(1 << 20, 0, 0.0), "memtest.steps"),
        (generate("../../../../etc", None, ""), "climbs out"),
        (generate("", None, ""), "generate.model"),
        (generate("tiny", None, "bogus"), "generate.kv"),
        (
            generate(
                "tiny",
                Some(Sampling {
                    temperature: -1.0,
                    ..Default::default()
                }),
                "",
            ),
            "generate.sampling.temperature",
        ),
        (
            generate(
                "tiny",
                Some(Sampling {
                    top_p: 7.0,
                    ..Default::default()
                }),
                "",
            ),
            "generate.sampling.top_p",
        ),
        (tiny_poll, "resources.poll_secs"),
    ];
    for (req, field) in cases {
        let err = h.client.submit_job(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().contains(field),
            "{} should name {field}",
            err.message()
        );
    }
    // Nothing was queued.
    let listed = h
        .client
        .list_jobs(kiln_proto::v1::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty());
}
