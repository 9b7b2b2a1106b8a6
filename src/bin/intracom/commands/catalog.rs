//! `intracom catalog`.

use clap::Subcommand;
use intracom::Config;

use super::{open, JsonFlag};
use crate::output::Outcome;

#[derive(Subcommand)]
pub(crate) enum CatalogCommand {
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

pub(crate) async fn catalog(config: &Config, command: CatalogCommand) -> Outcome {
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
