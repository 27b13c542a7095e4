//! Training data of the SFT trainer: the recipe's `data:` / `loss:` sections and the run
//! seed turned into [`mmada_data::Streams`] (manifests → examples → image codes → samples →
//! per-stream mixtures) and [`mmada_diffusion::unified_forward_process`] (clean rows → noised
//! `[t2i | lm | mmu]` micro-batches). This module only adapts: it resolves paths, reads the
//! manifest files, derives the seeds and drops captions.
//!
//! Every random choice is derived from `(run seed, purpose, step, row)` ([`derive_seed`]),
//! so a micro-batch depends only on the step and the mixture cursor: resuming, splitting a
//! batch into accumulation micro-batches, or sharding across ranks gives the same rows and
//! the same masks.

use std::path::Path;

use mmada_data::layout::drop_caption;
use mmada_data::{
    CodeCache, CodeTable, CodeTableError, ImageCoder, ImageSources, LoadOptions, MixtureCursor,
    Sample, SourceLoad, StreamError, StreamSpec, Streams, TextTokenizer, collate,
};
use mmada_diffusion::{
    DiffusionError, PlainRow, RowKind, UnifiedBatch, UnifiedNoiseConfig, unified_forward_process,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::recipe::{
    DataSection, ImageTokenizerSection, LossSection, StreamSection, resolve_manifest,
};
use crate::run_dir::resolve;

pub use mmada_data::{ImageStats, SourceReport, StreamKind};
pub use mmada_diffusion::NoiseStats;

/// Purposes for [`derive_seed`].
pub mod purpose {
    /// Text masking (`t`, `u`) of a training row.
    pub const MASK: u64 = 1;
    /// Image masking of a t2i row.
    pub const IMAGE_MASK: u64 = 2;
    /// Masking of held-out evaluation rows.
    pub const EVAL_MASK: u64 = 3;
    /// Caption dropout (condition dropout for CFG) of a t2i row.
    pub const CAPTION_DROPOUT: u64 = 4;
    /// Mixture order of a stream (plus the stream index).
    pub const MIXTURE: u64 = 16;
    /// Initial LoRA `A` matrices.
    pub const LORA_INIT: u64 = 5;
    /// LoRA dropout masks of a step (the backend RNG is seeded with it; index = rank).
    pub const LORA_DROPOUT: u64 = 6;
}

/// A seed for one consumer: SplitMix64 over `(seed, purpose, step, index)`.
pub fn derive_seed(seed: u64, purpose: u64, step: u64, index: u64) -> u64 {
    mmada_data::mixture::hash_words(&[seed, purpose, step, index])
}

/// Whether the caption of t2i row `row` (index within optimizer step `step`) is dropped:
/// one uniform from the RNG seeded by `derive_seed(seed, CAPTION_DROPOUT, step, row)` is
/// `< prob` (upstream: `random.random() < cond_dropout_prob` per caption, spec §2.4 c).
/// Independent of the mask draws, of accumulation splits and of the rank.
pub fn caption_dropped(seed: u64, step: u64, row: u64, prob: f32) -> bool {
    if prob <= 0.0 {
        return false;
    }
    let mut rng = StdRng::seed_from_u64(derive_seed(seed, purpose::CAPTION_DROPOUT, step, row));
    rng.random::<f32>() < prob
}

/// The image coder of `image_tokenizer.checkpoint` (a MAGVIT-v2 folder, relative to `base`
/// when relative, or a Hugging Face repo id), on `device`; `None` without a section or
/// without a checkpoint.
///
/// # Errors
/// [`TrainDataError::Vq`] naming the folder / file / tensor when loading fails.
pub fn load_image_coder<B: burn::tensor::backend::Backend>(
    section: Option<&ImageTokenizerSection>,
    base: &Path,
    device: &B::Device,
) -> Result<Option<mmada_vq::VqCoder<B>>, TrainDataError> {
    let Some(spec) = section.and_then(|s| s.checkpoint.as_deref()) else {
        return Ok(None);
    };
    let local = resolve(base, Path::new(spec));
    let spec = if local.is_dir() {
        local.to_string_lossy().into_owned()
    } else {
        spec.to_string()
    };
    Ok(Some(mmada_vq::VqCoder::load(&spec, device)?))
}

/// Error building the training data.
#[derive(Debug, thiserror::Error)]
pub enum TrainDataError {
    /// A data-crate error (manifest, reader, tokenizer, layout), which names file and line.
    #[error(transparent)]
    Data(#[from] mmada_data::DataError),
    /// Loading a stream failed: an empty source, an image without a tokenizer, a row of
    /// another stream (names stream, source index, manifest, file and line).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The noising inputs were inconsistent.
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    /// The image tokenizer checkpoint could not be loaded.
    #[error("data.image_tokenizer.checkpoint: {0}")]
    Vq(#[from] mmada_vq::VqError),
    /// A pre-tokenized code table is unreadable or inconsistent.
    #[error(transparent)]
    Codes(#[from] CodeTableError),
}

/// The mixture cursors of every stream (saved in `trainer_state.json` as
/// `[["t2i", cursor], ["lm", cursor], …]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Cursor per stream.
    pub streams: Vec<(StreamKind, MixtureCursor)>,
}

/// The data of a run.
pub struct TrainData {
    tokenizer: TextTokenizer,
    streams: Streams,
    seed: u64,
    cond_dropout_prob: f32,
    noise: UnifiedNoiseConfig,
}

/// The code tables, cache and resize modes of `image_tokenizer` (paths relative to `base`).
fn image_sources<'a>(
    section: Option<&ImageTokenizerSection>,
    base: &Path,
    coder: Option<&'a dyn ImageCoder>,
) -> Result<ImageSources<'a>, TrainDataError> {
    let tables = match section {
        Some(s) => s
            .codes
            .iter()
            .map(|p| CodeTable::read(&resolve(base, p)))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![],
    };
    let cache = match section.and_then(|s| s.cache_dir.as_ref()) {
        Some(d) => Some(CodeCache::open(&resolve(base, d))?),
        None => None,
    };
    Ok(ImageSources {
        resolution: section.map_or(512, |s| s.resolution),
        t2i_mode: section.map_or_else(Default::default, |s| s.t2i_mode),
        mmu_mode: section.map_or_else(Default::default, |s| s.mmu_mode),
        tables,
        cache,
        coder,
    })
}

fn row_kind(kind: StreamKind) -> RowKind {
    match kind {
        StreamKind::T2i => RowKind::T2i,
        StreamKind::Lm => RowKind::Lm,
        StreamKind::Mmu => RowKind::Mmu,
    }
}

impl TrainData {
    /// Read every source of `data` (paths relative to `base`, usually the current
    /// directory), lay the examples out, hold out evaluation rows, and build the mixtures,
    /// seeded from the run seed `seed`; `loss` gives the noising options. Every rank loads
    /// the same (global) streams: data parallelism shards after noising
    /// (`crate::shard::shard_batch`).
    ///
    /// # Errors
    /// [`TrainDataError`] naming the manifest / file / line of a bad record or an empty source.
    pub fn load(
        data: &DataSection,
        loss: &LossSection,
        seed: u64,
        tokenizer: TextTokenizer,
        base: &Path,
    ) -> Result<Self, TrainDataError> {
        Self::load_with_images(data, loss, seed, tokenizer, base, None)
    }

    /// [`TrainData::load`] with an image coder (normally `mmada_vq::VqCoder` of
    /// `data.image_tokenizer.checkpoint`): the images of mmu / t2i rows are encoded once
    /// when the data is loaded (each image once per run; with `data.image_tokenizer.cache_dir`
    /// once ever, later runs read the on-disk cache), after looking them up in the
    /// pre-tokenized tables of `data.image_tokenizer.codes`.
    ///
    /// # Errors
    /// As [`TrainData::load`]; [`StreamError::NoImageTokenizer`] when a row has an image
    /// file and neither a coder nor a code table answers it; image decode / coder errors
    /// naming the row.
    pub fn load_with_images(
        data: &DataSection,
        loss: &LossSection,
        seed: u64,
        tokenizer: TextTokenizer,
        base: &Path,
        coder: Option<&dyn ImageCoder>,
    ) -> Result<Self, TrainDataError> {
        let images = image_sources(data.image_tokenizer.as_ref(), base, coder)?;
        let mut specs = vec![];
        for kind in StreamKind::ALL {
            let section: &StreamSection = match kind {
                StreamKind::T2i => &data.t2i,
                StreamKind::Lm => &data.lm,
                StreamKind::Mmu => &data.mmu,
            };
            if section.batch_size == 0 {
                continue;
            }
            let sources = section
                .sources
                .iter()
                .map(|s| {
                    Ok(SourceLoad {
                        manifest: resolve_manifest(
                            s.manifest.as_deref(),
                            s.inline.as_ref(),
                            s.path.as_deref(),
                            base,
                        )?,
                        weight: s.weight,
                        max_examples: s.max_examples,
                    })
                })
                .collect::<Result<_, TrainDataError>>()?;
            specs.push(StreamSpec {
                kind,
                batch_size: section.batch_size,
                mixing: section.mixing,
                mixture_seed: derive_seed(seed, purpose::MIXTURE, 0, kind.index() as u64),
                sources,
            });
        }
        let opts = LoadOptions {
            data_root: data.data_root.as_ref().map(|r| resolve(base, r)),
            layout: data.layout.clone(),
            filter_overlong: data.filter_overlong,
            eval_examples: data.eval_examples,
            rank: 0,
            world: 1,
        };
        let streams = Streams::load(specs, &tokenizer, &opts, &images)?;
        let noise = UnifiedNoiseConfig {
            eps: loss.eps,
            min_masking_rate: loss.min_masking_rate,
            mask_schedule: loss.mask_schedule,
            lm_answer_normalised: loss.lm_answer_normalised,
            ..UnifiedNoiseConfig::new(tokenizer.layout(), data.layout.max_seq_length)
        };
        Ok(TrainData {
            tokenizer,
            streams,
            seed,
            cond_dropout_prob: loss.cond_dropout_prob,
            noise,
        })
    }

    /// The tokenizer (with the MMaDA tokens added).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Held-out evaluation samples.
    pub fn eval_samples(&self) -> &[Sample] {
        self.streams.eval_samples()
    }

    /// Per-source counts.
    pub fn report(&self) -> &[SourceReport] {
        &self.streams.report
    }

    /// How image rows got their codes (encoder, cache, code tables).
    pub fn images(&self) -> ImageStats {
        self.streams.images
    }

    /// Rows per micro-batch (all streams).
    pub fn rows_per_micro_batch(&self) -> usize {
        self.streams.rows_per_micro_batch()
    }

    /// The current cursors.
    pub fn cursor(&self) -> DataCursor {
        DataCursor {
            streams: self.streams.cursor(),
        }
    }

    /// Continue from saved cursors.
    ///
    /// # Errors
    /// When a stream of the cursor does not exist or does not match its mixture.
    pub fn resume(&mut self, cursor: &DataCursor) -> Result<(), TrainDataError> {
        Ok(self.streams.resume(&cursor.streams)?)
    }

    /// The rows of the next micro-batch: `batch_size` samples of every enabled stream, in
    /// `[t2i, lm, mmu]` order. As upstream `batch_size_t2i` / `_lm` / `_mmu`, a stream's
    /// `batch_size` is rows per forward pass (per micro-batch); gradient accumulation
    /// multiplies it (an optimizer step sees `batch_size × grad_accum` rows per device).
    pub fn next_rows(&mut self) -> Vec<(StreamKind, Vec<Sample>)> {
        self.streams.next_rows()
    }

    /// Noise rows into a [`UnifiedBatch`]: rows ordered `[t2i | lm | mmu]`, t2i captions
    /// dropped with `loss.cond_dropout_prob` ([`caption_dropped`], not for evaluation),
    /// collated to the longest row, then [`unified_forward_process`] with row `r` seeded by
    /// `derive_seed(run seed, purpose_id, step, first_row + r)`. `first_row` is the index of
    /// the first row within the optimizer step (so accumulation micro-batches draw the same
    /// masks as one big batch); `purpose_id` selects training or evaluation randomness.
    ///
    /// # Errors
    /// [`TrainDataError`] on inconsistent lengths or an empty batch.
    pub fn noise(
        &self,
        rows: &[(StreamKind, Vec<Sample>)],
        step: u64,
        first_row: u64,
        purpose_id: u64,
    ) -> Result<(UnifiedBatch, NoiseStats), TrainDataError> {
        let t = self.tokenizer.layout();
        let mut kinds = vec![];
        let mut samples = vec![];
        for want in StreamKind::ALL {
            for (kind, rs) in rows {
                if *kind == want {
                    kinds.extend(std::iter::repeat_n(row_kind(want), rs.len()));
                    samples.extend(rs.iter().cloned());
                }
            }
        }
        // condition dropout of t2i captions (the first rows), seeded per (step, row)
        let n_t2i = kinds.iter().filter(|k| **k == RowKind::T2i).count();
        let mut captions_dropped = 0;
        if purpose_id != purpose::EVAL_MASK {
            for (r, s) in samples.iter_mut().enumerate().take(n_t2i) {
                let row = first_row + r as u64;
                if caption_dropped(self.seed, step, row, self.cond_dropout_prob) {
                    *s = drop_caption(s, self.noise.max_seq_length, t)?;
                    captions_dropped += 1;
                }
            }
        }
        let seq = samples.iter().map(Sample::len).max().unwrap_or(0);
        let batch = collate(samples, Some(seq), t)?;
        let plain: Vec<PlainRow<'_>> = (0..batch.batch_size)
            .map(|r| PlainRow {
                kind: kinds[r],
                ids: batch.row(r),
                labels: &batch.labels[r * seq..(r + 1) * seq],
                attention: &batch.attention_mask[r * seq..(r + 1) * seq],
                prompt_len: batch.prompt_lens[r],
                answer_len: batch.answer_lens[r],
                seed: derive_seed(self.seed, purpose_id, step, first_row + r as u64),
            })
            .collect();
        let (batch, mut stats) = unified_forward_process(&plain, seq, &self.noise)?;
        stats.t2i_captions_dropped = captions_dropped;
        Ok((batch, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_cursor_reads_the_saved_format() {
        // `trainer_state.json` data cursors as written before streams were an enum.
        let old = r#"{"streams":[["t2i",{"seed":1,"step":4,"drawn":[4],"batches":2}],
            ["lm",{"seed":2,"step":6,"drawn":[3,3]}],["mmu",{"seed":3,"step":0,"drawn":[0]}]]}"#;
        let c: DataCursor = serde_json::from_str(old).unwrap();
        let kinds: Vec<StreamKind> = c.streams.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, StreamKind::ALL);
        assert_eq!(c.streams[1].1.drawn, vec![3, 3]);
        assert_eq!(c.streams[1].1.batches, 0, "absent in old cursors");
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.starts_with(r#"{"streams":[["t2i",{"seed":1,"step":4,"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<DataCursor>(&text).unwrap(), c);
        assert!(serde_json::from_str::<DataCursor>(r#"{"streams":[["vid",{}]]}"#).is_err());
    }
}
