//! The MMaDA / LLaDA token layout: every special id in one typed struct.
//!
//! This is the only place where token ids live (architecture doc, "Key types"). The values
//! of [`TokenLayout::llada`] are those of spec §2.1 (LLaDA-8B-Instruct `tokenizer_config.json`
//! `added_tokens_decoder`) and §2.2 (MMaDA `training/prompting_utils.py`
//! `UniversalPrompting(use_reserved_token=True)`); the image-code offset is `len(tokenizer)`
//! (spec §2.3: MMaDA `app.py` `get_code(image) + 126349`).
//!
//! A layout is normally *resolved* from a checkpoint's tokenizer files
//! ([`TokenLayout::from_hf_json`], [`TokenLayout::from_dir`]) or from any token → id lookup
//! ([`TokenLayout::resolve`]), so other tokenizers (GPT-2, Llama-2 with the MMaDA special
//! tokens added) and the tiny test vocabulary ([`TokenLayout::from_tiny_vocab_json`]) work
//! the same way.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

/// Error resolving a [`TokenLayout`].
#[derive(Debug, thiserror::Error)]
pub enum TokenLayoutError {
    /// A tokenizer or config file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid JSON or lacks an expected structure.
    #[error("{source_name}: {message}")]
    Json {
        /// File name or description.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// A special token is not in the vocabulary (neither by name nor through the MMaDA
    /// reserved-token mapping).
    #[error(
        "special token `{token}` ({role}) is not in the tokenizer vocabulary; add it as an added special token \
         (e.g. `TextTokenizer::add_mmada_special_tokens`) or set the id explicitly"
    )]
    MissingToken {
        /// The token text, e.g. `<|soi|>`.
        token: String,
        /// What the token is used for, e.g. "start of image".
        role: &'static str,
    },
}

/// Names of the special tokens looked up when resolving a [`TokenLayout`].
///
/// Defaults are the LLaDA / MMaDA names (spec §2.1, §2.2). `bos`, `eos` and `pad` are usually
/// overridden from `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokenNames {
    /// Beginning of sequence (`<|startoftext|>`).
    pub bos: String,
    /// End of sequence (`<|endoftext|>`).
    pub eos: String,
    /// Padding; `None` = same as `eos` (LLaDA pads with EOS).
    pub pad: Option<String>,
    /// Diffusion mask (`<|mdm_mask|>`).
    pub mask: String,
    /// Chat header start (`<|start_header_id|>`).
    pub start_header: String,
    /// Chat header end (`<|end_header_id|>`).
    pub end_header: String,
    /// End of turn (`<|eot_id|>`).
    pub eot: String,
}

impl Default for SpecialTokenNames {
    fn default() -> Self {
        Self {
            bos: "<|startoftext|>".into(),
            eos: "<|endoftext|>".into(),
            pad: None,
            mask: "<|mdm_mask|>".into(),
            start_header: "<|start_header_id|>".into(),
            end_header: "<|end_header_id|>".into(),
            eot: "<|eot_id|>".into(),
        }
    }
}

/// The MMaDA task tokens, with their index in the `<|reserved_token_K|>` range that
/// `UniversalPrompting(use_reserved_token=True)` maps them onto (spec §2.2: `<|soi|>` =
/// reserved 0 = 126084, …, `<|r2i|>` = reserved 10 = 126094).
pub const TASK_TOKENS: [(&str, u32, &str); 6] = [
    ("<|soi|>", 0, "start of image"),
    ("<|eoi|>", 1, "end of image"),
    ("<|t2i|>", 4, "text-to-image task"),
    ("<|mmu|>", 5, "multimodal understanding task"),
    ("[iPAD]", 9, "t2i left padding"),
    ("<|r2i|>", 10, "reasoning-to-image task"),
];

