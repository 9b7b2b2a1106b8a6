//! The checker: holds what the histories say was acknowledged against what was observed
//! (the histories' deliveries and outcomes) and what the server kept (the final
//! collections), invariant by invariant.
//!
//! What was acknowledged and is not kept after a server kill -9 is "lost by the server"
//! (SecantusDB may lose acknowledged writes at kill -9): reported per kill, never
//! counted as intracom's violation; with no kill before it, it is a violation.

use std::collections::{BTreeMap, HashMap, HashSet};

use intracom::bson::Document;
use serde_json::{json, Value};

use crate::history::Record;
use crate::workload::{MAX_ATTEMPTS, SUBSCRIPTIONS};

/// One fault as applied.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    pub kind: String,
    /// `server` or the process name.
    pub target: String,
    pub start_ms: f64,
    pub heal_ms: Option<f64>,
    pub detail: Value,
}

/// Everything the checker judges.
pub struct Evidence {
    pub server: String,
    /// The Python server: lease judgments are skipped (its `$$NOW` divergence).
    pub python_server: bool,
    pub seed: u64,
    pub seconds: u64,
    /// The workload's pace (its pauses multiplied by it).
    pub pace: u64,
    pub start_ms: f64,
    /// The machine's wall clock minus its monotonic clock, in ms, at the start: maps a
    /// server stamp (a local server's wall clock) onto the histories' times.
    pub wall_minus_monotonic_ms: f64,
    pub faults_end_ms: f64,
    pub drain_ms: Option<f64>,
    pub drain_bound_ms: f64,
    /// Every history record, by time; torn or unreadable lines dropped.
    pub history: (Vec<Record>, usize),
    pub faults: Vec<FaultRecord>,
    pub messages: Vec<Document>,
    pub dead: Vec<Document>,
    pub effects: Vec<Document>,
    pub replies_cut: u64,
    /// Why the run stopped early, if it did.
    pub aborted: Option<String>,
}

/// One invariant's verdict.
#[derive(Default)]
struct Verdict {
    violations: u64,
    examples: Vec<Value>,
    note: Option<String>,
    skipped: bool,
}

impl Verdict {
    fn violate(&mut self, example: Value) {
        self.violations += 1;
        if self.examples.len() < 5 {
            self.examples.push(example);
        }
    }
}

/// A message's publish as the histories tell it.
#[derive(Default, Clone)]
struct Publish {
    invoked_ms: f64,
    /// `ok`, `duplicate`, `buffered` (acknowledged); `info` or none (unknown).
    outcome: Option<String>,
    outcome_ms: f64,
    seq: i64,
    publisher: String,
    action: String,
    fail: i64,
}

