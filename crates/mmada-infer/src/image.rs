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
use mmada_sampler::{SeededRng, T2iConfig, T2iInputs, T2iStepEvent, t2i_generate_observed};
use mmada_vq::{Grid, RgbImage, VqCoder};

use crate::engine::Engine;
use crate::options::{GenerateArgs, ModelArgs, impl_or};

/// Default t2i MaskGIT steps: the official `inference_t2i.py` demo's `generation_timesteps=15`.
pub const T2I_TIMESTEPS: usize = 15;
/// Default t2i classifier-free guidance: the official `inference_t2i.py` demo's
/// `guidance_scale=3.5`.
pub const T2I_GUIDANCE_SCALE: f64 = 3.5;
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
    /// t2i MaskGIT steps (upstream `generation_timesteps`) [default: 15, as `inference_t2i.py`].
    #[arg(long)]
    pub timesteps: Option<usize>,
    /// t2i classifier-free guidance `w` (`(1+w)·cond − w·uncond`; 0 = off) [default: 3.5, as
    /// `inference_t2i.py`].
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

    /// The MAGVIT-v2 coder of `--vq-checkpoint` (default [`mmada_vq::HF_REPO`]).
    pub fn coder<B: Backend>(&self, device: &B::Device) -> Result<VqCoder<B>> {
        let spec = self.vq_checkpoint.as_deref().unwrap_or(mmada_vq::HF_REPO);
        VqCoder::load(spec, device).with_context(|| format!("loading the image tokenizer {spec}"))
    }
}

/// The t2i settings of one server or command: the MaskGIT config over `N = (R/16)²` slots, the
/// text length `P` and the code grid.
#[derive(Debug, Clone)]
pub struct T2iSetup {
    /// MaskGIT settings (codebook cut to the model's, ids from the tokenizer).
    pub config: T2iConfig,
    /// Text length `P` of the t2i layout.
    pub text_len: usize,
    /// The code grid of the resolution.
    pub grid: Grid,
}

/// Overrides of the t2i settings (`None` = the sampler's default).
#[derive(Debug, Clone, Default)]
pub struct T2iKnobs {
    /// MaskGIT steps.
    pub timesteps: Option<usize>,
    /// Guidance `w`.
    pub guidance_scale: Option<f64>,
    /// Initial temperature.
    pub temperature: Option<f64>,
    /// Mask schedule name (cosine, linear, powK, sigmoid).
    pub noise_schedule: Option<String>,
}

/// Builds and validates the t2i settings for images of `res × res` pixels.
pub fn t2i_setup<B: Backend>(
    engine: &Engine<B>,
    coder: &VqCoder<B>,
    res: u32,
    text_len: usize,
    knobs: &T2iKnobs,
) -> Result<T2iSetup> {
    ensure!(
        res > 0 && res.is_multiple_of(16),
        "resolution {res}: must be a positive multiple of 16 (MAGVIT-v2 downsamples by 16)"
    );
    let grid = coder.grid(res as usize, res as usize)?;
    let t = *engine.tok.layout();
    let mut config = T2iConfig::from_layout(&t, grid.len());
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
    // defaults of the official `inference_t2i.py` demo (guidance 3.5, 15 MaskGIT steps; spec §4)
    config.timesteps = knobs.timesteps.unwrap_or(T2I_TIMESTEPS);
    config.guidance_scale = knobs.guidance_scale.unwrap_or(T2I_GUIDANCE_SCALE);
    if let Some(tm) = knobs.temperature {
        config.temperature = tm;
    }
    if let Some(s) = &knobs.noise_schedule {
        config.noise_schedule =
            MaskSchedule::parse(s).with_context(|| format!("noise schedule {s}"))?;
    }
    config.validate().context("t2i settings")?;
    Ok(T2iSetup {
        config,
        text_len,
        grid,
    })
}

/// One generated image.
pub struct T2iImage {
    /// The `N` codes, row-major over the grid.
    pub codes: Vec<u32>,
    /// The decoded picture.
    pub image: RgbImage,
    /// Denoiser evaluations.
    pub nfe: usize,
}

