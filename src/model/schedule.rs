//! Learning-rate schedule: linear warm-up, then cosine decay to a floor.

use serde::{Deserialize, Serialize};

/// Cosine decay with linear warm-up, as GPT-3 and MosaicML's `cosine_with_warmup` (`alpha_f`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    /// Peak learning rate, reached at the end of warm-up.
    pub lr: f64,
    /// Steps of linear warm-up from `lr / warmup_steps` to `lr`.
    pub warmup_steps: u64,
    /// Step at which the decay ends; after it the rate stays at the floor.
    pub total_steps: u64,
    /// Floor as a fraction of `lr` (MosaicML's `alpha_f`, 0.1 in their GPT recipes).
    pub min_lr_ratio: f64,
}

impl CosineSchedule {
    /// The rate used for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let min_lr = self.lr * self.min_lr_ratio;
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.lr - min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_the_floor() {
        let s = CosineSchedule { lr: 1.0, warmup_steps: 10, total_steps: 110, min_lr_ratio: 0.1 };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12, "halfway is the mean of peak and floor");
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(10_000) - 0.1).abs() < 1e-12);
        for step in 10..110 {
            assert!(s.lr_at(step + 1) <= s.lr_at(step), "not monotone at {step}");
        }
    }
}
