//! A work queue with retries on the memory medium: two workers share the jobs, a flaky
//! job succeeds on its third attempt, a broken one ends in the dead letters.
//!
//! Run: `cargo run --example work_queue`

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use intracom::bson::doc;
use intracom::{Config, Intracom, Message, WorkOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::builder()
        .service("billing")
        .sender("billing", ["invoice.render"])
        .set("common.intracom.work.invoice.render.max_attempts", "3")
        .build()?;
    let bus = Intracom::connect(config).await?;
    // Queued before any worker runs: claimed by priority, then age.
    for (invoice, priority) in [(1, 0), (7, 0), (13, 0), (2, 9)] {
        bus.publish(
            Message::to_service("billing", "invoice.render")
                .work()
                .priority(priority)
                .body(doc! { "invoice": invoice }),
        )
        .await?;
    }
    let flaky_attempts = Arc::new(AtomicU32::new(0));
    let options = WorkOptions::default()
        .backoff(Duration::from_millis(50))
        .poll(Duration::from_millis(20));
    let mut workers = Vec::new();
    for name in ["worker-a", "worker-b"] {
        let handle = bus.as_service("billing", Some(name))?;
        let flaky_attempts = flaky_attempts.clone();
        workers.push(handle.work(
            "billing",
            &["invoice.render"],
            options.clone(),
            move |job: Message| {
                let flaky_attempts = flaky_attempts.clone();
                async move {
                    let invoice = job.query.get_i32("invoice").unwrap_or(0);
                    match invoice {
                        13 => Err(format!("invoice {invoice}: template missing")),
                        7 if flaky_attempts.fetch_add(1, Ordering::SeqCst) < 2 => {
                            Err(format!("invoice {invoice}: printer busy"))
                        }
                        _ => {
                            println!(
                                "{name} rendered invoice {invoice} (attempt {})",
                                job.attempts
                            );
                            Ok(())
                        }
                    }
                }
            },
        )?);
    }
    let dead = bus.dead_letters();
    for _ in 0..200 {
        if !dead.list(10).await?.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for letter in dead.list(10).await? {
        println!("dead letter {}: {}", letter.id, letter.reason);
    }
    bus.shutdown().await;
    Ok(())
}
