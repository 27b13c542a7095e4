//! A loaded checkpoint with its tokenizer and chat template, prompt encoding, batched text
//! generation on top of [`mmada_sampler::generate`], and the vocabulary checks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use mmada_data::{ChatTemplate, Message, Role, TextTokenizer};
use mmada_model::{FloatDType, LladaModel, ModelConfig, ModelType};
use mmada_sampler::{GenerateConfig, SeededRng};

use crate::options::TemplateArg;

/// A checkpoint ready for sampling.
pub struct Engine<B: Backend> {
    /// The model's `config.json`.
    pub cfg: ModelConfig,
    /// The network.
    pub model: LladaModel<B>,
    /// The tokenizer (checked against the model's vocabulary).
    pub tok: TextTokenizer,
    /// Chat template; `None` = raw prompt.
    pub template: Option<ChatTemplate>,
    /// Where the model lives.
    pub device: B::Device,
}

/// One generated answer.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated ids (`gen_length` of them, EOS / EOT included).
    pub ids: Vec<u32>,
    /// Decoded text up to the first EOS / EOT, special tokens removed, trimmed.
    pub text: String,
    /// Denoiser evaluations of the batch this prompt was in.
    pub nfe: usize,
    /// Wall time of that batch, seconds.
    pub seconds: f64,
    /// Number of prompts in that batch.
    pub batch: usize,
    /// Generated positions actually decoded for this prompt: `gen_length`, or fewer when
    /// `early_stop` ended the batch before its last block (the rest are still `mask_id`).
    /// Throughput (tokens/s) counts these.
    pub decoded: usize,
}

fn template_for(kind: TemplateArg, dir: &Path, cfg: &ModelConfig) -> Option<ChatTemplate> {
    match kind {
        TemplateArg::None => None,
        TemplateArg::Mmada => Some(ChatTemplate::mmada()),
        TemplateArg::Llada => Some(ChatTemplate::llada()),
        TemplateArg::Auto => {
            let jinja = std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("chat_template")?.as_str().map(str::to_string));
            let llada = match jinja {
                Some(j) => {
                    j.contains("<|end_header_id|>\\n\\n") || j.contains("<|end_header_id|>\n\n")
                }
                None => cfg.model_type == ModelType::Llada,
            };
            Some(if llada {
                ChatTemplate::llada()
            } else {
                ChatTemplate::mmada()
            })
        }
    }
}

/// Loads the tokenizer of `dir` (or `explicit`) and checks that it fits the model: every id
/// inside the logits, the same mask id, pad ≠ mask.
pub fn load_tokenizer(
    dir: &Path,
    explicit: Option<&Path>,
    cfg: &ModelConfig,
) -> Result<TextTokenizer> {
    let path: PathBuf = explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    ensure!(
        path.is_file(),
        "tokenizer {} not found (pass --tokenizer FILE for checkpoints without one)",
        path.display()
    );
    let tok = match TextTokenizer::from_file(&path) {
        Ok(t) => t,
        Err(_) => TextTokenizer::from_file_with_mmada_tokens(&path)
            .with_context(|| format!("loading tokenizer {}", path.display()))?,
    };
    check_vocab(&tok, cfg, &path)?;
    Ok(tok)
}

/// The checks of [`load_tokenizer`].
pub fn check_vocab(tok: &TextTokenizer, cfg: &ModelConfig, path: &Path) -> Result<()> {
    let width = cfg.embedding_size.min(cfg.vocab_size);
    let n = tok.len();
    if n > width {
        bail!(
            "tokenizer {} does not match the model: it has {n} tokens but the model's vocabulary \
             (vocab_size {}, embedding_size {}) has only {width} ids",
            path.display(),
            cfg.vocab_size,
            cfg.embedding_size
        );
    }
    if let Some(llm) = cfg.llm_vocab_size
        && n > llm
    {
        bail!(
            "tokenizer {} does not match the model: it has {n} tokens but config.json \
             llm_vocab_size is {llm}",
            path.display()
        );
    }
    let layout = tok.layout();
    if let Some(m) = cfg.mask_token_id
        && m != layout.mask_id
    {
        bail!(
            "tokenizer {} does not match the model: its <|mdm_mask|> is id {} but config.json \
             mask_token_id is {m}",
            path.display(),
            layout.mask_id
        );
    }
    if layout.pad_id == layout.mask_id {
        bail!(
            "tokenizer {}: the pad id equals the mask id ({})",
            path.display(),
            layout.mask_id
        );
    }
    Ok(())
}

