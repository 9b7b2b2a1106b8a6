//! The `intracom` admin command.
//!
//! Reads the same configuration as the library (`INTRACOM_CONFIG` or `--config`, the
//! environment) so that an operator sees what a service would see; `--uri` points it at
//! a MongoDB deployment, `--medium mqtt --url mqtt://…` at an MQTT broker. Errors are one line and a hint, with exit code 1 (2 for a
//! command line clap cannot parse).

/// `println!` for the command's output: a reader that has gone away (`intracom … |
/// head`) ends the command quietly, where `println!` would panic. See [`write_out`].
macro_rules! out {
    () => {
        $crate::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

// One file per command that outgrows this one (cargo's layout): src/bin/intracom/.
#[path = "intracom/bench/mod.rs"]
mod bench;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use futures::StreamExt;
use intracom::bson::{doc, Bson, Document, Timestamp};
use intracom::medium::memory::MemoryMedium;
use intracom::medium::mongo::MongoMedium;
#[cfg(feature = "mqtt")]
use intracom::medium::mqtt::MqttMedium;
use intracom::{
    Config, Error, Intracom, MediumKind, Message, MessageType, Position, PublishStatus, StartFrom,
    Subscription, WorkOptions,
};

#[derive(Parser)]
#[command(
    name = "intracom",
    version,
    about = "Admin tool for the intracom message bus",
    propagate_version = true
)]
struct Cli {
    /// Properties file to read (default: $INTRACOM_CONFIG, if set).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// MongoDB connection string; implies common.intracom.medium=db.
    #[arg(long, global = true, value_name = "URI")]
    uri: Option<String>,
    /// Database name (common.intracom.db.database).
    #[arg(long, global = true, value_name = "NAME")]
    database: Option<String>,
    /// The medium: memory, db (MongoDB) or mqtt (common.intracom.medium).
    #[arg(long, global = true, value_name = "MEDIUM")]
    medium: Option<String>,
    /// MQTT broker URL, mqtt://host[:port] or mqtts://…; implies --medium mqtt
    /// (common.intracom.mqtt.url).
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration and print it as the library resolves it.
    Config,
    /// Show the bus at work in one process, no server needed: three services,
    /// a broadcast, a targeted message, a request and a work queue.
    Demo,
    /// Follow messages live.
    Tail(TailArgs),
    /// Publish a message.
    Publish(PublishArgs),
    /// Send a request and print the answer; exits 1 on an error or a time-out.
    Request(RequestArgs),
    /// The sender/action catalog.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Counts by service, action, type and state; queue depth; dead letters; lag.
    Stats(JsonFlag),
    /// The dead letters.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Check a MongoDB deployment and say what to fix (MongoDB only).
    Doctor,
    /// Measure intracom beside the raw driver (or tokio::sync::broadcast) doing the same
    /// job on the same server, in rounds; prints a table, or JSON with --json.
    Bench(Box<bench::BenchArgs>),
    /// Serve the HTTP gateway (REST, Server-Sent Events, OpenAPI, web console) on the
    /// configured medium.
    #[cfg(feature = "gateway")]
    Serve(ServeArgs),
    /// Gateway tokens.
    #[cfg(feature = "gateway")]
    #[command(subcommand)]
    Token(TokenCommand),
    /// Serve the HTTP gateway: not in this build (build with the `gateway` feature).
    #[cfg(not(feature = "gateway"))]
    Serve(NotBuilt),
    /// Gateway tokens: not in this build (build with the `gateway` feature).
    #[cfg(not(feature = "gateway"))]
    Token(NotBuilt),
}

/// The arguments of a command this build leaves out: any, so that the error names the
/// feature rather than an argument.
#[cfg(not(feature = "gateway"))]
#[derive(Args)]
struct NotBuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

/// The end of `intracom --help`: examples, and the environment the command reads.
fn after_help() -> String {
    let mut text = String::from(
        "Examples:
  intracom demo                                  the bus in one process, no server needed
  intracom --uri 'mongodb://localhost:27017/?directConnection=true' doctor
  intracom --config service.properties config    the configuration a service would use
  intracom tail --since 10m --action reload      follow messages, from ten minutes ago
  intracom tail --name audit                     follow as a named subscription (acks what it prints)
  intracom publish reload --from billing --body '{\"tenant\": 7}'
  intracom request billing invoice.get --from users --body '{\"invoice\": 42}'
  intracom stats                                 counts, queue depth, dead letters, lag

Environment:
  INTRACOM_CONFIG          the properties file to read, when --config is not given
  COMMON_INTRACOM_<KEY>    any configuration key, upper-case with `.` as `_`; wins over the file
                           (COMMON_INTRACOM_MEDIUM=db, COMMON_INTRACOM_DB_URI=mongodb://…,
                           COMMON_INTRACOM_DB_DATABASE=intracom; `intracom config` lists the keys)
  INTRACOM_LOG             what to log on stderr (default `warn`; e.g. `intracom=debug`)",
    );
    if cfg!(feature = "gateway") {
        text.push_str(
            "
  INTRACOM_GATEWAY_LISTEN, INTRACOM_GATEWAY_TOKENS, INTRACOM_GATEWAY_TLS_CERT,
  INTRACOM_GATEWAY_TLS_KEY the options of `intracom serve` of the same names",
        );
    }
    let missing: Vec<&str> = [
        (!cfg!(feature = "gateway")).then_some("gateway (`serve`, `token`)"),
        (!cfg!(feature = "mqtt")).then_some("mqtt (`--medium mqtt`)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        text.push_str(&format!(
            "

Not in this build: {}; build with `cargo install intracom --features gateway,mqtt`",
            missing.join(", ")
        ));
    }
    text
}

