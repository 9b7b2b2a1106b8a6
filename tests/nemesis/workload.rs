//! The workload: each role is a process of its own (this test binary started again with
//! `INTRACOM_NEMESIS_ROLE` set), connected to the server through its own fault proxy,
//! writing what it does to its own history file.
//!
//! - `pub{k}` publishes broadcasts `p{k}-{seq}` (seq in six digits, so that the test
//!   servers' order of same-second writes, by id, is the publish order; body
//!   `{pub, seq}`, actions `ev.created`
//!   and `ev.updated` in turn) and, every third seq, a job `j{k}-{seq}` for `jobs`,
//!   with its outbox in a file;
//! - `sub{k}` follows one named subscription (see [`SUBSCRIPTIONS`]) and acks each
//!   delivery;
//! - `work{k}` does `job.run`, failing on purpose as the job's body plans, its effect
//!   through `idempotent("effects").run_once` into `effects` (unique index on `job`);
//! - `srv{k}` serves `calc.add` (sleeps 0–1.5 s), `call{k}` asks it (time-out 2 s).
//!
//! A publisher publishes every 250 ms, a caller asks every 300 ms and a worker polls for
//! lapsed leases and due retries every 500 ms, times the pace (`INTRACOM_NEMESIS_PACE`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use intracom::bson::{doc, Document};
use intracom::idempotency::Once;
use intracom::{Config, Error, Intracom, Message, PublishStatus, Subscription, WorkOptions};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::history::{hash, History, Rng};

/// Publishers, subscribers, workers, request servers, callers.
pub const PUBLISHERS: u32 = 3;
pub const SUBSCRIBERS: u32 = 3;
pub const WORKERS: u32 = 3;
pub const SERVERS: u32 = 2;
pub const CALLERS: u32 = 2;

/// Attempts before a job goes to the dead letters.
pub const MAX_ATTEMPTS: i64 = 4;
/// The work lease: short, so that a paused worker loses it.
pub const LEASE_MS: u64 = 3000;
/// A caller's time-out.
pub const REQUEST_TIMEOUT_MS: u64 = 2000;

/// The named subscriptions: (process index, service, name, only this action).
pub const SUBSCRIPTIONS: [(u32, &str, &str, Option<&str>); 3] = [
    (1, "audit", "audit-log", None),
    (2, "mirror", "mirror-all", None),
    (3, "mirror", "mirror-created", Some("ev.created")),
];

/// The action of publish `seq`.
pub fn action_of(seq: i64) -> &'static str {
    if seq % 2 == 0 {
        "ev.created"
    } else {
        "ev.updated"
    }
}

/// How many times job `id` fails on purpose: 10 % of the jobs fail, a third of those
/// more often than [`MAX_ATTEMPTS`] allows (they end in the dead letters).
pub fn planned_failures(seed: u64, id: &str) -> i64 {
    match hash(seed, id) % 100 {
        0..=3 => 1,
        4..=6 => 2,
        7..=9 => MAX_ATTEMPTS + 2,
        _ => 0,
    }
}

/// What a role process is told through its environment.
pub struct Env {
    pub role: String,
    pub index: u32,
    pub name: String,
    pub incarnation: u32,
    pub uri: String,
    pub database: String,
    pub dir: PathBuf,
    pub seed: u64,
    /// What the publishers' and callers' pauses are multiplied by.
    pub pace: u64,
}

impl Env {
    fn from_env() -> Result<Env, String> {
        let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
        let role = var("INTRACOM_NEMESIS_ROLE")?;
        let index: u32 = var("INTRACOM_NEMESIS_INDEX")?
            .parse()
            .map_err(|e| format!("index: {e}"))?;
        Ok(Env {
            name: format!("{role}{index}"),
            role,
            index,
            incarnation: var("INTRACOM_NEMESIS_INCARNATION")?.parse().unwrap_or(1),
            uri: var("INTRACOM_NEMESIS_URI")?,
            database: var("INTRACOM_NEMESIS_DB")?,
            dir: PathBuf::from(var("INTRACOM_NEMESIS_DIR")?),
            seed: var("INTRACOM_NEMESIS_SEED")?.parse().unwrap_or(0),
            pace: var("INTRACOM_NEMESIS_PACE")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(1)
                .max(1),
        })
    }

    fn draining(&self) -> bool {
        self.dir.join("drain").exists()
    }
}

/// The path of the file whose presence tells the workload to stop producing.
pub fn drain_flag(dir: &Path) -> PathBuf {
    dir.join("drain")
}

