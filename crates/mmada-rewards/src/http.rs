//! `kind: http` — a reward computed by a server the user runs (CLIP score, ImageReward, code
//! execution, a reward model).
//!
//! Protocol: `POST <url>` with JSON `{"items": [RewardInput, …]}` (fields `prompt`,
//! `completion`, `completion_ids`, `terminated`, `fields`); the reply must be
//! `{"rewards": [number | null, …]}` with one entry per item (`null` = not applicable).
//! Connection errors, timeouts and 5xx/429 replies are retried `retries` times with
//! exponential backoff; 4xx and malformed replies fail at once.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Reward, RewardError, RewardInput};

/// Parameters of [`HttpReward`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpParams {
    /// Endpoint (`http://` or `https://`).
    pub url: String,
    /// Per-request timeout in seconds (default 60).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Retries after the first attempt (default 2).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff in milliseconds, doubled per retry (default 500).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Items per request (default 0 = the whole batch in one request).
    #[serde(default)]
    pub max_batch: usize,
}

fn default_timeout() -> f64 {
    60.0
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> u64 {
    500
}

/// HTTP reward, see the module docs.
#[derive(Debug)]
pub struct HttpReward {
    params: HttpParams,
    client: reqwest::blocking::Client,
}

#[derive(Serialize)]
struct Request<'a> {
    items: &'a [RewardInput],
}

#[derive(Deserialize)]
struct Response {
    rewards: Vec<Option<f32>>,
}

enum Failure {
    Retry(String),
    Fatal(String),
}

impl HttpReward {
    /// Validates the parameters and builds the client.
    pub fn new(params: HttpParams) -> Result<Self, RewardError> {
        if !(params.url.starts_with("http://") || params.url.starts_with("https://")) {
            return Err(RewardError::Config {
                key: "params.url".into(),
                message: format!("`{}` must start with http:// or https://", params.url),
            });
        }
        if !(params.timeout_s.is_finite() && params.timeout_s > 0.0) {
            return Err(RewardError::Config {
                key: "params.timeout_s".into(),
                message: format!("{} is invalid: need a positive number", params.timeout_s),
            });
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs_f64(params.timeout_s))
            .build()
            .map_err(|e| RewardError::Config {
                key: "params".into(),
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(Self { params, client })
    }

    fn post_once(&self, items: &[RewardInput]) -> Result<Vec<Option<f32>>, Failure> {
        let resp = self
            .client
            .post(&self.params.url)
            .json(&Request { items })
            .send()
            .map_err(|e| Failure::Retry(e.to_string()))?;
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(Failure::Retry(format!("HTTP {status}")));
        }
        if !status.is_success() {
            let body = resp.text().unwrap_or_default();
            return Err(Failure::Fatal(format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        let body = resp.text().map_err(|e| Failure::Retry(e.to_string()))?;
        let parsed: Response = serde_json::from_str(&body).map_err(|e| {
            Failure::Fatal(format!(
                "reply is not {{\"rewards\": [number|null, …]}}: {e}"
            ))
        })?;
        if parsed.rewards.len() != items.len() {
            return Err(Failure::Fatal(format!(
                "reply has {} rewards for {} items",
                parsed.rewards.len(),
                items.len()
            )));
        }
        Ok(parsed.rewards)
    }

    fn post(&self, items: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        let mut backoff = Duration::from_millis(self.params.backoff_ms);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.post_once(items) {
                Ok(r) => return Ok(r),
                Err(Failure::Fatal(message)) => {
                    return Err(RewardError::Http {
                        url: self.params.url.clone(),
                        message,
                        attempts,
                    });
                }
                Err(Failure::Retry(message)) => {
                    if attempts > self.params.retries {
                        return Err(RewardError::Http {
                            url: self.params.url.clone(),
                            message,
                            attempts,
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
            }
        }
    }
}

impl Reward for HttpReward {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let chunk = if self.params.max_batch == 0 {
            batch.len()
        } else {
            self.params.max_batch
        };
        let mut out = Vec::with_capacity(batch.len());
        for part in batch.chunks(chunk) {
            out.extend(self.post(part)?);
        }
        Ok(out)
    }
}
