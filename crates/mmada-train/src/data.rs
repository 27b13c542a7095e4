//! Training data: manifests → examples → laid-out samples → per-stream mixtures → noised
//! `[t2i | lm | mmu]` micro-batches.
//!
//! Every random choice is derived from `(run seed, purpose, step, row)` ([`derive_seed`]),
//! so a micro-batch depends only on the step and the mixture cursor: resuming, splitting a
//! batch into accumulation micro-batches, or sharding across ranks gives the same rows and
//! the same masks.

use std::path::Path;

use mmada_data::layout::t2i_layout;
use mmada_data::manifest::Manifest;
use mmada_data::reader::ExampleStream;
use mmada_data::{
    CodeCache, Example, ImageCoder, ImageRef, ImageTokenizer, LayoutKind, Mixture, MixtureCursor,
    MixtureSource, Pixels, Preprocess, Sample, TextTokenizer, TokenLayout, TokenizeStats, collate,
    layout_example,
};
use mmada_diffusion::noise::{ImageMaskDraw, MaskDraw, forward_process, image_mask_with};
use mmada_diffusion::{DiffusionError, MaskSchedule, UnifiedBatch};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::pretok::CodeTable;
use crate::recipe::{ImageTokenizerSection, SftRecipe, SourceSpec, StreamSection};
use crate::run_dir::resolve;

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
}

/// Examples read per image-encoding batch while loading.
const IMAGE_CHUNK: usize = 16;

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

/// A t2i sample with its caption replaced by the empty (null) prompt `<|t2i|> <BOS> <EOS>`,
/// same image codes, same length: the unconditional row of condition dropout (upstream
/// `t2i_prompt` with `''`). `p` is `max_seq_length`.
///
/// # Errors
/// When `s` is not a t2i sample or its image block is inconsistent.
pub fn drop_caption(
    s: &Sample,
    p: usize,
    t: &TokenLayout,
) -> Result<Sample, mmada_data::DataError> {
    let codes: Vec<u32> = s
        .ids
        .iter()
        .zip(&s.prompt_mask)
        .filter(|(_, prompt)| !**prompt)
        .map(|(&id, _)| {
            t.image_code(id)
                .ok_or_else(|| mmada_data::DataError::Layout {
                    layout: "t2i",
                    message: format!(
                        "caption dropout: id {id} in the image block is no image token"
                    ),
                })
        })
        .collect::<Result<_, _>>()?;
    t2i_layout(&[], &codes, p, true, t)
}

/// An [`ImageCoder`] borrowed by several [`ImageTokenizer`]s (one per preprocessing).
struct CoderRef<'a>(&'a dyn ImageCoder);

impl ImageCoder for CoderRef<'_> {
    fn id(&self) -> String {
        self.0.id()
    }
    fn encode(
        &self,
        images: &[Pixels],
    ) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error + Send + Sync>> {
        self.0.encode(images)
    }
}

/// Turns the images of one stream's examples into codes: pre-tokenized tables first
/// ([`CodeTable`], `image_tokenizer.codes`), then the cached [`ImageTokenizer`]; an image
/// that neither can answer is an error naming the row and the fix.
struct StreamImages<'a> {
    stream: &'static str,
    preprocess: Preprocess,
    tables: &'a [CodeTable],
    coder_id: Option<String>,
    tokenizer: Option<ImageTokenizer<CoderRef<'a>>>,
    from_tables: u64,
}

impl<'a> StreamImages<'a> {
    fn new(
        stream: &'static str,
        section: Option<&ImageTokenizerSection>,
        tables: &'a [CodeTable],
        coder: Option<&'a dyn ImageCoder>,
        cache: Option<&CodeCache>,
    ) -> Self {
        let preprocess = Preprocess {
            resolution: section.map_or(512, |s| s.resolution),
            mode: section.map_or_else(Default::default, |s| {
                if stream == "mmu" {
                    s.mmu_mode
                } else {
                    s.t2i_mode
                }
            }),
        };
        let tokenizer = coder.map(|c| {
            let t = ImageTokenizer::new(CoderRef(c), preprocess);
            match cache {
                Some(cache) => t.with_cache(cache.clone()),
                None => t,
            }
        });
        StreamImages {
            stream,
            preprocess,
            tables,
            coder_id: coder.map(|c| c.id()),
            tokenizer,
            from_tables: 0,
        }
    }

