//! Model configuration read from (and written to) a Hugging Face `config.json`.
//!
//! The key names are those of upstream `configuration_llada.py::LLaDAConfig` and
//! `modeling_mmada.py::MMadaConfig` (spec §1.1 and §1.5), so a checkpoint directory
//! downloaded from the Hub (`GSAI-ML/LLaDA-8B-Instruct`, `Gen-Verse/MMaDA-8B-*`) is read
//! as is, and the directories we write are read by the PyTorch code.
//!
//! Every key is kept: keys this crate does not interpret are carried in
//! [`ModelConfig::extra`] and written back unchanged by [`ModelConfig::to_hf_json`].

use std::path::Path;

use serde_json::{Map, Value, json};

/// Error reading or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read model config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a JSON object.
    #[error("model config {source_name} is not valid JSON: {message}")]
    Json {
        /// File name or other description of where the text came from.
        source_name: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key that has no default is absent.
    #[error(
        "model config {source_name}: required key `{key}` is missing (add it, e.g. `\"{key}\": {example}`)"
    )]
    MissingKey {
        /// Where the config came from.
        source_name: String,
        /// The missing key.
        key: &'static str,
        /// An example value (the LLaDA-8B one).
        example: &'static str,
    },
    /// A key has a value of the wrong JSON type.
    #[error("model config {source_name}: key `{key}` must be {expected}, found {found}")]
    WrongType {
        /// Where the config came from.
        source_name: String,
        /// The offending key.
        key: String,
        /// What was expected (e.g. "a non-negative integer").
        expected: &'static str,
        /// The value found, as JSON.
        found: String,
    },
    /// A key has a value of the right type that this implementation does not support or
    /// that is inconsistent with other keys.
    #[error("model config {source_name}: key `{key}` = {value}: {why}")]
    Invalid {
        /// Where the config came from.
        source_name: String,
        /// The offending key.
        key: String,
        /// The value, as JSON.
        value: String,
        /// Why it is rejected and how to fix it.
        why: String,
    },
    /// An unknown preset name.
    #[error("unknown model preset `{0}`: expected one of llada_8b, mmada_8b, tiny")]
    UnknownPreset(String),
}

/// Which upstream configuration class a checkpoint declares (`model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// `"llada"`: `LLaDAConfig` / `LLaDAModelLM` (GSAI-ML/LLaDA-8B-*).
    Llada,
    /// `"mmada"`: `MMadaConfig` / `MMadaModelLM` (Gen-Verse/MMaDA-8B-*): LLaDA with a resized vocabulary.
    Mmada,
}

impl ModelType {
    /// The `model_type` string of `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llada => "llada",
            ModelType::Mmada => "mmada",
        }
    }
}

/// Architecture hyper-parameters of a LLaDA / MMaDA model (spec §1.1, §1.5).
///
/// Only the Llama-style block (`block_type = "llama"`), RMSNorm, SwiGLU with `silu`, RoPE,
/// no biases and an untied output head are supported; other values of those keys are
/// rejected with [`ConfigError::Invalid`] when the config is read.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `model_type`.
    pub model_type: ModelType,
    /// `d_model`: hidden size `D`.
    pub d_model: usize,
    /// `n_layers`: number of transformer blocks.
    pub n_layers: usize,
    /// `n_heads`: query heads; head_dim = `d_model / n_heads`.
    pub n_heads: usize,
    /// `n_kv_heads`: key/value heads (grouped-query attention when < `n_heads`). Defaults to `n_heads`.
    pub n_kv_heads: usize,
    /// `mlp_hidden_size`: SwiGLU inner size. Defaults to `mlp_ratio * d_model`.
    pub mlp_hidden_size: usize,
    /// `vocab_size`: size of the tokenizer's id space (text + image codes for MMaDA).
    pub vocab_size: usize,
    /// `embedding_size`: rows of `wte` and of the output head (`V`); defaults to `vocab_size`.
    pub embedding_size: usize,
    /// `max_sequence_length`: context length the model was trained for (informational; RoPE is
    /// computed for any length).
    pub max_sequence_length: usize,
    /// `rope_theta`: RoPE base.
    pub rope_theta: f64,
    /// `rms_norm_eps`: RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// `mask_token_id`: the `<|mdm_mask|>` id (126336 for LLaDA).
    pub mask_token_id: Option<u32>,
    /// `eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// `llm_vocab_size` (MMaDA): size of the text vocabulary before the image codes.
    pub llm_vocab_size: Option<usize>,
    /// `codebook_size` (MMaDA): number of image codes.
    pub codebook_size: Option<usize>,
    /// `num_vq_tokens` (MMaDA): image tokens per image.
    pub num_vq_tokens: Option<usize>,
    /// Every other key of the file, written back unchanged.
    pub extra: Map<String, Value>,
}

