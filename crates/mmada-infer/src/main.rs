//! `mmada-infer`: inspect, run and evaluate LLaDA / MMaDA checkpoints.
//!
//! * `inspect`: config, tensor groups and verification of a checkpoint ([`inspect`]).
//! * `generate`: chat-templated text generation with the LLaDA block sampler; `--mode t2i`
//!   writes PNG images (MaskGIT sampler + MAGVIT-v2), `--mode mmu --image PATH` answers about
//!   an image ([`image`]).
//! * `eval`: GSM8K / MATH-500 accuracy with the answer extraction of `mmada-rewards`.
//! * `loglik`: Monte-Carlo log-likelihood of an answer given a prompt.
//! * `serve`: an OpenAI-compatible HTTP server and the web demo page ([`serve`]).
//!
//! Options can also come from a YAML file (`--config`, [`options::FileConfig`]).

mod engine;
mod eval;
mod image;
mod inspect;
mod options;
mod progress;
mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Parser, Subcommand};
use mmada_model::backend::DeviceSpec;
use mmada_sampler::{LoglikConfig, SamplerSection, SeededRng, StratifiedMasks};

use crate::engine::Engine;
use crate::image::{ImageArgs, ModeArg};
use crate::options::{
    EvalArgs, FileConfig, GenerateArgs, LoglikArgs, ModelArgs, SamplingArgs, TemplateArg,
    require_checkpoint,
};

#[derive(Parser, Debug)]
#[command(
    name = "mmada-infer",
    version,
    about = "Inspect, run and evaluate LLaDA / MMaDA masked-diffusion checkpoints",
    after_help = "Every option of generate / eval / loglik can also be set in a YAML file \
        (--config FILE.yaml) with sections model, sampling, generate, eval, loglik; the command \
        line overrides the file. Set RUST_LOG=debug for more detail."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config FILE` and the checkpoint options of `generate`, `eval` and `loglik`.
#[derive(clap::Args, Debug)]
struct CommonArgs {
    /// YAML config file (sections model, sampling, generate, eval, loglik, image; the
    /// command line wins).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key of the config file, `SECTION.KEY=VALUE` (repeatable; as `mmada-train
    /// --set`): `--set sampling.steps=64 --set eval.limit=50`. Explicit options still win.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    model: ModelArgs,
}

impl CommonArgs {
    /// The config file (with the `--set` overrides) and the model options layered over its
    /// `model:` section.
    fn load(self) -> Result<(FileConfig, ModelArgs)> {
        let mut f = FileConfig::load(self.config.as_deref(), &self.set)?;
        let model = self.model.or(std::mem::take(&mut f.model));
        Ok((f, model))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a checkpoint's config, parameter count, dtype and bytes per tensor group, and
    /// verify every tensor against config.json (names, shapes, dtypes). Exit code 1 when a
    /// tensor is missing, unexpected or of the wrong shape. Reads headers only.
    Inspect {
        /// Checkpoint directory (config.json + model.safetensors or a sharded index), or a
        /// Hugging Face model id (`GSAI-ML/LLaDA-8B-Instruct`; headers and config only are
        /// read, but the weights are downloaded when not cached).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Print a JSON report instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate text for one or more prompts (chat template of the checkpoint, LLaDA block
    /// sampler). Prints the decoded answers; NFE and tokens/s are logged. `--mode t2i`
    /// generates one image per prompt into `--out DIR` (PNGs + codes.jsonl); `--mode mmu
    /// --image PATH` answers the prompts about an image.
    Generate {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten, next_help_heading = "Sampling")]
        sampling: SamplingArgs,
        #[command(flatten, next_help_heading = "Prompts and output")]
        generate: GenerateArgs,
        #[command(flatten, next_help_heading = "Images (--mode t2i | mmu)")]
        image: ImageArgs,
    },
    /// Evaluate on GSM8K or MATH-500: prompts, batched generation, answer extraction
    /// (mmada-rewards), accuracy; per-item JSONL with --out.
    Eval {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten, next_help_heading = "Sampling")]
        sampling: SamplingArgs,
        #[command(flatten, next_help_heading = "Benchmark")]
        eval: EvalArgs,
    },
    /// Monte-Carlo estimate of log p(answer | prompt) (LLaDA get_log_likelihood).
    Loglik {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten, next_help_heading = "Likelihood")]
        loglik: LoglikArgs,
    },
    /// OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions,
    /// /v1/images/generations, /v1/models, /health) and the web demo at `/`: chat, image
    /// understanding, text-to-image, with the denoising shown live. Loopback by default.
    /// The sampling options are the defaults of requests that do not set them.
    Serve {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten, next_help_heading = "Sampling (request defaults)")]
        sampling: SamplingArgs,
        #[command(flatten, next_help_heading = "Server")]
        serve: serve::ServeArgs,
    },
}

