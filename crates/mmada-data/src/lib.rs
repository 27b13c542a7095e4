//! # mmada-data
//!
//! Declarative datasets for LLaDA / MMaDA training (issue 3):
//!
//! * [`manifest`]: one YAML manifest per dataset (`data_manifests/`), unknown keys rejected.
//! * [`reader`]: streaming jsonl / json-array / parquet / Arrow IPC readers mapping records
//!   onto the canonical [`Example`], with errors naming manifest, file, line and field and
//!   `on_error: skip` counting.
//! * [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate plus the resolved
//!   [`TokenLayout`] (the only place special ids live, in `mmada-model`).
//! * [`template`]: chat templates (MMaDA `\n`, LLaDA `\n\n`) and the long-CoT instruction.
//! * [`layout`]: the exact sequence layouts of spec §2.4 (a)–(f).
//! * [`pipeline`]: example → sample, and the inspection helpers ([`render_sample`],
//!   [`LengthStats`]) the `mmada-train data inspect` command prints.
//! * [`mixture`]: seeded, rank-sharded, resumable weighted mixtures.
//! * [`batch`]: padding, truncation counts and the over-long filter.
//! * [`image`]: decoding, Pillow-exact bicubic resize, centre crop / squash, `[-1, 1]`
//!   normalisation, and the [`ImageCoder`] trait (pixels → codes).
//! * [`codes`]: [`ImageTokenizer`] turns image paths / bytes of examples into codes, with
//!   an on-disk [`CodeCache`].
//! * [`code_table`]: pre-tokenized image code tables (parquet) of `data pretokenize`
//!   ([`CodeTable`], [`code_table::pretokenize`]).
//! * [`streams`]: the t2i / lm / mmu training streams ([`StreamKind`]): manifests →
//!   examples → image codes → samples → one mixture per stream, and the rows of each
//!   micro-batch ([`Streams`]).
//! * [`inspect`]: what `mmada-train data inspect` / `data check` print.
//!
//! Libraries never print: counts are returned ([`ReadStats`], [`BatchStats`]).

pub mod batch;
pub mod code_table;
pub mod codes;
pub mod error;
pub mod example;
pub mod hub;
pub mod image;
pub mod inspect;
pub mod layout;
pub mod manifest;
pub mod mixture;
pub mod overrides;
pub mod pipeline;
pub mod reader;
pub mod streams;
pub mod template;
pub mod tokenizer;

pub use batch::{Batch, BatchStats, collate, filter_overlong};
pub use code_table::{CodeRow, CodeTable, CodeTableError};
pub use codes::{CodeCache, ImageTokenizer, TokenizeStats};
pub use error::{DataError, Location, Result};
pub use example::{Example, ImageRef, Message, Role, Task};
pub use image::{ImageCoder, Pixels, Preprocess, ResizeMode};
pub use layout::{IGNORE_ID, LayoutKind, Sample, TextSplit};
pub use manifest::{Format, Manifest, OnError, Source};
pub use mixture::{Mixing, Mixture, MixtureCursor, MixtureSource, Pick};
pub use mmada_model::tokens::TokenLayout;
pub use pipeline::{LayoutConfig, LengthStats, layout_example, render_sample};
pub use reader::{ExampleStream, ReadStats};
pub use streams::{
    ImageSources, ImageStats, LoadOptions, SourceLoad, SourceReport, StreamError, StreamKind,
    StreamSpec, Streams,
};
pub use template::{COT_INSTRUCTION, ChatTemplate};
pub use tokenizer::TextTokenizer;
