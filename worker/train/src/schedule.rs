//! Learning-rate schedules with warmup, matching the Hugging Face `get_*_schedule_with_warmup`
//! lambdas: `lr(step)` is the rate used by optimizer step `step` (0-based), so with warmup the first
//! step has lr 0, exactly as in the HF Trainer.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// Warmup length, in optimizer steps or as a fraction of the total.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Warmup {
    Steps(u64),
    /// `ceil(ratio · total_steps)` steps (HF `warmup_ratio`).
    Ratio(f64),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("warmup ratio {0} must be in [0, 1]")]
    Ratio(f64),
    #[error("learning rate {0} must be finite and ≥ 0")]
    Lr(f64),
    #[error("min_lr_ratio {0} must be in [0, 1]")]
    MinRatio(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Floor of linear/cosine decay as a fraction of `base_lr` (0 = decay to zero, the HF default).
    pub min_lr_ratio: f64,
}

impl Schedule {
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        total_steps: u64,
        warmup: Warmup,
    ) -> Result<Self, ScheduleError> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(ScheduleError::Lr(base_lr));
        }
        let warmup_steps = match warmup {
            Warmup::Steps(s) => s,
            Warmup::Ratio(r) if (0.0..=1.0).contains(&r) => (r * total_steps as f64).ceil() as u64,
            Warmup::Ratio(r) => return Err(ScheduleError::Ratio(r)),
        };
        Ok(Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
            min_lr_ratio: 0.0,
        })
    }

    pub fn with_min_lr_ratio(mut self, r: f64) -> Result<Self, ScheduleError> {
        if !(0.0..=1.0).contains(&r) {
            return Err(ScheduleError::MinRatio(r));
        }
        self.min_lr_ratio = r;
        Ok(self)
    }

    /// Multiplier of `base_lr` at optimizer step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_len = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_len).min(1.0);
        let decay = match self.kind {
            ScheduleKind::Constant => return 1.0,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay.max(0.0)
    }

    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}
