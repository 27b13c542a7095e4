//! Reward registry (`kind` → constructor + default weight), reward sets and score breakdowns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::builtin::{
    ExactMatch, ExactMatchParams, LengthParams, LengthReward, MathCorrectness,
    MathCorrectnessParams, RegexMatch, RegexParams, ThinkFormat, ThinkFormatParams,
};
use crate::http::{HttpParams, HttpReward};
use crate::image::{ImageBrightness, ImageBrightnessParams, ImageColor, ImageColorParams};
use crate::{Reward, RewardError, RewardInput};

/// One entry of a recipe's `reward_funcs:` list.
///
/// ```yaml
/// reward_funcs:
///   - kind: math_correctness        # weight 2.0 by default (paper)
///   - kind: think_format            # weight 0.5 by default (paper)
///   - kind: http
///     name: clip
///     weight: 0.1
///     params: {url: "http://localhost:8000/clip", timeout_s: 30}
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// Registered kind (`math_correctness`, `think_format`, `length`, `regex`, `exact_match`,
    /// `http`, `image_color`, `caption_color`, `image_brightness`, or a custom one).
    pub kind: String,
    /// Name used in metrics (`rewards/<name>/mean`); defaults to `kind`. Must be unique.
    #[serde(default)]
    pub name: Option<String>,
    /// Weight in the total reward; defaults to the kind's default weight.
    #[serde(default)]
    pub weight: Option<f32>,
    /// Kind-specific parameters (unknown keys rejected by each kind).
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

impl RewardSpec {
    /// A spec of `kind` with default name, weight and parameters.
    pub fn new(kind: &str) -> Self {
        Self {
            kind: kind.into(),
            name: None,
            weight: None,
            params: Default::default(),
        }
    }
}

/// Constructor of a reward kind from its `params` map.
pub type RewardFactory = Box<
    dyn Fn(&serde_json::Map<String, serde_json::Value>) -> Result<Box<dyn Reward>, RewardError>
        + Send
        + Sync,
>;

struct Entry {
    factory: RewardFactory,
    default_weight: f32,
}

/// `kind` → constructor and default weight.
pub struct RewardRegistry {
    kinds: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for RewardRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardRegistry")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<T, RewardError> {
    serde_json::from_value(serde_json::Value::Object(params.clone())).map_err(|e| {
        RewardError::Config {
            key: "params".into(),
            message: e.to_string(),
        }
    })
}

impl Default for RewardRegistry {
    fn default() -> Self {
        Self::with_builtins()
    }
}

impl RewardRegistry {
    /// An empty registry.
    pub fn empty() -> Self {
        Self {
            kinds: BTreeMap::new(),
        }
    }

    /// The built-in kinds with the paper's default weights (spec §5.1): `math_correctness`
    /// 2.0, `think_format` 0.5; `length`, `regex`, `exact_match`, `http`, `image_color`,
    /// `caption_color`, `image_brightness` 1.0.
    pub fn with_builtins() -> Self {
        let mut r = Self::empty();
        r.register("math_correctness", 2.0, |p| {
            let params: MathCorrectnessParams = parse(p)?;
            Ok(Box::new(MathCorrectness { params }))
        });
        r.register("think_format", 0.5, |p| {
            let params: ThinkFormatParams = parse(p)?;
            Ok(Box::new(ThinkFormat { params }))
        });
        r.register("length", 1.0, |p| {
            Ok(Box::new(LengthReward::new(parse::<LengthParams>(p)?)?))
        });
        r.register("regex", 1.0, |p| {
            Ok(Box::new(RegexMatch::new(parse::<RegexParams>(p)?)?))
        });
        r.register("exact_match", 1.0, |p| {
            let params: ExactMatchParams = parse(p)?;
            Ok(Box::new(ExactMatch { params }))
        });
        r.register("http", 1.0, |p| {
            Ok(Box::new(HttpReward::new(parse::<HttpParams>(p)?)?))
        });
        r.register("image_color", 1.0, |p| {
            Ok(Box::new(ImageColor::fixed(parse::<ImageColorParams>(p)?)?))
        });
        r.register("caption_color", 1.0, |p| {
            Ok(Box::new(ImageColor::from_caption(parse::<
                ImageColorParams,
            >(p)?)?))
        });
        r.register("image_brightness", 1.0, |p| {
            Ok(Box::new(ImageBrightness::new(parse::<
                ImageBrightnessParams,
            >(p)?)?))
        });
        r
    }