impl Publish {
    fn acked(&self) -> bool {
        matches!(
            self.outcome.as_deref(),
            Some("ok" | "duplicate" | "buffered")
        )
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round(ms: f64) -> f64 {
    ms.round()
}

/// Judges the evidence: the report (JSON) and whether every invariant held.
pub fn check(e: &Evidence) -> (Value, bool) {
    let records = &e.history.0;
    let rel = |t: f64| round(t - e.start_ms);
    // Each server kill: (fault index, when it was sent, when the process was gone).
    let kills: Vec<(usize, f64, f64)> = e
        .faults
        .iter()
        .enumerate()
        .filter(|(_, f)| f.kind == "server-kill9")
        .map(|(i, f)| {
            let dead = f
                .detail
                .get("dead_at")
                .and_then(Value::as_f64)
                .unwrap_or(f.start_ms);
            (i, f.start_ms, dead)
        })
        .collect();
    // The first kill that can have lost a write acknowledged at `from` before `to`.
    let kill_between = |from: f64, to: f64| {
        kills
            .iter()
            .find(|(_, sent, dead)| *dead > from && *sent < to)
            .map(|k| k.0)
    };
    let mut lost: BTreeMap<usize, BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut lose = |kill: usize, what: &'static str| {
        *lost.entry(kill).or_default().entry(what).or_default() += 1;
    };

    // What was published, and its outcome.
    let mut publishes: HashMap<String, Publish> = HashMap::new();
    let mut jobs: HashMap<String, Publish> = HashMap::new();
    for r in records {
        let (k, table) = match r.k() {
            "publish" => ("publish", &mut publishes),
            "job" => ("job", &mut jobs),
            _ => continue,
        };
        let _ = k;
        let entry = table.entry(r.s("id").to_string()).or_default();
        if r.f() == "invoke" {
            entry.invoked_ms = r.t;
            entry.seq = r.i("seq");
            entry.publisher = r.process().to_string();
            entry.action = r.s("action").to_string();
            entry.fail = r.i("fail");
        } else {
            entry.outcome = Some(r.f().to_string());
            entry.outcome_ms = r.t;
        }
    }
    let stored: HashMap<&str, &Document> = e
        .messages
        .iter()
        .filter_map(|m| m.get_str("_id").ok().map(|id| (id, m)))
        .collect();
    let delivered_anywhere: HashSet<&str> = records
        .iter()
        .filter(|r| r.k() == "deliver")
        .map(|r| r.s("id"))
        .collect();

    // 1. Acknowledged publishes are kept (or lost by the server after a kill).
    let mut kept_v = Verdict::default();
    for (id, p) in publishes.iter().chain(jobs.iter()) {
        if !p.acked()
            || stored.contains_key(id.as_str())
            || delivered_anywhere.contains(id.as_str())
        {
            continue;
        }
        match kill_between(p.invoked_ms, f64::MAX) {
            Some(kill) => lose(
                kill,
                if id.starts_with('j') {
                    "jobs"
                } else {
                    "publishes"
                },
            ),
            None => {
                kept_v.violate(json!({"id": id, "outcome": p.outcome, "at_ms": rel(p.outcome_ms)}))
            }
        }
    }

    // 2. Delivered to every matching named subscription.
    let mut delivered: HashMap<&str, HashSet<&str>> = HashMap::new();
    for r in records.iter().filter(|r| r.k() == "deliver") {
        delivered.entry(r.s("sub")).or_default().insert(r.s("id"));
    }
    let mut delivery_v = Verdict::default();
    for (id, p) in &publishes {
        let kept = stored.contains_key(id.as_str());
        let seen = delivered_anywhere.contains(id.as_str());
        let required = kept || (seen && kill_between(p.invoked_ms, f64::MAX).is_none());
        if !required {
            continue;
        }
        for (_, _, name, only) in SUBSCRIPTIONS {
            if only.is_some_and(|a| a != p.action) {
                continue;
            }
            if !delivered.get(name).is_some_and(|s| s.contains(id.as_str())) {
                delivery_v
                    .violate(json!({"sub": name, "id": id, "outcome": p.outcome, "kept": kept}));
            }
        }
    }

    // 3. Nothing delivered that was never published; bodies intact; filters kept.
    let mut phantom_v = Verdict::default();
    for r in records.iter().filter(|r| r.k() == "deliver") {
        let id = r.s("id");
        let Some(p) = publishes.get(id) else {
            phantom_v.violate(json!({"sub": r.s("sub"), "id": id, "why": "never published"}));
            continue;
        };
        let publisher: i64 = p.publisher.trim_start_matches("pub").parse().unwrap_or(-1);
        let body = r.v.get("body").cloned().unwrap_or_default();
        let intact = body.get("pub").and_then(Value::as_i64) == Some(publisher)
            && body.get("seq").and_then(Value::as_i64) == Some(p.seq)
            && r.s("action") == p.action;
        if !intact {
            phantom_v.violate(
                json!({"sub": r.s("sub"), "id": id, "why": "body or action changed", "body": body}),
            );
        }
        let only = SUBSCRIPTIONS
            .iter()
            .find(|s| s.2 == r.s("sub"))
            .and_then(|s| s.3);
        if only.is_some_and(|a| a != p.action) {
            phantom_v.violate(
                json!({"sub": r.s("sub"), "id": id, "why": "outside the subscription's filter"}),
            );
        }
    }

    // 4. No delivery again after an ack that returned Ok; unacked redeliveries counted.
    let mut redelivery_v = Verdict::default();
    let mut redelivered_unacked = 0u64;
    let mut redelivered_after_ack_lost = 0u64;
    let mut deliveries = 0u64;
    {
        // (sub, id) -> (first ack ok time, by whom), delivery count.
        let mut acked: HashMap<(&str, &str), (f64, &str)> = HashMap::new();
        let mut count: HashMap<(&str, &str), u64> = HashMap::new();
        for r in records {
            let key = (r.s("sub"), r.s("id"));
            match (r.k(), r.f()) {
                ("deliver", _) => {
                    deliveries += 1;
                    let n = count.entry(key).or_default();
                    *n += 1;
                    if let Some((t, by)) = acked.get(&key) {
                        match kill_between(*t, r.t) {
                            Some(kill) => {
                                redelivered_after_ack_lost += 1;
                                lose(kill, "checkpoints (redelivered after an ack)");
                            }
                            None => redelivery_v.violate(json!({
                                "sub": key.0, "id": key.1,
                                "acked_by": by, "acked_at_ms": rel(*t),
                                "delivered_again_by": r.p, "at_ms": rel(r.t),
                            })),
                        }
                    } else if *n > 1 {
                        redelivered_unacked += 1;
                    }
                }
                ("ack", "ok") => {
                    acked.entry(key).or_insert((r.t, r.p.as_str()));
                }
                _ => {}
            }
        }
    }

    // 5. Per-publisher order in each subscription's first deliveries.
    let mut order_v = Verdict::default();
    let mut reordered_unknown = 0u64;
    for (_, _, name, _) in SUBSCRIPTIONS {
        let mut first: HashSet<&str> = HashSet::new();
        let mut highest: HashMap<&str, (i64, &str)> = HashMap::new();
        for r in records
            .iter()
            .filter(|r| r.k() == "deliver" && r.s("sub") == name)
        {
            let id = r.s("id");
            if !first.insert(id) {
                continue;
            }
            let Some(p) = publishes.get(id) else { continue };
            let top = highest
                .entry(p.publisher.as_str())
                .or_insert((i64::MIN, ""));
            if p.seq < top.0 {
                if p.acked() {
                    order_v
                        .violate(json!({"sub": name, "id": id, "after": top.1, "at_ms": rel(r.t)}));
                } else {
                    reordered_unknown += 1;
                }
            } else {
                *top = (p.seq, id);
            }
        }
    }

    // 6. Jobs: one terminal state, an effect row per done job, dead letters as planned.
    let mut job_v = Verdict::default();
    let effects: HashSet<&str> = e
        .effects
        .iter()
        .filter_map(|d| d.get_str("job").ok())
        .collect();
    let dead_ids: HashSet<&str> = e
        .dead
        .iter()
        .filter_map(|d| d.get_str("_id").ok())
        .collect();
    // Attempts whose process recorded no outcome (it died or lost the job meanwhile).
    let mut open_attempts: HashMap<String, u64> = HashMap::new();
    {
        let mut pending: HashMap<(&str, &str), u64> = HashMap::new();
        for r in records
            .iter()
            .filter(|r| r.k() == "attempt" || r.k() == "effect")
        {
            let key = (r.p.as_str(), r.s("id"));
            match (r.k(), r.f()) {
                ("attempt", "invoke") => *pending.entry(key).or_default() += 1,
                ("attempt", "planned-fail") | ("effect", "ran" | "already" | "fail") => {
                    if let Some(n) = pending.get_mut(&key) {
                        *n = n.saturating_sub(1);
                    }
                }
                _ => {}
            }
        }
        for ((_, id), n) in pending {
            *open_attempts.entry(id.to_string()).or_default() += n;
        }
    }
    // When each job's effect was first tried: its row may be written (and lost by a
    // server kill) from then on, whenever the write's reply comes.
    let mut effect_ran: HashMap<&str, f64> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.k() == "effect" && matches!(r.f(), "invoke" | "ran"))
    {
        effect_ran.entry(r.s("id")).or_insert(r.t);
    }
    let dead_reason: HashMap<&str, &str> = e
        .dead
        .iter()
        .filter_map(|d| {
            Some((
                d.get_str("_id").ok()?,
                d.get_str("reason").unwrap_or_default(),
            ))
        })
        .collect();
    let mut last_attempt: HashMap<&str, f64> = HashMap::new();
    for r in records.iter().filter(|r| r.k() == "attempt") {
        last_attempt.insert(r.s("id"), r.t);
    }
    // Whether a worker or the server was hurt while the job was being tried.
    let fault_near_job = |from: f64, last: Option<f64>| {
        let to = last.unwrap_or(from) + 2.0 * crate::workload::LEASE_MS as f64;
        e.faults.iter().any(|f| {
            (f.target == "server" || f.target.starts_with("work"))
                && f.start_ms < to
                && f.heal_ms.unwrap_or(f64::MAX) > from
        })
    };
    let mut jobs_dead_lease_skipped = 0u64;
    let mut jobs_done = 0u64;
    let mut jobs_dead_planned = 0u64;
    let mut jobs_dead_lapsed = 0u64;
    for (id, p) in &jobs {
        let Some(m) = stored.get(id.as_str()) else {
            continue;
        };
        let fail = m
            .get_document("query")
            .ok()
            .and_then(|q| q.get_i64("fail").ok())
            .unwrap_or(0);
        match m.get_str("state").unwrap_or_default() {
            "done" => {
                jobs_done += 1;
                if !effects.contains(id.as_str()) {
                    let ran = effect_ran.get(id.as_str()).copied().unwrap_or(f64::MAX);
                    match kill_between(ran, f64::MAX) {
                        Some(kill) => lose(kill, "effects"),
                        None => job_v.violate(json!({"id": id, "why": "done without its effect"})),
                    }
                }
                if fail >= MAX_ATTEMPTS {
                    job_v.violate(
                        json!({"id": id, "why": "done though planned to fail every attempt"}),
                    );
                }
            }
            "error" => {
                let reason = dead_reason.get(id.as_str()).copied().unwrap_or_default();
                let lapsed = reason.contains("the worker holding it stopped");
                if fail >= MAX_ATTEMPTS {
                    jobs_dead_planned += 1;
                } else if open_attempts.get(id).copied().unwrap_or(0) > 0 {
                    // Attempts used up by workers that died or lost their lease.
                    jobs_dead_lapsed += 1;
                } else if e.python_server {
                    // Leases are misjudged there ($$NOW): not judged.
                    jobs_dead_lease_skipped += 1;
                } else if lapsed
                    && fault_near_job(p.invoked_ms, last_attempt.get(id.as_str()).copied())
                {
                    // Leases lapsed while a worker or the server was hurt.
                    jobs_dead_lapsed += 1;
                } else {
                    job_v.violate(json!({"id": id, "why": "dead-lettered, not planned, no attempt lost", "attempts": m.get_i32("attempts").unwrap_or(0), "error": m.get_str("lastError").unwrap_or_default()}));
                }
                if !dead_ids.contains(id.as_str()) {
                    job_v.violate(
                        json!({"id": id, "why": "settled dead but not in the dead letters"}),
                    );
                }
            }
            other => {
                job_v.violate(json!({"id": id, "why": format!("state `{other}` after the drain")}))
            }
        }
    }
    for id in &effects {
        if stored
            .get(id)
            .is_some_and(|m| m.get_str("state").ok() != Some("done"))
            && jobs.get(*id).is_none_or(|j| j.fail >= MAX_ATTEMPTS)
        {
            job_v.violate(json!({"id": id, "why": "an effect row for a job not done"}));
        }
    }

