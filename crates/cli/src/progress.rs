//! Progress of long steps other than the training loop (which has its own
//! bar in `llmft_trainer`): loading and quantizing weights, tokenizing the
//! data. On a terminal one line is redrawn in place; elsewhere (a log file,
//! a pipe, CI) a plain line is printed every `LLMFT_PROGRESS_INTERVAL_S`
//! seconds (default 10) or every 10% of the work, whichever comes first,
//! and at the end — no carriage returns.
//!
//! In a job of several processes only global rank 0 reports: every rank
//! loads and tokenizes the same way, and their lines would interleave (and
//! on a shared terminal erase each other). Warnings and errors are not
//! progress; every rank prints its own.
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Whether this process reports progress: global rank 0 of the job that
/// `RANK` / `SLURM_PROCID` describe, or a single process. Variables that
/// do not parse count as rank 0 (the command that needs them says why).
fn reports() -> bool {
    static LEAD: OnceLock<bool> = OnceLock::new();
    *LEAD.get_or_init(|| llmft_shard::WorldInfo::from_env().map_or(true, |w| w.rank == 0))
}

/// The interval between plain lines.
fn interval() -> Duration {
    std::env::var("LLMFT_PROGRESS_INTERVAL_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map_or(Duration::from_secs(10), Duration::from_secs_f64)
}

/// One long step's reporter.
pub struct Reporter {
    label: &'static str,
    started: Instant,
    last: Option<Instant>,
    last_tenth: u64,
    terminal: bool,
    quiet: bool,
    every: Duration,
}

impl Reporter {
    /// A reporter for `label` on stderr; `quiet`, or a rank other than 0,
    /// prints nothing.
    pub fn new(label: &'static str, quiet: bool) -> Self {
        Reporter {
            label,
            started: Instant::now(),
            last: None,
            last_tenth: 0,
            terminal: std::io::stderr().is_terminal(),
            quiet: quiet || !reports(),
            every: interval(),
        }
    }

    /// `done` of `total` (if known) with `detail`; `final_` marks the end.
    pub fn update(
        &mut self,
        done: u64,
        total: Option<u64>,
        unit: &str,
        detail: &str,
        final_: bool,
    ) {
        if self.quiet {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        let (pct, eta) = match total.filter(|&t| t > 0) {
            Some(t) => {
                let f = (done as f64 / t as f64).min(1.0);
                let eta = if f > 0.0 && f < 1.0 {
                    format!(", eta {:.0}s", secs / f * (1.0 - f))
                } else {
                    String::new()
                };
                (format!("{:.0}% {done}/{t} {unit}", f * 100.0), eta)
            }
            None => (format!("{done} {unit}"), String::new()),
        };
        let line = format!("{}: {pct}{detail}, {secs:.1}s{eta}", self.label);
        if self.terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            if final_ {
                let _ = writeln!(err);
            }
            return;
        }
        let tenth = total
            .filter(|&t| t > 0)
            .map_or(0, |t| (done * 10 / t).min(10));
        let due = self.last.is_none_or(|l| l.elapsed() >= self.every) || tenth > self.last_tenth;
        if due || final_ {
            eprintln!("{line}");
            self.last = Some(Instant::now());
            self.last_tenth = tenth;
        }
    }
}

/// Reporter of model loads and exports (set as `llmft_models`' hook):
/// tensors, GB read or written, GB/s and ETA.
pub fn install_load_progress(quiet: bool) {
    let rep: Mutex<Option<Reporter>> = Mutex::new(None);
    llmft_models::set_load_progress(Some(Box::new(move |s: llmft_models::LoadStatus| {
        let Ok(mut slot) = rep.lock() else { return };
        let label = if s.writing {
            "writing merged model"
        } else {
            "loading weights"
        };
        let r = match slot.as_mut() {
            Some(r) if r.label == label => r,
            _ => slot.insert(Reporter::new(label, quiet)),
        };
        let secs = r.started.elapsed().as_secs_f64().max(1e-6);
        let gb = s.bytes as f64 / 1e9;
        let detail = format!(", {gb:.2} GB, {:.2} GB/s", gb / secs);
        let done = s.tensors >= s.total_tensors;
        r.update(
            s.tensors as u64,
            Some(s.total_tensors as u64),
            "tensors",
            &detail,
            done,
        );
        if done {
            // The next load or export reports afresh.
            *slot = None;
        }
    })));
}

/// Clears a progress line left on a terminal (before the next output); a
/// rank that draws none leaves rank 0's alone.
pub fn end_line() {
    if reports() && std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

/// A progress function for [`llmft_data::Pipeline::with_progress`]:
/// records read, examples made, records/s.
pub fn data_progress(quiet: bool) -> llmft_data::ProgressFn {
    let rep = Mutex::new(Reporter::new("tokenizing", quiet));
    Box::new(move |report: &llmft_data::LoadReport| {
        let Ok(mut r) = rep.lock() else { return };
        let secs = r.started.elapsed().as_secs_f64().max(1e-6);
        let detail = format!(
            " ({} examples, {:.0} records/s)",
            report.examples,
            report.records as f64 / secs
        );
        r.update(report.records as u64, None, "records", &detail, false);
    })
}
