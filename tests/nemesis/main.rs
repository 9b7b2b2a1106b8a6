//! The nemesis: randomized faults under a mixed workload, judged by a checker.
//!
//! A run starts a server (the SecantusDB Rust or Python server through the test
//! harness, or the mongod named by `INTRACOM_TEST_MONGODB_URI`), the workload as
//! separate processes (this binary started again with `INTRACOM_NEMESIS_ROLE` set, see
//! `workload.rs`), each behind a fault proxy of its own; applies faults on a seeded
//! random schedule (`control.rs`); heals, drains, and judges the histories and the
//! final collections (`checker.rs`). It prints a JSON report and a closing line
//! `nemesis: N passed, N failed` (invariants).
//!
//! Environment:
//! - `INTRACOM_NEMESIS_SECONDS`: length of the fault period of each run (default 120;
//!   `0` reports the runs as ignored);
//! - `INTRACOM_NEMESIS_SEED`: the seed (default: random, printed);
//! - `INTRACOM_NEMESIS_REPORTS`: a directory the report is copied to;
//! - `INTRACOM_NEMESIS_LOG`: the workload's log filter (default `intracom=info`);
//! - `INTRACOM_NEMESIS_PACE`: a factor (1 or more) on the pauses of the publishers,
//!   callers and workers (default 1, and 2 on the Python server:
//!   `control::default_pace` says why);
//! - `INTRACOM_NEMESIS_SCHEDULE=directed`: instead of the random schedule, only "kill a
//!   subscriber, restart it, pause the server 2–4 s about a second later", every 6–9 s;
//! - against a mongod, the server faults come from commands:
//!   `INTRACOM_NEMESIS_MONGOD_RESTART` (kill -9 and start again, e.g.
//!   `docker kill -s KILL mongodb && docker start mongodb`),
//!   `INTRACOM_NEMESIS_MONGOD_PAUSE` / `INTRACOM_NEMESIS_MONGOD_RESUME`
//!   (`docker pause mongodb` / `docker unpause mongodb`); without them, only client and
//!   network faults are applied.
//!
//! `scripts/nemesis --server rs|py|mongod --seed S --seconds N` runs one.

#[path = "../support/servers.rs"]
mod servers;

mod checker;
mod control;
mod history;
mod proxy;
mod workload;

use std::sync::Mutex;

use libtest_mimic::{Arguments, Failed, Trial};
use servers::{Kind, Target};

/// Set while intracom is known to break an invariant the nemesis judges: the default
/// runs are then reported as ignored with this reason, unless `INTRACOM_NEMESIS_SECONDS`
/// asks for them explicitly.
const KNOWN_VIOLATIONS: Option<&str> = None;

/// The default length of a run's fault period, in seconds.
const DEFAULT_SECONDS: u64 = 120;
/// The fewest faults a run of at least two minutes must have applied.
const MIN_FAULTS: u64 = 20;

/// One nemesis at a time: each is 13 processes and a server.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn seconds() -> (u64, bool) {
    match std::env::var("INTRACOM_NEMESIS_SECONDS") {
        Ok(s) if !s.is_empty() => (s.parse().unwrap_or(DEFAULT_SECONDS), true),
        _ => (DEFAULT_SECONDS, false),
    }
}

fn seed() -> u64 {
    if let Some(seed) = std::env::var("INTRACOM_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return seed;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    history::Rng::new(nanos ^ u64::from(std::process::id()) << 32).next_u64() % 1_000_000_000
}

fn nemesis(target: Target) -> Result<(), Failed> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (seconds, _) = seconds();
    let pace = std::env::var("INTRACOM_NEMESIS_PACE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|p| *p >= 1)
        .unwrap_or_else(|| control::default_pace(&target));
    let settings = control::Settings {
        target,
        seed: seed(),
        seconds,
        reports: std::env::var_os("INTRACOM_NEMESIS_REPORTS")
            .filter(|d| !d.is_empty())
            .map(Into::into),
        directed: std::env::var("INTRACOM_NEMESIS_SCHEDULE").is_ok_and(|s| s == "directed"),
        pace,
    };
    let (report, passed) = control::run(&settings)?;
    let faults = report["faults"]["total"].as_u64().unwrap_or(0);
    let closing = report["closing"].as_str().unwrap_or_default().to_string();
    if !passed {
        return Err(format!(
            "{closing} (seed {}; histories and report kept in {})",
            settings.seed,
            report["run_dir"].as_str().unwrap_or_default()
        )
        .into());
    }
    if seconds >= DEFAULT_SECONDS && faults < MIN_FAULTS {
        return Err(format!(
            "only {faults} faults in {seconds} s (seed {}): fewer than {MIN_FAULTS}",
            settings.seed
        )
        .into());
    }
    Ok(())
}

fn main() {
    if std::env::var_os("INTRACOM_NEMESIS_ROLE").is_some() {
        workload::role_main();
    }
    let args = Arguments::from_args();
    let (seconds, explicit) = seconds();
    let mut trials = Vec::new();
    for target in [
        Target::Secantus(Kind::SecantusRs),
        Target::Secantus(Kind::SecantusPy),
        Target::Mongod,
    ] {
        let skip = if seconds == 0 {
            Some("INTRACOM_NEMESIS_SECONDS=0".to_string())
        } else if let Some(reason) = target.unavailable() {
            Some(reason)
        } else if !explicit {
            KNOWN_VIOLATIONS.map(str::to_string)
        } else {
            None
        };
        let name = format!("{}::nemesis", target.short());
        let trial = Trial::test(name, move || nemesis(target));
        trials.push(match skip {
            Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
            None => trial,
        });
    }
    trials.push(Trial::test("history::drops_a_torn_last_line", || {
        history::drops_a_torn_last_line();
        Ok(())
    }));
    trials.push(Trial::test("proxy::forwards_and_cuts_a_reply", || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failed::from(e.to_string()))?
            .block_on(proxy::forwards_and_cuts_a_reply());
        Ok(())
    }));
    for (name, case) in checker::cases() {
        trials.push(Trial::test(format!("checker::{name}"), move || {
            case();
            Ok(())
        }));
    }
    libtest_mimic::run(&args, trials).exit();
}
