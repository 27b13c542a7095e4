//! The model worker: one thread owns the engine (and the image tokenizer) and takes jobs from
//! the bounded queue; text jobs with the same deterministic settings are decoded together in
//! one batch (left padding + key-padding mask), every job gets its events on its own channel.

use std::collections::VecDeque;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use base64::Engine as _;
use burn::tensor::backend::Backend;
use mmada_data::ResizeMode;
use mmada_data::layout::mmu_generation_prompt;
use mmada_sampler::{GenerateConfig, Remasking};
use mmada_vq::{RgbImage, VqCoder};
use tokio::sync::mpsc;

use super::api::ApiError;
use crate::engine::{Engine, Generation};
use crate::image::{T2iKnobs, encode_rgb, t2i_one, t2i_setup};

/// A unit of work for the model thread.
pub enum Job {
    /// Text generation (chat, completion, image understanding).
    Text(TextJob),
    /// Text-to-image.
    Image(ImageJob),
}

/// One text answer to generate.
pub struct TextJob {
    /// Prompt ids (chat-templated or raw), without the image block.
    pub prompt: Vec<u32>,
    /// Image understanding: the picture whose codes are put before the prompt
    /// (`<|mmu|> <|soi|> codes <|eoi|>` + prompt).
    pub image: Option<RgbImage>,
    /// Sampler settings.
    pub config: GenerateConfig,
    /// Seed of the sampler's randomness.
    pub seed: u64,
    /// Send a [`TextEvent::Step`] after every denoising step.
    pub watch: bool,
    /// Where the events go.
    pub tx: mpsc::UnboundedSender<TextEvent>,
}

/// What a text job reports.
pub enum TextEvent {
    /// The row's generated positions after a step (`mask_id` where masked) and the step at
    /// which each was committed (`-1` = masked).
    Step {
        /// Global step.
        step: usize,
        /// Block of the step.
        block: usize,
        /// `gen_length` ids.
        generated: Vec<i64>,
        /// `gen_length` commit steps.
        unmask: Vec<i64>,
    },
    /// The answer, or why there is none.
    Done(Result<TextDone, ApiError>),
}

/// A finished text job.
pub struct TextDone {
    /// The generation (text and ids cut at the first EOS / EOT).
    pub generation: Generation,
    /// Prompt length in tokens (image block included).
    pub prompt_tokens: usize,
}

/// Images to generate for one caption.
pub struct ImageJob {
    /// The caption.
    pub prompt: String,
    /// Number of images.
    pub n: usize,
    /// Side in pixels.
    pub resolution: u32,
    /// Sampler overrides.
    pub knobs: T2iKnobs,
    /// Seed of image 0 (image `i` uses `seed + i`).
    pub seed: u64,
    /// Send a [`ImageEvent::Step`] after every MaskGIT step.
    pub watch: bool,
    /// With `watch`: a decoded preview every N steps (0 = none).
    pub preview_every: usize,
    /// Where the events go.
    pub tx: mpsc::UnboundedSender<ImageEvent>,
}

/// What an image job reports.
pub enum ImageEvent {
    /// The slots after a MaskGIT step of image `index`.
    Step {
        /// Image index.
        index: usize,
        /// Step.
        step: usize,
        /// Total steps.
        steps: usize,
        /// Grid `[h, w]`.
        grid: [usize; 2],
        /// Committed code per slot, `-1` = masked.
        committed: Vec<i64>,
        /// PNG (base64) of the codes sampled at this step, every `preview_every` steps.
        preview: Option<String>,
    },
    /// Image `index`, as a base64 PNG.
    Image {
        /// Image index.
        index: usize,
        /// Base64 PNG.
        b64: String,
        /// Denoiser evaluations.
        nfe: usize,
    },
    /// All images sent, or why not.
    Done(Result<(), ApiError>),
}