    // 7. Run-once bodies complete at most once per (consumer, id).
    let mut once_v = Verdict::default();
    let mut run_once_twice_python = 0u64;
    {
        let mut ran: HashMap<&str, Vec<(&str, f64)>> = HashMap::new();
        for r in records
            .iter()
            .filter(|r| r.k() == "effect" && r.f() == "ran")
        {
            ran.entry(r.s("id")).or_default().push((r.p.as_str(), r.t));
        }
        for (id, runs) in ran {
            // A body that ran again after a server kill that came after its first run:
            // the server lost the record of its completion (and its effect's row).
            let lost_by = runs
                .windows(2)
                .map(|w| kill_between(w[0].1, w[1].1))
                .collect::<Option<Vec<usize>>>();
            if runs.len() > 1 {
                if let Some(kills) = lost_by {
                    for kill in kills {
                        lose(kill, "run-once records");
                    }
                } else if e.python_server {
                    // A reservation's lease is judged with $$NOW there.
                    run_once_twice_python += 1;
                } else {
                    let by: Vec<&str> = runs.iter().map(|(p, _)| *p).collect();
                    once_v.violate(json!({"consumer": "effects", "id": id, "ran_in": by}));
                }
            }
        }
    }

    // 8. Requests: answered at most once; Ok(v) matches the stored outcome; a time-out is
    // never followed by a stored `done`.
    let mut request_v = Verdict::default();
    let handler_reruns: u64;
    {
        let by_rid: HashMap<&str, &Document> = e
            .messages
            .iter()
            .filter(|m| m.get_str("action").ok() == Some("calc.add"))
            .filter_map(|m| {
                m.get_document("query")
                    .ok()
                    .and_then(|q| q.get_str("rid").ok())
                    .map(|rid| (rid, m))
            })
            .collect();
        let mut outcomes: HashMap<&str, Vec<&Record>> = HashMap::new();
        let mut handled: HashMap<&str, u64> = HashMap::new();
        let mut invoked: HashMap<&str, f64> = HashMap::new();
        for r in records {
            match (r.k(), r.f()) {
                ("request", "invoke") => {
                    invoked.insert(r.s("rid"), r.t);
                }
                ("request", _) => outcomes.entry(r.s("rid")).or_default().push(r),
                ("handle", "ok") => *handled.entry(r.s("rid")).or_default() += 1,
                _ => {}
            }
        }
        handler_reruns = handled.values().filter(|n| **n > 1).map(|n| n - 1).sum();
        for (rid, outs) in &outcomes {
            if outs.len() > 1 {
                request_v.violate(json!({"rid": rid, "why": "answered more than once"}));
            }
            let r = outs[0];
            let stored = by_rid.get(rid);
            let state = stored.and_then(|m| m.get_str("state").ok());
            match r.f() {
                "ok" => {
                    let v = r.i("v");
                    match stored {
                        None => {
                            match kill_between(invoked.get(rid).copied().unwrap_or(0.0), f64::MAX) {
                                Some(kill) => lose(kill, "requests"),
                                None => request_v
                                    .violate(json!({"rid": rid, "why": "answered, not stored"})),
                            }
                        }
                        Some(m) => {
                            let stored_v = m
                                .get_document("result")
                                .ok()
                                .and_then(|d| d.get_i64("v").ok());
                            if state != Some("done")
                                && r.s("arid") == *rid
                                && kill_between(r.t, f64::MAX).is_some()
                            {
                                // The settle the caller read was lost by a server kill
                                // after it: the request was then settled again (timed
                                // out, or answered anew).
                                if let Some(kill) = kill_between(r.t, f64::MAX) {
                                    lose(kill, "request outcomes");
                                }
                            } else if state != Some("done")
                                || stored_v != Some(v)
                                || r.s("arid") != *rid
                            {
                                request_v.violate(json!({"rid": rid, "why": "the caller's answer is not the stored outcome", "caller_v": v, "stored_state": state, "stored_v": stored_v}));
                            }
                        }
                    }
                }
                "timeout" if state == Some("done") => {
                    request_v.violate(json!({"rid": rid, "why": "timed out, then stored done"}));
                }
                _ => {}
            }
        }
    }

