//! Every flag of every verb, defined once with its help text. `cmd/` holds what each verb does.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Kiln: a gRPC coordinator for GPU work on NVFP4 language models.
///
/// Start a coordinator and one agent per GPU box, then submit memtest, generate, train and
/// export jobs. Every job runs under a hard memory budget enforced by the agent's guard, and
/// streams per-phase memory telemetry back. `kiln demo` shows the whole loop on one machine.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of data verbs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A human-readable table.
    #[default]
    Table,
    /// Stable JSON (field names follow the proto, snake_case); what scripts should read.
    Json,
    /// Comma-separated values (telemetry only; other verbs print JSON for csv).
    Csv,
}

/// How to reach the coordinator; shared by every client verb.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Coordinator connection and output")]
pub struct ClientArgs {
    /// Coordinator address: host:port or http://host:port.
    #[arg(
        long,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub coordinator: String,
    /// Bearer token sent with every request (when the coordinator requires one).
    #[arg(long, env = "KILN_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: the gRPC API, the sled store and the scheduler.
    Coordinator(CoordinatorArgs),
    /// Run a GPU agent: dial the coordinator, report GPUs, run jobs under the guard.
    Agent(AgentArgs),
    /// Submit a job (memtest, generate, train, export).
    Submit(SubmitArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Show one job.
    Job(JobIdArgs),
    /// Cancel a queued or running job (a running job's process is killed).
    Cancel(JobIdArgs),
    /// Stream a job's events until it ends; exits non-zero unless it succeeded.
    Watch(JobIdArgs),
    /// Show a job's memory telemetry: phase samples and the guard's time series.
    Telemetry(TelemetryArgs),
    /// List agents and their GPUs.
    Agents(ClientOnlyArgs),
    /// Stop placing new jobs on an agent (its running jobs finish); `--resume` undoes it.
    Drain(DrainArgs),
    /// Quantize a Hugging Face checkpoint to NVFP4 (local; no coordinator needed).
    Quantize(QuantizeArgs),
    /// Write a random-weight model of a known shape (e.g. qwen3-8b) as a model directory, to
    /// rehearse budgets, the guard and benchmarks without downloading one (local).
    RandomModel(RandomModelArgs),
    /// Benchmarks (each prints its baseline measured in the same run).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// One-command quick start: coordinator + agent in-process, jobs through the real API.
    Demo(DemoArgs),
    /// Report a phase (a memory sample) from inside an exec job: `kiln phase model_loaded`.
    Phase(PhaseArgs),
    /// Print a job's log (its stdout and stderr lines, and the agent's notes).
    Logs(LogsArgs),
    /// Internal: the job process an agent starts (reads a job request on stdin).
    #[command(hide = true, name = "job-exec")]
    JobExec,
}

/// `kiln coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Directory of the sled store (jobs, events, telemetry). Created if missing.
    #[arg(long, default_value = "./kiln-data")]
    pub data_dir: PathBuf,
    /// TOML config file (fields of CoordinatorConfig; flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seconds an agent may be disconnected before its running jobs become LOST.
    #[arg(long)]
    pub lease_secs: Option<f64>,
    /// Require this bearer token from every client and agent (set it whenever the coordinator
    /// listens beyond loopback).
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `kiln agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Coordinator address.
    #[arg(
        long,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// Agent name (unique among agents). Defaults to the host name.
    #[arg(long)]
    pub name: Option<String>,
    /// GPUs to offer: `all`, `none` (a CPU agent) or a list of NVML indices like `0,2`.
    #[arg(long, default_value = "all")]
    pub gpus: String,
    /// Cap each GPU's capacity at this many GiB (e.g. 108 on a 141 GB H200 to keep room for
    /// other work).
    #[arg(long)]
    pub gpu_limit_gb: Option<f64>,
    /// Host memory offered to CPU jobs, in GiB (default: all of MemTotal).
    #[arg(long)]
    pub mem_limit_gb: Option<f64>,
    /// Default seconds between guard polls (a job's own --poll-secs wins).
    #[arg(long, default_value_t = 0.5)]
    pub poll_secs: f64,
    /// Default seconds over budget before the guard kills (0 = at the first sample over).
    #[arg(long, default_value_t = 0.0)]
    pub over_secs: f64,
    /// Directory for job scratch space and generate sessions.
    #[arg(long, default_value = "./kiln-agent")]
    pub work_dir: PathBuf,
    /// Bearer token the coordinator requires (its --token), if any.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Run exec jobs: any command a user submits with `kiln submit exec`, as this agent's user.
    /// Off by default; turn it on only where every submitter may run code on this box.
    #[arg(long)]
    pub allow_exec: bool,
    /// Run exec jobs as this user (and its primary group), e.g. `nobody`; needs the agent to run
    /// as root. The job's scratch directory is given to that user.
    #[arg(long, value_name = "NAME", requires = "allow_exec")]
    pub exec_user: Option<String>,
    /// Restrict the host paths jobs may name (models, datasets, checkpoints, outputs, exec
    /// working directories) to this directory; repeatable. A job naming a path outside every
    /// root is FAILED with the roots in its error. Default: no restriction.
    #[arg(long = "data-root", value_name = "DIR")]
    pub data_roots: Vec<PathBuf>,
    /// Log bytes kept per job (stdout + stderr lines); output beyond it is dropped with a note.
    #[arg(long, default_value_t = 16.0, value_name = "MIB")]
    pub log_cap_mib: f64,
}

/// Flags every submit kind shares.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Placement, guard and following")]
pub struct SubmitCommon {
    /// Memory budget per GPU (host memory for --gpus 0), in GiB. The guard kills the job
    /// when its processes use more. Default by kind: memtest --gib + 1, generate, export and
    /// exec 4, train 8.
    #[arg(long)]
    pub budget_gb: Option<f64>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Number of GPUs; 0 asks for a CPU slot (host memory).
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// Seconds over budget before the guard kills (0 = at the first sample over; at most 86400).
    #[arg(long, default_value_t = 0.0)]
    pub over_secs: f64,
    /// Seconds between guard polls (0.05 to 60).
    #[arg(long, default_value_t = 0.5)]
    pub poll_secs: f64,
    /// Attempts in all when the job is LOST with its agent (1 = never retry; at most 100).
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// After a guard kill, retry as a new attempt with a larger budget (within --max-attempts):
    /// `grow=1.5` multiplies the budget by 1.5 each time; `grow=2,max-budget-gb=60` caps it.
    /// Every attempt stays in the job's history (`kiln job ID`).
    #[arg(long, value_name = "grow=F[,max-budget-gb=Y]")]
    pub on_kill: Option<String>,
    /// A label for the job.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub name: String,
    /// Stream the job's events until it ends; exit non-zero unless it succeeded.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// With --follow: print every event (each phase sample, the job's stderr log lines, every
    /// progress update) instead of the first sample of each phase and a summary.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// `kiln submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job kind.
    #[command(subcommand)]
    pub kind: SubmitKind,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The job kinds.
#[derive(Debug, Subcommand)]
pub enum SubmitKind {
    /// Allocate memory in steps on the device (host memory with --gpus 0), reporting a phase
    /// after each step. For validating budgets and the guard.
    Memtest(MemtestArgs),
    /// Generate text with a model.
    Generate(GenerateArgs),
    /// Train a model on a JSONL chat dataset.
    Train(TrainArgs),
    /// Export a checkpoint to safetensors or an NVFP4 layout.
    Export(ExportArgs),
    /// Run any command under the guard, on an agent started with --allow-exec:
    /// `kiln submit exec --budget-gb 20 -- python train.py --epochs 1`.
    Exec(ExecArgs),
}

/// `kiln submit exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Extra environment variable for the command, as NAME=VALUE; repeatable. The agent also
    /// sets CUDA_VISIBLE_DEVICES (the assigned GPUs), KILN_JOB_ID, KILN_ATTEMPT and
    /// KILN_PHASE_SOCKET (what `kiln phase` reports to).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory on the agent's host (absolute; default: a scratch directory of the job,
    /// removed when it ends).
    #[arg(long)]
    pub workdir: Option<String>,
    /// On cancel: seconds between SIGTERM to the command's process group and SIGKILL.
    #[arg(long, default_value_t = 10.0)]
    pub grace_secs: f64,
    /// The command and its arguments, after `--`. Run directly, not through a shell (write
    /// `sh -c '…'` for one). Its stdout and stderr become the job's log (`kiln logs ID`), kept
    /// up to the agent's log cap (16 MiB per job by default). Exit 0 → SUCCEEDED, anything
    /// else → FAILED with the exit code or signal.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
    #[command(flatten)]
    pub common: SubmitCommon,
}

