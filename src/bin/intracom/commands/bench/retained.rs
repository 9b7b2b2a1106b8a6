//! `intracom bench --retained 10000,1000000`: whether claims and catch-ups grow with
//! the retained collection, in TTL and in capped retention.
//!
//! For each retention mode and each size N: a fresh database whose `messages` holds N
//! retained broadcasts, then a catch-up of the newest messages (a subscription that
//! starts after the last of the N: its scan reads by `ts` from there) and claims of
//! queued work one at a time (the medium's own claim command). Each query's plan is
//! asked with `explain` where the server answers it: the winning plan's stages, and
//! for the catch-up page the documents and keys it examined.

use std::time::{Duration, Instant};

use futures::StreamExt;
use intracom::bson::{doc, Bson, Document, Timestamp};
use intracom::config::Retention;
use intracom::{Config, Intracom, Message, Position, StartFrom, Subscription};
use mongodb::options::ReturnDocument;
use mongodb::Client;
use serde_json::json;

use super::db::{raw_claim, raw_done};
use super::{bench_config, quantile_ms, SERVICE};
use crate::output::{fail, Failure, Outcome};

/// How long one delivery may take before the run is called failed (a hang guard).
const PATIENCE: Duration = Duration::from_secs(60);
/// The page size of a follower's catch-up scan.
const SCAN_PAGE: i64 = 256;
/// The instance of the bench's bus here.
const INSTANCE: &str = "bench-retained";

fn failed(what: &str, error: impl std::fmt::Display) -> Failure {
    fail(
        format!("{what}: {error}"),
        "check the server (`intracom doctor`); INTRACOM_LOG=debug shows more",
    )
}

/// The options of the retained figure.
pub(crate) struct RetainedSizes {
    pub retained: Vec<usize>,
    /// The retention modes to measure (`ttl`, `capped`).
    pub modes: Vec<Retention>,
    pub claims: usize,
    pub catch_up: usize,
}

/// A query's plan as `explain` gave it.
#[derive(Clone, Debug, Default)]
struct Plan {
    /// The winning plan's stages, outermost first (`LIMIT > FETCH > IXSCAN ts_1__id_1`).
    stages: Option<String>,
    docs_examined: Option<f64>,
    keys_examined: Option<f64>,
    /// Why there is no plan.
    error: Option<String>,
}

impl Plan {
    fn collscan(&self) -> bool {
        self.stages
            .as_deref()
            .is_some_and(|s| s.contains("COLLSCAN"))
    }

    fn text(&self) -> String {
        match (&self.stages, &self.error) {
            (Some(stages), _) => stages.clone(),
            (None, Some(error)) => format!("not answered ({error})"),
            _ => "-".into(),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "stages": self.stages,
            "docs_examined": self.docs_examined,
            "keys_examined": self.keys_examined,
            "error": self.error,
        })
    }
}

struct Row {
    mode: &'static str,
    retained: usize,
    fill_rate: f64,
    catch_up_rate: f64,
    claim_p50_ms: f64,
    claim_p99_ms: f64,
    scan_plan: Plan,
    claim_plan: Plan,
}