/// The configuration every role shares (catalog, work options), for one service.
pub fn config(uri: &str, database: &str, service: &str, instance: &str) -> Config {
    Config::builder()
        .mongodb(uri, database)
        .service(service)
        .instance(instance)
        .sender("feed", ["ev.created", "ev.updated"])
        .sender("jobs", ["job.run"])
        .sender("calc", ["calc.add"])
        .sender("audit", Vec::<String>::new())
        .sender("mirror", Vec::<String>::new())
        .sender("caller", Vec::<String>::new())
        .set(
            "common.intracom.work.job.run.max_attempts",
            &MAX_ATTEMPTS.to_string(),
        )
        .build()
        .unwrap_or_else(|e| panic!("the workload's config: {e}"))
}

/// Runs the role named in the environment; never returns.
pub fn role_main() -> ! {
    let code = match Env::from_env() {
        Ok(env) => {
            if let Ok(filter) = std::env::var("RUST_LOG") {
                tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                    .with_ansi(false)
                    .init();
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(rt) => match rt.block_on(run(env)) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("nemesis role: {e}");
                        1
                    }
                },
                Err(e) => {
                    eprintln!("nemesis role: no runtime: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("nemesis role: {e}");
            2
        }
    };
    std::process::exit(code)
}

async fn run(env: Env) -> Result<(), String> {
    let history = Arc::new(
        History::open(&env.dir.join("history"), &env.name, env.incarnation)
            .map_err(|e| format!("history: {e}"))?,
    );
    history.rec(json!({"k": "start"}));
    match env.role.as_str() {
        "pub" => publisher(&env, history).await,
        "sub" => subscriber(&env, history).await,
        "work" => worker(&env, history).await,
        "srv" => server(&env, history).await,
        "call" => caller(&env, history).await,
        other => Err(format!("unknown role {other}")),
    }
}

/// Connects, trying again every second while the server cannot be had.
async fn connect(config: Config, history: &History) -> Intracom {
    loop {
        match Intracom::connect(config.clone()).await {
            Ok(bus) => {
                history.rec(json!({"k": "connect", "f": "ok"}));
                return bus;
            }
            Err(e) => {
                history.rec(json!({"k": "connect", "f": "fail", "e": e.to_string()}));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The next sequence number of this process: one past the highest it ever invoked
/// (its earlier incarnations' histories included).
fn next_seq(env: &Env, kind: &str) -> i64 {
    crate::history::read_process(&env.dir.join("history"), &env.name)
        .iter()
        .filter(|r| r.k() == kind && r.f() == "invoke")
        .map(|r| r.i("seq"))
        .max()
        .map_or(1, |s| s + 1)
}

async fn publish_one(
    bus: &Intracom,
    history: &History,
    message: Message,
    record: serde_json::Value,
) {
    let mut invoke = record.clone();
    invoke["f"] = json!("invoke");
    history.rec(invoke);
    let mut outcome = record;
    match tokio::time::timeout(Duration::from_secs(60), bus.publish(message)).await {
        Ok(Ok(published)) => {
            outcome["f"] = json!(match published.status {
                PublishStatus::Stored => "ok",
                PublishStatus::Duplicate => "duplicate",
                PublishStatus::Buffered => "buffered",
                _ => "ok",
            });
        }
        Ok(Err(e)) => {
            outcome["f"] = json!("info");
            outcome["e"] = json!(e.to_string());
        }
        Err(_) => {
            outcome["f"] = json!("info");
            outcome["e"] = json!("no answer within 60 s");
        }
    }
    history.rec(outcome);
}

async fn publisher(env: &Env, history: Arc<History>) -> Result<(), String> {
    let k = i64::from(env.index);
    let config = config(&env.uri, &env.database, "feed", &env.name);
    let mut config = config;
    config.outbox_file = Some(env.dir.join(format!("outbox-{}.json", env.name)));
    let bus = connect(config, &history).await;
    let mut seq = next_seq(env, "publish");
    let mut last_outbox = usize::MAX;
    loop {
        let outbox = bus.outbox_len();
        if outbox != last_outbox {
            history.rec(json!({"k": "outbox", "n": outbox}));
            last_outbox = outbox;
        }
        if env.draining() {
            if outbox == 0 {
                history.rec(json!({"k": "outbox-empty"}));
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if bus.outbox_len() > 0 {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let id = format!("p{k}-{seq:06}");
        let action = action_of(seq);
        publish_one(
            &bus,
            &history,
            Message::broadcast(action)
                .with_id(&id)
                .body(doc! { "pub": k, "seq": seq }),
            json!({"k": "publish", "id": id, "seq": seq, "action": action}),
        )
        .await;
        if seq % 3 == 0 {
            let id = format!("j{k}-{seq:06}");
            let fail = planned_failures(env.seed, &id);
            publish_one(
                &bus,
                &history,
                Message::to_service("jobs", "job.run")
                    .work()
                    .with_id(&id)
                    .body(doc! { "pub": k, "seq": seq, "fail": fail }),
                json!({"k": "job", "id": id, "seq": seq, "fail": fail}),
            )
            .await;
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(250 * env.pace)).await;
    }
}

async fn subscriber(env: &Env, history: Arc<History>) -> Result<(), String> {
    let (_, service, name, only) = SUBSCRIPTIONS
        .iter()
        .find(|s| s.0 == env.index)
        .ok_or_else(|| format!("no subscription for {}", env.name))?;
    let bus = connect(
        config(&env.uri, &env.database, service, &env.name),
        &history,
    )
    .await;
    loop {
        let mut subscription = Subscription::named(*name).from_beginning();
        if let Some(action) = only {
            subscription = subscription.actions([*action]);
        }
        let mut stream = match bus.subscribe(subscription).await {
            Ok(s) => s,
            Err(e) => {
                history.rec(json!({"k": "subscribe", "f": "fail", "e": e.to_string()}));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        history.rec(json!({"k": "subscribe", "f": "ok", "sub": name}));
        while let Some(item) = stream.next().await {
            match item {
                Ok(delivery) => {
                    let body = serde_json::to_value(&delivery.query).unwrap_or_default();
                    history.rec(json!({
                        "k": "deliver", "sub": name, "id": delivery.id,
                        "action": delivery.action, "body": body,
                    }));
                    let id = delivery.id.clone();
                    match delivery.ack().await {
                        Ok(()) => {
                            history.rec(json!({"k": "ack", "f": "ok", "sub": name, "id": id}))
                        }
                        Err(e) => history.rec(json!({
                            "k": "ack", "f": "fail", "sub": name, "id": id, "e": e.to_string(),
                        })),
                    }
                }
                Err(e) => {
                    history.rec(json!({"k": "stream-error", "sub": name, "e": e.to_string()}))
                }
            }
        }
        history.rec(json!({"k": "stream-end", "sub": name}));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A run-once body's error: the bus's, or the effects collection's.
#[derive(Debug)]
enum EffectError {
    Bus(Error),
    Store(String),
}

impl From<Error> for EffectError {
    fn from(e: Error) -> Self {
        EffectError::Bus(e)
    }
}

impl std::fmt::Display for EffectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EffectError::Bus(e) => write!(f, "{e}"),
            EffectError::Store(e) => f.write_str(e),
        }
    }
}

async fn worker(env: &Env, history: Arc<History>) -> Result<(), String> {
    let bus = connect(config(&env.uri, &env.database, "jobs", &env.name), &history).await;
    let client = mongodb::Client::with_uri_str(&env.uri)
        .await
        .map_err(|e| format!("effects client: {e}"))?;
    let effects = client
        .database(&env.database)
        .collection::<Document>("effects");
    let messages = client
        .database(&env.database)
        .collection::<Document>("messages");
    let mut options = WorkOptions::default()
        .lease(Duration::from_millis(LEASE_MS))
        .backoff(Duration::from_millis(200))
        .max_attempts(MAX_ATTEMPTS as i32)
        .poll(Duration::from_millis(500 * env.pace));
    // Retries stay within the drain's bound.
    options.max_backoff = Duration::from_secs(2);
    let name = env.name.clone();
    let handle = bus.clone();
    let _worker = bus
        .work("jobs", &["job.run"], options, move |job: Message| {
            let history = Arc::clone(&history);
            let effects = effects.clone();
            let messages = messages.clone();
            let bus = handle.clone();
            let name = name.clone();
            async move {
                let fail = job.query.get_i64("fail").unwrap_or(0);
                let attempt = i64::from(job.attempts);
                history.rec(json!({"k": "attempt", "f": "invoke", "id": job.id, "n": attempt, "fail": fail}));
                record_lease(&messages, &history, &job.id, attempt).await;
                let history_end = Arc::clone(&history);
                let id_end = job.id.clone();
                let _end = Finally(move || {
                    history_end.rec(json!({"k": "attempt", "f": "end", "id": id_end, "n": attempt}));
                });
                if attempt <= fail {
                    history.rec(json!({"k": "attempt", "f": "planned-fail", "id": job.id, "n": attempt}));
                    return Err(format!("planned failure {attempt} of {fail}"));
                }
                let once = bus.idempotent("effects").lease(Duration::from_secs(5));
                let id = job.id.clone();
                let outcome = once
                    .run_once(&job.id, || async {
                        history.rec(json!({"k": "effect", "f": "invoke", "id": id}));
                        let row = doc! { "_id": &id, "job": &id, "worker": &name };
                        match effects.insert_one(row).await {
                            Ok(_) => Ok(()),
                            Err(e) if is_duplicate(&e) => {
                                // The effect of an earlier run whose completion was not
                                // recorded (killed in between): the unique index keeps one.
                                history.rec(json!({"k": "effect", "f": "exists", "id": id}));
                                Ok(())
                            }
                            Err(e) => Err(EffectError::Store(e.to_string())),
                        }
                    })
                    .await;
                match outcome {
                    Ok(Once::Ran(())) => {
                        history.rec(json!({"k": "effect", "f": "ran", "id": job.id}));
                        Ok(())
                    }
                    Ok(Once::AlreadyDone(_)) => {
                        history.rec(json!({"k": "effect", "f": "already", "id": job.id}));
                        Ok(())
                    }
                    Err(e) => {
                        history.rec(json!({"k": "effect", "f": "fail", "id": job.id, "e": e.to_string()}));
                        Err(e.to_string())
                    }
                }
            }
        })
        .map_err(|e| format!("work: {e}"))?;
    std::future::pending::<()>().await;
    Ok(())
}

/// Runs its closure when dropped: a handler's end, however it returns.
struct Finally<F: FnMut()>(F);

impl<F: FnMut()> Drop for Finally<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The lease of the job as the server holds it when its handler starts (best effort: a
/// read the faults stop is left out): `at` (the server's clock at the claim or the last
/// renewal) and `ms`, and the attempts counted, so that the checker can tell whether
/// this run's claim is the one it reads.
async fn record_lease(
    messages: &mongodb::Collection<Document>,
    history: &History,
    id: &str,
    attempt: i64,
) {
    let read = messages
        .find_one(doc! { "_id": id })
        .projection(doc! { "lease": 1, "attempts": 1 });
    let Ok(Ok(Some(found))) = tokio::time::timeout(Duration::from_secs(1), read).await else {
        return;
    };
    let Ok(lease) = found.get_document("lease") else {
        return;
    };
    let (Ok(at), Some(ms)) = (
        lease.get_datetime("at"),
        lease
            .get_i64("ms")
            .ok()
            .or_else(|| lease.get_i32("ms").ok().map(i64::from)),
    ) else {
        return;
    };
    let attempts = found
        .get_i32("attempts")
        .map(i64::from)
        .or_else(|_| found.get_i64("attempts"))
        .unwrap_or(0);
    history.rec(json!({"k": "lease", "id": id, "n": attempt, "attempts": attempts, "at_ms": at.timestamp_millis(), "ms": ms}));
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    e.to_string().contains("E11000") || e.to_string().contains("11000")
}

#[derive(Serialize, Deserialize)]
struct AddQuery {
    rid: String,
    x: i64,
}

#[derive(Serialize, Deserialize, Debug)]
struct AddAnswer {
    rid: String,
    v: i64,
}

async fn server(env: &Env, history: Arc<History>) -> Result<(), String> {
    let bus = connect(config(&env.uri, &env.database, "calc", &env.name), &history).await;
    let state = Arc::new(AtomicU64::new(
        env.seed ^ u64::from(env.index) << 32 ^ u64::from(env.incarnation),
    ));
    let _server = bus
        .serve("calc", "calc.add", move |q: AddQuery| {
            let history = Arc::clone(&history);
            let state = Arc::clone(&state);
            async move {
                let mut rng = Rng::new(state.fetch_add(1, Ordering::Relaxed));
                let pause = rng.range(0.0, 1500.0) as u64;
                history.rec(json!({"k": "handle", "f": "invoke", "rid": q.rid, "sleep": pause}));
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let v = q.x + 1;
                history.rec(json!({"k": "handle", "f": "ok", "rid": q.rid, "v": v}));
                Ok::<_, String>(AddAnswer { rid: q.rid, v })
            }
        })
        .map_err(|e| format!("serve: {e}"))?;
    std::future::pending::<()>().await;
    Ok(())
}

async fn caller(env: &Env, history: Arc<History>) -> Result<(), String> {
    let k = env.index;
    let bus = connect(
        config(&env.uri, &env.database, "caller", &env.name),
        &history,
    )
    .await;
    let mut seq = next_seq(env, "request");
    loop {
        if env.draining() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let rid = format!("c{k}-{seq}");
        history.rec(json!({"k": "request", "f": "invoke", "rid": rid, "seq": seq}));
        let answer = bus
            .request::<_, AddAnswer>(
                "calc",
                "calc.add",
                &AddQuery {
                    rid: rid.clone(),
                    x: seq,
                },
            )
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .await;
        match answer {
            Ok(a) => {
                history.rec(json!({"k": "request", "f": "ok", "rid": rid, "v": a.v, "arid": a.rid}))
            }
            Err(Error::Timeout { .. }) => {
                history.rec(json!({"k": "request", "f": "timeout", "rid": rid}))
            }
            Err(Error::Remote { message, .. }) => {
                history.rec(json!({"k": "request", "f": "remote", "rid": rid, "e": message}))
            }
            Err(e) => {
                history.rec(json!({"k": "request", "f": "info", "rid": rid, "e": e.to_string()}))
            }
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(300 * env.pace)).await;
    }
}