/// `kiln submit memtest`.
#[derive(Debug, Args)]
pub struct MemtestArgs {
    /// GiB to allocate in all.
    #[arg(long)]
    pub gib: f64,
    /// Number of equal allocation steps (1 to 4096).
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Seconds to hold the memory after the last step (0 to 86400).
    #[arg(long, default_value_t = 1.0)]
    pub hold_secs: f64,
    /// Seconds to pause between steps (0 to 86400).
    #[arg(long, default_value_t = 0.2)]
    pub step_pause_secs: f64,
    #[command(flatten)]
    pub common: SubmitCommon,
}

/// `kiln submit generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// `tiny` (bundled) or a Hugging Face model directory on the agent's host.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// The user message (rendered with the model's chat template).
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt raw, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum new tokens (1 to 1048576).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy; at most 100).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Nucleus sampling threshold, 0 to 1 (0 or 1 = off).
    #[arg(long, default_value_t = 0.0)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `cache` (KV cache), `replay` (recompute each token) or `ab` (both; reports agreement).
    #[arg(long, default_value = "cache")]
    pub kv: String,
    /// Continue (or start) this multi-turn session; its turns go to the agent holding it.
    #[arg(long)]
    pub session: Option<String>,
    /// Where to generate: by default on the GPU the job is placed on (NVFP4 weights resident,
    /// decode as a CUDA graph), on the CPU in a CPU slot (--gpus 0). `cpu` forces the CPU;
    /// `cuda` fails where CUDA cannot be used (never a silent CPU run).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub device: String,
    #[command(flatten)]
    pub common: SubmitCommon,
}

