//! Two services over MongoDB: `billing` broadcasts, `users` follows with a named
//! subscription that resumes where it stopped.
//!
//! Needs a replica set: `docker compose up -d --wait mongodb`, then
//! `COMMON_INTRACOM_DB_URI='mongodb://localhost:27017/?directConnection=true' cargo run --example mongodb`
//! (the environment name of the `common.intracom.db.uri` key, which the library's
//! `Config::from_env` reads too; this URI is the default).

use futures::StreamExt;
use intracom::bson::doc;
use intracom::{Config, Intracom, Message, Subscription};

fn config(service: &str, uri: &str) -> Result<Config, intracom::Error> {
    Config::builder()
        .mongodb(uri, "intracom_example")
        .service(service)
        .sender("billing", ["reload"])
        .sender("users", Vec::<String>::new())
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let uri = std::env::var("COMMON_INTRACOM_DB_URI")
        .unwrap_or_else(|_| "mongodb://localhost:27017/?directConnection=true".into());
    let billing = Intracom::connect(config("billing", &uri)?).await?;
    let users = Intracom::connect(config("users", &uri)?).await?;

    let mut cache = users
        .subscribe(Subscription::named("users-cache").actions(["reload"]))
        .await?;
    for tenant in 1..=3 {
        billing
            .publish(Message::broadcast("reload").body(doc! { "tenant": tenant }))
            .await?;
    }
    for _ in 0..3 {
        let delivery = cache.next().await.ok_or("stream ended")??;
        println!(
            "users got `{}` for tenant {} (ts {:?})",
            delivery.action,
            delivery.query.get_i32("tenant")?,
            delivery.ts
        );
        delivery.ack().await?; // the checkpoint moves: a restart resumes after this one
    }
    println!(
        "see them in mongosh: use intracom_example; db.messages.find().sort({{ts: -1}}).limit(3)"
    );
    billing.shutdown().await;
    users.shutdown().await;
    Ok(())
}
