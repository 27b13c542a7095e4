//! Training streams: for each of the t2i, lm and mmu streams, manifests → examples → image
//! codes → laid-out samples → one seeded, resumable [`Mixture`], and the rows of every
//! micro-batch drawn from them ([`Streams::next_rows`]).
//!
//! The caller (the trainer) owns its recipe and its randomness: it reads the manifest files,
//! resolves paths and derives each mixture's seed, and hands this module plain values
//! ([`StreamSpec`], [`LoadOptions`], [`ImageSources`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::code_table::{CodeTable, CodeTableError};
use crate::codes::{CodeCache, ImageTokenizer, TokenizeStats};
use crate::error::DataError;
use crate::example::{Example, ImageRef};
use crate::image::{ImageCoder, Pixels, Preprocess, ResizeMode};
use crate::layout::{LayoutKind, Sample};
use crate::manifest::Manifest;
use crate::mixture::{Mixing, Mixture, MixtureCursor, MixtureSource};
use crate::pipeline::{LayoutConfig, layout_example};
use crate::reader::ExampleStream;
use crate::tokenizer::TextTokenizer;

/// Examples read per image-encoding batch while loading.
const IMAGE_CHUNK: usize = 16;

/// A training stream (upstream `batch_size_t2i` / `_lm` / `_mmu`). Serialised lowercase
/// (`t2i`, `lm`, `mmu`), the names of the recipe sections and of saved data cursors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// Text-to-image rows (layout (c)).
    T2i,
    /// Text rows: plain LM, chat, CoT (layouts (a), (b), (e), (f)).
    Lm,
    /// Multimodal-understanding rows (layout (d)).
    Mmu,
}

impl StreamKind {
    /// Every stream in unified-batch order `[t2i | lm | mmu]`.
    pub const ALL: [StreamKind; 3] = [StreamKind::T2i, StreamKind::Lm, StreamKind::Mmu];

    /// `t2i`, `lm` or `mmu`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::T2i => "t2i",
            StreamKind::Lm => "lm",
            StreamKind::Mmu => "mmu",
        }
    }

    /// Position in [`StreamKind::ALL`] (0, 1, 2): the row order of a unified batch and the
    /// `stream` number of its [`Mixture`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether rows laid out as `kind` belong to this stream: t2i ↔ t2i, mmu ↔ mmu, lm ↔
    /// plain LM and chat.
    pub fn accepts(self, kind: LayoutKind) -> bool {
        matches!(
            (self, kind),
            (StreamKind::T2i, LayoutKind::T2i)
                | (StreamKind::Mmu, LayoutKind::Mmu)
                | (StreamKind::Lm, LayoutKind::Lm | LayoutKind::Chat)
        )
    }
}

impl std::fmt::Display for StreamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dataset of a stream, its manifest already read.
#[derive(Debug, Clone)]
pub struct SourceLoad {
    /// The manifest (with any local source override applied).
    pub manifest: Manifest,
    /// Mixture weight within the stream.
    pub weight: f64,
    /// Train on at most this many examples (read after the held-out ones).
    pub max_examples: Option<usize>,
}

/// One stream to load.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Which stream.
    pub kind: StreamKind,
    /// Rows of this stream per micro-batch; `0` disables the stream (nothing is read).
    pub batch_size: usize,
    /// Per-row or per-batch source draws.
    pub mixing: Mixing,
    /// Seed of the stream's mixture (the caller derives it from its run seed).
    pub mixture_seed: u64,
    /// Datasets mixed by weight.
    pub sources: Vec<SourceLoad>,
}

/// Layout and selection options shared by every stream.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Root for relative manifest source paths.
    pub data_root: Option<PathBuf>,
    /// Sequence layouts.
    pub layout: LayoutConfig,
    /// Drop examples whose layout was truncated (instead of keeping them cut).
    pub filter_overlong: bool,
    /// This many leading examples of each lm source are held out for evaluation.
    pub eval_examples: usize,
    /// This rank's shard of every mixture, `rank < world`.
    pub rank: u64,
    /// Number of shards.
    pub world: u64,
}

impl Default for LoadOptions {
    /// Default layouts, keep truncated rows, no held-out rows, one shard.
    fn default() -> Self {
        LoadOptions {
            data_root: None,
            layout: LayoutConfig::default(),
            filter_overlong: false,
            eval_examples: 0,
            rank: 0,
            world: 1,
        }
    }
}

/// Where the images of mmu / t2i rows get their codes while loading: pre-tokenized
/// [`CodeTable`]s first, then the [`ImageCoder`] (through the on-disk [`CodeCache`]).
pub struct ImageSources<'a> {
    /// Square side `R` images are brought to.
    pub resolution: u32,
    /// Resize mode of t2i images.
    pub t2i_mode: ResizeMode,
    /// Resize mode of mmu images.
    pub mmu_mode: ResizeMode,
    /// Pre-tokenized code tables, searched in order.
    pub tables: Vec<CodeTable>,
    /// On-disk code cache of the coder.
    pub cache: Option<CodeCache>,
    /// The image tokenizer (normally MAGVIT-v2); `None` when only tables answer.
    pub coder: Option<&'a dyn ImageCoder>,
}

