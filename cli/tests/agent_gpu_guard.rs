//! On a GPU box: the agent with NVML runs a GPU memtest (device memory through cudarc) within
//! its budget to SUCCEEDED, and one over its budget to KILLED with NVML's per-pid memory in the
//! record. Ignored by a plain `cargo test`; `--ignored` runs it on the GPU machine.

mod agent_harness;

use agent_harness::*;
use kiln_agent::GpuSelection;
use kiln_proto::v1::{job_result, JobState};
use std::time::Duration;

const GIB: u64 = 1 << 30;
const T: Duration = Duration::from_secs(120);

/// The GPU to test on. The test is `#[ignore]`d (listed as ignored by a plain `cargo test`);
/// run with `--ignored` where NVML and CUDA are not usable, it fails with the reason.
fn gpu_index() -> u32 {
    let nvml = nvml_wrapper::Nvml::init()
        .unwrap_or_else(|e| panic!("GPU guard test run where NVML is unavailable: {e}"));
    assert!(
        nvml.device_count().unwrap_or(0) > 0,
        "GPU guard test run where NVML reports no GPU"
    );
    // SAFETY: only probes whether the driver library can be loaded.
    assert!(
        unsafe { cudarc::driver::sys::is_culib_present() },
        "GPU guard test run where libcuda is not loadable"
    );
    std::env::var("KILN_TEST_GPU")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn gpu_memtest(id: u64, gpu: u32, bytes: u64, steps: u32, budget: u64) -> kiln_proto::v1::Job {
    let mut job = memtest_job(id, bytes, steps, 1.0, budget);
    job.resources.as_mut().unwrap().gpus = 1;
    job.resources.as_mut().unwrap().poll_secs = 0.1;
    job.gpu_indices = vec![gpu];
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA GPU"]
async fn gpu_memtest_within_budget_succeeds_and_over_budget_is_killed_by_nvml_guard() {
    init_logs();
    let gpu = gpu_index();
    let dir = tempfile::tempdir().unwrap();
    let server = LinkServer::start();
    let mut config = cpu_agent(&server, dir.path(), "gpu-test");
    config.gpus = GpuSelection::List(vec![gpu]);
    let agent = RunningAgent::start(config);
    server
        .wait_until("registration", T, |s| s.connections() == 1)
        .await;
    let reg = &server.registrations()[0];
    eprintln!("registered: {reg:?}");
    assert!(reg.nvml);
    assert_eq!(reg.gpus.len(), 1);
    assert!(reg.gpus[0].total_bytes > 8 * GIB && reg.gpus[0].uuid.starts_with("GPU-"));

    // 2 GiB in 4 steps against 6 GiB.
    server.assign(gpu_memtest(1, gpu, 2 * GIB, 4, 6 * GIB));
    let pid = server.started_pid(1, T).await;
    let fin = server.finished(1, T).await;
    let updates = server.updates(1);
    for p in phases(&updates) {
        eprintln!(
            "phase {} step {}: nvml pid_mem {:.3} GiB, device used {:.3} / {:.3} GiB, cuda free {:.3} / {:.3} GiB",
            p.phase, p.step,
            p.pid_mem as f64 / GIB as f64, p.device_used as f64 / GIB as f64,
            p.device_total as f64 / GIB as f64, p.cuda_free as f64 / GIB as f64,
            p.cuda_total as f64 / GIB as f64
        );
    }
    assert_eq!(
        fin.state,
        JobState::Succeeded as i32,
        "{fin:?} {:?}",
        logs(&updates)
    );
    let Some(job_result::Result::Memtest(m)) = fin.result.clone().and_then(|r| r.result) else {
        panic!("memtest result expected")
    };
    assert_eq!((m.allocated_bytes, m.device.as_str()), (2 * GIB, "cuda"));
    let ph = phases(&updates);
    let last_step = &ph[3];
    assert!(
        last_step.pid_mem >= 2 * GIB,
        "NVML per-pid memory {last_step:?}"
    );
    assert!(last_step.cuda_total > 0 && last_step.cuda_free < last_step.cuda_total);
    assert!(fin.peak_mem >= 2 * GIB);
    eprintln!(
        "job 1 peak {:.3} GiB, pid {pid}",
        fin.peak_mem as f64 / GIB as f64
    );

    // 12 GiB in 6 steps against 5 GiB, over_secs 0.
    server.assign(gpu_memtest(2, gpu, 12 * GIB, 6, 5 * GIB));
    let pid = server.started_pid(2, T).await;
    let fin = server.finished(2, T).await;
    eprintln!("job 2: {fin:?}");
    assert_eq!(fin.state, JobState::Killed as i32, "{fin:?}");
    let kill = fin.kill.unwrap();
    assert_eq!(kill.pid, pid);
    assert_eq!(kill.limit, 5 * GIB);
    assert!(
        kill.pid_mem > 5 * GIB && kill.pid_mem < 12 * GIB,
        "{kill:?}"
    );
    assert!(kill.total_mem >= kill.pid_mem);
    assert_eq!(kill.phase, "memtest_step");
    assert!(wait_dead(pid, Duration::from_secs(10)).await);
    // Its memory is back: NVML no longer lists the pid.
    let nvml = nvml_wrapper::Nvml::init().unwrap();
    let dev = nvml.device_by_index(gpu).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dev
        .running_compute_processes()
        .unwrap()
        .iter()
        .any(|p| p.pid == pid)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "killed pid still holds GPU memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.shutdown().await.unwrap();
}