/// Keys interpreted by [`ModelConfig`] (everything else goes to `extra`).
const KNOWN_KEYS: &[&str] = &[
    "model_type",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "mlp_hidden_size",
    "mlp_ratio",
    "vocab_size",
    "embedding_size",
    "max_sequence_length",
    "rope_theta",
    "rms_norm_eps",
    "mask_token_id",
    "eos_token_id",
    "pad_token_id",
    "llm_vocab_size",
    "codebook_size",
    "num_vq_tokens",
];

struct Reader<'a> {
    map: &'a Map<String, Value>,
    source: &'a str,
}

impl Reader<'_> {
    fn wrong(&self, key: &str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::WrongType {
            source_name: self.source.to_string(),
            key: key.to_string(),
            expected,
            found: v.to_string(),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    fn req_usize(&self, key: &'static str, example: &'static str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or(ConfigError::MissingKey {
            source_name: self.source.to_string(),
            key,
            example,
        })
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "true or false", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        match self.opt_usize(key)? {
            None => Ok(None),
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| self.wrong(key, "an id below 2^32", &self.map[key])),
        }
    }

    fn invalid(&self, key: &str, why: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            source_name: self.source.to_string(),
            key: key.to_string(),
            value: self
                .map
                .get(key)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "<absent>".into()),
            why: why.into(),
        }
    }

    /// Reject a boolean feature whose value this implementation does not support.
    fn require_bool(&self, key: &str, supported: bool, default: bool) -> Result<(), ConfigError> {
        let v = self.opt_bool(key)?.unwrap_or(default);
        if v != supported {
            return Err(self.invalid(
                key,
                format!(
                    "only `{supported}` is supported by mmada-rs (LLaDA/MMaDA checkpoints use {supported})"
                ),
            ));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Parse the text of a Hugging Face `config.json`.
    ///
    /// `source_name` (usually the file path) is used in error messages.
    ///
    /// # Errors
    /// [`ConfigError::Json`] for malformed JSON, [`ConfigError::MissingKey`] for an absent
    /// required key (`d_model`, `n_layers`, `n_heads`, `vocab_size`, `model_type`),
    /// [`ConfigError::WrongType`] for a value of the wrong JSON type,
    /// [`ConfigError::Invalid`] for unsupported architecture switches or inconsistent sizes.
    pub fn from_json_str(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        // a UTF-8 byte order mark (Windows editors) is not JSON: skip it
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(ConfigError::Json {
                source_name: source_name.to_string(),
                message: "the top level must be a JSON object".into(),
            });
        };
        Self::from_map(map, source_name)
    }

    /// Read a `config.json` file.
    ///
    /// # Errors
    /// [`ConfigError::Io`] when the file cannot be read, then as [`ModelConfig::from_json_str`].
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    fn from_map(map: Map<String, Value>, source: &str) -> Result<Self, ConfigError> {
        let r = Reader { map: &map, source };
        let model_type = match r.opt_str("model_type")? {
            Some("llada") => ModelType::Llada,
            Some("mmada") => ModelType::Mmada,
            Some(_) => {
                return Err(r.invalid(
                    "model_type",
                    "expected \"llada\" or \"mmada\" (the LLaDA/MMaDA checkpoints' model types)",
                ));
            }
            None => {
                return Err(ConfigError::MissingKey {
                    source_name: source.to_string(),
                    key: "model_type",
                    example: "\"llada\"",
                });
            }
        };
        let d_model = r.req_usize("d_model", "4096")?;
        let n_layers = r.req_usize("n_layers", "32")?;
        let n_heads = r.req_usize("n_heads", "32")?;
        let vocab_size = r.req_usize("vocab_size", "126464")?;
        // LLaDAConfig: n_kv_heads None -> n_heads (unless multi_query_attention).
        let multi_query = r.opt_bool("multi_query_attention")?.unwrap_or(false);
        let n_kv_heads = match r.opt_usize("n_kv_heads")? {
            Some(k) => k,
            None if multi_query => 1,
            None => n_heads,
        };
        let mlp_ratio = r.opt_usize("mlp_ratio")?.unwrap_or(4);
        let mlp_hidden_size = match r.opt_usize("mlp_hidden_size")? {
            Some(m) => m,
            // checked: huge values must be an error, not an overflow (property tests)
            None => mlp_ratio.checked_mul(d_model).ok_or_else(|| {
                r.invalid(
                    "mlp_ratio",
                    "mlp_ratio × d_model overflows; give mlp_hidden_size",
                )
            })?,
        };
        let embedding_size = r.opt_usize("embedding_size")?.unwrap_or(vocab_size);
        let max_sequence_length = r.opt_usize("max_sequence_length")?.unwrap_or(1024);
        let rope_theta = r.opt_f64("rope_theta")?.unwrap_or(10_000.0);
        let rms_norm_eps = r.opt_f64("rms_norm_eps")?.unwrap_or(1e-5);

        if n_heads == 0 || d_model % n_heads != 0 {
            return Err(r.invalid(
                "n_heads",
                format!("d_model ({d_model}) must be a positive multiple of n_heads"),
            ));
        }
        if (d_model / n_heads) % 2 != 0 {
            return Err(r.invalid(
                "n_heads",
                "head_dim = d_model / n_heads must be even for rotate-half RoPE",
            ));
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(r.invalid(
                "n_kv_heads",
                format!("n_heads ({n_heads}) must be a multiple of n_kv_heads"),
            ));
        }
        if embedding_size < vocab_size {
            return Err(r.invalid(
                "embedding_size",
                format!("must be at least vocab_size ({vocab_size})"),
            ));
        }
        for (key, v) in [
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("mlp_hidden_size", mlp_hidden_size),
        ] {
            if v == 0 {
                return Err(r.invalid(key, "must be positive"));
            }
        }

        // Architecture switches: only the LLaDA-8B combination is implemented.
        match r.opt_str("block_type")?.unwrap_or("llama") {
            "llama" => {}
            _ => {
                return Err(r.invalid(
                    "block_type",
                    "only \"llama\" (separate q/k/v and gate/up projections) is supported",
                ));
            }
        }
        match r.opt_str("layer_norm_type")?.unwrap_or("rms") {
            "rms" => {}
            _ => return Err(r.invalid("layer_norm_type", "only \"rms\" is supported")),
        }
        match r.opt_str("activation_type")?.unwrap_or("silu") {
            "silu" => {}
            _ => {
                return Err(r.invalid(
                    "activation_type",
                    "only \"silu\" (SiLU(ff_proj x) * up_proj x) is supported",
                ));
            }
        }
        // absent `rope` is read as RoPE (the only position encoding implemented)
        r.require_bool("rope", true, true)?;
        r.require_bool("alibi", false, false)?;
        r.require_bool("weight_tying", false, true)?;
        r.require_bool("include_bias", false, false)?;
        r.require_bool("include_qkv_bias", false, false)?;
        r.require_bool("bias_for_layer_norm", false, false)?;
        r.require_bool("layer_norm_with_affine", true, true)?;
        r.require_bool("attention_layer_norm", false, false)?;
        r.require_bool("input_emb_norm", false, false)?;
        r.require_bool("scale_logits", false, false)?;
        if let Some(g) = r.opt_usize("block_group_size")?
            && g != 1
        {
            return Err(r.invalid("block_group_size", "only 1 is supported"));
        }

        let cfg = ModelConfig {
            model_type,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads,
            mlp_hidden_size,
            vocab_size,
            embedding_size,
            max_sequence_length,
            rope_theta,
            rms_norm_eps,
            mask_token_id: r.opt_u32("mask_token_id")?,
            eos_token_id: r.opt_u32("eos_token_id")?,
            pad_token_id: r.opt_u32("pad_token_id")?,
            llm_vocab_size: r.opt_usize("llm_vocab_size")?,
            codebook_size: r.opt_usize("codebook_size")?,
            num_vq_tokens: r.opt_usize("num_vq_tokens")?,
            extra: map
                .iter()
                .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        Ok(cfg)
    }

    /// Head dimension `d_model / n_heads` (128 for LLaDA-8B).
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Number of parameters (spec §1.1 parameter count: 8,015,581,184 for LLaDA-8B).
    /// Saturates at `u64::MAX` for absurd configs (no overflow panic).
    pub fn num_params(&self) -> u64 {
        let d = self.d_model as u64;
        let kv = (self.n_kv_heads as u64).saturating_mul(self.head_dim() as u64);
        let m = self.mlp_hidden_size as u64;
        let mul = |a: u64, b: u64| a.saturating_mul(b);
        let per_layer = mul(2, mul(d, d))
            .saturating_add(mul(2, mul(kv, d)))
            .saturating_add(mul(3, mul(d, m)))
            .saturating_add(mul(2, d));
        mul(per_layer, self.n_layers as u64)
            .saturating_add(mul(2, mul(self.embedding_size as u64, d)))
            .saturating_add(d)
    }

    /// The config as a Hugging Face `config.json` object: the keys read, the untouched
    /// `extra` keys, and the upstream defaults for the keys a fresh config lacks
    /// (`architectures`, `auto_map`, switches), so `AutoConfig.from_pretrained` and the
    /// upstream `LLaDAModelLM` / `MMadaModelLM` accept the directory.
    pub fn to_hf_json(&self) -> Value {
        let mut m = base_upstream_keys(self.model_type);
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set("model_type", json!(self.model_type.as_str()));
        set("d_model", json!(self.d_model));
        set("n_layers", json!(self.n_layers));
        set("n_heads", json!(self.n_heads));
        set("n_kv_heads", json!(self.n_kv_heads));
        set("mlp_hidden_size", json!(self.mlp_hidden_size));
        set("mlp_ratio", json!(4));
        set("vocab_size", json!(self.vocab_size));
        set("embedding_size", json!(self.embedding_size));
        set("max_sequence_length", json!(self.max_sequence_length));
        set("rope_theta", json!(self.rope_theta));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        let opt = |x: Option<u32>| x.map(|v| json!(v)).unwrap_or(Value::Null);
        set("mask_token_id", opt(self.mask_token_id));
        set("eos_token_id", opt(self.eos_token_id));
        set("pad_token_id", opt(self.pad_token_id));
        if let Some(v) = self.llm_vocab_size {
            set("llm_vocab_size", json!(v));
        }
        if let Some(v) = self.codebook_size {
            set("codebook_size", json!(v));
        }
        if let Some(v) = self.num_vq_tokens {
            set("num_vq_tokens", json!(v));
        }
        Value::Object(m)
    }

    /// A named preset: `llada_8b`, `mmada_8b` or `tiny`.
    ///
    /// # Errors
    /// [`ConfigError::UnknownPreset`] for any other name.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        match name {
            "llada_8b" | "llada-8b" => Ok(Self::llada_8b()),
            "mmada_8b" | "mmada-8b" => Ok(Self::mmada_8b()),
            "tiny" => Ok(Self::tiny()),
            other => Err(ConfigError::UnknownPreset(other.to_string())),
        }
    }

    /// `GSAI-ML/LLaDA-8B-Instruct` (spec §1.1): 8,015,581,184 parameters.
    pub fn llada_8b() -> Self {
        ModelConfig {
            model_type: ModelType::Llada,
            d_model: 4096,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: 32,
            mlp_hidden_size: 12288,
            vocab_size: 126464,
            embedding_size: 126464,
            max_sequence_length: 4096,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            mask_token_id: Some(126336),
            eos_token_id: Some(126081),
            pad_token_id: Some(126081),
            llm_vocab_size: None,
            codebook_size: None,
            num_vq_tokens: None,
            extra: Map::new(),
        }
    }

    /// `Gen-Verse/MMaDA-8B-Base` / `-MixCoT` (spec §1.5): LLaDA-8B with the vocabulary
    /// resized to 126464 text + 8192 image codes = 134656.
    pub fn mmada_8b() -> Self {
        ModelConfig {
            model_type: ModelType::Mmada,
            vocab_size: 134656,
            embedding_size: 134656,
            llm_vocab_size: Some(126464),
            codebook_size: Some(8192),
            num_vq_tokens: Some(1024),
            ..Self::llada_8b()
        }
    }

    /// A tiny MMaDA-shaped model for tests and the quickstart: the shape of the upstream
    /// parity fixtures (d_model 64, 2 layers, 4 heads, mlp 128, vocab 320 text + 64 codes).
    pub fn tiny() -> Self {
        ModelConfig {
            model_type: ModelType::Mmada,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 4,
            mlp_hidden_size: 128,
            vocab_size: 384,
            embedding_size: 384,
            max_sequence_length: 128,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            mask_token_id: Some(300),
            eos_token_id: Some(281),
            pad_token_id: Some(281),
            llm_vocab_size: Some(320),
            codebook_size: Some(64),
            num_vq_tokens: Some(16),
            extra: Map::new(),
        }
    }
}

