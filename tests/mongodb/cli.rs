//! The `intracom` command against the real servers.

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use assert_cmd::Command;
use futures::TryStreamExt;
use intracom::bson::{doc, Document};
use intracom::{Intracom, Message, Subscription};

use crate::conformance::next;
use crate::servers::{Kind, Target};
use crate::{catalog, check, database_name, on_server, raw_client, Check};

pub fn checks() -> Vec<Check> {
    #[allow(unused_mut)] // pushed to with the features `gateway` and `http`
    let mut checks = vec![
        check!(catalog_publish_tail_stats_dead_and_doctor),
        check!(doctor_passes_on_a_young_deployment),
        check!(bench_runs_once_with_tiny_sizes),
        check!(bench_fleet_and_retained_run_once_with_tiny_sizes),
        check!(tail_by_name_resumes_after_what_it_printed),
        check!(stats_counts_the_lag_after_a_stamp_shared_by_several_messages),
    ];
    #[cfg(all(feature = "gateway", feature = "http"))]
    checks.push(check!(
        bench_fleet_through_a_gateway_runs_once_with_tiny_sizes,
        owns_server
    ));
    checks
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The command on a fresh database of the target.
struct On {
    uri: String,
    database: String,
}

impl On {
    fn new(t: &Target) -> Self {
        On {
            uri: t.uri().expect("server"),
            database: database_name(),
        }
    }

    /// `intracom --uri … --database … <args>`, to start.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("intracom"));
        // A clean environment: no config file, no overrides from the machine.
        cmd.env_remove("INTRACOM_CONFIG");
        for (key, _) in std::env::vars() {
            if key.starts_with("COMMON_INTRACOM_") {
                cmd.env_remove(key);
            }
        }
        cmd.args(["--uri", &self.uri, "--database", &self.database])
            .args(args);
        cmd
    }

    /// Runs `intracom --uri … --database … <args>` on a blocking thread.
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::from_std(self.command(args));
        tokio::task::spawn_blocking(move || cmd.output().expect("the intracom binary runs"))
            .await
            .expect("the command's thread")
    }
}

async fn catalog_publish_tail_stats_dead_and_doctor(t: &Target) {
    let db = On::new(t);
    let added = db
        .run(&["catalog", "add", "billing", "reload", "invoice.render"])
        .await;
    assert!(added.status.success(), "{}", stderr(&added));
    let listed = db.run(&["catalog", "list"]).await;
    assert!(
        stdout(&listed).contains("billing: invoice.render, reload"),
        "{}",
        stdout(&listed)
    );

    let published = db
        .run(&[
            "publish",
            "reload",
            "--from",
            "billing",
            "--body",
            r#"{"tenant": 7}"#,
        ])
        .await;
    assert!(published.status.success(), "{}", stderr(&published));
    let id = stdout(&published)
        .split_whitespace()
        .next()
        .expect("the id is printed")
        .to_string();
    let tail = db
        .run(&["tail", "--since", "10m", "--count", "1", "--json"])
        .await;
    assert!(tail.status.success(), "{}", stderr(&tail));
    let line: serde_json::Value =
        serde_json::from_str(stdout(&tail).lines().next().expect("one line per message"))
            .expect("JSON");
    assert_eq!(line["_id"], id.as_str());
    assert_eq!(line["query"]["tenant"], 7);

    let refused = db.run(&["publish", "nope", "--from", "billing"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("does not declare action `nope`"));

    let stats = db.run(&["stats", "--json"]).await;
    assert!(stats.status.success(), "{}", stderr(&stats));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&stats)).expect("JSON");
    assert_eq!(stats["total"], 1);
    assert_eq!(stats["dead"], 0);

    let timeout = db
        .run(&[
            "request",
            "billing",
            "invoice.render",
            "--from",
            "billing",
            "--timeout",
            "500ms",
        ])
        .await;
    assert_eq!(timeout.status.code(), Some(1));
    assert!(
        stderr(&timeout).contains("no answer"),
        "{}",
        stderr(&timeout)
    );

    let dead = db.run(&["dead", "list"]).await;
    assert!(dead.status.success(), "{}", stderr(&dead));
    let doctor = db.run(&["doctor"]).await;
    assert!(
        stdout(&doctor).contains("ok   topology"),
        "{}",
        stdout(&doctor)
    );
}

