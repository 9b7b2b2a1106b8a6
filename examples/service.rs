//! A long-running service, `billing`, as it would be deployed: configured by a
//! properties file, it registers its actions in the catalog, follows `order.placed`
//! with a named subscription that acks (and charges each order once, whatever the
//! redeliveries), answers `price.quote` requests, renders invoices as work with the
//! lease and back-off of its action from the configuration, keeps its outbox in a
//! file, and stops cleanly on SIGTERM or Ctrl-C.
//!
//! The same code runs on the memory medium and on MongoDB; only the configuration
//! changes:
//!
//! ```text
//! cargo run --example service
//! COMMON_INTRACOM_MEDIUM=db \
//!   COMMON_INTRACOM_DB_URI='mongodb://localhost:27017/?directConnection=true' \
//!   cargo run --example service
//! ```
//!
//! A demo client in the same process (`shop`) places an order every two seconds (each
//! one twice, as a client that retries would), asks for a quote and queues an invoice,
//! so that the service has something to do; `--no-demo` leaves it out.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use intracom::bson::doc;
use intracom::idempotency::Once;
use intracom::{Config, Intracom, Message, Subscription, WorkOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The actions this service answers; registered in the catalog at start.
const ACTIONS: [&str; 2] = ["price.quote", "invoice.render"];

#[derive(Serialize, Deserialize)]
struct Quote {
    items: u32,
}

#[derive(Serialize, Deserialize, Debug)]
struct Price {
    cents: u64,
}

/// The configuration: `INTRACOM_CONFIG` if set, else `examples/service.properties`;
/// the environment overrides either.
fn config() -> Result<Config, intracom::Error> {
    if std::env::var_os("INTRACOM_CONFIG").is_some() {
        Config::from_env()
    } else {
        let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/service.properties");
        Config::from_file(file)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let demo = !std::env::args().any(|a| a == "--no-demo");
    let config = config()?;
    if let Some(dir) = config.outbox_file.as_ref().and_then(|f| f.parent()) {
        std::fs::create_dir_all(dir)?;
    }
    let bus = Intracom::connect(config).await?;
    bus.catalog().register(bus.service(), ACTIONS).await?;
    println!(
        "billing started on the {} medium as instance {}",
        bus.medium().name(),
        bus.instance()
    );

    // Requests: exactly one instance answers each.
    let quotes = bus.serve("billing", "price.quote", |q: Quote| async move {
        Ok::<_, String>(Price {
            cents: u64::from(q.items) * 250,
        })
    })?;

    // Work: lease, back-off and attempts come from `common.intracom.work.invoice.render.*`
    // (the configuration wins over these defaults). The first attempt of each invoice
    // fails, to show the retry after the back-off.
    let invoices = bus.work(
        "billing",
        &["invoice.render"],
        WorkOptions::default().poll(Duration::from_millis(200)),
        |job: Message| async move {
            let invoice = job.query.get_i64("invoice").unwrap_or(0);
            if job.attempts < 2 {
                println!(
                    "invoice {invoice}: attempt {} failed, retried after the back-off",
                    job.attempts
                );
                return Err("printer warming up".to_string());
            }
            println!("invoice {invoice}: rendered on attempt {}", job.attempts);
            Ok(())
        },
    )?;

    // Events: a named subscription resumes after the last acked order on restart. Each
    // order is charged once (by order number, across redeliveries and instances); the
    // ack comes after the charge is recorded.
    let orders = bus
        .subscribe(Subscription::named("billing-orders").actions(["order.placed"]))
        .await?;
    let ledger = bus.idempotent("billing-ledger");
    let follower = tokio::spawn(async move {
        let mut orders = orders;
        while let Some(item) = orders.next().await {
            let delivery = match item {
                Ok(delivery) => delivery,
                // A loss report (messages expired before they were read): logged by
                // the bus, nothing to ack.
                Err(error) if error.is_report() => continue,
                Err(error) => return Err(error),
            };
            let order = delivery.query.get_i64("order").unwrap_or(0);
            let charged = ledger
                .run_once(&format!("order-{order}"), || async move {
                    Ok::<_, intracom::Error>(doc! { "charged": order * 100 })
                })
                .await?;
            match charged {
                Once::Ran(_) => println!("order {order}: charged"),
                Once::AlreadyDone(_) => println!("order {order}: already charged, skipped"),
            }
            delivery.ack().await?;
        }
        Ok(())
    });

    let stop = CancellationToken::new();
    let client = demo.then(|| tokio::spawn(shop(bus.clone(), stop.clone())));

    let signal = shutdown_signal().await;
    println!("{signal}: stopping");
    stop.cancel();
    if let Some(client) = client {
        client.await?;
    }
    // Workers finish the item in hand (and settle it) before they stop.
    invoices.stop().await;
    quotes.stop().await;
    let waiting = bus.outbox_len();
    bus.shutdown().await; // ends the subscription's stream
    follower.await??;
    println!("stopped ({waiting} message(s) left in the outbox file for the next start)");
    Ok(())
}

/// The demo client: an order (announced twice), a quote and an invoice every two seconds.
async fn shop(bus: Intracom, stop: CancellationToken) {
    let shop = match bus.as_service("shop", None) {
        Ok(shop) => shop,
        Err(error) => return eprintln!("shop: {error}"),
    };
    let mut order: i64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        order += 1;
        for _ in 0..2 {
            let placed = Message::broadcast("order.placed").body(doc! { "order": order });
            if let Err(error) = shop.publish(placed).await {
                eprintln!("shop: order {order} not placed: {error}");
            }
        }
        let quote: Result<Price, _> = shop
            .request("billing", "price.quote", &Quote { items: 3 })
            .await;
        match quote {
            Ok(price) => println!("shop: 3 items cost {} cents", price.cents),
            Err(error) => eprintln!("shop: no quote: {error}"),
        }
        let job = Message::to_service("billing", "invoice.render")
            .work()
            .body(doc! { "invoice": order });
        if let Err(error) = shop.publish(job).await {
            eprintln!("shop: invoice {order} not queued: {error}");
        }
    }
}

/// Waits for SIGTERM (what `docker stop`, systemd and Kubernetes send) or Ctrl-C.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return "Ctrl-C";
                }
            };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
