//! Learning-rate schedules as pure functions of the step, with the
//! semantics of transformers' `get_{constant,linear,cosine}_schedule_with_warmup`.
use crate::config::{ScheduleKind, TrainConfig};

/// The learning rate of every step of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Curve after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub peak: f32,
    /// Warmup steps (linear from 0).
    pub warmup: u64,
    /// Total steps; linear and cosine reach 0 here.
    pub total: u64,
}

impl LrSchedule {
    /// The schedule a config asks for.
    pub fn from_config(c: &TrainConfig) -> Self {
        Self {
            kind: c.schedule,
            peak: c.lr,
            warmup: c.warmup(),
            total: c.max_steps,
        }
    }

    /// The learning rate of the optimizer step that follows `step` completed
    /// steps (PyTorch's `LambdaLR` after `step` calls of `scheduler.step()`):
    /// the first step uses `lr(0)`, which is 0 under warmup.
    pub fn lr(&self, step: u64) -> f32 {
        (self.peak as f64 * self.factor(step)) as f32
    }

    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        if step < self.warmup {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64) -> LrSchedule {
        LrSchedule {
            kind,
            peak: 1e-3,
            warmup,
            total,
        }
    }

    fn close(a: f32, b: f64) {
        assert!((a as f64 - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn constant_with_warmup() {
        let s = sched(ScheduleKind::Constant, 4, 10);
        for (step, want) in [
            (0, 0.0),
            (1, 0.25e-3),
            (2, 0.5e-3),
            (4, 1e-3),
            (9, 1e-3),
            (50, 1e-3),
        ] {
            close(s.lr(step), want);
        }
        close(sched(ScheduleKind::Constant, 0, 10).lr(0), 1e-3);
    }

    #[test]
    fn linear_with_warmup() {
        // warmup 2, total 10: step/2 then (10 - step)/8.
        let s = sched(ScheduleKind::Linear, 2, 10);
        for (step, want) in [
            (0, 0.0),
            (1, 0.5e-3),
            (2, 1e-3),
            (3, 0.875e-3),
            (6, 0.5e-3),
            (9, 0.125e-3),
            (10, 0.0),
            (12, 0.0),
        ] {
            close(s.lr(step), want);
        }
    }

    #[test]
    fn cosine_with_warmup() {
        // warmup 2, total 10: 0.5·(1 + cos(π·(step − 2)/8)).
        let s = sched(ScheduleKind::Cosine, 2, 10);
        let c = |p: f64| 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        close(s.lr(0), 0.0);
        close(s.lr(1), 0.5e-3);
        close(s.lr(2), 1e-3);
        close(s.lr(4), c(0.25)); // 0.853553...e-3
        close(s.lr(4), 0.853_553_390_593_273_8e-3);
        close(s.lr(6), 0.5e-3);
        close(s.lr(8), 0.146_446_609_406_726_24e-3);
        close(s.lr(10), 0.0);
        // Past the end transformers' formula climbs back; with num_cycles 0.5
        // and max(0, ·) it follows the cosine, as PyTorch would.
        close(s.lr(12), c(1.25));
    }

    #[test]
    fn cosine_without_warmup_starts_at_peak() {
        let s = sched(ScheduleKind::Cosine, 0, 4);
        close(s.lr(0), 1e-3);
        close(s.lr(2), 0.5e-3);
        close(s.lr(4), 0.0);
    }
}
