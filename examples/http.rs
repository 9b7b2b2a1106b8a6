//! The HTTP route: services whose medium is a remote intracom gateway
//! (`common.intracom.medium=http`). Here the gateway runs in the same process, on the
//! memory medium, so nothing else is needed; in a deployment it is `intracom serve` in
//! front of MongoDB (or memory, or MQTT), and the services only know its URL(s) and
//! their token.
//!
//! ```sh
//! cargo run --features gateway,http --example http
//! ```
//!
//! `billing` (its own token) answers `invoice.get` and keeps a named subscription;
//! `web` (another token) publishes, and asks `billing` for an invoice. Every call goes
//! through the gateway's `/medium/...` routes.

use std::time::Duration;

use futures::StreamExt;
use intracom::gateway::{Gateway, Identity, Tokens};
use intracom::{Config, Error, Intracom, Message, Subscription};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Query {
    invoice: i64,
}

#[derive(Serialize, Deserialize, Debug)]
struct Invoice {
    invoice: i64,
    total: f64,
}

/// The catalog every process of this bus shares.
fn catalog(service: &str) -> intracom::ConfigBuilder {
    Config::builder()
        .service(service)
        .sender("web", ["cart.checked_out"])
        .sender("billing", ["invoice.get"])
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The gateway: a bus on the memory medium, served on a free port.
    let gateway_bus = Intracom::connect(catalog("gateway").build()?).await?;
    let (billing_token, web_token) = (Tokens::generate()?, Tokens::generate()?);
    let tokens = Tokens::new()
        .with_token(&billing_token, Identity::service("billing"))
        .with_token(&web_token, Identity::service("web"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway =
        tokio::spawn(
            Gateway::new(gateway_bus.clone(), tokens).serve(listener, None, async {
                let _ = stopped.await;
            }),
        );
    println!("gateway on {url} (memory medium)");

    // Two services on the HTTP medium: the configuration names the gateway and a token
    // (common.intracom.medium=http, common.intracom.http.url, common.intracom.http.token).
    let billing = Intracom::connect(catalog("billing").http(&url, &billing_token).build()?).await?;
    let web = Intracom::connect(catalog("web").http(&url, &web_token).build()?).await?;
    println!(
        "capabilities over HTTP: {:?}",
        billing.medium().capabilities()
    );

    let _server = billing.serve("billing", "invoice.get", |q: Query| async move {
        Ok::<_, String>(Invoice {
            invoice: q.invoice,
            total: 12.5 * q.invoice as f64,
        })
    })?;
    let mut inbox = billing
        .subscribe(Subscription::named("checkouts").actions(["cart.checked_out"]))
        .await?;

    let published = web.publish(Message::broadcast("cart.checked_out")).await?;
    println!("web published {} ({:?})", published.id, published.status);
    let delivery = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await?
        .ok_or("the subscription ended")??;
    println!(
        "billing received {} from {}",
        delivery.id, delivery.source_service
    );
    delivery.ack().await?;

    let invoice: Invoice = web
        .request("billing", "invoice.get", &Query { invoice: 4 })
        .timeout(Duration::from_secs(10))
        .await?;
    println!("web asked billing: {invoice:?}");

    // A service token acts as its service only: web may not claim billing's work.
    match web
        .medium()
        .work()
        .ok_or("no work queue")?
        .claim(&intracom::medium::ClaimRequest::new(
            "billing",
            vec!["invoice.get".into()],
            "web/x",
            Duration::from_secs(1),
        ))
        .await
    {
        Err(Error::Medium { reason, .. }) => println!("web claiming billing's work: {reason}"),
        other => println!("unexpected: {other:?}"),
    }

    billing.shutdown().await;
    web.shutdown().await;
    let _ = stop.send(());
    gateway.await??;
    gateway_bus.shutdown().await;
    Ok(())
}
