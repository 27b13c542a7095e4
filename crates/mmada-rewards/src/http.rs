//! `kind: http` — a reward computed by a server the user runs (CLIP score, ImageReward, code
//! execution, a reward model).
//!
//! Protocol: `POST <url>` with JSON `{"items": [RewardInput, …]}` (fields `prompt`,
//! `completion`, `completion_ids`, `terminated`, `fields`, and `image` when the item has
//! one: `{"width", "height", "png_base64"}`, a base64 PNG — the decoded image of a
//! text-to-image completion, or the prompt image of an understanding task; see
//! [`crate::image::RewardImage`] and the reference CLIP / ImageReward server
//! `scripts/reward_server.py`); the reply must be
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

/// The rewards of a reply body `{"rewards": [number|null, …]}` for `n` items: one per item,
/// each finite (a reward of `1e39` overflows f32 to inf and would make the advantages NaN).
///
/// # Errors
/// A message naming what is wrong (not JSON / not that shape, with serde's line and column;
/// the wrong count; the index of a non-finite reward).
fn parse_reply(body: &str, n: usize) -> Result<Vec<Option<f32>>, String> {
    let parsed: Response = serde_json::from_str(body)
        .map_err(|e| format!("reply is not {{\"rewards\": [number|null, …]}}: {e}"))?;
    if parsed.rewards.len() != n {
        return Err(format!(
            "reply has {} rewards for {n} items",
            parsed.rewards.len()
        ));
    }
    if let Some(i) = parsed
        .rewards
        .iter()
        .position(|r| r.is_some_and(|x| !x.is_finite()))
    {
        return Err(format!(
            "reply reward {i} is not a finite f32 ({:?}): rewards must be finite numbers or null",
            parsed.rewards[i]
        ));
    }
    Ok(parsed.rewards)
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
        parse_reply(&body, items.len()).map_err(Failure::Fatal)
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

#[cfg(test)]
mod props {
    use super::parse_reply;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
        ))]

        /// Any body: no panic; an accepted reply has one finite reward (or null) per item.
        #[test]
        fn any_reply_body_never_panics(body in any::<String>(), n in 0usize..5) {
            if let Ok(r) = parse_reply(&body, n) {
                prop_assert_eq!(r.len(), n);
            }
        }

        /// Well-formed replies round-trip; wrong counts and overflowing numbers are named.
        #[test]
        fn shaped_replies(rewards in proptest::collection::vec(proptest::option::of(-1e6f32..1e6), 0..6), extra in 0usize..2, big in any::<bool>()) {
            let mut v: Vec<serde_json::Value> = rewards.iter().map(|r| serde_json::json!(r)).collect();
            if big && !v.is_empty() {
                v[0] = serde_json::json!(1e39f64);
            }
            let body = serde_json::json!({"rewards": v}).to_string();
            match parse_reply(&body, rewards.len() + extra) {
                Ok(r) => {
                    prop_assert!(extra == 0 && (!big || rewards.is_empty()));
                    for (a, b) in r.iter().zip(&rewards) {
                        prop_assert_eq!(a.is_some(), b.is_some());
                    }
                }
                Err(e) if extra > 0 => prop_assert!(e.contains("rewards for"), "{}", e),
                Err(e) => prop_assert!(e.contains("reward 0 is not a finite"), "{}", e),
            }
        }
    }
}