#[cfg(feature = "gateway")]
#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        default_value = "127.0.0.1:8080",
        env = "INTRACOM_GATEWAY_LISTEN"
    )]
    listen: std::net::SocketAddr,
    /// The tokens file: one `<sha-256 hex> <roles>` line per token (see `intracom token new`).
    #[arg(long, value_name = "FILE", env = "INTRACOM_GATEWAY_TOKENS")]
    tokens: PathBuf,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        env = "INTRACOM_GATEWAY_TLS_CERT"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        env = "INTRACOM_GATEWAY_TLS_KEY"
    )]
    tls_key: Option<PathBuf>,
    /// Events read ahead for one SSE client.
    #[arg(long, default_value_t = 256)]
    sse_buffer: usize,
    /// Bytes of events read ahead for one SSE client (an event larger than this goes
    /// alone).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    sse_buffer_bytes: usize,
    /// How long an SSE client may leave its buffer full before it is told it fell
    /// behind and its stream ends (it resumes with Last-Event-ID).
    #[arg(long, default_value = "30s")]
    sse_stall: humantime::Duration,
    /// SSE streams open at once, all tokens together; another one gets 503 `busy`.
    #[arg(long, default_value_t = 1000)]
    max_sse_clients: usize,
    /// Of --max-sse-clients, the streams only admin tokens may take.
    #[arg(long, default_value_t = 10)]
    sse_admin_reserve: usize,
    /// SSE streams one token may hold open; one more gets 429.
    #[arg(long, default_value_t = 100)]
    max_sse_per_token: usize,
    /// Bytes queued for all SSE clients together; past it, a stream holding more than
    /// its share is told `lagged` and closed.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    sse_budget_bytes: usize,
    /// Requests one token may have in progress (SSE streams aside); one more gets 429.
    #[arg(long, default_value_t = 256)]
    max_requests_per_token: usize,
    /// Keys that sign SSE event ids, one per line (at least 32 bytes each; the first
    /// signs, all verify). Give every gateway of a bus the same file, so clients resume
    /// on any of them and after a restart. Without it: a random key per start.
    #[arg(long, value_name = "FILE", env = "INTRACOM_GATEWAY_EVENT_KEYS")]
    event_key_file: Option<PathBuf>,
    /// Time to read a request's headers (and a new connection's first request).
    #[arg(long, default_value = "10s")]
    header_read_timeout: humantime::Duration,
    /// Time to read a request's body once its headers are in; 408 after.
    #[arg(long, default_value = "30s")]
    body_read_timeout: humantime::Duration,
    /// How long a connection may stay idle (no request in progress) before it is closed.
    #[arg(long, default_value = "60s")]
    idle_timeout: humantime::Duration,
    /// Connections open at once; over it, the connection idle the longest is closed
    /// (none idle: the new one is). Keep it under the open-files limit (`ulimit -n`).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once.
    #[arg(long, default_value_t = 64)]
    max_h2_streams: u32,
    /// JSON values a request body may hold, counted before it is parsed.
    #[arg(long, default_value_t = 262_144)]
    max_json_values: usize,
    /// How deep a request body's JSON may nest.
    #[arg(long, default_value_t = 64)]
    max_json_depth: usize,
}