/// `kiln submit train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// `tiny`, a Hugging Face directory, or a Kiln checkpoint directory to start from.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// JSONL chat dataset, a path on the agent's host (`whoami` = the bundled WhoAmI set). One
    /// sample per line: {"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]};
    /// the loss is taken on the assistant turns only.
    #[arg(long, default_value = "whoami")]
    pub dataset: String,
    /// Optimizer steps (1 to 10,000,000).
    #[arg(long, default_value_t = 100)]
    pub steps: u32,
    /// Sequence length in tokens (1 to 1048576).
    #[arg(long, default_value_t = 128)]
    pub seq_len: u32,
    /// Samples per step (1 to 65536).
    #[arg(long, default_value_t = 8)]
    pub batch: u32,
    /// AdamW learning rate (0 to 10; 0 keeps the weights bit-identical while the moments update).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// `nvfp4-ste` (full-precision master weights), `nvfp4-full` (packed weights only) or `none`.
    #[arg(long, default_value = "nvfp4-ste")]
    pub quant: String,
    /// Rows per chunk of the packed optimizer step (nvfp4-full); bounds its peak memory.
    #[arg(long, default_value_t = 32)]
    pub step_chunk_rows: u32,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output checkpoint directory on the agent's host.
    #[arg(long)]
    pub out: String,
    /// Resume from the latest checkpoint in --out. (A job retried after LOST resumes its own
    /// earlier attempt's checkpoint without this flag.)
    #[arg(long)]
    pub resume: bool,
    /// Also write a resumable checkpoint to --out every N steps (0 = only at the end). With
    /// --max-attempts 2 or more, a job whose agent dies continues from the last one.
    #[arg(long, default_value_t = 0)]
    pub save_every: u32,
    /// Micro-batches of --batch samples whose gradients add up to one optimizer step: the step
    /// sees batch × grad-accum samples while activations are held for --batch at a time.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u32,
    /// Clip the gradients to this global L2 norm before each step (0 = no clipping).
    #[arg(long, default_value_t = kiln_job::spec::DEFAULT_CLIP_GRAD)]
    pub clip_grad: f64,
    /// Element type of the AdamW moments: `f32` (8 bytes per parameter) or `bf16` (4).
    #[arg(long, default_value = "f32")]
    pub moments: String,
    /// Write checkpoints without the AdamW moments (the weights only): far smaller and faster
    /// for large models (f32 moments of an 8B model are 65 GB). A run resumed from such a
    /// checkpoint (--resume, or a retry after LOST) restarts the moments from zero.
    #[arg(long)]
    pub save_only_model: bool,
    /// Recompute each layer's activations just before its backward instead of keeping them
    /// (GPU): activation memory for one layer instead of all of them, for about one more
    /// forward per step — for long --seq-len. The budget check counts it.
    #[arg(long)]
    pub recompute: bool,
    /// Where to train: by default on the GPU the job is placed on (every --quant mode; the job
    /// fails at once, with the numbers and the --seq-len / --moments that would fit, when its
    /// planned bytes exceed --budget-gb), on the CPU in a CPU slot (--gpus 0). `cpu` forces
    /// the CPU; `cuda` fails rather than run anywhere but the GPU.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub device: String,
    #[command(flatten)]
    pub common: SubmitCommon,
}

