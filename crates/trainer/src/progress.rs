//! What a run shows while it trains: an indicatif bar on a terminal (loss,
//! learning rate, tokens/s, ETA, GPU memory), plain lines otherwise.
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use llmft_tensor::Ctx;

use crate::{EvalStats, RunOptions, StepStats, TrainConfig};

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    /// Plain-line interval (steps) when there is no bar.
    every: u64,
    total: u64,
    start_step: u64,
    started: Instant,
    ctx: Ctx,
}

impl Progress {
    pub(crate) fn new(cfg: &TrainConfig, start_step: u64, opts: &RunOptions, ctx: &Ctx) -> Self {
        let bar = (opts.progress && !opts.quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(cfg.max_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
                )
                .expect("valid progress template"),
            );
            bar.set_position(start_step);
            bar
        });
        Self {
            bar,
            quiet: opts.quiet,
            every: (cfg.max_steps / 20).max(1),
            total: cfg.max_steps,
            start_step,
            started: Instant::now(),
            ctx: ctx.clone(),
        }
    }

    /// Device memory in use by llmft's allocator (peak), for the display.
    fn memory(&self) -> String {
        match self.ctx.cuda_ctx() {
            Some(cu) => {
                let s = cu.allocator().stats();
                format!(
                    " mem {:.2}/{:.2} GiB",
                    s.in_use as f64 / GIB,
                    s.peak_in_use as f64 / GIB
                )
            }
            None => String::new(),
        }
    }

    pub(crate) fn step(&mut self, s: &StepStats) {
        let line = format!(
            "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s{}{}",
            s.loss,
            s.lr,
            s.grad_norm,
            s.tokens_per_s,
            self.memory(),
            if s.skipped {
                " (skipped: non-finite)"
            } else {
                ""
            }
        );
        if let Some(bar) = &self.bar {
            bar.set_position(s.step);
            bar.set_message(line);
        } else if !self.quiet && (s.step % self.every == 0 || s.step == self.total || s.skipped) {
            let done = (s.step - self.start_step) as f64;
            let secs = self.started.elapsed().as_secs_f64();
            let eta = secs / done.max(1.0) * (self.total - s.step) as f64;
            eprintln!("step {}/{} {line} eta {eta:.0}s", s.step, self.total);
        }
    }

    pub(crate) fn eval(&self, step: u64, e: &EvalStats) {
        self.note(&format!(
            "step {step}: eval loss {:.4} perplexity {:.3} ({} tokens)",
            e.loss, e.perplexity, e.tokens
        ));
    }

    pub(crate) fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if !self.quiet => eprintln!("{text}"),
            None => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;