/// A deployment younger than the retention has an oplog that has not filled up: its
/// window says nothing about its size, and `doctor` must not call it too small.
async fn doctor_passes_on_a_young_deployment(t: &Target) {
    let db = On::new(t);
    let published = db.run(&["catalog", "add", "billing", "reload"]).await;
    assert!(published.status.success(), "{}", stderr(&published));
    let doctor = db.run(&["doctor"]).await;
    let out = stdout(&doctor);
    assert!(
        doctor.status.success(),
        "doctor exits 0 on a healthy young deployment:\n{out}\n{}",
        stderr(&doctor)
    );
    assert!(out.contains("oplog"), "doctor reports the oplog: {out}");
}

/// `intracom bench --tiny` runs every figure of the medium and prints its table, and
/// `--json` a document with every figure. A smoke test: no figure is judged here
/// (timing belongs to the bench itself, not to assertions).
async fn bench_runs_once_with_tiny_sizes(t: &Target) {
    let db = On::new(t);
    let table = db.run(&["bench", "--tiny"]).await;
    let out = stdout(&table);
    assert!(table.status.success(), "{out}\n{}", stderr(&table));
    for figure in [
        "publish, one at a time",
        "publish_all of",
        "publish → delivery p50",
        "process memory growth",
        "request/reply",
        "work queue",
    ] {
        assert!(out.contains(figure), "the table has `{figure}`:\n{out}");
    }
    let json = db
        .run(&["bench", "--tiny", "--json", "--only", "publish,work"])
        .await;
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("--json prints one JSON document");
    assert_eq!(report["medium"], "db");
    let keys: Vec<&str> = report["figures"]
        .as_array()
        .expect("figures")
        .iter()
        .filter_map(|f| f["key"].as_str())
        .collect();
    assert!(
        keys.iter().any(|k| k.starts_with("publish")) && keys.iter().any(|k| k.starts_with("work")),
        "the figures asked for: {keys:?}"
    );
    for figure in report["figures"].as_array().expect("figures") {
        assert_eq!(
            figure["intracom"]["rounds"].as_array().map(Vec::len),
            Some(2),
            "two rounds of each side with --tiny: {figure}"
        );
    }
}

/// `intracom bench --processes 1,2` starts its fleet of processes, and every process
/// reports what was addressed to it and what its hub read; `--retained` runs in both
/// retention modes. A smoke test of the report's shape and counts, never of timing.
async fn bench_fleet_and_retained_run_once_with_tiny_sizes(t: &Target) {
    let db = On::new(t);
    let fleet = db
        .run(&["bench", "--processes", "1,2", "--tiny", "--json"])
        .await;
    assert!(fleet.status.success(), "{}", stderr(&fleet));
    let report: serde_json::Value =
        serde_json::from_slice(&fleet.stdout).expect("--json prints one JSON document");
    let known = report["selection_key_known"]
        .as_bool()
        .expect("selection_key_known");
    let selections: &[&str] = if known {
        &["targeted", "everything"]
    } else {
        &["everything"]
    };
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(
        rows.len(),
        2 * selections.len(),
        "one row per P and stream: {report}"
    );
    let (messages, broadcasts) = (
        report["messages"].as_u64().expect("messages"),
        report["broadcasts"].as_u64().expect("broadcasts"),
    );
    for row in rows {
        let p = row["processes"].as_u64().expect("processes");
        let selection = row["selection"].as_str().expect("selection");
        assert!(selections.contains(&selection), "{row}");
        let per_process = row["per_process"].as_array().expect("per_process");
        assert_eq!(per_process.len() as u64, p, "{row}");
        let addressed: u64 = per_process
            .iter()
            .map(|x| x["addressed"].as_u64().expect("addressed"))
            .sum();
        assert_eq!(
            addressed,
            messages + p * broadcasts,
            "each broadcast to every process: {row}"
        );
        assert_eq!(
            row["messages"].as_u64(),
            Some(messages + broadcasts),
            "{row}"
        );
        assert!(row["delivery_p99_ms"].as_f64().is_some(), "{row}");
        if known {
            // The events each hub read, for the traffic: what was addressed to the
            // process (targeted), or every message (everything).
            for x in per_process {
                let read = x["hub_events"].as_u64().expect("the hub's event counter");
                let wanted = match selection {
                    "targeted" => x["addressed"].as_u64().expect("addressed"),
                    _ => messages + broadcasts,
                };
                assert_eq!(read, wanted, "{selection}, P={p}: {row}");
            }
        }
    }

    let retained = db
        .run(&["bench", "--retained", "30,60", "--tiny", "--json"])
        .await;
    assert!(retained.status.success(), "{}", stderr(&retained));
    let report: serde_json::Value =
        serde_json::from_slice(&retained.stdout).expect("--json prints one JSON document");
    let rows = report["rows"].as_array().expect("rows");
    let seen: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["retention"].as_str().expect("retention"),
                r["retained"].as_u64().expect("retained"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("ttl", 30), ("ttl", 60), ("capped", 30), ("capped", 60)],
        "{report}"
    );
    for row in rows {
        assert!(row["claim_p50_ms"].as_f64().is_some(), "{row}");
        assert!(row["catch_up_msgs_per_s"].as_f64().is_some(), "{row}");
    }
}

