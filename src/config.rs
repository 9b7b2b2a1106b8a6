//! Configuration: the `common.intracom.*` properties keys, a file, the environment, and a builder.
//!
//! Why it exists: services already configure themselves with `.properties` files
//! holding the Intracom keys (`common.intracom.medium=db`, `common.intracom.timeout_ms`,
//! `common.intracom.senders.list`, `common.intracom.actions.<service>`). Those keys work
//! here as written; each can be overridden by an environment variable; code can use
//! [`Config::builder`]. A value intracom cannot use, or an unknown key under
//! `common.intracom.`, is an error naming the key and the value, at start-up.
//!
//! Every key, its default and its meaning are in [`KEYS`], the one table the parser
//! accepts keys from (and the configuration reference of the guide is checked against).
//!
//! Environment: `INTRACOM_CONFIG` names a properties file; each key can be set by its
//! upper-case name with `.` turned into `_` (`COMMON_INTRACOM_TIMEOUT_MS=1000`,
//! `COMMON_INTRACOM_ACTIONS_BILLING=load,clear`) or by its exact dotted name. The
//! environment wins over the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::message::MAX_NAME_LEN;

const PREFIX: &str = "common.intracom.";
const ACTIONS_PREFIX: &str = "common.intracom.actions.";
const WORK_PREFIX: &str = "common.intracom.work.";
const ENV_PREFIX: &str = "COMMON_INTRACOM_";
const ENV_ACTIONS_PREFIX: &str = "COMMON_INTRACOM_ACTIONS_";
/// Environment variable naming the properties file read by [`Config::from_env`].
pub const CONFIG_FILE_ENV: &str = "INTRACOM_CONFIG";

/// One configuration key: its properties name, its default and what it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Key {
    /// The properties name. A part in angle brackets (`<service>`, `<action>`) is
    /// chosen by the user.
    pub name: &'static str,
    /// The default, as it would be written in a properties file; in parentheses when it
    /// is not a value but a description (`(none)`, `(<host>-<pid>-<n>)`).
    pub default: &'static str,
    /// What the key sets.
    pub doc: &'static str,
}

impl Key {
    /// The environment variable that sets this key: the name in upper case with `.`
    /// turned into `_` (a part in angle brackets is written upper case too).
    pub fn env(&self) -> String {
        self.name.to_ascii_uppercase().replace('.', "_")
    }

    /// True when the whole name is fixed (no part chosen by the user).
    pub fn is_fixed(&self) -> bool {
        !self.name.contains('<')
    }
}

/// Every configuration key intracom reads. [`Config::set`] accepts a fixed key only if
/// it is listed here, and the environment names are derived from this table, so a key
/// cannot be added without its line.
pub const KEYS: &[Key] = &[
    key("common.intracom.medium", "memory", "the medium: `memory`, `db` (MongoDB), `mqtt` or `http` (a remote intracom gateway)"),
    key("common.intracom.timeout_ms", "300000", "message retention, in ms"),
    key("common.intracom.senders.list", "", "services in the catalog, comma separated"),
    key("common.intracom.actions.<service>", "", "the actions that service declares, comma separated"),
    key("common.intracom.service", "intracom", "this process's service name"),
    key("common.intracom.instance", "(<host>-<pid>-<n>)", "this instance's id (`n` counts the bus handles made in the process)"),
    key("common.intracom.max_message_bytes", "16777216", "largest encoded message, in bytes"),
    key("common.intracom.request_timeout_ms", "30000", "default time-out of a request, in ms"),
    key("common.intracom.outbox.max_messages", "10000", "publishes kept while the medium is unavailable"),
    key("common.intracom.outbox.file", "(none)", "file that keeps the outbox across restarts"),
    key("common.intracom.work.<action>.lease_ms", "(the worker's: 30000)", "lease of a claimed job of that action, in ms"),
    key("common.intracom.work.<action>.backoff_ms", "(the worker's: 1000)", "first retry delay of that action, in ms (doubled each attempt)"),
    key("common.intracom.work.<action>.max_attempts", "(the worker's: 5)", "attempts of that action before its job goes to the dead letters"),
    key("common.intracom.memory.max_messages", "100000", "memory medium: messages kept at most"),
    key("common.intracom.db.uri", "mongodb://localhost:27017", "MongoDB connection string (TLS, credentials, replica set: all in the URI)"),
    key("common.intracom.db.database", "intracom", "database name"),
    key("common.intracom.db.collection.messages", "messages", "the messages collection"),
    key("common.intracom.db.collection.config", "config", "the catalog collection"),
    key("common.intracom.db.collection.checkpoints", "checkpoints", "the named subscriptions' checkpoints"),
    key("common.intracom.db.collection.processed", "processed", "the idempotency records"),
    key("common.intracom.db.collection.dead", "dead", "the dead letters"),
    key("common.intracom.db.retention", "ttl", "`ttl` (a TTL index on `at`) or `capped` (a capped messages collection)"),
    key("common.intracom.db.capped_bytes", "268435456", "size of a capped messages collection, in bytes"),
    key("common.intracom.db.poll_interval_ms", "250", "poll period when change streams are unavailable (a standalone server), in ms"),
    key("common.intracom.db.safety_window_ms", "5000", "the longest a write takes from its server stamp to its commit: a catch-up from the collection reads only what is stamped longer ago, and joins the change stream that long after it began, in ms"),
    key("common.intracom.db.stream_buffer", "10000", "change events kept in memory for this process's subscribers"),
    key("common.intracom.db.hub.selection", "targeted", "what this process's change stream selects on the server: `targeted` (what its subscriptions, workers and requests concern) or `everything` (every insert and settle)"),
    key("common.intracom.db.read_preference", "primary", "where the change streams read: `primary`, `primaryPreferred`, `secondary`, `secondaryPreferred` or `nearest`"),
    key("common.intracom.mqtt.url", "mqtt://localhost:1883", "MQTT broker: `mqtt://host[:port]`, or `mqtts://host[:port]` for TLS"),
    key("common.intracom.mqtt.client_id_prefix", "intracom-", "prefix of every MQTT client id this process uses (a named subscription's session is `<prefix>sub-<name>`)"),
    key("common.intracom.mqtt.username", "(none)", "broker user name"),
    key("common.intracom.mqtt.password", "(none)", "broker password (never printed)"),
    key("common.intracom.mqtt.keep_alive_ms", "30000", "MQTT keep-alive, in ms (5000 to 65535000, whole seconds on the wire)"),
    key("common.intracom.mqtt.topic_prefix", "intracom", "first level(s) of every intracom topic"),
    key("common.intracom.mqtt.session_expiry_ms", "86400000", "how long the broker keeps an absent named subscription's session, in ms"),
    key("common.intracom.mqtt.ca_file", "(none)", "PEM file of the CA certificates for `mqtts://` (default: the system's roots)"),
    key("common.intracom.stores.idempotency", "medium", "where run-once records are kept: `medium` (the medium's own store) or `http` (a gateway's `/idempotency` API at `stores.url`; needs the `http` feature)"),
    key("common.intracom.stores.messages", "local", "where publishes the medium cannot take yet are kept: `local` (this process's outbox) or `http` (a gateway's `/messages` API at `stores.url`, the outbox as fall-back; needs the `http` feature)"),
    key("common.intracom.stores.url", "(none)", "base URL of the gateway that keeps the stores: `http://host[:port][/path]` or `https://…`"),
    key("common.intracom.stores.token", "(none)", "bearer token for that gateway (never printed)"),
    key("common.intracom.stores.ca_file", "(none)", "PEM file of the CA certificates for an `https://` store URL (default: the system's roots)"),
    key("common.intracom.stores.timeout_ms", "5000", "time-out of one call to the store, in ms"),
    key("common.intracom.http.url", "http://localhost:8080", "the intracom gateway(s) of the `http` medium: one `http[s]://host[:port]` URL, or several comma separated (the next one is tried when a gateway cannot be reached)"),
    key("common.intracom.http.token", "(none)", "the bearer token the `http` medium presents to the gateway (never printed)"),
    key("common.intracom.http.ca_file", "(none)", "PEM file of the CA certificates for `https://` gateways (default: the system's roots)"),
];

