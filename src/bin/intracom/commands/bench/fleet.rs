//! `intracom bench --processes 1,4,16,32`: what a fleet of processes costs the server.
//!
//! Each process of the fleet is a real OS process (this executable, started with the
//! hidden `--fleet-probe`), a bus of its own service (`fleet-<n>`) with one default
//! subscription. The bench publishes targeted messages (each to one process's service,
//! in turn) and broadcasts among them, then reads from each process: the events its
//! hub read, its deliveries and their latencies. Around the traffic it reads the
//! server's CPU time (its `/proc/<pid>/stat` when the server runs on this machine,
//! else `serverStatus`'s `extra_info`) and `serverStatus`'s counters. Every P runs with
//! the hub's stream as configured by `common.intracom.db.hub.selection`: `targeted`
//! (only what concerns the process) and `everything` (every insert), side by side.
//!
//! With `--via-gateways N`, every P runs twice, with the hub's stream targeted: once
//! attached directly as above, and once with each process on the `http` medium
//! attached to one of N gateways (`intracom serve` processes the bench starts on the
//! same database, see `gateways.rs`). Both runs count the server's open cursors
//! (`serverStatus` `metrics.cursor.open.total`) once the fleet is subscribed, less those
//! open before the fleet and its gateways started: the change streams the fleet holds
//! on the server.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use intracom::bson::{doc, Document};
use intracom::{Config, Intracom, Message, Subscription};
use mongodb::Client;
use serde_json::json;
use tokio::sync::mpsc;

use super::gateways::{GatewayReading, Gateways};
use super::{bench_config, quantile_ms, CONFIG_FILE};
use crate::output::{fail, Failure, Outcome};

/// The configuration key that chooses what the hub's change stream selects.
pub(crate) const SELECTION_KEY: &str = "common.intracom.db.hub.selection";
/// The environment variable of [`SELECTION_KEY`].
pub(crate) const SELECTION_ENV: &str = "COMMON_INTRACOM_DB_HUB_SELECTION";
/// The counter of change events the hub read (summed over its labels).
pub(crate) const HUB_EVENTS_METRIC: &str = "intracom_hub_events_total";

/// The action of a targeted message, declared by every fleet service.
const PING: &str = "ping";
/// The broadcast that ends a run (the bench's own `echo` action): once a process's
/// subscription delivers it, its hub has read every event before it.
const END: &str = "echo";
/// How long the bench waits for a process to be ready or done (a hang guard).
const PATIENCE: Duration = Duration::from_secs(120);

fn failed(what: &str, error: impl std::fmt::Display) -> Failure {
    fail(
        format!("{what}: {error}"),
        "check the server (`intracom doctor`); INTRACOM_LOG=debug shows more",
    )
}

/// The service of the fleet's process `index`.
pub(crate) fn service(index: usize) -> String {
    format!("fleet-{index}")
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether this build knows [`SELECTION_KEY`].
pub(crate) fn selection_known() -> bool {
    intracom::config::KEYS
        .iter()
        .any(|k| k.name == SELECTION_KEY)
}

// ---- the process side ----

/// A metrics recorder that keeps every counter, by name (labels summed).
#[derive(Clone, Default)]
struct Counters(Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>);

impl Counters {
    fn get(&self, name: &str) -> Option<u64> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name)
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let counter = map.entry(key.name().to_string()).or_default();
        metrics::Counter::from_arc(Arc::clone(counter))
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// One process of the fleet: prints `ready` once subscribed, `delivered` once `expect`
/// messages came, and after the end broadcast one JSON line with its figures.
pub(crate) async fn probe(base: &Config, index: usize, expect: usize) -> Outcome {
    let counters = Counters::default();
    let _ = metrics::set_global_recorder(counters.clone());
    let name = service(index);
    let mut config = base.clone();
    config.service = name.clone();
    config.instance = Some(name.clone());
    config.senders.insert(name, vec![PING.to_string()]);
    let bus = Intracom::connect(config).await?;
    let mut sub = bus.subscribe(Subscription::new()).await?;
    say("ready");
    let mut latencies = Vec::with_capacity(expect);
    loop {
        let delivery = tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut sub))
            .await
            .map_err(|_| failed("fleet probe", "no delivery within 120 s"))?
            .ok_or_else(|| failed("fleet probe", "the subscription ended"))??;
        let message = delivery.message();
        if message.action == END {
            break;
        }
        if let Ok(sent) = message.query.get_i64("sent_us") {
            latencies.push(now_micros().saturating_sub(sent));
        }
        if latencies.len() == expect {
            say("delivered");
        }
        delivery.ack().await?;
    }
    let report = json!({
        "index": index,
        "delivered": latencies.len(),
        "hub_events": counters.get(HUB_EVENTS_METRIC),
        "latencies_us": latencies,
    });
    say(&report.to_string());
    bus.shutdown().await;
    Ok(())
}

