//! `intracom bench`: intracom beside the limit it runs on, in one run (DESIGN §8).
//!
//! Why it exists: a figure means something only next to what the same machine and the
//! same server do without intracom. Every figure here is measured twice per round, by
//! intracom and by the raw MongoDB driver (or `tokio::sync::broadcast` on the memory
//! medium) doing the same job, the two sides taking turns going first, each side of
//! each round in a database of its own. The report gives, per figure, the median of
//! each side and the median and range of the per-round comparisons, with the target
//! the figure is held to (issue 11). `--json` prints the same for scripts.
//!
//! Nothing here asserts: timing lives in this command and in `cargo bench`, never in
//! tests (the tests run it once with `--tiny`, to see it work).

mod db;
mod fleet;
mod gateways;
mod memory;
mod report;
mod retained;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use intracom::bson::doc;
use intracom::{Config, MediumKind, Message};

use crate::output::{fail, Failure, Outcome};
use report::{Progress, Report};

/// What each figure is measured with, after `--tiny` and the flags are applied.
#[derive(Clone, Debug)]
pub(crate) struct Sizes {
    pub rounds: usize,
    pub messages: usize,
    pub publishers: usize,
    pub batch: usize,
    pub batches: usize,
    pub samples: usize,
    pub subscribers: usize,
    pub memory_messages: usize,
    pub callers: usize,
    pub servers: usize,
    pub requests: usize,
    pub workers: usize,
    pub jobs: usize,
}

impl Sizes {
    const DEFAULT: Sizes = Sizes {
        rounds: 5,
        messages: 2_000,
        publishers: 16,
        batch: 1_000,
        batches: 5,
        samples: 500,
        subscribers: 100,
        memory_messages: 15_000,
        callers: 16,
        servers: 3,
        requests: 1_000,
        workers: 4,
        jobs: 500,
    };

    /// A smoke test: every figure in a few seconds.
    const TINY: Sizes = Sizes {
        rounds: 2,
        messages: 40,
        publishers: 4,
        batch: 20,
        batches: 2,
        samples: 10,
        subscribers: 3,
        memory_messages: 200,
        callers: 4,
        servers: 2,
        requests: 20,
        workers: 2,
        jobs: 20,
    };
}

/// The figures, by name (`--only`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Which {
    /// Sequential publish vs a raw insert_one (and the same update command sent raw).
    Publish,
    /// Concurrent publishers vs concurrent raw insert_one.
    Concurrent,
    /// publish_all of a batch vs a raw insert_many (and the same update batch sent raw).
    Batch,
    /// Publish-to-delivery latency vs a raw insert seen by a raw watch().
    Latency,
    /// Process memory growth with many local subscribers vs one.
    Memory,
    /// Request/reply: throughput, and round trip vs one raw write+watch round trip.
    Request,
    /// Work queue: claim and settle vs the raw commands they consist of.
    Work,
    /// Memory medium: publish to every subscriber vs tokio::sync::broadcast.
    Fanout,
}

