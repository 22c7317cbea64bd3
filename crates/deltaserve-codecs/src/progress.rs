//! A byte-counting progress bar on stderr, drawn only when stderr is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over bytes, or nothing when progress is off.
pub(crate) struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar over `total` bytes labelled `what`; hidden unless `show` and stderr is a terminal.
    pub(crate) fn new(show: bool, total: u64, what: &'static str) -> Progress {
        if !show {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        // The template is a constant; if indicatif ever rejects it, fall back to its default.
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what);
        Progress(Some(bar))
    }

    /// Advances by `bytes`.
    pub(crate) fn inc(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
