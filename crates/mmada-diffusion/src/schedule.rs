//! MaskGIT mask-ratio schedules `γ(r)`, shared by training (t2i image masking,
//! `training/utils.py::mask_or_random_replace_tokens`) and sampling (`t2i_generate`,
//! `mmada-sampler` re-exports this type).

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::DiffusionError;

/// The MaskGIT mask-ratio schedule `γ(r)`: the fraction of image tokens that stay masked after
/// the step at progress `r = (s + 1) / S`.
///
/// Upstream: Gen-Verse/MMaDA `models/sampling.py` (`cosine_schedule`, `linear_schedule`, `pow`,
/// `sigmoid_schedule`, selected by `get_mask_schedule`). All are evaluated in **float32**, like
/// upstream (which calls them on `torch.tensor(ratio)`), because `floor(N · γ(r))` is sensitive to
/// the last bit (e.g. `γ(2/3) = cos(π/3)` is `0.49999997` in f32, so `16 · γ` floors to 7).
///
/// Serde form (written as the upstream name whenever one exists, so YAML / JSON round-trip
/// without format-specific enum tags): the upstream names `"cosine"`, `"linear"`, `"pow2"` (`"powK"`, any float
/// `K`), `"sigmoid"` (upstream default parameters), or the explicit forms `{"pow": 2.0}`,
/// `{"sigmoid": {"start": -3, "end": 3, "tau": 1, "clip_min": 1e-6}}`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum MaskSchedule {
    /// `cos(r·π/2)` (upstream `cosine_schedule`, the default).
    #[default]
    Cosine,
    /// `clamp(1 − r, 1e-6, 1)` (upstream `linear_schedule`).
    Linear,
    /// `clamp(1 − r^k, 1e-6, 1)` (upstream `pow`, schedule name `powK`).
    Pow(f64),
    /// `clamp((σ(end/τ) − σ((r(end−start)+start)/τ)) / (σ(end/τ) − σ(start/τ)), clip_min, 1)`
    /// (upstream `sigmoid_schedule`).
    Sigmoid {
        /// `start` (upstream default −3).
        start: f64,
        /// `end` (upstream default 3).
        end: f64,
        /// `tau` (upstream default 1).
        tau: f64,
        /// `clip_min` (upstream default 1e-6).
        clip_min: f64,
    },
}

impl MaskSchedule {
    /// `γ(ratio)` in f32, `ratio ∈ [0, 1]` (rounded to f32 first, as `torch.tensor(ratio)`).
    pub fn mask_ratio(&self, ratio: f64) -> f32 {
        let t = ratio as f32;
        match *self {
            // torch: t * math.pi * 0.5, the python scalar cast to f32 in the kernel
            MaskSchedule::Cosine => (t * std::f32::consts::PI * 0.5f32).cos(),
            MaskSchedule::Linear => (1.0f32 - t).clamp(1e-6, 1.0),
            MaskSchedule::Pow(k) => (1.0f32 - t.powf(k as f32)).clamp(1e-6, 1.0),
            MaskSchedule::Sigmoid {
                start,
                end,
                tau,
                clip_min,
            } => {
                let sig = |x: f32| 1.0f32 / (1.0f32 + (-x).exp());
                let v_start = sig((start / tau) as f32);
                let v_end = sig((end / tau) as f32);
                let out = sig((t * (end - start) as f32 + start as f32) / tau as f32);
                ((v_end - out) / (v_end - v_start)).clamp(clip_min as f32, 1.0)
            }
        }
    }