    // 9. The drain finishes within its bound.
    let mut drain_v = Verdict::default();
    if e.drain_ms.is_none() {
        drain_v
            .violate(json!({"why": format!("not drained within {} s", e.drain_bound_ms / 1000.0)}));
    }
    if let Some(why) = &e.aborted {
        drain_v.violate(json!({"why": format!("the run stopped early: {why}")}));
    }

    // 10. Leases: no claim of a job while an earlier run of it is still running inside
    // its lease. Each run reads, as its handler starts, the lease the server holds; when
    // the attempts it reads are its own, that is its claim's lease or a renewal of it (a
    // renewal only extends a live lease). The next attempt's lease was stamped at or
    // after its claim; stamped before the earlier run's lease ended and before that
    // run's handler returned (or without a return: killed), the two runs overlapped
    // inside a valid lease. Times within LEASE_SLACK_MS are not judged (the wall and
    // monotonic clocks drift apart a little).
    let lease_v = if e.python_server {
        Verdict {
            skipped: true,
            note: Some("skipped: the Python server misreads $$NOW in a query $expr (MONGODB.md), so held leases look lapsed and claims are taken over: its lease judgments mean nothing, and its unplanned dead letters (jobs.dead_after_lapsed_leases_not_judged_python) and run-once bodies run twice under a lapsed reservation (jobs.run_once_ran_twice_not_judged_python) are counted, not judged".into()),
            ..Verdict::default()
        }
    } else {
        judge_leases(e, records)
    };

