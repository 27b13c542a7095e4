//! `generate --mode t2i` and `generate --mode mmu`: image generation with the shared MaskGIT
//! sampler (spec §4.3) and image understanding with the text sampler over the mmu prompt
//! layout (spec §2.4 d, inference form), both through the one MAGVIT-v2 adapter
//! [`mmada_vq::VqCoder`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use clap::{Args, ValueEnum};
use mmada_data::image::{image_transform, open_image};
use mmada_data::layout::{mmu_generation_prompt, t2i_layout};
use mmada_data::{Preprocess, ResizeMode};
use mmada_diffusion::MaskSchedule;
use mmada_sampler::{SeededRng, T2iConfig, T2iInputs, t2i_generate};
use mmada_vq::VqCoder;

use crate::engine::Engine;
use crate::options::{GenerateArgs, ModelArgs, impl_or};

/// What `generate` produces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeArg {
    /// Text answers (LLaDA block sampler).
    #[default]
    Text,
    /// Images from captions (MaskGIT sampler + MAGVIT-v2 decoder); `--out` is a folder.
    T2i,
    /// Text answers about an image (`--image`): `<|mmu|> <|soi|> codes <|eoi|>` + chat prompt.
    Mmu,
}

/// Image options of `generate`: on the command line or in the `image:` section of
/// `--config FILE.yaml` (same names with underscores; the command line wins).
#[derive(Args, Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageArgs {
    /// text (default), t2i (writes PNGs + codes.jsonl into --out DIR) or mmu (needs --image).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Image file for --mode mmu (jpeg / png / webp).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// MAGVIT-v2 folder or Hugging Face repo id [default: showlab/magvitv2].
    #[arg(long)]
    pub vq_checkpoint: Option<String>,
    /// Image side in pixels (t2i output, mmu input preprocessing; codes `(R/16)²`)
    /// [default: 512].
    #[arg(long)]
    pub resolution: Option<u32>,
    /// mmu preprocessing: squash (upstream `image_transform_squash`) or center-crop.
    #[arg(long, value_enum)]
    pub image_mode: Option<ImageModeArg>,
    /// t2i text length `P` (`max_seq_length` of training; MMaDA-8B: 512) [default: 512].
    #[arg(long)]
    pub t2i_text_len: Option<usize>,
    /// t2i MaskGIT steps (upstream `generation_timesteps`) [default: 18].
    #[arg(long)]
    pub timesteps: Option<usize>,
    /// t2i classifier-free guidance `w` (`(1+w)·cond − w·uncond`; 0 = off) [default: 0].
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// t2i Gumbel temperature `T0` (annealed `T·(1 − r)` per step) [default: 1].
    #[arg(long)]
    pub t2i_temperature: Option<f64>,
    /// t2i mask schedule: cosine, linear, powK (e.g. pow2), sigmoid [default: cosine].
    #[arg(long)]
    pub noise_schedule: Option<String>,
}

/// CLI spelling of [`ResizeMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageModeArg {
    /// Shorter side to `R`, centre crop.
    CenterCrop,
    /// Straight to `R × R`.
    Squash,
}

impl_or!(ImageArgs {
    mode,
    image,
    vq_checkpoint,
    resolution,
    image_mode,
    t2i_text_len,
    timesteps,
    guidance_scale,
    t2i_temperature,
    noise_schedule,
});

impl ImageArgs {
    /// The generate mode (text when unset).
    pub fn mode(&self) -> ModeArg {
        self.mode.unwrap_or_default()
    }

    fn resolution(&self) -> Result<u32> {
        let r = self.resolution.unwrap_or(512);
        ensure!(
            r > 0 && r.is_multiple_of(16),
            "--resolution {r}: must be a positive multiple of 16 (MAGVIT-v2 downsamples by 16)"
        );
        Ok(r)
    }

    fn coder<B: Backend>(&self, device: &B::Device) -> Result<VqCoder<B>> {
        let spec = self.vq_checkpoint.as_deref().unwrap_or(mmada_vq::HF_REPO);
        VqCoder::load(spec, device).with_context(|| format!("loading the image tokenizer {spec}"))
    }
}

