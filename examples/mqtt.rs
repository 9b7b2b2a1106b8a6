//! Two services over an MQTT broker: `billing` serves `invoice.get` and broadcasts
//! `reload`; `web` asks for an invoice and follows `reload` with a named subscription
//! (a persistent session on the broker) that resumes where it stopped.
//!
//! Needs a local Mosquitto (Debian: `apt-get install mosquitto`), started with
//! `mosquitto -p 1883` (or the system service), then
//! `cargo run --features mqtt --example mqtt` (`INTRACOM_MQTT_URL` for another broker).

use futures::StreamExt;
use intracom::bson::doc;
use intracom::{Config, Intracom, Message, Subscription};

fn config(service: &str, url: &str) -> Result<Config, intracom::Error> {
    Config::builder()
        .mqtt(url)
        .service(service)
        .set("common.intracom.mqtt.topic_prefix", "intracom-example")
        .sender("billing", ["reload", "invoice.get"])
        .sender("web", Vec::<String>::new())
        .build()
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Query {
    invoice: i64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Invoice {
    invoice: i64,
    total: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let url = std::env::var("INTRACOM_MQTT_URL").unwrap_or_else(|_| "mqtt://localhost:1883".into());
    let billing = Intracom::connect(config("billing", &url)?).await?;
    let web = Intracom::connect(config("web", &url)?).await?;

    // Request/reply: a shared subscription hands each request to one billing worker; the
    // answer comes back on web's response topic.
    let _server = billing.serve("billing", "invoice.get", |q: Query| async move {
        Ok::<_, String>(Invoice {
            invoice: q.invoice,
            total: 12.5,
        })
    })?;
    let invoice: Invoice = web
        .request("billing", "invoice.get", &Query { invoice: 42 })
        .timeout(std::time::Duration::from_secs(5))
        .await?;
    println!("web asked billing for invoice 42: {invoice:?}");

    // Broadcasts to a named subscription: the broker keeps what web has not acked.
    let mut cache = web
        .subscribe(Subscription::named("web-cache").actions(["reload"]))
        .await?;
    for tenant in 1..=3 {
        billing
            .publish(Message::broadcast("reload").body(doc! { "tenant": tenant }))
            .await?;
    }
    for _ in 0..3 {
        let delivery = cache.next().await.ok_or("stream ended")??;
        println!(
            "web got `{}` for tenant {}",
            delivery.action,
            delivery.query.get_i32("tenant")?
        );
        delivery.ack().await?; // the PUBACK goes out now, not before
    }
    println!(
        "watch the topics with: mosquitto_sub -V mqttv5 -t 'intracom-example/#' -v (package mosquitto-clients)"
    );
    billing.shutdown().await;
    web.shutdown().await;
    Ok(())
}
