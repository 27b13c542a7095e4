//! Built-in rewards. Each has a `Params` struct (the `params:` map of a [`crate::RewardSpec`],
//! unknown keys rejected) and a constructor validating it.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::extract::{AnswerFormat, answers_match, extract_answer};
use crate::{Reward, RewardError, RewardInput};

/// `kind: math_correctness` — 1.0 if the completion's final answer equals the reference
/// answer field, 0.0 otherwise (spec §5.1: "+2.0 if the final answer is right", the 2.0 being
/// the default weight). `None` when the item has no reference field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MathCorrectnessParams {
    /// Example field holding the reference (default `answer`; GSM8K's `answer` ends with
    /// `#### n`, MATH-500's `answer` is the bare answer).
    #[serde(default = "default_answer_field")]
    pub answer_field: String,
    /// How to read the reference field (default `auto`: `####`, `\boxed{}`, else the raw text).
    #[serde(default = "default_reference_format")]
    pub reference_format: AnswerFormat,
    /// How to read the completion (default `auto`, see [`crate::extract::completion_answer`]).
    #[serde(default)]
    pub completion_format: AnswerFormat,
    /// Score completions that did not terminate (no EOS within the budget) as wrong
    /// (dLLM-RL forces responses at the length cap to incorrect). Default false.
    #[serde(default)]
    pub unterminated_is_wrong: bool,
}

fn default_answer_field() -> String {
    "answer".into()
}
fn default_reference_format() -> AnswerFormat {
    AnswerFormat::Auto
}

impl Default for MathCorrectnessParams {
    fn default() -> Self {
        Self {
            answer_field: default_answer_field(),
            reference_format: AnswerFormat::Auto,
            completion_format: AnswerFormat::Auto,
            unterminated_is_wrong: false,
        }
    }
}

/// Math correctness reward, see [`MathCorrectnessParams`].
#[derive(Debug, Clone, Default)]
pub struct MathCorrectness {
    /// Parameters.
    pub params: MathCorrectnessParams,
}

impl MathCorrectness {
    /// The reference answer of an item, `None` if the field is missing.
    pub fn reference(&self, item: &RewardInput) -> Option<String> {
        let raw = item.field_str(&self.params.answer_field)?;
        match self.params.reference_format {
            AnswerFormat::Auto => {
                if raw.contains("####") {
                    crate::extract::gsm8k_answer(&raw)
                } else if raw.contains("\\boxed") || raw.contains("\\fbox") {
                    crate::extract::boxed_answer(&raw)
                } else {
                    Some(raw.trim().to_string())
                }
            }
            f => extract_answer(&raw, f),
        }
    }
}

impl Reward for MathCorrectness {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(batch
            .iter()
            .map(|item| {
                let reference = self.reference(item)?;
                if self.params.unterminated_is_wrong && !item.terminated {
                    return Some(0.0);
                }
                let ok = extract_answer(&item.completion, self.params.completion_format)
                    .is_some_and(|p| answers_match(&p, &reference));
                Some(if ok { 1.0 } else { 0.0 })
            })
            .collect())
    }
}

/// `kind: think_format` — 1.0 if the completion follows `<think>…</think>answer` (spec §5.1:
/// "+0.5 if the response follows the `<think>…</think>` format", 0.5 = default weight).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThinkFormatParams {
    /// The completion must start with `<think>` (leading whitespace allowed). Default true.
    #[serde(default = "yes")]
    pub require_start: bool,
    /// Non-empty text must follow `</think>`. Default true.
    #[serde(default = "yes")]
    pub require_answer: bool,
    /// Opening tag (default `<think>`).
    #[serde(default = "default_open")]
    pub open: String,
    /// Closing tag (default `</think>`).
    #[serde(default = "default_close")]
    pub close: String,
}

fn yes() -> bool {
    true
}
fn default_open() -> String {
    "<think>".into()
}
fn default_close() -> String {
    "</think>".into()
}

impl Default for ThinkFormatParams {
    fn default() -> Self {
        Self {
            require_start: true,
            require_answer: true,
            open: default_open(),
            close: default_close(),
        }
    }
}

/// Format reward, see [`ThinkFormatParams`].
#[derive(Debug, Clone, Default)]
pub struct ThinkFormat {
    /// Parameters.
    pub params: ThinkFormatParams,
}

