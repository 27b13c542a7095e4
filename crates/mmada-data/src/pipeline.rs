//! Example → [`Sample`]: template + tokenizer + layout, and the inspection helpers the
//! `mmada-train data inspect` command prints ([`render_sample`], [`LengthStats`]).

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::example::{Example, ImageRef, Task};
use crate::layout::{self, Sample, TextSplit};
use crate::template::ChatTemplate;
use crate::tokenizer::TextTokenizer;

/// Layout settings of one run (spec §2.4, §3.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutConfig {
    /// `P` = `dataset.preprocessing.max_seq_length` (t2i text is `P+1`, mmu text `P`).
    pub max_seq_length: usize,
    /// Length of lm / chat / cot rows (`Lseq`; `max_lm_text_length` in stage 2.1).
    pub max_lm_len: usize,
    /// Pad rows to their fixed length in the layout (upstream) or leave it to the batcher.
    #[serde(default = "yes")]
    pub pad_in_layout: bool,
    /// Chat template.
    #[serde(default)]
    pub template: ChatTemplate,
    /// Use the LLaDA SFT layout (f) with an explicit prompt length for chat / cot data
    /// that has question + answer (instead of (b) with the last `<|end_header_id|>`).
    #[serde(default)]
    pub explicit_prompt: bool,
}

fn yes() -> bool {
    true
}

impl Default for LayoutConfig {
    fn default() -> Self {
        Self {
            max_seq_length: 512,
            max_lm_len: 1536,
            pad_in_layout: true,
            template: ChatTemplate::mmada(),
            explicit_prompt: false,
        }
    }
}

fn codes(ex: &Example, layout: &'static str) -> Result<Vec<u32>> {
    match &ex.image {
        Some(ImageRef::Codes(c)) => Ok(c.clone()),
        Some(_) => Err(DataError::Layout {
            layout,
            message: format!(
                "{}: the image is not tokenized; run an ImageCoder (crate::image) first",
                ex.source
            ),
        }),
        None => Err(DataError::Layout {
            layout,
            message: format!("{}: example has no image", ex.source),
        }),
    }
}

/// Lays out one example by its task. `drop_caption` applies t2i condition dropout (the
/// caller draws it with probability `cond_dropout_prob` from its own RNG).
pub fn layout_example(
    ex: &Example,
    tok: &TextTokenizer,
    cfg: &LayoutConfig,
    drop_caption: bool,
) -> Result<Sample> {
    let t = tok.layout();
    let task = ex.task.unwrap_or(Task::Chat);
    let missing = |layout: &'static str| DataError::Layout {
        layout,
        message: format!(
            "{}: example has no text for task {}",
            ex.source,
            task.as_str()
        ),
    };
    match task {
        Task::Lm => {
            let text = ex.text.as_deref().ok_or_else(|| missing("lm"))?;
            Ok(layout::lm_layout(
                &tok.encode(text)?,
                cfg.max_lm_len,
                cfg.pad_in_layout,
                t,
            ))
        }
        Task::Chat | Task::Cot => {
            let (prompt, answer) = cfg
                .template
                .prompt_and_answer(ex, task == Task::Cot)
                .ok_or_else(|| missing("chat"))?;
            if cfg.explicit_prompt {
                layout::sft_layout(
                    &tok.encode(&prompt)?,
                    &tok.encode(&answer)?,
                    cfg.max_lm_len,
                    cfg.pad_in_layout,
                    t,
                )
            } else {
                let ids = tok.encode(&(prompt + &answer))?;
                Ok(layout::chat_layout(
                    &ids,
                    cfg.max_lm_len,
                    cfg.pad_in_layout,
                    t,
                ))
            }
        }
        Task::Mmu => {
            let c = codes(ex, "mmu")?;
            let (prompt, answer) = cfg
                .template
                .prompt_and_answer(ex, false)
                .ok_or_else(|| missing("mmu"))?;
            let ids = tok.encode(&(prompt + &answer))?;
            layout::mmu_layout(&c, TextSplit::LastEndHeader(&ids), cfg.max_seq_length, t)
        }
        Task::T2i => {
            let c = codes(ex, "t2i")?;
            let caption = ex.caption.as_deref().ok_or_else(|| missing("t2i"))?;
            layout::t2i_layout(
                &tok.encode(caption)?,
                &c,
                cfg.max_seq_length,
                drop_caption,
                t,
            )
        }
    }
}