const fn key(name: &'static str, default: &'static str, doc: &'static str) -> Key {
    Key { name, default, doc }
}

/// The fixed key whose name after `common.intracom.` is `rest`.
fn fixed_key(rest: &str) -> Option<&'static Key> {
    KEYS.iter()
        .find(|k| k.is_fixed() && k.name.strip_prefix(PREFIX) == Some(rest))
}

/// The work options (`lease_ms`, …) the table lists for `common.intracom.work.<action>.`.
fn work_options() -> impl Iterator<Item = &'static str> {
    KEYS.iter()
        .filter_map(|k| k.name.strip_prefix("common.intracom.work.<action>."))
}

/// Which medium carries the bus (`common.intracom.medium`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MediumKind {
    /// In-process (`memory`), the default.
    #[default]
    Memory,
    /// A shared MongoDB database (`db`).
    Db,
    /// An MQTT broker (`mqtt`).
    Mqtt,
    /// A remote intracom gateway (`http`, feature `http`).
    Http,
}

impl MediumKind {
    /// The value as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            MediumKind::Memory => "memory",
            MediumKind::Db => "db",
            MediumKind::Mqtt => "mqtt",
            MediumKind::Http => "http",
        }
    }
}

impl fmt::Display for MediumKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MediumKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "memory" => Ok(MediumKind::Memory),
            "db" => Ok(MediumKind::Db),
            "mqtt" => Ok(MediumKind::Mqtt),
            "http" => Ok(MediumKind::Http),
            _ => Err("expected one of memory, db, mqtt, http".into()),
        }
    }
}

/// The resolved configuration. Build it with [`Config::from_env`],
/// [`Config::from_file`], [`Config::from_properties`] or [`Config::builder`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// The medium (default [`MediumKind::Memory`]).
    pub medium: MediumKind,
    /// Retention in milliseconds (default 300 000).
    pub timeout_ms: u64,
    /// Catalog seed: service → actions, from `senders.list` and `actions.<service>`.
    pub senders: BTreeMap<String, Vec<String>>,
    /// This process's service name (default `intracom`).
    pub service: String,
    /// This instance's id (default `<host>-<pid>-<n>`, `n` counting handles in the process).
    pub instance: Option<String>,
    /// Largest encoded message, in bytes (default 16 MiB).
    pub max_message_bytes: usize,
    /// Memory medium: messages kept at most (default 100 000).
    pub memory_max_messages: usize,
    /// MongoDB medium settings (`common.intracom.db.*`).
    pub db: DbConfig,
    /// MQTT medium settings (`common.intracom.mqtt.*`).
    pub mqtt: MqttConfig,
    /// HTTP medium settings (`common.intracom.http.*`).
    pub http: HttpConfig,
    /// Default time-out of a request, in ms (default 30 000).
    pub request_timeout_ms: u64,
    /// Outbox capacity in messages (default 10 000; `common.intracom.outbox.max_messages`).
    pub outbox_max_messages: usize,
    /// File that keeps the outbox across restarts (default none; `common.intracom.outbox.file`).
    pub outbox_file: Option<std::path::PathBuf>,
    /// Work options by action (`common.intracom.work.<action>.lease_ms`, `.backoff_ms`,
    /// `.max_attempts`): each set key overrides the option the worker is given.
    pub work: BTreeMap<String, WorkOverrides>,
    /// The external stores (`common.intracom.stores.*`): the idempotency records and
    /// the messages not routed yet, kept by a gateway's REST API.
    pub stores: StoresConfig,
}

/// Where the run-once records are kept (`common.intracom.stores.idempotency`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyStoreKind {
    /// The medium's own store (`medium`, the default): `processed` on MongoDB, memory
    /// for the memory medium, this process's memory on MQTT.
    #[default]
    Medium,
    /// A gateway's `/idempotency` API (`http`), at [`StoresConfig::url`].
    Http,
}

/// Where publishes the medium cannot take yet are kept
/// (`common.intracom.stores.messages`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageStoreKind {
    /// This process's outbox (`local`, the default).
    #[default]
    Local,
    /// A gateway's `/messages` API (`http`), at [`StoresConfig::url`]; this process's
    /// outbox while it cannot be reached.
    Http,
}

/// The external stores (`common.intracom.stores.*`).
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct StoresConfig {
    /// Where the run-once records are kept (default the medium).
    pub idempotency: IdempotencyStoreKind,
    /// Where publishes the medium cannot take yet are kept (default this process).
    pub messages: MessageStoreKind,
    /// The gateway's base URL (`http://…` or `https://…`; default none).
    pub url: Option<String>,
    /// The gateway's bearer token (default none; never printed).
    pub token: Option<String>,
    /// PEM file of the CA certificates for `https://` (default: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// Time-out of one call to the store, in ms (default 5000).
    pub timeout_ms: u64,
}

impl Default for StoresConfig {
    fn default() -> Self {
        StoresConfig {
            idempotency: IdempotencyStoreKind::Medium,
            messages: MessageStoreKind::Local,
            url: None,
            token: None,
            ca_file: None,
            timeout_ms: 5000,
        }
    }
}

impl StoresConfig {
    /// Whether either store is kept by a gateway.
    pub fn any_http(&self) -> bool {
        self.idempotency == IdempotencyStoreKind::Http || self.messages == MessageStoreKind::Http
    }
}

impl fmt::Debug for StoresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoresConfig")
            .field("idempotency", &self.idempotency)
            .field("messages", &self.messages)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Work options one action sets in config; unset ones keep the worker's.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct WorkOverrides {
    /// `common.intracom.work.<action>.lease_ms`.
    pub lease: Option<std::time::Duration>,
    /// `common.intracom.work.<action>.backoff_ms`.
    pub backoff: Option<std::time::Duration>,
    /// `common.intracom.work.<action>.max_attempts`.
    pub max_attempts: Option<i32>,
}

/// How the MongoDB medium retains messages (`common.intracom.db.retention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retention {
    /// A TTL index on `at` expires messages after `common.intracom.timeout_ms` (default).
    #[default]
    Ttl,
    /// A capped collection of `common.intracom.db.capped_bytes` keeps the newest messages.
    Capped,
}

/// What the process's change stream selects on the server
/// (`common.intracom.db.hub.selection`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HubSelection {
    /// Only what concerns the process: broadcasts and messages to the services and
    /// instances its subscriptions and workers follow, and its requests' settles; every
    /// insert while a monitor subscription (a filter without a service) lives (default).
    #[default]
    Targeted,
    /// Every insert and every settle of the collection, filtered in memory.
    Everything,
}

/// Where the change streams read (`common.intracom.db.read_preference`): the
/// MongoDB read preference modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadPreference {
    /// The primary only (default).
    #[default]
    Primary,
    /// The primary, or a secondary while there is none.
    PrimaryPreferred,
    /// Secondaries only.
    Secondary,
    /// A secondary, or the primary while there is none.
    SecondaryPreferred,
    /// The member of lowest latency.
    Nearest,
}

/// MongoDB medium settings.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DbConfig {
    /// Connection string (default `mongodb://localhost:27017`). TLS (`tls=true`,
    /// `tlsCAFile=…`), credentials (`user:password@`, `authSource=…`) and the replica set
    /// (`replicaSet=rs0`, or `directConnection=true`) are all given here.
    pub uri: String,
    /// Database name (default `intracom`).
    pub database: String,
    /// Messages collection (default `messages`).
    pub messages: String,
    /// Catalog collection (default `config`).
    pub config: String,
    /// Subscription checkpoints (default `checkpoints`).
    pub checkpoints: String,
    /// Idempotency records (default `processed`).
    pub processed: String,
    /// Dead letters (default `dead`).
    pub dead: String,
    /// TTL or capped retention (default TTL).
    pub retention: Retention,
    /// Size of a capped messages collection in bytes (default 256 MiB).
    pub capped_bytes: u64,
    /// Poll period in ms when change streams are unavailable (default 250).
    pub poll_interval_ms: u64,
    /// The longest a write takes from its stamp to its commit, in ms (default 5000): a
    /// catch-up by `ts` reads only what is stamped longer ago than this.
    pub safety_window_ms: u64,
    /// Change events kept in memory for local subscribers (default 10 000).
    pub stream_buffer: usize,
    /// What the process's change stream selects on the server (default targeted).
    pub hub_selection: HubSelection,
    /// Where the change streams read (default the primary).
    pub read_preference: ReadPreference,
}