    /// Registers (or replaces) a kind.
    pub fn register<F>(&mut self, kind: &str, default_weight: f32, factory: F)
    where
        F: Fn(&serde_json::Map<String, serde_json::Value>) -> Result<Box<dyn Reward>, RewardError>
            + Send
            + Sync
            + 'static,
    {
        self.kinds.insert(
            kind.to_string(),
            Entry {
                factory: Box::new(factory),
                default_weight,
            },
        );
    }

    /// Registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        self.kinds.keys().map(String::as_str).collect()
    }

    /// Default weight of a kind.
    pub fn default_weight(&self, kind: &str) -> Option<f32> {
        self.kinds.get(kind).map(|e| e.default_weight)
    }

    /// Builds the rewards of `specs`; errors name `<key>[i].…` (pass `"reward_funcs"`).
    pub fn build(&self, key: &str, specs: &[RewardSpec]) -> Result<RewardSet, RewardError> {
        if specs.is_empty() {
            return Err(RewardError::Config {
                key: key.into(),
                message: format!(
                    "empty: give at least one reward, e.g. `- kind: math_correctness`; valid kinds: {}",
                    self.kinds().join(", ")
                ),
            });
        }
        let mut entries: Vec<WeightedReward> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let entry = self
                .kinds
                .get(&spec.kind)
                .ok_or_else(|| RewardError::UnknownKind {
                    key: format!("{key}[{i}].kind"),
                    kind: spec.kind.clone(),
                    valid: self.kinds().join(", "),
                })?;
            let weight = spec.weight.unwrap_or(entry.default_weight);
            if !weight.is_finite() {
                return Err(RewardError::Config {
                    key: format!("{key}[{i}].weight"),
                    message: format!("{weight} is invalid: need a finite number"),
                });
            }
            let name = spec.name.clone().unwrap_or_else(|| spec.kind.clone());
            if name.is_empty() || name.contains('/') {
                return Err(RewardError::Config {
                    key: format!("{key}[{i}].name"),
                    message: format!("`{name}` is invalid: need a non-empty name without `/`"),
                });
            }
            if entries.iter().any(|e| e.name == name) {
                return Err(RewardError::Config {
                    key: format!("{key}[{i}].name"),
                    message: format!(
                        "duplicate reward name `{name}`: give each `{}` entry a distinct `name:`",
                        spec.kind
                    ),
                });
            }
            let reward = (entry.factory)(&spec.params).map_err(|e| match e {
                RewardError::Config { key: k, message } => RewardError::Config {
                    key: format!("{key}[{i}].{k}"),
                    message,
                },
                other => other,
            })?;
            entries.push(WeightedReward {
                name,
                kind: spec.kind.clone(),
                weight,
                reward,
            });
        }
        Ok(RewardSet { entries })
    }
}

/// A built reward with its name and weight.
pub struct WeightedReward {
    /// Metric name.
    pub name: String,
    /// Registered kind.
    pub kind: String,
    /// Weight in the total.
    pub weight: f32,
    /// The reward.
    pub reward: Box<dyn Reward>,
}

/// The rewards of a run, scored together.
pub struct RewardSet {
    entries: Vec<WeightedReward>,
}

impl std::fmt::Debug for RewardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v: Vec<_> = self
            .entries
            .iter()
            .map(|e| (&e.name, &e.kind, e.weight))
            .collect();
        f.debug_struct("RewardSet").field("entries", &v).finish()
    }
}