/// A line on stdout, flushed at once (the bench reads it while this process runs).
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

// ---- the bench side ----

/// How the fleet's processes reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Each process on the MongoDB medium, with a change stream of its own.
    Direct,
    /// Each process on the `http` medium, through one of this many gateways.
    Gateways(usize),
}

impl Route {
    fn label(self) -> String {
        match self {
            Route::Direct => "direct".into(),
            Route::Gateways(1) => "1 gateway".into(),
            Route::Gateways(n) => format!("{n} gateways"),
        }
    }

    fn gateways(self) -> usize {
        match self {
            Route::Direct => 0,
            Route::Gateways(n) => n,
        }
    }
}

/// What one run (one P, one selection, one route) measured.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub processes: usize,
    pub selection: &'static str,
    pub route: Route,
    pub messages: usize,
    /// Per process: (messages addressed to it, events its hub read for the traffic).
    pub per_process: Vec<(usize, Option<u64>)>,
    pub cpu_seconds: Option<f64>,
    /// The server's open cursors once the fleet subscribed, less those open before.
    pub change_streams: Option<f64>,
    /// The gateways' CPU seconds and their hubs' events over the traffic.
    pub gateways: GatewayReading,
    pub counters: BTreeMap<String, f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub delivered_in: Duration,
}

impl Row {
    /// Events read per message addressed, over all processes (None without the counter);
    /// through gateways, the events the gateways' hubs read.
    fn events_per_addressed(&self) -> Option<f64> {
        let addressed: usize = self.per_process.iter().map(|(a, _)| a).sum();
        let read = match self.route {
            Route::Direct => {
                let mut read = 0u64;
                for (_, events) in &self.per_process {
                    read += (*events)?;
                }
                read as f64
            }
            Route::Gateways(_) => self.gateways.hub_events?,
        };
        Some(read / addressed.max(1) as f64)
    }

    /// Whether each process read exactly the events addressed to it (direct only).
    fn exact(&self) -> Option<bool> {
        if self.route != Route::Direct {
            return None;
        }
        let mut all = true;
        for (expect, events) in &self.per_process {
            all &= (*events)? == *expect as u64;
        }
        Some(all)
    }

    fn cpu_per_1000(&self) -> Option<f64> {
        self.cpu_seconds
            .map(|s| s * 1000.0 / self.messages.max(1) as f64)
    }

    fn gateways_cpu_per_1000(&self) -> Option<f64> {
        self.gateways
            .cpu_seconds
            .map(|s| s * 1000.0 / self.messages.max(1) as f64)
    }

    fn mib_sent(&self) -> Option<f64> {
        self.counters
            .get("network.bytesOut")
            .map(|b| b / (1024.0 * 1024.0))
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "processes": self.processes,
            "selection": self.selection,
            "route": self.route.label(),
            "gateways": self.route.gateways(),
            "server_change_streams": self.change_streams,
            "gateways_cpu_s": self.gateways.cpu_seconds,
            "gateways_cpu_s_per_1000_messages": self.gateways_cpu_per_1000(),
            "gateways_hub_events": self.gateways.hub_events,
            "messages": self.messages,
            "events_per_message_addressed": self.events_per_addressed(),
            "each_process_read_what_was_addressed": self.exact(),
            "per_process": self.per_process.iter().map(|(a, e)| json!({"addressed": a, "hub_events": e})).collect::<Vec<_>>(),
            "server_cpu_s": self.cpu_seconds,
            "server_cpu_s_per_1000_messages": self.cpu_per_1000(),
            "server_mib_sent": self.mib_sent(),
            "server_counters": self.counters,
            "delivery_p50_ms": finite(self.p50_ms),
            "delivery_p99_ms": finite(self.p99_ms),
            "all_delivered_s": self.delivered_in.as_secs_f64(),
        })
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The options of the fleet figure.
pub(crate) struct FleetSizes {
    pub processes: Vec<usize>,
    pub messages: usize,
    pub broadcasts: usize,
    pub server_pid: Option<u32>,
    /// Run each P through this many gateways too (`--via-gateways`).
    pub via_gateways: Option<usize>,
}