impl Default for DbConfig {
    fn default() -> Self {
        DbConfig {
            uri: "mongodb://localhost:27017".into(),
            database: "intracom".into(),
            messages: "messages".into(),
            config: "config".into(),
            checkpoints: "checkpoints".into(),
            processed: "processed".into(),
            dead: "dead".into(),
            retention: Retention::Ttl,
            capped_bytes: 256 * 1024 * 1024,
            poll_interval_ms: 250,
            safety_window_ms: 5000,
            stream_buffer: 10_000,
            hub_selection: HubSelection::Targeted,
            read_preference: ReadPreference::Primary,
        }
    }
}

impl DbConfig {
    /// The connection string with its password replaced by `***`, for printing and
    /// logging (`mongodb://app:***@db1:27017/?replicaSet=rs0`).
    pub fn redacted_uri(&self) -> String {
        redact_uri(&self.uri)
    }
}

/// A connection string with any password replaced by `***`.
fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // Credentials end at the last '@' of the authority.
    match authority.rsplit_once('@') {
        Some((credentials, hosts)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{hosts}{tail}")
        }
        _ => uri.to_string(),
    }
}

/// MQTT medium settings (`common.intracom.mqtt.*`).
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct MqttConfig {
    /// Broker URL (default `mqtt://localhost:1883`): `mqtt://host[:port]` (port 1883 by
    /// default) or `mqtts://host[:port]` for TLS (port 8883 by default).
    pub url: String,
    /// Prefix of every client id this process uses (default `intracom-`). A named
    /// subscription's session is `<prefix>sub-<name>`, so processes that resume each
    /// other's subscriptions must share the prefix.
    pub client_id_prefix: String,
    /// Broker user name (default none).
    pub username: Option<String>,
    /// Broker password (default none; never printed).
    pub password: Option<String>,
    /// Keep-alive in ms (default 30 000; at least 5 000; sent in whole seconds).
    pub keep_alive_ms: u64,
    /// First level(s) of every topic (default `intracom`); buses with different prefixes
    /// do not see each other.
    pub topic_prefix: String,
    /// How long the broker keeps a named subscription's session and queued messages
    /// while its consumer is away, in ms (default 86 400 000, one day; whole seconds on
    /// the wire).
    pub session_expiry_ms: u64,
    /// PEM file with the CA certificates that sign the broker's certificate, for
    /// `mqtts://` (default: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://localhost:1883".into(),
            client_id_prefix: "intracom-".into(),
            username: None,
            password: None,
            keep_alive_ms: 30_000,
            topic_prefix: "intracom".into(),
            session_expiry_ms: 86_400_000,
            ca_file: None,
        }
    }
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("url", &self.url)
            .field("client_id_prefix", &self.client_id_prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("keep_alive_ms", &self.keep_alive_ms)
            .field("topic_prefix", &self.topic_prefix)
            .field("session_expiry_ms", &self.session_expiry_ms)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// HTTP medium settings (`common.intracom.http.*`): the gateways a bus on the `http`
/// medium calls.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct HttpConfig {
    /// The gateways' base URLs (default `http://localhost:8080`), in the order they are
    /// tried: the medium moves to the next one when a gateway cannot be reached.
    pub urls: Vec<String>,
    /// The bearer token presented to the gateways (default none; never printed).
    pub token: Option<String>,
    /// PEM file with the CA certificates that sign the gateways' certificates, for
    /// `https://` (default: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            urls: vec!["http://localhost:8080".into()],
            token: None,
            ca_file: None,
        }
    }
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("urls", &self.urls)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Reads `common.intracom.http.url`: URLs starting with `http://` or `https://`, comma
/// separated, without credentials, each without its trailing `/`.
fn parse_http_urls(key: &str, value: &str) -> Result<Vec<String>> {
    redacting(parse_http_urls_as_given(key, value))
}

fn parse_http_urls_as_given(key: &str, value: &str) -> Result<Vec<String>> {
    let mut urls = Vec::new();
    for url in value.split(',').map(str::trim) {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| {
                Error::config(key, value, "each URL must start with http:// or https://")
            })?;
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            return Err(Error::config(key, value, "a URL without a host"));
        }
        if host.contains('@') {
            return Err(Error::config(
                key,
                value,
                "put the token in common.intracom.http.token, not in the URL",
            ));
        }
        urls.push(url.trim_end_matches('/').to_string());
    }
    Ok(urls)
}

/// A configuration error whose value (URLs) has the credentials of each URL replaced
/// by `***`: a refused URL is shown, its password is not.
fn redacting<T>(result: Result<T>) -> Result<T> {
    result.map_err(|error| match error {
        Error::Config { key, value, reason } => Error::Config {
            key,
            value: redacted_urls(&value),
            reason,
        },
        other => other,
    })
}

/// Comma-separated URLs with the user information (`user:password@`) of each replaced
/// by `***@`.
fn redacted_urls(value: &str) -> String {
    value
        .split(',')
        .map(|url| {
            let (scheme, rest) = match url.find("://") {
                Some(at) => url.split_at(at + 3),
                None => ("", url),
            };
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}***{}", &rest[at..]),
                None => url.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The parts of an MQTT URL: TLS or not, host, port.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MqttUrl {
    /// `mqtts://`.
    pub tls: bool,
    /// The broker's host name or address.
    pub host: String,
    /// The port (1883, or 8883 with TLS, unless given).
    pub port: u16,
}

impl MqttConfig {
    /// The broker URL, parsed (it was checked when it was set).
    pub fn parsed_url(&self) -> Result<MqttUrl> {
        parse_mqtt_url("common.intracom.mqtt.url", &self.url)
    }
}

/// Reads `mqtt://host[:port]` or `mqtts://host[:port]` (an IPv6 host in brackets).
fn parse_mqtt_url(key: &str, value: &str) -> Result<MqttUrl> {
    redacting(parse_mqtt_url_as_given(key, value))
}

fn parse_mqtt_url_as_given(key: &str, value: &str) -> Result<MqttUrl> {
    let (tls, rest) = if let Some(rest) = value.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = value.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err(Error::config(
            key,
            value,
            "must start with mqtt:// or mqtts://",
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(Error::config(
            key,
            value,
            "expected only a host and a port (no path or query)",
        ));
    }
    if authority.contains('@') {
        return Err(Error::config(
            key,
            value,
            "put credentials in common.intracom.mqtt.username and .password, not in the URL",
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(Error::config(key, value, "unclosed `[` in the host"));
        };
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(Error::config(key, value, "unexpected text after the host")),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(Error::config(key, value, "no host"));
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(Error::config(key, value, format!("bad port `{p}`")));
            }
            Ok(n) => n,
        },
        None => default_port,
    };
    Ok(MqttUrl { tls, host, port })
}

/// Checks a topic prefix: levels without wildcards, NUL or an empty level, not `$…`.
fn topic_prefix(key: &str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::config(key, value, "empty"));
    }
    if value.starts_with('$') {
        return Err(Error::config(
            key,
            value,
            "topics starting with `$` are the broker's own (MQTT 5 §4.7.2)",
        ));
    }
    if value.contains(['+', '#', '\0']) {
        return Err(Error::config(
            key,
            value,
            "`+`, `#` and NUL are not allowed in an MQTT topic name (MQTT 5 §4.7.1, §1.5.4)",
        ));
    }
    if value.split('/').any(str::is_empty) {
        return Err(Error::config(
            key,
            value,
            "empty topic level (leading, trailing or double `/`)",
        ));
    }
    Ok(value.to_string())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            medium: MediumKind::Memory,
            timeout_ms: 300_000,
            senders: BTreeMap::new(),
            service: "intracom".into(),
            instance: None,
            max_message_bytes: 16 * 1024 * 1024,
            memory_max_messages: 100_000,
            db: DbConfig::default(),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            request_timeout_ms: 30_000,
            outbox_max_messages: 10_000,
            outbox_file: None,
            work: BTreeMap::new(),
            stores: StoresConfig::default(),
        }
    }
}

