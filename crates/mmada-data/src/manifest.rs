//! Dataset manifests: one YAML file per dataset (format documented in
//! `data_manifests/README.md`). Unknown keys are rejected.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::example::Task;

/// A dataset manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Dataset name (used in every error message).
    pub name: String,
    /// Training task, deciding the layout.
    pub task: Task,
    /// Where the files are.
    pub source: Source,
    /// File format.
    pub format: Format,
    /// Field mapping onto [`crate::Example`].
    pub fields: FieldMap,
    /// Licence of the data (SPDX id or a short description).
    pub license: String,
    /// Split name (`train`, `test`, …).
    pub split: String,
    /// Folder that relative image paths are resolved against (relative to the data root,
    /// like the source path). Default: the folder of the data file.
    #[serde(default)]
    pub image_root: Option<String>,
    /// How image paths are checked while reading.
    #[serde(default)]
    pub image_check: ImageCheck,
    /// Bad records: `fail` (default) stops with an error naming manifest, file, line and
    /// field; `skip` skips and counts them.
    #[serde(default)]
    pub on_error: OnError,
    /// Free-form notes (provenance, caveats).
    #[serde(default)]
    pub notes: Option<String>,
}

/// Where a dataset's files are: exactly one of `path` (local) or `hf_repo` (+ `files`).
///
/// ```yaml
/// source: { path: "longcot/*.jsonl" }            # local path or glob, relative to the data root
/// source: { hf_repo: openai/gsm8k, revision: main, files: [main/test-00000-of-00001.parquet] }
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Local path or glob, relative to the data root passed at load time (or absolute).
    #[serde(default)]
    pub path: Option<String>,
    /// Hugging Face dataset repo id (`openai/gsm8k`), resolved through `hf-hub` (local HF
    /// cache first, download when online).
    #[serde(default)]
    pub hf_repo: Option<String>,
    /// Revision (branch, tag or commit) of `hf_repo`; default `main`.
    #[serde(default)]
    pub revision: Option<String>,
    /// Files inside `hf_repo` (exact repo paths).
    #[serde(default)]
    pub files: Vec<String>,
}

fn default_revision() -> String {
    "main".into()
}

/// File format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// One JSON array of objects.
    Json,
    /// Apache Parquet.
    Parquet,
    /// Arrow IPC file (`.arrow`, HF `datasets` cache files) or stream.
    Arrow,
}

impl Format {
    /// The format of a file name or glob by its extension: `.jsonl`, `.json`, `.parquet`,
    /// `.arrow` (`None` otherwise).
    pub fn from_extension(path: &str) -> Option<Self> {
        let ext = Path::new(path).extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            "parquet" => Some(Format::Parquet),
            "arrow" => Some(Format::Arrow),
            _ => None,
        }
    }
}

/// Error policy for bad records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop at the first bad record with a typed error.
    #[default]
    Fail,
    /// Skip bad records (and empty files) and count them in [`crate::ReadStats`].
    Skip,
}

/// How image paths are verified while reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageCheck {
    /// Do not touch the file system.
    None,
    /// The file must exist (default).
    #[default]
    Exists,
    /// The image header must decode (format and dimensions).
    Header,
}

/// Mapping of canonical fields onto record paths. A path is a dotted key path with
/// numeric indices for arrays: `question`, `code.0`, `image.bytes`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMap {
    /// Raw or chat-formatted text.
    #[serde(default)]
    pub text: Option<String>,
    /// Question / problem.
    #[serde(default)]
    pub question: Option<String>,
    /// Reasoning (chain of thought).
    #[serde(default)]
    pub reasoning: Option<String>,
    /// Answer / response.
    #[serde(default)]
    pub answer: Option<String>,
    /// When set, the answer field is split at the last occurrence of this marker: the part
    /// before becomes `reasoning`, the part after (trimmed) the `answer` (GSM8K: `"####"`).
    #[serde(default)]
    pub answer_marker: Option<String>,
    /// List of turns in LLaVA (`from`/`value`) or ShareGPT (`role`/`content`) form.
    #[serde(default)]
    pub conversations: Option<String>,
    /// Caption (t2i).
    #[serde(default)]
    pub caption: Option<String>,
    /// Image path (string; a list takes its first element).
    #[serde(default)]
    pub image: Option<String>,
    /// Encoded image bytes (binary column or HF `Image` struct `image.bytes`).
    #[serde(default)]
    pub image_bytes: Option<String>,
    /// Pre-tokenized image codes (list of integers).
    #[serde(default)]
    pub image_codes: Option<String>,
    /// Record id.
    #[serde(default)]
    pub id: Option<String>,
    /// Fields that must be present (canonical names). Default: the ones the task needs
    /// (`lm`: text; `chat`/`cot`: question+answer or conversations or text; `mmu`: an image
    /// field; `t2i`: caption and an image field).
    #[serde(default)]
    pub required: Option<Vec<String>>,
}