pub(crate) async fn run(base: &Config, sizes: &FleetSizes, json_out: bool) -> Outcome {
    let raw = Client::with_uri_str(&base.db.uri)
        .await
        .map_err(|e| failed("driver client", e))?;
    let server = Server::find(&raw, &base.db.uri, sizes.server_pid).await;
    // Through gateways: the targeted stream (where the build knows it), both routes.
    let (selections, routes): (Vec<&'static str>, Vec<Route>) =
        match (selection_known(), sizes.via_gateways) {
            (true, None) => (vec!["targeted", "everything"], vec![Route::Direct]),
            (false, None) => (vec!["everything"], vec![Route::Direct]),
            (known, Some(n)) => (
                vec![if known { "targeted" } else { "everything" }],
                vec![Route::Direct, Route::Gateways(n.max(1))],
            ),
        };
    let started = Instant::now();
    let mut rows = Vec::new();
    for &p in &sizes.processes {
        for selection in &selections {
            for &route in &routes {
                if !json_out {
                    eprintln!(
                        "fleet: {p} processes, hub selection {selection}, {}…",
                        route.label()
                    );
                }
                rows.push(one_run(base, &raw, &server, sizes, p.max(1), selection, route).await?);
            }
        }
    }
    let mut targets = targets(&rows, selection_known());
    if let Some(n) = sizes.via_gateways {
        targets.push(gateway_target(&rows, n.max(1)));
    }
    if json_out {
        out!(
            "{}",
            json!({
                "server": server.description,
                "server_cpu_from": server.cpu_source(),
                "uri": base.db.redacted_uri(),
                "messages": sizes.messages,
                "broadcasts": sizes.broadcasts,
                "via_gateways": sizes.via_gateways,
                "change_streams_from": CHANGE_STREAMS_FROM,
                "selection_key_known": selection_known(),
                "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
                "targets": targets.iter().map(|t| json!({"target": t.what, "met": t.met, "why": t.why})).collect::<Vec<_>>(),
                "elapsed_s": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        crate::output::write_out(format_args!(
            "{}",
            table(base, &server, sizes, &rows, &targets, started.elapsed())
        ));
    }
    Ok(())
}

async fn one_run(
    base: &Config,
    raw: &Client,
    server: &Server,
    sizes: &FleetSizes,
    p: usize,
    selection: &'static str,
    route: Route,
) -> Result<Row, Failure> {
    let database = format!(
        "intracom_bench_{}",
        intracom::message::new_id().to_lowercase()
    );
    let mut config = bench_config(base, Some(&database), "fleet-publisher");
    for i in 0..p {
        config.senders.insert(service(i), vec![PING.to_string()]);
    }
    let bus = Intracom::connect(config).await?;
    // Messages addressed to each process: its share of the targeted, and every broadcast.
    let expect: Vec<usize> = (0..p)
        .map(|i| (sizes.messages + p - 1 - i) / p + sizes.broadcasts)
        .collect();
    let cursors_before = open_cursors(raw).await;
    let mut gateways = match route {
        Route::Direct => None,
        Route::Gateways(n) => match Gateways::start(base, &database, selection, n, p).await {
            Ok(gateways) => Some(gateways),
            Err(failure) => {
                bus.shutdown().await;
                let _ = raw.database(&database).drop().await;
                return Err(failure);
            }
        },
    };
    let mut fleet = match Fleet::start(base, &database, selection, &expect, gateways.as_ref()) {
        Ok(fleet) => fleet,
        Err(failure) => {
            if let Some(gateways) = gateways.as_mut() {
                gateways.stop();
            }
            bus.shutdown().await;
            let _ = raw.database(&database).drop().await;
            return Err(failure);
        }
    };
    let result = async {
        fleet.wait_for("ready", p).await?;
        let change_streams = settled_cursors(raw)
            .await
            .zip(cursors_before)
            .map(|(now, before)| now - before);
        let gateways_before = match &gateways {
            Some(g) => g.read().await,
            None => GatewayReading::default(),
        };
        let cpu_before = server.cpu_seconds(raw).await;
        let status_before = server_counters(raw).await;
        let started = Instant::now();
        let total = sizes.messages + sizes.broadcasts;
        // Broadcasts spread evenly among the targeted messages.
        let every = if sizes.broadcasts == 0 {
            usize::MAX
        } else {
            total.div_ceil(sizes.broadcasts)
        };
        let (mut targeted, mut broadcast) = (0usize, 0usize);
        for k in 0..total {
            let body = doc! { "sent_us": now_micros() };
            let is_broadcast = broadcast < sizes.broadcasts
                && (k % every == every - 1 || sizes.messages == targeted);
            let message = if is_broadcast {
                broadcast += 1;
                Message::broadcast("reload").body(body)
            } else {
                let to = service(targeted % p);
                targeted += 1;
                Message::to_service(to, PING).body(body)
            };
            bus.publish(message).await?;
        }
        fleet.wait_for("delivered", p).await?;
        let delivered_in = started.elapsed();
        let cpu_after = server.cpu_seconds(raw).await;
        let status_after = server_counters(raw).await;
        let gateways_after = match &gateways {
            Some(g) => g.read().await,
            None => GatewayReading::default(),
        };
        bus.publish(Message::broadcast(END)).await?;
        let reports = fleet.reports(p).await?;
        let mut latencies = Vec::new();
        let mut per_process = Vec::with_capacity(p);
        for (i, report) in reports.iter().enumerate() {
            for us in report["latencies_us"].as_array().into_iter().flatten() {
                if let Some(us) = us.as_i64() {
                    latencies.push(Duration::from_micros(us.max(0) as u64));
                }
            }
            // The end broadcast is one of the events read, not part of the traffic.
            let events = report["hub_events"].as_u64().map(|e| e.saturating_sub(1));
            per_process.push((expect[i], events));
        }
        let counters = match (status_before, status_after) {
            (Some(before), Some(after)) => after
                .iter()
                .filter_map(|(k, v)| before.get(k).map(|b| (k.clone(), v - b)))
                .collect(),
            _ => BTreeMap::new(),
        };
        let delta = |b: Option<f64>, a: Option<f64>| b.zip(a).map(|(b, a)| a - b);
        Ok(Row {
            processes: p,
            selection,
            route,
            messages: total,
            per_process,
            cpu_seconds: delta(cpu_before, cpu_after),
            change_streams,
            gateways: GatewayReading {
                cpu_seconds: delta(gateways_before.cpu_seconds, gateways_after.cpu_seconds),
                hub_events: delta(gateways_before.hub_events, gateways_after.hub_events),
            },
            counters,
            p50_ms: quantile_ms(&mut latencies, 0.5),
            p99_ms: quantile_ms(&mut latencies, 0.99),
            delivered_in,
        })
    }
    .await;
    fleet.stop();
    if let Some(gateways) = gateways.as_mut() {
        gateways.stop();
    }
    bus.shutdown().await;
    if let Err(error) = raw.database(&database).drop().await {
        tracing::warn!(%error, database, "bench database not dropped");
    }
    result
}

fn ended(i: usize, waiting_for: &str) -> Failure {
    failed(
        "fleet",
        format!("process {i} ended before it printed {waiting_for} (its errors are above)"),
    )
}

/// The fleet's processes and the lines they print.
struct Fleet {
    children: Vec<Child>,
    lines: mpsc::UnboundedReceiver<(usize, Option<String>)>,
    /// Lines read ahead of the one waited for, per process.
    early: Vec<Vec<String>>,
}

impl Fleet {
    fn start(
        base: &Config,
        database: &str,
        selection: &str,
        expect: &[usize],
        gateways: Option<&Gateways>,
    ) -> Result<Self, Failure> {
        let exe = std::env::current_exe().map_err(|e| {
            fail(
                format!("cannot find this executable: {e}"),
                "run intracom from its file",
            )
        })?;
        let (tx, lines) = mpsc::unbounded_channel();
        let mut fleet = Fleet {
            children: Vec::new(),
            lines,
            early: vec![Vec::new(); expect.len()],
        };
        for (i, expect) in expect.iter().enumerate() {
            let mut command = std::process::Command::new(&exe);
            command.arg("bench");
            match gateways {
                // The `http` medium: the gateways' URLs and this process's token.
                Some(gateways) => {
                    command
                        .arg("--medium")
                        .arg("http")
                        .envs(gateways.probe_env(i));
                }
                None => {
                    command
                        .arg("--medium")
                        .arg("db")
                        .arg("--uri")
                        .arg(&base.db.uri)
                        .arg("--database")
                        .arg(database);
                }
            }
            command
                .arg("--fleet-probe")
                .arg(i.to_string())
                .arg("--fleet-expect")
                .arg(expect.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if let Some(Some(file)) = CONFIG_FILE.get() {
                command.arg("--config").arg(file);
            }
            if selection_known() {
                command.env(SELECTION_ENV, selection);
            }
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(e) => {
                    fleet.stop();
                    return Err(fail(
                        format!("cannot start fleet process {i}: {e}"),
                        "check the open-files and process limits (ulimit -n, ulimit -u)",
                    ));
                }
            };
            if let Some(stdout) = child.stdout.take() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        match line {
                            Ok(line) => {
                                let _ = tx.send((i, Some(line)));
                            }
                            Err(_) => break,
                        }
                    }
                    let _ = tx.send((i, None));
                });
            }
            fleet.children.push(child);
        }
        Ok(fleet)
    }

    /// Waits until every process printed `word`.
    async fn wait_for(&mut self, word: &str, p: usize) -> Result<(), Failure> {
        let mut seen = vec![false; p];
        for (i, early) in self.early.iter_mut().enumerate() {
            if let Some(at) = early.iter().position(|l| l == word) {
                early.remove(at);
                seen[i] = true;
            }
        }
        while seen.iter().any(|s| !s) {
            let (i, line) = self.next(word).await?;
            let Some(line) = line else {
                return Err(ended(i, word));
            };
            if line == word && !seen[i] {
                seen[i] = true;
            } else {
                self.early[i].push(line);
            }
        }
        Ok(())
    }

    /// The JSON line of every process.
    async fn reports(&mut self, p: usize) -> Result<Vec<serde_json::Value>, Failure> {
        let mut reports: Vec<Option<serde_json::Value>> = vec![None; p];
        for (i, early) in self.early.iter_mut().enumerate() {
            for line in early.drain(..) {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                    if value.is_object() {
                        reports[i] = Some(value);
                    }
                }
            }
        }
        while reports.iter().any(Option::is_none) {
            let (i, line) = self.next("its figures").await?;
            // A process ends once it printed its figures: only an end before is an error.
            let Some(line) = line else {
                if reports[i].is_none() {
                    return Err(ended(i, "its figures"));
                }
                continue;
            };
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                if value.is_object() {
                    reports[i] = Some(value);
                }
            }
        }
        Ok(reports.into_iter().flatten().collect())
    }

    /// The next line of any process (`None`: that process's output ended).
    async fn next(&mut self, waiting_for: &str) -> Result<(usize, Option<String>), Failure> {
        match tokio::time::timeout(PATIENCE, self.lines.recv()).await {
            Ok(Some((i, line))) => Ok((i, line)),
            Ok(None) => Err(failed("fleet", "every process ended")),
            Err(_) => Err(failed(
                "fleet",
                format!("no process printed {waiting_for} within 120 s"),
            )),
        }
    }

    /// Ends the processes that still run and reaps them all.
    fn stop(&mut self) {
        for child in &mut self.children {
            reap(child);
        }
        self.children.clear();
    }
}

