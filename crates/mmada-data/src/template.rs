//! Chat templates (spec §2.1) and the mixed long-CoT instruction (spec §2.4 e).
//!
//! Templates render *text*; BOS is not part of the rendered text because every layout
//! prepends the BOS id itself (upstream `UniversalPrompting`: "BOS prepended if missing").

use serde::{Deserialize, Serialize};

use crate::example::{Example, Message, Role};

/// The fixed instruction that starts the user turn of mixed long-CoT data (spec §2.4 e;
/// MMaDA `app.py` "Thinking Mode", `lm_chat_validation/questions.jsonl`).
pub const COT_INSTRUCTION: &str = "You should first think about the reasoning process in the mind and then provide the user with the answer. The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here\n";

/// A chat template as configurable strings.
///
/// Per message: `header` with `{role}` replaced, then the (trimmed) content, then
/// `turn_end`. The generation prompt is `header` with role `assistant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    /// Turn header, `{role}` is replaced (`<|start_header_id|>{role}<|end_header_id|>\n`).
    pub header: String,
    /// End of a turn (`<|eot_id|>`).
    pub turn_end: String,
    /// Trim message content (Jinja `| trim`).
    pub trim: bool,
    /// Instruction prepended to the first user turn of `cot` examples.
    pub cot_instruction: String,
    /// Assistant answer of `cot` examples; `{reasoning}` and `{answer}` are replaced.
    /// **[UNVERIFIED]** spacing: the MMaDA CoT data is not public; this follows the
    /// instruction text `<think> reasoning process here </think> answer here`.
    pub cot_answer: String,
}

impl ChatTemplate {
    /// MMaDA variant: single `\n` after `<|end_header_id|>` (spec §2.1; `generate.py`,
    /// `app.py`, training strings).
    pub fn mmada() -> Self {
        Self {
            header: "<|start_header_id|>{role}<|end_header_id|>\n".into(),
            turn_end: "<|eot_id|>".into(),
            trim: true,
            cot_instruction: COT_INSTRUCTION.into(),
            cot_answer: "<think> {reasoning} </think> {answer}".into(),
        }
    }

    /// LLaDA-8B-Instruct variant: `\n\n` after `<|end_header_id|>` (its
    /// `tokenizer_config.json` `chat_template`).
    pub fn llada() -> Self {
        Self {
            header: "<|start_header_id|>{role}<|end_header_id|>\n\n".into(),
            ..Self::mmada()
        }
    }

    /// The header of one role.
    pub fn header_for(&self, role: Role) -> String {
        self.header.replace("{role}", role.as_str())
    }

    /// Renders the turns, then the generation prompt (assistant header) when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut s = String::new();
        for m in messages {
            s.push_str(&self.header_for(m.role));
            s.push_str(if self.trim {
                m.content.trim()
            } else {
                &m.content
            });
            s.push_str(&self.turn_end);
        }
        if add_generation_prompt {
            s.push_str(&self.header_for(Role::Assistant));
        }
        s
    }

    /// Splits an example into (prompt text, answer text) for chat-style layouts:
    ///
    /// * `messages`: all turns before the last assistant turn + the generation prompt /
    ///   the last assistant content;
    /// * `question` (+ `reasoning`) + `answer`: one user turn / the answer; with `cot` the
    ///   user turn starts with [`ChatTemplate::cot_instruction`] and the answer is
    ///   [`ChatTemplate::cot_answer`] (spec §2.4 e);
    /// * `text` only: the text is already chat-formatted → (text, "").
    ///
    /// Returns `None` when the example has none of these.
    pub fn prompt_and_answer(&self, ex: &Example, cot: bool) -> Option<(String, String)> {
        if !ex.messages.is_empty() {
            let last_asst = ex.messages.iter().rposition(|m| m.role == Role::Assistant);
            let (turns, answer) = match last_asst {
                Some(k) => (&ex.messages[..k], ex.messages[k].content.clone()),
                None => (&ex.messages[..], String::new()),
            };
            let mut turns = turns.to_vec();
            if cot && let Some(first) = turns.iter_mut().find(|m| m.role == Role::User) {
                first.content = format!("{}{}", self.cot_instruction, first.content.trim());
            }
            let answer = if self.trim {
                answer.trim().to_string()
            } else {
                answer
            };
            return Some((self.render(&turns, true), answer));
        }
        if let Some(q) = &ex.question {
            let q = if cot {
                format!("{}{}", self.cot_instruction, q.trim())
            } else {
                q.clone()
            };
            let prompt = self.render(
                &[Message {
                    role: Role::User,
                    content: q,
                }],
                true,
            );
            let answer = ex.answer.clone().unwrap_or_default();
            let answer = match (&ex.reasoning, cot) {
                (Some(r), true) => self
                    .cot_answer
                    .replace("{reasoning}", r.trim())
                    .replace("{answer}", answer.trim()),
                (Some(r), false) => format!("{}\n{}", r.trim(), answer.trim()),
                (None, _) => answer.trim().to_string(),
            };
            return Some((prompt, answer));
        }
        ex.text.as_ref().map(|t| (t.clone(), String::new()))
    }
}

impl Default for ChatTemplate {
    fn default() -> Self {
        Self::mmada()
    }
}
