//! The HTTP gateway through a real HTTP client, on the memory medium and on the real
//! MongoDB servers of the test harness.
//!
//! Every check in [`checks`] runs once per place: `memory::…` (a `MemoryMedium`), then
//! `rs::…`, `py::…` (SecantusDB's servers, started by this binary) and `mongod::…`
//! (`INTRACOM_TEST_MONGODB_URI`), each gateway on a database of its own. The checks in
//! [`local`] need the memory medium only, or an outside tool: schemathesis (reads the
//! OpenAPI document), a headless chromium driven by playwright-core (the web console),
//! the machine's `node` (the Node.js example). A place or a tool that cannot be had
//! makes its tests *ignored*, with the reason, never passed. [`roles`] walks the routes
//! of the OpenAPI document and checks the role each one takes.

#[cfg(feature = "http")]
#[path = "../conformance/mod.rs"]
mod conformance;
#[path = "../support/servers.rs"]
mod servers;

mod checks;
mod dashboard;
mod flaky;
mod hostile;
mod hostile_small;
#[cfg(feature = "http")]
mod http;
mod local;
mod roles;
mod sse;
#[cfg(feature = "http")]
mod stores;
mod trace;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use intracom::gateway::{EventKeys, Gateway, GatewayOptions, Identity, Tokens};
use intracom::medium::memory::{MemoryMedium, MemoryOptions};
use intracom::{Config, Intracom, MediumKind};
use libtest_mimic::{Failed, Trial};
use reqwest::StatusCode;
use serde_json::Value;
use servers::Target;

/// Token of the `billing` service.
pub const BILLING: &str = "billing-token-0123456789";
/// Token of the `users` service.
pub const USERS: &str = "users-token-0123456789";
/// An admin token without a service.
pub const ADMIN: &str = "admin-token-0123456789";
/// A token that is both admin and the `web` service.
pub const OPS: &str = "ops-token-0123456789";

/// The hang guard of every wait in these tests: a failure, never a timing assertion.
pub const GUARD: Duration = Duration::from_secs(60);

/// The largest message (and request body) the test gateways accept.
pub const MAX_BYTES: usize = 64 * 1024;

/// Where a gateway's bus lives.
#[derive(Clone, Debug)]
pub enum Place {
    /// A memory medium of its own.
    Memory,
    /// A MongoDB server of the harness.
    Server(Target),
}

impl Place {
    fn short(&self) -> &'static str {
        match self {
            Place::Memory => "memory",
            Place::Server(target) => target.short(),
        }
    }

    fn unavailable(&self) -> Option<String> {
        match self {
            Place::Memory => None,
            Place::Server(target) => target.unavailable(),
        }
    }
}

/// The catalog every test gateway starts with.
pub fn config(service: &str) -> Config {
    Config::builder()
        .service(service)
        .sender(
            "billing",
            ["reload", "invoice.get", "invoice.render", "marker"],
        )
        .sender("users", ["user.deleted"])
        .sender("web", Vec::<String>::new())
        .max_message_bytes(MAX_BYTES)
        .build()
        .expect("test config")
}

enum Medium {
    Memory(Arc<MemoryMedium>),
    Server {
        uri: String,
        database: String,
    },
    /// A medium the test made (no peers).
    Other,
}

/// A gateway serving on an ephemeral port, and a client for it.
pub struct Gw {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The HTTP client.
    pub http: reqwest::Client,
    /// The gateway's bus.
    pub bus: Intracom,
    medium: Medium,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<intracom::Result<()>>>,
}

/// The keys that sign the test gateways' event ids.
pub fn event_keys() -> EventKeys {
    EventKeys::parse("test-gateways-event-key-0123456789abcdef").expect("a test key")
}

/// The tokens of the test gateways.
pub fn tokens() -> Tokens {
    Tokens::new()
        .with_token(BILLING, Identity::service("billing"))
        .with_token(USERS, Identity::service("users"))
        .with_token(ADMIN, Identity::admin())
        .with_token(OPS, Identity::service("web").and_admin())
}

fn on_server(mut config: Config, uri: &str, database: &str) -> Config {
    config.medium = MediumKind::Db;
    config.db.uri = uri.to_string();
    config.db.database = database.to_string();
    config
}

impl Gw {
    /// A gateway with default options on `place`.
    pub async fn start(place: &Place) -> Gw {
        Self::with(place, GatewayOptions::default()).await
    }

    /// A gateway with `options` on `place` (signing event ids with [`event_keys`]
    /// unless `options` names keys).
    pub async fn with(place: &Place, options: GatewayOptions) -> Gw {
        Self::with_config(place, config("gateway"), options).await
    }

    /// A gateway with `options` on `place`, its bus made from `config`.
    pub async fn with_config(place: &Place, config: Config, mut options: GatewayOptions) -> Gw {
        if options.event_keys.is_none() {
            options = options.event_keys(event_keys());
        }
        let (bus, medium) = match place {
            Place::Memory => {
                let medium = Arc::new(MemoryMedium::new(MemoryOptions::from(&config)));
                let bus = Intracom::with_medium(config, medium.clone())
                    .await
                    .expect("bus on memory");
                (bus, Medium::Memory(medium))
            }
            Place::Server(target) => {
                let uri = target.uri().unwrap_or_else(|e| panic!("{target}: {e}"));
                let database =
                    format!("intracom_gw_{}", intracom::message::new_id().to_lowercase());
                let bus = Intracom::connect(on_server(config, &uri, &database))
                    .await
                    .expect("bus on MongoDB");
                (bus, Medium::Server { uri, database })
            }
        };
        Self::serve(
            Gateway::new(bus.clone(), tokens()).options(options),
            bus,
            medium,
        )
    }

