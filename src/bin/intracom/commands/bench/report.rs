//! The bench's results: per-round figures, the table, the JSON, the progress bar.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use intracom::{Config, MediumKind};

use super::Sizes;

/// How the two sides of a figure are compared, round by round.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Compare {
    /// intracom / raw.
    Ratio,
    /// intracom − raw, in the figure's unit.
    Difference,
}

/// Which way a target points.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    AtLeast,
    AtMost,
}

/// One line of the report: intracom and the raw side, one pair of values per round.
#[derive(Clone, Debug)]
pub(crate) struct Figure {
    pub key: &'static str,
    pub title: String,
    pub ours: &'static str,
    pub raw: String,
    pub unit: &'static str,
    pub compare: Compare,
    pub target: Option<(Op, f64)>,
    /// (intracom, raw) per round.
    pub rounds: Vec<(f64, f64)>,
}

impl Figure {
    pub fn new(
        key: &'static str,
        title: String,
        ours: &'static str,
        raw: String,
        unit: &'static str,
        compare: Compare,
        target: Option<(Op, f64)>,
    ) -> Self {
        Figure {
            key,
            title,
            ours,
            raw,
            unit,
            compare,
            target,
            rounds: Vec::new(),
        }
    }

    pub fn push(&mut self, ours: f64, raw: f64) {
        self.rounds.push((ours, raw));
    }

    fn compared(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|(ours, raw)| match self.compare {
                Compare::Ratio => ours / raw,
                Compare::Difference => ours - raw,
            })
            .collect()
    }

    fn met(&self, median: f64) -> Option<bool> {
        self.target.map(|(op, value)| match op {
            Op::AtLeast => median >= value,
            Op::AtMost => median <= value,
        })
    }

    fn target_text(&self) -> String {
        match self.target {
            None => "-".into(),
            Some((op, value)) => {
                let op = match op {
                    Op::AtLeast => "≥",
                    Op::AtMost => "≤",
                };
                match self.compare {
                    Compare::Ratio => format!("{op} {value}"),
                    Compare::Difference => format!("{op} {value:+} {}", self.unit),
                }
            }
        }
    }
}

/// The median, minimum and maximum of values (NaN for none).
fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

