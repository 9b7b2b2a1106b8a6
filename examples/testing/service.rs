//! The service under test: `billing` quotes prices (a request handler) and charges each
//! order once (an event handler). Nothing here knows which medium it runs on: the
//! tests give it a bus on the memory medium or on MongoDB.

use futures::StreamExt;
use intracom::idempotency::Once;
use intracom::{Intracom, Message, Subscriber, Subscription, Worker};
use serde::{Deserialize, Serialize};

/// What the shop asks for.
#[derive(Debug, Serialize, Deserialize)]
pub struct Quote {
    /// How many items.
    pub items: u32,
}

/// What billing answers.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Price {
    /// The price in cents.
    pub cents: u64,
}

/// The catalog this service and its tests need: billing's actions and the shop's event.
pub fn catalog(builder: intracom::ConfigBuilder) -> intracom::ConfigBuilder {
    builder
        .sender("billing", ["price.quote"])
        .sender("shop", ["order.placed"])
}

/// The pricing rule.
pub fn price(quote: &Quote) -> Result<Price, String> {
    if quote.items == 0 {
        return Err("a quote needs at least one item".into());
    }
    Ok(Price {
        cents: u64::from(quote.items) * 250,
    })
}

/// Answers `price.quote` requests until the worker is stopped.
pub fn serve_quotes(bus: &Intracom) -> intracom::Result<Worker> {
    bus.serve("billing", "price.quote", |quote: Quote| async move {
        price(&quote)
    })
}

/// Charges one order, once per order number whatever the redeliveries: the charge
/// recorded for it (cents), and whether it ran now.
pub async fn charge(bus: &Intracom, order: &Message) -> intracom::Result<(i64, bool)> {
    let number = order.query.get_i64("order").unwrap_or(0);
    let outcome = bus
        .idempotent("billing-ledger")
        .run_once(&format!("order-{number}"), || async move {
            Ok::<_, intracom::Error>(number * 100)
        })
        .await?;
    Ok(match outcome {
        Once::Ran(cents) => (cents, true),
        Once::AlreadyDone(result) => (
            result.and_then(|r| r.get_i64("value").ok()).unwrap_or(0),
            false,
        ),
    })
}

/// The subscription to `order.placed`: named `billing-orders`, so that a restart resumes
/// after the last order acked. Messages published after this returns are delivered.
pub async fn orders(bus: &Intracom) -> intracom::Result<Subscriber> {
    bus.subscribe(Subscription::named("billing-orders").actions(["order.placed"]))
        .await
}

/// Charges each order of `orders` once and acks it after; sends what it charged
/// (cents, ran now) to `charged`. Ends when the bus shuts down.
pub async fn follow_orders(
    bus: Intracom,
    mut orders: Subscriber,
    charged: tokio::sync::mpsc::UnboundedSender<(i64, bool)>,
) -> intracom::Result<()> {
    while let Some(item) = orders.next().await {
        let delivery = match item {
            Ok(delivery) => delivery,
            Err(error) if error.is_report() => continue,
            Err(error) => return Err(error),
        };
        let (cents, now) = charge(&bus, delivery.message()).await?;
        delivery.ack().await?;
        charged.send((cents, now)).ok();
    }
    Ok(())
}
