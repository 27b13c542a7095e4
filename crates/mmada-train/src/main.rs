//! `mmada-train`: train LLaDA / MMaDA masked-diffusion models.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mmada_model::ModelConfig;
use mmada_model::backend::DeviceSpec;
use mmada_model::checkpoint::{DiskDtype, SaveOptions};
use mmada_train::dist::DistConfig;
use mmada_train::plan;
use mmada_train::recipe::{Recipe, SftRecipe, UniGrpoRecipe};
use mmada_train::sft::{Sft, SftOutcome, StepReport};
use mmada_train::trainer::{Resume, RunOptions, TrainLoop, TrainRecipe, model_config_for_plan};
use mmada_train::unigrpo::{GrpoStepReport, UniGrpo, UniGrpoOutcome};

mod data_cmd;

#[derive(Parser, Debug)]
#[command(
    name = "mmada-train",
    version,
    about = "Train masked-diffusion multimodal language models (LLaDA / MMaDA)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Masked-diffusion SFT / mixed long-CoT fine-tuning from a recipe
    /// (e.g. recipes/quickstart.yaml, recipes/mixed_cot.yaml).
    Sft(TrainArgs),
    /// UniGRPO reinforcement learning (spec §5) with pluggable rewards from a recipe
    /// (e.g. recipes/quickstart_unigrpo.yaml, recipes/unigrpo_gsm8k.yaml).
    Unigrpo(TrainArgs),
    /// Run burn-collective's global orchestrator for multi-node training (node rank 0 starts
    /// one in-process unless given --external-orchestrator).
    Orchestrator {
        /// Port to listen on (all interfaces; set MMADA_RUN_TOKEN here and on every node so that
        /// only the run's nodes may register).
        #[arg(long, default_value_t = 29500)]
        port: u16,
    },
    /// Replay metrics that could not reach wandb (offline runs, outages) from
    /// RUN_DIR/wandb-spool.jsonl (or $WANDB_DIR/<run name>/ when the run set WANDB_DIR). Uses
    /// WANDB_API_KEY (or ~/.netrc) and WANDB_BASE_URL.
    WandbSync {
        /// The run directory (runs/<name>).
        run_dir: PathBuf,
    },
    /// Draw a run's curves from RUN_DIR/metrics.jsonl into RUN_DIR/plots/metrics.png (SFT:
    /// loss, eval loss, lr, grad norm; UniGRPO: reward, per-reward means, KL, clip ratio,
    /// completion length, ...) and tile PNG samples (RUN_DIR/samples/, or --images DIR) into
    /// RUN_DIR/plots/samples.png. Every training run does this when it ends.
    Plot {
        /// The run directory (runs/<name>).
        run_dir: PathBuf,
        /// A folder of PNG/JPEG images (text-to-image outputs) to tile instead of
        /// RUN_DIR/samples/.
        #[arg(long)]
        images: Option<PathBuf>,
    },
    /// Write the quickstart's generated data: arithmetic Q&A (jsonl) and a character-level
    /// tokenizer.json.
    Synth {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Number of examples.
        #[arg(long, default_value_t = 4000)]
        n: usize,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the Hugging Face config.json of a model preset (tiny, llada_8b, mmada_8b).
    Config {
        /// Model preset.
        #[arg(long, default_value = "tiny")]
        preset: String,
    },
    /// Create a randomly initialised model (upstream "mitchell" init) as a Hugging Face
    /// checkpoint directory: config.json + model.safetensors.
    Init {
        /// Model preset: tiny, llada_8b, mmada_8b.
        #[arg(long, conflicts_with = "config", default_value = "tiny")]
        preset: String,
        /// A Hugging Face config.json to use instead of a preset.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// On-disk dtype: bf16, f16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Split weights into shards of at most this many MB.
        #[arg(long)]
        shard_mb: Option<u64>,
        /// Replace an existing output directory.
        #[arg(long)]
        overwrite: bool,
    },
    /// Fold a LoRA adapter (PEFT format, or a LoRA training checkpoint) into its base
    /// checkpoint and write a merged Hugging Face checkpoint: W + (alpha/r)·B·A.
    MergeLora {
        /// The base Hugging Face checkpoint directory (config.json + safetensors) or Hub id.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The adapter: a directory with adapter_config.json + adapter_model.safetensors, or
        /// a LoRA training checkpoint (runs/NAME/checkpoints/step-N, its adapter/).
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// On-disk dtype: bf16, f16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Split weights into shards of at most this many MB.
        #[arg(long)]
        shard_mb: Option<u64>,
        /// Replace an existing output directory.
        #[arg(long)]
        overwrite: bool,
    },
    /// Per-device memory plan of a recipe (weights, gradients, optimizer state, activations,
    /// logits, rollout, collective buckets) and whether it fits the GPU. Reads only the
    /// model's config.json (or a preset), never the weights.
    Plan(PlanArgs),
    /// Inspect dataset manifests and check a recipe's data.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
}

