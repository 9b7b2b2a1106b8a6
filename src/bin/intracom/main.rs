//! The `intracom` admin command.
//!
//! Reads the same configuration as the library (`INTRACOM_CONFIG` or `--config`, the
//! environment) so that an operator sees what a service would see; `--uri` points it at
//! a MongoDB deployment, `--medium mqtt --url mqtt://…` at an MQTT broker. Errors are one
//! line and a hint, with exit code 1 (2 for a command line clap cannot parse).
//!
//! Cargo's layout: this file holds the root of the command line and the dispatch; each
//! command family has its file under `commands/`, its clap arguments beside its code;
//! `output.rs` holds what they share for writing output and failures with hints.

#[macro_use]
mod output;
mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

#[cfg(not(feature = "gateway"))]
use clap::Args;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use intracom::Config;

#[cfg(feature = "gateway")]
use commands::serve::ServeArgs;
#[cfg(feature = "gateway")]
use commands::token::TokenCommand;
use commands::{
    bench, catalog::CatalogCommand, dead::DeadCommand, publish::PublishArgs, request::RequestArgs,
    tail::TailArgs, JsonFlag,
};
#[cfg(not(feature = "gateway"))]
use output::fail;
use output::{Failure, Outcome};

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

async fn run(cli: Cli) -> Outcome {
    let config = load_config(&cli)?;
    match cli.command {
        Command::Config => commands::config::print_config(&config),
        Command::Demo => commands::demo::demo().await,
        Command::Tail(args) => commands::tail::tail(&config, args).await,
        Command::Publish(args) => commands::publish::publish(&config, args).await,
        Command::Request(args) => commands::request::request(&config, args).await,
        Command::Catalog(command) => commands::catalog::catalog(&config, command).await,
        Command::Stats(flag) => commands::stats::stats(&config, flag.json).await,
        Command::Dead(command) => commands::dead::dead(&config, command).await,
        Command::Doctor => commands::doctor::doctor(&config).await,
        Command::Bench(args) => bench::bench(&config, cli.config.as_deref(), *args).await,
        #[cfg(feature = "gateway")]
        Command::Serve(args) => commands::serve::serve(config, args).await,
        #[cfg(feature = "gateway")]
        Command::Token(command) => commands::token::token(command),
        #[cfg(not(feature = "gateway"))]
        Command::Serve(_) | Command::Token(_) => Err(fail(
            "this intracom was built without the HTTP gateway (`serve`, `token`)",
            "cargo install intracom --features gateway (or cargo run --features gateway -- serve …)",
        )),
    }
}