/// `intracom bench --processes 2 --via-gateways 1` runs the fleet attached directly and
/// through a gateway it starts (`intracom serve`), side by side: every process gets what
/// was addressed to it both ways, and the server holds one change stream per process
/// directly, one in all through the gateway (counted from its open cursors, which are
/// the whole server's: hence a server of this test's own). A smoke test of the
/// report's shape and counts, never of timing.
#[cfg(all(feature = "gateway", feature = "http"))]
async fn bench_fleet_through_a_gateway_runs_once_with_tiny_sizes(t: &Target) {
    let kind = t.kind().expect("a server the harness starts");
    let server = crate::servers::Server::start(kind, Default::default())
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
    let db = On {
        uri: server.uri(),
        database: database_name(),
    };
    let fleet = db
        .run(&[
            "bench",
            "--processes",
            "2",
            "--via-gateways",
            "1",
            "--tiny",
            "--fleet-messages",
            "6",
            "--broadcasts",
            "1",
            "--json",
        ])
        .await;
    assert!(fleet.status.success(), "{}", stderr(&fleet));
    let report: serde_json::Value =
        serde_json::from_slice(&fleet.stdout).expect("--json prints one JSON document");
    assert_eq!(report["via_gateways"].as_u64(), Some(1), "{report}");
    let rows = report["rows"].as_array().expect("rows");
    let routes: Vec<&str> = rows
        .iter()
        .map(|r| r["route"].as_str().expect("route"))
        .collect();
    assert_eq!(
        routes,
        ["direct", "1 gateway"],
        "both routes, in order: {report}"
    );
    for row in rows {
        assert_eq!(row["processes"].as_u64(), Some(2), "{row}");
        assert_eq!(row["messages"].as_u64(), Some(7), "{row}");
        let addressed: u64 = row["per_process"]
            .as_array()
            .expect("per_process")
            .iter()
            .map(|x| x["addressed"].as_u64().expect("addressed"))
            .sum();
        assert_eq!(addressed, 6 + 2, "each broadcast to both processes: {row}");
        assert!(row["delivery_p99_ms"].as_f64().is_some(), "{row}");
        let wanted = match row["route"].as_str() {
            Some("direct") => 2.0,
            _ => 1.0,
        };
        assert_eq!(
            row["server_change_streams"].as_f64(),
            Some(wanted),
            "one stream per process directly, one per gateway: {row}"
        );
    }
    // Through the gateway, its hub read each message once: 6 targeted and 1 broadcast.
    assert_eq!(
        rows[1]["gateways_hub_events"].as_f64(),
        Some(7.0),
        "{report}"
    );
}

