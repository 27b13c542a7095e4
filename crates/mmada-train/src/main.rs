//! `mmada-train`: train LLaDA / MMaDA masked-diffusion models.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mmada_model::ModelConfig;
use mmada_model::checkpoint::{DiskDtype, SaveOptions};

#[derive(Parser, Debug)]
#[command(
    name = "mmada-train",
    version,
    about = "Train masked-diffusion multimodal language models (LLaDA / MMaDA)",
    after_help = "Planned subcommands (not in this release yet):\n  \
        sft       masked-diffusion SFT / mixed long-CoT fine-tuning: mmada-train sft --recipe recipes/mixed_cot.yaml\n  \
        unigrpo   UniGRPO policy-gradient RL with pluggable rewards: mmada-train unigrpo --recipe recipes/unigrpo_gsm8k.yaml\n  \
        data      inspect dataset manifests and check a recipe's data: mmada-train data inspect --manifest data_manifests/gsm8k.yaml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
}

fn parse_disk_dtype(s: &str) -> Result<DiskDtype> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Ok(DiskDtype::BF16),
        "f16" | "fp16" | "float16" => Ok(DiskDtype::F16),
        "f32" | "fp32" | "float32" => Ok(DiskDtype::F32),
        other => anyhow::bail!("--dtype {other}: expected bf16, f16 or f32"),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
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
            if cfg.num_params() > 2_000_000_000 {
                tracing::warn!(
                    params = cfg.num_params(),
                    "initialising a large model on the CPU needs about {} GB of memory",
                    cfg.num_params() * 4 / 1_000_000_000
                );
            }
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
    }
    Ok(())
}
