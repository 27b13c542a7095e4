//! A loaded checkpoint with its tokenizer and chat template, prompt encoding, batched text
//! generation on top of the sampler's generation layer
//! ([`mmada_sampler::generate_completions`]), and the vocabulary checks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::Backend;
use mmada_data::{ChatTemplate, Message, Role, TextTokenizer};
use mmada_model::{FloatDType, LladaModel, ModelConfig, ModelType};
use mmada_sampler::{
    GenerateConfig, SamplerError, SamplerSection, SeededRng, StepEvent,
    generate_completions_observed,
};

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
    /// A canvas longer than `max_sequence_length`: warn (default) or refuse.
    pub long_prompt: crate::options::LongPrompt,
}

/// One generated answer.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated ids (`gen_length` of them, EOS / EOT included).
    pub ids: Vec<u32>,
    /// Decoded text up to the first EOS / EOT, special tokens removed, trimmed.
    pub text: String,
    /// Whether the answer ended (an EOS or EOT was generated) before `gen_length`; the same
    /// flag a UniGRPO rollout of this prompt gets ([`mmada_sampler::Completion::terminated`]).
    pub terminated: bool,
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
    /// Forwards of the batch that refreshed the key/value cache (0 without `cache`).
    pub refreshes: usize,
    /// Forwards of the batch run against the cache (0 without `cache`).
    pub cache_hits: usize,
    /// Tokens committed per row per forward in the batch
    /// ([`mmada_sampler::Completions::tokens_per_forward`]).
    pub tokens_per_forward: f64,
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

/// Prompt ids of a conversation: `<BOS>` + the tokenised turns, chat-templated (the turns +
/// the assistant header) when `template` is set, else the turns' contents concatenated.
pub fn chat_ids(
    tok: &TextTokenizer,
    template: Option<&ChatTemplate>,
    messages: &[Message],
) -> Result<Vec<u32>> {
    let text = match template {
        Some(t) => t.render(messages, true),
        None => messages.iter().map(|m| m.content.as_str()).collect(),
    };
    let mut ids = vec![tok.layout().bos_id];
    ids.extend(tok.encode(&text)?);
    Ok(ids)
}