/// The server's t2i / mmu settings.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// Default side in pixels (also the mmu preprocessing size).
    pub resolution: u32,
    /// t2i text length `P`.
    pub text_len: usize,
    /// Default MaskGIT overrides.
    pub knobs: T2iKnobs,
}

/// The worker's state.
pub struct Worker<B: Backend> {
    /// The model.
    pub engine: Engine<B>,
    /// The image tokenizer, or why there is none.
    pub coder: Result<VqCoder<B>, String>,
    /// Image settings.
    pub images: ImageSettings,
    /// Most text jobs decoded together.
    pub max_batch: usize,
    /// Generations stopped mid-way because every client of the batch went away.
    pub cancelled: Arc<AtomicU64>,
}

/// Greedy decoding with a deterministic ranking draws no random number: such jobs may share a
/// batch whatever their seeds.
fn batchable(c: &GenerateConfig) -> bool {
    c.temperature == 0.0 && c.remasking != Remasking::Random
}

/// The sampler stopped because the observer asked it to (every client went away).
fn cancelled(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<mmada_sampler::SamplerError>(),
        Some(mmada_sampler::SamplerError::Cancelled { .. })
    )
}

/// PNG bytes of `img`, base64.
pub fn png_b64(img: &RgbImage) -> Result<String, ApiError> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| ApiError::internal(format!("encoding the PNG: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf.into_inner()))
}

impl<B: Backend> Worker<B> {
    /// Takes jobs until every sender is gone.
    pub fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut pending: VecDeque<Job> = VecDeque::new();
        loop {
            let job = match pending.pop_front() {
                Some(j) => j,
                None => match rx.blocking_recv() {
                    Some(j) => j,
                    None => return,
                },
            };
            match job {
                Job::Image(j) => self.image_job(j),
                Job::Text(first) => {
                    let mut batch = vec![first];
                    if batchable(&batch[0].config) {
                        // compatible jobs already waiting join the batch
                        let mut rest = VecDeque::new();
                        while let Some(j) = pending.pop_front() {
                            match j {
                                Job::Text(t)
                                    if batch.len() < self.max_batch
                                        && t.config == batch[0].config =>
                                {
                                    batch.push(t)
                                }
                                other => rest.push_back(other),
                            }
                        }
                        pending = rest;
                        while batch.len() < self.max_batch {
                            match rx.try_recv() {
                                Ok(Job::Text(t)) if t.config == batch[0].config => batch.push(t),
                                Ok(other) => pending.push_back(other),
                                Err(_) => break,
                            }
                        }
                    }
                    self.text_batch(batch);
                }
            }
        }
    }

    fn text_batch(&self, batch: Vec<TextJob>) {
        // clients that went away are not decoded
        let batch: Vec<TextJob> = batch.into_iter().filter(|j| !j.tx.is_closed()).collect();
        let mut jobs = Vec::with_capacity(batch.len());
        let mut prompts = Vec::with_capacity(batch.len());
        for j in batch {
            match self.prompt_of(&j) {
                Ok(p) => {
                    prompts.push(p);
                    jobs.push(j);
                }
                Err(e) => {
                    let _ = j.tx.send(TextEvent::Done(Err(e)));
                }
            }
        }
        if jobs.is_empty() {
            return;
        }
        let config = jobs[0].config.clone();
        let seed = jobs[0].seed;
        let t0 = Instant::now();
        let out = self
            .engine
            .generate_batch_observed(&prompts, &config, seed, &mut |e| {
                // nobody waits for these rows any more (disconnected clients): stop decoding
                if jobs.iter().all(|j| j.tx.is_closed()) {
                    e.stop.set(true);
                    return;
                }
                for (r, j) in jobs.iter().enumerate() {
                    if j.watch {
                        let row = r * e.seq_len + e.prompt_len..(r + 1) * e.seq_len;
                        let _ = j.tx.send(TextEvent::Step {
                            step: e.step,
                            block: e.block,
                            generated: e.canvas[row.clone()].to_vec(),
                            unmask: e.unmask_step[row].to_vec(),
                        });
                    }
                }
            });
        tracing::debug!(
            batch = jobs.len(),
            seconds = t0.elapsed().as_secs_f64(),
            "text batch"
        );
        match out {
            Ok(gens) => {
                for ((j, g), p) in jobs.iter().zip(gens).zip(&prompts) {
                    let _ = j.tx.send(TextEvent::Done(Ok(TextDone {
                        generation: g,
                        prompt_tokens: p.len(),
                    })));
                }
            }
            Err(e) if cancelled(&e) => {
                self.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(batch = jobs.len(), "cancelled: every client went away");
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "generation failed");
                for j in &jobs {
                    let _ =
                        j.tx.send(TextEvent::Done(Err(ApiError::internal(format!("{e:#}")))));
                }
            }
        }
    }

    /// The job's prompt ids, with the image block for image understanding.
    fn prompt_of(&self, j: &TextJob) -> Result<Vec<u32>, ApiError> {
        let Some(img) = &j.image else {
            return Ok(j.prompt.clone());
        };
        let coder = self
            .coder
            .as_ref()
            .map_err(|e| ApiError::bad_request(e.clone()))?;
        let codes = encode_rgb(
            &self.engine,
            coder,
            img,
            self.images.resolution,
            ResizeMode::Squash,
        )
        .map_err(|e| ApiError::bad_request(format!("image: {e:#}")).param("messages"))?;
        mmu_generation_prompt(&codes, &j.prompt, self.engine.tok.layout())
            .map_err(|e| ApiError::bad_request(format!("image prompt: {e}")))
    }

    fn image_job(&self, j: ImageJob) {
        if j.tx.is_closed() {
            return;
        }
        let result = self.images_of(&j);
        let _ = j.tx.send(ImageEvent::Done(result));
    }

    fn images_of(&self, j: &ImageJob) -> Result<(), ApiError> {
        let coder = self
            .coder
            .as_ref()
            .map_err(|e| ApiError::bad_request(e.clone()))?;
        let setup = t2i_setup(
            &self.engine,
            coder,
            j.resolution,
            self.images.text_len,
            &j.knobs,
        )
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        let steps = setup.config.timesteps;
        let grid = [setup.grid.h, setup.grid.w];
        for index in 0..j.n {
            if j.tx.is_closed() {
                return Ok(());
            }
            let mut observer = |e: &mmada_sampler::T2iStepEvent<'_>| {
                if j.tx.is_closed() {
                    e.stop.set(true);
                    return;
                }
                if !j.watch {
                    return;
                }
                let preview = (j.preview_every > 0
                    && (e.step.is_multiple_of(j.preview_every) || e.step + 1 == steps))
                    .then(|| {
                        let codes: Vec<u32> = e.sampled[..e.seq_len]
                            .iter()
                            .map(|&c| c.max(0) as u32)
                            .collect();
                        coder
                            .decode_codes(&[codes], setup.grid)
                            .ok()
                            .and_then(|mut v| png_b64(&v.remove(0)).ok())
                    })
                    .flatten();
                let _ = j.tx.send(ImageEvent::Step {
                    index,
                    step: e.step,
                    steps,
                    grid,
                    committed: e.committed[..e.seq_len].to_vec(),
                    preview,
                });
            };
            let seed = j.seed.wrapping_add(index as u64);
            let img = match t2i_one(&self.engine, coder, &setup, &j.prompt, seed, &mut observer) {
                Ok(img) => img,
                Err(e) if cancelled(&e) => {
                    self.cancelled.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("image cancelled: the client went away");
                    return Ok(());
                }
                Err(e) => return Err(ApiError::internal(format!("{e:#}"))),
            };
            let b64 = png_b64(&img.image)?;
            let _ = j.tx.send(ImageEvent::Image {
                index,
                b64,
                nfe: img.nfe,
            });
        }
        Ok(())
    }
}
