//! `intracom publish`.

use std::time::Duration;

use clap::Args;
use intracom::{Config, Message, PublishStatus};

use super::{open, parse_body};
use crate::output::{fail, Outcome};

#[derive(Args)]
pub(crate) struct PublishArgs {
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

pub(crate) async fn publish(config: &Config, args: PublishArgs) -> Outcome {
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