/// The arguments of `sft` and `unigrpo`.
#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Recipe YAML.
    #[arg(long)]
    recipe: PathBuf,
    /// Override a recipe key: --set optimizer.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the resolved recipe and exit.
    #[arg(long)]
    print_config: bool,
    /// Resume: `latest` (the run directory's newest checkpoint) or a checkpoint directory.
    #[arg(long)]
    resume: Option<String>,
    #[command(flatten)]
    dist: DistArgs,
}

/// Which trainer a recipe is for.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum RecipeKind {
    /// `mmada-train sft`.
    Sft,
    /// `mmada-train unigrpo`.
    Unigrpo,
}

/// The arguments of `plan`.
#[derive(clap::Args, Debug)]
struct PlanArgs {
    /// The trainer (default: detected from the recipe: a `grpo:` section is UniGRPO).
    kind: Option<RecipeKind>,
    /// Recipe YAML.
    #[arg(long)]
    recipe: PathBuf,
    /// Override a recipe key: --set data.lm.batch_size=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Memory per device: 80GB (10⁹ bytes), 80GiB, 81920MiB.
    #[arg(long, default_value = "80GB")]
    gpu_mem: String,
    /// Free fraction of the device to keep, in percent (CUDA context, allocator).
    #[arg(long, default_value_t = 10.0)]
    headroom: f64,
    /// Devices per node (default: those of train.device).
    #[arg(long)]
    devices: Option<usize>,
    /// Nodes.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// What-if: sharding none | optimizer | optimizer_and_gradients (recipe `train.sharding`).
    #[arg(long)]
    sharding: Option<String>,
    /// What-if: per-block activation checkpointing (recipe `train.activation_checkpointing`).
    #[arg(long)]
    activation_checkpointing: bool,
    /// What-if: bf16 parameters with an f32 master copy and f32 AdamW moments held by the
    /// optimizer, sharded with it (recipe `optimizer.master_weights`).
    #[arg(long)]
    master_weights: bool,
    /// What-if (issue 18): the LM head and cross-entropy only at the loss positions, this
    /// many rows per chunk.
    #[arg(long)]
    ce_chunk_rows: Option<u64>,
    /// Model shape from this preset (mmada_8b, llada_8b, tiny) instead of the recipe's
    /// checkpoint config.json (for a checkpoint that is not downloaded yet).
    #[arg(long)]
    model_preset: Option<String>,
    /// Print the plan as JSON (`total`, `resident`, `step`, `rollout`, `fits`, `lines`: name,
    /// phase, bytes) instead of the table.
    #[arg(long)]
    json: bool,
}

/// Data-parallel flags (one process per node, one worker thread per device of `train.device`,
/// e.g. `cuda:0,1,2,3`). Unset flags fall back to NNODES, NODE_RANK (or GROUP_RANK),
/// MASTER_ADDR + MASTER_PORT and NODE_ADDR. WORLD_SIZE / RANK count processes (torchrun's
/// meaning): when set they must equal the node count and node rank, else the run stops at
/// start with an error.
#[derive(clap::Args, Debug, Clone)]
struct DistArgs {
    /// Number of nodes (processes).
    #[arg(long)]
    nodes: Option<usize>,
    /// This node's rank in 0..nodes.
    #[arg(long)]
    node_rank: Option<usize>,
    /// Global orchestrator HOST:PORT (node rank 0 hosts it).
    #[arg(long)]
    coordinator: Option<String>,
    /// This node's host name or IP as the other nodes reach it (or `NODE_ADDR`); required on
    /// node ranks > 0 unless the coordinator is on loopback (default there and on rank 0: the
    /// coordinator host).
    #[arg(long)]
    node_host: Option<String>,
    /// Port of this node's tensor service (default: coordinator port + 1 + node rank).
    #[arg(long)]
    data_port: Option<u16>,
    /// Do not start the orchestrator on node rank 0 (one runs elsewhere: `mmada-train orchestrator`).
    #[arg(long)]
    external_orchestrator: bool,
    /// Seconds a collective call may wait for the other ranks before every rank aborts.
    #[arg(long, default_value_t = 600)]
    collective_timeout: u64,
    /// Compare replica parameter hashes every N steps (optimizer steps for sft, RL steps of μ
    /// optimizer steps for unigrpo; 0: start and end only). Each check copies every parameter
    /// to the host and hashes it (an 8B model in f32: 32 GB per rank), so keep N large there.
    #[arg(long, default_value_t = 50)]
    check_every: u64,
}