/// Waits up to 10 s for `child` to end, then kills it; reaps it either way.
pub(crate) fn reap(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---- the server ----

/// Where the server's CPU time is read.
pub(crate) struct Server {
    pub description: Option<String>,
    pid: Option<u32>,
    pid_from: &'static str,
    ticks_per_second: f64,
}

impl Server {
    pub(crate) async fn find(raw: &Client, uri: &str, given: Option<u32>) -> Server {
        let admin = raw.database("admin");
        let version = admin
            .run_command(doc! { "buildInfo": 1 })
            .await
            .ok()
            .and_then(|b| b.get_str("version").ok().map(str::to_string));
        let description = version.map(|v| format!("server version {v}"));
        let local = local_port(uri);
        let (pid, pid_from) = if let Some(pid) = given {
            (Some(pid), "--server-pid")
        } else if let Some(pid) = local.and_then(listening_pid) {
            (Some(pid), "the process listening on the URI's port")
        } else {
            (None, "")
        };
        Server {
            description,
            pid,
            pid_from,
            ticks_per_second: ticks_per_second(),
        }
    }

    pub(crate) fn cpu_source(&self) -> String {
        match self.pid {
            Some(pid) => format!("/proc/{pid}/stat ({})", self.pid_from),
            None => {
                "serverStatus extra_info (user_time_us + system_time_us), where it answers".into()
            }
        }
    }

    /// The server's CPU time so far, in seconds.
    pub(crate) async fn cpu_seconds(&self, raw: &Client) -> Option<f64> {
        if let Some(pid) = self.pid {
            return proc_cpu_seconds(pid, self.ticks_per_second);
        }
        let status = raw
            .database("admin")
            .run_command(doc! { "serverStatus": 1 })
            .await
            .ok()?;
        let extra = status.get_document("extra_info").ok()?;
        let user = number(extra.get("user_time_us")?)?;
        let system = number(extra.get("system_time_us")?)?;
        Some((user + system) / 1e6)
    }
}

/// The CPU time (user + system) of process `pid` so far, in seconds, from its
/// `/proc/<pid>/stat`.
pub(crate) fn proc_cpu_seconds(pid: u32, ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Where the change streams are counted from.
const CHANGE_STREAMS_FROM: &str =
    "serverStatus metrics.cursor.open.total with the fleet subscribed, less before the fleet (and its gateways) started";

/// The server's open cursors (`serverStatus` `metrics.cursor.open.total`): with the
/// fleet idle and subscribed, its change streams are the cursors it added.
async fn open_cursors(raw: &Client) -> Option<f64> {
    let status = raw
        .database("admin")
        .run_command(doc! { "serverStatus": 1 })
        .await
        .ok()?;
    let open = status
        .get_document("metrics")
        .ok()?
        .get_document("cursor")
        .ok()?
        .get_document("open")
        .ok()?;
    number(open.get("total")?)
}

/// [`open_cursors`] once it holds still: three readings 200 ms apart that agree (at
/// most 5 s). A hub that reopened its stream for a new selection closes the old one
/// a moment later.
async fn settled_cursors(raw: &Client) -> Option<f64> {
    let mut last = open_cursors(raw).await?;
    let mut same = 1;
    for _ in 0..25 {
        if same == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = open_cursors(raw).await?;
        same = if now == last { same + 1 } else { 1 };
        last = now;
    }
    Some(last)
}

fn number(value: &intracom::bson::Bson) -> Option<f64> {
    use intracom::bson::Bson;
    match value {
        Bson::Int32(v) => Some(f64::from(*v)),
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        _ => None,
    }
}

/// The `serverStatus` counters that say where the server's work went.
pub(crate) async fn server_counters(raw: &Client) -> Option<BTreeMap<String, f64>> {
    let status = raw
        .database("admin")
        .run_command(doc! { "serverStatus": 1 })
        .await
        .ok()?;
    let mut out = BTreeMap::new();
    let mut take = |section: &str, doc: Option<&Document>| {
        for (k, v) in doc.into_iter().flatten() {
            if let Some(v) = number(v) {
                out.insert(format!("{section}.{k}"), v);
            }
        }
    };
    take("network", status.get_document("network").ok());
    take("opcounters", status.get_document("opcounters").ok());
    Some(out)
}

/// The port of the URI's first host when that host is this machine.
fn local_port(uri: &str) -> Option<u16> {
    let rest = uri.strip_prefix("mongodb://")?;
    let hosts = rest.split(['/', '?']).next()?;
    let host = hosts.rsplit('@').next()?.split(',').next()?;
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => {
            (name, port.parse().ok()?)
        }
        _ => (host, 27017),
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    matches!(name, "localhost" | "127.0.0.1" | "::1").then_some(port)
}

/// The pid of the process listening on `port` (/proc/net/tcp{,6}, then /proc/*/fd).
fn listening_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on Linux).
pub(crate) fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

// ---- targets and the table ----

pub(crate) struct Target {
    what: String,
    met: Option<bool>,
    why: Option<String>,
}

fn targets(rows: &[Row], targeted_known: bool) -> Vec<Target> {
    let mut out = Vec::new();
    if !targeted_known {
        out.push(Target {
            what: format!("the targeted stream ({SELECTION_KEY}=targeted)"),
            met: None,
            why: Some(
                "this build has no such key: only the stream of every insert was measured".into(),
            ),
        });
        return out;
    }
    // The targets of the hub's stream are the direct fleet's.
    let targeted: Vec<&Row> = rows
        .iter()
        .filter(|r| r.selection == "targeted" && r.route == Route::Direct)
        .collect();
    let everything = |p: usize| {
        rows.iter()
            .find(|r| r.selection == "everything" && r.route == Route::Direct && r.processes == p)
    };
    // 1. Events read equal to what is addressed, at every P.
    let exact: Vec<Option<bool>> = targeted.iter().map(|r| r.exact()).collect();
    let met = if exact.iter().any(Option::is_none) {
        None
    } else {
        Some(exact.iter().all(|e| *e == Some(true)))
    };
    out.push(Target {
        what: "targeted: each process's hub reads exactly the events addressed to it (broadcasts included), at every P".into(),
        met,
        why: match met {
            None => Some(format!("the processes did not report the counter {HUB_EVENTS_METRIC}")),
            Some(false) => Some(
                targeted
                    .iter()
                    .filter(|r| r.exact() == Some(false))
                    .map(|r| format!("P={}: {:.2} events read per message addressed", r.processes, r.events_per_addressed().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Some(true) => None,
        },
    });
    let (Some(small), Some(large)) = (
        targeted.iter().min_by_key(|r| r.processes),
        targeted.iter().max_by_key(|r| r.processes),
    ) else {
        return out;
    };
    // 2. Server CPU per message at the largest P: at most half of `everything`'s
    // (measured when the run has both streams).
    let other = everything(large.processes);
    if let Some(other) = other {
        out.push(cpu_target(large, other));
    }
    // 3. p99 at the largest P within 2× of the smallest P's.
    let met = (large.p99_ms.is_finite() && small.p99_ms.is_finite())
        .then_some(large.p99_ms <= 2.0 * small.p99_ms);
    out.push(Target {
        what: format!(
            "targeted delivery p99 at P={} within 2× of P={}",
            large.processes, small.processes
        ),
        met,
        why: (met == Some(false)).then(|| {
            format!(
                "{:.1} ms vs {:.1} ms; server counters (P={} | P={}): {}; server CPU s: {} | {}",
                large.p99_ms,
                small.p99_ms,
                large.processes,
                small.processes,
                counters_side_by_side(large, Some(small)),
                opt(large.cpu_seconds, 2),
                opt(small.cpu_seconds, 2),
            )
        }),
    });
    out
}

/// Server CPU per message at the largest P: targeted at most half of `everything`'s.
fn cpu_target(large: &Row, other: &Row) -> Target {
    let other = Some(other);
    let cpu = large.cpu_per_1000().zip(other.and_then(Row::cpu_per_1000));
    let met = cpu.map(|(t, e)| t <= e / 2.0);
    Target {
        what: format!(
            "server CPU per message at P={}: targeted at most half of everything's",
            large.processes
        ),
        met,
        why: match (met, cpu) {
            (None, _) => Some("the server's CPU time could not be read (give --server-pid)".into()),
            (Some(false), Some((t, e))) => Some(format!(
                "{t:.3} vs {e:.3} CPU s per 1000 messages; server counters (targeted | everything): {}",
                counters_side_by_side(large, other)
            )),
            _ => None,
        },
    }
}

/// Through gateways: the server holds one change stream per gateway with a follower
/// (a gateway opens its stream with its first follower), whatever P.
fn gateway_target(rows: &[Row], n: usize) -> Target {
    let via: Vec<&Row> = rows
        .iter()
        .filter(|r| r.route == Route::Gateways(n))
        .collect();
    let counted: Option<Vec<(usize, f64)>> = via
        .iter()
        .map(|r| r.change_streams.map(|c| (r.processes, c)))
        .collect();
    let met = counted
        .as_ref()
        .map(|c| c.iter().all(|(p, streams)| *streams == (*p).min(n) as f64));
    Target {
        what: format!(
            "through {n} gateway(s): the server holds one change stream per gateway with a follower, min(P, {n}), at every P (attached directly: one per process)"
        ),
        met,
        why: match (met, counted) {
            (None, _) => Some("the server did not report serverStatus metrics.cursor.open.total".into()),
            (Some(false), Some(c)) => Some(
                c.iter()
                    .map(|(p, streams)| format!("P={p}: {streams:.0} cursors opened"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            _ => None,
        },
    }
}

fn counters_side_by_side(a: &Row, b: Option<&Row>) -> String {
    a.counters
        .iter()
        .filter(|(_, v)| **v != 0.0)
        .map(|(k, v)| {
            let other = b
                .and_then(|b| b.counters.get(k))
                .map_or("-".to_string(), |o| format!("{o:.0}"));
            format!("{k} {v:.0} | {other}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("-".to_string(), |v| format!("{v:.digits$}"))
}

fn table(
    base: &Config,
    server: &Server,
    sizes: &FleetSizes,
    rows: &[Row],
    targets: &[Target],
    elapsed: Duration,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "intracom bench --processes: at {}{}",
        base.db.redacted_uri(),
        server
            .description
            .as_ref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "{} targeted messages (each to one process's service, in turn) and {} broadcasts per run, published one at a time; server CPU from {}; {:.0} s",
        sizes.messages,
        sizes.broadcasts,
        server.cpu_source(),
        elapsed.as_secs_f64()
    );
    let via = sizes.via_gateways.is_some();
    if via {
        let _ = writeln!(
            out,
            "each P attached directly and through gateways (`intracom serve` on this database, each process on the http medium, round-robin); change streams from {CHANGE_STREAMS_FROM}; through gateways, events read are the gateways' hubs'"
        );
    }
    let mut header = vec!["P", "hub stream"];
    if via {
        header.extend(["route", "server change streams"]);
    }
    header.extend([
        "events read per message addressed",
        "server CPU s / 1000 msgs",
    ]);
    if via {
        header.push("gateways CPU s / 1000 msgs");
    }
    header.extend([
        "MiB sent by server",
        "delivery p50 ms",
        "p99 ms",
        "all delivered in s",
    ]);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.processes.to_string(), r.selection.to_string()];
            if via {
                cells.extend([r.route.label(), opt(r.change_streams, 0)]);
            }
            cells.extend([opt(r.events_per_addressed(), 2), opt(r.cpu_per_1000(), 3)]);
            if via {
                cells.push(opt(r.gateways_cpu_per_1000(), 3));
            }
            cells.extend([
                opt(r.mib_sent(), 1),
                opt(Some(r.p50_ms), 1),
                opt(Some(r.p99_ms), 1),
                format!("{:.1}", r.delivered_in.as_secs_f64()),
            ]);
            cells
        })
        .collect();
    super::report::write_table(&mut out, &header, cells);
    let _ = writeln!(out, "targets:");
    for t in targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "not measured",
        };
        let _ = writeln!(out, "  {met:<12} {}", t.what);
        if let Some(why) = &t.why {
            let _ = writeln!(out, "               {why}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::local_port;

    #[test]
    fn local_port_reads_the_first_host() {
        assert_eq!(
            local_port("mongodb://127.0.0.1:27411/?directConnection=true"),
            Some(27411)
        );
        assert_eq!(local_port("mongodb://u:p@localhost/db"), Some(27017));
        assert_eq!(local_port("mongodb://db.example:27017"), None);
        assert_eq!(local_port("mongodb+srv://cluster.example"), None);
    }
}