/// A retention mode of `--retained`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum RetentionMode {
    /// A TTL index on `at`.
    Ttl,
    /// A capped messages collection.
    Capped,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Only these figures (comma separated; default: every figure of the medium).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Which>,
    /// Small sizes and two rounds: a smoke test that runs every figure in seconds.
    /// Size flags given beside it still win.
    #[arg(long)]
    tiny: bool,
    /// Print JSON (one document) instead of the table.
    #[arg(long)]
    json: bool,
    /// Rounds per figure; the sides take turns going first [default: 5].
    #[arg(long)]
    rounds: Option<usize>,
    /// Messages per round of the publish figures [default: 2000].
    #[arg(long)]
    messages: Option<usize>,
    /// Concurrent publishers [default: 16].
    #[arg(long)]
    publishers: Option<usize>,
    /// Messages per publish_all / insert_many [default: 1000].
    #[arg(long)]
    batch: Option<usize>,
    /// Batches per round [default: 5].
    #[arg(long)]
    batches: Option<usize>,
    /// Latency samples per round [default: 500].
    #[arg(long)]
    samples: Option<usize>,
    /// Local subscribers of the memory figure, compared with one [default: 100].
    #[arg(long)]
    subscribers: Option<usize>,
    /// Messages published during the memory figure [default: 15000].
    #[arg(long)]
    memory_messages: Option<usize>,
    /// Concurrent callers of the request figure [default: 16].
    #[arg(long)]
    callers: Option<usize>,
    /// Serving instances of the request figure (each a bus of its own) [default: 3].
    #[arg(long)]
    servers: Option<usize>,
    /// Requests per round [default: 1000].
    #[arg(long)]
    requests: Option<usize>,
    /// Workers of the work figure [default: 4].
    #[arg(long)]
    workers: Option<usize>,
    /// Jobs per round of the work figure [default: 500].
    #[arg(long)]
    jobs: Option<usize>,
    /// Measure a fleet of this many processes instead (comma separated, e.g. 1,4,16,32):
    /// each a process of its own service; targeted and broadcast traffic; the events
    /// each process's hub reads, the server's CPU, delivery p50/p99, with the hub's
    /// stream targeted and with every insert (`common.intracom.db.hub.selection`).
    #[arg(long, value_delimiter = ',', value_name = "P,…")]
    processes: Vec<usize>,
    /// Targeted messages per fleet run, each to one process's service in turn [default: 2000].
    #[arg(long, value_name = "N")]
    fleet_messages: Option<usize>,
    /// Broadcasts per fleet run, among the targeted messages [default: 100].
    #[arg(long, value_name = "N")]
    broadcasts: Option<usize>,
    /// With --processes: run each fleet size twice, attached directly and through this
    /// many gateways (`intracom serve` processes the bench starts on the same database,
    /// each fleet process on the http medium, attached round-robin), with the hub's
    /// stream targeted; reports the server's change streams, its CPU and the gateways',
    /// and delivery p50/p99 side by side. Needs the `gateway` and `http` features.
    #[arg(long, value_name = "N", requires = "processes", value_parser = clap::value_parser!(u16).range(1..=64))]
    via_gateways: Option<u16>,
    /// The server's process id, for its CPU time from /proc (default: the process
    /// listening on the URI's port when the server runs on this machine; else
    /// serverStatus).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Measure claims and catch-ups with this many messages retained instead (comma
    /// separated, e.g. 10000,1000000), in TTL and capped retention, with each query's
    /// plan from `explain`.
    #[arg(long, value_delimiter = ',', value_name = "N,…")]
    retained: Vec<usize>,
    /// The retention modes of --retained (comma separated) [default: ttl,capped].
    #[arg(long, value_delimiter = ',', value_name = "MODE,…")]
    retention: Vec<RetentionMode>,
    /// Claims per retained run [default: 200].
    #[arg(long, value_name = "N")]
    claims: Option<usize>,
    /// Messages read by the catch-up of each retained run [default: 2000].
    #[arg(long, value_name = "N")]
    catch_up: Option<usize>,
    /// Internal: run as process N of a fleet (the bench starts itself with it).
    #[arg(long, hide = true, value_name = "N")]
    fleet_probe: Option<usize>,
    /// Internal: messages addressed to this fleet process.
    #[arg(long, hide = true, value_name = "N", default_value_t = 0)]
    fleet_expect: usize,
    /// Internal: measure one side of the memory figure in this process (the bench
    /// starts itself with it, so each side starts from a fresh process).
    #[arg(long, hide = true, value_name = "SUBSCRIBERS")]
    memory_probe: Option<usize>,
}

impl BenchArgs {
    fn sizes(&self) -> Sizes {
        let base = if self.tiny {
            Sizes::TINY
        } else {
            Sizes::DEFAULT
        };
        let pick = |flag: Option<usize>, default: usize| flag.unwrap_or(default).max(1);
        Sizes {
            rounds: pick(self.rounds, base.rounds),
            messages: pick(self.messages, base.messages),
            publishers: pick(self.publishers, base.publishers),
            batch: pick(self.batch, base.batch),
            batches: pick(self.batches, base.batches),
            samples: pick(self.samples, base.samples),
            subscribers: pick(self.subscribers, base.subscribers),
            memory_messages: pick(self.memory_messages, base.memory_messages),
            callers: pick(self.callers, base.callers),
            servers: pick(self.servers, base.servers),
            requests: pick(self.requests, base.requests),
            workers: pick(self.workers, base.workers),
            jobs: pick(self.jobs, base.jobs),
        }
    }
}