impl DistArgs {
    fn config(&self) -> Result<DistConfig> {
        let cfg = DistConfig {
            nodes: self.nodes.unwrap_or(1),
            node_rank: self.node_rank.unwrap_or(0),
            coordinator: self.coordinator.clone(),
            node_host: self.node_host.clone(),
            data_port: self.data_port,
            host_orchestrator: !self.external_orchestrator,
            timeout: std::time::Duration::from_secs(self.collective_timeout.max(1)),
            check_every: self.check_every,
        }
        .with_env(self.nodes.is_some(), self.node_rank.is_some())?;
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_disk_dtype(s: &str) -> Result<DiskDtype> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Ok(DiskDtype::BF16),
        "f16" | "fp16" | "float16" => Ok(DiskDtype::F16),
        "f32" | "fp32" | "float32" => Ok(DiskDtype::F32),
        other => bail!("--dtype {other}: expected bf16, f16 or f32"),
    }
}

/// The first stop signal received (0: none; 2 SIGINT, 15 SIGTERM): the exit status of a
/// graceful stop is `128 + signal` (130, 143), as a shell reports a process killed by it.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// When the last training step ended (ms since the process's [`clock`] started; 0 = none yet)
/// and the longest step so far (ms): the stop watchdog's measure of progress.
static LAST_STEP_MS: AtomicU64 = AtomicU64::new(0);
static LONGEST_STEP_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the first call (a monotonic clock for the watchdog).
fn clock() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// A training step ended (called from the progress callback).
fn step_ended() {
    let now = clock();
    let prev = LAST_STEP_MS.swap(now, Ordering::SeqCst);
    if prev > 0 {
        LONGEST_STEP_MS.fetch_max(now - prev, Ordering::SeqCst);
    }
}

/// How long a graceful stop may go without a step ending before the process exits anyway:
/// `MMADA_STOP_GRACE_SECS`, else 3 × the longest step so far, at least 60 s (the step in
/// flight, its checkpoint). A run blocked in a collective (a rank that never comes) ends no
/// step, so it exits after this grace instead of the collective timeout.
fn stop_grace_ms() -> u64 {
    match std::env::var("MMADA_STOP_GRACE_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        Some(s) if s >= 0.0 => (s * 1000.0) as u64,
        _ => (3 * LONGEST_STEP_MS.load(Ordering::SeqCst)).max(60_000),
    }
}

/// First SIGINT/SIGTERM: set the returned flag (the trainer saves a checkpoint after the
/// current step and stops; the process then exits 130 / 143); a second one exits at once with
/// `128 + signal`, and so does a stop that sees no step end within [`stop_grace_ms`]. The signals are awaited on a thread of their own (tokio's signal driver).
fn install_stop_handler() -> Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    // registered here, before training starts, so an early signal is not lost
    let (mut int, mut term) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("installing the SIGINT/SIGTERM handlers")?;
    let flag = stop.clone();
    clock();
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                // after the first signal: when it came, checked every second against the grace
                let mut stopping_since: Option<u64> = None;
                loop {
                    let tick = tokio::time::sleep(std::time::Duration::from_secs(1));
                    let (sig, name) = tokio::select! {
                        _ = int.recv() => (2, "SIGINT"),
                        _ = term.recv() => (15, "SIGTERM"),
                        _ = tick => {
                            if let Some(t) = stopping_since {
                                let since = t.max(LAST_STEP_MS.load(Ordering::SeqCst));
                                let grace = stop_grace_ms();
                                if clock().saturating_sub(since) > grace {
                                    let sig = STOP_SIGNAL.load(Ordering::SeqCst);
                                    tracing::error!(
                                        "stop: no step ended within {:.0} s of the stop request (blocked in a collective, waiting for a rank that does not come?): exiting without a new checkpoint; the last complete one is kept (MMADA_STOP_GRACE_SECS sets the grace)",
                                        grace as f64 / 1000.0
                                    );
                                    std::process::exit(128 + sig);
                                }
                            }
                            continue;
                        }
                    };
                    if flag.swap(true, Ordering::SeqCst) {
                        tracing::warn!("second stop signal ({name}): exiting now");
                        std::process::exit(128 + STOP_SIGNAL.load(Ordering::SeqCst).max(sig));
                    }
                    STOP_SIGNAL.store(sig, Ordering::SeqCst);
                    stopping_since = Some(clock());
                    tracing::warn!(
                        "{name}: stopping after this step with a checkpoint (send it again to exit at once)"
                    );
                }
            })
        })
        .context("starting the signal thread")?;
    Ok(stop)
}