/// Loads the tokenizer of `dir` (or `explicit`) and checks that it fits the model: every id
/// inside the logits, the same mask id, pad ≠ mask.
pub fn load_tokenizer(
    dir: &Path,
    explicit: Option<&Path>,
    cfg: &ModelConfig,
) -> Result<TextTokenizer> {
    let path: PathBuf = match explicit {
        Some(p) => mmada_data::hub::local_or_tokenizer(p)?,
        None => dir.join("tokenizer.json"),
    };
    let path = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path
    };
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
    /// Loads `dir` (config.json, weights, tokenizer) onto `device`, with the LoRA `adapter`
    /// (a PEFT adapter directory or a LoRA training checkpoint) merged into the weights when
    /// given.
    pub fn load(
        dir: &Path,
        adapter: Option<&Path>,
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
        let bar = crate::progress::bar(0, "tensors");
        bar.set_message("loading");
        let model = mmada_model::load_weights_observed::<B>(
            dir,
            &cfg,
            device,
            dtype,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
        bar.finish_and_clear();
        let model = match adapter {
            None => model,
            Some(a) => {
                let a = mmada_model::adapter::resolve_adapter_dir(a);
                let (model, lora) = mmada_model::adapter::load_adapter(model, &a)
                    .with_context(|| format!("loading LoRA adapter {}", a.display()))?;
                tracing::info!(
                    adapter = %a.display(),
                    r = lora.r,
                    alpha = lora.alpha,
                    targets = ?lora.target_modules,
                    "LoRA adapter merged"
                );
                model.merge_lora()
            }
        };
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
            long_prompt: Default::default(),
        })
    }

    /// Prompt ids: `<BOS>` + the tokenised prompt, chat-templated (one user turn + the
    /// assistant header) when a template is set.
    pub fn prompt_ids(&self, user: &str) -> Result<Vec<u32>> {
        chat_ids(
            &self.tok,
            self.template.as_ref(),
            &[Message {
                role: Role::User,
                content: user.to_string(),
            }],
        )
    }

    /// The sampler configuration of the `sampling` settings for this checkpoint
    /// ([`SamplerSection::to_config`]): the tokenizer's ids, and sampled ids restricted to the
    /// tokenizer without the mask id ([`GenerateConfig::sample_vocab`] = the tokenizer's
    /// length, at most the model's `embedding_size`) unless `full_vocab`, which samples over
    /// the model's whole output head (LLaDA: 126464 rows for 126349 tokenizer ids; MMaDA: the
    /// image codes too), or an explicit `sample_vocab`.
    pub fn sampler_config(&self, s: &SamplerSection) -> Result<GenerateConfig, SamplerError> {
        s.to_config(
            self.tok.layout(),
            self.tok.len().min(self.cfg.embedding_size),
        )
    }

    /// Decodes answer ids (already cut at the first EOS / EOT): special tokens dropped, trimmed.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .tok
            .inner()
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        Ok(text.trim().to_string())
    }

    /// Generates for one batch of prompt id rows with [`mmada_sampler::generate_completions`] (left-padded
    /// with the pad id and a key-padding mask when their lengths differ; answers cut at the
    /// first EOS / EOT). `config` comes from [`Engine::sampler_config`].
    /// `observer` is called after every denoising step
    /// ([`mmada_sampler::generate_completions_observed`]).
    pub fn generate_batch_observed(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerateConfig,
        seed: u64,
        observer: &mut dyn FnMut(&StepEvent<'_>),
    ) -> Result<Vec<Generation>> {
        ensure!(!prompts.is_empty(), "no prompts");
        let b = prompts.len();
        let lp = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if lp + config.gen_length > self.cfg.max_sequence_length {
            ensure!(
                self.long_prompt == crate::options::LongPrompt::Warn,
                "a prompt of {lp} tokens + gen_length {} exceeds the model's \
                 max_sequence_length {}: shorten the prompt or gen_length, or pass \
                 --long-prompt warn to decode anyway",
                config.gen_length,
                self.cfg.max_sequence_length
            );
            tracing::warn!(
                prompt_len = lp,
                gen_length = config.gen_length,
                max_sequence_length = self.cfg.max_sequence_length,
                "canvas longer than the model's max_sequence_length"
            );
        }
        let l = self.tok.layout();
        let out = generate_completions_observed::<B, _>(
            &self.model,
            prompts,
            config,
            &[l.eos_id, l.eot_id],
            l.pad_id,
            &mut SeededRng::new(seed),
            &self.device,
            observer,
        )
        .context("sampling")?;
        let new_tokens = b * out.decoded;
        let tpf = out.tokens_per_forward();
        tracing::info!(
            batch = b,
            prompt_len = out.padded_len,
            nfe = out.nfe,
            refreshes = out.refreshes,
            cache_hits = out.cache_hits,
            tokens_per_forward = format!("{tpf:.2}"),
            new_tokens,
            seconds = format!("{:.3}", out.seconds),
            tokens_per_s = format!("{:.1}", new_tokens as f64 / out.seconds.max(1e-9)),
            "generated"
        );
        out.rows
            .into_iter()
            .map(|row| {
                Ok(Generation {
                    text: self.decode_text(&row.ids)?,
                    terminated: row.terminated,
                    ids: row.generated,
                    nfe: out.nfe,
                    seconds: out.seconds,
                    batch: b,
                    decoded: out.decoded,
                    refreshes: out.refreshes,
                    cache_hits: out.cache_hits,
                    tokens_per_forward: tpf,
                })
            })
            .collect()
    }

    /// Generates for any number of prompts in batches of `batch_size`; batch `i` uses seed
    /// `seed + i`. `on_batch` is called after each batch with the number of prompts done,
    /// `on_step` after every denoising step of every batch.
    pub fn generate_all(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerateConfig,
        seed: u64,
        batch_size: usize,
        mut on_batch: impl FnMut(usize),
        on_step: &mut dyn FnMut(&StepEvent<'_>),
    ) -> Result<Vec<Generation>> {
        ensure!(batch_size > 0, "batch_size must be > 0");
        let mut all = Vec::with_capacity(prompts.len());
        for (i, chunk) in prompts.chunks(batch_size).enumerate() {
            all.extend(self.generate_batch_observed(
                chunk,
                config,
                seed.wrapping_add(i as u64),
                on_step,
            )?);
            on_batch(all.len());
        }
        Ok(all)
    }
}