impl RewardSet {
    /// A set from already built rewards.
    pub fn from_entries(entries: Vec<WeightedReward>) -> Self {
        Self { entries }
    }

    /// The entries in order.
    pub fn entries(&self) -> &[WeightedReward] {
        &self.entries
    }

    /// Scores `batch` with every reward. Errors if a reward returns the wrong number of scores
    /// or a non-finite score.
    pub fn score(&self, batch: &[RewardInput]) -> Result<RewardBreakdown, RewardError> {
        let n = batch.len();
        let mut per_reward = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let s = e.reward.score(batch)?;
            if s.len() != n {
                return Err(RewardError::LengthMismatch {
                    name: e.name.clone(),
                    got: s.len(),
                    expected: n,
                });
            }
            if let Some((index, v)) = s
                .iter()
                .enumerate()
                .find_map(|(i, v)| v.filter(|x| !x.is_finite()).map(|x| (i, x)))
            {
                return Err(RewardError::NonFinite {
                    name: e.name.clone(),
                    index,
                    value: v,
                });
            }
            per_reward.push(s);
        }
        let total = (0..n)
            .map(|i| {
                self.entries
                    .iter()
                    .zip(&per_reward)
                    .map(|(e, s)| s[i].map_or(0.0, |v| e.weight * v))
                    .sum()
            })
            .collect();
        Ok(RewardBreakdown {
            names: self.entries.iter().map(|e| e.name.clone()).collect(),
            weights: self.entries.iter().map(|e| e.weight).collect(),
            per_reward,
            total,
        })
    }
}

/// Mean and standard deviation of one reward over the items it applies to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardStats {
    /// Mean of the unweighted scores (TRL `rewards/<name>/mean`, a nanmean).
    pub mean: f32,
    /// Sample standard deviation (TRL `rewards/<name>/std`, `nanstd` with Bessel; 0 for one item).
    pub std: f32,
    /// Items it applied to.
    pub count: usize,
}

/// Per-reward scores of a batch and the weighted totals.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardBreakdown {
    /// Reward names, in recipe order.
    pub names: Vec<String>,
    /// Weights, in recipe order.
    pub weights: Vec<f32>,
    /// `per_reward[k][i]`: unweighted score of reward k on item i (`None` = not applicable).
    pub per_reward: Vec<Vec<Option<f32>>>,
    /// `total[i] = Σ_k weights[k]·per_reward[k][i]` over applicable k (0 if none applies).
    pub total: Vec<f32>,
}

