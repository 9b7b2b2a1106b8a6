//! The admin's mongosh kit (`mongosh/intracom.js`) in the real `mongosh`, against the
//! real servers: what it publishes by hand reaches Rust subscribers and workers, its
//! helpers find and show what intracom wrote, and a malformed hand-written document is
//! refused by the validator or dead-lettered, as the guide says.
//!
//! mongosh comes from npm (`scripts/test` installs a pinned version into the cache,
//! `$INTRACOM_MONGOSH` names another); without it these tests are reported as ignored
//! with the reason.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use intracom::bson::{doc, Bson, Document};
use intracom::{Intracom, Message, Subscription, WorkOptions};

use crate::servers::{cache_dir, spawn_kept, Target};
use crate::{catalog, check, database_name, eventually, on_server, raw_client, Check};

pub fn checks() -> Vec<Check> {
    vec![
        check!(
            mongosh_publish_is_delivered_to_rust_subscribers_and_workers,
            mongosh
        ),
        check!(mongosh_helpers_show_what_intracom_published, mongosh),
        check!(
            mongosh_malformed_documents_are_refused_or_dead_lettered,
            mongosh
        ),
    ]
}

/// The mongosh executable, or why there is none.
pub fn mongosh() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("INTRACOM_MONGOSH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "INTRACOM_MONGOSH names {}, which does not exist",
                path.display()
            ))
        };
    }
    let path = cache_dir()
        .ok_or_else(|| "HOME is not set: cannot find mongosh".to_string())?
        .join("mongosh/node_modules/.bin/mongosh");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "mongosh not installed at {}: scripts/test installs it (npm)",
            path.display()
        ))
    }
}

/// Why the mongosh tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    mongosh().err()
}

fn kit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mongosh/intracom.js")
}

