//! The text tokenizer: a Hugging Face `tokenizer.json` through the `tokenizers` crate, from
//! a local folder or a Hub model repo, with the resolved [`TokenLayout`].
//!
//! LLaDA's tokenizer adds nothing automatically (`add_bos_token: false`, spec §2.1), so
//! [`TextTokenizer::encode`] never adds special tokens; the layouts prepend BOS themselves.

use std::path::{Path, PathBuf};

use mmada_model::tokens::{SpecialTokenNames, TASK_TOKENS, TokenLayout};
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DataError, Result};

/// A tokenizer together with its token layout.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    names: SpecialTokenNames,
    layout: TokenLayout,
    codebook_size: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("layout", &self.layout)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; `tokenizer_config.json` next to it (if any) names BOS / EOS
    /// / pad. The layout must resolve (see [`TextTokenizer::add_mmada_special_tokens`] for
    /// tokenizers without the MMaDA tokens, which [`TextTokenizer::from_file_with_mmada_tokens`]
    /// does in one step).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut t = Self::load_unresolved(path)?;
        t.layout = t.resolve()?;
        Ok(t)
    }

    /// Loads `tokenizer.json` and adds the MMaDA special tokens it lacks (GPT-2, Llama-2…).
    pub fn from_file_with_mmada_tokens(path: &Path) -> Result<Self> {
        let mut t = Self::load_unresolved(path)?;
        t.add_mmada_special_tokens()?;
        Ok(t)
    }

    /// Loads `dir/tokenizer.json` (+ `tokenizer_config.json`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// `tokenizer.json` (+ `tokenizer_config.json` when the repo has one) of a Hub model
    /// repo: from the local HF cache when present, downloaded otherwise.
    pub fn from_hub(repo: &str, revision: &str) -> Result<Self> {
        let hub_err = |message: String| DataError::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
            message,
        };
        let r = hf_hub::Repo::with_revision(repo.into(), hf_hub::RepoType::Model, revision.into());
        let cache = hf_hub::Cache::from_env().repo(r.clone());
        let path: PathBuf = match cache.get("tokenizer.json") {
            Some(p) => {
                let _ = cache.get("tokenizer_config.json");
                p
            }
            None => {
                let api = hf_hub::api::sync::ApiBuilder::from_env()
                    .with_progress(false)
                    .build()
                    .map_err(|e| hub_err(e.to_string()))?
                    .repo(r);
                let p = api
                    .get("tokenizer.json")
                    .map_err(|e| hub_err(format!("tokenizer.json: {e}")))?;
                let _ = api.get("tokenizer_config.json");
                p
            }
        };
        Self::from_file(&path)
    }

    fn load_unresolved(path: &Path) -> Result<Self> {
        // the tokenizers crate (0.23) panics instead of erroring on some malformed sections
        // (a `decoder` that is not an object, found by the property test below): a bad file
        // must be an error naming it, not a crash
        let parsed = crate::error::catch_panic(
            || Tokenizer::from_file(path),
            "a panic in the tokenizers crate",
        )
        .map_err(|why| {
            tok_err(format!(
                "{}: not a tokenizer.json the tokenizers crate can read ({why})",
                path.display()
            ))
        })?;
        let inner = parsed.map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let mut names = SpecialTokenNames::default();
        let mut codebook_size = 8192;
        if let Some(dir) = path.parent() {
            let cfg = dir.join("tokenizer_config.json");
            if let Ok(text) = std::fs::read_to_string(&cfg) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| tok_err(format!("{}: {e}", cfg.display())))?;
                let name = |k: &str| match v.get(k) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Object(o)) => o
                        .get("content")
                        .and_then(|c| c.as_str())
                        .map(str::to_string),
                    _ => None,
                };
                if let Some(b) = name("bos_token") {
                    names.bos = b;
                }
                if let Some(e) = name("eos_token") {
                    names.eos = e;
                }
                names.pad = name("pad_token");
            }
            if let Ok(text) = std::fs::read_to_string(dir.join("config.json"))
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(c) = v.get("codebook_size").and_then(|c| c.as_u64())
            {
                codebook_size = u32::try_from(c).unwrap_or(8192);
            }
        }
        Ok(Self {
            inner,
            names,
            layout: TokenLayout::llada(),
            codebook_size,
        })
    }

    fn resolve(&self) -> Result<TokenLayout> {
        let lookup = |s: &str| self.inner.token_to_id(s);
        let vocab = u32::try_from(self.inner.get_vocab_size(true)).map_err(tok_err)?;
        Ok(TokenLayout::resolve(
            &lookup,
            vocab,
            &self.names,
            self.codebook_size,
        )?)
    }

    /// Adds, as special tokens, every MMaDA token the vocabulary lacks: BOS / EOS by their
    /// configured names, `<|mdm_mask|>`, the chat header tokens, `<|eot_id|>` and the task
    /// tokens (`<|soi|>` … `<|r2i|>`, [`TASK_TOKENS`]); then re-resolves the layout.
    /// Returns how many tokens were added.
    pub fn add_mmada_special_tokens(&mut self) -> Result<usize> {
        let mut wanted: Vec<String> = vec![
            self.names.bos.clone(),
            self.names.eos.clone(),
            self.names.mask.clone(),
            self.names.start_header.clone(),
            self.names.end_header.clone(),
            self.names.eot.clone(),
        ];
        for (name, reserved, _) in TASK_TOKENS {
            if self
                .inner
                .token_to_id(&format!("<|reserved_token_{reserved}|>"))
                .is_none()
            {
                wanted.push(name.to_string());
            }
        }
        let missing: Vec<AddedToken> = wanted
            .iter()
            .filter(|t| self.inner.token_to_id(t).is_none())
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        let n = self.inner.add_special_tokens(missing).map_err(tok_err)?;
        self.layout = self.resolve()?;
        Ok(n)
    }

    /// The resolved token layout.
    pub fn layout(&self) -> &TokenLayout {
        &self.layout
    }

    /// Overrides the layout (e.g. a checkpoint's config that moves the image offset).
    pub fn set_layout(&mut self, layout: TokenLayout) {
        self.layout = layout;
    }

    /// `len(tokenizer)`: vocabulary size including added tokens.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token ids of `text`; no special tokens are added (special-token *text* such as
    /// `<|eot_id|>` in the string is matched as the special token).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(tok_err)
    }

    /// Text of `ids` (special tokens kept, so they are visible).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Token text of one id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod props {
    //! `tokenizer.json` (and `tokenizer_config.json`) as files come: a valid WordLevel
    //! tokenizer with values replaced or bytes flipped / cut, and arbitrary text, loads or
    //! gives an error naming the file; never a panic (`PROPTEST_CASES=10000` for the long run).
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":3,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":null,"pre_tokenizer":{"type":"Split","pattern":{"Regex":"."},"behavior":"Isolated","invert":false},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"a":0,"b":1,"c":2,"<|endoftext|>":3},"unk_token":"a"}}"#;

    fn value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-zA-Z<|>]{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::json!([])),
            Just(serde_json::json!({})),
            Just(serde_json::json!({"type": "BPE"})),
        ]
    }

    /// The property's starting point is a tokenizer that loads.
    #[test]
    fn the_valid_tokenizer_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("tokenizer.json");
        std::fs::write(&p, VALID).unwrap();
        let t = TextTokenizer::from_file_with_mmada_tokens(&p).unwrap();
        assert_eq!(t.encode("ab").unwrap(), [0, 1]);
    }

    proptest! {
        #[test]
        fn any_tokenizer_json_loads_or_names_the_file(
            replace in proptest::collection::vec(
                (proptest::sample::select(vec!["version", "added_tokens", "pre_tokenizer", "model", "normalizer", "decoder", "post_processor"]), value()),
                0..3,
            ),
            model_key in proptest::option::of((proptest::sample::select(vec!["type", "vocab", "unk_token"]), value())),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            raw in proptest::option::of(any::<String>()),
            config in proptest::option::of((value(), value())),
        ) {
            let mut v: serde_json::Value = serde_json::from_str(VALID).unwrap();
            for (k, x) in &replace {
                v[*k] = x.clone();
            }
            if let Some((k, x)) = &model_key
                && let Some(m) = v["model"].as_object_mut()
            {
                m.insert((*k).to_string(), x.clone());
            }
            let mut bytes = match &raw {
                Some(r) => r.clone().into_bytes(),
                None => v.to_string().into_bytes(),
            };
            if !bytes.is_empty() {
                for (i, b) in &flips {
                    let i = i.index(bytes.len());
                    bytes[i] ^= b;
                }
            }
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("tokenizer.json");
            std::fs::write(&p, &bytes).unwrap();
            if let Some((bos, eos)) = &config {
                let c = serde_json::json!({"bos_token": bos, "eos_token": eos});
                std::fs::write(tmp.path().join("tokenizer_config.json"), c.to_string()).unwrap();
            }
            for with_mmada in [false, true] {
                let r = std::panic::catch_unwind(|| {
                    if with_mmada {
                        TextTokenizer::from_file_with_mmada_tokens(&p).map(|_| ())
                    } else {
                        TextTokenizer::from_file(&p).map(|_| ())
                    }
                });
                prop_assert!(r.is_ok(), "loading panicked (mmada tokens: {})", with_mmada);
                let r = r.unwrap();
                let untouched = replace.is_empty() && model_key.is_none() && flips.is_empty()
                    && raw.is_none() && config.is_none();
                if untouched && with_mmada {
                    prop_assert!(r.is_ok(), "the valid tokenizer did not load: {:?}", r);
                }
                if let Err(e) = r {
                    let msg = e.to_string();
                    prop_assert!(
                        msg.contains("tokenizer.json") || msg.contains("tokenizer_config.json") || msg.contains("token"),
                        "{}",
                        msg
                    );
                }
            }
        }
    }
}
