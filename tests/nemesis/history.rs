//! Histories: one JSON object per line, appended by each process incarnation to a file
//! of its own, and read back by the checker.
//!
//! Every record carries `t`, milliseconds on `CLOCK_MONOTONIC` (one clock for every
//! process of the machine, and one that `faketime` leaves alone when told to:
//! `FAKETIME_DONT_FAKE_MONOTONIC=1`), and `p`, the process and its incarnation.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};

/// Milliseconds on the machine's monotonic clock.
pub fn now_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

/// The history file of one process incarnation.
pub struct History {
    process: String,
    file: Mutex<File>,
}

impl History {
    /// Opens (creates) `dir/<process>.<incarnation>.jsonl`.
    pub fn open(dir: &Path, process: &str, incarnation: u32) -> std::io::Result<History> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{process}.{incarnation}.jsonl"));
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(History {
            process: format!("{process}#{incarnation}"),
            file: Mutex::new(file),
        })
    }

    /// Appends one record (`t` and `p` added) in one write.
    pub fn rec(&self, mut record: Value) {
        if let Value::Object(map) = &mut record {
            map.insert("t".into(), json!(now_ms()));
            map.insert("p".into(), json!(self.process));
        }
        let mut line = record.to_string();
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // A failed write is a lost record; the process goes on (the checker sees less).
        let _ = file.write_all(line.as_bytes());
    }
}

/// One record read back, with the name of the process (without the incarnation).
#[derive(Clone, Debug)]
pub struct Record {
    pub t: f64,
    /// `pub1#3`: process and incarnation.
    pub p: String,
    pub v: Value,
}

impl Record {
    pub fn k(&self) -> &str {
        self.v.get("k").and_then(Value::as_str).unwrap_or("")
    }
    pub fn f(&self) -> &str {
        self.v.get("f").and_then(Value::as_str).unwrap_or("")
    }
    pub fn s(&self, key: &str) -> &str {
        self.v.get(key).and_then(Value::as_str).unwrap_or("")
    }
    pub fn i(&self, key: &str) -> i64 {
        self.v.get(key).and_then(Value::as_i64).unwrap_or(0)
    }
    /// The process name without the incarnation.
    pub fn process(&self) -> &str {
        self.p.split('#').next().unwrap_or("")
    }
}

/// Parses one history file's text; a torn last line (a kill -9 during the write) is
/// dropped, and so is any line that does not parse (counted in the second value).
pub fn parse(text: &str) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut dropped = 0;
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            dropped += 1;
            continue;
        }
        match serde_json::from_str::<Value>(line.trim_end()) {
            Ok(v) => {
                let t = v.get("t").and_then(Value::as_f64).unwrap_or(0.0);
                let p = v.get("p").and_then(Value::as_str).unwrap_or("").to_string();
                out.push(Record { t, p, v });
            }
            Err(_) => dropped += 1,
        }
    }
    (out, dropped)
}

/// Every record of every history file in `dir`, sorted by time; and the number of
/// torn or unreadable lines dropped.
pub fn read_all(dir: &Path) -> (Vec<Record>, usize) {
    let mut all = Vec::new();
    let mut dropped = 0;
    for path in files(dir) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let (records, d) = parse(&text);
        all.extend(records);
        dropped += d;
    }
    all.sort_by(|a, b| a.t.total_cmp(&b.t));
    (all, dropped)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The records of one process (all incarnations) in `dir`.
pub fn read_process(dir: &Path, process: &str) -> Vec<Record> {
    let prefix = format!("{process}.");
    let mut all = Vec::new();
    for path in files(dir) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&prefix) {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            all.extend(parse(&text).0);
        }
    }
    all.sort_by(|a, b| a.t.total_cmp(&b.t));
    all
}

/// A small deterministic generator (splitmix64): the schedule and the workload's
/// choices come from the run's seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// A stable hash of a string with the seed (the planned failures of a job).
pub fn hash(seed: u64, text: &str) -> u64 {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    Rng::new(h).next_u64()
}

/// The torn-line rule, as a trial.
pub fn drops_a_torn_last_line() {
    let text = "{\"k\":\"a\",\"t\":1,\"p\":\"x#1\"}\n{\"k\":\"b\",\"t\":2";
    let (records, dropped) = parse(text);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].k(), "a");
    assert_eq!(dropped, 1);
}
