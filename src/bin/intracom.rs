//! The `intracom` admin command.
//!
//! Reads the same configuration as the library (`INTRACOM_CONFIG`, a properties file,
//! the environment) so that an operator sees what a service would see.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use intracom::Config;

#[derive(Parser)]
#[command(
    name = "intracom",
    version,
    about = "Admin tool for the intracom message bus"
)]
struct Cli {
    /// Properties file to read (default: $INTRACOM_CONFIG, if set).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration and print it as the library resolves it.
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match &cli.config {
        Some(path) => Config::from_file(path),
        None => Config::from_env(),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            eprintln!(
                "hint: keys and defaults are listed in `cargo doc --open` under intracom::config"
            );
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Config => {
            println!("common.intracom.medium={}", config.medium);
            println!("common.intracom.timeout_ms={}", config.timeout_ms);
            println!("common.intracom.service={}", config.service);
            if let Some(instance) = &config.instance {
                println!("common.intracom.instance={instance}");
            }
            println!(
                "common.intracom.max_message_bytes={}",
                config.max_message_bytes
            );
            println!(
                "common.intracom.memory.max_messages={}",
                config.memory_max_messages
            );
            let db = &config.db;
            println!("common.intracom.db.uri={}", redact(&db.uri));
            println!("common.intracom.db.database={}", db.database);
            for (role, name) in [
                ("messages", &db.messages),
                ("config", &db.config),
                ("checkpoints", &db.checkpoints),
                ("processed", &db.processed),
                ("dead", &db.dead),
            ] {
                println!("common.intracom.db.collection.{role}={name}");
            }
            let retention = match db.retention {
                intracom::Retention::Capped => "capped",
                _ => "ttl",
            };
            println!("common.intracom.db.retention={retention}");
            println!("common.intracom.db.capped_bytes={}", db.capped_bytes);
            println!(
                "common.intracom.db.poll_interval_ms={}",
                db.poll_interval_ms
            );
            println!(
                "common.intracom.db.safety_window_ms={}",
                db.safety_window_ms
            );
            println!("common.intracom.db.stream_buffer={}", db.stream_buffer);
            let senders: Vec<&str> = config.senders.keys().map(String::as_str).collect();
            println!("common.intracom.senders.list={}", senders.join(","));
            for (service, actions) in &config.senders {
                println!("common.intracom.actions.{service}={}", actions.join(","));
            }
        }
    }
    ExitCode::SUCCESS
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

#[cfg(test)]
mod tests {
    use super::redact;

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
}
