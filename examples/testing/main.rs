//! Testing your own service: `service.rs` is a tiny `billing` service, `tests.rs` its
//! tests — unit tests on the memory medium (no server) and integration tests against
//! MongoDB (the repository's `docker-compose.yml` replica set), each in a database of
//! its own, dropped at the end, every wait bounded.
//!
//! ```text
//! cargo test --example testing                  # the integration tests say they skipped
//! docker compose up -d --wait mongodb
//! COMMON_INTRACOM_DB_URI='mongodb://localhost:27017/?directConnection=true' \
//!   cargo test --example testing                # all of them
//! cargo run --example testing                   # the service once, on the memory medium
//! ```
//!
//! In a service of your own, the same tests live in `tests/` and the service in your
//! crate; the guide's "Testing your service" chapter walks through them.

mod service;
#[cfg(test)]
mod tests;

use intracom::bson::doc;
use intracom::{Config, Intracom, Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = service::catalog(Config::builder().service("billing")).build()?;
    let bus = Intracom::connect(config).await?;
    let quotes = service::serve_quotes(&bus)?;
    let shop = bus.as_service("shop", None)?;
    let price: service::Price = shop
        .request("billing", "price.quote", &service::Quote { items: 4 })
        .await?;
    println!("4 items: {} cents", price.cents);

    let (tx, mut charged) = tokio::sync::mpsc::unbounded_channel();
    let orders = service::orders(&bus).await?;
    let follower = tokio::spawn(service::follow_orders(bus.clone(), orders, tx));
    for _ in 0..2 {
        shop.publish(Message::broadcast("order.placed").body(doc! { "order": 7i64 }))
            .await?;
    }
    for _ in 0..2 {
        match charged.recv().await {
            Some((cents, true)) => println!("order 7: charged {cents} cents"),
            Some((_, false)) => println!("order 7 again: already charged"),
            None => break,
        }
    }
    quotes.stop().await;
    bus.shutdown().await;
    follower.await??;
    Ok(())
}