/// The exit status of a training command: 0 finished (or stopped from the wandb UI), 130
/// after a graceful stop on SIGINT, 143 after one on SIGTERM.
fn exit_status(interrupted: bool) -> ExitCode {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        sig if interrupted && sig > 0 => ExitCode::from(128 + sig as u8),
        _ => ExitCode::SUCCESS,
    }
}

/// `cuda…` devices need a binary built with the `cuda` feature: say so before anything runs.
fn ensure_built_for(device: &DeviceSpec) -> Result<()> {
    if !device.is_available_in_build() {
        bail!(
            "train.device {device}: this binary was built without the `cuda` feature (cargo build --release -p mmada-train -p mmada-infer --features cuda)"
        );
    }
    Ok(())
}

/// The training progress bar: steps done / total, elapsed and ETA, and the step message.
fn progress_bar(steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("template"),
    );
    bar
}

/// `--resume latest` or `--resume DIR`.
fn parse_resume(r: String) -> Resume {
    if r == "latest" {
        Resume::Latest
    } else {
        Resume::Path(r.into())
    }
}

fn fmt_opt(x: Option<f32>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

/// What the binary needs of a training loop besides the library's: its name, the lines it
/// logs at start, its progress message and its summary line.
trait TrainCommand: TrainLoop {
    /// "SFT" or "UniGRPO".
    const NAME: &'static str;
    /// The memory planner's input for this recipe as the trainer runs it.
    fn plan_input(
        recipe: &Self::Recipe,
        cfg: &ModelConfig,
        devices: u64,
        nodes: u64,
    ) -> plan::PlanInput;
    /// Log the batch layout over devices and nodes.
    fn describe(recipe: &Self::Recipe, device: &DeviceSpec, dist: &DistConfig);
    /// The progress message of a step, and whether to also log it.
    fn message(r: &Self::Report) -> (u64, String, bool);
    /// How the run ended: `(interrupted, final step, run directory, last checkpoint)`.
    fn ended(o: &Self::Outcome) -> (bool, u64, &std::path::Path, Option<&PathBuf>);
    /// What the closing log line says of the run's progress (losses, rewards).
    fn detail(o: &Self::Outcome) -> String;
}

impl TrainCommand for Sft {
    const NAME: &'static str = "SFT";

    fn plan_input(r: &SftRecipe, cfg: &ModelConfig, devices: u64, nodes: u64) -> plan::PlanInput {
        plan::PlanInput::sft(r, cfg, devices, nodes)
    }

    fn describe(recipe: &SftRecipe, device: &DeviceSpec, dist: &DistConfig) {
        let world = device.world_size() * dist.nodes;
        let rows = recipe.data.rows_per_micro_batch();
        tracing::info!(
            "global batch {} rows = {rows} per device × {} devices × {} nodes × {} accumulation (node rank {})",
            rows * world * recipe.train.grad_accum as usize,
            device.world_size(),
            dist.nodes,
            recipe.train.grad_accum,
            dist.node_rank
        );
    }

    fn message(r: &StepReport) -> (u64, String, bool) {
        let msg = format!(
            "loss {:.3} (lm {} mmu {} t2i {}) lr {:.2e} |g| {:.2} {:.0} tok/s{}",
            r.loss,
            fmt_opt(r.loss_lm),
            fmt_opt(r.loss_mmu),
            fmt_opt(r.loss_t2i),
            r.lr,
            r.grad_norm,
            r.tokens_per_sec,
            r.eval_loss
                .map(|e| format!(" eval {e:.3}"))
                .unwrap_or_default()
        );
        (r.step, msg, r.eval_loss.is_some() || r.step == r.max_steps)
    }

    fn ended(o: &SftOutcome) -> (bool, u64, &std::path::Path, Option<&PathBuf>) {
        (
            o.interrupted,
            o.final_step,
            &o.run_dir,
            o.last_checkpoint.as_ref(),
        )
    }

    fn detail(o: &SftOutcome) -> String {
        let first = o.losses.first().copied().unwrap_or(f32::NAN);
        let last = o.losses.last().copied().unwrap_or(f32::NAN);
        format!("loss {first:.3} → {last:.3}")
    }
}

impl TrainCommand for UniGrpo {
    const NAME: &'static str = "UniGRPO";

    fn plan_input(
        r: &UniGrpoRecipe,
        cfg: &ModelConfig,
        devices: u64,
        nodes: u64,
    ) -> plan::PlanInput {
        plan::PlanInput::unigrpo(r, cfg, devices, nodes)
    }

    fn describe(recipe: &UniGrpoRecipe, device: &DeviceSpec, dist: &DistConfig) {
        let world = device.world_size() * dist.nodes;
        let g = recipe.grpo.num_generations;
        let groups = recipe.grpo.prompts_per_step();
        tracing::info!(
            "{} completions per step = {groups} prompts × G {g} over {world} rank(s) ({} device(s) × {} node(s), node rank {}): prompt groups k ≡ rank (mod {world})",
            recipe.grpo.generation_batch_size,
            device.world_size(),
            dist.nodes,
            dist.node_rank
        );
        if groups < world {
            tracing::warn!(
                "only {groups} prompt group(s) per step for {world} ranks: {} rank(s) roll out nothing and idle every step (raise grpo.generation_batch_size to a multiple of {})",
                world - groups,
                g * world
            );
        } else if !groups.is_multiple_of(world) {
            tracing::warn!(
                "{groups} prompt groups per step do not split evenly over {world} ranks: some ranks idle for one group's rollout (use a grpo.generation_batch_size that is a multiple of {})",
                g * world
            );
        }
    }

    fn message(r: &GrpoStepReport) -> (u64, String, bool) {
        let msg = format!(
            "reward {:.3} loss {:.4} (policy {:.4} kl {:.4}) zero-std {:.2} rollout {:.1}s update {:.1}s",
            r.reward,
            r.loss,
            r.policy_loss,
            r.kl_loss,
            r.frac_reward_zero_std,
            r.rollout_s,
            r.update_s
        );
        (r.step, msg, true)
    }

    fn ended(o: &UniGrpoOutcome) -> (bool, u64, &std::path::Path, Option<&PathBuf>) {
        (
            o.interrupted,
            o.final_step,
            &o.run_dir,
            o.last_checkpoint.as_ref(),
        )
    }

    fn detail(o: &UniGrpoOutcome) -> String {
        let mean = |r: &[f32]| r.iter().sum::<f32>() / r.len().max(1) as f32;
        let n = o.rewards.len().min(5);
        if n == 0 {
            return "no step in this invocation".into();
        }
        format!(
            "mean reward of the first / last {n} steps of this invocation {:.3} → {:.3}",
            mean(&o.rewards[..n]),
            mean(&o.rewards[o.rewards.len() - n..])
        )
    }
}

/// `T::run_dp` on the devices of a resolved `train.device`: `cpu:N` → N Flex workers, `cuda:…`
/// → one worker per GPU. One device on one node runs without any collective (`dist::launch`).
fn run_on_devices<T: TrainCommand>(
    device: &DeviceSpec,
    recipe: &T::Recipe,
    dist: &DistConfig,
    opts: &RunOptions,
    on_step: &mut dyn FnMut(&T::Report),
) -> Result<T::Outcome> {
    Ok(match device {
        DeviceSpec::Cpu(n) => T::run_dp::<mmada_model::backend::CpuAutodiff>(
            recipe,
            &vec![Default::default(); *n],
            dist,
            opts,
            on_step,
        )?,
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(_) => T::run_dp::<mmada_model::backend::CudaAutodiff>(
            recipe,
            &device.cuda_devices(),
            dist,
            opts,
            on_step,
        )?,
        #[cfg(feature = "cuda")]
        DeviceSpec::CudaAll => bail!("train.device {device}: not resolved"),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) | DeviceSpec::CudaAll => bail!(
            "train.device {device}: this binary was built without the `cuda` feature (cargo build --release -p mmada-train -p mmada-infer --features cuda)"
        ),
    })
}

