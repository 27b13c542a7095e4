//! The exact MMaDA / LLaDA sequence layouts of spec §2.4, on token ids.
//!
//! Upstream: `Gen-Verse/MMaDA/training/prompting_utils.py` (`UniversalPrompting.lm_prompt`,
//! `lm_chat_prompt`, `t2i_prompt`, `mmu_prompt`) and `ML-GSAI/LLaDA/GUIDELINES.md` (SFT).
//! Every layout returns a [`Sample`]: ids, labels (−100 = ignored), prompt mask and
//! length, answer length and attention mask, all of the same length.

use mmada_model::tokens::TokenLayout;

use crate::error::{DataError, Result};

/// Label value of ignored positions (PyTorch `ignore_index`).
pub const IGNORE_ID: i64 = -100;

/// Which layout built a [`Sample`] (decides its padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayoutKind {
    /// (a) plain LM.
    Lm,
    /// (b) chat / (e) mixed-CoT / (f) LLaDA SFT: EOS-padded text with a prompt.
    Chat,
    /// (c) text-to-image.
    T2i,
    /// (d) multimodal understanding.
    Mmu,
}

/// A laid-out sequence of length `L` (all vectors have length `L`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Layout that built it.
    pub kind: LayoutKind,
    /// Token ids `x0`, `[L]`.
    pub ids: Vec<u32>,
    /// Training labels, `[L]`, [`IGNORE_ID`] where ignored.
    pub labels: Vec<i64>,
    /// `true` on prompt positions (never masked by the forward process), `[L]`.
    pub prompt_mask: Vec<bool>,
    /// Number of leading prompt positions (`prompt_mask` is `true` exactly on
    /// `0..prompt_len`, except for t2i where `<|eoi|>` is also `true`).
    pub prompt_len: usize,
    /// `L − prompt_len` for text layouts (EOS padding counts as answer, spec §3.2); the
    /// number of image tokens `N` for t2i.
    pub answer_len: usize,
    /// `false` on positions that are padding for attention (t2i `[iPAD]`), `[L]`.
    pub attention_mask: Vec<bool>,
    /// Whether the input was cut to fit.
    pub truncated: bool,
}

impl Sample {
    /// Sequence length `L`.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the sample has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Right-pads to `len` with EOS (text layouts: padding is answer, target and attended,
    /// as upstream's fixed-length padding). t2i rows have a fixed length and are never
    /// padded: asking for another length is an error.
    pub fn pad_to(&mut self, len: usize, t: &TokenLayout) -> Result<()> {
        let cur = self.len();
        if len < cur {
            return Err(DataError::Layout {
                layout: "pad",
                message: format!("cannot pad a sample of length {cur} to {len}"),
            });
        }
        if len == cur {
            return Ok(());
        }
        if self.kind == LayoutKind::T2i {
            return Err(DataError::Layout {
                layout: "t2i",
                message: format!(
                    "t2i rows have fixed length P+1+N+2 = {cur}; cannot pad to {len} (use the same P and N in a batch)"
                ),
            });
        }
        let k = len - cur;
        self.ids.extend(std::iter::repeat_n(t.eos_id, k));
        self.labels
            .extend(std::iter::repeat_n(i64::from(t.eos_id), k));
        self.prompt_mask.extend(std::iter::repeat_n(false, k));
        self.attention_mask.extend(std::iter::repeat_n(true, k));
        self.answer_len += k;
        Ok(())
    }
}

fn with_bos(text: &[u32], t: &TokenLayout) -> Vec<u32> {
    // "BOS prepended if missing" (every `UniversalPrompting` prompt).
    let mut v = Vec::with_capacity(text.len() + 2);
    if text.first() != Some(&t.bos_id) {
        v.push(t.bos_id);
    }
    v.extend_from_slice(text);
    v
}

fn last_end_header(ids: &[u32], t: &TokenLayout) -> Option<usize> {
    ids.iter().rposition(|&x| x == t.end_header_id)
}

fn image_tokens(codes: &[u32], t: &TokenLayout, layout: &'static str) -> Result<Vec<u32>> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            t.image_token(c).ok_or_else(|| DataError::Layout {
                layout,
                message: format!(
                    "image code {c} at position {i} is outside the codebook [0, {})",
                    t.codebook_size
                ),
            })
        })
        .collect()
}

fn text_sample(ids: Vec<u32>, prompt_len: usize, truncated: bool, kind: LayoutKind) -> Sample {
    let l = ids.len();
    let prompt_len = prompt_len.min(l);
    Sample {
        kind,
        labels: ids.iter().map(|&x| i64::from(x)).collect(),
        prompt_mask: (0..l).map(|i| i < prompt_len).collect(),
        prompt_len,
        answer_len: l - prompt_len,
        attention_mask: vec![true; l],
        truncated,
        ids,
    }
}

