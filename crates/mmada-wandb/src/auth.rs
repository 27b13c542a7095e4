//! Where to send requests and with which key.

use base64::Engine as _;
use std::path::Path;

use crate::WandbError;

/// The public wandb server, used when neither the config nor `WANDB_BASE_URL` names one.
pub const DEFAULT_BASE_URL: &str = "https://api.wandb.ai";

/// A wandb API key. Its `Debug` form is redacted and it has no `Display` or `Serialize`, so it
/// cannot be printed, logged or written to the run directory by accident.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key (surrounding whitespace is removed).
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into().trim().to_string())
    }

    /// The `Authorization` header value: `Basic base64("api:" + key)`.
    pub(crate) fn basic_auth_header(&self) -> String {
        let raw = format!("api:{}", self.0);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Server base URL plus API key.
#[derive(Clone, Debug)]
pub struct Endpoint {
    base_url: String,
    api_key: ApiKey,
}

pub(crate) fn check_base_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or_else(|| "must start with http:// or https://".to_string())?;
    if rest.trim_end_matches('/').is_empty() {
        return Err("has no host".into());
    }
    if u.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace".into());
    }
    Ok(())
}

/// The host part of a base URL (`https://api.wandb.ai/x` → `api.wandb.ai`).
pub(crate) fn host_of(base_url: &str) -> String {
    let rest = base_url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(base_url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    if let Some(end) = hostport.find(']') {
        return hostport[..=end].to_string();
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => hostport.to_string(),
    }
}

/// Reads the password for `host` from netrc text (`machine HOST login api password KEY`).
pub(crate) fn netrc_password(text: &str, host: &str) -> Option<String> {
    let toks: Vec<&str> = text.split_whitespace().collect();
    let mut i = 0;
    let mut in_machine = false;
    while i < toks.len() {
        match toks[i] {
            "machine" => {
                in_machine = toks.get(i + 1) == Some(&host);
                i += 2;
            }
            "default" => {
                in_machine = false;
                i += 1;
            }
            "password" if in_machine => return toks.get(i + 1).map(|s| s.to_string()),
            "login" | "password" | "account" => i += 2,
            "macdef" => {
                // A macro runs to the end of the file for our purposes.
                return None;
            }
            _ => i += 1,
        }
    }
    None
}

impl Endpoint {
    /// An endpoint from explicit values (tests, or a caller with its own key store).
    pub fn new(base_url: impl Into<String>, api_key: ApiKey) -> Result<Self, WandbError> {
        let base_url = base_url.into();
        check_base_url(&base_url).map_err(|reason| WandbError::InvalidBaseUrl {
            url: base_url.clone(),
            reason,
        })?;
        Ok(Endpoint {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
        })
    }

    /// Resolves the endpoint as the SDK does: base URL from `config_base_url`, else
    /// `WANDB_BASE_URL`, else [`DEFAULT_BASE_URL`]; key from `WANDB_API_KEY`, else the
    /// `password` of the base URL's host in `~/.netrc` (or the file named by `NETRC`).
    pub fn from_env(config_base_url: Option<&str>) -> Result<Self, WandbError> {
        let base = config_base_url
            .map(str::to_string)
            .or_else(|| {
                std::env::var("WANDB_BASE_URL")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        let host = host_of(&base);
        let key = std::env::var("WANDB_API_KEY")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| {
                let path = std::env::var_os("NETRC")
                    .map(std::path::PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".netrc")))?;
                let text = std::fs::read_to_string(path).ok()?;
                netrc_password(&text, &host)
            })
            .ok_or(WandbError::MissingApiKey { host })?;
        Endpoint::new(base, ApiKey::new(key))
    }

    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub(crate) fn api_key(&self) -> &ApiKey {
        &self.api_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_api_colon_key() {
        let k = ApiKey::new("0123456789abcdef0123456789abcdef01234567");
        let h = k.basic_auth_header();
        let b64 = h.strip_prefix("Basic ").unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(raw, b"api:0123456789abcdef0123456789abcdef01234567");
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
    }

    #[test]
    fn netrc_lookup() {
        let t = "machine other.host login x password nope\nmachine api.wandb.ai\n  login user\n  password KEY123\n";
        assert_eq!(netrc_password(t, "api.wandb.ai").as_deref(), Some("KEY123"));
        assert_eq!(netrc_password(t, "missing"), None);
        assert_eq!(host_of("https://api.wandb.ai"), "api.wandb.ai");
        assert_eq!(host_of("http://127.0.0.1:8080/"), "127.0.0.1");
    }
}