    fn tokenize(&mut self, examples: &mut [Example]) -> Result<(), TrainDataError> {
        for table in self.tables {
            self.from_tables +=
                table.fill(examples, &self.preprocess, self.coder_id.as_deref())? as u64;
        }
        match &mut self.tokenizer {
            Some(t) => t.tokenize(examples)?,
            None => {
                if let Some(ex) = examples
                    .iter()
                    .find(|e| matches!(e.image, Some(ImageRef::Path(_) | ImageRef::Bytes(_))))
                {
                    return Err(TrainDataError::NoImageTokenizer {
                        stream: self.stream,
                        at: ex.source.to_string(),
                        tables: self.tables.len(),
                    });
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> ImageStats {
        let t = self
            .tokenizer
            .as_ref()
            .map(|t| t.stats())
            .unwrap_or_default();
        ImageStats {
            encoded: t.encoded,
            cache_hits: t.cache_hits,
            from_tables: self.from_tables,
        }
    }
}

/// The image coder of `data.image_tokenizer.checkpoint` (a MAGVIT-v2 folder, relative to
/// `base` when relative, or a Hugging Face repo id), on `device`; `None` when the recipe
/// configures no checkpoint.
///
/// # Errors
/// [`TrainDataError::Vq`] naming the folder / file / tensor when loading fails.
pub fn load_image_coder<B: burn::tensor::backend::Backend>(
    recipe: &SftRecipe,
    base: &Path,
    device: &B::Device,
) -> Result<Option<mmada_vq::VqCoder<B>>, TrainDataError> {
    let Some(spec) = recipe
        .data
        .image_tokenizer
        .as_ref()
        .and_then(|s| s.checkpoint.as_deref())
    else {
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

/// How the images of a run's rows got their codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStats {
    /// Images run through the MAGVIT-v2 encoder.
    pub encoded: u64,
    /// Images answered by the on-disk code cache.
    pub cache_hits: u64,
    /// Images answered by pre-tokenized code tables (`image_tokenizer.codes`).
    pub from_tables: u64,
}

impl ImageStats {
    fn add(&mut self, o: ImageStats) {
        self.encoded += o.encoded;
        self.cache_hits += o.cache_hits;
        self.from_tables += o.from_tables;
    }
}

impl From<TokenizeStats> for ImageStats {
    fn from(t: TokenizeStats) -> Self {
        ImageStats {
            encoded: t.encoded,
            cache_hits: t.cache_hits,
            from_tables: 0,
        }
    }
}

/// Error building the training data.
#[derive(Debug, thiserror::Error)]
pub enum TrainDataError {
    /// A data-crate error (manifest, reader, tokenizer, layout), which names file and line.
    #[error(transparent)]
    Data(#[from] mmada_data::DataError),
    /// The noising inputs were inconsistent.
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    /// A row has an image file but no image tokenizer is configured.
    #[error(
        "{at}: a {stream} row has an image file but no image tokenizer is configured (and the {tables} pre-tokenized code table(s) lack it): set `data.image_tokenizer.checkpoint` to a MAGVIT-v2 folder or `showlab/magvitv2`, or list a `mmada-train data pretokenize` output under `data.image_tokenizer.codes`"
    )]
    NoImageTokenizer {
        /// Stream.
        stream: &'static str,
        /// Manifest / file / line of the row.
        at: String,
        /// Code tables searched.
        tables: usize,
    },
    /// The image tokenizer checkpoint could not be loaded.
    #[error("data.image_tokenizer.checkpoint: {0}")]
    Vq(#[from] mmada_vq::VqError),
    /// A pre-tokenized code table is unreadable or inconsistent.
    #[error(transparent)]
    Codes(#[from] crate::pretok::PretokError),
    /// A source yielded no usable example.
    #[error("data.{stream}.sources[{index}] ({name}): no usable examples{why}")]
    Empty {
        /// Stream name.
        stream: &'static str,
        /// Source index.
        index: usize,
        /// Manifest name.
        name: String,
        /// Extra detail (filtered counts).
        why: String,
    },
}

/// How many records each source read, skipped, filtered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceReport {
    /// Manifest name.
    pub name: String,
    /// Stream.
    pub stream: String,
    /// Examples kept for training.
    pub train_examples: usize,
    /// Examples held out for evaluation.
    pub eval_examples: usize,
    /// Records skipped by `on_error: skip`.
    pub skipped: u64,
    /// Examples dropped as over-long.
    pub filtered_overlong: usize,
    /// Examples truncated (kept).
    pub truncated: usize,
}

struct Stream {
    name: &'static str,
    batch_size: usize,
    sources: Vec<Vec<Sample>>,
    mixture: Mixture,
}

/// The mixture cursors of every stream (saved in `trainer_state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Cursor per stream name.
    pub streams: Vec<(String, MixtureCursor)>,
}

/// The data of a run.
pub struct TrainData {
    tokenizer: TextTokenizer,
    streams: Vec<Stream>,
    eval: Vec<Sample>,
    seed: u64,
    eps: f32,
    min_masking_rate: f32,
    mask_schedule: MaskSchedule,
    cond_dropout_prob: f32,
    lm_answer_normalised: bool,
    t2i_text_len: usize,
    /// Per-source counts.
    pub report: Vec<SourceReport>,
    /// How image rows got their codes (encoder, cache, code tables).
    pub images: ImageStats,
}

fn load_manifest(spec: &SourceSpec, base: &Path) -> Result<Manifest, TrainDataError> {
    let m = match (&spec.manifest, &spec.inline) {
        (Some(path), _) => Manifest::from_file(&resolve(base, path))?,
        (None, Some(m)) => m.clone(),
        (None, None) => unreachable!("validated by the recipe"),
    };
    // A local override also takes its format from the file extension (a parquet manifest
    // pointed at a jsonl copy).
    Ok(match &spec.path {
        Some(p) => m.with_source_path(p.clone()),
        None => m,
    })
}

impl TrainData {
    /// Read every source of the recipe (paths relative to `base`, usually the current
    /// directory), lay the examples out, hold out evaluation rows, and build the mixtures
    /// (rank `rank` of `world`).
    ///
    /// # Errors
    /// [`TrainDataError`] naming the manifest / file / line of a bad record or an empty source.
    pub fn load(
        recipe: &SftRecipe,
        tokenizer: TextTokenizer,
        base: &Path,
        rank: u64,
        world: u64,
    ) -> Result<Self, TrainDataError> {
        Self::load_with_images(recipe, tokenizer, base, rank, world, None)
    }

    /// [`TrainData::load`] with an image coder (normally `mmada_vq::VqCoder` of
    /// `data.image_tokenizer.checkpoint`): the images of mmu / t2i rows are encoded once
    /// when the data is loaded (each image once per run; with `data.image_tokenizer.cache_dir`
    /// once ever, later runs read the on-disk cache), after looking them up in the
    /// pre-tokenized tables of `data.image_tokenizer.codes`.
    ///
    /// # Errors
    /// As [`TrainData::load`]; [`TrainDataError::NoImageTokenizer`] when a row has an image
    /// file and neither a coder nor a code table answers it; image decode / coder errors
    /// naming the row.
    pub fn load_with_images(
        recipe: &SftRecipe,
        tokenizer: TextTokenizer,
        base: &Path,
        rank: u64,
        world: u64,
        coder: Option<&dyn ImageCoder>,
    ) -> Result<Self, TrainDataError> {
        let section = recipe.data.image_tokenizer.as_ref();
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
        let mut image_stats = ImageStats::default();
        let data_root = recipe.data.data_root.as_ref().map(|r| resolve(base, r));
        let layout = &recipe.data.layout;
        let mut streams = vec![];
        let mut eval = vec![];
        let mut report = vec![];
        let sections: [(&'static str, &StreamSection); 3] = [
            ("t2i", &recipe.data.t2i),
            ("lm", &recipe.data.lm),
            ("mmu", &recipe.data.mmu),
        ];
        for (si, (name, section)) in sections.into_iter().enumerate() {
            if section.batch_size == 0 {
                continue;
            }
            let mut sources = vec![];
            let mut mix = vec![];
            let mut images = StreamImages::new(
                name,
                recipe.data.image_tokenizer.as_ref(),
                &tables,
                coder,
                cache.as_ref(),
            );
            for (i, spec) in section.sources.iter().enumerate() {
                let manifest = load_manifest(spec, base)?;
                let mname = manifest.name.clone();
                let mut stream = ExampleStream::open(manifest, data_root.as_deref())?;
                let mut samples = vec![];
                let mut rep = SourceReport {
                    name: mname.clone(),
                    stream: name.into(),
                    ..Default::default()
                };
                // Examples are read in chunks so images are encoded in batches.
                let want = spec.max_examples.map(|m| m + recipe.data.eval_examples);
                let mut done = false;
                while !done {
                    // never read (and encode) more examples than are still wanted
                    let cap = want.map_or(IMAGE_CHUNK, |w| {
                        IMAGE_CHUNK.min(w.saturating_sub(samples.len()).max(1))
                    });
                    let mut chunk = vec![];
                    for ex in stream.by_ref() {
                        chunk.push(ex?);
                        if chunk.len() == cap {
                            break;
                        }
                    }
                    if chunk.len() < cap {
                        done = true;
                    }
                    if want.is_some_and(|w| samples.len() >= w) {
                        break;
                    }
                    if chunk.iter().any(|e| e.image.is_some()) {
                        images.tokenize(&mut chunk)?;
                    }
                    for ex in &chunk {
                        let s = layout_example(ex, &tokenizer, layout, false)?;
                        if s.truncated {
                            if recipe.data.filter_overlong {
                                rep.filtered_overlong += 1;
                                continue;
                            }
                            rep.truncated += 1;
                        }
                        samples.push(s);
                        if want.is_some_and(|w| samples.len() >= w) {
                            done = true;
                            break;
                        }
                    }
                }
                rep.skipped = stream.stats().skipped_records;
                if name == "lm" && recipe.data.eval_examples > 0 {
                    let k = recipe
                        .data
                        .eval_examples
                        .min(samples.len().saturating_sub(1));
                    eval.extend(samples.drain(..k));
                    rep.eval_examples = k;
                }
                if let Some(max) = spec.max_examples {
                    samples.truncate(max);
                }
                rep.train_examples = samples.len();
                if samples.is_empty() {
                    return Err(TrainDataError::Empty {
                        stream: name,
                        index: i,
                        name: mname,
                        why: format!(
                            " ({} over-long, {} skipped)",
                            rep.filtered_overlong, rep.skipped
                        ),
                    });
                }
                mix.push(MixtureSource {
                    name: mname,
                    len: samples.len() as u64,
                    weight: spec.weight,
                    shuffle: true,
                });
                sources.push(samples);
                report.push(rep);
            }
            image_stats.add(images.stats());
            let mixture = Mixture::new(
                mix,
                derive_seed(recipe.run.seed, purpose::MIXTURE, 0, si as u64),
                si as u64,
                rank,
                world,
            )?
            .with_mixing(section.mixing);
            streams.push(Stream {
                name,
                batch_size: section.batch_size,
                sources,
                mixture,
            });
        }
        Ok(TrainData {
            tokenizer,
            streams,
            eval,
            seed: recipe.run.seed,
            eps: recipe.loss.eps,
            min_masking_rate: recipe.loss.min_masking_rate,
            mask_schedule: recipe.loss.mask_schedule,
            cond_dropout_prob: recipe.loss.cond_dropout_prob,
            lm_answer_normalised: recipe.loss.lm_answer_normalised,
            t2i_text_len: layout.max_seq_length,
            report,
            images: image_stats,
        })
    }

    /// The tokenizer (with the MMaDA tokens added).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Held-out evaluation samples.
    pub fn eval_samples(&self) -> &[Sample] {
        &self.eval
    }

    /// Rows per micro-batch (all streams).
    pub fn rows_per_micro_batch(&self) -> usize {
        self.streams.iter().map(|s| s.batch_size).sum()
    }

    /// The current cursors.
    pub fn cursor(&self) -> DataCursor {
        DataCursor {
            streams: self
                .streams
                .iter()
                .map(|s| (s.name.to_string(), s.mixture.cursor().clone()))
                .collect(),
        }
    }

    /// Continue from saved cursors.
    ///
    /// # Errors
    /// When a stream of the cursor does not exist or does not match its mixture.
    pub fn resume(&mut self, cursor: &DataCursor) -> Result<(), TrainDataError> {
        for (name, c) in &cursor.streams {
            let s = self
                .streams
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    TrainDataError::Data(mmada_data::DataError::Mixture(format!(
                        "checkpoint has stream `{name}` that the recipe lacks"
                    )))
                })?;
            s.mixture.resume(c.clone())?;
        }
        Ok(())
    }

    /// The rows of the next micro-batch: `batch_size` samples of every enabled stream, in
    /// `[t2i, lm, mmu]` order. As upstream `batch_size_t2i` / `_lm` / `_mmu`, a stream's
    /// `batch_size` is rows per forward pass (per micro-batch); gradient accumulation
    /// multiplies it (an optimizer step sees `batch_size × grad_accum` rows per device).
    pub fn next_rows(&mut self) -> Vec<(&'static str, Vec<Sample>)> {
        let mut out = vec![];
        for s in &mut self.streams {
            // one batch of the stream per micro-step (`mixing: per_batch` draws its source)
            let picks = s.mixture.take_batch(s.batch_size);
            let rows = picks
                .iter()
                .map(|p| s.sources[p.source][p.index as usize].clone())
                .collect();
            out.push((s.name, rows));
        }
        out
    }

    /// Noise rows into a [`UnifiedBatch`]. `first_row` is the index of the first row within
    /// the optimizer step (so accumulation micro-batches draw the same masks as one big batch);
    /// `purpose` selects training or evaluation randomness.
    ///
    /// # Errors
    /// [`TrainDataError`] on inconsistent lengths.
    pub fn noise(
        &self,
        rows: &[(&'static str, Vec<Sample>)],
        step: u64,
        first_row: u64,
        purpose_id: u64,
    ) -> Result<(UnifiedBatch, NoiseStats), TrainDataError> {
        let t = self.tokenizer.layout();
        let mut all = vec![];
        let mut counts = [0usize; 3];
        for (name, samples) in rows {
            let k = match *name {
                "t2i" => 0,
                "lm" => 1,
                _ => 2,
            };
            counts[k] += samples.len();
        }
        // order t2i | lm | mmu
        for want in ["t2i", "lm", "mmu"] {
            for (name, samples) in rows {
                if *name == want {
                    all.extend(samples.iter().cloned());
                }
            }
        }
        // condition dropout of t2i captions (rows 0..counts[0]), seeded per (step, row)
        let mut captions_dropped = 0;
        if purpose_id != purpose::EVAL_MASK {
            for (r, s) in all.iter_mut().enumerate().take(counts[0]) {
                if caption_dropped(
                    self.seed,
                    step,
                    first_row + r as u64,
                    self.cond_dropout_prob,
                ) {
                    *s = drop_caption(s, self.t2i_text_len, t)?;
                    captions_dropped += 1;
                }
            }
        }
        let seq = all.iter().map(Sample::len).max().unwrap_or(0);
        let batch = collate(all, Some(seq), t)?;
        let mask_id = i64::from(t.mask_id);
        let (mut ids, mut labels) = (
            Vec::with_capacity(batch.ids.len()),
            Vec::with_capacity(batch.ids.len()),
        );
        let (mut t2i_masks, mut p_lm, mut p_mmu, mut ans_lm, mut ans_mmu) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut stats = NoiseStats {
            t2i_captions_dropped: captions_dropped,
            ..Default::default()
        };
        let offset = t.image_code_offset;
        let codebook = t.codebook_size;
        for r in 0..batch.batch_size {
            let x0: Vec<i64> = batch.row(r).iter().map(|&x| i64::from(x)).collect();
            let row_seed = derive_seed(self.seed, purpose_id, step, first_row + r as u64);
            let mut rng = StdRng::seed_from_u64(row_seed);
            match batch.kinds[r] {
                LayoutKind::T2i => {
                    let image_pos: Vec<usize> = (0..seq)
                        .filter(|&i| {
                            x0[i] >= i64::from(offset) && x0[i] < i64::from(offset + codebook)
                        })
                        .collect();
                    let draw = ImageMaskDraw::sample(&mut rng, image_pos.len());
                    let m = if image_pos.is_empty() {
                        vec![]
                    } else {
                        image_mask_with(&draw, &self.mask_schedule, self.min_masking_rate)?
                    };
                    let mut row_ids = x0.clone();
                    let mut row_labels = batch.labels[r * seq..(r + 1) * seq].to_vec();
                    for (j, &i) in image_pos.iter().enumerate() {
                        if m[j] {
                            row_ids[i] = mask_id;
                            row_labels[i] = x0[i];
                        } else {
                            row_labels[i] = -100;
                        }
                    }
                    stats.t2i_masked += m.iter().filter(|x| **x).count();
                    stats.t2i_image_tokens += m.len();
                    ids.extend(row_ids);
                    labels.extend(row_labels);
                    t2i_masks.extend_from_slice(&batch.attention_mask[r * seq..(r + 1) * seq]);
                }
                kind => {
                    let draw = MaskDraw::sample(&mut rng, 1, seq);
                    let prompt = batch.prompt_lens[r];
                    let n =
                        forward_process(&x0, 1, seq, &draw, self.eps, mask_id, Some(&[prompt]))?;
                    stats.text_masked += n.masked.iter().filter(|x| **x).count();
                    stats.text_answer_tokens += seq - prompt;
                    stats.p_mask_sum += f64::from(n.p_mask[0]);
                    stats.text_rows += 1;
                    ids.extend(n.noisy);
                    labels.extend(x0);
                    let ans = batch.answer_lens[r] as f32;
                    if kind == LayoutKind::Mmu {
                        p_mmu.extend(std::iter::repeat_n(n.p_mask[0], seq));
                        ans_mmu.extend(std::iter::repeat_n(ans, seq));
                    } else {
                        p_lm.extend(std::iter::repeat_n(n.p_mask[0], seq));
                        ans_lm.extend(std::iter::repeat_n(ans, seq));
                    }
                }
            }
        }
        stats.tokens = batch.batch_size * seq;
        let ub = UnifiedBatch {
            ids,
            labels,
            seq,
            n_t2i: counts[0],
            n_lm: counts[1],
            n_mmu: counts[2],
            max_seq_length: self.t2i_text_len,
            t2i_masks,
            p_mask_lm: p_lm,
            p_mask_mmu: p_mmu,
            answer_lengths_lm: self.lm_answer_normalised.then_some(ans_lm),
            answer_lengths_mmu: ans_mmu,
            mask_id,
        };
        Ok((ub, stats))
    }
}

/// Counts from noising one micro-batch (for `avg_masking_rate` and throughput).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoiseStats {
    /// Masked text tokens.
    pub text_masked: usize,
    /// Answer (maskable) text tokens.
    pub text_answer_tokens: usize,
    /// Sum of `p_mask` over text rows.
    pub p_mask_sum: f64,
    /// Text rows.
    pub text_rows: usize,
    /// Masked image tokens.
    pub t2i_masked: usize,
    /// Image tokens.
    pub t2i_image_tokens: usize,
    /// Tokens in the batch (rows × seq).
    pub tokens: usize,
    /// t2i rows whose caption was replaced by the empty prompt (condition dropout).
    pub t2i_captions_dropped: usize,
}

impl NoiseStats {
    /// Accumulate.
    pub fn add(&mut self, o: &NoiseStats) {
        self.text_masked += o.text_masked;
        self.text_answer_tokens += o.text_answer_tokens;
        self.p_mask_sum += o.p_mask_sum;
        self.text_rows += o.text_rows;
        self.t2i_masked += o.t2i_masked;
        self.t2i_image_tokens += o.t2i_image_tokens;
        self.tokens += o.tokens;
        self.t2i_captions_dropped += o.t2i_captions_dropped;
    }

    /// Mean `p_mask` over text rows (upstream `avg_masking_rate` is the mean mask ratio).
    pub fn avg_masking_rate(&self) -> f64 {
        if self.text_rows > 0 {
            self.p_mask_sum / self.text_rows as f64
        } else if self.t2i_image_tokens > 0 {
            self.t2i_masked as f64 / self.t2i_image_tokens as f64
        } else {
            0.0
        }
    }
}
