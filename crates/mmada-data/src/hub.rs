//! Hugging Face Hub ids wherever a local folder or file is expected: `--checkpoint
//! GSAI-ML/LLaDA-8B-Instruct`, `model.checkpoint`, `tokenizer.path`, `eval --data
//! openai/gsm8k:main/test-00000-of-00001.parquet`.
//!
//! A path that exists locally is always used as is. Otherwise a string shaped like a repo
//! id (`owner/name`, optionally `@revision`) is looked up in the local cache and downloaded
//! through `hf-hub` when missing. The environment is honoured as by `huggingface_hub`:
//!
//! * `HF_HOME` (cache under `$HF_HOME/hub`) or `HF_HUB_CACHE` (the cache folder itself);
//! * `HF_ENDPOINT` (a mirror instead of `https://huggingface.co`);
//! * `HF_TOKEN` (else the token file `huggingface-cli login` wrote);
//! * `HF_HUB_OFFLINE=1`: never touch the network; a file missing from the cache is an error
//!   naming the cache folder.

use std::path::{Path, PathBuf};

pub use hf_hub::RepoType;
use hf_hub::{Cache, Repo};

use crate::error::{DataError, Result};

/// The files of a model checkpoint fetched besides the weights when present in the repo
/// (tokenizer, chat template, generation defaults).
pub const MODEL_SIDECARS: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// A Hub repository reference `owner/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit (default `main`).
    pub revision: String,
}

impl HubRef {
    /// Parses `owner/name` or `owner/name@revision`; `None` when `spec` is not shaped like a
    /// repo id (absolute or relative paths such as `/x/y`, `./x`, `runs/a/b`, `x.json`).
    pub fn parse(spec: &str) -> Option<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let (owner, name) = id.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && !p.starts_with('-')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        // `tokenizer.json`-like last parts are files, not repos
        let looks_like_file = [
            ".json",
            ".jsonl",
            ".safetensors",
            ".parquet",
            ".yaml",
            ".txt",
        ]
        .iter()
        .any(|ext| name.ends_with(ext));
        (part_ok(owner) && part_ok(name) && !looks_like_file).then(|| HubRef {
            repo: id.to_string(),
            revision: revision.to_string(),
        })
    }

    fn err(&self, message: String) -> DataError {
        DataError::Hub {
            repo: self.repo.clone(),
            revision: self.revision.clone(),
            message,
        }
    }
}

/// The local cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache() -> Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

/// `HF_HUB_OFFLINE` is set to a true value (`1`, `true`, `yes`, `on`).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// One file of a repo: from the cache when present, else downloaded (unless offline).
///
/// # Errors
/// [`DataError::Hub`]: offline and not cached (naming the cache folder), or the download
/// failed (no network, unknown repo or file, gated repo without `HF_TOKEN`).
pub fn fetch(r: &HubRef, kind: RepoType, file: &str) -> Result<PathBuf> {
    let repo = Repo::with_revision(r.repo.clone(), kind, r.revision.clone());
    let cache = cache();
    if let Some(p) = cache.repo(repo.clone()).get(file) {
        return Ok(p);
    }
    if offline() {
        return Err(r.err(format!(
            "{file} is not in the local cache {} and HF_HUB_OFFLINE is set; download it once \
             with network access, or point HF_HOME / HF_HUB_CACHE at a cache that has it",
            cache.path().display()
        )));
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(false);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT")
        && !endpoint.is_empty()
    {
        builder = builder.with_endpoint(endpoint);
    }
    if let Ok(token) = std::env::var("HF_TOKEN")
        && !token.is_empty()
    {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| r.err(e.to_string()))?;
    api.repo(repo).get(file).map_err(|e| {
        r.err(format!(
            "{file}: {e} (no network? set HF_ENDPOINT for a mirror, HF_TOKEN for a gated repo)"
        ))
    })
}

/// Whether the repo has `file`: in the cache, or (online) by trying to download it.
fn fetch_optional(r: &HubRef, file: &str) -> Option<PathBuf> {
    fetch(r, RepoType::Model, file).ok()
}

/// A model checkpoint folder of the Hub (`config.json`, the weights — one
/// `model.safetensors` or the shards of `model.safetensors.index.json` — the
/// [`MODEL_SIDECARS`] and the `.py` files named by `config.json`'s `auto_map`), as the
/// cache's snapshot folder.
///
/// # Errors
/// [`DataError::Hub`] for `config.json` or a weights file that cannot be had.
pub fn model_dir(r: &HubRef) -> Result<PathBuf> {
    let config = fetch(r, RepoType::Model, "config.json")?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| r.err("config.json has no folder".into()))?;
    match fetch_optional(r, "model.safetensors.index.json") {
        Some(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| r.err(e.to_string()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| r.err(format!("model.safetensors.index.json: {e}")))?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                fetch(r, RepoType::Model, s)?;
            }
        }
        None => {
            fetch(r, RepoType::Model, "model.safetensors")?;
        }
    }
    for f in MODEL_SIDECARS {
        let _ = fetch_optional(r, f);
    }
    if let Ok(text) = std::fs::read_to_string(&config)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        && let Some(map) = v["auto_map"].as_object()
    {
        for target in map.values().filter_map(|t| t.as_str()) {
            // "modeling_llada.LLaDAModelLM" → modeling_llada.py
            if let Some((module, _)) = target.rsplit_once('.') {
                let _ = fetch_optional(r, &format!("{module}.py"));
            }
        }
    }
    Ok(dir)
}