/// `kiln submit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint directory to export (on the agent's host).
    #[arg(long)]
    pub checkpoint: String,
    /// `safetensors` (bf16, HF layout), `nvfp4-modelopt` or `nvfp4-compressed-tensors`.
    #[arg(long, default_value = "nvfp4-modelopt")]
    pub format: String,
    /// Output directory.
    #[arg(long)]
    pub out: String,
    #[command(flatten)]
    pub common: SubmitCommon,
}

/// `kiln jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this state (QUEUED, RUNNING, SUCCEEDED, KILLED…); repeatable.
    #[arg(long = "state")]
    pub states: Vec<String>,
    /// Only jobs of this kind (memtest, generate, train, export).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only jobs placed on this agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// At most this many jobs (follows pages as needed).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Verbs that take one job id.
#[derive(Debug, Args)]
pub struct JobIdArgs {
    /// The job id (as printed by `kiln submit` and `kiln jobs`).
    pub id: u64,
    /// `watch`: print every event (each phase sample, the job's stderr log lines, every
    /// progress update) instead of the first sample of each phase and a summary.
    #[arg(short, long)]
    pub verbose: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Verbs that only need the coordinator.
#[derive(Debug, Args)]
pub struct ClientOnlyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `kiln telemetry`.
#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// The job id.
    pub id: u64,
    /// Only this phase (e.g. model_loaded, memtest_step).
    #[arg(long)]
    pub phase: Option<String>,
    /// Include the guard's time series, not only phase samples.
    #[arg(long)]
    pub guard: bool,
    /// Draw memory over time to this file (.png or .svg); implies --guard.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `kiln drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The agent's name (see `kiln agents`).
    pub agent: String,
    /// Put a drained agent back to work instead (new jobs may be placed on it again). A drained
    /// agent stays drained across coordinator and agent restarts until resumed.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `kiln demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's data directory here instead of a temporary one.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// `kiln bench`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Coordinator throughput, dispatch latency and restart recovery over loopback gRPC.
    Scheduler(BenchSchedulerArgs),
    /// NVFP4 CUDA kernels against the device-copy bandwidth and cuBLAS bf16 (needs a GPU).
    Kernels(crate::cmd::bench_kernels::BenchKernelsArgs),
    /// Engine decode (KV cache vs replay) on the tiny and a 0.5B-shaped model, and multi-turn
    /// session latency (CPU).
    Engine(crate::cmd::bench_engine::BenchEngineArgs),
    /// The GPU train step (none, nvfp4-ste) on the tiny and a 0.5B-shaped model against a
    /// PyTorch anchor measured in the same run (needs a GPU).
    Train(crate::cmd::bench_train::BenchTrainArgs),
}

/// `kiln bench scheduler`.
#[derive(Debug, Args)]
pub struct BenchSchedulerArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Jobs submitted for the throughput phase.
    #[arg(long, default_value_t = 5_000)]
    pub submits: usize,
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Jobs whose dispatch latency is measured.
    #[arg(long, default_value_t = 2_000)]
    pub dispatch_jobs: usize,
    /// Queued jobs for the recovery phase.
    #[arg(long, default_value_t = 10_000)]
    pub recovery_jobs: usize,
}

/// Output layout of `kiln quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeFormat {
    /// NVIDIA ModelOpt layout: `weight` (U8 codes), `weight_scale` (F8_E4M3 per 16 inputs),
    /// `weight_scale_2` (F32 tensor scale) and hf_quant_config.json.
    #[value(name = "nvfp4-modelopt")]
    ModelOpt,
    /// compressed-tensors `nvfp4-pack-quantized` layout: `weight_packed`, `weight_scale`,
    /// `weight_global_scale` (the reciprocal tensor scale); quantization_config in config.json.
    #[value(name = "nvfp4-compressed-tensors")]
    CompressedTensors,
}