impl ThinkFormat {
    /// Whether one completion is well formed: exactly one open and one close tag, in order,
    /// non-empty reasoning, and the start / answer conditions of the parameters.
    pub fn well_formed(&self, completion: &str) -> bool {
        let p = &self.params;
        let t = completion.trim();
        if t.matches(p.open.as_str()).count() != 1 || t.matches(p.close.as_str()).count() != 1 {
            return false;
        }
        let (Some(o), Some(c)) = (t.find(p.open.as_str()), t.find(p.close.as_str())) else {
            return false;
        };
        if c < o || t[o + p.open.len()..c].trim().is_empty() {
            return false;
        }
        if p.require_start && o != 0 {
            return false;
        }
        !(p.require_answer && t[c + p.close.len()..].trim().is_empty())
    }
}

impl Reward for ThinkFormat {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(batch
            .iter()
            .map(|i| {
                Some(if self.well_formed(&i.completion) {
                    1.0
                } else {
                    0.0
                })
            })
            .collect())
    }
}

/// Unit of [`LengthParams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthUnit {
    /// `completion_ids.len()`.
    #[default]
    Tokens,
    /// Unicode characters of the completion text.
    Chars,
}

/// `kind: length` — 1.0 inside `[min, max]`, decaying linearly to 0 over `margin` units
/// outside (a hard 0/1 when `margin` is 0).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthParams {
    /// Lower bound (default 0).
    #[serde(default)]
    pub min: usize,
    /// Upper bound (required).
    pub max: usize,
    /// Linear decay width outside the range (default 0).
    #[serde(default)]
    pub margin: usize,
    /// `tokens` (default) or `chars`.
    #[serde(default)]
    pub unit: LengthUnit,
}

/// Length reward, see [`LengthParams`].
#[derive(Debug, Clone)]
pub struct LengthReward {
    /// Parameters.
    pub params: LengthParams,
}

impl LengthReward {
    /// Validated constructor (`min <= max`).
    pub fn new(params: LengthParams) -> Result<Self, RewardError> {
        if params.min > params.max {
            return Err(RewardError::Config {
                key: "params.min".into(),
                message: format!("min {} > max {}: need min <= max", params.min, params.max),
            });
        }
        Ok(Self { params })
    }

    /// Score of a length.
    pub fn score_len(&self, len: usize) -> f32 {
        let p = &self.params;
        let dist = if len < p.min {
            p.min - len
        } else if len > p.max {
            len - p.max
        } else {
            return 1.0;
        };
        if p.margin == 0 {
            0.0
        } else {
            (1.0 - dist as f32 / p.margin as f32).max(0.0)
        }
    }
}

impl Reward for LengthReward {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(batch
            .iter()
            .map(|i| {
                let len = match self.params.unit {
                    LengthUnit::Tokens => i.completion_ids.len(),
                    LengthUnit::Chars => i.completion.chars().count(),
                };
                Some(self.score_len(len))
            })
            .collect())
    }
}

/// `kind: regex` — 1.0 if `pattern` matches the completion (search, not full match).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexParams {
    /// Rust `regex` syntax; `(?s)` for `.` across lines.
    pub pattern: String,
    /// Require the whole (trimmed) completion to match. Default false.
    #[serde(default)]
    pub full_match: bool,
}

/// Regex reward, see [`RegexParams`].
#[derive(Debug, Clone)]
pub struct RegexMatch {
    re: Regex,
}

impl RegexMatch {
    /// Compiles the pattern (error names `params.pattern`).
    pub fn new(params: RegexParams) -> Result<Self, RewardError> {
        let pat = if params.full_match {
            format!(r"\A(?:{})\z", params.pattern)
        } else {
            params.pattern.clone()
        };
        let re = Regex::new(&pat).map_err(|e| RewardError::Config {
            key: "params.pattern".into(),
            message: format!("invalid regex: {e}"),
        })?;
        Ok(Self { re })
    }
}

impl Reward for RegexMatch {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(batch
            .iter()
            .map(|i| {
                Some(if self.re.is_match(i.completion.trim()) {
                    1.0
                } else {
                    0.0
                })
            })
            .collect())
    }
}

/// `kind: exact_match` — 1.0 if the (final answer of the) completion equals field `field`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactMatchParams {
    /// Example field with the target (default `answer`).
    #[serde(default = "default_answer_field")]
    pub field: String,
    /// Compare only the text after the last `</think>`. Default true.
    #[serde(default = "yes")]
    pub strip_think: bool,
    /// Case-insensitive comparison. Default false.
    #[serde(default)]
    pub ignore_case: bool,
}