#[cfg(feature = "gateway")]
#[derive(Subcommand)]
enum TokenCommand {
    /// Make a random token; prints it, then the line to add to the tokens file (only
    /// the hash is kept there).
    New {
        /// The service the token acts as.
        #[arg(long, required_unless_present = "admin")]
        service: Option<String>,
        /// Give the token the admin role (queues, dead letters, stores, stats).
        #[arg(long)]
        admin: bool,
    },
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON (one document per line) for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TailArgs {
    /// Only messages from or to this service.
    #[arg(long)]
    service: Option<String>,
    /// Only these actions (repeatable).
    #[arg(long)]
    action: Vec<String>,
    /// Only this type (broadcast, fire_and_forget, async, sync, response).
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
    /// Only this state (pending, done, error) as published.
    #[arg(long)]
    state: Option<String>,
    /// Start in the past: a duration (`10m`), a time (`2026-11-24T07:00:00Z`) or a
    /// position (`<seconds>:<increment>`, a BSON Timestamp).
    #[arg(long)]
    since: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// Print JSON (relaxed extended JSON, one message per line).
    #[arg(long)]
    json: bool,
    /// Follow as this named subscription: resume after its checkpoint (--since applies
    /// only when it has none yet) and ack each message once it is printed, so that the
    /// next `tail --name` goes on after the last message printed. At least once: on
    /// MongoDB, a checkpoint saved while catching up from the collection (--since, or
    /// after falling behind) resumes with a look-back of
    /// common.intracom.db.safety_window_ms, and the messages of that window before it
    /// come again. Acking moves the checkpoint: give tail a name of its own, not the
    /// name of a service's subscription.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

#[derive(Args)]
struct PublishArgs {
    /// The action.
    action: String,
    /// The sending service (must be in the catalog).
    #[arg(long)]
    from: String,
    /// The target service (default: every service).
    #[arg(long)]
    to: Option<String>,
    /// The target instance of --to.
    #[arg(long)]
    instance: Option<String>,
    /// The payload, as JSON (extended JSON accepted).
    #[arg(long, default_value = "{}")]
    body: String,
    /// Make it work for one instance of --to (delivery: one).
    #[arg(long)]
    work: bool,
    /// Work priority (higher first).
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Use this message id (publishing the same id twice stores it once).
    #[arg(long)]
    id: Option<String>,
}

#[derive(Args)]
struct RequestArgs {
    /// The target service.
    service: String,
    /// The action.
    action: String,
    /// The requesting service (must be in the catalog).
    #[arg(long)]
    from: String,
    /// The query, as JSON.
    #[arg(long, default_value = "{}")]
    body: String,
    /// How long to wait (e.g. `5s`, `500ms`).
    #[arg(long, default_value = "30s")]
    timeout: humantime::Duration,
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// List services and their actions.
    List(JsonFlag),
    /// Add a service and actions (a union with what is there).
    Add {
        /// The service.
        service: String,
        /// Its actions.
        actions: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List dead letters, oldest first.
    List {
        /// How many at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full.
    Show {
        /// The message id.
        id: String,
    },
    /// Publish a dead letter again (new id, `retryOf` naming the original) and remove it.
    Retry {
        /// The message id.
        id: String,
    },
    /// Remove one dead letter, or all of them with --all.
    Purge {
        /// The message id.
        id: Option<String>,
        /// Remove every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

/// A failure with a hint for the operator.
struct Failure {
    message: String,
    hint: Option<String>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let hint = match &error {
            Error::Config { .. } | Error::ConfigFile { .. } => Some(
                "keys and defaults: `intracom config`, or the README's Configuration section"
                    .to_string(),
            ),
            Error::Unavailable { medium: "mqtt", .. } => Some(
                "check that the broker is reachable at the URL (--url, common.intracom.mqtt.url)"
                    .to_string(),
            ),
            Error::Unavailable { .. } => Some(
                "check that MongoDB is reachable at the URI (try `intracom doctor`)".to_string(),
            ),
            Error::Unsupported { medium, .. } if medium == "mqtt" => Some(
                "a broker keeps no history: `tail` follows from now on MQTT (drop --since)"
                    .to_string(),
            ),
            Error::NoWorker { .. } => Some(
                "start a worker of the service (`serve`/`work`), then publish again".to_string(),
            ),
            Error::UnknownSender { .. } | Error::UnknownAction { .. } => {
                Some("see `intracom catalog list`; add with `intracom catalog add`".to_string())
            }
            Error::Timeout { .. } => {
                Some("is a worker serving this action? raise --timeout if it is slow".to_string())
            }
            _ => None,
        };
        Failure {
            message: error.to_string(),
            hint,
        }
    }
}

fn fail(message: impl Into<String>, hint: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        hint: Some(hint.into()),
    }
}

type Outcome = Result<(), Failure>;

/// Writes the command's output. When the reader has closed the pipe (`intracom config |
/// head -5`), the command has nothing more to say: it exits at once with status 0 and
/// no message (`println!` panics with "failed printing to stdout"). Any other write
/// error ends it with status 1 and the error. The commands that hold state the exit
/// would lose (`tail --name`) write with [`try_write_out`] instead and stop first.
fn write_out(args: std::fmt::Arguments<'_>) {
    match try_write_out(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// Writes and flushes the command's output: `Ok(false)` when the reader has gone away.
fn try_write_out(args: std::fmt::Arguments<'_>) -> std::io::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().after_help(after_help()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INTRACOM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // A failed write of a log line (its reader went away: `intracom serve 2>&1 | head`)
        // is dropped; reporting it would print to that same stderr, which panics.
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            if let Some(hint) = failure.hint {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::from_env()?,
    };
    if let Some(uri) = &cli.uri {
        config.set("common.intracom.medium", "db")?;
        config.set("common.intracom.db.uri", uri)?;
    }
    if let Some(database) = &cli.database {
        config.set("common.intracom.db.database", database)?;
    }
    if let Some(medium) = &cli.medium {
        config.set("common.intracom.medium", medium)?;
    }
    if let Some(url) = &cli.url {
        if cli.medium.is_none() {
            config.set("common.intracom.medium", "mqtt")?;
        }
        config.set("common.intracom.mqtt.url", url)?;
    }
    config.set(
        "common.intracom.instance",
        &format!("intracom-cli-{}", std::process::id()),
    )?;
    Ok(config)
}

/// The medium under the bus, for what only it can tell (stats, doctor).
enum Admin {
    Mongo(Arc<MongoMedium>),
    #[cfg(feature = "mqtt")]
    Mqtt(Arc<MqttMedium>),
}

/// The bus on a shared medium, and that medium.
async fn open(config: &Config, what: &str) -> Result<(Intracom, Admin), Failure> {
    match config.medium {
        MediumKind::Db => {
            let medium = Arc::new(MongoMedium::connect(config).await?);
            let bus = Intracom::with_medium(config.clone(), medium.clone()).await?;
            Ok((bus, Admin::Mongo(medium)))
        }
        #[cfg(feature = "mqtt")]
        MediumKind::Mqtt => {
            let medium = Arc::new(MqttMedium::connect(config).await?);
            let bus = Intracom::with_medium(config.clone(), medium.clone()).await?;
            Ok((bus, Admin::Mqtt(medium)))
        }
        #[cfg(not(feature = "mqtt"))]
        MediumKind::Mqtt => Err(fail(
            "this intracom was built without the MQTT medium",
            "cargo install intracom --features mqtt (or cargo run --features mqtt -- …)",
        )),
        _ => Err(fail(
            format!("`{what}` needs a shared medium; common.intracom.medium is `{}`", config.medium),
            "the memory medium lives inside one process: pass --uri mongodb://… or --medium mqtt --url mqtt://…, or try `intracom demo`",
        )),
    }
}

/// Where `tail` reads, for its first line.
fn source(config: &Config) -> String {
    match config.medium {
        MediumKind::Mqtt => format!("{}/# on {}", config.mqtt.topic_prefix, config.mqtt.url),
        _ => format!("{} on {}", config.db.messages, redact(&config.db.uri)),
    }
}

async fn run(cli: Cli) -> Outcome {
    let config = load_config(&cli)?;
    match cli.command {
        Command::Config => print_config(&config),
        Command::Demo => demo().await,
        Command::Tail(args) => tail(&config, args).await,
        Command::Publish(args) => publish(&config, args).await,
        Command::Request(args) => request(&config, args).await,
        Command::Catalog(command) => catalog(&config, command).await,
        Command::Stats(flag) => stats(&config, flag.json).await,
        Command::Dead(command) => dead(&config, command).await,
        Command::Doctor => doctor(&config).await,
        Command::Bench(args) => bench::bench(&config, cli.config.as_deref(), *args).await,
        #[cfg(feature = "gateway")]
        Command::Serve(args) => serve(config, args).await,
        #[cfg(feature = "gateway")]
        Command::Token(command) => token(command),
        #[cfg(not(feature = "gateway"))]
        Command::Serve(_) | Command::Token(_) => Err(fail(
            "this intracom was built without the HTTP gateway (`serve`, `token`)",
            "cargo install intracom --features gateway (or cargo run --features gateway -- serve …)",
        )),
    }
}

#[cfg(feature = "gateway")]
async fn serve(mut config: Config, args: ServeArgs) -> Outcome {
    use intracom::gateway::{Gateway, GatewayOptions, Tls, Tokens};
    config.set(
        "common.intracom.instance",
        &format!("intracom-gateway-{}", std::process::id()),
    )?;
    let tokens = Tokens::from_file(&args.tokens)?;
    if tokens.is_empty() {
        eprintln!(
            "warning: {} holds no token: every API call will be refused (`intracom token new`)",
            args.tokens.display()
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls::new(cert, key)),
        _ => None,
    };
    let listener = std::net::TcpListener::bind(args.listen).map_err(|e| {
        fail(
            format!("cannot listen on {}: {e}", args.listen),
            "choose another address with --listen",
        )
    })?;
    let bus = Intracom::connect(config.clone()).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let address = listener
        .local_addr()
        .map_err(|e| fail(e.to_string(), "report this"))?;
    eprintln!(
        "intracom gateway on {scheme}://{address} (medium {}, {} token(s)); console at {scheme}://{address}/, API at {scheme}://{address}/openapi.json",
        config.medium,
        tokens.len()
    );
    let mut options = GatewayOptions::default()
        .sse_buffer(args.sse_buffer)
        .sse_buffer_bytes(args.sse_buffer_bytes)
        .sse_stall(args.sse_stall.into())
        .max_sse_clients(args.max_sse_clients)
        .sse_admin_reserve(args.sse_admin_reserve)
        .max_sse_per_token(args.max_sse_per_token)
        .sse_budget_bytes(args.sse_budget_bytes)
        .max_requests_per_token(args.max_requests_per_token)
        .header_read_timeout(args.header_read_timeout.into())
        .body_read_timeout(args.body_read_timeout.into())
        .idle_timeout(args.idle_timeout.into())
        .max_connections(args.max_connections)
        .max_h2_streams(args.max_h2_streams)
        .max_json_values(args.max_json_values)
        .max_json_depth(args.max_json_depth);
    if let Some(file) = &args.event_key_file {
        options = options.event_keys(intracom::gateway::EventKeys::from_file(file)?);
    }
    let served = Gateway::new(bus.clone(), tokens)
        .options(options)
        .serve(listener, tls, stop_signal())
        .await;
    bus.shutdown().await;
    served?;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
#[cfg(feature = "gateway")]
async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(feature = "gateway")]
fn token(command: TokenCommand) -> Outcome {
    use intracom::gateway::{Identity, Tokens};
    match command {
        TokenCommand::New { service, admin } => {
            let identity = match service {
                Some(service) => {
                    let identity = Identity::service(service);
                    if admin {
                        identity.and_admin()
                    } else {
                        identity
                    }
                }
                None => Identity::admin(),
            };
            let token = Tokens::generate()?;
            let line = Tokens::line(&token, &identity);
            Tokens::parse(&line)?;
            out!("{token}");
            out!("# add this line to the tokens file (it keeps the hash only):");
            out!("{line}");
        }
    }
    Ok(())
}

fn print_config(config: &Config) -> Outcome {
    out!("common.intracom.medium={}", config.medium);
    out!("common.intracom.timeout_ms={}", config.timeout_ms);
    out!("common.intracom.service={}", config.service);
    out!(
        "common.intracom.max_message_bytes={}",
        config.max_message_bytes
    );
    out!(
        "common.intracom.memory.max_messages={}",
        config.memory_max_messages
    );
    out!(
        "common.intracom.request_timeout_ms={}",
        config.request_timeout_ms
    );
    out!(
        "common.intracom.outbox.max_messages={}",
        config.outbox_max_messages
    );
    if let Some(file) = &config.outbox_file {
        out!("common.intracom.outbox.file={}", file.display());
    }
    let db = &config.db;
    out!("common.intracom.db.uri={}", redact(&db.uri));
    out!("common.intracom.db.database={}", db.database);
    for (role, name) in [
        ("messages", &db.messages),
        ("config", &db.config),
        ("checkpoints", &db.checkpoints),
        ("processed", &db.processed),
        ("dead", &db.dead),
    ] {
        out!("common.intracom.db.collection.{role}={name}");
    }
    let retention = match db.retention {
        intracom::Retention::Capped => "capped",
        _ => "ttl",
    };
    out!("common.intracom.db.retention={retention}");
    out!("common.intracom.db.capped_bytes={}", db.capped_bytes);
    out!(
        "common.intracom.db.poll_interval_ms={}",
        db.poll_interval_ms
    );
    out!(
        "common.intracom.db.safety_window_ms={}",
        db.safety_window_ms
    );
    out!("common.intracom.db.stream_buffer={}", db.stream_buffer);
    let mqtt = &config.mqtt;
    out!("common.intracom.mqtt.url={}", mqtt.url);
    out!(
        "common.intracom.mqtt.client_id_prefix={}",
        mqtt.client_id_prefix
    );
    if let Some(user) = &mqtt.username {
        out!("common.intracom.mqtt.username={user}");
    }
    if mqtt.password.is_some() {
        out!("common.intracom.mqtt.password=***");
    }
    out!("common.intracom.mqtt.keep_alive_ms={}", mqtt.keep_alive_ms);
    out!("common.intracom.mqtt.topic_prefix={}", mqtt.topic_prefix);
    out!(
        "common.intracom.mqtt.session_expiry_ms={}",
        mqtt.session_expiry_ms
    );
    if let Some(ca) = &mqtt.ca_file {
        out!("common.intracom.mqtt.ca_file={}", ca.display());
    }
    let senders: Vec<&str> = config.senders.keys().map(String::as_str).collect();
    out!("common.intracom.senders.list={}", senders.join(","));
    for (service, actions) in &config.senders {
        out!("common.intracom.actions.{service}={}", actions.join(","));
    }
    for (action, options) in &config.work {
        if let Some(lease) = options.lease {
            out!(
                "common.intracom.work.{action}.lease_ms={}",
                lease.as_millis()
            );
        }
        if let Some(backoff) = options.backoff {
            out!(
                "common.intracom.work.{action}.backoff_ms={}",
                backoff.as_millis()
            );
        }
        if let Some(attempts) = options.max_attempts {
            out!("common.intracom.work.{action}.max_attempts={attempts}");
        }
    }
    Ok(())
}

/// The URI with any password replaced, for printing.
fn redact(uri: &str) -> String {
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

fn parse_body(body: &str) -> Result<Document, Failure> {
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| {
        fail(
            format!("--body is not JSON: {e}"),
            r#"e.g. --body '{"tenant": 7}'"#,
        )
    })?;
    match Bson::try_from(json) {
        Ok(Bson::Document(d)) => Ok(d),
        Ok(_) => Err(fail(
            "--body must be a JSON object",
            r#"e.g. --body '{"tenant": 7}'"#,
        )),
        Err(e) => Err(fail(
            format!("--body is not valid extended JSON: {e}"),
            r#"e.g. --body '{"tenant": 7}'"#,
        )),
    }
}

fn parse_since(since: &str) -> Result<StartFrom, Failure> {
    let hint = "--since takes a duration (10m), a time (2026-11-24T07:00:00Z) or a position (1795500000:3)";
    let secs = if let Some((t, i)) = since
        .split_once(':')
        .filter(|(t, _)| t.chars().all(|c| c.is_ascii_digit()))
    {
        let time = t
            .parse()
            .map_err(|_| fail(format!("bad position `{since}`"), hint))?;
        let increment = i
            .parse()
            .map_err(|_| fail(format!("bad position `{since}`"), hint))?;
        return Ok(StartFrom::After(Position::new(
            Timestamp { time, increment },
            None,
        )));
    } else if let Ok(ago) = humantime::parse_duration(since) {
        SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH)
    } else if let Ok(at) = humantime::parse_rfc3339_weak(since) {
        at
    } else {
        return Err(fail(format!("cannot read --since `{since}`"), hint));
    };
    let time = secs
        .duration_since(UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0);
    // Just before the first message of that second.
    Ok(StartFrom::After(Position::new(
        Timestamp {
            time: time.saturating_sub(1),
            increment: u32::MAX,
        },
        None,
    )))
}

fn line(message: &Message) -> String {
    let at = message
        .at
        .map(|a| a.try_to_rfc3339_string().unwrap_or_default())
        .unwrap_or_default();
    let to = match (&message.dest_service, &message.dest_instance) {
        (None, _) => "*".to_string(),
        (Some(s), None) => s.clone(),
        (Some(s), Some(i)) => format!("{s}/{i}"),
    };
    let state = message
        .state
        .map(|s| format!(" [{}]", format!("{s:?}").to_lowercase()))
        .unwrap_or_default();
    format!(
        "{at}  {}/{} -> {to}  {} {}{state}  {}  ({})",
        message.source_service,
        message.source_instance,
        message.kind.as_str(),
        message.action,
        Bson::Document(message.query.clone()).into_relaxed_extjson(),
        message.id
    )
}

fn json(message: &Message) -> String {
    match intracom::bson::to_bson(message) {
        Ok(b) => b.into_relaxed_extjson().to_string(),
        Err(e) => format!("{{\"error\": \"{e}\"}}"),
    }
}

async fn tail(config: &Config, args: TailArgs) -> Outcome {
    let kind: Option<MessageType> = args.kind.as_deref().map(str::parse).transpose()?;
    let start = args
        .since
        .as_deref()
        .map(parse_since)
        .transpose()?
        .unwrap_or_default();
    let (bus, _) = open(config, "tail").await?;
    let mut subscription = Subscription::monitor().start(start);
    if let Some(name) = &args.name {
        subscription = subscription.with_name(name);
    }
    let mut sub = bus.subscribe(subscription).await?;
    if !args.json {
        match &args.name {
            Some(name) => eprintln!(
                "following {} as subscription `{name}` (Ctrl-C to stop)",
                source(config)
            ),
            None => eprintln!("following {} (Ctrl-C to stop)", source(config)),
        }
    }
    let mut shown = 0;
    let outcome = loop {
        let item = tokio::select! {
            item = sub.next() => item,
            _ = tokio::signal::ctrl_c() => break Ok(()),
        };
        let Some(item) = item else { break Ok(()) };
        let delivery = match item {
            Ok(d) => d,
            Err(e) if e.is_report() => {
                eprintln!("note: {e}");
                continue;
            }
            Err(e) => break Err(e.into()),
        };
        let m = delivery.message();
        let wanted = args
            .service
            .as_ref()
            .is_none_or(|s| m.source_service == *s || m.dest_service.as_ref() == Some(s))
            && (args.action.is_empty() || args.action.contains(&m.action))
            && kind.is_none_or(|k| m.kind == k)
            && args.state.as_ref().is_none_or(|s| {
                m.state.map(|x| format!("{x:?}").to_lowercase()).as_deref() == Some(s.as_str())
            });
        if wanted {
            let text = if args.json { json(m) } else { line(m) };
            match try_write_out(format_args!("{text}\n")) {
                Ok(true) => {}
                // The reader has gone (`| head`): this one was not printed, so not acked.
                Ok(false) => break Ok(()),
                Err(e) => {
                    break Err(fail(
                        format!("cannot write the output: {e}"),
                        "check where stdout goes",
                    ))
                }
            }
        }
        // A message passed over by the filters is acked too: the checkpoint of a named
        // subscription cannot move past a message left unacked. (Without a name, acks
        // do nothing.)
        if let Err(e) = delivery.ack().await {
            break Err(e.into());
        }
        if wanted {
            shown += 1;
            if args.count.is_some_and(|c| shown >= c) {
                break Ok(());
            }
        }
    };
    drop(sub);
    bus.shutdown().await;
    outcome
}

async fn publish(config: &Config, args: PublishArgs) -> Outcome {
    let body = parse_body(&args.body)?;
    let mut message = match (&args.to, &args.instance) {
        (None, None) => Message::broadcast(&args.action),
        (Some(to), None) => Message::to_service(to, &args.action),
        (Some(to), Some(instance)) => Message::to_instance(to, instance, &args.action),
        (None, Some(_)) => {
            return Err(fail(
                "--instance needs --to",
                "name the service of the instance with --to",
            ))
        }
    }
    .body(body)
    .from_service(&args.from)
    .priority(args.priority);
    if args.work {
        message = message.work();
    }
    if let Some(id) = args.id {
        message = message.with_id(id);
    }
    let (bus, _) = open(config, "publish").await?;
    let published = bus.publish(message).await?;
    let status = match published.status {
        PublishStatus::Stored => "stored",
        PublishStatus::Duplicate => "already stored (same id)",
        _ => "buffered: the medium is unreachable, it will be sent when it is back",
    };
    out!("{}  {status}", published.id);
    if published.status == PublishStatus::Buffered {
        // Give the outbox a chance before the process ends (it is not persisted here).
        for _ in 0..50 {
            if bus.outbox_len() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if bus.outbox_len() > 0 {
            return Err(fail(
                "the message could not be sent",
                "check the database or broker, then publish again with --id to keep it single",
            ));
        }
    }
    bus.shutdown().await;
    Ok(())
}

async fn request(config: &Config, args: RequestArgs) -> Outcome {
    let body = parse_body(&args.body)?;
    let (bus, _) = open(config, "request").await?;
    let client = bus.as_service(&args.from, None)?;
    let answer: Result<Bson, Error> = client
        .request(&args.service, &args.action, &body)
        .timeout(args.timeout.into())
        .await;
    bus.shutdown().await;
    out!("{}", answer?.into_relaxed_extjson());
    Ok(())
}

async fn catalog(config: &Config, command: CatalogCommand) -> Outcome {
    let (bus, _) = open(config, "catalog").await?;
    match command {
        CatalogCommand::List(flag) => {
            bus.catalog().refresh().await?;
            for (service, actions) in bus.catalog().snapshot() {
                if flag.json {
                    out!(
                        "{}",
                        serde_json::json!({ "service": service, "actions": actions })
                    );
                } else {
                    out!(
                        "{service}: {}",
                        actions.into_iter().collect::<Vec<_>>().join(", ")
                    );
                }
            }
        }
        CatalogCommand::Add { service, actions } => {
            bus.catalog().register(&service, actions.clone()).await?;
            out!("{service}: added {}", actions.join(", "));
        }
    }
    bus.shutdown().await;
    Ok(())
}

async fn stats(config: &Config, as_json: bool) -> Outcome {
    let (bus, admin) = open(config, "stats").await?;
    // Without the mqtt feature MongoDB is the only shared medium.
    #[cfg_attr(not(feature = "mqtt"), allow(clippy::infallible_destructuring_match))]
    let medium = match admin {
        Admin::Mongo(medium) => medium,
        #[cfg(feature = "mqtt")]
        Admin::Mqtt(medium) => return mqtt_stats(config, bus, &medium, as_json).await,
    };
    let stats = medium.admin_stats().await?;
    bus.shutdown().await;
    if as_json {
        let pairs = |rows: &[(String, u64)]| {
            rows.iter()
                .map(|(k, n)| serde_json::json!({ "key": k, "count": n }))
                .collect::<Vec<_>>()
        };
        let lag: Vec<_> = stats
            .lag
            .iter()
            .map(|(n, m, s)| serde_json::json!({ "subscription": n, "messages": m, "seconds": s }))
            .collect();
        out!(
            "{}",
            serde_json::json!({
                "total": stats.total, "by_service": pairs(&stats.by_service), "by_action": pairs(&stats.by_action),
                "by_type": pairs(&stats.by_type), "by_state": pairs(&stats.by_state),
                "queue_depth": stats.queue_depth, "dead": stats.dead, "lag": lag,
            })
        );
        return Ok(());
    }
    out!("messages retained: {}", stats.total);
    for (title, rows) in [
        ("by service", &stats.by_service),
        ("by action", &stats.by_action),
        ("by type", &stats.by_type),
        ("by state", &stats.by_state),
    ] {
        out!("{title}:");
        for (key, n) in rows.iter() {
            out!("  {key:<32} {n:>10}");
        }
    }
    out!("queue depth (pending work): {}", stats.queue_depth);
    out!("dead letters: {}", stats.dead);
    out!("subscription lag:");
    for (name, messages, seconds) in &stats.lag {
        out!("  {name:<32} {messages:>10} messages  {seconds:>6} s behind");
    }
    Ok(())
}

/// What an MQTT broker can tell: it keeps no history, so no counts by field or lag.
#[cfg(feature = "mqtt")]
async fn mqtt_stats(config: &Config, bus: Intracom, medium: &MqttMedium, as_json: bool) -> Outcome {
    let dead = bus.dead_letters().list(usize::MAX).await?.len();
    bus.catalog().refresh().await?;
    let services = bus.catalog().snapshot().len();
    let workers = medium.workers();
    let broker = medium.broker_stats().await?;
    let max_packet = medium.broker_max_packet_size();
    bus.shutdown().await;
    let missing = "counts by service/action/type/state, queue depth and lag need a stored history, which a broker does not keep";
    if as_json {
        let workers: Vec<_> = workers
            .iter()
            .map(|(s, n)| serde_json::json!({ "service": s, "workers": n }))
            .collect();
        let broker: serde_json::Map<String, serde_json::Value> = broker
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        out!(
            "{}",
            serde_json::json!({
                "medium": "mqtt", "url": config.mqtt.url, "topic_prefix": config.mqtt.topic_prefix,
                "max_packet_size": max_packet, "services": services, "workers": workers,
                "dead": dead, "broker": broker, "not_available": missing,
            })
        );
        return Ok(());
    }
    out!(
        "medium: mqtt, {} (topics under {}/)",
        config.mqtt.url,
        config.mqtt.topic_prefix
    );
    match max_packet {
        Some(n) => out!("broker maximum packet size: {n} bytes"),
        None => out!("broker maximum packet size: not set (MQTT's 256 MB)"),
    }
    out!("services in the catalog: {services}");
    out!("workers present:");
    for (service, n) in &workers {
        out!("  {service:<32} {n:>10}");
    }
    out!("dead letters: {dead}");
    if !broker.is_empty() {
        out!("broker ($SYS):");
        for (key, value) in &broker {
            out!("  {key:<40} {value}");
        }
    }
    out!("not available on MQTT: {missing}");
    Ok(())
}

async fn dead(config: &Config, command: DeadCommand) -> Outcome {
    let (bus, _) = open(config, "dead").await?;
    let dead = bus.dead_letters();
    match command {
        DeadCommand::List { limit, json } => {
            for letter in dead.list(limit).await? {
                let at = letter
                    .at
                    .map(|a| a.try_to_rfc3339_string().unwrap_or_default())
                    .unwrap_or_default();
                if json {
                    out!(
                        "{}",
                        serde_json::json!({ "id": letter.id, "at": at, "reason": letter.reason, "document": Bson::Document(letter.document).into_relaxed_extjson() })
                    );
                } else {
                    let action = letter.document.get_str("action").unwrap_or("?");
                    out!("{}  {at}  {action}  {}", letter.id, letter.reason);
                }
            }
        }
        DeadCommand::Show { id } => match dead.get(&id).await? {
            Some(letter) => {
                out!("id: {}\nreason: {}", letter.id, letter.reason);
                if let Some(at) = letter.at {
                    out!("at: {}", at.try_to_rfc3339_string().unwrap_or_default());
                }
                let pretty = serde_json::to_string_pretty(
                    &Bson::Document(letter.document).into_relaxed_extjson(),
                )
                .unwrap_or_default();
                out!("document: {pretty}");
            }
            None => {
                return Err(fail(
                    format!("no dead letter `{id}`"),
                    "list them with `intracom dead list`",
                ))
            }
        },
        DeadCommand::Retry { id } => {
            let published = dead.retry(&id).await?;
            out!("{id} sent again as {}", published.id);
        }
        DeadCommand::Purge { id, all } => {
            if id.is_none() && !all {
                return Err(fail(
                    "name a dead letter or pass --all",
                    "intracom dead purge <id>, or intracom dead purge --all",
                ));
            }
            eprintln!("purging…");
            let removed = dead.purge(id.as_deref()).await?;
            out!("removed {removed} dead letter(s)");
        }
    }
    bus.shutdown().await;
    Ok(())
}

async fn doctor(config: &Config) -> Outcome {
    let (bus, admin) = open(config, "doctor").await?;
    #[cfg_attr(not(feature = "mqtt"), allow(clippy::infallible_destructuring_match))]
    let medium = match admin {
        Admin::Mongo(medium) => medium,
        #[cfg(feature = "mqtt")]
        Admin::Mqtt(_) => {
            bus.shutdown().await;
            return Err(fail(
                "doctor checks a MongoDB deployment",
                "for an MQTT broker, `intracom stats` shows what the broker tells",
            ));
        }
    };
    out!(
        "checking {} / {}",
        redact(&config.db.uri),
        config.db.database
    );
    let checks = medium.doctor().await;
    bus.shutdown().await;
    let mut failed = 0;
    for check in &checks {
        out!(
            "{} {:<16} {}",
            if check.ok { "ok  " } else { "FAIL" },
            check.name,
            check.detail
        );
        if let Some(fix) = &check.fix {
            out!("     {:<16} fix: {fix}", "");
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(fail(
            format!("{failed} check(s) failed"),
            "apply the fixes above, then run `intracom doctor` again",
        ));
    }
    out!("all {} checks passed", checks.len());
    Ok(())
}

/// Three services in one process on the memory medium.
async fn demo() -> Outcome {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Query {
        invoice: i64,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Invoice {
        invoice: i64,
        total: f64,
    }
    let medium = Arc::new(MemoryMedium::new(Default::default()));
    let catalog = |service: &str, instance: &str| {
        Config::builder()
            .service(service)
            .instance(instance)
            .sender("billing", ["reload", "user.deleted", "invoice.get"])
            .sender("users", ["user.deleted"])
            .sender("mailer", ["mail.send"])
            .build()
    };
    let billing = Intracom::with_medium(catalog("billing", "billing-1")?, medium.clone()).await?;
    let users = Intracom::with_medium(catalog("users", "users-1")?, medium.clone()).await?;
    let mailer_a = Intracom::with_medium(catalog("mailer", "mailer-a")?, medium.clone()).await?;
    let mailer_b = Intracom::with_medium(catalog("mailer", "mailer-b")?, medium.clone()).await?;
    let mut inbox_billing = billing
        .subscribe(Subscription::named("billing-inbox"))
        .await?;
    let mut inbox_users = users.subscribe(Subscription::named("users-inbox")).await?;
    let mut inbox_mailer = mailer_a
        .subscribe(Subscription::named("mailer-inbox"))
        .await?;

    out!(
        "intracom demo: services billing, users and mailer (two instances) on the memory medium\n"
    );
    out!("1. broadcast: billing tells every service to reload");
    billing
        .publish(Message::broadcast("reload").body(doc! { "tenant": 7 }))
        .await?;
    for (who, inbox) in [
        ("billing-1", &mut inbox_billing),
        ("users-1", &mut inbox_users),
        ("mailer-a", &mut inbox_mailer),
    ] {
        let d = inbox
            .next()
            .await
            .ok_or_else(|| fail("stream ended", "report this"))??;
        out!(
            "   {who:<10} got `{}` from {}: {}",
            d.action,
            d.source_service,
            d.query
        );
        d.ack().await?;
    }

    out!("\n2. targeted: users tells billing that a user was deleted; only billing gets it");
    users
        .publish(Message::to_service("billing", "user.deleted").body(doc! { "user": 12 }))
        .await?;
    let d = inbox_billing
        .next()
        .await
        .ok_or_else(|| fail("stream ended", "report this"))??;
    out!(
        "   billing-1  got `{}` from {} ({}): {}",
        d.action,
        d.source_service,
        d.kind.as_str(),
        d.query
    );
    d.ack().await?;

    out!("\n3. request/reply: users asks billing for invoice 42; one billing instance answers");
    let _server = billing.serve("billing", "invoice.get", |q: Query| async move {
        Ok::<_, String>(Invoice {
            invoice: q.invoice,
            total: 99.5,
        })
    })?;
    let invoice: Invoice = users
        .request("billing", "invoice.get", &Query { invoice: 42 })
        .timeout(Duration::from_secs(5))
        .await?;
    out!(
        "   users-1    got invoice {} for {:.2} (the outcome is also written into the request)",
        invoice.invoice,
        invoice.total
    );

    out!("\n4. work queue: three mails for mailer; each is sent by one instance; one fails once and is retried");
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<String>();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for mailer in [&mailer_a, &mailer_b] {
        let (tx, failed_once, me) = (
            done_tx.clone(),
            failed_once.clone(),
            mailer.instance().to_string(),
        );
        let options = WorkOptions::default()
            .backoff(Duration::from_millis(100))
            .poll(Duration::from_millis(50));
        workers.push(mailer.work("mailer", &["mail.send"], options, move |job: Message| {
            let (tx, failed_once, me) = (tx.clone(), failed_once.clone(), me.clone());
            async move {
                let to = job.query.get_str("to").unwrap_or("?").to_string();
                if to == "carol@example.com" && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    tx.send(format!("   {me:<10} could not reach the mail server for {to} (attempt {}): will retry", job.attempts)).ok();
                    return Err("mail server unreachable");
                }
                tx.send(format!("   {me:<10} sent mail to {to} (attempt {})", job.attempts)).ok();
                Ok(())
            }
        })?);
    }
    for to in ["alice@example.com", "bob@example.com", "carol@example.com"] {
        billing
            .publish(
                Message::to_service("mailer", "mail.send")
                    .work()
                    .body(doc! { "to": to }),
            )
            .await?;
    }
    let mut sent = 0;
    while sent < 3 {
        match tokio::time::timeout(Duration::from_secs(10), done.recv()).await {
            Ok(Some(line)) => {
                if line.contains("sent mail") {
                    sent += 1;
                }
                out!("{line}");
            }
            _ => return Err(fail("the work queue did not finish", "report this")),
        }
    }
    billing.shutdown().await;
    out!("\ndone: each message was delivered as promised. Next: `intracom --help`, and the README for MongoDB.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("mongodb://app:s3cret@db1:27017/?replicaSet=rs0"),
            "mongodb://app:***@db1:27017/?replicaSet=rs0"
        );
        assert_eq!(
            redact("mongodb://app:p@ss@db1,db2/x"),
            "mongodb://app:***@db1,db2/x"
        );
        assert_eq!(
            redact("mongodb://db1:27017/?a=b@c"),
            "mongodb://db1:27017/?a=b@c"
        );
        assert_eq!(redact("mongodb://localhost"), "mongodb://localhost");
    }

    #[test]
    fn since_reads_durations_times_and_positions() {
        let StartFrom::After(p) = parse_since("1795500000:3").ok().unwrap() else {
            panic!()
        };
        assert_eq!(
            p.ts,
            Timestamp {
                time: 1_795_500_000,
                increment: 3
            }
        );
        let StartFrom::After(p) = parse_since("2026-11-24T07:00:00Z").ok().unwrap() else {
            panic!()
        };
        assert_eq!(p.ts.time, 1_795_503_600 - 1);
        assert!(matches!(parse_since("10m"), Ok(StartFrom::After(_))));
        assert!(parse_since("yesterday-ish").is_err());
    }
}