/// Renders a sample as text with special tokens visible, runs of image tokens collapsed
/// to `<image×N>` and EOS padding collapsed to `<|endoftext|>×N`, with the prompt / answer
/// split marked by `⟦ANSWER⟧`. Used by `mmada-train data inspect`.
pub fn render_sample(s: &Sample, tok: &TextTokenizer) -> Result<String> {
    let t = tok.layout();
    let mut out = String::new();
    let mut i = 0;
    let mut text_run: Vec<u32> = Vec::new();
    let flush = |run: &mut Vec<u32>, out: &mut String| -> Result<()> {
        if !run.is_empty() {
            out.push_str(&tok.decode(run)?);
            run.clear();
        }
        Ok(())
    };
    while i < s.ids.len() {
        if i == s.prompt_len && s.prompt_len > 0 {
            flush(&mut text_run, &mut out)?;
            out.push_str("⟦ANSWER⟧");
        }
        let id = s.ids[i];
        let run_len =
            |pred: &dyn Fn(u32) -> bool| s.ids[i..].iter().take_while(|&&x| pred(x)).count();
        if t.image_code(id).is_some() {
            flush(&mut text_run, &mut out)?;
            let n = run_len(&|x| t.image_code(x).is_some());
            out.push_str(&format!("<image×{n}>"));
            i += n;
            continue;
        }
        if id == t.eos_id || id == t.ipad_id {
            let n = run_len(&|x| x == id);
            if n > 1 {
                flush(&mut text_run, &mut out)?;
                let name = tok.id_to_token(id).unwrap_or_else(|| format!("<{id}>"));
                out.push_str(&format!("{name}×{n}"));
                i += n;
                continue;
            }
        }
        text_run.push(id);
        i += 1;
    }
    flush(&mut text_run, &mut out)?;
    Ok(out)
}

/// Length statistics over samples (token counts before padding is not recoverable, so
/// these are the laid-out lengths plus prompt / answer splits).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LengthStats {
    /// Samples counted.
    pub count: usize,
    /// Samples truncated by their layout.
    pub truncated: usize,
    /// Min / mean / max of the number of non-padding tokens (ids before the trailing EOS
    /// run, plus one EOS).
    pub tokens: MinMeanMax,
    /// Min / mean / max prompt length.
    pub prompt: MinMeanMax,
}

/// Min, mean and max of a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MinMeanMax {
    /// Minimum.
    pub min: usize,
    /// Mean.
    pub mean: f64,
    /// Maximum.
    pub max: usize,
}

impl MinMeanMax {
    fn of(values: &[usize]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        Self {
            min: values.iter().copied().min().unwrap_or(0),
            max: values.iter().copied().max().unwrap_or(0),
            mean: values.iter().sum::<usize>() as f64 / values.len() as f64,
        }
    }
}

/// Number of tokens of a sample without its trailing EOS padding (one EOS counted).
pub fn content_len(s: &Sample, eos_id: u32) -> usize {
    let trailing = s.ids.iter().rev().take_while(|&&x| x == eos_id).count();
    s.len() - trailing.saturating_sub(1)
}

impl LengthStats {
    /// Statistics of `samples`.
    pub fn of(samples: &[Sample], eos_id: u32) -> Self {
        let tokens: Vec<usize> = samples.iter().map(|s| content_len(s, eos_id)).collect();
        let prompt: Vec<usize> = samples.iter().map(|s| s.prompt_len).collect();
        Self {
            count: samples.len(),
            truncated: samples.iter().filter(|s| s.truncated).count(),
            tokens: MinMeanMax::of(&tokens),
            prompt: MinMeanMax::of(&prompt),
        }
    }
}
