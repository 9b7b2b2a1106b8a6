//! Two services on the memory medium (no server needed) exchanging a broadcast and a
//! targeted message.
//!
//! Run: `cargo run --example quickstart`

use futures::StreamExt;
use intracom::bson::doc;
use intracom::{Config, Delivery, Intracom, Message, Subscriber, Subscription};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();

    // The catalog: who may send, and which actions each service declares.
    let config = Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload", "invoice.created"])
        .sender("users", ["user.deleted"])
        .build()?;
    let billing = Intracom::connect(config).await?; // memory medium: the default
    let users = billing.as_service("users", Some("users-1"))?; // a second service, same process

    let mut billing_inbox = billing
        .subscribe(Subscription::named("billing-inbox"))
        .await?;
    let mut users_inbox = users.subscribe(Subscription::named("users-inbox")).await?;

    println!("== 1. billing broadcasts `reload` to every service");
    let sent = billing
        .publish(Message::broadcast("reload").body(doc! { "tenant": 7 }))
        .await?;
    let stamp = sent.ts.map(|ts| ts.to_string()).unwrap_or_default();
    println!("   published {} (stamp {stamp})", sent.id);
    receive(&mut billing_inbox, "billing-1").await?;
    receive(&mut users_inbox, "users-1").await?;

    println!("== 2. billing tells users that a user was deleted (targeted)");
    billing
        .publish(Message::to_service("users", "user.deleted").body(doc! { "user": 12 }))
        .await?;
    receive(&mut users_inbox, "users-1").await?;

    println!("== 3. an action users does not declare is refused, and nothing is written");
    match billing
        .publish(Message::to_service("users", "invoice.created"))
        .await
    {
        Err(error) => println!("   refused: {error}"),
        Ok(p) => println!("   unexpectedly published {}", p.id),
    }

    billing.shutdown().await;
    println!("== done: streams ended, bus shut down");
    Ok(())
}

async fn receive(inbox: &mut Subscriber, who: &str) -> Result<(), Box<dyn std::error::Error>> {
    let delivery: Delivery = inbox.next().await.ok_or("stream ended")??;
    println!(
        "   [{who}] {} `{}` from {}/{} to {}: {}",
        delivery.kind.as_str(),
        delivery.action,
        delivery.source_service,
        delivery.source_instance,
        delivery.dest_service.as_deref().unwrap_or("every service"),
        delivery.query,
    );
    delivery.ack().await?;
    Ok(())
}