impl Default for ImageSources<'_> {
    /// No tables, cache or coder (rows must carry codes); 512 px, centre crop.
    fn default() -> Self {
        ImageSources {
            resolution: 512,
            t2i_mode: ResizeMode::default(),
            mmu_mode: ResizeMode::default(),
            tables: vec![],
            cache: None,
            coder: None,
        }
    }
}

/// Errors loading the streams.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A data error (manifest, reader, tokenizer, layout, image), which names file and line.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A pre-tokenized code table is unreadable or inconsistent.
    #[error(transparent)]
    Codes(#[from] CodeTableError),
    /// A row has an image file but no image tokenizer is configured.
    #[error(
        "{at}: a {stream} row has an image file but no image tokenizer is configured (and the {tables} pre-tokenized code table(s) lack it): set `data.image_tokenizer.checkpoint` to a MAGVIT-v2 folder or `showlab/magvitv2`, or list a `mmada-train data pretokenize` output under `data.image_tokenizer.codes`"
    )]
    NoImageTokenizer {
        /// Stream.
        stream: StreamKind,
        /// Manifest / file / line of the row.
        at: String,
        /// Code tables searched.
        tables: usize,
    },
    /// A source yielded no usable example.
    #[error("data.{stream}.sources[{index}] ({name}): no usable examples{why}")]
    Empty {
        /// Stream.
        stream: StreamKind,
        /// Source index within the stream.
        index: usize,
        /// Manifest name.
        name: String,
        /// Extra detail (filtered counts).
        why: String,
    },
    /// A source's rows are laid out for another stream (e.g. a chat manifest under t2i).
    #[error(
        "{at}: data.{stream}.sources[{index}] ({name}) has a {layout:?} row (manifest task `{task}`), which the {stream} stream cannot train on: list the source under the stream of its task"
    )]
    WrongStream {
        /// Stream.
        stream: StreamKind,
        /// Source index within the stream.
        index: usize,
        /// Manifest name.
        name: String,
        /// Manifest / file / line of the row.
        at: String,
        /// Layout of the row.
        layout: LayoutKind,
        /// Task of the manifest.
        task: &'static str,
    },
}

/// How the images of a run's rows got their codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStats {
    /// Images run through the image coder.
    pub encoded: u64,
    /// Images answered by the on-disk code cache.
    pub cache_hits: u64,
    /// Images answered by pre-tokenized code tables.
    pub from_tables: u64,
}

impl ImageStats {
    /// Accumulate.
    pub fn add(&mut self, o: ImageStats) {
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

/// Turns the images of one stream's examples into codes: code tables first, then the
/// cached [`ImageTokenizer`]; an image that neither can answer is an error naming the row.
struct StreamImages<'a> {
    stream: StreamKind,
    preprocess: Preprocess,
    tables: &'a [CodeTable],
    coder_id: Option<String>,
    tokenizer: Option<ImageTokenizer<CoderRef<'a>>>,
    from_tables: u64,
}

impl<'a> StreamImages<'a> {
    fn new(stream: StreamKind, src: &'a ImageSources<'a>) -> Self {
        let preprocess = Preprocess {
            resolution: src.resolution,
            mode: if stream == StreamKind::Mmu {
                src.mmu_mode
            } else {
                src.t2i_mode
            },
        };
        let tokenizer = src.coder.map(|c| {
            let t = ImageTokenizer::new(CoderRef(c), preprocess);
            match &src.cache {
                Some(cache) => t.with_cache(cache.clone()),
                None => t,
            }
        });
        StreamImages {
            stream,
            preprocess,
            tables: &src.tables,
            coder_id: src.coder.map(|c| c.id()),
            tokenizer,
            from_tables: 0,
        }
    }