/// `generate --mode t2i`: one image per prompt, MaskGIT sampling over `N = (R/16)²` slots of
/// the t2i layout (`[iPAD]* <|t2i|> <BOS> caption <EOS> <|soi|> [MASK]*N <|eoi|>`, with the
/// empty-caption prompt for guidance), codes decoded with MAGVIT-v2, written as
/// `OUT/NNNN.png` plus `OUT/codes.jsonl` (index, prompt, file, grid, codes, nfe, seed).
pub fn run_t2i<B: Backend>(
    engine: &Engine<B>,
    m: &ModelArgs,
    g: &GenerateArgs,
    a: &ImageArgs,
    prompts: &[String],
) -> Result<()> {
    let out = g
        .out
        .as_deref()
        .context("--mode t2i writes images: pass --out DIR")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let res = a.resolution()?;
    let coder = a.coder::<B>(&engine.device)?;
    let grid = coder.grid(res as usize, res as usize)?;
    let n = grid.len();
    let t = *engine.tok.layout();
    let p = a.t2i_text_len.unwrap_or(512);
    let mut config = T2iConfig::from_layout(&t, n);
    config.codebook_size = config
        .codebook_size
        .min(engine.cfg.codebook_size.unwrap_or(config.codebook_size));
    ensure!(
        config.image_token_offset + config.codebook_size <= engine.cfg.embedding_size,
        "the model's head ({} ids) does not hold the image codes [{}, {}): is this an MMaDA checkpoint?",
        engine.cfg.embedding_size,
        config.image_token_offset,
        config.image_token_offset + config.codebook_size
    );
    if let Some(s) = a.timesteps {
        config.timesteps = s;
    }
    if let Some(w) = a.guidance_scale {
        config.guidance_scale = w;
    }
    if let Some(tm) = a.t2i_temperature {
        config.temperature = tm;
    }
    if let Some(s) = &a.noise_schedule {
        config.noise_schedule =
            MaskSchedule::parse(s).with_context(|| format!("--noise-schedule {s}"))?;
    }
    config.validate().context("t2i settings")?;
    tracing::info!(?config, text_len = p, resolution = res, "t2i sampler");
    let seed = m.seed.unwrap_or(0);
    let prompt_tensors = |drop: bool, caption: &str| -> Result<(Vec<i64>, Vec<bool>)> {
        let ids = engine.tok.encode(caption)?;
        let s = t2i_layout(&ids, &vec![0; n], p, drop, &t)?;
        let img = s.ids.len() - n - 1;
        let ids = s
            .ids
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if (img..img + n).contains(&i) {
                    i64::from(t.mask_id)
                } else {
                    i64::from(x)
                }
            })
            .collect();
        Ok((ids, s.attention_mask))
    };
    let mut jsonl = std::io::BufWriter::new(
        std::fs::File::create(out.join("codes.jsonl"))
            .with_context(|| format!("creating {}", out.join("codes.jsonl").display()))?,
    );
    for (i, prompt) in prompts.iter().enumerate() {
        let t0 = Instant::now();
        let (ids, mask) = prompt_tensors(false, prompt)?;
        let l = ids.len();
        let int = |v: Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, l]), &engine.device)
        };
        let boolean = |v: Vec<bool>| {
            Tensor::<B, 2, Bool>::from_data(TensorData::new(v, [1, l]), &engine.device)
        };
        let mut inputs = T2iInputs::new(int(ids), Some(boolean(mask)));
        if config.guidance_scale > 0.0 {
            let (uids, umask) = prompt_tensors(true, "")?;
            inputs = inputs.with_uncond(int(uids), Some(boolean(umask)));
        }
        let s = seed.wrapping_add(i as u64);
        let mut rng = SeededRng::new(s);
        let gen_ = t2i_generate(&engine.model, inputs, &config, &mut rng, false)
            .context("t2i sampling")?;
        let codes: Vec<u32> = gen_
            .codes
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("reading codes: {e:?}"))?
            .into_iter()
            .map(|c| c.clamp(0, config.codebook_size as i64 - 1) as u32)
            .collect();
        let img = coder
            .decode_codes(std::slice::from_ref(&codes), grid)?
            .remove(0);
        let file = format!("{i:04}.png");
        let path = out.join(&file);
        img.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        let rec = serde_json::json!({
            "index": i,
            "prompt": prompt,
            "file": file,
            "grid": [grid.h, grid.w],
            "codes": codes,
            "nfe": gen_.nfe,
            "seed": s,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        writeln!(jsonl, "{rec}")?;
        println!("{}", path.display());
    }
    jsonl.flush()?;
    Ok(())
}

/// `generate --mode mmu`: encodes `--image` (preprocessing `--image-mode`, default squash, at
/// `--resolution`) and answers each prompt with the text sampler over
/// `<|mmu|> <|soi|> codes <|eoi|>` + the chat-templated prompt (upstream `inference_mmu.py`).
/// Returns the image codes and the prompt ids for the text sampler.
pub fn mmu_prompts<B: Backend>(
    engine: &Engine<B>,
    a: &ImageArgs,
    prompts: &[String],
) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let Some(path) = a.image.as_deref() else {
        bail!("--mode mmu needs --image PATH");
    };
    let codes = encode_image::<B>(engine, a, path)?;
    let t = engine.tok.layout();
    let ids = prompts
        .iter()
        .map(|p| {
            let chat = engine.prompt_ids(p)?;
            Ok(mmu_generation_prompt(&codes, &chat, t)?)
        })
        .collect::<Result<_>>()?;
    Ok((codes, ids))
}

fn encode_image<B: Backend>(engine: &Engine<B>, a: &ImageArgs, path: &Path) -> Result<Vec<u32>> {
    let res = a.resolution()?;
    let mode = match a.image_mode.unwrap_or(ImageModeArg::Squash) {
        ImageModeArg::CenterCrop => ResizeMode::CenterCrop,
        ImageModeArg::Squash => ResizeMode::Squash,
    };
    let img = open_image(path).with_context(|| format!("reading --image {}", path.display()))?;
    let px = image_transform(
        &img,
        &Preprocess {
            resolution: res,
            mode,
        },
    )
    .with_context(|| format!("preprocessing {}", path.display()))?;
    let coder = a.coder::<B>(&engine.device)?;
    let codes = coder.encode_pixels(&[px])?.remove(0);
    let t = engine.tok.layout();
    if let Some(&c) = codes.iter().find(|&&c| c >= t.codebook_size) {
        bail!(
            "image code {c} is outside the model's codebook ({} codes): the VQ checkpoint does not match this model",
            t.codebook_size
        );
    }
    tracing::info!(image = %path.display(), codes = codes.len(), resolution = res, "image encoded");
    Ok(codes)
}
