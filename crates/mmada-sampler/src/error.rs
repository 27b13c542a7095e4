//! Typed errors of the samplers.

/// Everything that can go wrong when configuring or running a sampler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// The observer asked the sampler to stop ([`crate::StepEvent::stop`]): a server whose
    /// clients went away. Not an error of the inputs.
    #[error("generation cancelled by the caller after step {step}")]
    Cancelled {
        /// The last step run.
        step: usize,
    },
    /// A configuration field has an invalid value. `field` is the serde name of the field
    /// (e.g. `gen_length`), so a recipe author can find it.
    #[error("invalid sampler config field `{field}`: {reason}")]
    InvalidConfig {
        /// The offending field (serde name).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An input tensor does not have the expected shape.
    #[error("input `{input}` has shape {got:?}, expected {expected}")]
    Shape {
        /// Name of the input argument.
        input: &'static str,
        /// The shape received.
        got: Vec<usize>,
        /// Description of the expected shape.
        expected: String,
    },
    /// A token id is outside the model's vocabulary (logits width).
    #[error("{what} id {id} is outside the model vocabulary (logits width {vocab})")]
    IdOutOfVocab {
        /// Which id (`mask_id`, `eos_id`, …).
        what: &'static str,
        /// The id.
        id: i64,
        /// The logits width returned by the denoiser.
        vocab: usize,
    },
    /// A prompt id is negative or outside the model's vocabulary (its input embedding or, when
    /// the denoiser does not report it, its logits width).
    #[error(
        "prompt row {row} position {position}: id {id} is outside the model vocabulary ({}); \
         check that the tokenizer matches the checkpoint",
        match vocab { Some(v) => format!("ids 0..{v}"), None => "negative id".to_string() }
    )]
    PromptId {
        /// Batch row of the prompt.
        row: usize,
        /// Position in the (left-padded) prompt.
        position: usize,
        /// The id.
        id: i64,
        /// The vocabulary size it was checked against (`None`: only the sign was checked).
        vocab: Option<usize>,
    },
    /// A padded prompt position (attention mask `false`) holds the mask id, so it would be
    /// decoded as a generated position. Upstream asserts `pad_token_id != mask_id`.
    #[error(
        "prompt row {row} position {position} is padding (attention_mask false) but holds the \
         mask id {mask_id}: pad with another id (the tokenizer's pad or EOS id), never the mask id"
    )]
    PadIsMask {
        /// Batch row.
        row: usize,
        /// Position in the prompt.
        position: usize,
        /// The mask id.
        mask_id: u32,
    },
    /// The denoiser returned logits of an unexpected shape.
    #[error("denoiser returned logits of shape {got:?}, expected [{batch}, {seq}, vocab]")]
    LogitsShape {
        /// The shape received.
        got: Vec<usize>,
        /// Expected batch size.
        batch: usize,
        /// Expected sequence length.
        seq: usize,
    },
    /// An injected randomness / mask source returned the wrong number of values.
    #[error("randomness source `{source_name}` returned {got} values, expected {expected}")]
    RandomnessLength {
        /// Which draw (`sample_codes`, `gumbel_noise`, `answer_masks`, …).
        source_name: &'static str,
        /// Number of values returned.
        got: usize,
        /// Number of values expected.
        expected: usize,
    },
    /// An injected randomness source returned an invalid value (e.g. a code outside the
    /// codebook, a uniform draw outside `[0, 1)`).
    #[error("randomness source `{source_name}` returned an invalid value: {reason}")]
    RandomnessValue {
        /// Which draw.
        source_name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The key/value cache did not fit a cached forward (a sampler fault: the cache is
    /// refreshed on the canvas it is used with).
    #[error("KV-cached forward: {0}")]
    KvCache(#[from] mmada_model::KvCacheError),
    /// Reading a tensor back from the device failed.
    #[error("reading tensor data from the device failed: {0}")]
    Data(String),
}

impl SamplerError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        SamplerError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