/// Runs `script` in mongosh on `uri`, after loading the kit as `ic` on `database`;
/// its stdout, with stderr appended when it failed.
pub(crate) async fn shell(uri: &str, database: &str, script: &str) -> String {
    let child = spawn_kept(shell_command(uri, database, script)).expect("mongosh starts");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("mongosh did not finish within the hang guard")
    .expect("its waiting task")
    .expect("its output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "mongosh failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The mongosh command that runs `script` after loading the kit as `ic` on `database`.
fn shell_command(uri: &str, database: &str, script: &str) -> Command {
    let program = mongosh().expect("mongosh");
    let kit = kit();
    let eval = format!(
        "load({kit:?}); const ic = intracom({database:?});\n{script}",
        kit = kit.display().to_string()
    );
    let mut command = Command::new(program);
    command
        .args([uri, "--quiet", "--norc", "--eval", &eval])
        .env("DO_NOT_TRACK", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The first line of `output` that contains every one of `parts`.
fn line_with<'a>(output: &'a str, parts: &[&str]) -> &'a str {
    output
        .lines()
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .unwrap_or_else(|| panic!("no line with {parts:?} in:\n{output}"))
}

async fn drop_database(uri: &str, name: &str) {
    raw_client(uri).await.database(name).drop().await.ok();
}

async fn mongosh_publish_is_delivered_to_rust_subscribers_and_workers(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .expect("bus");
    let mut sub = bus
        .subscribe(Subscription::new().actions(["reload"]))
        .await
        .expect("subscribe");
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = bus
        .work(
            "billing",
            &["invoice.render"],
            WorkOptions::default().poll(Duration::from_millis(50)),
            move |job: Message| {
                let done_tx = done_tx.clone();
                async move {
                    done_tx.send(job).ok();
                    Ok::<(), String>(())
                }
            },
        )
        .expect("worker");

    let out = shell(
        &uri,
        &database,
        r#"ic.publish({ from: "billing", to: "billing", action: "reload", body: { tenant: 7 }, id: "hand-1" });
ic.publish({ from: "billing", to: "billing", action: "invoice.render", work: true, priority: 3, body: { invoice: 12 }, id: "hand-work-1" });"#,
    )
    .await;
    assert!(out.contains("published: hand-1"), "{out}");
    assert!(out.contains("published: hand-work-1"), "{out}");

    // The subscriber receives it as a message like any other.
    let delivery = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .expect("the hand-published message within the hang guard")
        .expect("a delivery")
        .expect("not an error");
    assert_eq!(delivery.id, "hand-1");
    assert_eq!(delivery.source_service, "billing");
    assert_eq!(delivery.source_instance, "mongosh");
    assert_eq!(delivery.query.get_i32("tenant").expect("tenant"), 7);
    assert!(delivery.ts.is_some() && delivery.at.is_some());

    // The worker claims the hand-published work and settles it.
    let job = tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
        .await
        .expect("the work within the hang guard")
        .expect("the worker's job");
    assert_eq!(job.id, "hand-work-1");
    assert_eq!(job.priority, 3);
    assert_eq!(job.query.get_i32("invoice").expect("invoice"), 12);

    // Stored with the types the validator asks for, stamped by the server.
    let messages = raw_client(&uri)
        .await
        .database(&database)
        .collection::<Document>("messages");
    let stored = messages
        .find_one(doc! { "_id": "hand-1" })
        .await
        .expect("find")
        .expect("stored");
    assert!(
        matches!(stored.get("query_ts"), Some(Bson::Int64(_))),
        "{stored}"
    );
    assert!(
        matches!(stored.get("priority"), Some(Bson::Int32(0))),
        "{stored}"
    );
    assert!(
        matches!(stored.get("ts"), Some(Bson::Timestamp(_))),
        "{stored}"
    );
    assert!(
        matches!(stored.get("at"), Some(Bson::DateTime(_))),
        "{stored}"
    );
    assert_eq!(stored.get_str("delivery"), Ok("all"));
    assert_eq!(stored.get_str("type"), Ok("fire_and_forget"));

    // A retried hand publish is "already published" and leaves the stamps alone.
    let again = shell(
        &uri,
        &database,
        r#"ic.publish({ from: "billing", to: "billing", action: "reload", body: { tenant: 7 }, id: "hand-1" });"#,
    )
    .await;
    assert!(again.contains("already published: hand-1"), "{again}");
    let after = messages
        .find_one(doc! { "_id": "hand-1" })
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(after.get("ts"), stored.get("ts"));
    assert_eq!(after.get("at"), stored.get("at"));
    eventually(
        "the work is settled done",
        Duration::from_secs(60),
        || async {
            messages
                .find_one(doc! { "_id": "hand-work-1", "state": "done" })
                .await
                .expect("find")
                .is_some()
        },
    )
    .await;

    worker.stop().await;
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

async fn mongosh_helpers_show_what_intracom_published(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .expect("bus");
    let mut audit = bus
        .subscribe(Subscription::named("billing-audit").actions(["reload"]))
        .await
        .expect("subscribe");
    let db = raw_client(&uri).await.database(&database);
    let messages = db.collection::<Document>("messages");

    // A message whose action nobody declares: subscribers dead-letter it. (Its id sorts
    // before the bus's ULIDs: stamped in the same second as the batch below, on a server
    // whose stamps tie within a second, it would otherwise come after the batch in the
    // bus's order (ts, _id) and count in the lag.)
    let stray = doc! {
        "_id": "00stray-1",
        "serviceNameSource": "billing",
        "instanceSource": "billing-1",
        "serviceNameDest": Bson::Null,
        "type": "broadcast",
        "delivery": "all",
        "action": "not.declared",
        "query": {},
        "query_ts": 1i64,
        "priority": 0,
    };
    messages
        .update_one(
            doc! { "_id": "00stray-1", "ts": { "$exists": false } },
            doc! { "$setOnInsert": stray, "$currentDate": { "ts": { "$type": "timestamp" }, "at": { "$type": "date" } } },
        )
        .upsert(true)
        .await
        .expect("a validator-valid document");
    // A subscriber reading everything meets it (and dead-letters it).
    let mut everything = bus
        .subscribe(Subscription::new().from_beginning())
        .await
        .expect("subscribe");
    let drain = tokio::spawn(async move { while everything.next().await.is_some() {} });
    let dead = bus.dead_letters();
    eventually(
        "the stray message is dead-lettered",
        Duration::from_secs(60),
        || async { dead.get("00stray-1").await.expect("dead letters").is_some() },
    )
    .await;
    drain.abort();

    // A request, answered by a worker.
    let worker = bus
        .serve("billing", "invoice.render", |q: Document| async move {
            Ok::<_, String>(doc! { "rendered": q.get_i32("invoice").unwrap_or(0) })
        })
        .expect("serve");
    let other = bus
        .as_service("billing", Some("billing-2"))
        .expect("as_service");
    let answer: Document = other
        .request("billing", "invoice.render", &doc! { "invoice": 41 })
        .await
        .expect("answered");
    assert_eq!(answer.get_i32("rendered"), Ok(41));
    let request = messages
        .find_one(doc! { "action": "invoice.render" })
        .await
        .expect("find")
        .expect("the request is stored");
    let query_id = request.get_str("queryId").expect("queryId").to_string();

    // Work nobody takes: waiting; one with a lease that ended (its worker died).
    bus.publish(Message::to_service("billing", "marker").work())
        .await
        .expect("work");
    let gone = bus
        .publish(Message::to_service("billing", "marker").work())
        .await
        .expect("work");
    messages
        .update_one(
            doc! { "_id": &gone.id },
            doc! { "$set": { "lease.owner": "billing-9", "lease.ms": 0i64 }, "$currentDate": { "lease.at": true }, "$inc": { "attempts": 1 } },
        )
        .await
        .expect("lease");

    // Three messages in one batch (they share a second of `ts`); the named subscription
    // acks the first only: two behind.
    let batch = bus
        .publish_all(vec![
            Message::broadcast("reload").body(doc! { "n": 1 }),
            Message::broadcast("reload").body(doc! { "n": 2 }),
            Message::broadcast("reload").body(doc! { "n": 3 }),
        ])
        .await
        .expect("publish_all");
    let first = next_reload(&mut audit, &batch[0].id).await;
    first.ack().await.expect("ack");

    let out = shell(
        &uri,
        &database,
        &format!(
            r#"print("== recent"); ic.recent(5);
print("== byAction"); ic.byAction("invoice.render");
print("== request"); ic.request({query_id:?});
print("== pending"); ic.pending();
print("== expired"); ic.expiredLeases();
print("== dead"); ic.dead();
print("== checkpoints"); ic.checkpoints();
print("== lag"); ic.lag();
print("== catalog"); ic.catalog();"#
        ),
    )
    .await;
    let section = |name: &str| -> String {
        let start = out
            .find(&format!("== {name}\n"))
            .unwrap_or_else(|| panic!("no section {name} in:\n{out}"));
        let rest = &out[start + name.len() + 4..];
        rest[..rest.find("\n== ").unwrap_or(rest.len())].to_string()
    };

    // recent: the newest five in the bus's order, the batch last.
    let recent = section("recent");
    assert_eq!(recent.lines().count(), 5, "{recent}");
    let at = |id: &str| {
        recent
            .find(id)
            .unwrap_or_else(|| panic!("{id} not in recent:\n{recent}"))
    };
    assert!(at(&batch[0].id) < at(&batch[1].id) && at(&batch[1].id) < at(&batch[2].id));
    line_with(
        &recent,
        &[
            &batch[2].id,
            "broadcast",
            "billing/billing-1 -> *",
            "reload",
            r#"query={"n":3}"#,
        ],
    );

    line_with(
        &section("byAction"),
        &[&query_id, "invoice.render", "state=done"],
    );
    let shown = section("request");
    line_with(
        &shown,
        &[
            &query_id,
            "state=done",
            r#"result={"rendered":41}"#,
            "billing/billing-2 -> billing",
        ],
    );
    assert!(shown.contains("answered"), "{shown}");

    line_with(
        &section("pending"),
        &["billing marker", "waiting=2", "held=0", "expired=1"],
    );
    let expired = section("expired");
    line_with(&expired, &[&gone.id, "lease=billing-9@", "leaseEnded="]);
    assert_eq!(expired.lines().count(), 1, "{expired}");

    line_with(&section("dead"), &["00stray-1", "not.declared"]);
    line_with(&section("checkpoints"), &["billing-audit", &batch[0].id]);
    line_with(&section("lag"), &["billing-audit", "behind=2 "]);
    line_with(
        &section("catalog"),
        &["billing: invoice.render, marker, reload"],
    );

    // The live tail shows a message published while it follows.
    let mut tail = spawn_kept(shell_command(
        &uri,
        &database,
        r#"ic.tail({ action: "reload" }, { maxEvents: 1, maxTimeMS: 60000 });"#,
    ))
    .expect("mongosh starts");
    let stdout = tail.stdout.take().expect("piped stdout");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut shown = Vec::new();
    let mut published = None;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(90), lines.recv())
            .await
            .expect("the tail's output within the hang guard");
        let Some(line) = line else { break };
        if line.starts_with("(following") && published.is_none() {
            let live = bus
                .publish(Message::broadcast("reload").body(doc! { "live": true }))
                .await
                .expect("publish");
            published = Some(live.id);
        }
        shown.push(line);
    }
    let status = tokio::task::spawn_blocking(move || tail.wait())
        .await
        .expect("its waiting task")
        .expect("the tail's status");
    let shown = shown.join("\n");
    assert!(status.success(), "{shown}");
    let live = published.unwrap_or_else(|| panic!("the tail never said it follows:\n{shown}"));
    line_with(&shown, &[&live, "reload", r#"query={"live":true}"#]);

    worker.stop().await;
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

/// The next delivery of `sub`, which must be message `id`.
async fn next_reload(sub: &mut intracom::Subscriber, id: &str) -> intracom::Delivery {
    let delivery = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .expect("a delivery within the hang guard")
        .expect("a delivery")
        .expect("not an error");
    assert_eq!(delivery.id, id);
    delivery
}

async fn mongosh_malformed_documents_are_refused_or_dead_lettered(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .expect("bus");
    let mut sub = bus.subscribe(Subscription::new()).await.expect("subscribe");

    let out = shell(
        &uri,
        &database,
        r#"function attempt(label, f) {
  try { f(); print(label + ": stored"); }
  catch (e) { print(label + ": refused " + e.code + " " + e.message); }
}
const stamps = { $currentDate: { ts: { $type: "timestamp" }, at: { $type: "date" } } };
const body = { serviceNameSource: "billing", instanceSource: "mongosh", serviceNameDest: null,
  type: "broadcast", delivery: "all", action: "reload", query: {}, priority: NumberInt(0) };
// query_ts from Date.now(): a double.
attempt("double query_ts", () => ic.db.messages.updateOne({ _id: "bad-1", ts: { $exists: false } },
  Object.assign({ $setOnInsert: Object.assign({}, body, { query_ts: Date.now() }) }, stamps), { upsert: true }));
// No stamps: inserted as is, without ts and at.
attempt("no stamps", () => ic.db.messages.insertOne(Object.assign({ _id: "bad-2", query_ts: NumberLong("1") }, body)));
// An ObjectId for _id.
attempt("objectid _id", () => ic.db.messages.insertOne(Object.assign({ _id: ObjectId(), ts: Timestamp({ t: 0, i: 0 }), at: new Date(), query_ts: NumberLong("1") }, body)));
// A type the bus does not know.
attempt("unknown type", () => ic.db.messages.updateOne({ _id: "bad-4", ts: { $exists: false } },
  Object.assign({ $setOnInsert: Object.assign({}, body, { type: "event", query_ts: NumberLong("1") }) }, stamps), { upsert: true }));
// The kit checks names before writing.
attempt("kit: action with a space", () => ic.publish({ from: "billing", action: "has space" }));
attempt("kit: undeclared action", () => ic.publish({ from: "billing", action: "not.declared" }));
// Valid for the validator, not a readable message (a space in the action).
attempt("space in action", () => ic.db.messages.updateOne({ _id: "bad-5", ts: { $exists: false } },
  Object.assign({ $setOnInsert: Object.assign({}, body, { action: "has space", query_ts: NumberLong("1") }) }, stamps), { upsert: true }));
print("count " + ic.db.messages.countDocuments({ _id: /^bad-/ }));"#,
    )
    .await;
    for label in [
        "double query_ts",
        "no stamps",
        "objectid _id",
        "unknown type",
    ] {
        line_with(&out, &[&format!("{label}: refused 121")]);
    }
    line_with(&out, &["kit: action with a space: refused", "whitespace"]);
    line_with(
        &out,
        &[
            "kit: undeclared action: refused",
            "does not declare `not.declared`",
        ],
    );
    line_with(&out, &["space in action: stored"]);
    line_with(&out, &["count 1"]);

    // The one that got in is dead-lettered by the subscriber, which goes on.
    let dead = bus.dead_letters();
    eventually(
        "bad-5 is dead-lettered",
        Duration::from_secs(60),
        || async { dead.get("bad-5").await.expect("dead letters").is_some() },
    )
    .await;
    let good = bus
        .publish(Message::broadcast("reload"))
        .await
        .expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .expect("a delivery within the hang guard")
        .expect("a delivery")
        .expect("not an error");
    assert_eq!(delivery.id, good.id);
    let shown = shell(&uri, &database, "ic.dead();").await;
    line_with(&shown, &["bad-5", "has space"]);

    bus.shutdown().await;
    drop_database(&uri, &database).await;
}