/// The keys upstream `save_pretrained` writes that describe the fixed parts of the
/// architecture (spec §1.1), plus the remote-code registration.
fn base_upstream_keys(model_type: ModelType) -> Map<String, Value> {
    let arch = match model_type {
        ModelType::Llada => "LLaDAModelLM",
        ModelType::Mmada => "MMadaModelLM",
    };
    let v = json!({
        "activation_type": "silu",
        "alibi": false,
        "alibi_bias_max": 8.0,
        "architectures": [arch],
        "attention_dropout": 0.0,
        "attention_layer_norm": false,
        "attention_layer_norm_with_affine": true,
        "bias_for_layer_norm": false,
        "block_group_size": 1,
        "block_type": "llama",
        "embedding_dropout": 0.0,
        "flash_attention": false,
        "include_bias": false,
        "include_qkv_bias": false,
        "init_cutoff_factor": null,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": false,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": true,
        "multi_query_attention": null,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rope": true,
        "rope_full_precision": true,
        "scale_logits": false,
        "use_cache": false,
        "weight_tying": false,
    });
    let Value::Object(mut m) = v else {
        unreachable!("literal object")
    };
    if model_type == ModelType::Llada {
        m.insert(
            "auto_map".into(),
            json!({
                "AutoConfig": "configuration_llada.LLaDAConfig",
                "AutoModel": "modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"
            }),
        );
    }
    m
}