/// EOS-terminates and fits `text` (BOS already applied) to `max_len`: append EOS; if it
/// fits, right-pad with EOS to `max_len` when `pad`; otherwise cut to `max_len` without
/// forcing EOS (upstream `lm_prompt` / `lm_chat_prompt`).
fn fit_eos(mut v: Vec<u32>, max_len: usize, pad: bool, t: &TokenLayout) -> (Vec<u32>, bool) {
    v.push(t.eos_id);
    if v.len() <= max_len {
        if pad {
            v.resize(max_len, t.eos_id);
        }
        (v, false)
    } else {
        v.truncate(max_len);
        (v, true)
    }
}

/// (a) Pure-text LM (`lm_prompt`): `[BOS] text [EOS] [EOS]*pad`, cut to `max_len` without
/// EOS when too long. Labels = ids; full attention; prompt length 0; answer length `L`.
///
/// `pad`: right-pad to `max_len` (`Lseq`) here, as upstream; `false` leaves the padding
/// to the batcher.
pub fn lm_layout(text_ids: &[u32], max_len: usize, pad: bool, t: &TokenLayout) -> Sample {
    let (ids, truncated) = fit_eos(with_bos(text_ids, t), max_len, pad, t);
    text_sample(ids, 0, truncated, LayoutKind::Lm)
}

/// (b) Instruction chat (`lm_chat_prompt`) for chat-formatted text ids: like
/// [`lm_layout`], and the prompt is everything up to and including the *last*
/// `<|end_header_id|>` (prompt length 0 when there is none). The token after it (the
/// template's `\n`) is part of the answer, as upstream.
pub fn chat_layout(text_ids: &[u32], max_len: usize, pad: bool, t: &TokenLayout) -> Sample {
    let (ids, truncated) = fit_eos(with_bos(text_ids, t), max_len, pad, t);
    let prompt_len = last_end_header(&ids, t).map_or(0, |p| p + 1);
    text_sample(ids, prompt_len, truncated, LayoutKind::Chat)
}

/// (f) LLaDA SFT (`GUIDELINES.md`): `<BOS> prompt answer <EOS> <EOS>*pad` with an explicit
/// prompt length (= BOS + prompt ids). EOS padding is part of the answer. When too long
/// the answer is cut at `max_len` (no EOS forced); a prompt that leaves no room for one
/// answer token is an error.
pub fn sft_layout(
    prompt_ids: &[u32],
    answer_ids: &[u32],
    max_len: usize,
    pad: bool,
    t: &TokenLayout,
) -> Result<Sample> {
    let mut v = with_bos(prompt_ids, t);
    let prompt_len = v.len();
    if prompt_len >= max_len {
        return Err(DataError::Layout {
            layout: "sft",
            message: format!(
                "prompt of {prompt_len} tokens leaves no room for the answer in max_len {max_len}"
            ),
        });
    }
    v.extend_from_slice(answer_ids);
    let (ids, truncated) = fit_eos(v, max_len, pad, t);
    Ok(text_sample(ids, prompt_len, truncated, LayoutKind::Chat))
}

/// (c) Text-to-image (`t2i_prompt`), `P` = `max_seq_length`:
/// `[iPAD]*k <|t2i|> <BOS> caption <EOS>` (exactly `P+1` tokens; too long → cut to `P`
/// and `<EOS>` forced) then `<|soi|> img_1..img_N <|eoi|>`; length `P+1+1+N+1`.
///
/// * `drop_caption`: condition dropout (CFG): the text becomes `<|t2i|> <BOS> <EOS>`.
/// * Attention: `false` on `[iPAD]`. Labels: ids, `[iPAD]` → −100 (the forward process
///   later sets −100 on unmasked image positions).
/// * Prompt mask: `true` everywhere except the `N` image positions; `prompt_len` = `P+2`
///   (text + `<|soi|>`), `answer_len` = `N`.
pub fn t2i_layout(
    caption_ids: &[u32],
    image_codes: &[u32],
    p: usize,
    drop_caption: bool,
    t: &TokenLayout,
) -> Result<Sample> {
    let max_text_len = p + 1;
    let mut temp = vec![t.t2i_id];
    if drop_caption {
        temp.extend([t.bos_id, t.eos_id]);
    } else {
        temp.extend(with_bos(caption_ids, t));
        temp.push(t.eos_id);
    }
    let (text, n_pad, truncated) = if temp.len() <= max_text_len {
        let k = max_text_len - temp.len();
        let mut v = vec![t.ipad_id; k];
        v.extend(temp);
        (v, k, false)
    } else {
        temp.truncate(max_text_len - 1);
        temp.push(t.eos_id);
        (temp, 0, true)
    };
    let img = image_tokens(image_codes, t, "t2i")?;
    let n = img.len();
    let mut ids = text;
    ids.push(t.soi_id);
    ids.extend(img);
    ids.push(t.eoi_id);
    let l = ids.len();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| if i < n_pad { IGNORE_ID } else { i64::from(x) })
        .collect();
    let image_range = (max_text_len + 1)..(max_text_len + 1 + n);
    Ok(Sample {
        kind: LayoutKind::T2i,
        labels,
        prompt_mask: (0..l).map(|i| !image_range.contains(&i)).collect(),
        prompt_len: max_text_len + 1,
        answer_len: n,
        attention_mask: (0..l).map(|i| i >= n_pad).collect(),
        truncated,
        ids,
    })
}

