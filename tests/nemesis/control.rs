//! The nemesis run: starts the server and the workload's processes (each behind its
//! own fault proxy), applies faults on a seeded random schedule, heals everything,
//! drains, reads the final collections and hands it all to the checker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use intracom::bson::{doc, Document};
use serde_json::{json, Value};

use crate::checker::{self, Evidence, FaultRecord};
use crate::history::{now_ms, Rng};
use crate::proxy::Proxy;
use crate::servers::{self, Kind, Target};
use crate::workload::{self, CALLERS, PUBLISHERS, SERVERS, SUBSCRIBERS, WORKERS};

/// The database the workload uses.
pub const DATABASE: &str = "nemesis";
/// The server's oplog: tiny, so that resumes fail and catch-ups run under faults.
pub const OPLOG_MAX_ENTRIES: u64 = 1000;
/// How long the drain after the last heal may take: 120 s, and 240 s on the Python
/// server (slower, and its misread `$$NOW` has workers take each other's claims, so
/// the backlog of jobs goes down slowly: drains of 115, 172 and 176 s were measured).
pub fn drain_bound_ms(target: &Target) -> f64 {
    if *target == Target::Secantus(Kind::SecantusPy) {
        240_000.0
    } else {
        120_000.0
    }
}

/// What a run is asked to do.
#[derive(Clone, Debug)]
pub struct Settings {
    pub target: Target,
    pub seed: u64,
    pub seconds: u64,
    /// Where to copy the report (`INTRACOM_NEMESIS_REPORTS`), if anywhere.
    pub reports: Option<PathBuf>,
    /// `INTRACOM_NEMESIS_SCHEDULE=directed`: only "kill a subscriber, restart it, pause
    /// the server for a few seconds about a second later", every 6–9 s (a replay of a
    /// known failure, not a random schedule).
    pub directed: bool,
    /// What the publishers', callers' and workers' pauses are multiplied by
    /// (`INTRACOM_NEMESIS_PACE`; default [`Target`]-dependent, see `default_pace`).
    pub pace: u64,
}

/// The default pace of the workload on a server: 1 (a publisher every 250 ms, a caller
/// every 300 ms, a worker's poll every 500 ms), and 2 on the SecantusDB Python server.
/// That server answers every claim (a `findAndModify` whose filter has a top-level
/// operator) by reading the whole collection: 500 claims and settles took 11–15 s beside
/// no settled requests and 120–140 s beside 8000, in two runs (0.8–1.4 s on the Rust
/// server; `scripts/request-probe.py claims URI 0,2000,8000`). The collection keeps every
/// message of a run for the checker, so the claims slow as it grows; at full pace the
/// server's one core was saturated within five minutes and the run stopped draining.
/// The invariants judged are the same at any pace.
pub fn default_pace(target: &Target) -> u64 {
    match target {
        Target::Secantus(Kind::SecantusPy) => 2,
        _ => 1,
    }
}

/// How the server is had and hurt.
enum ServerHandle {
    Secantus(servers::Server),
    /// A mongod named by the environment, hurt by commands from the environment.
    Mongod {
        restart: Option<String>,
        pause: Option<String>,
        resume: Option<String>,
    },
}

impl ServerHandle {
    fn can_kill(&self) -> bool {
        match self {
            ServerHandle::Secantus(_) => true,
            ServerHandle::Mongod { restart, .. } => restart.is_some(),
        }
    }

    fn can_pause(&self) -> bool {
        match self {
            ServerHandle::Secantus(_) => true,
            ServerHandle::Mongod { pause, resume, .. } => pause.is_some() && resume.is_some(),
        }
    }
}

fn shell(command: &str) -> Result<(), String> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .map_err(|e| format!("{command}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command}: {status}"))
    }
}

/// One workload process.
struct Proc {
    role: &'static str,
    index: u32,
    name: String,
    proxy: Proxy,
    child: Option<Child>,
    incarnation: u32,
}