impl Manifest {
    /// Parses a manifest from YAML text; `path` names it in errors.
    pub fn from_yaml(text: &str, path: &str) -> Result<Self> {
        let m: Manifest = serde_norway::from_str(text).map_err(|e| DataError::Manifest {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        m.validate(path)?;
        Ok(m)
    }

    /// Reads and validates a manifest file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            context: "manifest".into(),
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Replaces the source by a local path or glob (a local copy of an `hf_repo` dataset,
    /// `data inspect --source PATH`). When the path ends in a known extension
    /// ([`Format::from_extension`]) the format follows it, so a jsonl copy of a parquet
    /// dataset (e.g. `math/gsm8k_test.jsonl` for `gsm8k.yaml`) reads as jsonl.
    pub fn with_source_path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        if let Some(f) = Format::from_extension(&path) {
            self.format = f;
        }
        self.source = Source {
            path: Some(path),
            ..Source::default()
        };
        self
    }

    /// Checks the combinations serde cannot express.
    pub fn validate(&self, path: &str) -> Result<()> {
        let bad = |message: String| {
            Err(DataError::Manifest {
                path: path.to_string(),
                message,
            })
        };
        if self.name.trim().is_empty() {
            return bad("`name` must not be empty".into());
        }
        let f = &self.fields;
        let has_image = f.image.is_some() || f.image_bytes.is_some() || f.image_codes.is_some();
        match self.task {
            Task::Lm if f.text.is_none() => {
                return bad("task `lm` needs `fields.text`".into());
            }
            Task::Chat | Task::Cot
                if f.text.is_none()
                    && f.conversations.is_none()
                    && (f.question.is_none() || f.answer.is_none()) =>
            {
                return bad(format!(
                    "task `{}` needs `fields.question` + `fields.answer`, or `fields.conversations`, or `fields.text`",
                    self.task.as_str()
                ));
            }
            Task::Mmu if !has_image => {
                return bad(
                    "task `mmu` needs one of `fields.image`, `fields.image_bytes`, `fields.image_codes`".into(),
                );
            }
            Task::T2i if !has_image || f.caption.is_none() => {
                return bad("task `t2i` needs `fields.caption` and an image field".into());
            }
            _ => {}
        }
        if let Some(req) = &f.required {
            for r in req {
                if !CANONICAL_FIELDS.contains(&r.as_str()) {
                    return bad(format!(
                        "`fields.required` names unknown field `{r}`; expected one of {CANONICAL_FIELDS:?}"
                    ));
                }
            }
        }
        match (&self.source.path, &self.source.hf_repo) {
            (Some(_), None) => {
                if self.source.revision.is_some() || !self.source.files.is_empty() {
                    return bad(
                        "`source.revision` / `source.files` only go with `source.hf_repo`".into(),
                    );
                }
            }
            (None, Some(_)) => {
                if self.source.files.is_empty() {
                    return bad(
                        "`source.files` must list at least one file of `source.hf_repo`".into(),
                    );
                }
            }
            _ => return bad("`source` needs exactly one of `path` or `hf_repo`".into()),
        }
        Ok(())
    }

    /// The local files of this dataset, sorted, for a `local` source resolved against
    /// `root` (the data root; `None` = current directory). For `hf` sources see
    /// [`Manifest::resolve_files_hub`].
    pub fn resolve_files(&self, root: Option<&Path>) -> Result<Vec<PathBuf>> {
        match &self.source.path {
            Some(path) => {
                let full = match root {
                    Some(r) if !Path::new(path).is_absolute() => r.join(path),
                    _ => PathBuf::from(path),
                };
                let pattern = full.to_string_lossy().to_string();
                let mut files: Vec<PathBuf> = glob::glob(&pattern)
                    .map_err(|e| DataError::Manifest {
                        path: self.name.clone(),
                        message: format!("bad glob `{pattern}`: {e}"),
                    })?
                    .filter_map(|p| p.ok())
                    .filter(|p| p.is_file())
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(DataError::NoFiles {
                        manifest: self.name.clone(),
                        pattern,
                    });
                }
                Ok(files)
            }
            None => self.resolve_files_hub(),
        }
    }

    /// Files of an `hf` source: each is taken from the local Hugging Face cache
    /// (`HF_HOME` / `~/.cache/huggingface/hub`) when present, otherwise downloaded through
    /// `hf-hub` (needs network).
    pub fn resolve_files_hub(&self) -> Result<Vec<PathBuf>> {
        let Some(repo) = &self.source.hf_repo else {
            return Err(DataError::Manifest {
                path: self.name.clone(),
                message: "not an `hf_repo` source".into(),
            });
        };
        let revision = self
            .source
            .revision
            .clone()
            .unwrap_or_else(default_revision);
        let files = &self.source.files;
        let hub_err = |message: String| DataError::Hub {
            repo: repo.clone(),
            revision: revision.clone(),
            message,
        };
        let hf_repo =
            hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Dataset, revision.clone());
        let cache = hf_hub::Cache::from_env().repo(hf_repo.clone());
        let mut out = Vec::with_capacity(files.len());
        let mut api = None;
        for f in files {
            if let Some(p) = cache.get(f) {
                out.push(p);
                continue;
            }
            if api.is_none() {
                let a = hf_hub::api::sync::ApiBuilder::from_env()
                    .with_progress(false)
                    .build()
                    .map_err(|e| hub_err(e.to_string()))?;
                api = Some(a.repo(hf_repo.clone()));
            }
            if let Some(a) = &api {
                out.push(
                    a.get(f)
                        .map_err(|e| hub_err(format!("file {f}: {e} (offline and not cached?)")))?,
                );
            }
        }
        Ok(out)
    }
}

/// Canonical field names usable in `fields.required`.
pub const CANONICAL_FIELDS: [&str; 10] = [
    "text",
    "question",
    "reasoning",
    "answer",
    "conversations",
    "caption",
    "image",
    "image_bytes",
    "image_codes",
    "id",
];
