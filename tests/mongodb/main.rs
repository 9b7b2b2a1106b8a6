//! The MongoDB medium against real servers, in every test run.
//!
//! Every test here runs once per target (DESIGN §7):
//! - `rs::…` on SecantusDB's Rust server and `py::…` on its Python server, each
//!   started by this binary on an ephemeral port with a fresh data directory and
//!   stopped by its pid at the end (`support/servers.rs`); the README's test command
//!   (`scripts/test`) installs them;
//! - `mongod::…` on the real mongod named by `INTRACOM_TEST_MONGODB_URI` (a replica
//!   set: `docker compose up -d --wait mongodb`, or the GitHub workflow).
//!
//! A target that cannot be had is reported as *ignored* with the reason in brackets,
//! never as passed. A case is excluded on one server only for a divergence of that
//! server from mongod's documented behaviour, listed in [`divergences`] with a test
//! that shows the divergence still exists.
//!
//! Each test works in a database of its own (`intracom_test_<ulid>`).

#[path = "../conformance/mod.rs"]
mod conformance;
#[cfg(feature = "otel")]
#[path = "../support/otel.rs"]
mod otel;
#[path = "../support/servers.rs"]
mod servers;

mod cli;
mod divergences;
mod faults;
mod mongosh;
mod specific;
mod trace;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conformance::{Harness, World};
use futures::future::BoxFuture;
use intracom::bson::{doc, Document};
use intracom::{Config, Intracom, MediumKind};
use libtest_mimic::Trial;
use servers::Target;

/// A fresh database name for one test.
pub fn database_name() -> String {
    format!(
        "intracom_test_{}",
        intracom::message::new_id().to_lowercase()
    )
}

/// Points a config at a server and database.
pub fn on_server(mut config: Config, uri: &str, database: &str) -> Config {
    config.medium = MediumKind::Db;
    config.db.uri = uri.to_string();
    config.db.database = database.to_string();
    config
}

/// A driver client of our own, to look at what the medium wrote.
pub async fn raw_client(uri: &str) -> mongodb::Client {
    mongodb::Client::with_uri_str(uri)
        .await
        .unwrap_or_else(|e| panic!("raw client for {uri}: {e}"))
}

/// The catalog of the MongoDB-specific tests.
pub fn catalog(service: &str, instance: &str) -> Config {
    Config::builder()
        .service(service)
        .instance(instance)
        .sender("billing", ["reload", "marker", "invoice.render"])
        .build()
        .expect("config")
}

/// Waits until `probe` is true, polling every 100 ms; fails the test after `limit`
/// (a hang guard, not a timing assertion).
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within the hang guard of {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The conformance suite on one target.
struct Mongo {
    target: Target,
}

struct MongoWorld {
    uri: String,
    database: String,
    client: mongodb::Client,
}

#[async_trait]
impl Harness for Mongo {
    async fn world(&self, _retention_ms: u64) -> Box<dyn World> {
        let uri = self
            .target
            .uri()
            .unwrap_or_else(|e| panic!("{}: {e}", self.target));
        Box::new(MongoWorld {
            database: database_name(),
            client: raw_client(&uri).await,
            uri,
        })
    }

    fn short_retention_ms(&self) -> u64 {
        // The TTL index counts whole seconds; fifteen leave room to read a fresh message
        // before it counts as expired on a busy machine (eight trials share two cores
        // with the server), and the TTL monitor's minute dominates the wait anyway.
        15_000
    }

    fn excluded(&self, case: &str) -> Option<&'static str> {
        divergences::excluded(self.target.kind()?, case)
    }
}

#[async_trait]
impl World for MongoWorld {
    async fn bus(&self, config: Config) -> Intracom {
        Intracom::connect(on_server(config, &self.uri, &self.database))
            .await
            .expect("bus on MongoDB")
    }

    async fn wait_expired(&self, id: &str) {
        // The TTL monitor runs about every 60 s: wait for the deletion, bounded.
        let messages = self
            .client
            .database(&self.database)
            .collection::<Document>("messages");
        eventually(
            "the TTL monitor deletes the message",
            Duration::from_secs(180),
            || async {
                messages
                    .count_documents(doc! { "_id": id })
                    .await
                    .expect("count")
                    == 0
            },
        )
        .await;
    }
}

/// The conformance suite on one target with `common.intracom.db.retention=capped`: the
/// messages collection is a capped collection of [`CAPPED_BYTES`], and a message is gone
/// by retention once newer ones have pushed it out.
struct MongoCapped {
    target: Target,
}

/// The size of the capped messages collection of the capped runs: room for every
/// case's messages, and little enough to push one out with a few dozen fillers.
const CAPPED_BYTES: u64 = 2 * 1024 * 1024;

struct CappedWorld(MongoWorld);

#[async_trait]
impl Harness for MongoCapped {
    async fn world(&self, retention_ms: u64) -> Box<dyn World> {
        let plain = Mongo {
            target: self.target.clone(),
        };
        let uri = plain
            .target
            .uri()
            .unwrap_or_else(|e| panic!("{}: {e}", plain.target));
        let _ = retention_ms;
        Box::new(CappedWorld(MongoWorld {
            database: database_name(),
            client: raw_client(&uri).await,
            uri,
        }))
    }

    fn short_retention_ms(&self) -> u64 {
        // Retention is by size here; the time-out only bounds requests.
        15_000
    }