    fn tokenize(&mut self, examples: &mut [Example]) -> Result<(), StreamError> {
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
                    return Err(StreamError::NoImageTokenizer {
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

/// One loaded stream: its samples per source and their mixture.
struct Stream {
    kind: StreamKind,
    batch_size: usize,
    sources: Vec<Vec<Sample>>,
    mixture: Mixture,
}

/// The loaded streams of a run, the held-out evaluation rows and the loading counts.
pub struct Streams {
    streams: Vec<Stream>,
    eval: Vec<Sample>,
    /// Per-source counts, in loading order.
    pub report: Vec<SourceReport>,
    /// How image rows got their codes (coder, cache, code tables).
    pub images: ImageStats,
}

impl Streams {
    /// Reads every source of every enabled stream (`batch_size > 0`), in the order given:
    /// examples in chunks of 16 (so images are encoded in batches, never more than a
    /// source still wants), image codes from `images`, layout, the over-long filter, the
    /// held-out evaluation rows (the first `eval_examples` of each lm source, leaving at
    /// least one for training), `max_examples`; then one [`Mixture`] per stream (seed
    /// `mixture_seed`, stream number [`StreamKind::index`], shard `rank` of `world`).
    ///
    /// # Errors
    /// [`StreamError::Empty`] for a source with no usable example;
    /// [`StreamError::WrongStream`] for a row laid out for another stream;
    /// [`StreamError::NoImageTokenizer`] for an image file that neither a table nor a coder
    /// answers; reader / layout / image errors naming manifest, file and line; a stream
    /// given twice.
    pub fn load(
        specs: Vec<StreamSpec>,
        tokenizer: &TextTokenizer,
        opts: &LoadOptions,
        images: &ImageSources<'_>,
    ) -> Result<Self, StreamError> {
        let mut streams: Vec<Stream> = vec![];
        let mut eval = vec![];
        let mut report = vec![];
        let mut image_stats = ImageStats::default();
        let eval_n = opts.eval_examples;
        for spec in specs {
            if spec.batch_size == 0 {
                continue;
            }
            let kind = spec.kind;
            if streams.iter().any(|s| s.kind == kind) {
                return Err(DataError::Mixture(format!("stream `{kind}` given twice")).into());
            }
            let mut sources = vec![];
            let mut mix = vec![];
            let mut stream_images = StreamImages::new(kind, images);
            for (i, src) in spec.sources.into_iter().enumerate() {
                let mname = src.manifest.name.clone();
                let task = src.manifest.task.as_str();
                let mut stream = ExampleStream::open(src.manifest, opts.data_root.as_deref())?;
                let mut samples = vec![];
                let mut rep = SourceReport {
                    name: mname.clone(),
                    stream: kind.as_str().into(),
                    ..Default::default()
                };
                let want = src.max_examples.map(|m| m + eval_n);
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
                        stream_images.tokenize(&mut chunk)?;
                    }
                    for ex in &chunk {
                        let s = layout_example(ex, tokenizer, &opts.layout, false)?;
                        if !kind.accepts(s.kind) {
                            return Err(StreamError::WrongStream {
                                stream: kind,
                                index: i,
                                name: mname,
                                at: ex.source.to_string(),
                                layout: s.kind,
                                task,
                            });
                        }
                        if s.truncated {
                            if opts.filter_overlong {
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
                if kind == StreamKind::Lm && eval_n > 0 {
                    let k = eval_n.min(samples.len().saturating_sub(1));
                    eval.extend(samples.drain(..k));
                    rep.eval_examples = k;
                }
                if let Some(max) = src.max_examples {
                    samples.truncate(max);
                }
                rep.train_examples = samples.len();
                if samples.is_empty() {
                    return Err(StreamError::Empty {
                        stream: kind,
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
                    weight: src.weight,
                    shuffle: true,
                });
                sources.push(samples);
                report.push(rep);
            }
            image_stats.add(stream_images.stats());
            let mixture = Mixture::new(
                mix,
                spec.mixture_seed,
                kind.index() as u64,
                opts.rank,
                opts.world,
            )?
            .with_mixing(spec.mixing);
            streams.push(Stream {
                kind,
                batch_size: spec.batch_size,
                sources,
                mixture,
            });
        }
        Ok(Streams {
            streams,
            eval,
            report,
            images: image_stats,
        })
    }

    /// Held-out evaluation samples (lm stream).
    pub fn eval_samples(&self) -> &[Sample] {
        &self.eval
    }

    /// The enabled streams, in loading order.
    pub fn kinds(&self) -> Vec<StreamKind> {
        self.streams.iter().map(|s| s.kind).collect()
    }

    /// Rows per micro-batch (all streams).
    pub fn rows_per_micro_batch(&self) -> usize {
        self.streams.iter().map(|s| s.batch_size).sum()
    }

    /// The mixture cursor of every enabled stream.
    pub fn cursor(&self) -> Vec<(StreamKind, MixtureCursor)> {
        self.streams
            .iter()
            .map(|s| (s.kind, s.mixture.cursor().clone()))
            .collect()
    }

    /// Continue from saved cursors.
    ///
    /// # Errors
    /// [`DataError::Mixture`] when a cursor's stream is not loaded or does not match its
    /// mixture.
    pub fn resume(&mut self, cursors: &[(StreamKind, MixtureCursor)]) -> Result<(), DataError> {
        for (kind, c) in cursors {
            let s = self
                .streams
                .iter_mut()
                .find(|s| s.kind == *kind)
                .ok_or_else(|| {
                    DataError::Mixture(format!(
                        "checkpoint has stream `{kind}` that the recipe lacks"
                    ))
                })?;
            s.mixture.resume(c.clone())?;
        }
        Ok(())
    }

    /// The rows of the next micro-batch: `batch_size` samples of every enabled stream, in
    /// loading order. As upstream `batch_size_t2i` / `_lm` / `_mmu`, a stream's
    /// `batch_size` is rows per forward pass; one batch of the stream per call
    /// (`mixing: per_batch` draws one source for it).
    pub fn next_rows(&mut self) -> Vec<(StreamKind, Vec<Sample>)> {
        self.streams
            .iter_mut()
            .map(|s| {
                let picks = s.mixture.take_batch(s.batch_size);
                let rows = picks
                    .iter()
                    .map(|p| s.sources[p.source][p.index as usize].clone())
                    .collect();
                (s.kind, rows)
            })
            .collect()
    }
}