    /// Checks the parameters: a finite `pow` exponent `> 0`; a finite non-zero sigmoid `tau`
    /// and finite `start != end`.
    ///
    /// # Errors
    /// [`DiffusionError::Range`] naming the parameter.
    pub fn check(&self) -> Result<(), DiffusionError> {
        match *self {
            MaskSchedule::Pow(k) if !(k.is_finite() && k > 0.0) => Err(DiffusionError::Range {
                what: "mask schedule pow exponent",
                value: k.to_string(),
                why: "must be finite and > 0",
            }),
            MaskSchedule::Sigmoid {
                start, end, tau, ..
            } if !(tau.is_finite() && tau != 0.0 && start.is_finite() && end.is_finite())
                || start == end =>
            {
                Err(DiffusionError::Range {
                    what: "mask schedule sigmoid",
                    value: format!("start {start}, end {end}, tau {tau}"),
                    why: "needs finite start != end and a finite non-zero tau",
                })
            }
            // `clamp(clip_min, 1)` in `ratio` needs clip_min <= 1 and not NaN
            MaskSchedule::Sigmoid { clip_min, .. }
                if !(clip_min.is_finite() && clip_min <= 1.0) =>
            {
                Err(DiffusionError::Range {
                    what: "mask schedule sigmoid clip_min",
                    value: clip_min.to_string(),
                    why: "must be finite and <= 1",
                })
            }
            _ => Ok(()),
        }
    }
}