impl Config {
    /// A builder starting from the defaults.
    ///
    /// ```
    /// use intracom::{Config, MediumKind};
    /// let config = Config::builder()
    ///     .service("billing")
    ///     .sender("billing", ["invoice.created", "reload"])
    ///     .set("common.intracom.timeout_ms", "60000")
    ///     .build()?;
    /// assert_eq!(config.medium, MediumKind::Memory);
    /// assert_eq!(config.timeout_ms, 60_000);
    /// # Ok::<(), intracom::Error>(())
    /// ```
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
            error: None,
        }
    }

    /// Reads the file named by `INTRACOM_CONFIG` (if set), then applies the environment.
    pub fn from_env() -> Result<Self> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let text = match vars.iter().find(|(k, _)| k == CONFIG_FILE_ENV) {
            Some((_, path)) => Some(read_file(Path::new(path))?),
            None => None,
        };
        Self::from_sources(text.as_deref(), vars)
    }

    /// Reads a properties file, then applies the environment.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let text = read_file(path.as_ref())?;
        Self::from_sources(Some(&text), std::env::vars())
    }

    /// Parses properties text alone (no environment).
    ///
    /// ```
    /// let config = intracom::Config::from_properties("
    ///     # a service's existing lines
    ///     common.intracom.medium=memory
    ///     common.intracom.timeout_ms=300000
    ///     common.intracom.senders.list=custom1,custom2
    ///     common.intracom.actions.custom1=load,clear
    /// ")?;
    /// assert_eq!(config.senders["custom1"], ["load", "clear"]);
    /// assert!(config.senders["custom2"].is_empty());
    /// # Ok::<(), intracom::Error>(())
    /// ```
    pub fn from_properties(text: &str) -> Result<Self> {
        Self::from_sources(Some(text), std::iter::empty())
    }

    /// Properties text (optional) overridden by the given environment variables.
    pub fn from_sources<I>(text: Option<&str>, env: I) -> Result<Self>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut config = Config::default();
        if let Some(text) = text {
            for (key, value) in parse_properties(text) {
                config.set(&key, &value)?;
            }
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        for (name, value) in &env {
            if let Some(key) = env_key(name, &config) {
                config.set(&key, value)?;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets one key from its string form, as a properties file would. Keys outside
    /// `common.intracom.` are ignored (the file is shared with the rest of a service's
    /// config); unknown keys inside it are an error.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let value = value.trim();
        if !key.starts_with(PREFIX) {
            return Ok(());
        }
        if let Some(rest) = key.strip_prefix(WORK_PREFIX) {
            // The action may contain dots: the option is the last segment.
            let Some((action, option)) = rest.rsplit_once('.') else {
                return Err(Error::config(
                    key,
                    value,
                    "expected common.intracom.work.<action>.<option>",
                ));
            };
            check_config_name(key, action)?;
            let options = self.work.entry(action.to_string()).or_default();
            let n = parse_positive(key, value)?;
            if !work_options().any(|o| o == option) {
                return Err(Error::config(
                    key,
                    value,
                    "unknown work option (lease_ms, backoff_ms, max_attempts)",
                ));
            }
            match option {
                "lease_ms" => options.lease = Some(std::time::Duration::from_millis(n)),
                "backoff_ms" => options.backoff = Some(std::time::Duration::from_millis(n)),
                "max_attempts" => {
                    options.max_attempts =
                        Some(i32::try_from(n).map_err(|e| Error::config(key, value, e))?);
                }
                _ => {
                    return Err(Error::config(
                        key,
                        value,
                        "unknown work option (lease_ms, backoff_ms, max_attempts)",
                    ))
                }
            }
            return Ok(());
        }
        if let Some(service) = key.strip_prefix(ACTIONS_PREFIX) {
            check_config_name(key, service)?;
            let actions = split_list(key, value)?;
            self.senders.insert(service.to_string(), actions);
            return Ok(());
        }
        let rest = &key[PREFIX.len()..];
        if fixed_key(rest).is_none() {
            return Err(Error::config(key, value, "unknown key"));
        }
        match rest {
            "medium" => self.medium = value.parse().map_err(|e| Error::config(key, value, e))?,
            "timeout_ms" => {
                self.timeout_ms = parse_positive(key, value)?;
            }
            "senders.list" => {
                for service in split_list(key, value)? {
                    self.senders.entry(service).or_default();
                }
            }
            "service" => {
                check_config_name(key, value)?;
                self.service = value.to_string();
            }
            "instance" => {
                check_config_name(key, value)?;
                self.instance = Some(value.to_string());
            }
            "request_timeout_ms" => self.request_timeout_ms = parse_positive(key, value)?,
            "outbox.max_messages" => {
                self.outbox_max_messages = usize::try_from(parse_positive(key, value)?)
                    .map_err(|e| Error::config(key, value, e))?;
            }
            "outbox.file" => {
                if value.is_empty() {
                    return Err(Error::config(key, value, "empty path"));
                }
                self.outbox_file = Some(value.into());
            }
            "max_message_bytes" => {
                self.max_message_bytes = usize::try_from(parse_positive(key, value)?)
                    .map_err(|e| Error::config(key, value, e))?;
            }
            "memory.max_messages" => {
                self.memory_max_messages = usize::try_from(parse_positive(key, value)?)
                    .map_err(|e| Error::config(key, value, e))?;
            }
            "db.uri" => {
                if !(value.starts_with("mongodb://") || value.starts_with("mongodb+srv://")) {
                    return Err(Error::config(
                        key,
                        value,
                        "must start with mongodb:// or mongodb+srv://",
                    ));
                }
                self.db.uri = value.to_string();
            }
            "db.database" => {
                check_config_name(key, value)?;
                self.db.database = value.to_string();
            }
            "db.collection.messages" => self.db.messages = collection_name(key, value)?,
            "db.collection.config" => self.db.config = collection_name(key, value)?,
            "db.collection.checkpoints" => self.db.checkpoints = collection_name(key, value)?,
            "db.collection.processed" => self.db.processed = collection_name(key, value)?,
            "db.collection.dead" => self.db.dead = collection_name(key, value)?,
            "db.retention" => {
                self.db.retention = match value {
                    "ttl" => Retention::Ttl,
                    "capped" => Retention::Capped,
                    _ => return Err(Error::config(key, value, "expected ttl or capped")),
                }
            }
            "db.capped_bytes" => self.db.capped_bytes = parse_positive(key, value)?,
            "db.poll_interval_ms" => self.db.poll_interval_ms = parse_positive(key, value)?,
            "db.safety_window_ms" => self.db.safety_window_ms = parse_positive(key, value)?,
            "db.stream_buffer" => {
                self.db.stream_buffer = usize::try_from(parse_positive(key, value)?)
                    .map_err(|e| Error::config(key, value, e))?;
            }
            "db.hub.selection" => {
                self.db.hub_selection = match value {
                    "targeted" => HubSelection::Targeted,
                    "everything" => HubSelection::Everything,
                    _ => return Err(Error::config(key, value, "expected targeted or everything")),
                }
            }
            "db.read_preference" => self.db.read_preference = match value {
                "primary" => ReadPreference::Primary,
                "primaryPreferred" => ReadPreference::PrimaryPreferred,
                "secondary" => ReadPreference::Secondary,
                "secondaryPreferred" => ReadPreference::SecondaryPreferred,
                "nearest" => ReadPreference::Nearest,
                _ => return Err(Error::config(
                    key,
                    value,
                    "expected primary, primaryPreferred, secondary, secondaryPreferred or nearest",
                )),
            },
            "mqtt.url" => {
                parse_mqtt_url(key, value)?;
                self.mqtt.url = value.to_string();
            }
            "mqtt.client_id_prefix" => {
                if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(Error::config(
                        key,
                        value,
                        "contains whitespace or a control character",
                    ));
                }
                self.mqtt.client_id_prefix = value.to_string();
            }
            "mqtt.username" => self.mqtt.username = Some(value.to_string()),
            "mqtt.password" => self.mqtt.password = Some(value.to_string()),
            "mqtt.keep_alive_ms" => {
                let ms = parse_positive(key, value)?;
                if !(5_000..=65_535_000).contains(&ms) {
                    return Err(Error::config(
                        key,
                        value,
                        "must be between 5000 and 65535000 (MQTT keep-alive is 5 s to 65535 s here)",
                    ));
                }
                self.mqtt.keep_alive_ms = ms;
            }
            "mqtt.topic_prefix" => self.mqtt.topic_prefix = topic_prefix(key, value)?,
            "mqtt.session_expiry_ms" => {
                let ms = parse_positive(key, value)?;
                if ms.div_ceil(1000) > u64::from(u32::MAX) {
                    return Err(Error::config(
                        key,
                        value,
                        "longer than the MQTT session expiry interval allows (u32 seconds)",
                    ));
                }
                self.mqtt.session_expiry_ms = ms;
            }
            "mqtt.ca_file" => {
                if value.is_empty() {
                    return Err(Error::config(key, value, "empty path"));
                }
                self.mqtt.ca_file = Some(value.into());
            }
            "stores.idempotency" => {
                self.stores.idempotency = match value {
                    "medium" => IdempotencyStoreKind::Medium,
                    "http" => IdempotencyStoreKind::Http,
                    _ => return Err(Error::config(key, value, "expected medium or http")),
                }
            }
            "stores.messages" => {
                self.stores.messages = match value {
                    "local" => MessageStoreKind::Local,
                    "http" => MessageStoreKind::Http,
                    _ => return Err(Error::config(key, value, "expected local or http")),
                }
            }
            "stores.url" => {
                let shown = redacted_urls(value);
                let rest = value
                    .strip_prefix("http://")
                    .or_else(|| value.strip_prefix("https://"));
                if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                    return Err(Error::config(
                        key,
                        shown,
                        "must be http://host[:port][/path] or https://…",
                    ));
                }
                if rest.is_some_and(|r| r.contains(['?', '#', '@'])) {
                    return Err(Error::config(
                        key,
                        shown,
                        "no query, fragment or credentials: put the token in common.intracom.stores.token",
                    ));
                }
                self.stores.url = Some(value.trim_end_matches('/').to_string());
            }
            "stores.token" => {
                if value.is_empty() || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(Error::config(
                        key,
                        "***",
                        "empty, or contains whitespace or a control character",
                    ));
                }
                self.stores.token = Some(value.to_string());
            }
            "stores.ca_file" => {
                if value.is_empty() {
                    return Err(Error::config(key, value, "empty path"));
                }
                self.stores.ca_file = Some(value.into());
            }
            "stores.timeout_ms" => self.stores.timeout_ms = parse_positive(key, value)?,
            "http.url" => self.http.urls = parse_http_urls(key, value)?,
            "http.token" => {
                if value.is_empty() || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(Error::config(
                        key,
                        "***",
                        "empty, or contains whitespace or a control character",
                    ));
                }
                self.http.token = Some(value.to_string());
            }
            "http.ca_file" => {
                if value.is_empty() {
                    return Err(Error::config(key, value, "empty path"));
                }
                self.http.ca_file = Some(value.into());
            }
            _ => return Err(Error::config(key, value, "unknown key")),
        }
        Ok(())
    }

    /// The configuration as properties text, one `key=value` line per key that has a
    /// value (an unset optional key, such as `outbox.file`, is left out), for showing an
    /// operator what a service resolves (`intracom config` prints it).
    ///
    /// Secrets are masked: the password in `db.uri`, `mqtt.password` and `http.token`
    /// read `***`.
    /// Without secrets, [`Config::from_properties`] reads the text back to an equal
    /// configuration, except `instance`, which is left out (each process has its own).
    ///
    /// ```
    /// let config = intracom::Config::builder()
    ///     .mongodb("mongodb://app:s3cret@db1:27017", "orders")
    ///     .build()?;
    /// let text = config.to_properties();
    /// assert!(text.contains("common.intracom.db.uri=mongodb://app:***@db1:27017\n"));
    /// assert!(text.contains("common.intracom.db.database=orders\n"));
    /// # Ok::<(), intracom::Error>(())
    /// ```
    pub fn to_properties(&self) -> String {
        use std::fmt::Write as _;
        let mut text = String::new();
        let mut line = |key: &str, value: &dyn fmt::Display| {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{PREFIX}{key}={value}");
        };
        line("medium", &self.medium);
        line("timeout_ms", &self.timeout_ms);
        line("service", &self.service);
        line("max_message_bytes", &self.max_message_bytes);
        line("memory.max_messages", &self.memory_max_messages);
        line("request_timeout_ms", &self.request_timeout_ms);
        line("outbox.max_messages", &self.outbox_max_messages);
        if let Some(file) = &self.outbox_file {
            line("outbox.file", &file.display());
        }
        let db = &self.db;
        line("db.uri", &db.redacted_uri());
        line("db.database", &db.database);
        for (role, name) in [
            ("messages", &db.messages),
            ("config", &db.config),
            ("checkpoints", &db.checkpoints),
            ("processed", &db.processed),
            ("dead", &db.dead),
        ] {
            line(&format!("db.collection.{role}"), name);
        }
        let retention = match db.retention {
            Retention::Capped => "capped",
            Retention::Ttl => "ttl",
        };
        line("db.retention", &retention);
        line("db.capped_bytes", &db.capped_bytes);
        line("db.poll_interval_ms", &db.poll_interval_ms);
        line("db.safety_window_ms", &db.safety_window_ms);
        line("db.stream_buffer", &db.stream_buffer);
        let mqtt = &self.mqtt;
        line("mqtt.url", &mqtt.url);
        line("mqtt.client_id_prefix", &mqtt.client_id_prefix);
        if let Some(user) = &mqtt.username {
            line("mqtt.username", user);
        }
        if mqtt.password.is_some() {
            line("mqtt.password", &"***");
        }
        line("mqtt.keep_alive_ms", &mqtt.keep_alive_ms);
        line("mqtt.topic_prefix", &mqtt.topic_prefix);
        line("mqtt.session_expiry_ms", &mqtt.session_expiry_ms);
        if let Some(ca) = &mqtt.ca_file {
            line("mqtt.ca_file", &ca.display());
        }
        let stores = &self.stores;
        line(
            "stores.idempotency",
            &match stores.idempotency {
                IdempotencyStoreKind::Medium => "medium",
                IdempotencyStoreKind::Http => "http",
            },
        );
        line(
            "stores.messages",
            &match stores.messages {
                MessageStoreKind::Local => "local",
                MessageStoreKind::Http => "http",
            },
        );
        if let Some(url) = &stores.url {
            line("stores.url", url);
        }
        if stores.token.is_some() {
            line("stores.token", &"***");
        }
        if let Some(ca) = &stores.ca_file {
            line("stores.ca_file", &ca.display());
        }
        line("stores.timeout_ms", &stores.timeout_ms);
        let http = &self.http;
        line("http.url", &http.urls.join(","));
        if http.token.is_some() {
            line("http.token", &"***");
        }
        if let Some(ca) = &http.ca_file {
            line("http.ca_file", &ca.display());
        }
        let senders: Vec<&str> = self.senders.keys().map(String::as_str).collect();
        line("senders.list", &senders.join(","));
        for (service, actions) in &self.senders {
            line(&format!("actions.{service}"), &actions.join(","));
        }
        for (action, options) in &self.work {
            if let Some(lease) = options.lease {
                line(&format!("work.{action}.lease_ms"), &lease.as_millis());
            }
            if let Some(backoff) = options.backoff {
                line(&format!("work.{action}.backoff_ms"), &backoff.as_millis());
            }
            if let Some(attempts) = options.max_attempts {
                line(&format!("work.{action}.max_attempts"), &attempts);
            }
        }
        text
    }

    fn validate(&self) -> Result<()> {
        check_config_name("common.intracom.service", &self.service)?;
        if let Some(instance) = &self.instance {
            check_config_name("common.intracom.instance", instance)?;
        }
        if self.stores.any_http() && self.stores.url.is_none() {
            return Err(Error::config(
                "common.intracom.stores.url",
                "",
                "a store is `http` (common.intracom.stores.idempotency or .messages): name the gateway that keeps it",
            ));
        }
        Ok(())
    }

    /// This instance's id: the configured one, or a new `<host>-<pid>-<n>`.
    pub(crate) fn instance_or_default(&self) -> String {
        static HANDLES: AtomicU64 = AtomicU64::new(1);
        match &self.instance {
            Some(instance) => instance.clone(),
            None => format!(
                "{}-{}-{}",
                host_name(),
                std::process::id(),
                HANDLES.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }
}

/// Builds a [`Config`] in code; errors from [`ConfigBuilder::set`] surface at
/// [`ConfigBuilder::build`].
#[derive(Debug)]
pub struct ConfigBuilder {
    config: Config,
    error: Option<Error>,
}

impl ConfigBuilder {
    /// The medium (default memory).
    pub fn medium(mut self, medium: MediumKind) -> Self {
        self.config.medium = medium;
        self
    }

    /// Retention in milliseconds (default 300 000).
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.config.timeout_ms = ms;
        self
    }

    /// This process's service name (default `intracom`).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.config.service = service.into();
        self
    }

    /// This instance's id (default `<host>-<pid>-<n>`).
    pub fn instance(mut self, instance: impl Into<String>) -> Self {
        self.config.instance = Some(instance.into());
        self
    }

    /// Adds a service and its actions to the catalog seed.
    pub fn sender<I, S>(mut self, service: impl Into<String>, actions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let entry = self.config.senders.entry(service.into()).or_default();
        for action in actions {
            let action = action.into();
            if !entry.contains(&action) {
                entry.push(action);
            }
        }
        self
    }

    /// Largest encoded message in bytes (default 16 MiB).
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.config.max_message_bytes = bytes;
        self
    }

    /// Memory medium: messages kept at most (default 100 000).
    pub fn memory_max_messages(mut self, count: usize) -> Self {
        self.config.memory_max_messages = count;
        self
    }

    /// MongoDB connection string and database (`common.intracom.db.uri`, `.database`).
    pub fn mongodb(mut self, uri: impl Into<String>, database: impl Into<String>) -> Self {
        self.config.medium = MediumKind::Db;
        let uri = uri.into();
        if let Err(e) = self.config.set("common.intracom.db.uri", &uri) {
            self.error.get_or_insert(e);
        }
        self.config.db.database = database.into();
        self
    }

    /// MQTT broker URL (`common.intracom.mqtt.url`), and the MQTT medium.
    pub fn mqtt(mut self, url: impl Into<String>) -> Self {
        self.config.medium = MediumKind::Mqtt;
        let url = url.into();
        if let Err(e) = self.config.set("common.intracom.mqtt.url", &url) {
            self.error.get_or_insert(e);
        }
        self
    }

    /// The intracom gateway(s) to use as the medium (`common.intracom.http.url`: one
    /// URL, or several comma separated) and the token to present
    /// (`common.intracom.http.token`), and the HTTP medium.
    pub fn http(mut self, urls: impl Into<String>, token: impl Into<String>) -> Self {
        self.config.medium = MediumKind::Http;
        let (urls, token) = (urls.into(), token.into());
        if let Err(e) = self.config.set("common.intracom.http.url", &urls) {
            self.error.get_or_insert(e);
        }
        if let Err(e) = self.config.set("common.intracom.http.token", &token) {
            self.error.get_or_insert(e);
        }
        self
    }

    /// Keeps the outbox in this file across restarts (`common.intracom.outbox.file`).
    pub fn outbox_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.outbox_file = Some(path.into());
        self
    }

    /// Sets a key from its properties form (e.g. `common.intracom.timeout_ms`, `"1000"`).
    /// An error is kept and returned by [`ConfigBuilder::build`].
    pub fn set(mut self, key: &str, value: &str) -> Self {
        if self.error.is_none() {
            if let Err(e) = self.config.set(key, value) {
                self.error = Some(e);
            }
        }
        self
    }

    /// The configuration, or the first error met.
    pub fn build(self) -> Result<Config> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.config.timeout_ms == 0 {
            return Err(Error::config(
                "common.intracom.timeout_ms",
                "0",
                "must be greater than 0",
            ));
        }
        if self.config.max_message_bytes == 0 {
            return Err(Error::config(
                "common.intracom.max_message_bytes",
                "0",
                "must be greater than 0",
            ));
        }
        if self.config.memory_max_messages == 0 {
            return Err(Error::config(
                "common.intracom.memory.max_messages",
                "0",
                "must be greater than 0",
            ));
        }
        for (service, actions) in &self.config.senders {
            check_config_name(&format!("{ACTIONS_PREFIX}{service}"), service)?;
            for action in actions {
                check_config_name(&format!("{ACTIONS_PREFIX}{service}"), action)?;
            }
        }
        check_config_name("common.intracom.db.database", &self.config.db.database)?;
        self.config.validate()?;
        Ok(self.config)
    }
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::ConfigFile {
        path: path.display().to_string(),
        source,
    })
}