    /// Serves a gateway made by the caller over `bus`; peers need the memory medium.
    pub fn over(gateway: Gateway, bus: Intracom, medium: Option<Arc<MemoryMedium>>) -> Gw {
        Self::serve(gateway, bus, medium.map_or(Medium::Other, Medium::Memory))
    }

    fn serve(gateway: Gateway, bus: Intracom, medium: Medium) -> Gw {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        Self::serve_on(gateway, bus, medium, listener)
    }

    /// Serves a gateway made by the caller over `bus`, on `listener`.
    fn serve_on(
        gateway: Gateway,
        bus: Intracom,
        medium: Medium,
        listener: std::net::TcpListener,
    ) -> Gw {
        let address = listener.local_addr().expect("its address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(listener, None, async move {
            let _ = stopped.await;
        }));
        Gw {
            base: format!("http://{address}"),
            // Idle connections are dropped well before the gateway's idle time-out (2 s
            // in some tests), so that no request goes out on a connection being closed.
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_millis(500))
                .build()
                .expect("an HTTP client"),
            bus,
            medium,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Another bus on the same medium, as `service` (a separate process would be
    /// the same: it shares no local route with the gateway).
    pub async fn peer(&self, service: &str) -> Intracom {
        let config = config(service);
        match &self.medium {
            Medium::Memory(medium) => Intracom::with_medium(config, medium.clone())
                .await
                .expect("peer on memory"),
            Medium::Server { uri, database } => Intracom::connect(on_server(config, uri, database))
                .await
                .expect("peer on MongoDB"),
            Medium::Other => panic!("no peers on a medium the test made"),
        }
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request with a token and an optional JSON body; the status and the JSON
    /// answer (`Value::Null` when the body is empty or not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = tokio::time::timeout(GUARD, request.send())
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer within the hang guard"))
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// GET.
    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, Some(token), None)
            .await
    }

    /// Publishes and expects it stored; returns the message id.
    pub async fn publish(&self, token: &str, body: Value) -> String {
        let (status, receipt) = self.post("/publish", token, body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "publish {body}: {receipt}");
        receipt["id"].as_str().expect("an id").to_string()
    }

    /// Opens an SSE stream and expects 200; the subscription is anchored when this
    /// returns (the gateway answers after the bus subscribed).
    pub async fn subscribe(
        &self,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> sse::Events {
        let mut request = self.http.get(self.url(path)).bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = tokio::time::timeout(GUARD, request.send())
            .await
            .expect("subscribe: hang guard")
            .expect("subscribe");
        assert_eq!(response.status(), StatusCode::OK, "subscribe {path}");
        sse::Events::new(response)
    }

    /// Stops the gateway and its bus.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(GUARD, task).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("the gateway did not stop cleanly: {other:?}"),
            }
        }
        self.bus.shutdown().await;
    }
}

/// Waits until `probe` is true, polling; fails the test after the hang guard.
pub async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + GUARD;
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within the hang guard of {GUARD:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a test body on a runtime of its own.
pub fn block_on<F: std::future::Future<Output = ()>>(body: F) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("cannot build a runtime: {e}")))?;
    runtime.block_on(body);
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

/// A check that runs on every place.
pub struct Check {
    /// The test name.
    pub name: &'static str,
    /// The test.
    pub run: for<'a> fn(&'a Place) -> BoxFuture<'a, ()>,
}

#[macro_export]
macro_rules! check {
    ($name:ident) => {
        $crate::Check {
            name: stringify!($name),
            run: |place| Box::pin($name(place)),
        }
    };
}

fn main() {
    // The library's `http` feature builds reqwest (the one these tests use too) without
    // a rustls provider of its own: the tests' clients take ring's.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let mut places = vec![Place::Memory];
    places.extend(Target::all().into_iter().map(Place::Server));
    let mut trials = Vec::new();
    for place in &places {
        let unavailable = place.unavailable();
        for check in checks::checks()
            .into_iter()
            .chain(hostile::checks())
            .chain(hostile_small::checks())
        {
            let name = format!("{}::{}", place.short(), check.name);
            let run = check.run;
            let target = place.clone();
            let trial = Trial::test(name, move || block_on(run(&target)));
            trials.push(match &unavailable {
                Some(reason) => trial.with_ignored_flag(true).with_kind(reason.clone()),
                None => trial,
            });
        }
    }
    trials.extend(local::trials());
    trials.extend(dashboard::trials());
    trials.extend(hostile_small::trials());
    trials.extend(roles::trials());
    trials.extend(trace::trials());
    #[cfg(feature = "http")]
    trials.extend(stores::trials());
    #[cfg(feature = "http")]
    trials.extend(http::trials());
    let mut args = libtest_mimic::Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(4);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    servers::stop_shared();
    conclusion.exit()
}
