//! Request/reply on the memory medium: `billing` serves `invoice.get`; `web` asks.
//! The second request fails in the handler, the third times out (nobody serves it).
//!
//! Run: `cargo run --example request_reply`

use std::sync::Arc;
use std::time::Duration;

use intracom::medium::memory::MemoryMedium;
use intracom::{Config, Error, Intracom};
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

fn config(service: &str) -> Result<Config, Error> {
    Config::builder()
        .service(service)
        .sender("web", Vec::<String>::new())
        .sender("billing", ["invoice.get", "invoice.void"])
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Two "processes" sharing one medium: the request goes through it and is claimed.
    let medium = Arc::new(MemoryMedium::new(Default::default()));
    let billing = Intracom::with_medium(config("billing")?, medium.clone()).await?;
    let web = Intracom::with_medium(config("web")?, medium).await?;

    let _server = billing.serve("billing", "invoice.get", |q: Query| async move {
        if q.invoice < 0 {
            return Err(format!("invoice {} does not exist", q.invoice));
        }
        Ok(Invoice {
            invoice: q.invoice,
            total: 12.5 * q.invoice as f64,
        })
    })?;

    let invoice: Invoice = web
        .request("billing", "invoice.get", &Query { invoice: 4 })
        .timeout(Duration::from_secs(2))
        .await?;
    println!("answer:  {invoice:?}");

    match web
        .request::<_, Invoice>("billing", "invoice.get", &Query { invoice: -1 })
        .await
    {
        Err(Error::Remote { message, .. }) => println!("refused: {message}"),
        other => println!("unexpected: {other:?}"),
    }

    match web
        .request::<_, Invoice>("billing", "invoice.void", &Query { invoice: 4 })
        .timeout(Duration::from_millis(300))
        .await
    {
        Err(error @ Error::Timeout { .. }) => println!("timeout: {error}"),
        other => println!("unexpected: {other:?}"),
    }
    billing.shutdown().await;
    web.shutdown().await;
    Ok(())
}
