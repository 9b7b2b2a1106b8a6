//! `intracom dead`.

use clap::Subcommand;
use intracom::bson::Bson;
use intracom::Config;

use super::open;
use crate::output::{fail, Outcome};

#[derive(Subcommand)]
pub(crate) enum DeadCommand {
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

pub(crate) async fn dead(config: &Config, command: DeadCommand) -> Outcome {
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
