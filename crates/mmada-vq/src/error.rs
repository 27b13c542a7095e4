//! The crate's error type.

use std::path::PathBuf;

/// Error building, loading or running the MAGVIT-v2 tokenizer. Checkpoint variants name the
/// file and the tensor; input variants name the offending shape or value.
#[derive(Debug, thiserror::Error)]
pub enum VqError {
    /// An OS error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or has fields of the wrong type.
    #[error("{path}: invalid MAGVIT-v2 config: {reason}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The architecture described by a config cannot be built.
    #[error("invalid MAGVIT-v2 config: {0}")]
    InvalidConfig(String),
    /// No weights file in a checkpoint directory.
    #[error(
        "{dir}: no weights found (expected pytorch_model.safetensors (showlab/magvitv2) or model.safetensors)"
    )]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// The file is not a valid safetensors file, or is truncated (names the file and the
    /// first tensor past its end), or reading it failed.
    #[error(transparent)]
    Safetensors(#[from] mmada_safetensors::SafetensorsError),
    /// A tensor the architecture requires is absent.
    #[error(
        "{path}: missing tensor `{tensor}` (expected shape {expected:?}); does the config match the weights?"
    )]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The upstream name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor has a different shape than the config implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?} but the config implies {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The upstream name.
        tensor: String,
        /// Shape from the config.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype this reader does not convert.
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; expected {expected}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The upstream name.
        tensor: String,
        /// The header's dtype string.
        dtype: String,
        /// What is accepted for this tensor.
        expected: &'static str,
    },
    /// A quantizer buffer (`quantize.embedding` / `quantize.power_vals`) does not hold the
    /// values the lookup-free quantizer implies (bit `c` of code `n` = `(n >> (D-1-c)) & 1`).
    #[error(
        "{path}: buffer `{tensor}` differs from the LFQ codebook at element {index}: found {found}, expected {expected}"
    )]
    BufferMismatch {
        /// The file.
        path: PathBuf,
        /// The buffer name.
        tensor: String,
        /// Flat index of the first differing element.
        index: usize,
        /// Value in the file.
        found: f64,
        /// Value implied by the quantizer.
        expected: f64,
    },
    /// Tensors in the file that the architecture does not have.
    #[error(
        "{path}: unexpected tensors not used by the model: {tensors:?} (does the config match the weights?)"
    )]
    UnexpectedTensors {
        /// The file.
        path: PathBuf,
        /// Their names.
        tensors: Vec<String>,
    },
    /// An input tensor has the wrong shape.
    #[error("{what}: {reason}")]
    BadInput {
        /// Which input.
        what: &'static str,
        /// What is wrong, with the shape.
        reason: String,
    },
    /// A code outside `[0, codebook_size)`.
    #[error("code {code} at [{batch}, {position}] is outside [0, {codebook_size})")]
    CodeOutOfRange {
        /// Row.
        batch: usize,
        /// Position in the row.
        position: usize,
        /// The value.
        code: i64,
        /// Number of codes.
        codebook_size: usize,
    },
    /// Downloading from the Hugging Face hub failed.
    #[cfg(feature = "hub")]
    #[error("hf-hub download of {repo}/{file}: {reason}")]
    Hub {
        /// The repository.
        repo: String,
        /// The file.
        file: String,
        /// The client's message.
        reason: String,
    },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> VqError + '_ {
    move |source| VqError::Io {
        path: path.to_path_buf(),
        source,
    }
}