impl RewardBreakdown {
    /// Statistics of reward k; `None` if it applied to no item.
    pub fn stats(&self, k: usize) -> Option<RewardStats> {
        let vals: Vec<f32> = self.per_reward.get(k)?.iter().flatten().copied().collect();
        if vals.is_empty() {
            return None;
        }
        let n = vals.len() as f32;
        let mean = vals.iter().sum::<f32>() / n;
        let std = if vals.len() > 1 {
            (vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Some(RewardStats {
            mean,
            std,
            count: vals.len(),
        })
    }

    /// Names of rewards that returned `None` for every item of the batch (to be reported, since
    /// they silently contribute nothing to the total).
    pub fn inapplicable(&self) -> Vec<&str> {
        self.names
            .iter()
            .zip(&self.per_reward)
            .filter(|(_, s)| !s.is_empty() && s.iter().all(Option::is_none))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Items for which no reward applied.
    pub fn unscored_items(&self) -> Vec<usize> {
        (0..self.total.len())
            .filter(|&i| self.per_reward.iter().all(|s| s[i].is_none()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(completion: &str, answer: &str) -> RewardInput {
        let mut fields = serde_json::Map::new();
        fields.insert("answer".into(), answer.into());
        RewardInput {
            completion: completion.into(),
            fields,
            ..Default::default()
        }
    }

    #[test]
    fn paper_defaults_and_total() {
        let reg = RewardRegistry::with_builtins();
        let set = reg
            .build(
                "reward_funcs",
                &[
                    RewardSpec::new("math_correctness"),
                    RewardSpec::new("think_format"),
                ],
            )
            .unwrap();
        let b = set
            .score(&[
                input(
                    "<think>16-3-4=9, 9*2=18</think> The answer is 18",
                    "#### 18",
                ),
                input("<think>x</think> 17", "#### 18"),
                input("18", "#### 18"),
            ])
            .unwrap();
        assert_eq!(b.weights, vec![2.0, 0.5]);
        assert_eq!(b.total, vec![2.5, 0.5, 2.0]);
        let s = b.stats(0).unwrap();
        assert!((s.mean - 2.0 / 3.0).abs() < 1e-6);
        assert!((s.std - 0.57735026).abs() < 1e-6);
        assert!(b.inapplicable().is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let reg = RewardRegistry::with_builtins();
        let e = reg
            .build("reward_funcs", &[RewardSpec::new("corectness")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reward_funcs[0].kind") && e.contains("math_correctness"),
            "{e}"
        );
        let mut bad = RewardSpec::new("regex");
        bad.params.insert("patern".into(), "x".into());
        let e = reg.build("reward_funcs", &[bad]).unwrap_err().to_string();
        assert!(
            e.contains("reward_funcs[0].params") && e.contains("pattern"),
            "{e}"
        );
        let mut bad = RewardSpec::new("regex");
        bad.params.insert("pattern".into(), "(".into());
        let e = reg.build("reward_funcs", &[bad]).unwrap_err().to_string();
        assert!(e.contains("reward_funcs[0].params.pattern"), "{e}");
        let e = reg
            .build(
                "reward_funcs",
                &[
                    RewardSpec::new("think_format"),
                    RewardSpec::new("think_format"),
                ],
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reward_funcs[1].name") && e.contains("duplicate"),
            "{e}"
        );
        assert!(reg.build("reward_funcs", &[]).is_err());
        let yaml_like: Result<RewardSpec, _> =
            serde_json::from_str(r#"{"kind": "length", "wieght": 1.0}"#);
        assert!(yaml_like.unwrap_err().to_string().contains("wieght"));
    }

    #[test]
    fn all_none_is_reported_and_custom_kinds() {
        let mut reg = RewardRegistry::with_builtins();
        reg.register("half", 0.25, |_| {
            Ok(Box::new(|b: &[RewardInput]| vec![Some(0.5); b.len()]))
        });
        let mut spec = RewardSpec::new("exact_match");
        spec.params.insert("field".into(), "missing".into());
        let set = reg
            .build("reward_funcs", &[spec, RewardSpec::new("half")])
            .unwrap();
        let b = set.score(&[input("a", "a"), input("b", "a")]).unwrap();
        assert_eq!(b.inapplicable(), vec!["exact_match"]);
        assert_eq!(b.stats(0), None);
        assert_eq!(b.total, vec![0.125, 0.125]);
        assert!(b.unscored_items().is_empty());
    }

    #[test]
    fn wrong_length_and_nan_are_errors() {
        let mut reg = RewardRegistry::empty();
        reg.register("short", 1.0, |_| {
            Ok(Box::new(|_: &[RewardInput]| vec![Some(1.0)]))
        });
        reg.register("nan", 1.0, |_| {
            Ok(Box::new(|b: &[RewardInput]| vec![Some(f32::NAN); b.len()]))
        });
        let two = [input("a", "a"), input("b", "b")];
        let set = reg.build("r", &[RewardSpec::new("short")]).unwrap();
        assert!(matches!(
            set.score(&two),
            Err(RewardError::LengthMismatch {
                got: 1,
                expected: 2,
                ..
            })
        ));
        let set = reg.build("r", &[RewardSpec::new("nan")]).unwrap();
        assert!(matches!(
            set.score(&two),
            Err(RewardError::NonFinite { .. })
        ));
    }
}