/// A local path, or the cache folder of the Hub model `path` names (`owner/name[@rev]`)
/// when no such local path exists. Local paths always win, so a folder called
/// `GSAI-ML/LLaDA-8B-Instruct` under the working directory is used as is.
///
/// # Errors
/// As [`model_dir`] when `path` is resolved through the Hub.
pub fn local_or_model(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match path.to_str().and_then(HubRef::parse) {
        Some(r) => model_dir(&r).map_err(|e| not_local(path, e)),
        None => Ok(path.to_path_buf()),
    }
}

/// A Hub error for a path that does not exist locally either: say both.
fn not_local(path: &Path, e: DataError) -> DataError {
    match e {
        DataError::Hub {
            repo,
            revision,
            message,
        } => DataError::Hub {
            repo,
            revision,
            message: format!(
                "no local path {} exists, and as a Hub id: {message}",
                path.display()
            ),
        },
        e => e,
    }
}

/// The folder holding `config.json` of `path`: the local folder, or — for a Hub model id
/// with no such local folder — the cache snapshot with only `config.json` fetched (the
/// planner reads nothing else).
///
/// # Errors
/// As [`fetch`] when `path` is resolved through the Hub.
pub fn local_or_model_config(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match path.to_str().and_then(HubRef::parse) {
        Some(r) => {
            let config =
                fetch(&r, RepoType::Model, "config.json").map_err(|e| not_local(path, e))?;
            Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
        }
        None => Ok(path.to_path_buf()),
    }
}

/// A tokenizer: a local `tokenizer.json` or folder holding one; else a Hub model id (its
/// `tokenizer.json`, with `tokenizer_config.json` beside it when the repo has one) or
/// `owner/name[@rev]:path/to/tokenizer.json`.
///
/// # Errors
/// As [`fetch`] when `path` is resolved through the Hub.
pub fn local_or_tokenizer(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if let Some(r) = path.to_str().and_then(HubRef::parse) {
        let file = fetch(&r, RepoType::Model, "tokenizer.json").map_err(|e| not_local(path, e))?;
        let _ = fetch_optional(&r, "tokenizer_config.json");
        return Ok(file);
    }
    local_or_file(path, RepoType::Model)
}

/// A local file, or a file of a Hub repo written `owner/name[@rev]:path/in/repo`
/// (`kind` says model or dataset repo) when no such local file exists.
///
/// # Errors
/// As [`fetch`] when `path` is resolved through the Hub.
pub fn local_or_file(path: &Path, kind: RepoType) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some((repo, file)) = path.to_str().and_then(|s| s.split_once(':')) else {
        return Ok(path.to_path_buf());
    };
    match HubRef::parse(repo) {
        Some(r) if !file.is_empty() => fetch(&r, kind, file).map_err(|e| not_local(path, e)),
        _ => Ok(path.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        let r = HubRef::parse("GSAI-ML/LLaDA-8B-Instruct").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str()),
            ("GSAI-ML/LLaDA-8B-Instruct", "main")
        );
        let r = HubRef::parse("Gen-Verse/MMaDA-8B-MixCoT@v1.0").unwrap();
        assert_eq!(r.revision, "v1.0");
        for path in [
            "/abs/path",
            "./rel/x",
            "../x/y",
            "runs/quickstart/checkpoints",
            "runs/tokenizer.json",
            "data/gsm8k.jsonl",
            "ck",
            "a/b@",
            "~/x",
            "a//b",
        ] {
            assert!(HubRef::parse(path).is_none(), "{path}");
        }
    }

    #[test]
    fn local_paths_win_and_non_ids_pass_through() {
        let tmp = std::env::temp_dir();
        assert_eq!(local_or_model(&tmp).unwrap(), tmp);
        let p = Path::new("no/such/dir/here");
        assert_eq!(local_or_model(p).unwrap(), p);
        let f = Path::new("missing.jsonl");
        assert_eq!(local_or_file(f, RepoType::Dataset).unwrap(), f);
    }
}