/// A value with a precision that suits its size.
fn number(value: f64) -> String {
    if value.is_nan() {
        return "-".into();
    }
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 0.1 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The whole run.
pub(crate) struct Report {
    pub medium: MediumKind,
    pub uri: Option<String>,
    pub server: Option<String>,
    pub machine: String,
    pub sizes: Sizes,
    pub figures: Vec<Figure>,
    pub elapsed: Duration,
}

impl Report {
    pub fn new(config: &Config, sizes: &Sizes) -> Self {
        Report {
            medium: config.medium,
            uri: (config.medium == MediumKind::Db).then(|| config.db.redacted_uri()),
            server: None,
            machine: machine(),
            sizes: sizes.clone(),
            figures: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "intracom bench: medium {}", self.medium);
        if let Some(uri) = &self.uri {
            let _ = write!(out, " at {uri}");
        }
        if let Some(server) = &self.server {
            let _ = write!(out, " ({server})");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "machine: {}; {} rounds, the sides taking turns going first, each side in a fresh database; {:.0} s",
            self.machine,
            self.sizes.rounds,
            self.elapsed.as_secs_f64()
        );
        let rows: Vec<[String; 6]> = self
            .figures
            .iter()
            .map(|f| {
                let (ours, _, _) = summary(&f.rounds.iter().map(|r| r.0).collect::<Vec<_>>());
                let (raw, _, _) = summary(&f.rounds.iter().map(|r| r.1).collect::<Vec<_>>());
                let (median, min, max) = summary(&f.compared());
                let compared = match f.compare {
                    Compare::Ratio => {
                        format!("{} [{}–{}]", number(median), number(min), number(max))
                    }
                    Compare::Difference => {
                        format!("{:+.3} [{:+.3}–{:+.3}] {}", median, min, max, f.unit)
                    }
                };
                let met = match f.met(median) {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "-",
                };
                [
                    f.title.clone(),
                    format!("{} {}", number(ours), f.unit),
                    format!("{} {} ({})", number(raw), f.unit, f.raw),
                    compared,
                    f.target_text(),
                    met.to_string(),
                ]
            })
            .collect();
        let header = [
            "figure".to_string(),
            "intracom (median)".into(),
            "raw (median)".into(),
            "intracom vs raw: median [min–max]".into(),
            "target".into(),
            "met".into(),
        ];
        let mut widths = [0usize; 6];
        for row in std::iter::once(&header).chain(rows.iter()) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(rows.iter()) {
            let mut line = String::new();
            for (i, (w, cell)) in widths.iter().zip(row).enumerate() {
                let pad = w - cell.chars().count();
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let figures: Vec<serde_json::Value> = self
            .figures
            .iter()
            .map(|f| {
                let ours: Vec<f64> = f.rounds.iter().map(|r| r.0).collect();
                let raw: Vec<f64> = f.rounds.iter().map(|r| r.1).collect();
                let compared = f.compared();
                let (median, min, max) = summary(&compared);
                serde_json::json!({
                    "key": f.key,
                    "title": f.title,
                    "unit": f.unit,
                    "intracom": { "label": f.ours, "median": finite(summary(&ours).0), "rounds": finite_all(&ours) },
                    "raw": { "label": f.raw, "median": finite(summary(&raw).0), "rounds": finite_all(&raw) },
                    "comparison": {
                        "kind": match f.compare { Compare::Ratio => "ratio", Compare::Difference => "difference" },
                        "median": finite(median),
                        "min": finite(min),
                        "max": finite(max),
                        "rounds": finite_all(&compared),
                    },
                    "target": f.target.map(|(op, value)| serde_json::json!({
                        "op": match op { Op::AtLeast => ">=", Op::AtMost => "<=" },
                        "value": value,
                    })),
                    "met": f.met(median),
                })
            })
            .collect();
        let s = &self.sizes;
        serde_json::json!({
            "medium": self.medium.to_string(),
            "uri": self.uri,
            "server": self.server,
            "machine": self.machine,
            "rounds": s.rounds,
            "sizes": {
                "messages": s.messages, "publishers": s.publishers, "batch": s.batch,
                "batches": s.batches, "samples": s.samples, "subscribers": s.subscribers,
                "memory_messages": s.memory_messages, "callers": s.callers,
                "servers": s.servers, "requests": s.requests, "workers": s.workers,
                "jobs": s.jobs,
            },
            "elapsed_s": self.elapsed.as_secs_f64(),
            "figures": figures,
        })
    }
}

/// JSON has no NaN: a value that could not be measured is null.
/// Writes a table: the header and the rows, each column as wide as its widest cell,
/// two spaces between columns.
pub(crate) fn write_table(out: &mut String, header: &[&str], cells: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    );
    for row in cells {
        let _ = writeln!(out, "{}", line(row));
    }
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

fn finite_all(values: &[f64]) -> Vec<Option<f64>> {
    values.iter().map(|v| finite(*v)).collect()
}

/// The machine, as well as /proc tells it: CPU model, CPUs, memory, kernel.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map(|kib| format!(", {:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!(", {} {}", std::env::consts::OS, k.trim()))
        .unwrap_or_default();
    format!("{model}, {cpus} CPUs{memory}{kernel}")
}

/// A progress bar on stderr while the bench runs (only on a terminal).
pub(crate) struct Progress {
    total: usize,
    done: usize,
    show: bool,
}

impl Progress {
    pub fn new(total: usize, wanted: bool) -> Self {
        Progress {
            total: total.max(1),
            done: 0,
            show: wanted && std::io::stderr().is_terminal(),
        }
    }

    /// Says what runs now.
    pub fn at(&self, what: &str) {
        if !self.show {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * self.done / self.total;
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r\x1b[2K[{}{}] {}/{} {what}",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.done,
            self.total
        );
        let _ = stderr.flush();
    }

    /// One step done.
    pub fn step(&mut self) {
        self.done = (self.done + 1).min(self.total);
    }

    pub fn finish(&self) {
        if self.show {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[2K");
            let _ = stderr.flush();
        }
    }
}