/// A t2i sample with its caption replaced by the empty (null) prompt `<|t2i|> <BOS> <EOS>`,
/// same image codes, same length: the unconditional row of condition dropout (upstream
/// `t2i_prompt` with `''`, spec §2.4 c). `p` is `max_seq_length`.
///
/// # Errors
/// [`DataError::Layout`] when `s` is not a t2i sample or its image block holds a non-image id.
pub fn drop_caption(s: &Sample, p: usize, t: &TokenLayout) -> Result<Sample> {
    if s.kind != LayoutKind::T2i {
        return Err(DataError::Layout {
            layout: "t2i",
            message: format!("caption dropout: a {:?} sample has no caption", s.kind),
        });
    }
    let codes: Vec<u32> = s
        .ids
        .iter()
        .zip(&s.prompt_mask)
        .filter(|(_, prompt)| !**prompt)
        .map(|(&id, _)| {
            t.image_code(id).ok_or_else(|| DataError::Layout {
                layout: "t2i",
                message: format!("caption dropout: id {id} in the image block is no image token"),
            })
        })
        .collect::<Result<_>>()?;
    t2i_layout(&[], &codes, p, true, t)
}

/// How the text of an mmu row is split into prompt and answer.
#[derive(Debug, Clone, Copy)]
pub enum TextSplit<'a> {
    /// Chat-formatted ids; the prompt ends at the last `<|end_header_id|>` (upstream).
    LastEndHeader(&'a [u32]),
    /// Prompt and answer ids given separately (pre-tokenized data).
    Explicit {
        /// Prompt ids (BOS is prepended if missing).
        prompt: &'a [u32],
        /// Answer ids.
        answer: &'a [u32],
    },
}

/// (d) Multimodal understanding (`mmu_prompt`), `P` = `max_seq_length`:
/// `<|mmu|> <|soi|> img_1..img_N <|eoi|>` (`N+3`) then `<BOS> text <EOS> <EOS>*pad`
/// (exactly `P` tokens; too long → cut to `P−1` and `<EOS>` forced).
///
/// Prompt mask: the image block and the text up to the last `<|end_header_id|>` (or the
/// explicit prompt). Labels: −100 on the image block, ids elsewhere. Full attention.
pub fn mmu_layout(
    image_codes: &[u32],
    text: TextSplit<'_>,
    p: usize,
    t: &TokenLayout,
) -> Result<Sample> {
    let (mut v, explicit_prompt) = match text {
        TextSplit::LastEndHeader(ids) => (with_bos(ids, t), None),
        TextSplit::Explicit { prompt, answer } => {
            let mut v = with_bos(prompt, t);
            let pl = v.len();
            v.extend_from_slice(answer);
            (v, Some(pl))
        }
    };
    v.push(t.eos_id);
    let truncated = v.len() > p;
    if truncated {
        v.truncate(p.saturating_sub(1));
        v.push(t.eos_id);
    } else {
        v.resize(p, t.eos_id);
    }
    let img = image_tokens(image_codes, t, "mmu")?;
    let head = img.len() + 3;
    let text_prompt = match explicit_prompt {
        Some(pl) => pl.min(v.len()),
        None => last_end_header(&v, t).map_or(0, |pos| pos + 1),
    };
    let mut ids = Vec::with_capacity(head + v.len());
    ids.push(t.mmu_id);
    ids.push(t.soi_id);
    ids.extend(img);
    ids.push(t.eoi_id);
    ids.extend(&v);
    let l = ids.len();
    let prompt_len = head + text_prompt;
    Ok(Sample {
        kind: LayoutKind::Mmu,
        labels: ids
            .iter()
            .enumerate()
            .map(|(i, &x)| if i < head { IGNORE_ID } else { i64::from(x) })
            .collect(),
        prompt_mask: (0..l).map(|i| i < prompt_len).collect(),
        prompt_len,
        answer_len: l - prompt_len,
        attention_mask: vec![true; l],
        truncated,
        ids,
    })
}

/// (d, inference) `mmu` generation prompt (`inference_mmu.py`): `<|mmu|> <|soi|> img
/// <|eoi|>` + the chat-template ids with BOS prepended, no padding; all prompt.
pub fn mmu_generation_prompt(
    image_codes: &[u32],
    chat_ids: &[u32],
    t: &TokenLayout,
) -> Result<Vec<u32>> {
    let mut ids = vec![t.mmu_id, t.soi_id];
    ids.extend(image_tokens(image_codes, t, "mmu")?);
    ids.push(t.eoi_id);
    ids.extend(with_bos(chat_ids, t));
    Ok(ids)
}