/// Runs `$f::<Backend>(&device, args…)` on the device named by `$spec`.
macro_rules! on_device {
    ($spec:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        let spec: DeviceSpec = $spec.resolve()?;
        match spec {
            DeviceSpec::Cpu(n) => {
                ensure!(n == 1, "device {spec}: mmada-infer runs on one device; give `cpu`");
                $f::<mmada_model::backend::Cpu>(&Default::default(), $($arg),*)
            }
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(ref ids) => {
                ensure!(ids.len() == 1, "device {spec}: mmada-infer runs on one device");
                let device = spec.cuda_devices().remove(0);
                $f::<mmada_model::backend::Cuda>(&device, $($arg),*)
            }
            #[cfg(feature = "cuda")]
            DeviceSpec::CudaAll => anyhow::bail!("device {spec}: mmada-infer runs on one device"),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) | DeviceSpec::CudaAll => anyhow::bail!(
                "device {spec}: this binary was built without the `cuda` feature \
                 (cargo build --release -p mmada-train -p mmada-infer --features cuda)"
            ),
        }
    }};
}

fn device_of(m: &ModelArgs) -> Result<DeviceSpec> {
    Ok(m.device.as_deref().unwrap_or("cpu").parse::<DeviceSpec>()?)
}

fn load<B: Backend>(
    device: &B::Device,
    m: &ModelArgs,
    default_template: TemplateArg,
) -> Result<Engine<B>> {
    let dir = require_checkpoint(m)?;
    let mut engine = Engine::load(
        &dir,
        m.adapter.as_deref(),
        m.tokenizer.as_deref(),
        m.template.unwrap_or(default_template),
        device,
        m.dtype.unwrap_or(options::DtypeArg::F32).into(),
    )?;
    engine.long_prompt = m.long_prompt.unwrap_or_default();
    Ok(engine)
}

/// Prompts from `--prompt` and `--prompts FILE`: JSONL with `prompt` or `question`, or a
/// `.txt` file with one prompt per non-empty line (as the official `inference_t2i.py`'s
/// `validation_prompts_file`).
fn collect_prompts(g: &GenerateArgs) -> Result<Vec<String>> {
    let mut prompts = g.prompt.clone();
    if let Some(path) = &g.prompts {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompts {}", path.display()))?;
        let plain = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if plain {
                prompts.push(line.trim().to_string());
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let p = v
                .get("prompt")
                .or_else(|| v.get("question"))
                .and_then(|p| p.as_str())
                .with_context(|| {
                    format!(
                        "{}:{}: no string field `prompt` or `question`",
                        path.display(),
                        i + 1
                    )
                })?;
            prompts.push(p.to_string());
        }
    }
    ensure!(
        !prompts.is_empty(),
        "no prompt: pass --prompt TEXT, --prompts FILE.jsonl|FILE.txt or set generate.prompt in --config"
    );
    Ok(prompts)
}

fn run_t2i<B: Backend>(
    device: &B::Device,
    m: &ModelArgs,
    g: &GenerateArgs,
    a: &ImageArgs,
) -> Result<()> {
    let prompts = collect_prompts(g)?;
    let engine = load::<B>(device, m, TemplateArg::None)?;
    image::run_t2i(&engine, m, g, a, &prompts)
}