/// The bench's own service and its actions, added to whatever the configuration says.
pub(crate) const SERVICE: &str = "bench";
pub(crate) const ACTIONS: [&str; 3] = ["reload", "echo", "job"];

/// The configuration of one bus of the bench: the operator's, as the bench's service.
pub(crate) fn bench_config(base: &Config, database: Option<&str>, instance: &str) -> Config {
    let mut config = base.clone();
    config.service = SERVICE.to_string();
    config.instance = Some(instance.to_string());
    config.senders.insert(
        SERVICE.to_string(),
        ACTIONS.iter().map(|a| a.to_string()).collect(),
    );
    if let Some(database) = database {
        config.db.database = database.to_string();
    }
    config
}

/// The message every publish figure sends (the same as `cargo bench`'s).
pub(crate) fn sample() -> Message {
    Message::broadcast("reload")
        .body(doc! { "tenant": 7, "reason": "price list changed", "items": [1, 2, 3] })
}

/// A boxed side of a round.
pub(crate) type Side<'a, T> = Pin<Box<dyn Future<Output = Result<T, Failure>> + 'a>>;

/// Runs the sides of one round one after the other, starting with side
/// `round % sides.len()`, so that every side goes first in turn; each side is one step
/// of the progress bar. Results come back in the order the sides were given.
pub(crate) async fn take_turns<'a, T>(
    round: usize,
    progress: &mut Progress,
    what: &str,
    sides: Vec<(&str, Side<'a, T>)>,
) -> Result<Vec<T>, Failure> {
    let n = sides.len();
    let mut slots: Vec<Option<(&str, Side<'a, T>)>> = sides.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for k in 0..n {
        let i = (round + k) % n;
        if let Some((label, side)) = slots[i].take() {
            progress.at(&format!("{what}, round {}: {label}", round + 1));
            out[i] = Some(side.await?);
            progress.step();
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Messages per second for `count` operations in `elapsed`.
pub(crate) fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The `q`-quantile (0..=1) of durations, in milliseconds.
pub(crate) fn quantile_ms(samples: &mut [Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let index = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[index.min(samples.len() - 1)].as_secs_f64() * 1e3
}

/// Resident memory of this process, in bytes (Linux: `VmRSS` of /proc/self/status).
pub(crate) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The `--config` file the bench was started with, handed to the memory probes.
static CONFIG_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

pub(crate) async fn bench(config: &Config, config_file: Option<&Path>, args: BenchArgs) -> Outcome {
    CONFIG_FILE.get_or_init(|| config_file.map(Path::to_path_buf));
    let sizes = args.sizes();
    if let Some(subscribers) = args.memory_probe {
        return memory::probe(config, subscribers, sizes.memory_messages).await;
    }
    if let Some(index) = args.fleet_probe {
        return fleet::probe(config, index, args.fleet_expect).await;
    }
    if !args.processes.is_empty() || !args.retained.is_empty() {
        if config.medium != MediumKind::Db {
            return Err(fail(
                "--processes and --retained measure the MongoDB medium",
                "use --medium db (with --uri)",
            ));
        }
        let tiny = args.tiny;
        if args.via_gateways.is_some() && !gateways::BUILT {
            return Err(gateways::not_built());
        }
        if !args.processes.is_empty() {
            let sizes = fleet::FleetSizes {
                processes: args.processes.clone(),
                messages: args.fleet_messages.unwrap_or(if tiny { 20 } else { 2000 }),
                broadcasts: args.broadcasts.unwrap_or(if tiny { 2 } else { 100 }),
                server_pid: args.server_pid,
                via_gateways: args.via_gateways.map(usize::from),
            };
            fleet::run(config, &sizes, args.json).await?;
        }
        if !args.retained.is_empty() {
            let modes = if args.retention.is_empty() {
                vec![RetentionMode::Ttl, RetentionMode::Capped]
            } else {
                args.retention.clone()
            };
            let sizes = retained::RetainedSizes {
                retained: args.retained.clone(),
                modes: modes
                    .iter()
                    .map(|m| match m {
                        RetentionMode::Ttl => intracom::config::Retention::Ttl,
                        RetentionMode::Capped => intracom::config::Retention::Capped,
                    })
                    .collect(),
                claims: args.claims.unwrap_or(if tiny { 10 } else { 200 }).max(1),
                catch_up: args.catch_up.unwrap_or(if tiny { 20 } else { 2000 }).max(1),
            };
            retained::run(config, &sizes, args.json).await?;
        }
        return Ok(());
    }
    let available: &[Which] = match config.medium {
        MediumKind::Db => &[
            Which::Publish,
            Which::Concurrent,
            Which::Batch,
            Which::Latency,
            Which::Memory,
            Which::Request,
            Which::Work,
        ],
        MediumKind::Memory => &[Which::Fanout, Which::Memory],
        other => {
            return Err(fail(
                format!("`bench` does not measure the {other} medium"),
                "use --medium db (with --uri) or --medium memory",
            ))
        }
    };
    let wanted: Vec<Which> = if args.only.is_empty() {
        available.to_vec()
    } else {
        let refused: Vec<String> = args
            .only
            .iter()
            .filter(|w| !available.contains(w))
            .map(|w| format!("{w:?}").to_lowercase())
            .collect();
        if !refused.is_empty() {
            return Err(fail(
                format!(
                    "not measured on the {} medium: {}",
                    config.medium,
                    refused.join(", ")
                ),
                "see `intracom bench --help` for the figures of each medium",
            ));
        }
        args.only.clone()
    };
    let mut report = Report::new(config, &sizes);
    let mut progress = Progress::new(steps(&wanted, &sizes), !args.json);
    let started = Instant::now();
    match config.medium {
        MediumKind::Db => {
            let bench = db::DbBench::connect(config, &sizes).await?;
            report.server = bench.server_description().await;
            for which in &wanted {
                let figures = bench.run(*which, &mut progress).await?;
                report.figures.extend(figures);
            }
        }
        _ => {
            for which in &wanted {
                let figures = memory::run(config, &sizes, *which, &mut progress).await?;
                report.figures.extend(figures);
            }
        }
    }
    progress.finish();
    report.elapsed = started.elapsed();
    if args.json {
        out!("{}", report.json());
    } else {
        crate::output::write_out(format_args!("{}", report.table()));
    }
    Ok(())
}

/// How many steps the progress bar counts: one per side per round of each figure.
fn steps(wanted: &[Which], sizes: &Sizes) -> usize {
    wanted
        .iter()
        .map(|w| match w {
            Which::Publish | Which::Batch | Which::Request => 3,
            Which::Fanout => 6,
            _ => 2,
        })
        .sum::<usize>()
        * sizes.rounds
}

/// Measures one side of the memory figure in a fresh process: this executable with
/// `--memory-probe`, which prints the growth in bytes on its last line.
pub(crate) async fn memory_in_child(
    config: &Config,
    subscribers: usize,
    messages: usize,
) -> Result<f64, Failure> {
    let exe = std::env::current_exe().map_err(|e| {
        fail(
            format!("cannot find this executable: {e}"),
            "run intracom from its file",
        )
    })?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("bench")
        .arg("--medium")
        .arg(config.medium.to_string())
        .arg("--memory-probe")
        .arg(subscribers.to_string())
        .arg("--memory-messages")
        .arg(messages.to_string())
        .stdin(Stdio::null());
    if let Some(Some(file)) = CONFIG_FILE.get() {
        command.arg("--config").arg(file);
    }
    if config.medium == MediumKind::Db {
        command
            .arg("--uri")
            .arg(&config.db.uri)
            .arg("--database")
            .arg(&config.db.database);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| fail(format!("memory probe: {e}"), "a bug: please report it"))?
        .map_err(|e| {
            fail(
                format!("cannot start the memory probe: {e}"),
                "check that the intracom executable can be run",
            )
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let growth = stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse::<f64>().ok());
    match (output.status.success(), growth) {
        (true, Some(bytes)) => Ok(bytes),
        _ => Err(fail(
            format!(
                "the memory probe failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            "run it alone with INTRACOM_LOG=debug to see why",
        )),
    }
}