/// Generates one image for `caption` (t2i layout
/// `[iPAD]* <|t2i|> <BOS> caption <EOS> <|soi|> [MASK]*N <|eoi|>`, the empty caption for
/// guidance) with the MaskGIT sampler seeded with `seed`, `observer` called after every step,
/// and decodes it with MAGVIT-v2.
pub fn t2i_one<B: Backend>(
    engine: &Engine<B>,
    coder: &VqCoder<B>,
    setup: &T2iSetup,
    caption: &str,
    seed: u64,
    observer: &mut dyn FnMut(&T2iStepEvent<'_>),
) -> Result<T2iImage> {
    let config = &setup.config;
    let n = config.seq_len;
    let t = *engine.tok.layout();
    let p = setup.text_len;
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
    let (ids, mask) = prompt_tensors(false, caption)?;
    let l = ids.len();
    let int =
        |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, l]), &engine.device);
    let boolean =
        |v: Vec<bool>| Tensor::<B, 2, Bool>::from_data(TensorData::new(v, [1, l]), &engine.device);
    let mut inputs = T2iInputs::new(int(ids), Some(boolean(mask)));
    if config.guidance_scale > 0.0 {
        let (uids, umask) = prompt_tensors(true, "")?;
        inputs = inputs.with_uncond(int(uids), Some(boolean(umask)));
    }
    let mut rng = SeededRng::new(seed);
    let gen_ = t2i_generate_observed(&engine.model, inputs, config, &mut rng, false, observer)
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
    let image = coder
        .decode_codes(std::slice::from_ref(&codes), setup.grid)?
        .remove(0);
    Ok(T2iImage {
        codes,
        image,
        nfe: gen_.nfe,
    })
}

/// `generate --mode t2i`: one image per prompt, MaskGIT sampling over `N = (R/16)²` slots of
/// the t2i layout ([`t2i_one`]), codes decoded with MAGVIT-v2, written as `OUT/NNNN.png` plus
/// `OUT/codes.jsonl` (index, prompt, file, grid, codes, nfe, seed).
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
    let setup = t2i_setup(
        engine,
        &coder,
        res,
        a.t2i_text_len.unwrap_or(512),
        &T2iKnobs {
            timesteps: a.timesteps,
            guidance_scale: a.guidance_scale,
            temperature: a.t2i_temperature,
            noise_schedule: a.noise_schedule.clone(),
        },
    )
    .map_err(|e| match a.noise_schedule.as_deref() {
        Some(s) if MaskSchedule::parse(s).is_err() => e.context(format!("--noise-schedule {s}")),
        _ => e,
    })?;
    tracing::info!(config = ?setup.config, text_len = setup.text_len, resolution = res, "t2i sampler");
    let seed = m.seed.unwrap_or(0);
    let grid = setup.grid;
    let mut jsonl = std::io::BufWriter::new(
        std::fs::File::create(out.join("codes.jsonl"))
            .with_context(|| format!("creating {}", out.join("codes.jsonl").display()))?,
    );
    let steps = setup.config.timesteps;
    let bar = crate::progress::bar((prompts.len() * steps) as u64, "steps");
    bar.set_message(format!("{} image(s)", prompts.len()));
    for (i, prompt) in prompts.iter().enumerate() {
        let t0 = Instant::now();
        let s = seed.wrapping_add(i as u64);
        let gen_ = t2i_one(engine, &coder, &setup, prompt, s, &mut |_| bar.inc(1))?;
        bar.set_position(((i + 1) * steps) as u64);
        let file = format!("{i:04}.png");
        let path = out.join(&file);
        gen_.image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        let rec = serde_json::json!({
            "index": i,
            "prompt": prompt,
            "file": file,
            "grid": [grid.h, grid.w],
            "codes": gen_.codes,
            "nfe": gen_.nfe,
            "seed": s,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        writeln!(jsonl, "{rec}")?;
        bar.suspend(|| println!("{}", path.display()));
    }
    bar.finish_and_clear();
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
    let coder = a.coder::<B>(&engine.device)?;
    let codes = encode_rgb(engine, &coder, &img, res, mode)
        .with_context(|| format!("encoding {}", path.display()))?;
    tracing::info!(image = %path.display(), codes = codes.len(), resolution = res, "image encoded");
    Ok(codes)
}

/// Preprocesses `img` (`mode` at `res × res`) and encodes it into MAGVIT-v2 codes, checked
/// against the model's codebook.
pub fn encode_rgb<B: Backend>(
    engine: &Engine<B>,
    coder: &VqCoder<B>,
    img: &RgbImage,
    res: u32,
    mode: ResizeMode,
) -> Result<Vec<u32>> {
    let px = image_transform(
        img,
        &Preprocess {
            resolution: res,
            mode,
        },
    )
    .context("preprocessing the image")?;
    let codes = coder.encode_pixels(&[px])?.remove(0);
    let t = engine.tok.layout();
    if let Some(&c) = codes.iter().find(|&&c| c >= t.codebook_size) {
        bail!(
            "image code {c} is outside the model's codebook ({} codes): the VQ checkpoint does not match this model",
            t.codebook_size
        );
    }
    Ok(codes)
}