/// `tail --name` acks what it prints: a second `tail --name` goes on after the last
/// message the first one printed, past the messages its filters leave out, and its
/// `--since` is for a first time only; a `tail` without a name is not moved by it.
///
/// The first one follows live (its checkpoint holds the change stream's resume token,
/// so the second resumes exactly there): a checkpoint saved while catching up from the
/// collection resumes with a look-back of the safety window, which delivers the
/// messages of that window again (at least once).
async fn tail_by_name_resumes_after_what_it_printed(t: &Target) {
    let db = On::new(t);
    let bus = Intracom::connect(on_server(
        catalog("billing", "billing-1"),
        &db.uri,
        &db.database,
    ))
    .await
    .expect("bus");
    // The first tail, live: publish once it follows (it says so on stderr).
    let mut first = db
        .command(&["tail", "--name", "audit", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the intracom binary starts");
    let pid = first.id();
    let stderr_pipe = first.stderr.take().expect("stderr");
    let said = tokio::task::spawn_blocking(move || {
        let mut said = String::new();
        for line in BufReader::new(stderr_pipe).lines() {
            let line = line.expect("stderr line");
            said.push_str(&line);
            said.push('\n');
            if line.starts_with("following") {
                break;
            }
        }
        said
    });
    let said = tokio::time::timeout(Duration::from_secs(60), said).await;
    let said = match said {
        Ok(said) => said.expect("the reading thread"),
        Err(_) => {
            kill(pid);
            panic!("tail --name did not start following within the hang guard");
        }
    };
    assert!(
        said.contains("as subscription `audit`"),
        "tail says it follows as the subscription: {said}"
    );
    let mut ids = Vec::new();
    for action in ["reload", "reload", "marker", "reload"] {
        let published = bus
            .publish(Message::broadcast(action))
            .await
            .expect("published");
        ids.push(published.id);
    }
    bus.shutdown().await;
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || first.wait_with_output()),
    )
    .await;
    let first = match waited {
        Ok(output) => output.expect("the waiting thread").expect("tail's output"),
        Err(_) => {
            kill(pid);
            panic!("tail --name --count 2 did not end within the hang guard");
        }
    };
    assert!(first.status.success(), "{}", stderr(&first));
    // A line ends with the message id in brackets.
    let printed_ids: Vec<String> = stdout(&first)
        .lines()
        .filter_map(|line| {
            line.rsplit_once('(')
                .map(|(_, id)| id.trim_end_matches(')').to_string())
        })
        .collect();
    assert_eq!(printed_ids, &ids[..2], "the first two:\n{}", stdout(&first));

    let printed = |output: &Output| -> Vec<String> {
        assert!(output.status.success(), "{}", stderr(output));
        stdout(output)
            .lines()
            .map(|line| {
                let message: serde_json::Value = serde_json::from_str(line).expect("JSON");
                message["_id"].as_str().expect("an id").to_string()
            })
            .collect()
    };
    let second = db
        .run(&[
            "tail", "--name", "audit", "--since", "10m", "--json", "--count", "1", "--action",
            "reload",
        ])
        .await;
    assert_eq!(
        printed(&second),
        &ids[3..],
        "after the last one printed, past the marker its filter leaves out"
    );
    let anonymous = db
        .run(&["tail", "--since", "10m", "--json", "--count", "1"])
        .await;
    assert_eq!(printed(&anonymous), &ids[..1], "no name: from --since");
    let stats = db.run(&["stats", "--json"]).await;
    assert!(stats.status.success(), "{}", stderr(&stats));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&stats)).expect("JSON");
    assert_eq!(stats["lag"][0]["subscription"], "audit", "{stats}");
    assert_eq!(stats["lag"][0]["messages"], 0, "all printed: {stats}");
}

/// Ends a process this test started, by its id.
fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on the id of a child this test spawned and has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// The lag of a named subscription counts the messages after its checkpoint in the
/// bus's `(ts, _id)` order: those that share the checkpoint's stamp count too. The
/// Python server stamps every write of one second alike, so five messages published
/// at the start of a second share one stamp there.
async fn stats_counts_the_lag_after_a_stamp_shared_by_several_messages(t: &Target) {
    let db = On::new(t);
    let bus = Intracom::connect(on_server(
        catalog("billing", "billing-1"),
        &db.uri,
        &db.database,
    ))
    .await
    .expect("bus");
    let mut audit = bus
        .subscribe(Subscription::named("audit"))
        .await
        .expect("subscribed");
    // At the start of a second, so that the five writes fall in one (a wait, not a
    // timing assertion: the count below holds whichever second each falls in).
    let into_second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from(1000 - into_second))).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let published = bus
            .publish(Message::broadcast("reload").body(doc! { "n": n }))
            .await
            .expect("published");
        ids.push(published.id);
    }
    let first = next(&mut audit).await;
    assert_eq!(first.id, ids[0]);
    first.ack().await.expect("acked");
    drop(audit);
    bus.shutdown().await;

    let stamps: Vec<Document> = raw_client(&db.uri)
        .await
        .database(&db.database)
        .collection::<Document>("messages")
        .find(doc! {})
        .sort(doc! { "ts": 1, "_id": 1 })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("messages");
    let ts: Vec<_> = stamps
        .iter()
        .map(|m| m.get_timestamp("ts").expect("ts"))
        .collect();
    if t.kind() == Some(Kind::SecantusPy) {
        assert!(
            ts.iter().all(|s| *s == ts[0]),
            "the case this test is for: one stamp for all five {ts:?}"
        );
    }
    let stats = db.run(&["stats", "--json"]).await;
    assert!(stats.status.success(), "{}", stderr(&stats));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&stats)).expect("JSON");
    assert_eq!(stats["lag"][0]["subscription"], "audit", "{stats}");
    assert_eq!(stats["lag"][0]["messages"], 4, "{stats}");
    let table = db.run(&["stats"]).await;
    assert!(
        stdout(&table)
            .lines()
            .any(|l| l.contains("audit") && l.split_whitespace().nth(1) == Some("4")),
        "{}",
        stdout(&table)
    );
}
