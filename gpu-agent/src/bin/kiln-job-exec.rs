//! The job process on its own: reads one job request (JSON) on stdin, runs it, reports on
//! stdout. The same thing as the hidden `kiln job-exec` verb; the agent's tests start it.

fn main() {
    std::process::exit(kiln_engine::exec::job_process_main());
}