/// Exact-match reward, see [`ExactMatchParams`]. `None` when the field is missing.
#[derive(Debug, Clone)]
pub struct ExactMatch {
    /// Parameters.
    pub params: ExactMatchParams,
}

impl Reward for ExactMatch {
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f32>>, RewardError> {
        Ok(batch
            .iter()
            .map(|i| {
                let target = i.field_str(&self.params.field)?;
                let c = if self.params.strip_think {
                    crate::extract::strip_think(&i.completion)
                } else {
                    &i.completion
                };
                let (a, b) = (c.trim(), target.trim());
                let eq = if self.params.ignore_case {
                    a.to_lowercase() == b.to_lowercase()
                } else {
                    a == b
                };
                Some(if eq { 1.0 } else { 0.0 })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(completion: &str, answer: Option<&str>) -> RewardInput {
        let mut fields = serde_json::Map::new();
        if let Some(a) = answer {
            fields.insert("answer".into(), a.into());
        }
        RewardInput {
            completion: completion.into(),
            completion_ids: vec![1; completion.split_whitespace().count()],
            terminated: true,
            fields,
            ..Default::default()
        }
    }

    #[test]
    fn think_format_cases() {
        let f = ThinkFormat::default();
        assert!(f.well_formed("<think>add 2 and 2</think> 4"));
        assert!(f.well_formed("  <think>\nx\n</think>\n\\boxed{4}"));
        assert!(!f.well_formed("4 <think>x</think> 4"));
        assert!(!f.well_formed("<think>x</think>"));
        assert!(!f.well_formed("<think></think> 4"));
        assert!(!f.well_formed("</think>x<think> 4"));
        assert!(!f.well_formed("<think>a</think><think>b</think> 4"));
        assert!(!f.well_formed("no tags"));
    }

    #[test]
    fn length_cases() {
        let r = LengthReward::new(LengthParams {
            min: 2,
            max: 4,
            margin: 2,
            unit: LengthUnit::Tokens,
        })
        .unwrap();
        assert_eq!(r.score_len(3), 1.0);
        assert_eq!(r.score_len(5), 0.5);
        assert_eq!(r.score_len(1), 0.5);
        assert_eq!(r.score_len(10), 0.0);
        assert!(
            LengthReward::new(LengthParams {
                min: 5,
                max: 4,
                margin: 0,
                unit: LengthUnit::Chars
            })
            .is_err()
        );
    }

    #[test]
    fn regex_and_exact() {
        let r = RegexMatch::new(RegexParams {
            pattern: r"\\boxed\{\d+\}".into(),
            full_match: false,
        })
        .unwrap();
        let s = r
            .score(&[item(r"so \boxed{12}", None), item("12", None)])
            .unwrap();
        assert_eq!(s, vec![Some(1.0), Some(0.0)]);
        let full = RegexMatch::new(RegexParams {
            pattern: r"\d+".into(),
            full_match: true,
        })
        .unwrap();
        assert_eq!(
            full.score(&[item("12", None), item("12 apples", None)])
                .unwrap(),
            vec![Some(1.0), Some(0.0)]
        );
        let e = ExactMatch {
            params: ExactMatchParams {
                field: "answer".into(),
                strip_think: true,
                ignore_case: true,
            },
        };
        assert_eq!(
            e.score(&[
                item("<think>hmm</think> Paris", Some("paris")),
                item("Lyon", Some("Paris")),
                item("Paris", None)
            ])
            .unwrap(),
            vec![Some(1.0), Some(0.0), None]
        );
        assert!(
            RegexMatch::new(RegexParams {
                pattern: "(".into(),
                full_match: false
            })
            .is_err()
        );
    }

    #[test]
    fn correctness_unterminated_and_missing() {
        let m = MathCorrectness {
            params: MathCorrectnessParams {
                unterminated_is_wrong: true,
                ..Default::default()
            },
        };
        let mut cut = item("The answer is 18", Some("#### 18"));
        cut.terminated = false;
        let s = m
            .score(&[
                item("The answer is 18", Some("#### 18")),
                cut,
                item("18", None),
            ])
            .unwrap();
        assert_eq!(s, vec![Some(1.0), Some(0.0), None]);
    }
}