impl<B: Backend> Engine<B> {
    /// Loads `dir` (config.json, weights, tokenizer) onto `device`.
    pub fn load(
        dir: &Path,
        tokenizer: Option<&Path>,
        template: TemplateArg,
        device: &B::Device,
        dtype: FloatDType,
    ) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "checkpoint directory {} does not exist",
            dir.display()
        );
        let cfg = ModelConfig::from_file(&dir.join("config.json"))
            .with_context(|| format!("checkpoint {}", dir.display()))?;
        let tok = load_tokenizer(dir, tokenizer, &cfg)?;
        let t0 = Instant::now();
        let (_, model) = mmada_model::load_checkpoint::<B>(dir, device, dtype)
            .with_context(|| format!("loading checkpoint {}", dir.display()))?;
        tracing::info!(
            checkpoint = %dir.display(),
            params = cfg.num_params(),
            tokenizer_len = tok.len(),
            seconds = format!("{:.2}", t0.elapsed().as_secs_f64()),
            "model loaded"
        );
        let template = template_for(template, dir, &cfg);
        Ok(Engine {
            cfg,
            model,
            tok,
            template,
            device: device.clone(),
        })
    }

    /// Prompt ids: `<BOS>` + the tokenised prompt, chat-templated (one user turn + the
    /// assistant header) when a template is set.
    pub fn prompt_ids(&self, user: &str) -> Result<Vec<u32>> {
        let text = match &self.template {
            Some(t) => t.render(
                &[Message {
                    role: Role::User,
                    content: user.to_string(),
                }],
                true,
            ),
            None => user.to_string(),
        };
        let mut ids = vec![self.tok.layout().bos_id];
        ids.extend(self.tok.encode(&text)?);
        Ok(ids)
    }

    /// `config` with the vocabulary restriction of the sampler set: sampled ids stay inside
    /// the tokenizer and off the mask id ([`GenerateConfig::sample_vocab`] = the tokenizer's
    /// length) unless `full_vocab`, which samples over the model's whole output head (LLaDA:
    /// 126464 rows for 126349 tokenizer ids; MMaDA: the image codes too).
    pub fn sampler_config(&self, config: &GenerateConfig, full_vocab: bool) -> GenerateConfig {
        let mut c = config.clone();
        c.sample_vocab = (!full_vocab).then(|| self.tok.len().min(self.cfg.embedding_size));
        c
    }

    /// Decodes generated ids: cut at the first EOS / EOT, special tokens dropped, trimmed.
    pub fn decode_answer(&self, ids: &[u32]) -> Result<String> {
        let l = self.tok.layout();
        let end = ids
            .iter()
            .position(|&t| t == l.eos_id || t == l.eot_id)
            .unwrap_or(ids.len());
        let text = self
            .tok
            .inner()
            .decode(&ids[..end], true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        Ok(text.trim().to_string())
    }

    /// Generates for one batch of prompt id rows (left-padded with the pad id and a key-padding
    /// mask when their lengths differ).
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerateConfig,
        full_vocab: bool,
        seed: u64,
    ) -> Result<Vec<Generation>> {
        ensure!(!prompts.is_empty(), "no prompts");
        let b = prompts.len();
        let lp = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let total = lp + config.gen_length;
        if total > self.cfg.max_sequence_length {
            tracing::warn!(
                prompt_len = lp,
                gen_length = config.gen_length,
                max_sequence_length = self.cfg.max_sequence_length,
                "canvas longer than the model's max_sequence_length"
            );
        }
        let pad = i64::from(self.tok.layout().pad_id);
        let mut ids = Vec::with_capacity(b * lp);
        let mut keep = Vec::with_capacity(b * lp);
        for p in prompts {
            let k = lp - p.len();
            ids.extend(std::iter::repeat_n(pad, k));
            ids.extend(p.iter().map(|&t| i64::from(t)));
            keep.extend(std::iter::repeat_n(false, k));
            keep.extend(std::iter::repeat_n(true, p.len()));
        }
        let prompt = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, lp]), &self.device);
        let mask = keep
            .iter()
            .any(|k| !k)
            .then(|| Tensor::<B, 2, Bool>::from_data(TensorData::new(keep, [b, lp]), &self.device));
        let mut rng = SeededRng::new(seed);
        let t0 = Instant::now();
        let out = mmada_sampler::generate(
            &self.model,
            prompt,
            mask,
            &self.sampler_config(config, full_vocab),
            &mut rng,
            false,
        )
        .context("sampling")?;
        let canvas: Vec<i64> = out
            .ids
            .into_data()
            .convert::<i64>()
            .into_vec()
            .map_err(|e| anyhow::anyhow!("reading the canvas: {e:?}"))?;
        let seconds = t0.elapsed().as_secs_f64();
        let decoded = (out.blocks * config.block_length).min(config.gen_length);
        let new_tokens = b * decoded;
        tracing::info!(
            batch = b,
            prompt_len = lp,
            nfe = out.nfe,
            new_tokens,
            seconds = format!("{seconds:.3}"),
            tokens_per_s = format!("{:.1}", new_tokens as f64 / seconds.max(1e-9)),
            "generated"
        );
        let mut res = Vec::with_capacity(b);
        for r in 0..b {
            let row = &canvas[r * total + lp..(r + 1) * total];
            let gen_ids: Vec<u32> = row
                .iter()
                .map(|&t| u32::try_from(t).context("negative id in the canvas"))
                .collect::<Result<_>>()?;
            res.push(Generation {
                text: self.decode_answer(&gen_ids)?,
                ids: gen_ids,
                nfe: out.nfe,
                seconds,
                batch: b,
                decoded,
            });
        }
        Ok(res)
    }

    /// Generates for any number of prompts in batches of `batch_size`; batch `i` uses seed
    /// `seed + i`. `on_batch` is called after each batch with the number of prompts done.
    pub fn generate_all(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerateConfig,
        full_vocab: bool,
        seed: u64,
        batch_size: usize,
        mut on_batch: impl FnMut(usize),
    ) -> Result<Vec<Generation>> {
        ensure!(batch_size > 0, "batch_size must be > 0");
        config.validate().context("sampling settings")?;
        let mut all = Vec::with_capacity(prompts.len());
        for (i, chunk) in prompts.chunks(batch_size).enumerate() {
            all.extend(self.generate_batch(
                chunk,
                config,
                full_vocab,
                seed.wrapping_add(i as u64),
            )?);
            on_batch(all.len());
        }
        Ok(all)
    }
}
