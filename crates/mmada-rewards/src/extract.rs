//! Final-answer extraction and comparison for math benchmarks, shared by the UniGRPO
//! correctness reward and `mmada-infer eval`.
//!
//! * GSM8K: the reference solution ends with `#### <number>` (`openai/grade-school-math`,
//!   `dataset.py::extract_answer`); thousands separators are removed.
//! * MATH / MATH-500: the final answer is the content of the last `\boxed{…}` (Hendrycks
//!   `math_equivalence.py::last_boxed_only_string` + `remove_boxed`), compared after the
//!   `strip_string` normalisation of the same file ([`normalize_math_answer`]).
//! * Model outputs: [`completion_answer`] looks after the last `</think>` (MMaDA mixed long-CoT
//!   format, spec §5.1 rewards), then for `\boxed{}`, `####`, "the answer is", and finally the
//!   last number (the lm-eval GSM8K "flexible-extract" fallback).

use std::sync::LazyLock;

use regex::Regex;

static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+").expect("static regex")
});
static ANSWER_IS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:final answer|the answer)\s*(?:is|:)\s*:?\s*").expect("static regex")
});

/// The GSM8K answer after the last `####` (rest of that line), with `$`, `,` thousands
/// separators, surrounding whitespace and a trailing `.` removed. `None` if there is no `####`
/// or nothing follows it.
///
/// `"… 9 * 2 = $18 every day.\n#### 18"` → `Some("18")`; `"#### 1,000"` → `Some("1000")`.
pub fn gsm8k_answer(text: &str) -> Option<String> {
    let idx = text.rfind("####")?;
    let rest = text[idx + 4..].lines().next().unwrap_or("").trim();
    let cleaned: String = rest
        .chars()
        .filter(|c| *c != ',' && *c != '$')
        .collect::<String>()
        .trim()
        .trim_end_matches('.')
        .trim()
        .to_string();
    (!cleaned.is_empty()).then_some(cleaned)
}