/// The config key an environment variable sets, if it is one of ours.
fn env_key(name: &str, config: &Config) -> Option<String> {
    if name.starts_with(PREFIX) {
        return Some(name.to_string());
    }
    if let Some(suffix) = name.strip_prefix(ENV_ACTIONS_PREFIX) {
        // Match a known service by its environment form; otherwise lower-case.
        let service = config
            .senders
            .keys()
            .find(|s| env_form(s) == suffix)
            .cloned()
            .unwrap_or_else(|| suffix.to_ascii_lowercase());
        return Some(format!("{ACTIONS_PREFIX}{service}"));
    }
    let suffix = name.strip_prefix(ENV_PREFIX)?;
    if let Some(rest) = name.strip_prefix("COMMON_INTRACOM_WORK_") {
        // COMMON_INTRACOM_WORK_<ACTION>_<OPTION>: the action is lower-cased with `_` read
        // as `.` (`INVOICE_RENDER` → `invoice.render`); the dotted key spells any action.
        for option in work_options() {
            let suffix = format!("_{}", option.to_ascii_uppercase());
            if let Some(action) = rest.strip_suffix(&suffix) {
                return Some(format!(
                    "{WORK_PREFIX}{}.{option}",
                    action.to_ascii_lowercase().replace('_', ".")
                ));
            }
        }
        return Some(format!("{WORK_PREFIX}{}", rest.to_ascii_lowercase()));
    }
    let fixed = KEYS
        .iter()
        .filter(|k| k.is_fixed())
        .filter_map(|k| k.name.strip_prefix(PREFIX));
    match fixed.into_iter().find(|k| env_form(k) == suffix) {
        Some(k) => Some(format!("{PREFIX}{k}")),
        // An unknown COMMON_INTRACOM_ variable is reported like an unknown key.
        None => Some(format!("{PREFIX}{}", suffix.to_ascii_lowercase())),
    }
}