/// `mmada-train sft|unigrpo`: load the recipe (or print it), resolve the devices and the
/// data-parallel flags, install the stop handler, run with a progress bar, log the summary.
fn train<T: TrainCommand>(args: TrainArgs) -> Result<ExitCode> {
    let recipe = T::Recipe::load(&args.recipe, &args.overrides)?;
    if args.print_config {
        print!("{}", recipe.to_yaml());
        return Ok(ExitCode::SUCCESS);
    }
    let common = recipe.common();
    let device: DeviceSpec = common.device.parse::<DeviceSpec>()?.resolve()?;
    ensure_built_for(&device)?;
    let dist = args.dist.config()?;
    let opts = RunOptions {
        resume: args.resume.map(parse_resume),
        stop: Some(install_stop_handler()?),
        stop_after: None,
        base_dir: std::env::current_dir()?,
        wandb_endpoint: None,
        test_nonfinite_steps: vec![],
    };
    let bar = progress_bar(common.max_steps);
    let mut last_msg = std::time::Instant::now();
    let mut on_step = |r: &T::Report| {
        step_ended();
        let (step, msg, always) = T::message(r);
        bar.set_position(step);
        bar.set_message(msg.clone());
        if always || last_msg.elapsed().as_secs() >= 30 {
            bar.suspend(|| tracing::info!(step, "{msg}"));
            last_msg = std::time::Instant::now();
        }
    };
    tracing::info!(recipe = %args.recipe.display(), device = %device, "starting {} run `{}`", T::NAME, common.run.name);
    T::describe(&recipe, &device, &dist);
    log_plan::<T>(&recipe, &device, &dist, &opts.base_dir);
    let outcome = run_on_devices::<T>(&device, &recipe, &dist, &opts, &mut on_step)?;
    bar.finish();
    let (interrupted, step, run_dir, last) = T::ended(&outcome);
    tracing::info!(
        "{} {} run `{}` at step {step}: {}; run directory {}; last checkpoint {}",
        if interrupted { "stopped" } else { "finished" },
        T::NAME,
        common.run.name,
        T::detail(&outcome),
        run_dir.display(),
        last.map_or_else(|| "-".into(), |p| p.display().to_string())
    );
    // the curves of the run (rank 0 writes metrics.jsonl); a plotting failure never fails
    // the run
    if run_dir.join("metrics.jsonl").is_file() {
        match mmada_train::plot::plot_run(run_dir, None) {
            Ok(files) => {
                for p in [&files.metrics, &files.samples].into_iter().flatten() {
                    tracing::info!("plot: {}", p.display());
                }
            }
            Err(e) => tracing::warn!("plotting {}: {e}", run_dir.display()),
        }
    }
    Ok(exit_status(interrupted))
}

