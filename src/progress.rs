//! Progress bars for the long jobs (`ekm projections rebuild`, `ekm audit export`,
//! `ekm master-key rotate`), drawn on stderr only when it is a terminal: a pipe or a log
//! file gets the jobs' plain lines instead, and stdout (the export itself, `--json`) is
//! never touched.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether bars are drawn: stderr is a terminal.
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar of `len` steps, labelled `what`; hidden unless stderr is a terminal.
pub fn bar(len: u64, what: &'static str) -> ProgressBar {
    if !interactive() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{wide_bar}] {pos}/{len} ({percent}%) {elapsed_precise} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// A counter without a known end, labelled `what`; hidden unless stderr is a terminal.
pub fn counter(what: &'static str) -> ProgressBar {
    if !interactive() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}: {pos} {elapsed_precise}") {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
