//! Where a test server is not mongod, shown by a test.
//!
//! A conformance case or check is excluded on one server only for a divergence of
//! that server from mongod's documented behaviour (DESIGN §7). Each divergence listed
//! here names the cases it breaks and comes with a test, run on that server in every
//! run, that passes while the divergence still exists: the day the server is fixed,
//! that test fails, and the exclusion goes.

use intracom::bson::{doc, DateTime, Document};
use libtest_mimic::Trial;

use crate::servers::{Kind, Target};
use crate::{database_name, raw_client};

/// A divergence of one server from mongod.
struct Divergence {
    /// The server.
    kind: Kind,
    /// The name of the test that shows it (`<server>::divergence::<name>`).
    name: &'static str,
    /// What the server does, and what mongod does instead.
    what: &'static str,
    /// The cases and checks it breaks.
    breaks: &'static [&'static str],
    /// Passes while the divergence exists.
    shows: for<'a> fn(&'a Target) -> futures::future::BoxFuture<'a, ()>,
}

fn listed() -> Vec<Divergence> {
    vec![Divergence {
        kind: Kind::SecantusPy,
        name: "now_in_a_query_expr_is_misread",
        what: "py: $$NOW in a query $expr is misread (a lease that ends in the future looks ended), so two workers can hold one claim [mongod: $$NOW is the server's clock]",
        // Two workers racing for the same requests (or jobs, in the bench's work
        // figure): a live lease is taken over.
        breaks: &[
            "exactly_one_instance_answers_each_request",
            "a_lapsed_workers_late_outcome_leaves_its_neighbours_claim_alone",
            "bench_runs_once_with_tiny_sizes",
        ],
        shows: |t| Box::pin(now_in_a_query_expr_is_misread(t)),
    }]
}

/// Why `case` is excluded on `kind`, if it is.
pub fn excluded(kind: Kind, case: &str) -> Option<&'static str> {
    listed()
        .into_iter()
        .find(|d| d.kind == kind && d.breaks.contains(&case))
        .map(|d| d.what)
}

/// The tests that show each listed divergence still exists.
pub fn trials() -> Vec<Trial> {
    listed()
        .into_iter()
        .map(|d| {
            let target = Target::Secantus(d.kind);
            let name = format!("{}::divergence::{}", d.kind.short(), d.name);
            let unavailable = target.unavailable();
            let shows = d.shows;
            let trial = Trial::test(name, move || crate::conformance::block_on(shows(&target)));
            match unavailable {
                Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
                None => trial,
            }
        })
        .collect()
}

/// The claim's query asks whether a lease has ended: `$dateAdd(at, ms) <= $$NOW`.
/// mongod answers no for a lease taken now for a minute; py answers yes.
async fn now_in_a_query_expr_is_misread(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let leases = raw_client(&uri)
        .await
        .database(&database)
        .collection::<Document>("leases");
    let now = DateTime::now();
    leases
        .insert_one(doc! { "_id": "live", "lease": { "at": now, "ms": 60_000i64 } })
        .await
        .expect("insert");
    let ended = doc! { "$expr": { "$lte": [
        { "$dateAdd": { "startDate": "$lease.at", "unit": "millisecond", "amount": "$lease.ms" } },
        "$$NOW",
    ] } };
    let matched = leases.count_documents(ended).await.expect("count");
    assert_eq!(
        matched, 1,
        "{t} now reads $$NOW in a query $expr as mongod does: remove this divergence and its exclusions"
    );
    raw_client(&uri).await.database(&database).drop().await.ok();
}
