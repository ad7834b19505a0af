//! The live view on stderr: progress bars (indicatif) on a terminal, otherwise a plain
//! progress line at most once a second; timeline notes either way.

use super::live::{Live, Outage, Snapshot};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The bars, once orders are being placed.
#[derive(Debug)]
struct Bars {
    multi: MultiProgress,
    placed: ProgressBar,
    done: ProgressBar,
    status: ProgressBar,
}

/// What the person running the demo sees on stderr.
#[derive(Debug)]
pub(crate) struct View {
    started: Instant,
    fancy: bool,
    bars: Mutex<Option<Bars>>,
    last_line: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// `DOWN 3.2 s`, `back after 5.3 s` or `up`.
pub(crate) fn consumer_status(outage: Outage) -> String {
    match outage {
        Outage::None => "consumer-service up".to_owned(),
        Outage::Down { since } => {
            format!(
                "consumer-service DOWN {:.1} s (kill -9)",
                since.elapsed().as_secs_f64()
            )
        }
        Outage::Over { since, until } => format!(
            "consumer-service back after {:.1} s down",
            until.saturating_duration_since(since).as_secs_f64()
        ),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms"))
}

impl View {
    /// Bars when `fancy` (stderr is a terminal and no `--json`), plain lines otherwise.
    pub(crate) fn new(started: Instant, fancy: bool) -> Self {
        Self {
            started,
            fancy,
            bars: Mutex::new(None),
            last_line: Mutex::new(None),
        }
    }

    /// A line of the timeline: `[  1.2 s] what happened`.
    pub(crate) fn note(&self, what: &str) {
        let line = format!("[{:>6.1} s] {what}", self.started.elapsed().as_secs_f64());
        match lock(&self.bars).as_ref() {
            Some(b) => {
                let _ = b.multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Show the bars for `total` orders (on a terminal).
    pub(crate) fn start(&self, total: u32) {
        if !self.fancy {
            return;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let bar = |prefix: &'static str| {
            let b = multi.add(ProgressBar::new(u64::from(total)));
            b.set_style(style("{prefix:>7} [{bar:32}] {pos:>6}/{len} {msg}"));
            b.set_prefix(prefix);
            b
        };
        let (placed, done) = (bar("placed"), bar("final"));
        let status = multi.add(ProgressBar::new(0));
        status.set_style(style("{prefix:>7} {msg}"));
        *lock(&self.bars) = Some(Bars {
            multi,
            placed,
            done,
            status,
        });
    }

    /// Refresh from `live`: the bars, or a plain line when a second has passed.
    pub(crate) fn tick(&self, live: &Live) {
        let s = live.snapshot();
        if let Some(b) = lock(&self.bars).as_ref() {
            b.placed.set_position(u64::from(s.placed + s.failed));
            b.placed.set_message(format!(
                "failed {}  POST /orders p99 {}",
                s.failed,
                ms(s.p99_ms)
            ));
            b.done.set_position(u64::from(s.validated + s.rejected));
            b.done.set_message(format!(
                "validated {}  rejected {}  pending {}",
                s.validated, s.rejected, s.pending
            ));
            b.status.set_message(consumer_status(s.outage));
            return;
        }
        let mut last = lock(&self.last_line);
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        self.note(&Self::line(&s));
    }

    fn line(s: &Snapshot) -> String {
        format!(
            "placed {}/{} ({} failed), pending {}, validated {}, rejected {}, POST p99 {}, {}",
            s.placed + s.failed,
            s.total,
            s.failed,
            s.pending,
            s.validated,
            s.rejected,
            ms(s.p99_ms),
            consumer_status(s.outage)
        )
    }

    /// Refresh every 100 ms until dropped.
    pub(crate) async fn follow(self: Arc<Self>, live: Arc<Live>) {
        loop {
            self.tick(&live);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Remove the bars (the summary follows) after a last plain line.
    pub(crate) fn finish(&self, live: &Live) {
        self.clear();
        self.note(&Self::line(&live.snapshot()));
    }

    /// Remove the bars.
    pub(crate) fn clear(&self) {
        if let Some(b) = lock(&self.bars).take() {
            for bar in [&b.placed, &b.done, &b.status] {
                bar.finish_and_clear();
            }
            let _ = b.multi.clear();
        }
    }
}