    let invariants: Vec<(&str, Verdict)> = vec![
        ("acknowledged-publish-kept", kept_v),
        ("delivered-to-every-matching-subscription", delivery_v),
        ("nothing-delivered-unpublished-or-changed", phantom_v),
        ("no-redelivery-after-ack", redelivery_v),
        ("per-publisher-order", order_v),
        ("job-one-terminal-state", job_v),
        ("run-once-at-most-once", once_v),
        ("request-outcomes", request_v),
        ("drain-within-bound", drain_v),
        ("leases", lease_v),
    ];
    let mut passed = 0;
    let mut failed = 0;
    let mut inv_json = serde_json::Map::new();
    for (name, v) in &invariants {
        let verdict = if v.skipped {
            "skipped"
        } else if v.violations == 0 {
            passed += 1;
            "passed"
        } else {
            failed += 1;
            "failed"
        };
        let mut entry =
            json!({"verdict": verdict, "violations": v.violations, "first": v.examples});
        if let Some(note) = &v.note {
            entry["note"] = json!(note);
        }
        inv_json.insert((*name).to_string(), entry);
    }

    // Figures.
    let mut ops: BTreeMap<String, u64> = BTreeMap::new();
    for r in records {
        if !r.f().is_empty() {
            *ops.entry(format!("{}/{}", r.k(), r.f())).or_default() += 1;
        }
    }
    let mut by_kind: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
    for f in &e.faults {
        let entry = by_kind.entry(f.kind.as_str()).or_default();
        entry.0 += 1;
        entry.1 += f.heal_ms.unwrap_or(e.faults_end_ms) - f.start_ms;
    }
    let faults_json: serde_json::Map<String, Value> = by_kind
        .iter()
        .map(|(k, (n, ms))| {
            (
                (*k).to_string(),
                json!({"count": n, "seconds": (ms / 100.0).round() / 10.0}),
            )
        })
        .collect();
    // Recovery: from a heal to the next success of the processes it hurt (any, for the
    // server's faults).
    let success = |r: &Record| {
        matches!(
            (r.k(), r.f()),
            ("publish", "ok") | ("ack", "ok") | ("request", "ok") | ("effect", "ran" | "already")
        ) || r.k() == "deliver"
    };
    let mut recoveries: Vec<f64> = Vec::new();
    for f in &e.faults {
        let Some(heal) = f.heal_ms else { continue };
        let next = records.iter().find(|r| {
            r.t >= heal && success(r) && (f.target == "server" || r.process() == f.target)
        });
        if let Some(r) = next {
            recoveries.push(r.t - heal);
        }
    }
    recoveries.sort_by(f64::total_cmp);
    let outbox_peak = records
        .iter()
        .filter(|r| r.k() == "outbox")
        .map(|r| r.i("n"))
        .max()
        .unwrap_or(0);
    let mut dead_reasons: BTreeMap<String, u64> = BTreeMap::new();
    for d in &e.dead {
        let reason: String = d
            .get_str("reason")
            .unwrap_or_default()
            .chars()
            .take(60)
            .collect();
        *dead_reasons.entry(reason).or_default() += 1;
    }
    let lost_json: Vec<Value> = lost
        .iter()
        .map(|(kill, what)| {
            json!({"kill": kill, "at_ms": rel(e.faults[*kill].start_ms), "lost": what})
        })
        .collect();
    let fault_log: Vec<Value> = e
        .faults
        .iter()
        .map(|f| {
            json!({
                "kind": f.kind, "target": f.target, "at_ms": rel(f.start_ms),
                "healed_at_ms": f.heal_ms.map(rel), "detail": f.detail,
            })
        })
        .collect();
    let closing = format!("nemesis: {passed} passed, {failed} failed");
    let report = json!({
        "seed": e.seed,
        "server": e.server,
        "seconds": e.seconds,
        "pace": e.pace,
        "start_ms": round(e.start_ms),
        "duration_ms": round(e.faults_end_ms - e.start_ms),
        "invariants": inv_json,
        "operations": ops,
        "faults": {
            "total": e.faults.len(),
            "by_kind": faults_json,
            "replies_cut": e.replies_cut,
            "server_kills": kills.len(),
        },
        "deliveries": {
            "total": deliveries,
            "redelivered_unacked": redelivered_unacked,
            "redelivered_after_ack_lost_by_server": redelivered_after_ack_lost,
            "reordered_unknown_outcome": reordered_unknown,
        },
        "lost_by_server": lost_json,
        "recovery_ms": {
            "count": recoveries.len(),
            "p50": round(percentile(&recoveries, 50.0)),
            "p99": round(percentile(&recoveries, 99.0)),
            "max": round(recoveries.last().copied().unwrap_or(0.0)),
        },
        "drain_ms": e.drain_ms.map(round),
        "outbox_peak": outbox_peak,
        "jobs": {
            "published": jobs.len(),
            "done": jobs_done,
            "dead_planned": jobs_dead_planned,
            "dead_after_lost_attempts": jobs_dead_lapsed,
            "dead_after_lapsed_leases_not_judged_python": jobs_dead_lease_skipped,
            "run_once_ran_twice_not_judged_python": run_once_twice_python,
        },
        "request_handler_reruns": handler_reruns,
        "dead_letters_by_reason": dead_reasons,
        "history_lines_dropped": e.history.1,
        "fault_log": fault_log,
        "closing": closing,
    });
    (report, failed == 0)
}

