//! Run-once records shared by buses on the MQTT medium through a gateway's idempotency
//! store (`common.intracom.stores.idempotency=http`, features `http` and `gateway`).
//! Without it each process keeps its own records on MQTT.
//!
//! The conformance suite's run-once cases, which MQTT alone cannot keep (it shares no
//! state), run here unchanged as `mqtt+stores::<case>`: buses on the broker whose
//! records are a gateway's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use intracom::bson::{doc, Document};
use intracom::gateway::{EventKeys, Gateway, GatewayOptions, Identity, Tokens};
use intracom::idempotency::Once;
use intracom::{Config, Intracom};

use async_trait::async_trait;
use libtest_mimic::Trial;

use crate::conformance::{self, Capability, Harness, World, HANG_GUARD};
use crate::{check, isolated, space, Check};

/// The conformance cases of run-once on MQTT with the records in a gateway.
pub fn conformance_trials(unavailable: Option<&str>) -> Vec<Trial> {
    // The third case reserves through the medium's own records (an instance that died
    // holding one), which this harness does not use: the gateway's take-over is the
    // memory medium's, which the memory suite checks.
    const CASES: [&str; 2] = [
        "idempotent_handlers_run_once_per_consumer",
        "concurrent_instances_run_an_effect_once",
    ];
    conformance::trials("mqtt+stores", Arc::new(WithStores), unavailable)
        .into_iter()
        .filter(|trial| {
            CASES
                .iter()
                .any(|case| trial.name() == format!("mqtt+stores::{case}"))
        })
        .collect()
}

/// The MQTT medium with its run-once records in a gateway of its own per world.
struct WithStores;

struct WithStoresWorld {
    url: String,
    space: String,
    store: String,
}

/// Where the worlds' gateways run: a runtime of their own, since each trial's runtime
/// ends with the trial.
fn gateways() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the gateways' runtime")
    })
}

/// Starts a gateway (memory medium, an admin token) for the rest of the process; its
/// URL.
fn start_gateway() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let url = format!("http://{}", listener.local_addr().expect("its address"));
    gateways().spawn(async move {
        let bus = Intracom::connect(catalog("gateway-1"))
            .await
            .expect("the gateway's bus");
        let gateway =
            Gateway::new(
                bus,
                Tokens::new().with_token(TOKEN, Identity::service("billing").and_admin()),
            )
            .options(GatewayOptions::default().event_keys(
                EventKeys::parse("mqtt-stores-test-event-key-0123456789").expect("a key"),
            ));
        let _ = gateway.serve(listener, None, std::future::pending()).await;
    });
    url
}

#[async_trait]
impl Harness for WithStores {
    async fn world(&self, retention_ms: u64) -> Box<dyn World> {
        let _ = retention_ms;
        let broker = crate::broker::shared().unwrap_or_else(|e| panic!("mosquitto: {e}"));
        Box::new(WithStoresWorld {
            url: broker.url(),
            space: space(),
            store: start_gateway(),
        })
    }

    fn short_retention_ms(&self) -> u64 {
        2_000
    }

    fn capabilities(&self) -> &'static [Capability] {
        &[Capability::SharedState]
    }
}

#[async_trait]
impl World for WithStoresWorld {
    async fn bus(&self, config: Config) -> Intracom {
        let mut config = isolated(config, &self.url, &self.space);
        for (key, value) in [
            ("common.intracom.stores.idempotency", "http"),
            ("common.intracom.stores.url", self.store.as_str()),
            ("common.intracom.stores.token", TOKEN),
        ] {
            config.set(key, value).expect("a stores key");
        }
        Intracom::connect(config).await.expect("bus on MQTT")
    }

    async fn wait_expired(&self, _id: &str) {
        unreachable!("the run-once cases wait for no expiry")
    }
}

pub fn checks() -> Vec<Check> {
    vec![check!(
        buses_on_mqtt_share_run_once_records_through_a_gateway
    )]
}

const TOKEN: &str = "billing-store-token-0123456789";

fn catalog(instance: &str) -> Config {
    Config::builder()
        .service("billing")
        .instance(instance)
        .sender("billing", ["reload"])
        .build()
        .expect("config")
}