/// Log the memory plan of the run as configured (no GPU size: the fit is `plan`'s job); a
/// plan that cannot be made (no config.json yet) is a warning, never a failure.
fn log_plan<T: TrainCommand>(
    recipe: &T::Recipe,
    device: &DeviceSpec,
    dist: &DistConfig,
    base: &std::path::Path,
) {
    let c = recipe.common();
    let made = model_config_for_plan(c.model, c.tokenizer, base, None)
        .map_err(anyhow::Error::from)
        .and_then(|(cfg, _)| {
            let input = T::plan_input(
                recipe,
                &cfg,
                device.world_size().max(1) as u64,
                dist.nodes as u64,
            );
            Ok(plan::plan(&input)?)
        });
    match made {
        Ok(p) => tracing::info!("{}", p.table(None, 0.0).trim_end()),
        Err(e) => tracing::warn!("no memory plan: {e:#}"),
    }
}

/// Whether a recipe file is a UniGRPO recipe (it has a `grpo:` section).
fn detect_kind(path: &std::path::Path) -> Result<RecipeKind> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading recipe {}", path.display()))?;
    let tree: serde_norway::Value = serde_norway::from_str(&text)
        .with_context(|| format!("recipe {}: invalid YAML", path.display()))?;
    let has = |k: &str| tree.get(k).is_some();
    Ok(match (has("grpo"), has("data")) {
        (true, _) => RecipeKind::Unigrpo,
        (false, true) => RecipeKind::Sft,
        (false, false) => bail!(
            "recipe {}: neither a `grpo:` (UniGRPO) nor a `data:` (SFT) section: say which with `mmada-train plan sft|unigrpo`",
            path.display()
        ),
    })
}

