//! One HTTP attempt at a time, classified for the retry logic of the callers.

use reqwest::blocking::Client;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use serde_json::{Value, json};
use std::time::Duration;

use crate::protocol::{self, Rng};
use crate::{Endpoint, WandbError};

/// The result of one attempt.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// 2xx: the parsed reply (`data` for GraphQL, the whole object for file_stream).
    Ok(Value),
    /// 408/429/5xx (not 501), status 0/≥600, or a network error: try again later.
    Retry {
        after: Option<Duration>,
        message: String,
    },
    /// Any other failure: retrying will not help.
    Fatal {
        status: Option<u16>,
        message: String,
    },
}

/// Statuses never retried (`RetryMostFailures` in wandb-core).
const NO_RETRY: [u16; 9] = [400, 401, 403, 404, 409, 410, 413, 422, 501];

fn retryable(op: &str, status: u16) -> bool {
    if op == "UpsertBucket" && status == 409 {
        return true;
    }
    !(200..300).contains(&status) && !NO_RETRY.contains(&status)
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 300 {
        let cut: String = s.chars().take(300).collect();
        format!("{cut}…")
    } else {
        s.to_string()
    }
}

/// Installs rustls' ring provider as the process default (once; a no-op if one is installed).
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A blocking HTTP client bound to one endpoint.
pub(crate) struct Transport {
    client: Client,
    base_url: String,
    auth: HeaderValue,
}

impl Transport {
    pub(crate) fn new(endpoint: &Endpoint, timeout: Duration) -> Result<Self, WandbError> {
        install_crypto_provider();
        let client = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| WandbError::Client(e.to_string()))?;
        let mut auth = HeaderValue::from_str(&endpoint.api_key().basic_auth_header())
            .map_err(|_| WandbError::Client("the API key is not a valid header value".into()))?;
        auth.set_sensitive(true);
        Ok(Transport {
            client,
            base_url: endpoint.base_url().to_string(),
            auth,
        })
    }

    fn post(&self, op: &str, url: &str, body: String, graphql: bool) -> Outcome {
        let mut req = self
            .client
            .post(url)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("mmada-wandb/", env!("CARGO_PKG_VERSION")),
            );
        if graphql {
            req = req
                .header("X-WANDB-USERNAME", "")
                .header("X-WANDB-USER-EMAIL", "");
        }
        let resp = match req.body(body).send() {
            Ok(r) => r,
            Err(e) => {
                // reqwest errors carry the URL, never headers; strip the URL anyway to keep
                // messages short.
                let e = e.without_url();
                return Outcome::Retry {
                    after: None,
                    message: format!("network error: {e}"),
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| protocol::parse_retry_after(v, protocol::unix_now()));
        let text = match resp.text() {
            Ok(t) => t,
            Err(e) => {
                return Outcome::Retry {
                    after: retry_after,
                    message: format!("reading the reply: {}", e.without_url()),
                };
            }
        };
        if !(200..300).contains(&status) {
            let message = format!("HTTP {status}: {}", excerpt(&text));
            return if retryable(op, status) {
                Outcome::Retry {
                    after: retry_after,
                    message,
                }
            } else {
                Outcome::Fatal {
                    status: Some(status),
                    message,
                }
            };
        }
        let value: Value = if text.trim().is_empty() {
            json!({})
        } else {
            match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    return Outcome::Fatal {
                        status: Some(status),
                        message: format!("reply is not JSON ({e}): {}", excerpt(&text)),
                    };
                }
            }
        };
        if graphql {
            if let Some(errs) = value.get("errors").filter(|e| !e.is_null()) {
                return Outcome::Fatal {
                    status: Some(status),
                    message: format!("GraphQL errors: {}", excerpt(&errs.to_string())),
                };
            }
            return Outcome::Ok(value.get("data").cloned().unwrap_or(Value::Null));
        }
        Outcome::Ok(value)
    }

    /// One GraphQL request: `{"query", "variables", "operationName"}`.
    pub(crate) fn graphql(&self, op: &str, query: &str, variables: Value) -> Outcome {
        let mut body = json!({"query": query, "operationName": op});
        if !variables.is_null() {
            body["variables"] = variables;
        }
        let url = format!("{}/graphql", self.base_url);
        self.post(op, &url, body.to_string(), true)
    }

    /// One file_stream POST.
    pub(crate) fn file_stream(
        &self,
        entity: &str,
        project: &str,
        run: &str,
        body: &Value,
    ) -> Outcome {
        let url = format!(
            "{}/files/{}/{}/{}/file_stream",
            self.base_url,
            path_segment(entity),
            path_segment(project),
            path_segment(run)
        );
        self.post("file_stream", &url, body.to_string(), false)
    }
}

/// Percent-encodes what may not appear in a path segment.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `attempt` until it succeeds, fails fatally, or `max_attempts` are used up, waiting with
/// exponential backoff + jitter (or `Retry-After`) in between. Used by `sync`.
pub(crate) fn with_retries(
    op: &str,
    max_attempts: u32,
    base: Duration,
    max: Duration,
    rng: &mut Rng,
    mut attempt: impl FnMut() -> Outcome,
) -> Result<Value, WandbError> {
    let mut n = 0;
    loop {
        n += 1;
        match attempt() {
            Outcome::Ok(v) => return Ok(v),
            Outcome::Fatal { status, message } => {
                return Err(WandbError::Rejected {
                    op: op.to_string(),
                    status,
                    message,
                });
            }
            Outcome::Retry { after, message } => {
                if n >= max_attempts {
                    return Err(WandbError::RetriesExhausted {
                        op: op.to_string(),
                        attempts: n,
                        message,
                    });
                }
                let wait = after.unwrap_or_else(|| protocol::backoff(n, base, max, rng));
                tracing::debug!(op, attempt = n, wait_s = wait.as_secs_f64(), %message, "wandb retry");
                std::thread::sleep(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_policy() {
        for s in [429, 500, 502, 503, 504, 408] {
            assert!(retryable("file_stream", s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 413, 422, 501] {
            assert!(!retryable("file_stream", s), "{s}");
        }
        assert!(retryable("UpsertBucket", 409));
        assert_eq!(path_segment("my team/x"), "my%20team%2Fx");
    }
}