/// Every special id of the MMaDA / LLaDA vocabulary (spec §2.1–§2.3).
///
/// Image code `c ∈ [0, codebook_size)` is the token `image_code_offset + c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLayout {
    /// `<|mdm_mask|>` (126336): the [MASK] of the diffusion process, text and image.
    pub mask_id: u32,
    /// `<|startoftext|>` (126080), also `<|sot|>`.
    pub bos_id: u32,
    /// `<|endoftext|>` (126081), also `<|eot|>`; EOS of text and answer padding.
    pub eos_id: u32,
    /// Padding id (126081 = EOS for LLaDA).
    pub pad_id: u32,
    /// `<|eot_id|>` (126348): end of a chat turn (not EOS).
    pub eot_id: u32,
    /// `<|start_header_id|>` (126346).
    pub start_header_id: u32,
    /// `<|end_header_id|>` (126347); the *last* one ends the prompt (spec §2.4 b).
    pub end_header_id: u32,
    /// `<|soi|>` (126084): start of image.
    pub soi_id: u32,
    /// `<|eoi|>` (126085): end of image.
    pub eoi_id: u32,
    /// `<|t2i|>` (126088): text-to-image task token.
    pub t2i_id: u32,
    /// `<|mmu|>` (126089): multimodal-understanding task token.
    pub mmu_id: u32,
    /// `[iPAD]` (126093): left padding of t2i prompts (spec §2.4 c).
    pub ipad_id: u32,
    /// `<|r2i|>` (126094): reasoning-to-image task token.
    pub r2i_id: u32,
    /// `len(tokenizer)`: number of text ids including added tokens (126349).
    pub text_vocab_size: u32,
    /// Id of image code 0 (`len(tokenizer) + num_new_special_tokens` = 126349).
    pub image_code_offset: u32,
    /// Number of image codes (8192 for MAGVIT-v2 LFQ, 13 bits).
    pub codebook_size: u32,
}

impl Default for TokenLayout {
    fn default() -> Self {
        Self::llada()
    }
}

impl TokenLayout {
    /// LLaDA-8B / MMaDA-8B ids (spec §2.1, §2.2; image offset 126349, codebook 8192).
    pub fn llada() -> Self {
        Self {
            mask_id: 126336,
            bos_id: 126080,
            eos_id: 126081,
            pad_id: 126081,
            eot_id: 126348,
            start_header_id: 126346,
            end_header_id: 126347,
            soi_id: 126084,
            eoi_id: 126085,
            t2i_id: 126088,
            mmu_id: 126089,
            ipad_id: 126093,
            r2i_id: 126094,
            text_vocab_size: 126349,
            image_code_offset: 126349,
            codebook_size: 8192,
        }
    }

    /// Same as [`TokenLayout::llada`]: MMaDA reuses LLaDA's tokenizer unchanged.
    pub fn mmada() -> Self {
        Self::llada()
    }

    /// Token id of image code `code` (`image_code_offset + code`); `None` when
    /// `code >= codebook_size`.
    pub fn image_token(&self, code: u32) -> Option<u32> {
        (code < self.codebook_size).then(|| self.image_code_offset + code)
    }