// ---- The checker's own trials: each feeds a small history and asserts the verdict.

fn record(t: f64, p: &str, v: Value) -> Record {
    Record {
        t,
        p: p.to_string(),
        v,
    }
}

fn stored_event(id: &str, publisher: i64, seq: i64) -> Document {
    intracom::bson::doc! {
        "_id": id, "type": "broadcast", "action": crate::workload::action_of(seq),
        "query": { "pub": publisher, "seq": seq },
    }
}

/// A publish of `p1-<seq>` acknowledged at `t`, delivered to and acked by every
/// subscription that matches it, one second later.
fn clean(seq: i64, t: f64) -> Vec<Record> {
    let id = format!("p1-{seq}");
    let action = crate::workload::action_of(seq);
    let mut out = vec![
        record(
            t,
            "pub1#1",
            json!({"k": "publish", "f": "invoke", "id": id, "seq": seq, "action": action}),
        ),
        record(
            t + 1.0,
            "pub1#1",
            json!({"k": "publish", "f": "ok", "id": id, "seq": seq, "action": action}),
        ),
    ];
    for (i, (_, _, name, only)) in SUBSCRIPTIONS.iter().enumerate() {
        if only.is_some_and(|a| a != action) {
            continue;
        }
        let p = format!("sub{}#1", i + 1);
        out.push(record(t + 1000.0, &p, json!({"k": "deliver", "sub": name, "id": id, "action": action, "body": {"pub": 1, "seq": seq}})));
        out.push(record(
            t + 1001.0,
            &p,
            json!({"k": "ack", "f": "ok", "sub": name, "id": id}),
        ));
    }
    out
}

fn evidence(
    mut records: Vec<Record>,
    messages: Vec<Document>,
    faults: Vec<FaultRecord>,
) -> Evidence {
    records.sort_by(|a, b| a.t.total_cmp(&b.t));
    Evidence {
        server: "test".into(),
        python_server: false,
        seed: 1,
        seconds: 10,
        pace: 1,
        start_ms: 0.0,
        wall_minus_monotonic_ms: 0.0,
        faults_end_ms: 10_000.0,
        drain_ms: Some(100.0),
        drain_bound_ms: 1000.0,
        history: (records, 0),
        faults,
        messages,
        dead: Vec::new(),
        effects: Vec::new(),
        replies_cut: 0,
        aborted: None,
    }
}

fn kill_at(t: f64) -> FaultRecord {
    FaultRecord {
        kind: "server-kill9".into(),
        target: "server".into(),
        start_ms: t,
        heal_ms: Some(t + 500.0),
        detail: json!({}),
    }
}