fn env_form(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Java-style properties: `key=value` or `key: value`, `#`/`!` comments, a trailing
/// backslash continues the line.
fn parse_properties(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim_start();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('!'))
        {
            continue;
        }
        if let Some(stripped) = line.strip_suffix('\\') {
            pending.push_str(stripped);
            continue;
        }
        pending.push_str(line);
        push_property(&mut out, std::mem::take(&mut pending));
    }
    // A last line that ends in a backslash continues into the end of the file.
    if !pending.trim().is_empty() {
        push_property(&mut out, pending);
    }
    out
}

fn push_property(out: &mut Vec<(String, String)>, entry: String) {
    let split = entry.find(['=', ':']);
    let (key, value) = match split {
        Some(i) => (&entry[..i], &entry[i + 1..]),
        None => (entry.as_str(), ""),
    };
    out.push((key.trim().to_string(), value.trim().to_string()));
}

fn split_list(key: &str, value: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        check_config_name(key, item)?;
        if !out.iter().any(|x| x == item) {
            out.push(item.to_string());
        }
    }
    Ok(out)
}

fn collection_name(key: &str, value: &str) -> Result<String> {
    check_config_name(key, value)?;
    if value.starts_with("system.") || value.contains('$') {
        return Err(Error::config(key, value, "not a valid collection name"));
    }
    Ok(value.to_string())
}