    /// Image code of token `id`, if `id` lies in `[image_code_offset, image_code_offset +
    /// codebook_size)`.
    pub fn image_code(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.image_code_offset)
            .filter(|c| *c < self.codebook_size)
    }

    /// Total id space `image_code_offset + codebook_size` (the smallest valid `vocab_size`).
    pub fn total_vocab(&self) -> u32 {
        self.image_code_offset + self.codebook_size
    }

    /// Resolves the layout from a token → id lookup.
    ///
    /// * `lookup`: the tokenizer's `token_to_id`.
    /// * `text_vocab_size`: `len(tokenizer)` (ids of the text side incl. added tokens); it is
    ///   also the image-code offset.
    /// * Task tokens are looked up by name (`<|soi|>`, …) and, failing that, through the
    ///   MMaDA reserved-token mapping (`<|reserved_token_K|>`, [`TASK_TOKENS`]).
    pub fn resolve(
        lookup: &dyn Fn(&str) -> Option<u32>,
        text_vocab_size: u32,
        names: &SpecialTokenNames,
        codebook_size: u32,
    ) -> Result<Self, TokenLayoutError> {
        let need = |token: &str, role: &'static str| {
            lookup(token).ok_or_else(|| TokenLayoutError::MissingToken {
                token: token.to_string(),
                role,
            })
        };
        let task = |i: usize| {
            let (name, reserved, role) = TASK_TOKENS[i];
            lookup(name)
                .or_else(|| lookup(&format!("<|reserved_token_{reserved}|>")))
                .ok_or_else(|| TokenLayoutError::MissingToken {
                    token: name.to_string(),
                    role,
                })
        };
        let eos_id = need(&names.eos, "end of sequence")?;
        let pad_id = match &names.pad {
            Some(p) => need(p, "padding")?,
            None => eos_id,
        };
        Ok(Self {
            mask_id: need(&names.mask, "diffusion mask")?,
            bos_id: need(&names.bos, "beginning of sequence")?,
            eos_id,
            pad_id,
            eot_id: need(&names.eot, "end of turn")?,
            start_header_id: need(&names.start_header, "chat header start")?,
            end_header_id: need(&names.end_header, "chat header end")?,
            soi_id: task(0)?,
            eoi_id: task(1)?,
            t2i_id: task(2)?,
            mmu_id: task(3)?,
            ipad_id: task(4)?,
            r2i_id: task(5)?,
            text_vocab_size,
            image_code_offset: text_vocab_size,
            codebook_size,
        })
    }

    /// Resolves the layout from the text of Hugging Face tokenizer files.
    ///
    /// * `tokenizer_json`: `tokenizer.json` (its `added_tokens` and `model.vocab`), optional
    ///   (LLaDA's is > 4 MiB and not always at hand).
    /// * `tokenizer_config`: `tokenizer_config.json` (`added_tokens_decoder`, `bos_token`,
    ///   `eos_token`, `pad_token`), optional.
    /// * `config_json`: the model's `config.json` text, optional; its `mask_token_id` and
    ///   `codebook_size` override the tokenizer when present (read as raw keys, so HF-style
    ///   LLaDA configs with `hidden_size` work too). `llm_vocab_size` is *not* the image offset (126464 vs
    ///   `len(tokenizer)` = 126349).
    ///
    /// `text_vocab_size` = 1 + the largest id seen in either file.
    pub fn from_hf_json(
        tokenizer_json: Option<&str>,
        tokenizer_config: Option<&str>,
        config_json: Option<&str>,
    ) -> Result<Self, TokenLayoutError> {
        let config = config_json
            .map(|t| parse_json(t, "config.json"))
            .transpose()?;
        let cfg_u32 = |key: &str| -> Option<u32> {
            config
                .as_ref()?
                .get(key)?
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
        };
        let mut ids: HashMap<String, u32> = HashMap::new();
        let mut max_id: Option<u32> = None;
        let mut note = |id: u32| max_id = Some(max_id.map_or(id, |m: u32| m.max(id)));
        if let Some(text) = tokenizer_json {
            let v = parse_json(text, "tokenizer.json")?;
            if let Some(vocab) = v.pointer("/model/vocab") {
                // BPE / WordLevel: {token: id}; Unigram: [[token, score], ...] (index = id).
                if let Some(map) = vocab.as_object() {
                    for (tok, id) in map {
                        if let Some(id) = id.as_u64().and_then(|i| u32::try_from(i).ok()) {
                            note(id);
                            ids.entry(tok.clone()).or_insert(id);
                        }
                    }
                } else if let Some(list) = vocab.as_array() {
                    for (i, entry) in list.iter().enumerate() {
                        let id = u32::try_from(i).unwrap_or(u32::MAX);
                        note(id);
                        if let Some(tok) = entry.get(0).and_then(Value::as_str) {
                            ids.entry(tok.to_string()).or_insert(id);
                        }
                    }
                }
            }
            if let Some(list) = v.get("added_tokens").and_then(Value::as_array) {
                for t in list {
                    let id = t.get("id").and_then(Value::as_u64);
                    let content = t.get("content").and_then(Value::as_str);
                    if let (Some(id), Some(content)) = (id, content) {
                        let id = u32::try_from(id).map_err(|_| TokenLayoutError::Json {
                            source_name: "tokenizer.json".into(),
                            message: format!("added token `{content}` has id {id} > u32"),
                        })?;
                        note(id);
                        ids.insert(content.to_string(), id);
                    }
                }
            }
        }
        let mut names = SpecialTokenNames::default();
        if let Some(text) = tokenizer_config {
            let v = parse_json(text, "tokenizer_config.json")?;
            if let Some(map) = v.get("added_tokens_decoder").and_then(Value::as_object) {
                for (id, t) in map {
                    let Ok(id) = id.parse::<u32>() else {
                        return Err(TokenLayoutError::Json {
                            source_name: "tokenizer_config.json".into(),
                            message: format!("added_tokens_decoder key `{id}` is not an id"),
                        });
                    };
                    if let Some(content) = t.get("content").and_then(Value::as_str) {
                        note(id);
                        ids.insert(content.to_string(), id);
                    }
                }
            }
            let token_name = |key: &str| -> Option<String> {
                match v.get(key)? {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                    _ => None,
                }
            };
            if let Some(b) = token_name("bos_token") {
                names.bos = b;
            }
            if let Some(e) = token_name("eos_token") {
                names.eos = e;
            }
            names.pad = token_name("pad_token");
        }
        let text_vocab_size = max_id.map_or(0, |m| m + 1);
        let lookup = |s: &str| ids.get(s).copied();
        let codebook = cfg_u32("codebook_size").unwrap_or(8192);
        let mut layout = Self::resolve(&lookup, text_vocab_size, &names, codebook)?;
        if let Some(m) = cfg_u32("mask_token_id") {
            layout.mask_id = m;
        }
        Ok(layout)
    }

    /// Reads `tokenizer.json`, `tokenizer_config.json` and `config.json` from a checkpoint
    /// directory (each optional, at least one tokenizer file required) and resolves the
    /// layout with [`TokenLayout::from_hf_json`].
    pub fn from_dir(dir: &Path) -> Result<Self, TokenLayoutError> {
        let read = |name: &str| -> Result<Option<String>, TokenLayoutError> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&p)
                .map(Some)
                .map_err(|source| TokenLayoutError::Io {
                    path: p.display().to_string(),
                    source,
                })
        };
        let tj = read("tokenizer.json")?;
        let tc = read("tokenizer_config.json")?;
        if tj.is_none() && tc.is_none() {
            return Err(TokenLayoutError::Io {
                path: dir.join("tokenizer.json").display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither tokenizer.json nor tokenizer_config.json exists",
                ),
            });
        }
        let cfg = read("config.json")?;
        Self::from_hf_json(tj.as_deref(), tc.as_deref(), cfg.as_deref())
    }

    /// Layout of the tiny parity vocabulary (`shared/fixtures/tiny_vocab.json`: keys
    /// `mask_id`, `bos_id`, `eos_id`, `pad_id`, `eot_id`, `soi_id`, `eoi_id`, `t2i_id`,
    /// `mmu_id`, `text_vocab_size`, `image_token_offset`, `codebook_size`).
    ///
    /// The file has no header, `[iPAD]` or `<|r2i|>` ids; they follow the same shift as the
    /// listed ones (LLaDA id − 125800 for the reserved range: `[iPAD]` 293, `<|r2i|>` 294;
    /// headers directly below `eot`: 303, 304) unless the file names them
    /// (`start_header_id`, `end_header_id`, `ipad_id`, `r2i_id`).
    pub fn from_tiny_vocab_json(text: &str) -> Result<Self, TokenLayoutError> {
        let v = parse_json(text, "tiny_vocab.json")?;
        let get = |key: &str, default: Option<u32>| -> Result<u32, TokenLayoutError> {
            match v.get(key) {
                Some(x) => x
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| TokenLayoutError::Json {
                        source_name: "tiny_vocab.json".into(),
                        message: format!("`{key}` must be a non-negative integer, found {x}"),
                    }),
                None => default.ok_or_else(|| TokenLayoutError::Json {
                    source_name: "tiny_vocab.json".into(),
                    message: format!("required key `{key}` is missing"),
                }),
            }
        };
        let eot_id = get("eot_id", None)?;
        let text_vocab_size = get("text_vocab_size", None)?;
        Ok(Self {
            mask_id: get("mask_id", None)?,
            bos_id: get("bos_id", None)?,
            eos_id: get("eos_id", None)?,
            pad_id: get("pad_id", None)?,
            eot_id,
            start_header_id: get("start_header_id", Some(eot_id.saturating_sub(2)))?,
            end_header_id: get("end_header_id", Some(eot_id.saturating_sub(1)))?,
            soi_id: get("soi_id", None)?,
            eoi_id: get("eoi_id", None)?,
            t2i_id: get("t2i_id", None)?,
            mmu_id: get("mmu_id", None)?,
            ipad_id: get("ipad_id", Some(293))?,
            r2i_id: get("r2i_id", Some(294))?,
            text_vocab_size,
            image_code_offset: get("image_token_offset", Some(text_vocab_size))?,
            codebook_size: get("codebook_size", None)?,
        })
    }

    /// All named special ids with their token text, for rendering and checks.
    pub fn named_ids(&self) -> [(&'static str, u32); 13] {
        [
            ("<|mdm_mask|>", self.mask_id),
            ("<|startoftext|>", self.bos_id),
            ("<|endoftext|>", self.eos_id),
            ("<pad>", self.pad_id),
            ("<|eot_id|>", self.eot_id),
            ("<|start_header_id|>", self.start_header_id),
            ("<|end_header_id|>", self.end_header_id),
            ("<|soi|>", self.soi_id),
            ("<|eoi|>", self.eoi_id),
            ("<|t2i|>", self.t2i_id),
            ("<|mmu|>", self.mmu_id),
            ("[iPAD]", self.ipad_id),
            ("<|r2i|>", self.r2i_id),
        ]
    }
}

