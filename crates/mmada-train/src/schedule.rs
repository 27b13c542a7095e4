//! Learning-rate schedules.
//!
//! `cosine` is upstream MMaDA `models/lr_schedulers.py::get_cosine_schedule_with_warmup`
//! with `min_lr_scale` (spec §3.5): linear warmup from 0, then
//! `min_lr_scale + (1 − min_lr_scale)·½(1 + cos(π·progress))`. `wsd` is LLaDA's
//! warmup-stable-decay (spec §3.2): warmup, constant, then a linear decay to
//! `min_lr_scale` over the last `decay_fraction` of the steps.

use crate::recipe::{ScheduleKind, ScheduleSection};

/// A schedule over `total` optimizer steps.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: ScheduleKind,
    warmup: u64,
    total: u64,
    min_scale: f64,
    decay_fraction: f64,
    peak: f64,
}

impl Schedule {
    /// From the recipe section, the peak LR and the number of optimizer steps.
    pub fn new(s: &ScheduleSection, peak: f64, total: u64) -> Self {
        Schedule {
            kind: s.kind,
            warmup: s.warmup_steps,
            total,
            min_scale: s.min_lr_scale,
            decay_fraction: s.decay_fraction,
            peak,
        }
    }

    /// Multiplier of the peak LR at optimizer step `step` (0-based, the step about to run).
    pub fn scale(&self, step: u64) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let after = (step - self.warmup) as f64;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = (after / span).min(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                (self.min_scale + (1.0 - self.min_scale) * (1.0 - progress)).max(0.0)
            }
            ScheduleKind::Wsd => {
                let decay_steps = (self.total as f64 * self.decay_fraction).round().max(1.0);
                let decay_start = self.total as f64 - decay_steps;
                if (step as f64) < decay_start {
                    1.0
                } else {
                    let p = ((step as f64 - decay_start) / decay_steps).min(1.0);
                    1.0 - (1.0 - self.min_scale) * p
                }
            }
            ScheduleKind::Cosine => (self.min_scale
                + (1.0 - self.min_scale) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
            .max(0.0),
        }
    }

    /// The learning rate at `step`.
    pub fn lr(&self, step: u64) -> f64 {
        self.peak * self.scale(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: &str, warmup: u64, min: f64) -> Schedule {
        let s = ScheduleSection {
            kind: serde_norway::from_str(kind).unwrap(),
            warmup_steps: warmup,
            min_lr_scale: min,
            decay_fraction: 0.1,
        };
        Schedule::new(&s, 1.0, 100)
    }

    #[test]
    fn cosine_matches_upstream_formula() {
        let s = sched("cosine", 10, 0.1);
        assert_eq!(s.scale(0), 0.0);
        assert_eq!(s.scale(5), 0.5);
        assert_eq!(s.scale(10), 1.0);
        // halfway through the decay: min + (1-min)/2
        assert!((s.scale(55) - 0.55).abs() < 1e-12);
        assert!((s.scale(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn wsd_linear_constant() {
        let s = sched("wsd", 5, 0.1);
        assert_eq!(s.scale(50), 1.0);
        assert_eq!(s.scale(89), 1.0);
        assert!((s.scale(95) - 0.55).abs() < 1e-12);
        assert!((s.scale(100) - 0.1).abs() < 1e-12);
        assert_eq!(sched("constant", 0, 0.0).scale(70), 1.0);
        assert!((sched("linear", 0, 0.0).scale(25) - 0.75).abs() < 1e-12);
    }
}
