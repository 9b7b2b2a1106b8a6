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
            let senders: Vec<&str> = config.senders.keys().map(String::as_str).collect();
            println!("common.intracom.senders.list={}", senders.join(","));
            for (service, actions) in &config.senders {
                println!("common.intracom.actions.{service}={}", actions.join(","));
            }
        }
    }
    ExitCode::SUCCESS
}
