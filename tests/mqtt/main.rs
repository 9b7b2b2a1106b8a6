//! The MQTT medium against a real Mosquitto, in every test run (`--features mqtt`).
//!
//! This binary starts its own Mosquitto (Debian's `mosquitto`: `$INTRACOM_MOSQUITTO`,
//! else `mosquitto` on the PATH, else `/usr/sbin/mosquitto`; `scripts/test` installs
//! it) on an ephemeral port with a config file and a persistence directory of its own,
//! and stops it by its pid (`support/servers.rs`: `spawn_kept`, `terminate`). Without
//! a Mosquitto every test here is reported as *ignored* with the reason.
//!
//! - `mqtt::<case>`: the conformance suite, unchanged; cases needing a capability the
//!   medium does not declare are ignored with the missing capability;
//! - the MQTT-specific tests ([`specific`]): a named subscriber away while 100
//!   messages are published, a broker restart with persistence, request/reply across
//!   two buses, the broker down at publish, bad input;
//! - the `intracom` command with `--medium mqtt --url …` ([`cli`]).
//!
//! Each test works under a topic prefix and client id prefix of its own.

#[path = "../conformance/mod.rs"]
mod conformance;
#[cfg(feature = "otel")]
#[path = "../support/otel.rs"]
mod otel;
#[path = "../support/servers.rs"]
mod servers;

mod broker;
mod cli;
mod specific;
#[cfg(all(feature = "gateway", feature = "http"))]
mod stores;
mod trace;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conformance::{Capability, Harness, World};
use intracom::{Config, Intracom, MediumKind};
use libtest_mimic::Trial;

/// A fresh topic prefix and client id prefix for one test.
pub fn isolated(mut config: Config, url: &str, space: &str) -> Config {
    config.medium = MediumKind::Mqtt;
    config.mqtt.url = url.to_string();
    config.mqtt.topic_prefix = format!("test/{space}");
    config.mqtt.client_id_prefix = format!("{space}-");
    config
}

/// A name for one test's space.
pub fn space() -> String {
    intracom::message::new_id().to_lowercase()
}

struct Mqtt;

struct MqttWorld {
    url: String,
    space: String,
    retention: Duration,
}

#[async_trait]
impl Harness for Mqtt {
    async fn world(&self, retention_ms: u64) -> Box<dyn World> {
        let broker = broker::shared().unwrap_or_else(|e| panic!("mosquitto: {e}"));
        Box::new(MqttWorld {
            url: broker.url(),
            space: space(),
            retention: Duration::from_millis(retention_ms),
        })
    }

    fn short_retention_ms(&self) -> u64 {
        // The message expiry interval counts whole seconds.
        2_000
    }

    fn capabilities(&self) -> &'static [Capability] {
        // What the medium declares (a broker stamps nothing, keeps no history or queue,
        // and shares no state but the persistent sessions), in the suite's terms.
        static DECLARED: std::sync::OnceLock<Vec<Capability>> = std::sync::OnceLock::new();
        DECLARED.get_or_init(|| {
            let c = intracom::medium::mqtt::CAPABILITIES;
            [
                (c.server_stamps, Capability::ServerStamps),
                (c.history, Capability::History),
                (c.loss_reports, Capability::LossReports),
                (c.shared_checkpoints, Capability::SharedCheckpoints),
                (c.stored_queue, Capability::StoredQueue),
                (c.shared_state, Capability::SharedState),
            ]
            .into_iter()
            .filter_map(|(has, capability)| has.then_some(capability))
            .collect()
        })
    }
}

#[async_trait]
impl World for MqttWorld {
    async fn bus(&self, config: Config) -> Intracom {
        Intracom::connect(isolated(config, &self.url, &self.space))
            .await
            .expect("bus on MQTT")
    }

    async fn wait_expired(&self, _id: &str) {
        // The broker drops a message once its expiry interval passed.
        tokio::time::sleep(self.retention + Duration::from_secs(1)).await;
    }
}

/// A test of this binary: its name and body.
pub struct Check {
    /// The function name.
    pub name: &'static str,
    /// The test.
    pub run: fn() -> futures::future::BoxFuture<'static, ()>,
}

#[macro_export]
macro_rules! check {
    ($name:ident) => {
        $crate::Check {
            name: stringify!($name),
            run: || Box::pin($name()),
        }
    };
}

/// The value of a counter this binary's recorder saw (summed over other labels).
pub fn counter(name: &str, label: (&str, &str)) -> u64 {
    use metrics_util::debugging::DebugValue;
    let Some(snapshotter) = SNAPSHOTTER.get() else {
        return 0;
    };
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == name)
        .filter(|(key, ..)| {
            key.key()
                .labels()
                .any(|l| l.key() == label.0 && l.value() == label.1)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

static SNAPSHOTTER: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
    std::sync::OnceLock::new();

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let _ = SNAPSHOTTER.set(recorder.snapshotter());
    recorder
        .install()
        .expect("the only metrics recorder of this test binary");
    let unavailable = broker::unavailable();
    let mut trials = conformance::trials("mqtt", Arc::new(Mqtt), unavailable.as_deref());
    #[cfg(all(feature = "gateway", feature = "http"))]
    trials.extend(stores::conformance_trials(unavailable.as_deref()));
    let checks = specific::checks()
        .into_iter()
        .chain(cli::checks())
        .chain(trace::checks());
    #[cfg(all(feature = "gateway", feature = "http"))]
    let checks = checks.chain(stores::checks());
    for check in checks {
        let run = check.run;
        let trial = Trial::test(check.name, move || conformance::block_on(run()));
        trials.push(match (&unavailable, trace::flaky(check.name)) {
            (Some(reason), _) => trial.with_ignored_flag(true).with_kind(reason.clone()),
            (None, Some(reason)) => trial.with_ignored_flag(true).with_kind(reason),
            (None, None) => trial,
        });
    }
    let tls_unavailable = unavailable.clone().or_else(broker::tls_unavailable);
    let trial = Trial::test(
        "mqtts_with_a_ca_file_works_and_a_stranger_ca_is_refused",
        || {
            conformance::block_on(
                specific::mqtts_with_a_ca_file_works_and_a_stranger_ca_is_refused(),
            )
        },
    );
    trials.push(match tls_unavailable {
        Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
        None => trial,
    });
    conformance::run_main(trials, 4, broker::stop_shared);
}