fn run_generate<B: Backend>(
    device: &B::Device,
    m: &ModelArgs,
    s: &SamplerSection,
    g: &GenerateArgs,
    a: &ImageArgs,
) -> Result<()> {
    let prompts = collect_prompts(g)?;
    let engine = load::<B>(device, m, TemplateArg::Auto)?;
    let config = engine.sampler_config(s).context("sampling settings")?;
    tracing::info!(?config, "sampler");
    let (image_codes, ids) = if a.mode() == ModeArg::Mmu {
        let (codes, ids) = image::mmu_prompts(&engine, a, &prompts)?;
        (Some(codes), ids)
    } else {
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| engine.prompt_ids(p))
            .collect::<Result<_>>()?;
        (None, ids)
    };
    let t0 = Instant::now();
    // one bar over every batch's denoising steps (threshold decoding may need fewer)
    let batch_size = s.batch_size.unwrap_or(1).max(1);
    let batches = ids.len().div_ceil(batch_size);
    let bar = progress::bar((batches * config.steps) as u64, "steps");
    bar.set_message("generating");
    let gens = engine.generate_all(
        &ids,
        &config,
        m.seed.unwrap_or(0),
        batch_size,
        |done| bar.set_position((done.div_ceil(batch_size) * config.steps) as u64),
        &mut |_| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let new_tokens: usize = gens.iter().map(|g| g.decoded).sum();
    let nfe: usize = gens
        .chunks(s.batch_size.unwrap_or(1).max(1))
        .map(|c| c[0].nfe)
        .sum();
    let (refreshes, cache_hits): (usize, usize) = gens
        .chunks(s.batch_size.unwrap_or(1).max(1))
        .map(|c| (c[0].refreshes, c[0].cache_hits))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    tracing::info!(
        prompts = gens.len(),
        nfe,
        refreshes,
        cache_hits,
        cache = ?config.cache,
        new_tokens,
        seconds = format!("{secs:.3}"),
        tokens_per_s = format!("{:.1}", new_tokens as f64 / secs.max(1e-9)),
        "done"
    );
    let mut out = match &g.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let stdout = std::io::stdout();
    let mut so = stdout.lock();
    for (i, (p, gen_)) in prompts.iter().zip(&gens).enumerate() {
        if gens.len() > 1 {
            writeln!(so, "### {}", i + 1)?;
        }
        writeln!(so, "{}", gen_.text)?;
        if let Some(w) = out.as_mut() {
            let mut rec = serde_json::json!({
                "index": i,
                "prompt": p,
                "output": gen_.text,
                "ids": gen_.ids,
                "terminated": gen_.terminated,
                "nfe": gen_.nfe,
                "seconds": gen_.seconds,
                "batch": gen_.batch,
            });
            if let Some(codes) = &image_codes {
                rec["image"] = serde_json::json!(a.image);
                rec["image_codes"] = serde_json::json!(codes);
            }
            writeln!(w, "{rec}")?;
        }
    }
    if let Some(mut w) = out {
        w.flush()?;
    }
    Ok(())
}

fn run_loglik<B: Backend>(device: &B::Device, m: &ModelArgs, a: &LoglikArgs) -> Result<()> {
    let prompt = a
        .prompt
        .as_deref()
        .context("no prompt: pass --prompt TEXT or set loglik.prompt in --config")?;
    let answer = a
        .answer
        .as_deref()
        .context("no answer: pass --answer TEXT or set loglik.answer in --config")?;
    let engine = load::<B>(device, m, TemplateArg::None)?;
    let mc_num = a.mc_num.unwrap_or(128);
    let config = LoglikConfig {
        mc_num,
        batch_size: a.mc_batch_size.unwrap_or(mc_num.min(16)),
        cfg_scale: a.cfg_scale.unwrap_or(0.0),
        mask_id: engine.tok.layout().mask_id,
    };
    config.validate().context("loglik settings")?;
    let p = engine.prompt_ids(prompt)?;
    let ans = engine.tok.encode(answer)?;
    ensure!(!ans.is_empty(), "the answer encodes to no tokens");
    let to_tensor = |v: &[u32]| {
        let data: Vec<i64> = v.iter().map(|&t| i64::from(t)).collect();
        Tensor::<B, 1, Int>::from_data(TensorData::new(data, [v.len()]), &engine.device)
    };
    let mut masks = StratifiedMasks::new(SeededRng::new(m.seed.unwrap_or(0)));
    let t0 = Instant::now();
    let out = mmada_sampler::log_likelihood(
        &engine.model,
        to_tensor(&p),
        to_tensor(&ans),
        &config,
        &mut masks,
    )
    .context("log-likelihood")?;
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        prompt_tokens = p.len(),
        answer_tokens = ans.len(),
        mc_num = config.mc_num,
        nfe = out.nfe,
        seconds = format!("{secs:.3}"),
        "log-likelihood"
    );
    println!(
        "{}",
        serde_json::json!({
            "log_likelihood": out.value,
            "nfe": out.nfe,
            "mc_num": config.mc_num,
            "prompt_tokens": p.len(),
            "answer_tokens": ans.len(),
            "seconds": secs,
        })
    );
    Ok(())
}