fn parse_positive(key: &str, value: &str) -> Result<u64> {
    match value.parse::<u64>() {
        Ok(0) => Err(Error::config(key, value, "must be greater than 0")),
        Ok(n) => Ok(n),
        Err(e) => Err(Error::config(
            key,
            value,
            format!("not a whole number ({e})"),
        )),
    }
}

fn check_config_name(key: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::config(key, name, "name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::config(
            key,
            name,
            format!("longer than {MAX_NAME_LEN} bytes"),
        ));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ',')
    {
        return Err(Error::config(
            key,
            name,
            "contains whitespace, a comma or a control character",
        ));
    }
    Ok(())
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && check_config_name("", h).is_ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact_uri("mongodb://app:s3cret@db1:27017/?replicaSet=rs0"),
            "mongodb://app:***@db1:27017/?replicaSet=rs0"
        );
        assert_eq!(
            redact_uri("mongodb://app:p@ss@db1,db2/x"),
            "mongodb://app:***@db1,db2/x"
        );
        assert_eq!(
            redact_uri("mongodb://db1:27017/?a=b@c"),
            "mongodb://db1:27017/?a=b@c"
        );
        assert_eq!(redact_uri("mongodb://localhost"), "mongodb://localhost");
    }

    #[test]
    fn properties_text_reads_back_to_the_same_config() {
        let config = Config::from_properties(
            "
            common.intracom.medium=mqtt
            common.intracom.timeout_ms=1000
            common.intracom.service=billing
            common.intracom.max_message_bytes=4096
            common.intracom.memory.max_messages=7
            common.intracom.request_timeout_ms=2000
            common.intracom.outbox.max_messages=9
            common.intracom.outbox.file=/var/lib/billing/outbox
            common.intracom.db.uri=mongodb://db1:27017/?replicaSet=rs0
            common.intracom.db.database=orders
            common.intracom.db.collection.messages=m
            common.intracom.db.collection.config=c
            common.intracom.db.collection.checkpoints=k
            common.intracom.db.collection.processed=p
            common.intracom.db.collection.dead=d
            common.intracom.db.retention=capped
            common.intracom.db.capped_bytes=1048576
            common.intracom.db.poll_interval_ms=100
            common.intracom.db.safety_window_ms=2000
            common.intracom.db.stream_buffer=50
            common.intracom.mqtt.url=mqtts://broker:8884
            common.intracom.mqtt.client_id_prefix=billing-
            common.intracom.mqtt.username=app
            common.intracom.mqtt.keep_alive_ms=10000
            common.intracom.mqtt.topic_prefix=acme/bus
            common.intracom.mqtt.session_expiry_ms=60000
            common.intracom.mqtt.ca_file=/etc/ssl/ca.pem
            common.intracom.senders.list=billing,users
            common.intracom.actions.billing=invoice.get,reload
            common.intracom.actions.users=user.deleted
            common.intracom.work.invoice.render.lease_ms=5000
            common.intracom.work.invoice.render.backoff_ms=200
            common.intracom.work.invoice.render.max_attempts=3
            ",
        )
        .expect("valid properties");
        assert_ne!(config, Config::default());
        let text = config.to_properties();
        assert_eq!(Config::from_properties(&text).expect("reads back"), config);
    }

    #[test]
    fn properties_text_masks_the_secrets() {
        let config = Config::from_properties(
            "common.intracom.db.uri=mongodb://app:s3cret@db1:27017\n\
             common.intracom.mqtt.password=hunter2\n",
        )
        .expect("valid properties");
        let text = config.to_properties();
        assert!(
            text.contains("common.intracom.db.uri=mongodb://app:***@db1:27017\n"),
            "{text}"
        );
        assert!(
            text.contains("common.intracom.mqtt.password=***\n"),
            "{text}"
        );
        assert!(
            !text.contains("s3cret") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn a_refused_url_is_shown_without_its_password() {
        for (key, value) in [
            (
                "common.intracom.http.url",
                "http://gw:1,https://bob:hunter2@gw:2/x",
            ),
            ("common.intracom.http.url", "ftp://bob:hunter2@gw"),
            ("common.intracom.mqtt.url", "mqtt://bob:hunter2@broker:1883"),
            ("common.intracom.mqtt.url", "tcp://bob:hunter2@broker"),
            ("common.intracom.stores.url", "https://bob:hunter2@gw/bus"),
            ("common.intracom.stores.url", "bob:hunter2@gw"),
        ] {
            let e = Config::from_properties(&format!("{key}={value}"))
                .unwrap_err()
                .to_string();
            assert!(!e.contains("hunter2"), "{key}={value}: {e}");
            assert!(e.contains("***@"), "{key}={value}: {e}");
        }
        assert_eq!(
            redacted_urls("http://a/b@c,https://u:p@h:1/q?x=@"),
            "http://a/b@c,https://***@h:1/q?x=@"
        );
    }

    #[test]
    fn stores_keys_parse_mask_the_token_and_need_a_url() {
        let config = Config::from_properties(
            "common.intracom.stores.idempotency=http\n\
             common.intracom.stores.messages=http\n\
             common.intracom.stores.url=https://gw.example:8443/bus/\n\
             common.intracom.stores.token=s3cret-token\n",
        )
        .expect("valid properties");
        assert_eq!(config.stores.idempotency, IdempotencyStoreKind::Http);
        assert_eq!(config.stores.messages, MessageStoreKind::Http);
        assert_eq!(
            config.stores.url.as_deref(),
            Some("https://gw.example:8443/bus")
        );
        let text = config.to_properties();
        assert!(
            text.contains("common.intracom.stores.token=***\n"),
            "{text}"
        );
        assert!(!text.contains("s3cret") && !format!("{config:?}").contains("s3cret"));
        let e = Config::from_properties("common.intracom.stores.idempotency=http")
            .unwrap_err()
            .to_string();
        assert!(e.contains("common.intracom.stores.url"), "{e}");
        for (key, value) in [
            ("common.intracom.stores.url", "ftp://gw"),
            ("common.intracom.stores.url", "http://"),
            ("common.intracom.stores.url", "http://user:pw@gw"),
            ("common.intracom.stores.messages", "mongo"),
            ("common.intracom.stores.token", "a b"),
        ] {
            let e = Config::default().set(key, value).unwrap_err().to_string();
            assert!(e.contains(key), "{key}={value}: {e}");
            assert!(!e.contains("a b"), "the token is not printed: {e}");
        }
    }

    /// The HTTP medium's keys: several gateways in order, a token that is never
    /// printed (properties, Debug, the error of a bad one), URLs that are not HTTP or
    /// carry credentials refused.
    #[test]
    fn http_keys_read_several_gateways_and_hide_the_token() {
        let config = Config::from_properties(
            "common.intracom.medium=http\n\
             common.intracom.http.url=http://gw1:8080/, https://gw2\n\
             common.intracom.http.token=t0ken-s3cret\n",
        )
        .expect("valid properties");
        assert_eq!(config.medium, MediumKind::Http);
        assert_eq!(config.http.urls, ["http://gw1:8080", "https://gw2"]);
        assert_eq!(config.http.token.as_deref(), Some("t0ken-s3cret"));
        let text = config.to_properties();
        assert!(
            text.contains("common.intracom.http.url=http://gw1:8080,https://gw2\n"),
            "{text}"
        );
        assert!(text.contains("common.intracom.http.token=***\n"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!format!("{config:?}").contains("s3cret"));
        assert_eq!(
            Config::from_properties(&text.replace("***", "t0ken-s3cret")).expect("reads back"),
            config
        );
        let mut config = Config::default();
        for bad in ["mqtt://gw", "http://", "http://user:pw@gw", "gw:8080"] {
            assert!(
                config.set("common.intracom.http.url", bad).is_err(),
                "{bad}"
            );
        }
        let error = config
            .set("common.intracom.http.token", "has s3cret space")
            .expect_err("whitespace in a token");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_key_table_states_the_real_defaults() {
        for key in KEYS.iter().filter(|k| !k.default.starts_with('(')) {
            let name = key
                .name
                .replace("<service>", "billing")
                .replace("<action>", "invoice.render");
            let mut config = Config::default();
            config
                .set(&name, key.default)
                .unwrap_or_else(|e| panic!("{}: default {:?} refused: {e}", key.name, key.default));
            let mut expected = Config::default();
            if name.contains(".actions.") {
                expected.senders.insert("billing".into(), Vec::new());
            }
            assert_eq!(
                config, expected,
                "{}: the table's default is not the default",
                key.name
            );
        }
        // Every fixed key is accepted, and its environment name reaches it.
        for key in KEYS.iter().filter(|k| k.is_fixed()) {
            let config = Config::default();
            assert_eq!(
                env_key(&key.env(), &config).as_deref(),
                Some(key.name),
                "{}",
                key.name
            );
        }
        assert!(Config::default().set("common.intracom.nope", "1").is_err());
    }

    #[test]
    fn seed_file_parses_as_written() {
        let text = "# select the intracom medium\ncommon.intracom.medium=memory\n\
                    common.intracom.timeout_ms=300000\n\
                    common.intracom.senders.list=custom1,custom2\n\
                    common.intracom.actions.custom1=load,clear\n\
                    other.service.key=ignored\n";
        let c = Config::from_properties(text).unwrap();
        assert_eq!(c.medium, MediumKind::Memory);
        assert_eq!(c.timeout_ms, 300_000);
        assert_eq!(c.senders["custom1"], ["load", "clear"]);
        assert_eq!(c.senders["custom2"], Vec::<String>::new());
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::from_sources(
            Some("common.intracom.timeout_ms=300000\ncommon.intracom.senders.list=my-svc"),
            env(&[
                ("COMMON_INTRACOM_TIMEOUT_MS", "1000"),
                ("COMMON_INTRACOM_ACTIONS_MY_SVC", "a,b"),
                ("common.intracom.medium", "db"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.timeout_ms, 1000);
        assert_eq!(c.medium, MediumKind::Db);
        assert_eq!(c.senders["my-svc"], ["a", "b"]);
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = Config::from_properties("common.intracom.medium=kafka")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("common.intracom.medium") && e.contains("kafka"),
            "{e}"
        );
        let e = Config::from_properties("common.intracom.timeout_ms=soon")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("common.intracom.timeout_ms") && e.contains("soon"),
            "{e}"
        );
        let e = Config::from_properties("common.intracom.timeout_ms=0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("greater than 0"), "{e}");
        let e = Config::from_properties("common.intracom.medum=db")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("common.intracom.medum") && e.contains("unknown key"),
            "{e}"
        );
        let e = Config::from_sources(None, env(&[("COMMON_INTRACOM_TIMEOUT", "5")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("common.intracom.timeout") && e.contains("unknown key"),
            "{e}"
        );
        let e = Config::builder()
            .set("common.intracom.medium", "x")
            .build()
            .unwrap_err();
        assert!(
            matches!(e, Error::Config { ref key, ref value, .. } if key == "common.intracom.medium" && value == "x")
        );
    }

    #[test]
    fn properties_syntax() {
        let pairs = parse_properties("a = 1\n! comment\nb: two\nc=x,\\\n  y\n\n");
        assert_eq!(
            pairs,
            [
                ("a".into(), "1".into()),
                ("b".into(), "two".into()),
                ("c".into(), "x,y".into())
            ]
        );
        // A continuation on the last line ends with the file.
        assert_eq!(
            parse_properties("a=1\nb=x,\\\n  y,\\"),
            [("a".into(), "1".into()), ("b".into(), "x,y,".into())]
        );
    }

    #[test]
    fn mqtt_keys_parse_check_and_come_from_the_environment() {
        let c = Config::from_sources(
            Some("common.intracom.medium=mqtt\ncommon.intracom.mqtt.url=mqtts://broker.example:8884\ncommon.intracom.mqtt.topic_prefix=site/a"),
            env(&[
                ("COMMON_INTRACOM_MQTT_USERNAME", "svc"),
                ("COMMON_INTRACOM_MQTT_PASSWORD", "secret"),
                ("COMMON_INTRACOM_MQTT_KEEP_ALIVE_MS", "10000"),
                ("COMMON_INTRACOM_MQTT_CLIENT_ID_PREFIX", "billing-"),
                ("COMMON_INTRACOM_MQTT_SESSION_EXPIRY_MS", "60000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.medium, MediumKind::Mqtt);
        let url = c.mqtt.parsed_url().unwrap();
        assert!(url.tls);
        assert_eq!((url.host.as_str(), url.port), ("broker.example", 8884));
        assert_eq!(c.mqtt.topic_prefix, "site/a");
        assert_eq!(c.mqtt.username.as_deref(), Some("svc"));
        assert_eq!(c.mqtt.keep_alive_ms, 10_000);
        assert_eq!(c.mqtt.client_id_prefix, "billing-");
        assert_eq!(c.mqtt.session_expiry_ms, 60_000);
        assert!(
            !format!("{c:?}").contains("secret"),
            "the password is not printed"
        );
        let plain = parse_mqtt_url("k", "mqtt://[::1]").unwrap();
        assert_eq!(
            (plain.tls, plain.host.as_str(), plain.port),
            (false, "::1", 1883)
        );

        for (key, value, says) in [
            ("common.intracom.mqtt.url", "tcp://localhost", "mqtt://"),
            (
                "common.intracom.mqtt.url",
                "mqtt://localhost:99999",
                "bad port",
            ),
            (
                "common.intracom.mqtt.url",
                "mqtt://u:p@localhost",
                "username",
            ),
            ("common.intracom.mqtt.url", "mqtt://localhost/x", "no path"),
            ("common.intracom.mqtt.keep_alive_ms", "1000", "5000"),
            ("common.intracom.mqtt.topic_prefix", "a/+/b", "not allowed"),
            ("common.intracom.mqtt.topic_prefix", "$SYS", "broker's own"),
            (
                "common.intracom.mqtt.topic_prefix",
                "a//b",
                "empty topic level",
            ),
            (
                "common.intracom.mqtt.session_expiry_ms",
                "soon",
                "whole number",
            ),
        ] {
            let e = Config::from_properties(&format!("{key}={value}"))
                .unwrap_err()
                .to_string();
            // A URL with credentials is shown without them.
            assert!(
                e.contains(key) && e.contains(&redacted_urls(value)) && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn builder_merges_actions() {
        let c = Config::builder()
            .sender("a", ["x"])
            .sender("a", ["x", "y"])
            .build()
            .unwrap();
        assert_eq!(c.senders["a"], ["x", "y"]);
        assert!(Config::builder().sender("a b", ["x"]).build().is_err());
    }
}