/// The explicit (map) serde form of [`MaskSchedule`].
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Tagged {
    Cosine,
    Linear,
    Pow(f64),
    Sigmoid {
        start: f64,
        end: f64,
        tau: f64,
        clip_min: f64,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Form {
    Name(String),
    Tagged(Tagged),
}

impl MaskSchedule {
    /// The upstream sigmoid schedule with its default parameters (`start −3, end 3, tau 1,
    /// clip_min 1e-6`).
    pub const SIGMOID: MaskSchedule = MaskSchedule::Sigmoid {
        start: -3.0,
        end: 3.0,
        tau: 1.0,
        clip_min: 1e-6,
    };

    /// Parses an upstream `mask_schedule.schedule` name: `cosine`, `linear`, `powK` (e.g.
    /// `pow2`, `pow0.5`), `sigmoid` (default parameters).
    ///
    /// # Errors
    /// [`DiffusionError::Range`] for another name or a bad exponent, listing the valid names.
    pub fn parse(name: &str) -> Result<Self, DiffusionError> {
        let bad = |why| DiffusionError::Range {
            what: "mask schedule",
            value: name.to_string(),
            why,
        };
        let s = match name {
            "cosine" => MaskSchedule::Cosine,
            "linear" => MaskSchedule::Linear,
            "sigmoid" => MaskSchedule::SIGMOID,
            _ => match name.strip_prefix("pow") {
                Some(k) => MaskSchedule::Pow(
                    k.parse()
                        .map_err(|_| bad("`powK` needs a number K, e.g. pow2 or pow0.5"))?,
                ),
                None => return Err(bad("expected cosine, linear, powK (e.g. pow2) or sigmoid")),
            },
        };
        s.check()?;
        Ok(s)
    }
}

impl std::str::FromStr for MaskSchedule {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MaskSchedule::parse(s)
    }
}

impl Serialize for MaskSchedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            MaskSchedule::Cosine => s.serialize_str("cosine"),
            MaskSchedule::Linear => s.serialize_str("linear"),
            MaskSchedule::Pow(k) => s.serialize_str(&format!("pow{k}")),
            sig if sig == MaskSchedule::SIGMOID => s.serialize_str("sigmoid"),
            MaskSchedule::Sigmoid {
                start,
                end,
                tau,
                clip_min,
            } => {
                #[derive(Serialize)]
                struct Params {
                    start: f64,
                    end: f64,
                    tau: f64,
                    clip_min: f64,
                }
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(
                    "sigmoid",
                    &Params {
                        start,
                        end,
                        tau,
                        clip_min,
                    },
                )?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for MaskSchedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = match Form::deserialize(d)? {
            Form::Name(n) => return MaskSchedule::parse(&n).map_err(serde::de::Error::custom),
            Form::Tagged(Tagged::Cosine) => MaskSchedule::Cosine,
            Form::Tagged(Tagged::Linear) => MaskSchedule::Linear,
            Form::Tagged(Tagged::Pow(k)) => MaskSchedule::Pow(k),
            Form::Tagged(Tagged::Sigmoid {
                start,
                end,
                tau,
                clip_min,
            }) => MaskSchedule::Sigmoid {
                start,
                end,
                tau,
                clip_min,
            },
        };
        s.check().map_err(serde::de::Error::custom)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_is_float32_like_torch() {
        let c = MaskSchedule::Cosine;
        assert_eq!(c.mask_ratio(0.0), 1.0);
        // cos(pi/2) in f32 is slightly negative: floor(16·γ) = -1, upstream then clamps to 1.
        assert!(c.mask_ratio(1.0) < 0.0 && c.mask_ratio(1.0) > -1e-6);
        // cos(pi/3) rounds below 0.5 in f32 → 16·γ floors to 7, not 8.
        let g = c.mask_ratio(4.0 / 6.0);
        assert!(g < 0.5, "{g}");
        assert_eq!((16.0f32 * g).floor(), 7.0);
        assert!((c.mask_ratio(0.5) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }

    #[test]
    fn other_schedules() {
        assert!((MaskSchedule::Linear.mask_ratio(0.25) - 0.75).abs() < 1e-7);
        assert_eq!(MaskSchedule::Linear.mask_ratio(1.0), 1e-6);
        assert!((MaskSchedule::Pow(2.0).mask_ratio(0.5) - 0.75).abs() < 1e-7);
        let s = MaskSchedule::Sigmoid {
            start: -3.0,
            end: 3.0,
            tau: 1.0,
            clip_min: 1e-6,
        };
        assert!((s.mask_ratio(0.0) - 1.0).abs() < 1e-6);
        assert!((s.mask_ratio(0.5) - 0.5).abs() < 1e-6);
        assert_eq!(s.mask_ratio(1.0), 1e-6);
        assert!(MaskSchedule::Pow(0.0).check().is_err());
        // a clip_min above 1 or NaN would make `clamp` panic: rejected up front
        for clip_min in [1.5, f64::NAN] {
            let bad = MaskSchedule::Sigmoid {
                start: -3.0,
                end: 3.0,
                tau: 1.0,
                clip_min,
            };
            assert!(bad.check().is_err(), "clip_min {clip_min}");
        }
    }

    #[test]
    fn schedule_serde_forms() {
        let p: MaskSchedule = serde_json::from_str("\"cosine\"").unwrap();
        assert_eq!(p, MaskSchedule::Cosine);
        let p: MaskSchedule = serde_json::from_str("{\"pow\": 3.0}").unwrap();
        assert_eq!(p, MaskSchedule::Pow(3.0));
        assert!(serde_json::from_str::<MaskSchedule>("\"cosinus\"").is_err());
    }

    #[test]
    fn upstream_names() {
        assert_eq!(MaskSchedule::parse("cosine").unwrap(), MaskSchedule::Cosine);
        assert_eq!(MaskSchedule::parse("linear").unwrap(), MaskSchedule::Linear);
        assert_eq!(MaskSchedule::parse("pow2").unwrap(), MaskSchedule::Pow(2.0));
        assert_eq!(
            MaskSchedule::parse("pow0.5").unwrap(),
            MaskSchedule::Pow(0.5)
        );
        assert_eq!(
            MaskSchedule::parse("sigmoid").unwrap(),
            MaskSchedule::SIGMOID
        );
        let e = MaskSchedule::parse("cosinus").unwrap_err().to_string();
        assert!(e.contains("cosinus") && e.contains("powK"), "{e}");
        assert!(MaskSchedule::parse("powx").is_err());
        assert!(MaskSchedule::parse("pow-1").is_err());
        let p: MaskSchedule = serde_json::from_str("\"pow3\"").unwrap();
        assert_eq!(p, MaskSchedule::Pow(3.0));
        let p: MaskSchedule = serde_json::from_str("\"sigmoid\"").unwrap();
        assert_eq!(p, MaskSchedule::SIGMOID);
        // serialisation writes the upstream names and round-trips
        assert_eq!(
            serde_json::to_string(&MaskSchedule::Pow(2.0)).unwrap(),
            "\"pow2\""
        );
        assert_eq!(
            serde_json::to_string(&MaskSchedule::SIGMOID).unwrap(),
            "\"sigmoid\""
        );
        let custom = MaskSchedule::Sigmoid {
            start: -2.0,
            end: 4.0,
            tau: 0.5,
            clip_min: 1e-4,
        };
        for s in [
            MaskSchedule::Cosine,
            MaskSchedule::Linear,
            MaskSchedule::Pow(2.5),
            MaskSchedule::SIGMOID,
            custom,
        ] {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<MaskSchedule>(&j).unwrap(), s, "{j}");
        }
    }
}