/// A bus on the broker, in `space`, with its run-once records kept by the gateway at
/// `store` when there is one.
async fn bus(url: &str, space: &str, instance: &str, store: Option<&str>) -> Intracom {
    let mut config = isolated(catalog(instance), url, space);
    if let Some(store) = store {
        for (key, value) in [
            ("common.intracom.stores.idempotency", "http"),
            ("common.intracom.stores.url", store),
            ("common.intracom.stores.token", TOKEN),
        ] {
            config.set(key, value).expect("a stores key");
        }
    }
    Intracom::connect(config).await.expect("bus on MQTT")
}

async fn counted(runs: &AtomicUsize, n: i32) -> Result<Document, intracom::Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(doc! { "n": n })
}

async fn buses_on_mqtt_share_run_once_records_through_a_gateway() {
    let url = crate::broker::shared().expect("mosquitto").url();
    let space = space();
    // The gateway: on the memory medium, in this process (the buses reach it over HTTP
    // only, as another process would).
    let gateway_bus = Intracom::connect(catalog("gateway-1"))
        .await
        .expect("the gateway's bus");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let store = format!("http://{}", listener.local_addr().expect("its address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = Gateway::new(
        gateway_bus.clone(),
        Tokens::new().with_token(TOKEN, Identity::service("billing")),
    )
    .options(
        GatewayOptions::default()
            .event_keys(EventKeys::parse("mqtt-stores-test-event-key-0123456789").expect("a key")),
    );
    let served = tokio::spawn(gateway.serve(listener, None, async move {
        let _ = stopped.await;
    }));

    let a = bus(&url, &space, "billing-a", Some(&store)).await;
    let b = bus(&url, &space, "billing-b", Some(&store)).await;
    let runs = AtomicUsize::new(0);
    let first = a
        .idempotent("billing.ledger")
        .run_once("m-1", || counted(&runs, 1))
        .await
        .expect("run_once on a");
    assert_eq!(first, Once::Ran(doc! { "n": 1 }));
    let again = b
        .idempotent("billing.ledger")
        .run_once("m-1", || counted(&runs, 2))
        .await
        .expect("run_once on b");
    assert_eq!(
        again,
        Once::AlreadyDone(Some(doc! { "n": 1 })),
        "b finds a's record"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // At the same moment: b waits for a's outcome instead of running it too.
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let on_a = {
        let ledger = a.idempotent("billing.ledger");
        tokio::spawn(async move {
            ledger
                .run_once("m-2", || async move {
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    Ok::<_, intracom::Error>(doc! { "n": 2 })
                })
                .await
        })
    };
    started.await.expect("a's handler started");
    let b_runs = Arc::new(AtomicUsize::new(0));
    let on_b = {
        let ledger = b.idempotent("billing.ledger");
        let b_runs = Arc::clone(&b_runs);
        tokio::spawn(async move {
            ledger
                .run_once("m-2", || async move {
                    b_runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, intracom::Error>(doc! { "n": 22 })
                })
                .await
        })
    };
    let _ = finish.send(());
    let on_a = tokio::time::timeout(HANG_GUARD, on_a)
        .await
        .expect("hang guard")
        .expect("a's task")
        .expect("a's run_once");
    let on_b = tokio::time::timeout(HANG_GUARD, on_b)
        .await
        .expect("hang guard")
        .expect("b's task")
        .expect("b's run_once");
    assert_eq!(on_a, Once::Ran(doc! { "n": 2 }));
    assert_eq!(on_b, Once::AlreadyDone(Some(doc! { "n": 2 })));
    assert_eq!(b_runs.load(Ordering::SeqCst), 0, "b's handler never ran");

    // Without the store, each process on MQTT keeps its own records: both run it.
    let (c, d) = (
        bus(&url, &space, "billing-c", None).await,
        bus(&url, &space, "billing-d", None).await,
    );
    for local in [&c, &d] {
        let ran = local
            .idempotent("billing.ledger")
            .run_once("m-3", || counted(&runs, 3))
            .await
            .expect("run_once without the store");
        assert_eq!(ran, Once::Ran(doc! { "n": 3 }));
    }

    for bus in [a, b, c, d] {
        bus.shutdown().await;
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(HANG_GUARD, served).await;
    gateway_bus.shutdown().await;
}