pub(crate) async fn run(base: &Config, sizes: &RetainedSizes, json_out: bool) -> Outcome {
    let raw = Client::with_uri_str(&base.db.uri)
        .await
        .map_err(|e| failed("driver client", e))?;
    let started = Instant::now();
    let mut rows = Vec::new();
    for (mode, retention) in [("ttl", Retention::Ttl), ("capped", Retention::Capped)] {
        if !sizes.modes.contains(&retention) {
            continue;
        }
        for &n in &sizes.retained {
            if !json_out {
                eprintln!("retained: {n} messages, {mode} retention…");
            }
            let row = one(base, &raw, mode, retention, n, sizes).await?;
            if !json_out {
                // Each row as it comes: a long run stopped early still says something.
                eprintln!(
                    "retained: {n} messages, {mode}: fill {:.0} msg/s, catch-up {:.0} msg/s, claim p50 {:.2} ms, p99 {:.2} ms; catch-up page: {}; claim: {}",
                    row.fill_rate,
                    row.catch_up_rate,
                    row.claim_p50_ms,
                    row.claim_p99_ms,
                    row.scan_plan.text(),
                    row.claim_plan.text()
                );
            }
            rows.push(row);
        }
    }
    if json_out {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "retention": r.mode,
                    "retained": r.retained,
                    "fill_msgs_per_s": r.fill_rate,
                    "catch_up_msgs_per_s": r.catch_up_rate,
                    "claim_p50_ms": r.claim_p50_ms,
                    "claim_p99_ms": r.claim_p99_ms,
                    "catch_up_plan": r.scan_plan.json(),
                    "claim_plan": r.claim_plan.json(),
                })
            })
            .collect();
        out!(
            "{}",
            json!({
                "uri": base.db.redacted_uri(),
                "claims": sizes.claims,
                "catch_up": sizes.catch_up,
                "rows": rows,
                "elapsed_s": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        crate::output::write_out(format_args!(
            "{}",
            table(base, sizes, &rows, started.elapsed())
        ));
    }
    Ok(())
}

async fn one(
    base: &Config,
    raw: &Client,
    mode: &'static str,
    retention: Retention,
    n: usize,
    sizes: &RetainedSizes,
) -> Result<Row, Failure> {
    let database = format!(
        "intracom_bench_{}",
        intracom::message::new_id().to_lowercase()
    );
    let mut config = bench_config(base, Some(&database), INSTANCE);
    config.db.retention = retention;
    // Nothing expires during the run, and a capped collection holds every message.
    config.timeout_ms = config.timeout_ms.max(6 * 3_600_000);
    let room = (n + sizes.claims + sizes.catch_up) as u64 * 2048;
    config.db.capped_bytes = config.db.capped_bytes.max(room);
    let messages_name = config.db.messages.clone();
    let bus = Intracom::connect(config).await?;
    let result = async {
        // Fill: N broadcasts, in batches.
        let started = Instant::now();
        let mut last_ts: Option<Timestamp> = None;
        let mut left = n;
        while left > 0 {
            let batch = left.min(1000);
            let receipts = bus
                .publish_all(
                    (0..batch)
                        .map(|i| Message::broadcast("reload").body(doc! { "n": (n - left + i) as i64 }))
                        .collect(),
                )
                .await?;
            last_ts = receipts.iter().rev().find_map(|r| r.ts).or(last_ts);
            left -= batch;
        }
        let fill_rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let messages = raw.database(&database).collection::<Document>(&messages_name);
        let last_ts = match last_ts {
            Some(ts) => ts,
            None => newest_ts(&messages).await?,
        };
        // Catch-up: the newest messages, read by a subscription that starts after the
        // last retained one.
        bus.publish_all(
            (0..sizes.catch_up)
                .map(|_| Message::broadcast("reload").body(doc! { "late": true }))
                .collect(),
        )
        .await?;
        let scan_filter = doc! {
            "serviceNameDest": { "$in": [Bson::Null, SERVICE] },
            "delivery": { "$ne": "one" },
            "action": { "$in": ["reload"] },
            "$and": [ { "$or": [ { "instanceDest": { "$exists": false } }, { "instanceDest": INSTANCE } ] },
                      { "ts": { "$gt": last_ts } } ],
        };
        let scan_plan = explain(
            raw,
            &database,
            doc! {
                "find": &messages_name,
                "filter": scan_filter,
                "sort": { "ts": 1, "_id": 1 },
                "limit": SCAN_PAGE,
            },
        )
        .await;
        let started = Instant::now();
        let mut sub = bus
            .subscribe(
                Subscription::new()
                    .actions(["reload"])
                    .start(StartFrom::After(Position::new(last_ts, None))),
            )
            .await?;
        let mut got = 0;
        while got < sizes.catch_up {
            let delivery = tokio::time::timeout(PATIENCE, sub.next())
                .await
                .map_err(|_| failed("catch-up", "no delivery within 60 s"))?
                .ok_or_else(|| failed("catch-up", "the subscription ended"))??;
            got += 1;
            delivery.ack().await?;
        }
        let catch_up_rate = got as f64 / started.elapsed().as_secs_f64().max(1e-9);
        drop(sub);
        // Claims: queued work, claimed and settled one at a time.
        bus.publish_all(
            (0..sizes.claims)
                .map(|_| Message::to_service(SERVICE, "job").work())
                .collect(),
        )
        .await?;
        let claim_filter = doc! { "$and": [
            { "serviceNameDest": SERVICE, "delivery": "one", "state": "pending" },
            { "action": { "$in": ["job"] } },
            { "$or": [
                { "lease": Bson::Null },
                { "$expr": { "$lte": [
                    { "$dateAdd": { "startDate": "$lease.at", "unit": "millisecond", "amount": "$lease.ms" } },
                    "$$NOW",
                ] } },
            ] },
        ] };
        let claim_plan = explain(
            raw,
            &database,
            doc! { "find": &messages_name, "filter": claim_filter.clone(), "sort": { "priority": -1, "ts": 1 }, "limit": 1 },
        )
        .await;
        let mut claims = Vec::with_capacity(sizes.claims);
        loop {
            let started = Instant::now();
            let claimed = messages
                .find_one_and_update(claim_filter.clone(), raw_claim("bench-claim"))
                .sort(doc! { "priority": -1, "ts": 1 })
                .return_document(ReturnDocument::After)
                .await
                .map_err(|e| failed("claim", e))?;
            let Some(job) = claimed else { break };
            claims.push(started.elapsed());
            let id = job.get_str("_id").unwrap_or_default().to_string();
            messages
                .update_one(doc! { "_id": id }, raw_done(None))
                .await
                .map_err(|e| failed("settle", e))?;
        }
        if claims.len() != sizes.claims {
            return Err(failed(
                "claims",
                format!("{} of {} queued jobs claimed", claims.len(), sizes.claims),
            ));
        }
        Ok(Row {
            mode,
            retained: n,
            fill_rate,
            catch_up_rate,
            claim_p50_ms: quantile_ms(&mut claims, 0.5),
            claim_p99_ms: quantile_ms(&mut claims, 0.99),
            scan_plan,
            claim_plan,
        })
    }
    .await;
    bus.shutdown().await;
    if let Err(error) = raw.database(&database).drop().await {
        tracing::warn!(%error, database, "bench database not dropped");
    }
    result
}

async fn newest_ts(messages: &mongodb::Collection<Document>) -> Result<Timestamp, Failure> {
    messages
        .find_one(doc! {})
        .sort(doc! { "ts": -1 })
        .await
        .map_err(|e| failed("newest message", e))?
        .and_then(|d| d.get_timestamp("ts").ok())
        .ok_or_else(|| failed("newest message", "no message has a ts"))
}

/// The plan of `command`, by `explain` with execution statistics.
async fn explain(raw: &Client, database: &str, command: Document) -> Plan {
    let answer = raw
        .database(database)
        .run_command(doc! { "explain": command, "verbosity": "executionStats" })
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            return Plan {
                error: Some(error.to_string()),
                ..Plan::default()
            }
        }
    };
    let planner = answer.get_document("queryPlanner").ok();
    let mut winning = planner.and_then(|p| p.get_document("winningPlan").ok());
    // Slot-based plans nest the classic tree under `queryPlan`.
    if let Some(inner) = winning.and_then(|w| w.get_document("queryPlan").ok()) {
        winning = Some(inner);
    }
    let stats = answer.get_document("executionStats").ok();
    let count = |key: &str| {
        stats.and_then(|s| match s.get(key) {
            Some(Bson::Int32(v)) => Some(f64::from(*v)),
            Some(Bson::Int64(v)) => Some(*v as f64),
            Some(Bson::Double(v)) => Some(*v),
            _ => None,
        })
    };
    Plan {
        stages: winning.map(stages),
        docs_examined: count("totalDocsExamined"),
        keys_examined: count("totalKeysExamined"),
        error: winning
            .is_none()
            .then(|| "no winningPlan in the answer".into()),
    }
}

