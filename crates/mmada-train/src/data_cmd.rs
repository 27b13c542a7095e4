//! `mmada-train data inspect` and `mmada-train data check`: thin terminal wrappers over
//! `mmada_data::inspect`; `mmada-train data pretokenize`: image codes of manifests into a
//! parquet table (`mmada_data::code_table`).

use mmada_train::recipe::Recipe as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mmada_data::inspect::{ScanOptions, Summary, check_manifest, scan_manifest};
use mmada_data::manifest::Manifest;
use mmada_data::{LayoutConfig, ResizeMode, TextTokenizer};
use mmada_model::backend::DeviceSpec;
use mmada_train::recipe::{SftRecipe, resolve_manifest};
use mmada_train::run_dir::resolve;

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Print N rendered examples of a manifest (special tokens visible, token counts,
    /// prompt/answer split) and length statistics:
    /// mmada-train data inspect --manifest data_manifests/gsm8k.yaml --source ../shared/data/math/gsm8k_test.jsonl --tokenizer ../shared/data/tokenizers/gpt2
    Inspect {
        /// Manifest YAML.
        #[arg(long)]
        manifest: PathBuf,
        /// Read this local file / glob instead of the manifest's source (the format follows
        /// a .jsonl / .json / .parquet / .arrow extension).
        #[arg(long)]
        source: Option<String>,
        /// Root for the manifest's relative source and image paths (default: current dir).
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Examples to print.
        #[arg(long, default_value_t = 3)]
        n: usize,
        /// tokenizer.json (or a folder holding it); enables token counts and statistics.
        /// MMaDA special tokens the vocabulary lacks are added.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Read at most this many examples (default: all, for the statistics).
        #[arg(long)]
        limit: Option<u64>,
        /// Length of lm / chat / cot rows (`max_lm_len`).
        #[arg(long, default_value_t = 1536)]
        max_lm_len: usize,
        /// Text length `P` of mmu / t2i rows (`max_seq_length`).
        #[arg(long, default_value_t = 512)]
        max_seq_length: usize,
    },
    /// Validate every manifest a recipe uses: open each source (relative to
    /// `data.data_root`), read every record, lay it out with the recipe's tokenizer and
    /// report per-source counts. Exits non-zero if any source fails.
    Check {
        /// Recipe YAML.
        #[arg(long)]
        recipe: PathBuf,
        /// Override a recipe key: --set data.data_root=../shared/data (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Encode the images of mmu / t2i manifests with MAGVIT-v2 once (CPU), into a parquet table
    /// (one row per distinct image and preprocessing: source, file_hash, resolution, mode,
    /// coder, codes) that training reads through `data.image_tokenizer.codes`:
    /// mmada-train data pretokenize --manifest data_manifests/clevr.yaml --out clevr_codes.parquet
    Pretokenize {
        /// Manifest YAML (repeatable).
        #[arg(long, required = true)]
        manifest: Vec<PathBuf>,
        /// Output parquet file.
        #[arg(long)]
        out: PathBuf,
        /// MAGVIT-v2 folder or Hugging Face repo id.
        #[arg(long, default_value = mmada_vq::HF_REPO)]
        vq_checkpoint: String,
        /// Square side `R` (codes per image `(R/16)²`).
        #[arg(long, default_value_t = 512)]
        resolution: u32,
        /// Preprocessing of t2i manifests: center-crop (upstream `image_transform`) or squash.
        #[arg(long, value_enum, default_value = "center-crop")]
        t2i_mode: Mode,
        /// Preprocessing of mmu manifests (stage 2.x: squash).
        #[arg(long, value_enum, default_value = "squash")]
        mmu_mode: Mode,
        /// Root for the manifests' relative source and image paths (default: current dir).
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Device of the MAGVIT-v2 encoder: `cpu` or one GPU, `cuda:N` (feature `cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// CLI spelling of [`ResizeMode`].
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    /// Shorter side to `R`, centre crop.
    CenterCrop,
    /// Straight to `R × R`.
    Squash,
}

impl From<Mode> for ResizeMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::CenterCrop => ResizeMode::CenterCrop,
            Mode::Squash => ResizeMode::Squash,
        }
    }
}

fn tokenizer(path: &Path) -> Result<TextTokenizer> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    TextTokenizer::from_file_with_mmada_tokens(&file)
        .with_context(|| format!("loading tokenizer {}", file.display()))
}

/// Runs a `data` subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Inspect {
            manifest,
            source,
            data_root,
            n,
            tokenizer: tok,
            limit,
            max_lm_len,
            max_seq_length,
        } => {
            let mut m = Manifest::from_file(&manifest)?;
            if let Some(s) = source {
                m = m.with_source_path(s);
            }
            let tok = tok.as_deref().map(tokenizer).transpose()?;
            let opts = ScanOptions {
                n,
                limit,
                layout: LayoutConfig {
                    max_lm_len,
                    max_seq_length,
                    ..LayoutConfig::default()
                },
                ..ScanOptions::default()
            };
            let spin = spinner(format!("reading {}", manifest.display()));
            let scan = scan_manifest(m, data_root.as_deref(), tok.as_ref(), &opts);
            spin.finish_and_clear();
            print!("{}", scan?);
            Ok(())
        }
        DataCommand::Check { recipe, overrides } => check(&recipe, &overrides),
        DataCommand::Pretokenize {
            manifest,
            out,
            vq_checkpoint,
            resolution,
            t2i_mode,
            mmu_mode,
            data_root,
            device,
        } => {
            if resolution == 0 || !resolution.is_multiple_of(16) {
                bail!("--resolution {resolution}: must be a positive multiple of 16");
            }
            let mut manifests = vec![];
            for path in &manifest {
                let m = Manifest::from_file(path)?;
                let p = mmada_data::code_table::preprocess_for(
                    Some(m.task),
                    resolution,
                    t2i_mode.into(),
                    mmu_mode.into(),
                );
                manifests.push((m, p));
            }
            let device: DeviceSpec = device.parse::<DeviceSpec>()?.resolve()?;
            let t0 = std::time::Instant::now();
            let n = match device {
                DeviceSpec::Cpu(1) => pretokenize_on::<mmada_model::backend::Cpu>(
                    &Default::default(),
                    &vq_checkpoint,
                    &manifests,
                    data_root.as_deref(),
                    &out,
                )?,
                #[cfg(feature = "cuda")]
                DeviceSpec::Cuda(ref ids) if ids.len() == 1 => {
                    pretokenize_on::<mmada_model::backend::Cuda>(
                        &burn::backend::cuda::CudaDevice::new(ids[0]),
                        &vq_checkpoint,
                        &manifests,
                        data_root.as_deref(),
                        &out,
                    )?
                }
                other => bail!(
                    "--device {other}: pretokenize runs on one device, `cpu` or `cuda:N` (cuda needs a build with `cargo build --release -p mmada-train -p mmada-infer --features cuda`)"
                ),
            };
            tracing::info!(
                rows = n,
                seconds = t0.elapsed().as_secs_f64(),
                out = %out.display(),
                "pretokenized"
            );
            println!("{n} image(s) → {}", out.display());
            Ok(())
        }
    }
}

/// Load MAGVIT-v2 on `device` and encode the manifests' images into `out`.
fn pretokenize_on<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    vq_checkpoint: &str,
    manifests: &[(Manifest, mmada_data::Preprocess)],
    data_root: Option<&Path>,
    out: &Path,
) -> Result<usize> {
    let spin = spinner(format!("loading the image tokenizer {vq_checkpoint}"));
    let coder = mmada_vq::VqCoder::<B>::load(vq_checkpoint, device)
        .with_context(|| format!("loading the image tokenizer {vq_checkpoint}"))?;
    spin.set_message("encoding images");
    let n = mmada_data::code_table::pretokenize_observed(
        manifests,
        data_root,
        &coder,
        out,
        &mut |done| spin.set_message(format!("encoded {done} image(s)")),
    );
    spin.finish_and_clear();
    Ok(n?)
}

/// A spinner on stderr with the elapsed time and `msg` (hidden when stderr is not a
/// terminal).
fn spinner(msg: String) -> indicatif::ProgressBar {
    let spin = indicatif::ProgressBar::new_spinner();
    spin.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} · {elapsed}")
            .expect("static template"),
    );
    spin.set_message(msg);
    spin.enable_steady_tick(std::time::Duration::from_millis(120));
    spin
}

fn check(recipe_path: &Path, overrides: &[String]) -> Result<()> {
    let recipe = SftRecipe::load(recipe_path, overrides)?;
    let base = std::env::current_dir()?;
    let data_root = recipe.data.data_root.as_ref().map(|r| resolve(&base, r));
    let tok = match mmada_train::sft::load_tokenizer(&recipe.tokenizer, &base) {
        Ok(t) => Some(t),
        Err(e) => {
            println!("tokenizer: {e} — checking records without layouts");
            None
        }
    };
    let streams = [
        ("lm", &recipe.data.lm),
        ("mmu", &recipe.data.mmu),
        ("t2i", &recipe.data.t2i),
    ];
    let (mut ok, mut failed) = (0usize, 0usize);
    for (stream, section) in streams {
        for (i, spec) in section.sources.iter().enumerate() {
            let label = format!("data.{stream}.sources[{i}]");
            let spin = spinner(format!("checking {label}"));
            let res = resolve_manifest(
                spec.manifest.as_deref(),
                spec.inline.as_ref(),
                spec.path.as_deref(),
                &base,
            )
            .map_err(anyhow::Error::from)
            .and_then(|m| {
                Ok(check_manifest(
                    m,
                    data_root.as_deref(),
                    tok.as_ref(),
                    &recipe.data.layout,
                )?)
            });
            spin.finish_and_clear();
            match res {
                Ok(scan) => {
                    ok += 1;
                    print!("OK    {label} {}", Summary(&scan));
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL  {label}: {e:#}");
                }
            }
        }
    }
    println!("{ok} source(s) OK, {failed} failed");
    if failed > 0 {
        bail!("{failed} data source(s) failed the check");
    }
    Ok(())
}