fn run_serve<B: Backend>(
    device: &B::Device,
    m: &ModelArgs,
    s: &SamplerSection,
    a: &serve::ServeArgs,
) -> Result<()> {
    let dir = require_checkpoint(m)?;
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .unwrap_or_else(|_| dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mmada".into())
    });
    let m2 = m.clone();
    serve::serve::<B>(
        device,
        move |d: &B::Device| load::<B>(d, &m2, TemplateArg::Auto),
        s.clone(),
        m.seed.unwrap_or(0),
        name,
        a.clone(),
    )
}

fn run_eval<B: Backend>(
    device: &B::Device,
    m: &ModelArgs,
    s: &SamplerSection,
    e: &EvalArgs,
) -> Result<()> {
    let engine = load::<B>(device, m, TemplateArg::Auto)?;
    eval::run(&engine, m, s, e)
}

/// `generate` with its options layered (command line over `--config` file): text, or an
/// image with `--mode t2i` / about an image with `--mode mmu`.
fn generate_command(
    model: ModelArgs,
    sampling: SamplerSection,
    generate: GenerateArgs,
    image: ImageArgs,
) -> Result<()> {
    match image.mode() {
        ModeArg::T2i => on_device!(device_of(&model)?, run_t2i(&model, &generate, &image)),
        mode => {
            ensure!(
                mode == ModeArg::Mmu || image.image.is_none(),
                "--image is only used with --mode mmu"
            );
            on_device!(
                device_of(&model)?,
                run_generate(&model, &sampling, &generate, &image)
            )
        }
    }
}

/// Large tensor buffers (≥ 1 MiB) are kept for reuse instead of being page-faulted in again at
/// every step, without the heap fragmentation of glibc's (issue 18; `mmada_host::alloc`).
#[global_allocator]
static ALLOC: mmada_host::alloc::BlockCache = mmada_host::alloc::BlockCache::new();

fn main() -> Result<ExitCode> {
    mmada_model::backend::keep_freed_memory(&ALLOC);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { checkpoint, json } => {
            let dir = mmada_data::hub::local_or_model(&checkpoint)?;
            inspect::inspect(&dir, json)
                .with_context(|| format!("inspecting {}", checkpoint.display()))
        }
        Command::Generate {
            common,
            sampling,
            generate,
            image,
        } => {
            let (f, model) = common.load()?;
            generate_command(
                model,
                sampling.or(f.sampling),
                generate.or(f.generate),
                image.or(f.image),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            common,
            sampling,
            eval,
        } => {
            let (f, model) = common.load()?;
            let (sampling, eval) = (sampling.or(f.sampling), eval.or(f.eval));
            on_device!(device_of(&model)?, run_eval(&model, &sampling, &eval))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            common,
            sampling,
            serve,
        } => {
            let (f, model) = common.load()?;
            let sampling = sampling.or(f.sampling);
            on_device!(device_of(&model)?, run_serve(&model, &sampling, &serve))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Loglik { common, loglik } => {
            let (f, model) = common.load()?;
            let loglik = loglik.or(f.loglik);
            on_device!(device_of(&model)?, run_loglik(&model, &loglik))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
