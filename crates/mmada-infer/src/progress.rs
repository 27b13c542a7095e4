//! Progress bars on stderr (indicatif): hidden when stderr is not a terminal, so logs and
//! tests see only the `tracing` lines.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` units named `unit` (`"tensors"`, `"steps"`, `"images"`) with the elapsed
/// time and an ETA.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} {{bar:40}} {{pos}}/{{len}} {unit} · {{elapsed}} · eta {{eta}}"
        ))
        .expect("static template"),
    );
    bar
}
