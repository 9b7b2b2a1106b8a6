//! One module per command family; what several of them share.
//!
//! The library computes, the command prints: what a service could use too lives in the
//! library (the health checks of `doctor` in `MongoMedium::doctor`, the resolved
//! configuration of `config` in `Config::to_properties`, the masked URI in
//! `DbConfig::redacted_uri`); a file here reads arguments, calls the library and writes
//! the output. `demo` stays here: it is a scripted user of the public API, as the
//! crate's examples are.

pub(crate) mod bench;
pub(crate) mod catalog;
pub(crate) mod config;
pub(crate) mod dead;
pub(crate) mod demo;
pub(crate) mod doctor;
pub(crate) mod publish;
pub(crate) mod request;
#[cfg(feature = "gateway")]
pub(crate) mod serve;
pub(crate) mod stats;
pub(crate) mod tail;
#[cfg(feature = "gateway")]
pub(crate) mod token;

use clap::Args;
use intracom::bson::{Bson, Document};
use intracom::{Config, Intracom, MediumKind};

use crate::output::{fail, Failure};

#[derive(Args)]
pub(crate) struct JsonFlag {
    /// Print JSON (one document per line) for scripts.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The bus on a shared medium. What only some media can tell (stats, doctor), a
/// command asks the bus's medium for: `bus.medium().inspection()`, `.diagnosis()`,
/// `.broker_report()`.
pub(crate) async fn open(config: &Config, what: &str) -> Result<Intracom, Failure> {
    match config.medium {
        MediumKind::Memory => Err(fail(
            format!("`{what}` needs a shared medium; common.intracom.medium is `{}`", config.medium),
            "the memory medium lives inside one process: pass --uri mongodb://… or --medium mqtt --url mqtt://…, or try `intracom demo`",
        )),
        #[cfg(not(feature = "mqtt"))]
        MediumKind::Mqtt => Err(fail(
            "this intracom was built without the MQTT medium",
            "cargo install intracom --features mqtt (or cargo run --features mqtt -- …)",
        )),
        _ => {
            let medium = intracom::medium::connect(config).await?;
            Ok(Intracom::with_medium(config.clone(), medium).await?)
        }
    }
}

pub(crate) fn parse_body(body: &str) -> Result<Document, Failure> {
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