#[cfg(test)]
mod props {
    //! `config.json` of any shape: a config or an error naming the file
    //! (`PROPTEST_CASES=10000` for the long run).
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0u64..300).prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            prop_oneof![
                Just("llada"),
                Just("mmada"),
                Just("llama"),
                Just("rms"),
                Just("silu"),
                Just("x")
            ]
            .prop_map(Value::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
        ))]

        #[test]
        fn any_config_json_never_panics(
            keys in proptest::collection::btree_map(
                prop_oneof![
                    proptest::sample::select(KNOWN_KEYS.to_vec()).prop_map(str::to_string),
                    "[a-z_]{1,8}",
                ],
                value(),
                0..24,
            ),
            base in any::<bool>(),
            bom in any::<bool>(),
            raw in any::<String>(),
        ) {
            let mut map = if base { ModelConfig::tiny().to_hf_json().as_object().unwrap().clone() } else { Map::new() };
            for (k, v) in keys {
                map.insert(k, v);
            }
            let mut text = Value::Object(map).to_string();
            if bom {
                text.insert(0, '\u{feff}');
            }
            for t in [text.as_str(), raw.as_str()] {
                match ModelConfig::from_json_str(t, "ckpt/config.json") {
                    Ok(c) => {
                        prop_assert!(c.n_heads > 0 && c.d_model % c.n_heads == 0);
                        prop_assert!(c.embedding_size >= c.vocab_size);
                        let _ = c.num_params();
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        prop_assert!(msg.contains("ckpt/config.json"), "{}", msg);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llada_8b_parameter_count_matches_released_index() {
        // spec §1.1: 8,015,581,184 params = total_size 16,031,162,368 bytes / 2.
        assert_eq!(ModelConfig::llada_8b().num_params(), 8_015_581_184);
        // MMaDA: two [134656, 4096] matrices instead of [126464, 4096].
        assert_eq!(
            ModelConfig::mmada_8b().num_params(),
            8_015_581_184 + 2 * 8192 * 4096
        );
    }

    #[test]
    fn hf_json_round_trip_keeps_every_key() {
        for cfg in [
            ModelConfig::llada_8b(),
            ModelConfig::mmada_8b(),
            ModelConfig::tiny(),
        ] {
            let text = serde_json::to_string(&cfg.to_hf_json()).unwrap();
            let back = ModelConfig::from_json_str(&text, "test").unwrap();
            assert_eq!(back.to_hf_json(), cfg.to_hf_json());
            assert_eq!(back.d_model, cfg.d_model);
            assert_eq!(back.mask_token_id, cfg.mask_token_id);
        }
    }

    #[test]
    fn missing_and_wrong_keys_are_named() {
        let err = ModelConfig::from_json_str(
            r#"{"model_type":"llada","n_layers":2,"n_heads":2,"vocab_size":10}"#,
            "c.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`d_model`") && err.contains("c.json"), "{err}");
        let err = ModelConfig::from_json_str(
            r#"{"model_type":"llada","d_model":"64","n_layers":2,"n_heads":2,"vocab_size":10}"#,
            "c.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`d_model`") && err.contains("\"64\""), "{err}");
        let err = ModelConfig::from_json_str(
            r#"{"model_type":"llada","d_model":64,"n_layers":2,"n_heads":2,"vocab_size":10,"weight_tying":true}"#,
            "c.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`weight_tying`"), "{err}");
        let err = ModelConfig::from_json_str("{not json", "c.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.json") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn shipped_config_files_match_presets() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for name in ["tiny", "llada_8b", "mmada_8b"] {
            let path = dir.join(format!("{name}.json"));
            let cfg = ModelConfig::from_file(&path).unwrap();
            let preset = ModelConfig::preset(name).unwrap();
            assert_eq!(cfg.to_hf_json(), preset.to_hf_json(), "{}", path.display());
            assert_eq!(
                (cfg.d_model, cfg.vocab_size),
                (preset.d_model, preset.vocab_size)
            );
        }
    }

    #[test]
    fn unknown_keys_are_tolerated_and_kept() {
        let mut v = ModelConfig::tiny().to_hf_json();
        v["some_future_key"] = json!({"a": 1});
        let cfg = ModelConfig::from_json_str(&v.to_string(), "t").unwrap();
        assert_eq!(cfg.to_hf_json()["some_future_key"], json!({"a": 1}));
    }
}