/// Where the quantization runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeDevice {
    /// The CPU reference (always available).
    Cpu,
    /// CUDA device 0; fails with a clear error if CUDA is not usable (never falls back).
    Cuda,
}

/// `kiln quantize`: turn a Hugging Face checkpoint into an NVFP4 one.
///
/// Linear-layer weights (2-D `*.weight`, K a multiple of 16) are quantized to NVFP4 (E2M1
/// values, one E4M3 scale per 16 inputs, one F32 tensor scale; ModelOpt rounding, bit-exact).
/// Embeddings, lm_head, norms and biases are kept in their original dtype (lm_head stays full
/// precision because the output projection is the most accuracy-sensitive layer; it is listed
/// in exclude_modules / ignore). config.json and tokenizer files are copied. The CPU and CUDA
/// paths write identical bytes.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model: a Hugging Face directory (config.json, model.safetensors or sharded
    /// model-*.safetensors with model.safetensors.index.json) or one .safetensors file.
    #[arg(long, value_name = "DIR|FILE.safetensors")]
    pub model: PathBuf,
    /// Output directory (created; must not be the input directory).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Checkpoint layout to write.
    #[arg(long, value_enum, default_value_t = QuantizeFormat::ModelOpt)]
    pub format: QuantizeFormat,
    /// Run the quantization on the CPU or on CUDA device 0 (same bytes either way).
    #[arg(long, value_enum, default_value_t = QuantizeDevice::Cpu)]
    pub device: QuantizeDevice,
    /// Output format of the summary: a table, or JSON for scripts (csv prints JSON).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// The same as `-o json` (kept for scripts written before `-o`).
    #[arg(long, hide = true)]
    pub json: bool,
}

/// Layout of the linear weights `kiln random-model` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RandomModelFormat {
    /// bf16 weights (a plain Hugging Face model; train and generate jobs quantize it).
    Bf16,
    /// NVFP4 ModelOpt layout (what an `nvfp4-full` train job loads as it is).
    #[value(name = "nvfp4-modelopt")]
    ModelOpt,
    /// NVFP4 compressed-tensors layout.
    #[value(name = "nvfp4-compressed-tensors")]
    CompressedTensors,
}

/// `kiln random-model`: a model of a known shape with seeded random weights.
///
/// Writes config.json, the weights (shards of at most 4 GiB) and the bundled tiny tokenizer
/// with its ChatML template, so train (`--dataset whoami`), generate and export jobs take the
/// directory as `--model` like a downloaded model. The weights are noise: use it for memory
/// budgets, the guard, step times and load times — not for what the model says.
#[derive(Debug, Args)]
pub struct RandomModelArgs {
    /// The shape: tiny, qwen2.5-0.5b, qwen2.5-7b, qwen2.5-14b or qwen3-8b.
    #[arg(long)]
    pub shape: String,
    /// Output directory (created; must not already hold a model).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Layout of the linear weights (embeddings and norms are bf16 either way).
    #[arg(long, value_enum, default_value_t = RandomModelFormat::ModelOpt)]
    pub format: RandomModelFormat,
    /// Seed of the weights (the same seed writes the same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `kiln phase`.
#[derive(Debug, Args)]
pub struct PhaseArgs {
    /// The phase name (e.g. model_loaded, forward_done, backward_done, optimizer_done).
    pub name: String,
    /// The step within the job.
    #[arg(long, default_value_t = 0)]
    pub step: u32,
    /// A number to keep with the sample, as NAME=VALUE (e.g. loss=1.25); repeatable.
    #[arg(long = "metric", value_name = "NAME=VALUE")]
    pub metrics: Vec<String>,
    /// Tensor bytes by category as CATEGORY=BYTES (weights, grads, optimizer_state,
    /// activations, kv_cache, …); repeatable.
    #[arg(long = "bytes", value_name = "CATEGORY=BYTES")]
    pub bytes: Vec<String>,
}

/// `kiln logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The job id.
    pub id: u64,
    /// Keep printing new lines until the job ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N lines (of what is there when the command starts).
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    #[command(flatten)]
    pub client: ClientArgs,
}
