//! The figures table: one row per figure with its median, spread, same-run baseline, ratio
//! and target, rendered as Markdown and written into BENCHMARKS.md between markers.

use std::path::Path;

use anyhow::Context;

pub const START: &str = "<!-- bench:figures:start -->";
pub const END: &str = "<!-- bench:figures:end -->";

/// One measured figure.
pub struct Figure {
    pub name: String,
    pub median: String,
    pub spread: String,
    pub baseline: String,
    pub ratio: Option<f64>,
    pub target: String,
    /// `None` when the figure has no target (reported for context).
    pub met: Option<bool>,
}

impl Figure {
    pub fn new(name: impl Into<String>) -> Figure {
        Figure {
            name: name.into(),
            median: String::new(),
            spread: String::new(),
            baseline: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
        }
    }

    pub fn median(mut self, text: impl Into<String>) -> Figure {
        self.median = text.into();
        self
    }

    pub fn spread(mut self, text: impl Into<String>) -> Figure {
        self.spread = text.into();
        self
    }

    pub fn baseline(mut self, text: impl Into<String>) -> Figure {
        self.baseline = text.into();
        self
    }

    pub fn ratio(mut self, ratio: f64) -> Figure {
        self.ratio = Some(ratio);
        self
    }

    pub fn target(mut self, text: impl Into<String>, met: bool) -> Figure {
        self.target = text.into();
        self.met = Some(met);
        self
    }

    fn row(&self) -> String {
        let ratio = self.ratio.map(|r| format!("{r:.2}")).unwrap_or_default();
        let verdict = match self.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "",
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            self.name, self.median, self.spread, self.baseline, ratio, self.target, verdict
        )
    }
}

/// Median, minimum and maximum of repeated measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut sorted = values.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let Some(min) = sorted.first().copied() else {
            return Stats::default();
        };
        let max = sorted.last().copied().unwrap_or(min);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Stats { median, min, max }
    }

    /// "min–max" with the given formatter.
    pub fn range(&self, format: impl Fn(f64) -> String) -> String {
        format!("{}–{}", format(self.min), format(self.max))
    }
}

/// The value at quantile `q` (0..=1) of unsorted samples.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A rate with thousands separators: 12345.6 → "12,346".
pub fn count(value: f64) -> String {
    let whole = value.round().max(0.0) as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn ms(value: f64) -> String {
    format!("{value:.2} ms")
}

/// The machine line: cores, CPU model, memory, date, commit and mode.
pub fn machine(quick: bool) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    format!(
        "Machine: {cores} cores ({model}), {ram_gib:.0} GiB RAM; {} UTC; commit {commit}{}; {} run.",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        if dirty { " (with uncommitted changes)" } else { "" },
        if quick {
            "**quick** (smaller sizes, shorter runs)"
        } else {
            "full"
        }
    )
}

/// Where the CPU went during one load: the server, the PostgreSQL backends of its
/// database, and the whole machine.
pub struct CpuRow {
    pub load: String,
    pub requests: u64,
    pub usage: crate::server::Usage,
    pub postgres: bool,
}

impl CpuRow {
    fn row(&self) -> String {
        // USER_HZ is 100: one tick is 10 ms.
        let per_request = |ticks: f64| {
            if self.requests == 0 {
                String::new()
            } else {
                format!("{:.0} µs", ticks * 10_000.0 / self.requests as f64)
            }
        };
        let other = self.usage.busy - self.usage.server - self.usage.postgres;
        format!(
            "| {} | {} | {} | {} | {} | {:.0} % |",
            self.load,
            count(self.requests as f64),
            per_request(self.usage.server),
            if self.postgres {
                per_request(self.usage.postgres)
            } else {
                "(in process)".into()
            },
            per_request(other),
            100.0 * self.usage.busy / self.usage.total.max(1.0)
        )
    }
}

/// The table as Markdown, with the machine line and the run's duration.
pub fn render(figures: &[Figure], cpu: &[CpuRow], machine: &str, run_secs: f64) -> String {
    let mut text = String::new();
    text.push_str(machine);
    text.push_str(&format!(
        " The run took {:.0} s (after the build).\n\n",
        run_secs
    ));
    text.push_str("| figure | median | spread | baseline (same run) | ratio | target | |\n");
    text.push_str("|---|---|---|---|---|---|---|\n");
    for figure in figures {
        text.push_str(&figure.row());
        text.push('\n');
    }
    if !cpu.is_empty() {
        text.push_str(
            "\nWhere the CPU went during the loads (CPU time per request, from /proc; \"rest\" is \
             the load generator, the kernel and any neighbour on the machine):\n\n",
        );
        text.push_str("| load | requests | ekm serve | PostgreSQL backends of its database | rest of the machine | machine busy |\n");
        text.push_str("|---|---|---|---|---|---|\n");
        for row in cpu {
            text.push_str(&row.row());
            text.push('\n');
        }
    }
    text
}

/// Replaces what lies between the markers in `path` (or appends the markers and the table
/// if they are missing).
pub fn write_into(path: &Path, table: &str) -> anyhow::Result<()> {
    let current =
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let block = format!("{START}\n{table}{END}");
    let updated = match (current.find(START), current.find(END)) {
        (Some(start), Some(end)) if end > start => {
            format!(
                "{}{block}{}",
                &current[..start],
                &current[end + END.len()..]
            )
        }
        _ => format!("{current}\n{block}\n"),
    };
    std::fs::write(path, updated).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}
