//! Training data: manifests → examples → laid-out samples → per-stream mixtures → noised
//! `[t2i | lm | mmu]` micro-batches.
//!
//! Every random choice is derived from `(run seed, purpose, step, row)` ([`derive_seed`]),
//! so a micro-batch depends only on the step and the mixture cursor: resuming, splitting a
//! batch into accumulation micro-batches, or sharding across ranks gives the same rows and
//! the same masks.

use std::path::{Path, PathBuf};

use mmada_data::manifest::Manifest;
use mmada_data::reader::ExampleStream;
use mmada_data::{
    LayoutKind, Mixture, MixtureCursor, MixtureSource, Sample, TextTokenizer, collate,
    layout_example,
};
use mmada_diffusion::noise::{ImageMaskDraw, MaskDraw, forward_process, image_mask};
use mmada_diffusion::{DiffusionError, UnifiedBatch};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::recipe::{SftRecipe, SourceSpec, StreamSection};

/// Purposes for [`derive_seed`].
pub mod purpose {
    /// Text masking (`t`, `u`) of a training row.
    pub const MASK: u64 = 1;
    /// Image masking of a t2i row.
    pub const IMAGE_MASK: u64 = 2;
    /// Masking of held-out evaluation rows.
    pub const EVAL_MASK: u64 = 3;
    /// Mixture order of a stream (plus the stream index).
    pub const MIXTURE: u64 = 16;
}

/// A seed for one consumer: SplitMix64 over `(seed, purpose, step, index)`.
pub fn derive_seed(seed: u64, purpose: u64, step: u64, index: u64) -> u64 {
    mmada_data::mixture::hash_words(&[seed, purpose, step, index])
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
    lm_answer_normalised: bool,
    t2i_text_len: usize,
    /// Per-source counts.
    pub report: Vec<SourceReport>,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
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
                for ex in stream.by_ref() {
                    let ex = ex?;
                    let s = layout_example(&ex, &tokenizer, layout, false)?;
                    if s.truncated {
                        if recipe.data.filter_overlong {
                            rep.filtered_overlong += 1;
                            continue;
                        }
                        rep.truncated += 1;
                    }
                    samples.push(s);
                    if let Some(max) = spec.max_examples
                        && samples.len() >= max + recipe.data.eval_examples
                    {
                        break;
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
            let mixture = Mixture::new(
                mix,
                derive_seed(recipe.run.seed, purpose::MIXTURE, 0, si as u64),
                si as u64,
                rank,
                world,
            )?;
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
            lm_answer_normalised: recipe.loss.lm_answer_normalised,
            t2i_text_len: layout.max_seq_length,
            report,
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

    /// The next `rows` samples of every stream, `rows[k]` for stream k in `[t2i, lm, mmu]`
    /// order (only enabled streams).
    pub fn next_rows(&mut self, fraction: (usize, usize)) -> Vec<(&'static str, Vec<Sample>)> {
        let mut out = vec![];
        for s in &mut self.streams {
            // micro-batch `fraction.0` of `fraction.1`: an equal share of the stream's rows
            let n = s.batch_size / fraction.1 + usize::from(fraction.0 < s.batch_size % fraction.1);
            let picks = s.mixture.take_picks(n);
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
        let seq = all.iter().map(Sample::len).max().unwrap_or(0);
        let batch = collate(all, Some(seq), t)?;
        let mask_id = i64::from(t.mask_id);
        let (mut ids, mut labels) = (
            Vec::with_capacity(batch.ids.len()),
            Vec::with_capacity(batch.ids.len()),
        );
        let (mut t2i_masks, mut p_lm, mut p_mmu, mut ans_lm, mut ans_mmu) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut stats = NoiseStats::default();
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
                        image_mask(&draw, self.min_masking_rate)?
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
