//! Pluggable rewards for UniGRPO (spec §5.1 "Diversified Reward Modeling") and shared answer
//! extraction for evaluation.
//!
//! * [`Reward`]: scores a batch of [`RewardInput`]s → one `Option<f32>` per item (`None` = not
//!   applicable to that item, e.g. no reference answer).
//! * [`RewardRegistry`]: builds rewards from [`RewardSpec`]s (`kind`, optional `name`, `weight`,
//!   `params`) — the `reward_funcs:` list of a recipe. Built-in kinds: `math_correctness`
//!   (default weight 2.0, paper), `think_format` (0.5, paper), `length`, `regex`,
//!   `exact_match`, `http`, and the image rewards `image_color`, `caption_color`,
//!   `image_brightness` ([`image`]). Custom kinds are registered with
//!   [`RewardRegistry::register`].
//! * [`RewardSet::score`] → [`RewardBreakdown`]: per-reward scores, the weighted total per item
//!   (`Σ_k w_k·r_k` over the rewards that apply, TRL `nansum`), and per-reward statistics for the
//!   TRL metrics `rewards/<name>/mean|std`.
//! * [`extract`]: GSM8K `####`, `\boxed{}`, MATH normalisation, [`extract::answers_match`].
//!
//! No burn, no printing.

pub mod builtin;
pub mod extract;
pub mod http;
pub mod image;
mod registry;

pub use builtin::{ExactMatch, LengthReward, MathCorrectness, RegexMatch, ThinkFormat};
pub use http::HttpReward;
pub use image::{ImageBrightness, ImageColor, RewardImage};
pub use registry::{
    RewardBreakdown, RewardFactory, RewardRegistry, RewardSet, RewardSpec, RewardStats,
    WeightedReward,
};

/// One item to score: a prompt, one completion and the example's fields.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RewardInput {
    /// The prompt text (as shown to the model, after the chat template or raw).
    pub prompt: String,
    /// The decoded completion (special tokens removed).
    pub completion: String,
    /// The completion token ids up to (excluding) the first EOS / padding.
    #[serde(default)]
    pub completion_ids: Vec<u32>,
    /// Whether the completion ended with EOS inside the generation budget.
    #[serde(default)]
    pub terminated: bool,
    /// The example's other fields (`answer`, `solution`, image path, …), as in the dataset row.
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// The image of the item, when there is one: the decoded completion of a text-to-image
    /// rollout, or the prompt image of an understanding task. In JSON (the `http` reward's
    /// body) `{"width", "height", "png_base64"}`, absent when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<RewardImage>,
}

impl RewardInput {
    /// The string value of field `key` (numbers are formatted), `None` if missing or null.
    pub fn field_str(&self, key: &str) -> Option<String> {
        match self.fields.get(key)? {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            other => Some(other.to_string()),
        }
    }
}

/// A reward function over a batch.
pub trait Reward: Send + Sync {
    /// Scores every item: the result has `batch.len()` entries, `None` where the reward does
    /// not apply to the item.
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError>;
}

impl<F> Reward for F
where
    F: Fn(&[RewardInput]) -> Vec<Option<f32>> + Send + Sync,
{
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(self(batch))
    }
}

/// Errors from building or running rewards.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// `reward_funcs[i].kind` names no registered reward.
    #[error("{key}: unknown reward kind `{kind}`; valid kinds: {valid}")]
    UnknownKind {
        /// Key path, e.g. `reward_funcs[1].kind`.
        key: String,
        /// The kind given.
        kind: String,
        /// The registered kinds, comma separated.
        valid: String,
    },
    /// A parameter or field of a reward spec is invalid.
    #[error("{key}: {message}")]
    Config {
        /// Key path, e.g. `reward_funcs[0].params.pattern`.
        key: String,
        /// What is wrong and the valid values.
        message: String,
    },
    /// A reward returned a number of scores different from the batch size.
    #[error("reward `{name}` returned {got} scores for a batch of {expected}")]
    LengthMismatch {
        /// Reward name.
        name: String,
        /// Scores returned.
        got: usize,
        /// Batch size.
        expected: usize,
    },
    /// A reward returned a non-finite score.
    #[error("reward `{name}` returned a non-finite score {value} for item {index}")]
    NonFinite {
        /// Reward name.
        name: String,
        /// Item index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The HTTP reward failed after all retries.
    #[error("http reward {url}: {message} (after {attempts} attempt(s))")]
    Http {
        /// Endpoint.
        url: String,
        /// Last error.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
}