/// A plan's stages, outermost first, with the index of an index scan.
fn stages(plan: &Document) -> String {
    let mut out = Vec::new();
    let mut at = Some(plan);
    while let Some(stage) = at {
        let name = stage.get_str("stage").unwrap_or("?");
        match stage.get_str("indexName") {
            Ok(index) => out.push(format!("{name} {index}")),
            Err(_) => out.push(name.to_string()),
        }
        at = stage.get_document("inputStage").ok().or_else(|| {
            stage
                .get_array("inputStages")
                .ok()
                .and_then(|a| a.first())
                .and_then(Bson::as_document)
        });
    }
    out.join(" > ")
}

fn table(base: &Config, sizes: &RetainedSizes, rows: &[Row], elapsed: Duration) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "intracom bench --retained: at {}; catch-up of the newest {} messages after the retained ones, {} claims one at a time (claim + settle, the claim timed); {:.0} s",
        base.db.redacted_uri(),
        sizes.catch_up,
        sizes.claims,
        elapsed.as_secs_f64()
    );
    let header = [
        "retention",
        "retained",
        "fill msg/s",
        "catch-up msg/s",
        "claim p50 ms",
        "claim p99 ms",
        "catch-up page plan (docs examined)",
        "claim plan",
    ];
    let number = |v: f64, d: usize| {
        if v.is_finite() {
            format!("{v:.d$}")
        } else {
            "-".into()
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let docs = r
                .scan_plan
                .docs_examined
                .map(|d| format!(" ({d:.0})"))
                .unwrap_or_default();
            vec![
                r.mode.to_string(),
                r.retained.to_string(),
                number(r.fill_rate, 0),
                number(r.catch_up_rate, 0),
                number(r.claim_p50_ms, 2),
                number(r.claim_p99_ms, 2),
                format!("{}{docs}", r.scan_plan.text()),
                r.claim_plan.text(),
            ]
        })
        .collect();
    super::report::write_table(&mut out, &header, cells);
    // Whether anything grew with the collection: the largest N beside the smallest,
    // per mode.
    let _ = writeln!(out, "growth with the retained collection:");
    for mode in ["ttl", "capped"] {
        let of_mode: Vec<&Row> = rows.iter().filter(|r| r.mode == mode).collect();
        let (Some(small), Some(large)) = (
            of_mode.iter().min_by_key(|r| r.retained),
            of_mode.iter().max_by_key(|r| r.retained),
        ) else {
            continue;
        };
        if small.retained == large.retained {
            continue;
        }
        let claim = large.claim_p50_ms / small.claim_p50_ms;
        let scan = small.catch_up_rate / large.catch_up_rate;
        let collscan = of_mode
            .iter()
            .any(|r| r.scan_plan.collscan() || r.claim_plan.collscan());
        let _ = writeln!(
            out,
            "  {mode}: {}→{} retained: claim p50 ×{:.2}, catch-up time ×{:.2}; {}",
            small.retained,
            large.retained,
            claim,
            scan,
            if collscan {
                "a plan shows COLLSCAN (see the table)"
            } else {
                "no plan shows COLLSCAN"
            }
        );
    }
    out
}