/// The content of the last `\boxed{…}` (balanced braces) or `\fbox{…}`; also the braceless form
/// `\boxed 5` (up to the next `$` or whitespace), as Hendrycks `last_boxed_only_string`.
/// `None` if there is none or its braces are unbalanced.
pub fn boxed_answer(text: &str) -> Option<String> {
    let (idx, tag) = match (text.rfind("\\boxed"), text.rfind("\\fbox")) {
        (Some(a), Some(b)) if b > a => (b, "\\fbox"),
        (Some(a), _) => (a, "\\boxed"),
        (None, Some(b)) => (b, "\\fbox"),
        (None, None) => return None,
    };
    let rest = &text[idx + tag.len()..];
    if let Some(after_space) = rest.strip_prefix(' ') {
        let end = after_space
            .find(|c: char| c == '$' || c.is_whitespace())
            .unwrap_or(after_space.len());
        let s = after_space[..end].trim();
        return (!s.is_empty()).then(|| s.to_string());
    }
    let rest = rest.trim_start();
    let inner = rest.strip_prefix('{')?;
    let mut depth = 1usize;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(inner[..i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// The last number in `text` (`-1,234.5` → `"-1234.5"`), the flexible fallback extraction.
pub fn last_number(text: &str) -> Option<String> {
    NUMBER
        .find_iter(text)
        .last()
        .map(|m| m.as_str().replace(',', ""))
}

/// The text after the last `</think>`, or the whole text if there is none.
pub fn strip_think(text: &str) -> &str {
    match text.rfind("</think>") {
        Some(i) => &text[i + "</think>".len()..],
        None => text,
    }
}

/// How to extract the final answer from a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// `\boxed{}` if present, else `####`, else "the answer is …", else the last number.
    #[default]
    Auto,
    /// Only `####` ([`gsm8k_answer`]).
    Gsm8k,
    /// Only `\boxed{}` ([`boxed_answer`]).
    Boxed,
    /// Only the last number ([`last_number`]).
    LastNumber,
    /// The whole (trimmed) text, e.g. a MATH-500 `answer` field.
    Raw,
}

/// Extracts the final answer of `text` with `format`. For model completions the part after the
/// last `</think>` is searched first and the part before it second. `None` when nothing is found.
pub fn extract_answer(text: &str, format: AnswerFormat) -> Option<String> {
    let tail = strip_think(text);
    let try_one = |t: &str| -> Option<String> {
        match format {
            AnswerFormat::Gsm8k => gsm8k_answer(t),
            AnswerFormat::Boxed => boxed_answer(t),
            AnswerFormat::LastNumber => last_number(t),
            AnswerFormat::Raw => {
                let s = t.trim();
                (!s.is_empty()).then(|| s.to_string())
            }
            AnswerFormat::Auto => boxed_answer(t)
                .or_else(|| gsm8k_answer(t))
                .or_else(|| answer_is(t))
                .or_else(|| last_number(t)),
        }
    };
    try_one(tail).or_else(|| {
        // Fallback: the reasoning before the last `</think>`.
        text.rfind("</think>").and_then(|i| try_one(&text[..i]))
    })
}

/// The final answer of a model completion ([`extract_answer`] with [`AnswerFormat::Auto`]).
pub fn completion_answer(text: &str) -> Option<String> {
    extract_answer(text, AnswerFormat::Auto)
}

/// "The answer is X" / "Final answer: X" → X up to the end of the line (trailing `.` removed).
fn answer_is(text: &str) -> Option<String> {
    let m = ANSWER_IS.find_iter(text).last()?;
    let rest = text[m.end()..].lines().next().unwrap_or("").trim();
    let rest = rest.trim_end_matches('.').trim().trim_matches('$').trim();
    (!rest.is_empty()).then(|| rest.to_string())
}

/// Hendrycks MATH `strip_string` normalisation (`math_equivalence.py`), plus removal of
/// thousands separators in plain numbers, `\text{…}` wrappers and a trailing `.`:
/// line breaks, `\!`, `\left`/`\right`, degrees, `\$`, `\%`, units in `\text{ …}` at the end,
/// `tfrac`/`dfrac` → `frac`, leading `0` for `.5`, `x = ` prefixes (left side ≤ 2 chars),
/// `\sqrt3` → `\sqrt{3}`, spaces, `\frac12` → `\frac{1}{2}`, `0.5` → `\frac{1}{2}`,
/// `a/b` (integers) → `\frac{a}{b}`.
pub fn normalize_math_answer(answer: &str) -> String {
    let mut s = answer.trim().replace('\n', "").replace("\\!", "");
    s = s.replace("\\\\", "\\");
    s = s.replace("tfrac", "frac").replace("dfrac", "frac");
    s = s.replace("\\left", "").replace("\\right", "");
    s = s.replace("^{\\circ}", "").replace("^\\circ", "");
    s = s.replace("\\$", "").replace('$', "");
    s = remove_right_units(&s);
    s = s.replace("\\%", "").replace("\\%", "").replace('%', "");
    s = unwrap_text(&s);
    s = s.replace(" .", " 0.").replace("{.", "{0.");
    if s.is_empty() {
        return s;
    }
    if s.starts_with('.') {
        s = format!("0{s}");
    }
    // "x = 5" -> "5" (only short left-hand sides, as upstream)
    let parts: Vec<&str> = s.split('=').collect();
    if parts.len() == 2 && parts[0].trim().chars().count() <= 2 {
        s = parts[1].to_string();
    }
    s = fix_sqrt(&s);
    s = s.replace(' ', "");
    s = fix_fracs(&s);
    if s == "0.5" {
        s = "\\frac{1}{2}".to_string();
    }
    s = fix_a_slash_b(&s);
    let s = s.trim_end_matches('.').to_string();
    // Thousands separators in a plain number: "1,000" -> "1000".
    if NUMBER
        .find(&s)
        .is_some_and(|m| m.start() == 0 && m.end() == s.len())
    {
        return s.replace(',', "");
    }
    s
}

/// Whether a predicted answer matches the reference: equal after [`normalize_math_answer`], or
/// both numeric (plain numbers or `\frac{a}{b}`) and equal within `1e-6·max(1, |reference|)`.
pub fn answers_match(predicted: &str, reference: &str) -> bool {
    let p = normalize_math_answer(predicted);
    let r = normalize_math_answer(reference);
    if p.is_empty() || r.is_empty() {
        return false;
    }
    if p == r {
        return true;
    }
    match (numeric_value(&p), numeric_value(&r)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        _ => false,
    }
}

/// Value of a normalised plain number or `\frac{a}{b}` / `-\frac{a}{b}`.
fn numeric_value(s: &str) -> Option<f64> {
    if let Ok(v) = s.parse::<f64>() {
        return Some(v);
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let inner = body.strip_prefix("\\frac{")?;
    let (a, rest) = inner.split_once("}{")?;
    let b = rest.strip_suffix('}')?;
    let v = a.parse::<f64>().ok()? / b.parse::<f64>().ok()?;
    Some(if neg { -v } else { v })
}

/// `_remove_right_units`: drop a trailing `\text{ unit}` (upstream splits on `"\\text{ "`).
fn remove_right_units(s: &str) -> String {
    match s.find("\\text{ ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// `\text{abc}` / `\textbf{abc}` / `\mbox{abc}` → `abc`.
fn unwrap_text(s: &str) -> String {
    let mut out = s.to_string();
    for tag in ["\\textbf{", "\\text{", "\\mbox{", "\\mathrm{"] {
        while let Some(i) = out.find(tag) {
            let start = i + tag.len();
            let mut depth = 1usize;
            let mut end = None;
            for (j, c) in out[start..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(start + j);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let Some(end) = end else { break };
            out = format!("{}{}{}", &out[..i], &out[start..end], &out[end + 1..]);
        }
    }
    out
}

/// `_fix_sqrt`: `\sqrt3` → `\sqrt{3}` (one following character).
fn fix_sqrt(s: &str) -> String {
    if !s.contains("\\sqrt") {
        return s.to_string();
    }
    let mut parts = s.split("\\sqrt");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts {
        out.push_str("\\sqrt");
        match part.chars().next() {
            Some(c) if c != '{' => {
                out.push('{');
                out.push(c);
                out.push('}');
                out.push_str(&part[c.len_utf8()..]);
            }
            _ => out.push_str(part),
        }
    }
    out
}

/// `_fix_fracs`: `\frac12` → `\frac{1}{2}`, `\frac1{2}` → `\frac{1}{2}`.
fn fix_fracs(s: &str) -> String {
    let mut subs = s.split("\\frac");
    let mut out = subs.next().unwrap_or("").to_string();
    for sub in subs {
        out.push_str("\\frac");
        let chars: Vec<char> = sub.chars().collect();
        if chars.first() == Some(&'{') || chars.len() < 2 {
            out.push_str(sub);
            continue;
        }
        let a = chars[0];
        let b = chars[1];
        if b != '{' {
            out.push_str(&format!("{{{a}}}{{{b}}}"));
            out.extend(&chars[2..]);
        } else {
            out.push_str(&format!("{{{a}}}{b}"));
            out.extend(&chars[2..]);
        }
    }
    out
}

/// `_fix_a_slash_b`: `3/4` (both integers) → `\frac{3}{4}`.
fn fix_a_slash_b(s: &str) -> String {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() != 2 {
        return s.to_string();
    }
    match (parts[0].parse::<i64>(), parts[1].parse::<i64>()) {
        (Ok(a), Ok(b)) if parts[0] == a.to_string() && parts[1] == b.to_string() => {
            format!("\\frac{{{a}}}{{{b}}}")
        }
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_extraction() {
        assert_eq!(gsm8k_answer("so 18\n#### 18").as_deref(), Some("18"));
        assert_eq!(gsm8k_answer("#### $1,000.").as_deref(), Some("1000"));
        assert_eq!(gsm8k_answer("no marker"), None);
        assert_eq!(gsm8k_answer("####   "), None);
    }

    #[test]
    fn boxed_extraction() {
        assert_eq!(
            boxed_answer(r"so $\boxed{\frac{1}{2}}$.").as_deref(),
            Some(r"\frac{1}{2}")
        );
        assert_eq!(
            boxed_answer(r"\boxed{1} then \boxed{2}").as_deref(),
            Some("2")
        );
        assert_eq!(boxed_answer(r"$\boxed 7$").as_deref(), Some("7"));
        assert_eq!(boxed_answer(r"\fbox{x}").as_deref(), Some("x"));
        assert_eq!(boxed_answer(r"\boxed{unclosed"), None);
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_math_answer(r"\dfrac12"), r"\frac{1}{2}");
        assert_eq!(normalize_math_answer("0.5"), r"\frac{1}{2}");
        assert_eq!(normalize_math_answer("3/4"), r"\frac{3}{4}");
        assert_eq!(normalize_math_answer(r"x = 5"), "5");
        assert_eq!(normalize_math_answer(r"\sqrt3"), r"\sqrt{3}");
        assert_eq!(normalize_math_answer(r"90^\circ"), "90");
        assert_eq!(normalize_math_answer(r"\$1,000"), "1000");
        assert_eq!(normalize_math_answer(r"10\%"), "10");
        assert_eq!(normalize_math_answer(r"5 \text{ cm}"), "5");
        assert_eq!(normalize_math_answer(r"\text{(C)}"), "(C)");
        assert!(answers_match("18.0", "18"));
        assert!(answers_match(r"\frac{1}{4}", "0.25"));
        assert!(answers_match(
            r"\left( 3, \frac{\pi}{2} \right)",
            r"(3,\frac{\pi}{2})"
        ));
        assert!(!answers_match("17", "18"));
        assert!(!answers_match("", ""));
    }

    #[test]
    fn completion_answers() {
        let c = "<think>9 * 2 = 18, maybe 20</think> The answer is 18.";
        assert_eq!(completion_answer(c).as_deref(), Some("18"));
        assert_eq!(
            completion_answer(r"<think>x</think> so \boxed{p - q}").as_deref(),
            Some("p - q")
        );
        assert_eq!(
            completion_answer("I get 3 and then 1,234").as_deref(),
            Some("1234")
        );
        assert_eq!(completion_answer("no digits"), None);
        assert_eq!(
            extract_answer("<think>#### 5</think>nothing", AnswerFormat::Gsm8k).as_deref(),
            Some("5")
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
        ))]

        /// No extractor or normaliser panics on any text (multi-byte characters included).
        #[test]
        fn any_text_never_panics(t in any::<String>(), r in "[0-9a-z{}\\\\/. ,$#-]{0,24}") {
            for f in [AnswerFormat::Auto, AnswerFormat::Gsm8k, AnswerFormat::Boxed, AnswerFormat::LastNumber, AnswerFormat::Raw] {
                let _ = extract_answer(&t, f);
                let _ = extract_answer(&r, f);
            }
            let _ = normalize_math_answer(&t);
            let _ = normalize_math_answer(&r);
            let _ = answers_match(&t, &r);
            let _ = answers_match(&r, &t);
        }

        /// `#### n` at the end of a solution is found, whatever precedes it.
        #[test]
        fn gsm8k_marker(prefix in "[^#]{0,40}", n in any::<i64>()) {
            let text = format!("{prefix}\n#### {n}");
            prop_assert_eq!(gsm8k_answer(&text), Some(n.to_string()));
        }

        /// The content of the last `\boxed{…}` (balanced braces inside) is found.
        #[test]
        fn boxed_content(prefix in "[^\\\\]{0,30}", a in "[a-z0-9+^ ]{1,8}", b in "[a-z0-9]{0,4}", suffix in "[^\\\\]{0,20}") {
            let inner = format!("{a}{{{b}}}");
            let text = format!("{prefix}\\boxed{{{inner}}}{suffix}");
            prop_assert_eq!(boxed_answer(&text), Some(inner));
        }

        /// The last number after any text and a space is that number.
        #[test]
        fn last_number_is_found(t in any::<String>(), n in any::<i64>()) {
            let text = format!("{t} {n}");
            prop_assert_eq!(last_number(&text), Some(n.to_string()));
        }
    }
}