fn parse_json(text: &str, source_name: &str) -> Result<Value, TokenLayoutError> {
    serde_json::from_str(text).map_err(|e| TokenLayoutError::Json {
        source_name: source_name.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llada_defaults_match_spec() {
        let t = TokenLayout::llada();
        assert_eq!(t.mask_id, 126336);
        assert_eq!(t.image_token(0), Some(126349));
        assert_eq!(t.image_token(8191), Some(126349 + 8191));
        assert_eq!(t.image_token(8192), None);
        assert_eq!(t.image_code(126349 + 5), Some(5));
        assert_eq!(t.image_code(126348), None);
        assert_eq!(t.total_vocab(), 134541);
    }

    #[test]
    fn resolves_llada_from_tokenizer_config_and_reserved_tokens() {
        // LLaDA's added_tokens_decoder names the task slots `<|reserved_token_K|>`.
        let mut dec = serde_json::Map::new();
        let mut add = |id: u32, s: &str| {
            dec.insert(id.to_string(), serde_json::json!({ "content": s }));
        };
        add(126080, "<|startoftext|>");
        add(126081, "<|endoftext|>");
        for k in 0..252u32 {
            add(126084 + k, &format!("<|reserved_token_{k}|>"));
        }
        add(126336, "<|mdm_mask|>");
        add(126346, "<|start_header_id|>");
        add(126347, "<|end_header_id|>");
        add(126348, "<|eot_id|>");
        let cfg = serde_json::json!({
            "added_tokens_decoder": dec,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        });
        let t = TokenLayout::from_hf_json(None, Some(&cfg.to_string()), None).unwrap();
        assert_eq!(t, TokenLayout::llada());
    }

    #[test]
    fn missing_token_is_an_error() {
        let lookup = |_: &str| None;
        let err = TokenLayout::resolve(&lookup, 10, &SpecialTokenNames::default(), 64);
        assert!(matches!(err, Err(TokenLayoutError::MissingToken { .. })));
    }
}
