//! Typed errors of the data pipeline. Every read error names the manifest, the file, the
//! line / row and the field, so a user can fix the data without a debugger.

use std::path::PathBuf;

/// Where a record came from: manifest name, file and 1-based line (jsonl, json) or 0-based
/// row (parquet, arrow).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    /// Manifest `name`.
    pub manifest: String,
    /// The data file.
    pub file: PathBuf,
    /// Line (jsonl: 1-based line; json array: 1-based line where the element starts) or
    /// row index (parquet / arrow: 0-based row in the file).
    pub row: u64,
    /// `"line"` or `"row"`: how to read [`Location::row`].
    pub unit: &'static str,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "manifest `{}`, file {}, {} {}",
            self.manifest,
            self.file.display(),
            self.unit,
            self.row
        )
    }
}

/// Errors of `mmada-data`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A manifest file is not valid (YAML syntax, unknown key, bad value).
    #[error("manifest {path}: {message}")]
    Manifest {
        /// The manifest file (or its name when built in memory).
        path: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A file could not be opened or read.
    #[error("{context}: cannot read {path}: {source}")]
    Io {
        /// Manifest name or other context.
        context: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest's source matched no file.
    #[error("manifest `{manifest}`: source {pattern} matches no file")]
    NoFiles {
        /// Manifest name.
        manifest: String,
        /// The path or glob that matched nothing.
        pattern: String,
    },
    /// A data file has no records at all.
    #[error("manifest `{manifest}`: file {file} is empty (no records)")]
    EmptyFile {
        /// Manifest name.
        manifest: String,
        /// The file.
        file: PathBuf,
    },
    /// A line / element / row is not valid JSON (or the file structure is broken).
    #[error("{at}: malformed record: {message}")]
    Malformed {
        /// Where.
        at: Box<Location>,
        /// Parser message.
        message: String,
    },
    /// A mapped field is missing or has the wrong type.
    #[error("{at}: field `{field}` (source `{path}`): {message}")]
    Field {
        /// Where.
        at: Box<Location>,
        /// Canonical field name (`question`, `answer`, …).
        field: &'static str,
        /// The source path in the record (`fields.<field>` of the manifest).
        path: String,
        /// What was expected / found.
        message: String,
    },
    /// An image referenced by a record is missing or cannot be decoded.
    #[error("{at}: field `{field}`: image {image}: {message}")]
    Image {
        /// Where.
        at: Box<Location>,
        /// Canonical field name (`image`, `image_bytes`).
        field: &'static str,
        /// The image path (or `<bytes>`).
        image: String,
        /// What is wrong.
        message: String,
    },
    /// A parquet or Arrow IPC file could not be decoded.
    #[error("manifest `{manifest}`: file {file}: {message}")]
    Columnar {
        /// Manifest name.
        manifest: String,
        /// The file.
        file: PathBuf,
        /// Decoder message.
        message: String,
    },
    /// Tokenizer loading or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The token layout could not be resolved.
    #[error(transparent)]
    TokenLayout(#[from] mmada_model::tokens::TokenLayoutError),
    /// The Hugging Face Hub (or its local cache) could not provide a file.
    #[error("hub {repo}@{revision}: {message}")]
    Hub {
        /// Repo id.
        repo: String,
        /// Revision.
        revision: String,
        /// What failed.
        message: String,
    },
    /// A layout cannot be built from the given inputs (e.g. an image code out of range).
    #[error("layout {layout}: {message}")]
    Layout {
        /// Layout name (`lm`, `chat`, `t2i`, `mmu`, `sft`).
        layout: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Image bytes could not be decoded (unknown format, corrupt data).
    #[error("image {image}: cannot decode: {message}")]
    ImageDecode {
        /// The image path (or `<bytes>`).
        image: String,
        /// Decoder message.
        message: String,
    },
    /// Image preprocessing got an impossible size.
    #[error("image preprocessing: {0}")]
    ImagePreprocess(String),
    /// The image tokenizer ([`crate::image::ImageCoder`]) failed or returned a bad result.
    #[error("image coder {coder}: {message}")]
    ImageCoder {
        /// [`crate::image::ImageCoder::id`].
        coder: String,
        /// What failed.
        message: String,
    },
    /// Mixture or batch configuration / cursor is invalid.
    #[error("mixture: {0}")]
    Mixture(String),
}

/// Result alias of this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Runs `f`, a panic becoming `Err(reason)`: the panic's message, else `fallback`. For calls
/// into crates that panic instead of erroring on some malformed files (the tokenizers crate
/// on a malformed `tokenizer.json`, arrow-ipc on a damaged IPC file), so that a bad file is
/// an error naming it, not a crash.
pub(crate) fn catch_panic<T>(
    f: impl FnOnce() -> T,
    fallback: &'static str,
) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| fallback.to_string())
    })
}