fn verdict(report: &Value, invariant: &str) -> String {
    report["invariants"][invariant]["verdict"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn a_clean_history_passes() {
    let mut records = clean(1, 100.0);
    records.extend(clean(2, 200.0));
    let e = evidence(
        records,
        vec![stored_event("p1-1", 1, 1), stored_event("p1-2", 1, 2)],
        vec![],
    );
    let (report, passed) = check(&e);
    assert!(passed, "{report:#}");
    assert_eq!(report["closing"], "nemesis: 10 passed, 0 failed");
}

fn finds_a_redelivery_after_an_ack() {
    let mut records = clean(1, 100.0);
    // The subscriber restarts and gets p1-1 again, acked before it.
    records.push(record(5000.0, "sub1#2", json!({"k": "deliver", "sub": "audit-log", "id": "p1-1", "action": "ev.updated", "body": {"pub": 1, "seq": 1}})));
    let e = evidence(records, vec![stored_event("p1-1", 1, 1)], vec![]);
    let (report, passed) = check(&e);
    assert!(!passed);
    assert_eq!(
        verdict(&report, "no-redelivery-after-ack"),
        "failed",
        "{report:#}"
    );
    assert_eq!(
        report["invariants"]["no-redelivery-after-ack"]["first"][0]["delivered_again_by"],
        "sub1#2"
    );
}

fn a_server_kill_makes_a_redelivery_lost_by_the_server() {
    let mut records = clean(1, 100.0);
    records.push(record(5000.0, "sub1#2", json!({"k": "deliver", "sub": "audit-log", "id": "p1-1", "action": "ev.updated", "body": {"pub": 1, "seq": 1}})));
    let e = evidence(
        records,
        vec![stored_event("p1-1", 1, 1)],
        vec![kill_at(3000.0)],
    );
    let (report, passed) = check(&e);
    assert!(passed, "{report:#}");
    assert_eq!(
        report["deliveries"]["redelivered_after_ack_lost_by_server"],
        1
    );
    assert_eq!(report["lost_by_server"][0]["kill"], 0);
}

fn finds_an_acknowledged_publish_not_kept() {
    let records = vec![
        record(
            100.0,
            "pub1#1",
            json!({"k": "publish", "f": "invoke", "id": "p1-1", "seq": 1, "action": "ev.updated"}),
        ),
        record(
            101.0,
            "pub1#1",
            json!({"k": "publish", "f": "ok", "id": "p1-1", "seq": 1, "action": "ev.updated"}),
        ),
    ];
    let (report, passed) = check(&evidence(records.clone(), vec![], vec![]));
    assert!(!passed);
    assert_eq!(
        verdict(&report, "acknowledged-publish-kept"),
        "failed",
        "{report:#}"
    );
    // After a server kill, the same loss is the server's.
    let (report, passed) = check(&evidence(records, vec![], vec![kill_at(500.0)]));
    assert!(passed, "{report:#}");
    assert_eq!(report["lost_by_server"][0]["lost"]["publishes"], 1);
}

fn finds_a_missed_delivery_and_an_order_inversion() {
    let mut records = clean(1, 100.0);
    records.extend(clean(2, 200.0));
    // mirror-all gets p1-2's first delivery before p1-1's.
    for r in &mut records {
        if r.s("sub") == "mirror-all" && r.s("id") == "p1-1" {
            r.t += 5000.0;
        }
    }
    // audit-log never gets p1-2.
    records.retain(|r| !(r.s("sub") == "audit-log" && r.s("id") == "p1-2"));
    let e = evidence(
        records,
        vec![stored_event("p1-1", 1, 1), stored_event("p1-2", 1, 2)],
        vec![],
    );
    let (report, _) = check(&e);
    assert_eq!(
        verdict(&report, "per-publisher-order"),
        "failed",
        "{report:#}"
    );
    assert_eq!(
        verdict(&report, "delivered-to-every-matching-subscription"),
        "failed"
    );
    assert_eq!(
        report["invariants"]["delivered-to-every-matching-subscription"]["first"][0]["sub"],
        "audit-log"
    );
}

fn finds_a_changed_body() {
    let mut records = clean(1, 100.0);
    for r in &mut records {
        if r.k() == "deliver" {
            r.v["body"] = json!({"pub": 1, "seq": 7});
        }
    }
    let (report, _) = check(&evidence(records, vec![stored_event("p1-1", 1, 1)], vec![]));
    assert_eq!(
        verdict(&report, "nothing-delivered-unpublished-or-changed"),
        "failed",
        "{report:#}"
    );
}

/// How far apart two clocks' readings may be and still not be judged (ms).
const LEASE_SLACK_MS: f64 = 250.0;

/// See the leases invariant in [`check`].
fn judge_leases(e: &Evidence, records: &[Record]) -> Verdict {
    // (job, attempt) → the lease read by that attempt's own run: (at, ms), server ms.
    let mut leases: HashMap<(String, i64), (f64, f64)> = HashMap::new();
    // (job, attempt) → when its handler returned (histories' clock).
    let mut ends: HashMap<(String, i64), f64> = HashMap::new();
    for r in records {
        let key = (r.s("id").to_string(), r.i("n"));
        match (r.k(), r.f()) {
            ("lease", _) if r.i("attempts") == r.i("n") => {
                let at = r.v.get("at_ms").and_then(Value::as_f64).unwrap_or(0.0);
                let ms = r.v.get("ms").and_then(Value::as_f64).unwrap_or(0.0);
                leases.insert(key, (at, ms));
            }
            ("attempt", "end") => {
                ends.insert(key, r.t);
            }
            _ => {}
        }
    }
    let mut v = Verdict::default();
    let mut judged = 0u64;
    for ((id, n), (at, ms)) in &leases {
        let Some((next_at, _)) = leases.get(&(id.clone(), n + 1)) else {
            continue;
        };
        judged += 1;
        let lease_end = at + ms;
        let returned = ends
            .get(&(id.clone(), *n))
            .map(|t| t + e.wall_minus_monotonic_ms)
            .unwrap_or(f64::MAX);
        if *next_at + LEASE_SLACK_MS < lease_end && *next_at + LEASE_SLACK_MS < returned {
            v.violate(json!({
                "id": id,
                "attempt": n,
                "why": "claimed again inside the lease of a run still going",
                "next_claimed_by_ms": round(next_at - e.wall_minus_monotonic_ms - e.start_ms),
                "lease_ended_ms": round(lease_end - e.wall_minus_monotonic_ms - e.start_ms),
                "run_returned_ms": (returned < f64::MAX).then(|| round(returned - e.wall_minus_monotonic_ms - e.start_ms)),
            }));
        }
    }
    v.note = Some(format!(
        "{judged} consecutive claims judged (both runs read their own lease); refused late settles are not judged: a worker does not tell its handler whether its settle was taken"
    ));
    v
}

fn claims_inside_a_live_lease_are_found() {
    let lease = |t: f64, n: i64, at: i64| {
        record(
            t,
            "work1#1",
            json!({"k": "lease", "id": "j1", "n": n, "attempts": n, "at_ms": at, "ms": 3000}),
        )
    };
    let end = |t: f64, n: i64| {
        record(
            t,
            "work1#1",
            json!({"k": "attempt", "f": "end", "id": "j1", "n": n}),
        )
    };
    // Attempt 1 fails at once and is released: attempt 2 claims 200 ms later.
    let released = vec![lease(10.0, 1, 10), end(20.0, 1), lease(230.0, 2, 230)];
    let (report, _) = check(&evidence(released, vec![], vec![]));
    assert_eq!(verdict(&report, "leases"), "passed", "{report:#}");
    // Attempt 2 claims 1 s into attempt 1's lease while attempt 1 still runs.
    let overlapping = vec![lease(10.0, 1, 10), lease(1010.0, 2, 1010), end(2000.0, 1)];
    let (report, _) = check(&evidence(overlapping, vec![], vec![]));
    assert_eq!(verdict(&report, "leases"), "failed", "{report:#}");
    // Attempt 1's run was killed (no end) and its lease ran out: a fair claim.
    let lapsed = vec![lease(10.0, 1, 10), lease(3500.0, 2, 3500)];
    let (report, _) = check(&evidence(lapsed, vec![], vec![]));
    assert_eq!(verdict(&report, "leases"), "passed", "{report:#}");
}

fn a_body_run_again_after_a_server_kill_is_lost_by_the_server() {
    let ran = |t: f64| record(t, "work1#1", json!({"k": "effect", "f": "ran", "id": "j1"}));
    let (report, _) = check(&evidence(vec![ran(100.0), ran(300.0)], vec![], vec![]));
    assert_eq!(
        verdict(&report, "run-once-at-most-once"),
        "failed",
        "{report:#}"
    );
    let (report, _) = check(&evidence(
        vec![ran(100.0), ran(900.0)],
        vec![],
        vec![kill_at(150.0)],
    ));
    assert_eq!(
        verdict(&report, "run-once-at-most-once"),
        "passed",
        "{report:#}"
    );
    assert_eq!(
        report["lost_by_server"][0]["lost"]["run-once records"], 1,
        "{report:#}"
    );
}

fn an_answer_whose_settle_a_server_kill_lost_is_lost_by_the_server() {
    let records = vec![
        record(
            100.0,
            "call1#1",
            json!({"k": "request", "f": "invoke", "rid": "c1-1", "seq": 1}),
        ),
        record(
            200.0,
            "call1#1",
            json!({"k": "request", "f": "ok", "rid": "c1-1", "v": 2, "arid": "c1-1"}),
        ),
    ];
    let stored = intracom::bson::doc! { "_id": "r1", "action": "calc.add", "state": "error", "query": { "rid": "c1-1" } };
    let (report, _) = check(&evidence(records.clone(), vec![stored.clone()], vec![]));
    assert_eq!(verdict(&report, "request-outcomes"), "failed", "{report:#}");
    let (report, _) = check(&evidence(records, vec![stored], vec![kill_at(300.0)]));
    assert_eq!(verdict(&report, "request-outcomes"), "passed", "{report:#}");
    assert_eq!(
        report["lost_by_server"][0]["lost"]["request outcomes"], 1,
        "{report:#}"
    );
}

/// The checker's trials, by name.
pub fn cases() -> Vec<(&'static str, fn())> {
    vec![
        ("a_clean_history_passes", a_clean_history_passes),
        (
            "finds_a_redelivery_after_an_ack",
            finds_a_redelivery_after_an_ack,
        ),
        (
            "a_server_kill_makes_a_redelivery_lost_by_the_server",
            a_server_kill_makes_a_redelivery_lost_by_the_server,
        ),
        (
            "finds_an_acknowledged_publish_not_kept",
            finds_an_acknowledged_publish_not_kept,
        ),
        (
            "finds_a_missed_delivery_and_an_order_inversion",
            finds_a_missed_delivery_and_an_order_inversion,
        ),
        ("finds_a_changed_body", finds_a_changed_body),
        (
            "a_body_run_again_after_a_server_kill_is_lost_by_the_server",
            a_body_run_again_after_a_server_kill_is_lost_by_the_server,
        ),
        (
            "an_answer_whose_settle_a_server_kill_lost_is_lost_by_the_server",
            an_answer_whose_settle_a_server_kill_lost_is_lost_by_the_server,
        ),
        (
            "claims_inside_a_live_lease_are_found",
            claims_inside_a_live_lease_are_found,
        ),
    ]
}