/// `mmada-train plan`: the recipe's plan with the what-if flags applied, printed as a table.
fn plan_command(args: PlanArgs) -> Result<()> {
    let kind = match args.kind {
        Some(k) => k,
        None => detect_kind(&args.recipe)?,
    };
    let base = std::env::current_dir()?;
    let devices_of = |device: &str| -> Result<u64> {
        if let Some(n) = args.devices {
            return Ok(n as u64);
        }
        let spec: DeviceSpec = device.parse()?;
        match spec.world_size() {
            0 => bail!(
                "train.device {device}: the device count is known only on the GPU machine: pass --devices N"
            ),
            n => Ok(n as u64),
        }
    };
    let (mut input, source) = match kind {
        RecipeKind::Sft => {
            let r = SftRecipe::load(&args.recipe, &args.overrides)?;
            let (cfg, source) =
                model_config_for_plan(&r.model, &r.tokenizer, &base, args.model_preset.as_deref())?;
            let devices = devices_of(&r.train.device)?;
            (
                plan::PlanInput::sft(&r, &cfg, devices, args.nodes as u64),
                source,
            )
        }
        RecipeKind::Unigrpo => {
            let r = UniGrpoRecipe::load(&args.recipe, &args.overrides)?;
            let (cfg, source) =
                model_config_for_plan(&r.model, &r.tokenizer, &base, args.model_preset.as_deref())?;
            let devices = devices_of(&r.train.device)?;
            (
                plan::PlanInput::unigrpo(&r, &cfg, devices, args.nodes as u64),
                source,
            )
        }
    };
    let mut what_if = vec![];
    if let Some(s) = &args.sharding {
        input.sharding = s.parse()?;
        what_if.push(format!("sharding {s}"));
    }
    if args.activation_checkpointing {
        input.activation_checkpointing = true;
        what_if.push("activation checkpointing".into());
    }
    if args.master_weights {
        input = input.with_master_weights();
        what_if.push("bf16 weights + f32 master weights and moments".into());
    }
    if let Some(rows) = args.ce_chunk_rows {
        input.logits = plan::LogitsPath::LossPositions { chunk_rows: rows };
        what_if.push(format!("head at the loss positions, {rows}-row chunks"));
    }
    let gpu = plan::parse_size(&args.gpu_mem)?;
    if !(0.0..100.0).contains(&args.headroom) {
        bail!("--headroom {}: a percentage in [0, 100)", args.headroom);
    }
    let p = plan::plan(&input)?;
    let headroom = args.headroom / 100.0;
    if args.json {
        let lines: Vec<serde_json::Value> = p
            .lines
            .iter()
            .map(|l| serde_json::json!({"name": l.name, "phase": l.phase.as_str(), "bytes": l.bytes}))
            .collect();
        let j = serde_json::json!({
            "recipe": args.recipe.display().to_string(),
            "model_config": source,
            "what_if": what_if,
            "params": p.params,
            "world": p.world,
            "total": p.total(),
            "resident": p.resident(),
            "step": p.step(),
            "rollout": p.rollout(),
            "gpu_mem": gpu,
            "fits": p.fits(gpu, headroom),
            "lines": lines,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("recipe {} (model config: {source})", args.recipe.display());
    if !what_if.is_empty() {
        println!(
            "WHAT-IF (overrides of the recipe; activation checkpointing is not implemented by the trainer yet): {}",
            what_if.join(", ")
        );
    }
    print!("{}", p.table(Some(gpu), headroom));
    Ok(())
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime of the orchestrator")
}

/// Large tensor buffers (≥ 1 MiB) are kept for reuse instead of being page-faulted in again at
/// every step, without the heap fragmentation of glibc's (issue 18; `mmada_host::alloc`).
#[global_allocator]
static ALLOC: mmada_host::alloc::BlockCache = mmada_host::alloc::BlockCache::new();

/// Exit status: 0 finished, 130 / 143 after a graceful stop on SIGINT / SIGTERM, 1 on an
/// error (printed as `Error: …` with its causes).
fn main() -> ExitCode {
    mmada_model::backend::keep_freed_memory(&ALLOC);
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,burn_collective=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Unigrpo(args) => return train::<UniGrpo>(args),
        Command::Sft(args) => return train::<Sft>(args),
        Command::Orchestrator { port } => {
            let token = std::env::var(mmada_train::dist::RUN_TOKEN_VAR)
                .ok()
                .filter(|t| !t.is_empty());
            if token.is_none() {
                tracing::warn!(
                    "the orchestrator is not authenticated: set {} to the run's secret here and on every node",
                    mmada_train::dist::RUN_TOKEN_VAR
                );
            }
            burn_communication::websocket::set_auth_token(token);
            tracing::info!(port, "global orchestrator listening (Ctrl-C stops it)");
            tokio_runtime()?.block_on(burn_collective::start_global_orchestrator(port));
        }
        Command::Plot { run_dir, images } => {
            let files = mmada_train::plot::plot_run(&run_dir, images.as_deref())
                .with_context(|| format!("plotting {}", run_dir.display()))?;
            if files.metrics.is_none() && files.samples.is_none() {
                anyhow::bail!(
                    "{}: nothing to plot (no metrics.jsonl values, no PNG under samples/; pass --images DIR for a folder of images)",
                    run_dir.display()
                );
            }
            for p in [&files.metrics, &files.samples].into_iter().flatten() {
                println!("{}", p.display());
            }
        }
        Command::WandbSync { run_dir } => {
            let endpoint = mmada_wandb::Endpoint::from_env(None)?;
            // the spool is in RUN_DIR, or in $WANDB_DIR/<run name> when the run had WANDB_DIR
            let mut local = run_dir.clone();
            if !run_dir.join(mmada_wandb::SPOOL_FILE).exists() {
                let mut w = mmada_wandb::WandbConfig::default();
                w.apply_env()?;
                local = w.local_dir(&run_dir);
            }
            let report = mmada_wandb::sync(&local, &endpoint, &mmada_wandb::SyncOptions::default())
                .with_context(|| format!("syncing {}", local.display()))?;
            tracing::info!("{report:?}");
        }
        Command::Synth { out, n, seed } => {
            mmada_train::synth::write_arithmetic(&out, n, seed)
                .with_context(|| format!("writing {}", out.display()))?;
            tracing::info!(out = %out.display(), examples = n, "wrote arith.jsonl, arith_test.jsonl (held out) and tokenizer.json");
        }
        Command::Config { preset } => {
            let cfg = ModelConfig::preset(&preset)?;
            println!("{}", serde_json::to_string_pretty(&cfg.to_hf_json())?);
        }
        Command::Init {
            preset,
            config,
            out,
            seed,
            dtype,
            shard_mb,
            overwrite,
        } => {
            let cfg = match &config {
                Some(p) => ModelConfig::from_file(p)?,
                None => ModelConfig::preset(&preset)?,
            };
            let opts = SaveOptions {
                dtype: parse_disk_dtype(&dtype)?,
                max_shard_bytes: shard_mb.map(|m| m * 1_000_000),
                overwrite,
                copy_sidecars_from: None,
            };
            mmada_train::init_checkpoint(&cfg, seed, &out, &opts)
                .with_context(|| format!("writing {}", out.display()))?;
            tracing::info!(out = %out.display(), params = cfg.num_params(), "initialised model");
        }
        Command::MergeLora {
            checkpoint,
            adapter,
            out,
            dtype,
            shard_mb,
            overwrite,
        } => {
            let opts = SaveOptions {
                dtype: parse_disk_dtype(&dtype)?,
                max_shard_bytes: shard_mb.map(|m| m * 1_000_000),
                overwrite,
                copy_sidecars_from: None,
            };
            let base = mmada_data::hub::local_or_model(&checkpoint)?;
            let lora = mmada_train::merge_lora_checkpoint(&base, &adapter, &out, &opts)
                .with_context(|| {
                    format!(
                        "merging {} into {}",
                        adapter.display(),
                        checkpoint.display()
                    )
                })?;
            tracing::info!(out = %out.display(), r = lora.r, alpha = lora.alpha, targets = ?lora.target_modules, "merged LoRA checkpoint written");
        }
        Command::Plan(args) => plan_command(args)?,
        Command::Data { command } => data_cmd::run(command)?,
    }
    Ok(ExitCode::SUCCESS)
}