    fn excluded(&self, case: &str) -> Option<&'static str> {
        divergences::excluded(self.target.kind()?, case)
    }
}

/// A capped config for a world's database.
pub fn capped(config: Config, uri: &str, database: &str) -> Config {
    let mut config = on_server(config, uri, database);
    config.db.retention = intracom::Retention::Capped;
    config.db.capped_bytes = CAPPED_BYTES;
    config
}

#[async_trait]
impl World for CappedWorld {
    async fn bus(&self, config: Config) -> Intracom {
        Intracom::connect(capped(config, &self.0.uri, &self.0.database))
            .await
            .expect("bus on a capped MongoDB collection")
    }

    async fn wait_expired(&self, id: &str) {
        push_out(&self.0.client, &self.0.database, id).await;
    }
}

/// Inserts fillers (stamped as a publish stamps, addressed to a service nobody follows)
/// into a capped messages collection until the message `id` is pushed out.
pub async fn push_out(client: &mongodb::Client, database: &str, id: &str) {
    let messages = client.database(database).collection::<Document>("messages");
    let pad = "x".repeat(32 * 1024);
    for n in 0..10_000u32 {
        if messages
            .count_documents(doc! { "_id": id })
            .await
            .expect("count")
            == 0
        {
            return;
        }
        let mut filler =
            intracom::Message::to_service("nobody", "fill").body(doc! { "pad": &pad, "n": n });
        filler.source_service = "filler".into();
        filler.source_instance = "filler-1".into();
        let mut body = intracom::bson::to_document(&filler).expect("filler");
        let filler_id = body.remove("_id").expect("an id");
        messages
            .update_one(
                doc! { "_id": filler_id, "ts": { "$exists": false } },
                doc! {
                    "$setOnInsert": body,
                    "$currentDate": { "ts": { "$type": "timestamp" }, "at": { "$type": "date" } },
                },
            )
            .upsert(true)
            .await
            .expect("filler inserted");
    }
    panic!("{id} was not pushed out of the capped collection by 10000 fillers");
}

/// A test that runs once per target.
pub struct Check {
    /// The test name (the function's).
    pub name: &'static str,
    /// Whether the test starts and stops servers of its own (faults): a mongod named by
    /// URI cannot be killed and restarted by the harness.
    pub owns_server: bool,
    /// Why a tool the test needs is missing here, if it is (checked before it runs).
    pub missing: Option<fn() -> Option<String>>,
    /// The test, given the target.
    pub run: for<'a> fn(&'a Target) -> BoxFuture<'a, ()>,
}

#[macro_export]
macro_rules! check {
    ($name:ident) => {
        $crate::Check {
            name: stringify!($name),
            owns_server: false,
            missing: None,
            run: |t| Box::pin($name(t)),
        }
    };
    ($name:ident, owns_server) => {
        $crate::Check {
            name: stringify!($name),
            owns_server: true,
            missing: None,
            run: |t| Box::pin($name(t)),
        }
    };
    ($name:ident, mongosh) => {
        $crate::Check {
            name: stringify!($name),
            owns_server: false,
            missing: Some($crate::mongosh::unavailable),
            run: |t| Box::pin($name(t)),
        }
    };
}

fn main() {
    // INTRACOM_TEST_LOG=intracom=debug shows what the medium does during the tests.
    if let Ok(filter) = std::env::var("INTRACOM_TEST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let mut trials: Vec<Trial> = Vec::new();
    let checks: Vec<Check> = specific::checks()
        .into_iter()
        .chain(cli::checks())
        .chain(faults::checks())
        .chain(mongosh::checks())
        .chain(trace::checks())
        .collect();
    for target in Target::all() {
        let unavailable = target.unavailable();
        // A server that is installed but does not start fails every test of the target
        // (the reason is in each failure), rather than being skipped.
        trials.extend(conformance::trials(
            target.short(),
            Arc::new(Mongo {
                target: target.clone(),
            }),
            unavailable.as_deref(),
        ));
        trials.extend(conformance::trials(
            &format!("{}::capped", target.short()),
            Arc::new(MongoCapped {
                target: target.clone(),
            }),
            unavailable.as_deref(),
        ));
        for check in &checks {
            let name = format!("{}::{}", target.short(), check.name);
            let skip = match (&unavailable, &target) {
                (Some(reason), _) => Some(reason.clone()),
                (None, _) if check.missing.and_then(|missing| missing()).is_some() => {
                    check.missing.and_then(|missing| missing())
                }
                (None, Target::Mongod) if check.owns_server => Some(
                    "needs a server the harness starts, kills and restarts (SecantusDB targets)"
                        .to_string(),
                ),
                (None, target) => target
                    .kind()
                    .and_then(|kind| divergences::excluded(kind, check.name))
                    .map(str::to_string),
            };
            let run = check.run;
            let target = target.clone();
            let trial = Trial::test(name, move || conformance::block_on(run(&target)));
            trials.push(match skip {
                Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
                None => trial,
            });
        }
    }
    trials.extend(divergences::trials());
    trials.push(Trial::test(
        "harness::reads_the_port_from_either_server",
        || {
            servers::reads_the_port_from_either_server();
            Ok(())
        },
    ));
    conformance::run_main(trials, 8, servers::stop_shared);
}