impl Proc {
    fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Signals the child's process group: under `faketime` the workload is the
    /// wrapper's child, not the wrapper itself.
    fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the group of a child we spawned and have not reaped.
            unsafe {
                libc::kill(-pid, signal);
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: as above; the group goes, the leader is reaped below.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Run {
    /// Whether `faketime` can be run (else the clock-skew fault is a plain client kill).
    faketime: bool,
    dir: PathBuf,
    seed: u64,
    pace: u64,
    database: String,
    procs: Vec<Proc>,
    exe: PathBuf,
}

impl Run {
    fn spawn(&mut self, i: usize, skew_s: Option<i64>) -> Result<(), String> {
        let p = &mut self.procs[i];
        p.incarnation += 1;
        let uri = format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=5000&connectTimeoutMS=3000&heartbeatFrequencyMS=1000",
            p.proxy.port()
        );
        let mut command = match skew_s {
            Some(skew) => {
                let mut c = Command::new("faketime");
                c.arg("-f").arg(format!("{skew:+}s")).arg(&self.exe);
                c.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
                c
            }
            None => Command::new(&self.exe),
        };
        let log_path = self
            .dir
            .join("logs")
            .join(format!("{}.{}.log", p.name, p.incarnation));
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        {
            use std::os::unix::process::CommandExt;
            // A group of its own, so that a kill reaches the workload under `faketime`.
            command.process_group(0);
        }
        command
            .env("INTRACOM_NEMESIS_ROLE", p.role)
            .env("INTRACOM_NEMESIS_INDEX", p.index.to_string())
            .env("INTRACOM_NEMESIS_INCARNATION", p.incarnation.to_string())
            .env("INTRACOM_NEMESIS_URI", uri)
            .env("INTRACOM_NEMESIS_DB", &self.database)
            .env("INTRACOM_NEMESIS_DIR", &self.dir)
            .env("INTRACOM_NEMESIS_SEED", self.seed.to_string())
            .env("INTRACOM_NEMESIS_PACE", self.pace.to_string())
            .env(
                "RUST_LOG",
                std::env::var("INTRACOM_NEMESIS_LOG").unwrap_or_else(|_| "intracom=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = servers::spawn_kept(command).map_err(|e| format!("{}: {e}", p.name))?;
        p.child = Some(child);
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    ServerKill,
    ServerPause,
    ClientKill,
    ClientPause,
    ClientSkew,
    ProxyReset,
    ProxyBlackhole,
    ProxyLatency,
    ProxyCut,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::ServerKill => "server-kill9",
            FaultKind::ServerPause => "server-sigstop",
            FaultKind::ClientKill => "client-kill9",
            FaultKind::ClientPause => "client-sigstop",
            FaultKind::ClientSkew => "client-clock-skew",
            FaultKind::ProxyReset => "proxy-reset",
            FaultKind::ProxyBlackhole => "proxy-blackhole",
            FaultKind::ProxyLatency => "proxy-latency",
            FaultKind::ProxyCut => "proxy-cut-reply",
        }
    }

    fn is_server(self) -> bool {
        matches!(self, FaultKind::ServerKill | FaultKind::ServerPause)
    }

    /// Relative weights of the schedule.
    const WEIGHTED: [(FaultKind, u32); 9] = [
        (FaultKind::ServerKill, 2),
        (FaultKind::ServerPause, 2),
        (FaultKind::ClientKill, 3),
        (FaultKind::ClientPause, 2),
        (FaultKind::ClientSkew, 1),
        (FaultKind::ProxyReset, 1),
        (FaultKind::ProxyBlackhole, 2),
        (FaultKind::ProxyLatency, 1),
        (FaultKind::ProxyCut, 2),
    ];

    fn pick(rng: &mut Rng) -> FaultKind {
        let total: u32 = Self::WEIGHTED.iter().map(|w| w.1).sum();
        let mut x = rng.below(total as usize) as u32;
        for (kind, w) in Self::WEIGHTED {
            if x < w {
                return kind;
            }
            x -= w;
        }
        FaultKind::ClientKill
    }
}

/// A fault being applied: healed at `heal_at`.
struct Active {
    record: usize,
    kind: FaultKind,
    /// The process hurt (None: the server).
    proc: Option<usize>,
    heal_at: f64,
}

/// Runs the nemesis and the checker; the report, and whether every invariant held.
pub fn run(settings: &Settings) -> Result<(Value, bool), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let result = runtime.block_on(run_async(settings));
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn run_async(settings: &Settings) -> Result<(Value, bool), String> {
    let seed = settings.seed;
    let label = settings.target.short();
    let dir = std::env::temp_dir().join(format!("intracom-nemesis-{label}-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["history", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    println!(
        "nemesis: seed {seed} on {} for {} s at pace {} (replay: scripts/nemesis --server {label} --seed {seed} --seconds {} --pace {}); run directory {}",
        settings.target,
        settings.seconds,
        settings.pace,
        settings.seconds,
        settings.pace,
        dir.display()
    );
    // The server.
    let (mut server, direct_uri, upstream) = match &settings.target {
        Target::Secantus(kind) => {
            let server = blocking(|| {
                servers::Server::start(
                    *kind,
                    servers::Options {
                        oplog_max_entries: Some(OPLOG_MAX_ENTRIES),
                    },
                )
            })?;
            let uri = server.uri();
            let addr: SocketAddr = format!("127.0.0.1:{}", server.port())
                .parse()
                .map_err(|e| format!("address: {e}"))?;
            (ServerHandle::Secantus(server), uri, addr)
        }
        Target::Mongod => {
            let uri = std::env::var(servers::MONGODB_URI_ENV)
                .map_err(|_| format!("{} is not set", servers::MONGODB_URI_ENV))?;
            let addr = first_host(&uri)?;
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            (
                ServerHandle::Mongod {
                    restart: env("INTRACOM_NEMESIS_MONGOD_RESTART"),
                    pause: env("INTRACOM_NEMESIS_MONGOD_PAUSE"),
                    resume: env("INTRACOM_NEMESIS_MONGOD_RESUME"),
                },
                uri,
                addr,
            )
        }
    };
    let database = match settings.target {
        Target::Mongod => format!("{DATABASE}_{seed}"),
        Target::Secantus(_) => DATABASE.to_string(),
    };
    let client = mongodb::Client::with_uri_str(&direct_uri)
        .await
        .map_err(|e| format!("checker client: {e}"))?;
    let db = client.database(&database);
    db.collection::<Document>("effects")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "job": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .map_err(|e| format!("effects index: {e}"))?;

    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut procs = Vec::new();
    for (role, count) in [
        ("sub", SUBSCRIBERS),
        ("work", WORKERS),
        ("srv", SERVERS),
        ("call", CALLERS),
        ("pub", PUBLISHERS),
    ] {
        for index in 1..=count {
            procs.push(Proc {
                role,
                index,
                name: format!("{role}{index}"),
                proxy: Proxy::start(upstream)
                    .await
                    .map_err(|e| format!("proxy: {e}"))?,
                child: None,
                incarnation: 0,
            });
        }
    }
    let faketime = Command::new("faketime")
        .arg("-f")
        .arg("+0s")
        .arg("true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !faketime {
        println!("nemesis: no faketime (Debian package faketime): clock-skew faults are plain client kills");
    }
    let mut run = Run {
        faketime,
        dir: dir.clone(),
        seed,
        pace: settings.pace,
        database: database.clone(),
        procs,
        exe,
    };
    for i in 0..run.procs.len() {
        run.spawn(i, None)?;
    }
    let mut rng = Rng::new(seed);
    let start = now_ms();
    let wall_minus_monotonic_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
        - now_ms();
    let end = start + settings.seconds as f64 * 1000.0;
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut active: Vec<Active> = Vec::new();
    let mut next_fault = start + 3000.0;
    let mut failure: Option<String> = None;
    let mut follow_up = false;
    while now_ms() < end && failure.is_none() {
        // Heal what is due.
        let now = now_ms();
        let due: Vec<usize> = (0..active.len())
            .filter(|&i| active[i].heal_at <= now)
            .collect();
        for i in due.into_iter().rev() {
            let a = active.remove(i);
            if let Err(e) = heal(&mut run, &mut server, &a, &mut faults) {
                failure = Some(e);
            }
            // A restarted client is catching up: half the time, a server fault follows
            // within two seconds (where a resumed subscriber's promises are tested).
            if matches!(a.kind, FaultKind::ClientKill | FaultKind::ClientSkew)
                && (settings.directed || rng.chance(0.5))
            {
                next_fault = next_fault.min(now_ms() + rng.range(800.0, 2000.0));
                follow_up = true;
            }
        }
        if now >= next_fault && failure.is_none() {
            let forced = std::mem::take(&mut follow_up)
                .then(|| {
                    if settings.directed || rng.chance(0.7) {
                        FaultKind::ServerPause
                    } else {
                        FaultKind::ServerKill
                    }
                })
                .or(settings.directed.then_some(FaultKind::ClientKill));
            let short = forced.is_some_and(FaultKind::is_server);
            if let Err(e) = inject(
                &mut run,
                &mut server,
                &mut rng,
                &mut active,
                &mut faults,
                forced,
                short,
            ) {
                failure = Some(e);
            }
            // Mean about 4.6 s with the quiet periods.
            let mut gap = (-4000.0 * (1.0 - rng.unit()).ln()).clamp(500.0, 12_000.0);
            if rng.chance(0.05) {
                gap += rng.range(8_000.0, 15_000.0); // a quiet period
            }
            if settings.directed {
                gap = rng.range(6_000.0, 9_000.0);
            }
            next_fault = now_ms() + gap;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Heal everything.
    for a in std::mem::take(&mut active) {
        if let Err(e) = heal(&mut run, &mut server, &a, &mut faults) {
            failure.get_or_insert(e);
        }
    }
    let faults_end = now_ms();
    // Drain: producers stop; wait until the outboxes are empty, every job is settled and
    // every subscription has what the collection holds for it.
    std::fs::write(workload::drain_flag(&dir), b"").map_err(|e| format!("drain flag: {e}"))?;
    let mut drain_ms = None;
    if failure.is_none() {
        while now_ms() - faults_end < drain_bound_ms(&settings.target) {
            if drained(&dir, &db, faults_end).await {
                drain_ms = Some(now_ms() - faults_end);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }
    // A few more seconds: a late redelivery or a late settle shows up in the histories.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in &mut run.procs {
        p.signal(libc::SIGCONT);
        p.kill9();
    }
    let cuts: u64 = run.procs.iter().map(|p| p.proxy.cuts()).sum();
    let evidence = Evidence {
        server: settings.target.to_string(),
        python_server: settings.target == Target::Secantus(Kind::SecantusPy),
        seed,
        seconds: settings.seconds,
        pace: settings.pace,
        start_ms: start,
        wall_minus_monotonic_ms,
        faults_end_ms: faults_end,
        drain_ms,
        drain_bound_ms: drain_bound_ms(&settings.target),
        history: crate::history::read_all(&dir.join("history")),
        faults,
        messages: read_all(&db, "messages").await?,
        dead: read_all(&db, "dead").await?,
        effects: read_all(&db, "effects").await?,
        replies_cut: cuts,
        aborted: failure.clone(),
    };
    let (mut report, passed) = checker::check(&evidence);
    report["run_dir"] = json!(dir.display().to_string());
    let closing = report["closing"].as_str().unwrap_or_default().to_string();
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    let _ = std::fs::write(dir.join("report.json"), &text);
    if let Some(reports) = &settings.reports {
        let _ = std::fs::create_dir_all(reports);
        let name = format!("{label}-{seed}-{}s", settings.seconds);
        let _ = std::fs::write(reports.join(format!("{name}.json")), &text);
        let _ = std::fs::write(reports.join(format!("{name}.txt")), format!("{closing}\n"));
    }
    println!("{text}");
    if let ServerHandle::Secantus(server) = &mut server {
        server.stop();
        if passed {
            server.discard();
        } else {
            server.keep_dir();
            println!(
                "nemesis: server data and logs kept in {}",
                server.dir().display()
            );
        }
    }
    if passed {
        let _ = std::fs::remove_dir_all(&dir);
        if matches!(settings.target, Target::Mongod) {
            let _ = db.drop().await;
        }
    } else {
        println!(
            "nemesis: histories, logs and report kept in {}; seed {seed} (replay: scripts/nemesis --server {label} --seed {seed} --seconds {} --pace {})",
            dir.display(),
            settings.seconds,
            settings.pace
        );
    }
    println!("{closing}");
    Ok((report, passed))
}

fn first_host(uri: &str) -> Result<SocketAddr, String> {
    let rest = uri
        .split("://")
        .nth(1)
        .ok_or_else(|| format!("not a connection string: {uri}"))?;
    let hosts = rest.split(['/', '?']).next().unwrap_or_default();
    let hosts = hosts.rsplit('@').next().unwrap_or_default();
    let host = hosts.split(',').next().unwrap_or_default();
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:27017")
    };
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))
}

async fn read_all(db: &mongodb::Database, name: &str) -> Result<Vec<Document>, String> {
    use futures::TryStreamExt;
    let mut last = String::new();
    for _ in 0..10 {
        match db.collection::<Document>(name).find(doc! {}).await {
            Ok(cursor) => match cursor.try_collect().await {
                Ok(docs) => return Ok(docs),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("reading {name}: {last}"))
}

/// Whether the workload has caught up after the drain started at `since`.
async fn drained(dir: &Path, db: &mongodb::Database, since: f64) -> bool {
    let history = dir.join("history");
    for k in 1..=PUBLISHERS {
        let records = crate::history::read_process(&history, &format!("pub{k}"));
        // The newest outbox record after the drain started says empty.
        let last = records
            .iter()
            .rev()
            .find(|r| r.k() == "outbox" || r.k() == "outbox-empty");
        let empty = last.is_some_and(|r| r.t >= since && r.k() == "outbox-empty");
        if !empty {
            return false;
        }
    }
    let messages = db.collection::<Document>("messages");
    match messages
        .count_documents(doc! { "action": "job.run", "state": "pending" })
        .await
    {
        Ok(0) => {}
        _ => return false,
    }
    let Ok(stored) = read_all(db, "messages").await else {
        return false;
    };
    let (records, _) = crate::history::read_all(&history);
    for (_, _, name, only) in workload::SUBSCRIPTIONS {
        let delivered: std::collections::HashSet<&str> = records
            .iter()
            .filter(|r| r.k() == "deliver" && r.s("sub") == name)
            .map(|r| r.s("id"))
            .collect();
        for m in &stored {
            if m.get_str("type").ok() != Some("broadcast") {
                continue;
            }
            let action = m.get_str("action").unwrap_or_default();
            if only.is_some_and(|a| a != action) {
                continue;
            }
            if !delivered.contains(m.get_str("_id").unwrap_or_default()) {
                return false;
            }
        }
    }
    true
}

fn inject(
    run: &mut Run,
    server: &mut ServerHandle,
    rng: &mut Rng,
    active: &mut Vec<Active>,
    faults: &mut Vec<FaultRecord>,
    forced: Option<FaultKind>,
    short: bool,
) -> Result<(), String> {
    let server_busy = active.iter().any(|a| a.proc.is_none());
    let busy: Vec<usize> = active.iter().filter_map(|a| a.proc).collect();
    let free: Vec<usize> = (0..run.procs.len()).filter(|i| !busy.contains(i)).collect();
    let mut kind = forced.unwrap_or_else(|| FaultKind::pick(rng));
    if kind == FaultKind::ClientSkew && !run.faketime {
        kind = FaultKind::ClientKill;
    }
    for _ in 0..20 {
        let possible = match kind {
            FaultKind::ServerKill => !server_busy && server.can_kill(),
            FaultKind::ServerPause => !server_busy && server.can_pause(),
            _ => !free.is_empty(),
        };
        if possible {
            break;
        }
        kind = FaultKind::pick(rng);
    }
    let now = now_ms();
    let mut record = FaultRecord {
        kind: kind.name().to_string(),
        target: "server".into(),
        start_ms: now,
        heal_ms: None,
        detail: json!({}),
    };
    let proc = if kind.is_server() {
        if server_busy {
            return Ok(());
        }
        None
    } else {
        if free.is_empty() {
            return Ok(());
        }
        // A paused client is most often one that holds leases.
        let pick = if forced == Some(FaultKind::ClientKill) {
            let subscribers: Vec<usize> = free
                .iter()
                .copied()
                .filter(|&i| run.procs[i].role == "sub")
                .collect();
            if subscribers.is_empty() {
                return Ok(());
            }
            subscribers[rng.below(subscribers.len())]
        } else if kind == FaultKind::ClientPause && rng.chance(0.7) {
            let holders: Vec<usize> = free
                .iter()
                .copied()
                .filter(|&i| matches!(run.procs[i].role, "work" | "srv"))
                .collect();
            if holders.is_empty() {
                free[rng.below(free.len())]
            } else {
                holders[rng.below(holders.len())]
            }
        } else {
            // Subscribers hold the most promises: two in five client faults are theirs.
            let subscribers: Vec<usize> = free
                .iter()
                .copied()
                .filter(|&i| run.procs[i].role == "sub")
                .collect();
            if !subscribers.is_empty() && rng.chance(0.4) {
                subscribers[rng.below(subscribers.len())]
            } else {
                free[rng.below(free.len())]
            }
        };
        record.target = run.procs[pick].name.clone();
        Some(pick)
    };
    let hold_ms = match kind {
        FaultKind::ServerKill => {
            match server {
                ServerHandle::Secantus(s) => {
                    blocking(|| s.kill9());
                    // The process is gone (reaped) only now: writes acknowledged until
                    // then can be lost too.
                    record.detail = json!({ "dead_at": now_ms() });
                }
                ServerHandle::Mongod { restart, .. } => {
                    // The command kills and restarts: it is the whole fault.
                    let command = restart.clone().unwrap_or_default();
                    blocking(|| shell(&command))?;
                    record.detail = json!({ "dead_at": now_ms() });
                }
            }
            rng.range(200.0, 3000.0)
        }
        FaultKind::ServerPause => {
            match server {
                ServerHandle::Secantus(s) => s.pause(),
                ServerHandle::Mongod { pause, .. } => {
                    let command = pause.clone().unwrap_or_default();
                    blocking(|| shell(&command))?;
                }
            }
            // Sometimes past the work lease (3 s) and server selection (5 s); a few
            // seconds when it follows a client's restart.
            if short {
                rng.range(2000.0, 4000.0)
            } else {
                rng.range(1000.0, 12_000.0)
            }
        }
        FaultKind::ClientKill => {
            if let Some(i) = proc {
                run.procs[i].kill9();
            }
            if forced.is_some() {
                rng.range(300.0, 800.0)
            } else {
                rng.range(200.0, 3000.0)
            }
        }
        FaultKind::ClientSkew => {
            let skew = (rng.range(60.0, 600.0) as i64) * if rng.chance(0.5) { 1 } else { -1 };
            if let Some(i) = proc {
                run.procs[i].kill9();
                run.spawn(i, Some(skew))?;
            }
            record.detail = json!({ "skew_s": skew });
            rng.range(5000.0, 25_000.0)
        }
        FaultKind::ClientPause => {
            if let Some(i) = proc {
                run.procs[i].signal(libc::SIGSTOP);
            }
            rng.range(2000.0, 10_000.0)
        }
        FaultKind::ProxyReset => {
            if let Some(i) = proc {
                run.procs[i].proxy.reset();
            }
            0.0
        }
        FaultKind::ProxyBlackhole => {
            let d = rng.range(1000.0, 20_000.0);
            if let Some(i) = proc {
                run.procs[i]
                    .proxy
                    .blackhole(Duration::from_millis(d as u64));
            }
            d
        }
        FaultKind::ProxyLatency => {
            let ms = rng.range(50.0, 400.0) as u64;
            if let Some(i) = proc {
                run.procs[i].proxy.latency(ms);
            }
            record.detail = json!({ "latency_ms": ms });
            rng.range(3000.0, 15_000.0)
        }
        FaultKind::ProxyCut => {
            if let Some(i) = proc {
                run.procs[i].proxy.arm_cut(true);
            }
            rng.range(1000.0, 5000.0)
        }
    };
    let index = faults.len();
    faults.push(record);
    active.push(Active {
        record: index,
        kind,
        proc,
        heal_at: now + hold_ms,
    });
    Ok(())
}

fn heal(
    run: &mut Run,
    server: &mut ServerHandle,
    a: &Active,
    faults: &mut [FaultRecord],
) -> Result<(), String> {
    match a.kind {
        FaultKind::ServerKill => {
            if let ServerHandle::Secantus(s) = server {
                blocking(|| s.restart())?;
            }
        }
        FaultKind::ServerPause => match server {
            ServerHandle::Secantus(s) => s.resume(),
            ServerHandle::Mongod { resume, .. } => {
                let command = resume.clone().unwrap_or_default();
                blocking(|| shell(&command))?;
            }
        },
        FaultKind::ClientKill | FaultKind::ClientSkew => {
            if let Some(i) = a.proc {
                run.procs[i].kill9();
                run.spawn(i, None)?;
            }
        }
        FaultKind::ClientPause => {
            if let Some(i) = a.proc {
                run.procs[i].signal(libc::SIGCONT);
            }
        }
        FaultKind::ProxyReset
        | FaultKind::ProxyBlackhole
        | FaultKind::ProxyLatency
        | FaultKind::ProxyCut => {
            if let Some(i) = a.proc {
                run.procs[i].proxy.heal();
            }
        }
    }
    faults[a.record].heal_ms = Some(now_ms());
    Ok(())
}
