//! OpenAI request and response shapes of `serve`, the sampler settings accepted as extra body
//! fields, and the OpenAI-style JSON error.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mmada_sampler::{CacheMode, Preset, Remasking, SamplerSection};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with a
/// 4xx (the request) or 5xx (the server) status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong and, where possible, how to fix it.
    pub message: String,
    /// OpenAI `type` (`invalid_request_error`, `authentication_error`, …).
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// OpenAI `code` (`model_not_found`, `context_length_exceeded`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// A 500 `server_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The same error naming the request field at fault.
    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The same error with an OpenAI `code`.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Parses a request body: malformed JSON and wrongly typed fields are 400s naming the problem.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON ({e}); send a JSON object"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// Sampler settings accepted as extra body fields of the text endpoints (the keys of the
/// `sampling:` config section; `cfg` is an alias of `cfg_scale`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplerExtras {
    /// Published settings preset (`default`, `llada-gsm8k`, `mmada-paper`, `fast`).
    pub preset: Option<Preset>,
    /// Generated positions (a multiple of `block_length`).
    pub gen_length: Option<usize>,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Semi-autoregressive block length.
    pub block_length: Option<usize>,
    /// Classifier-free guidance scale.
    #[serde(alias = "cfg")]
    pub cfg_scale: Option<f64>,
    /// Remasking (`low_confidence`, `random`, `margin`, `entropy`).
    pub remasking: Option<Remasking>,
    /// Confidence-threshold parallel decoding.
    pub threshold: Option<f64>,
    /// Key/value cache (`none`, `prefix`, `dual`).
    pub cache: Option<CacheMode>,
    /// Cache refresh period within a block.
    pub refresh_every: Option<usize>,
    /// Positions next to the block recomputed at cached steps.
    pub vicinity: Option<usize>,
    /// Stop once the answer's block ends in EOS / EOT.
    pub early_stop: Option<bool>,
    /// Forbid EOS.
    pub logits_eos_inf: Option<bool>,
    /// A predicted EOT gets confidence 0.
    pub confidence_eos_eot_inf: Option<bool>,
}

impl SamplerExtras {
    /// The request's settings as a [`SamplerSection`] (to layer over the server's defaults).
    pub fn section(&self, temperature: Option<f64>) -> SamplerSection {
        SamplerSection {
            preset: self.preset,
            gen_length: self.gen_length,
            steps: self.steps,
            block_length: self.block_length,
            temperature,
            cfg_scale: self.cfg_scale,
            remasking: self.remasking,
            logits_eos_inf: self.logits_eos_inf,
            confidence_eos_eot_inf: self.confidence_eos_eot_inf,
            threshold: self.threshold,
            early_stop: self.early_stop,
            cache: self.cache,
            refresh_every: self.refresh_every,
            vicinity: self.vicinity,
            ..Default::default()
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Must be the served model's name when given.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}` adds a usage chunk at the end of a stream.
    pub stream_options: Option<StreamOptions>,
    /// Completion length cap (generated positions are rounded up to whole blocks).
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// Gumbel temperature (0 = greedy).
    pub temperature: Option<f64>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Number of choices (1 only).
    pub n: Option<usize>,
    /// Extension: every step of a stream also carries the tokens it committed (`mmada`
    /// field of the chunk).
    #[serde(default)]
    pub mmada_canvas: bool,
    /// Sampler settings.
    #[serde(flatten)]
    pub sampler: SamplerExtras,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system` / `developer`, `user`, `assistant`.
    pub role: String,
    /// Text or content parts; `null` is an empty turn.
    pub content: Option<Content>,
}

/// A message's content: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts.
    Parts(Vec<Part>),
}

/// A content part.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// `{"type": "text", "text": …}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}}`.
    ImageUrl {
        /// The image.
        image_url: ImageUrl,
    },
}

/// An image reference (data URLs only: the server fetches nothing).
#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    /// `data:image/…;base64,…`.
    pub url: String,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Must be the served model's name when given.
    pub model: Option<String>,
    /// One prompt or a list of prompts (raw text, no chat template).
    pub prompt: PromptInput,
    /// Server-sent events (one prompt only).
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}`.
    pub stream_options: Option<StreamOptions>,
    /// Completion length cap.
    pub max_tokens: Option<usize>,
    /// Gumbel temperature (0 = greedy).
    pub temperature: Option<f64>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Number of choices per prompt (1 only).
    pub n: Option<usize>,
    /// Extension: per-step tokens in stream chunks.
    #[serde(default)]
    pub mmada_canvas: bool,
    /// Sampler settings.
    #[serde(flatten)]
    pub sampler: SamplerExtras,
}

/// `prompt` of a completion request.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    One(String),
    /// Several prompts (one choice each).
    Many(Vec<String>),
}

/// `POST /v1/images/generations`.
#[derive(Debug, Deserialize)]
pub struct ImageRequest {
    /// Must be the served model's name when given.
    pub model: Option<String>,
    /// The caption.
    pub prompt: String,
    /// Number of images (seeds `seed`, `seed + 1`, …).
    pub n: Option<usize>,
    /// `RxR` (square, a multiple of 16) [default: the server's `--resolution`].
    pub size: Option<String>,
    /// `b64_json` (default) only: the server keeps no files.
    pub response_format: Option<String>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// MaskGIT steps.
    pub timesteps: Option<usize>,
    /// Classifier-free guidance `w`.
    #[serde(alias = "cfg", alias = "cfg_scale")]
    pub guidance_scale: Option<f64>,
    /// Initial MaskGIT temperature.
    pub temperature: Option<f64>,
    /// Mask schedule (cosine, linear, powK, sigmoid).
    pub noise_schedule: Option<String>,
    /// Extension: server-sent events, one per MaskGIT step (the committed codes), then the
    /// image.
    #[serde(default)]
    pub stream: bool,
    /// Extension: with `stream`, a decoded preview of the sampled codes every N steps
    /// (0 = none).
    #[serde(default)]
    pub preview_every: usize,
}
