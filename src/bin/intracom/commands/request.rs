//! `intracom request`.

use clap::Args;
use intracom::bson::Bson;
use intracom::{Config, Error};

use super::{open, parse_body};
use crate::output::Outcome;

#[derive(Args)]
pub(crate) struct RequestArgs {
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

pub(crate) async fn request(config: &Config, args: RequestArgs) -> Outcome {
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
