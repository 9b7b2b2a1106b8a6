//! `intracom demo`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use intracom::bson::doc;
use intracom::medium::memory::MemoryMedium;
use intracom::{Config, Intracom, Message, Subscription, WorkOptions};

use crate::output::{fail, Outcome};

/// Three services in one process on the memory medium.
pub(crate) async fn demo() -> Outcome {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Query {
        invoice: i64,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Invoice {
        invoice: i64,
        total: f64,
    }
    let medium = Arc::new(MemoryMedium::new(Default::default()));
    let catalog = |service: &str, instance: &str| {
        Config::builder()
            .service(service)
            .instance(instance)
            .sender("billing", ["reload", "user.deleted", "invoice.get"])
            .sender("users", ["user.deleted"])
            .sender("mailer", ["mail.send"])
            .build()
    };
    let billing = Intracom::with_medium(catalog("billing", "billing-1")?, medium.clone()).await?;
    let users = Intracom::with_medium(catalog("users", "users-1")?, medium.clone()).await?;
    let mailer_a = Intracom::with_medium(catalog("mailer", "mailer-a")?, medium.clone()).await?;
    let mailer_b = Intracom::with_medium(catalog("mailer", "mailer-b")?, medium.clone()).await?;
    let mut inbox_billing = billing
        .subscribe(Subscription::named("billing-inbox"))
        .await?;
    let mut inbox_users = users.subscribe(Subscription::named("users-inbox")).await?;
    let mut inbox_mailer = mailer_a
        .subscribe(Subscription::named("mailer-inbox"))
        .await?;

    out!(
        "intracom demo: services billing, users and mailer (two instances) on the memory medium\n"
    );
    out!("1. broadcast: billing tells every service to reload");
    billing
        .publish(Message::broadcast("reload").body(doc! { "tenant": 7 }))
        .await?;
    for (who, inbox) in [
        ("billing-1", &mut inbox_billing),
        ("users-1", &mut inbox_users),
        ("mailer-a", &mut inbox_mailer),
    ] {
        let d = inbox
            .next()
            .await
            .ok_or_else(|| fail("stream ended", "report this"))??;
        out!(
            "   {who:<10} got `{}` from {}: {}",
            d.action,
            d.source_service,
            d.query
        );
        d.ack().await?;
    }

    out!("\n2. targeted: users tells billing that a user was deleted; only billing gets it");
    users
        .publish(Message::to_service("billing", "user.deleted").body(doc! { "user": 12 }))
        .await?;
    let d = inbox_billing
        .next()
        .await
        .ok_or_else(|| fail("stream ended", "report this"))??;
    out!(
        "   billing-1  got `{}` from {} ({}): {}",
        d.action,
        d.source_service,
        d.kind.as_str(),
        d.query
    );
    d.ack().await?;

    out!("\n3. request/reply: users asks billing for invoice 42; one billing instance answers");
    let _server = billing.serve("billing", "invoice.get", |q: Query| async move {
        Ok::<_, String>(Invoice {
            invoice: q.invoice,
            total: 99.5,
        })
    })?;
    let invoice: Invoice = users
        .request("billing", "invoice.get", &Query { invoice: 42 })
        .timeout(Duration::from_secs(5))
        .await?;
    out!(
        "   users-1    got invoice {} for {:.2} (the outcome is also written into the request)",
        invoice.invoice,
        invoice.total
    );

    out!("\n4. work queue: three mails for mailer; each is sent by one instance; one fails once and is retried");
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<String>();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for mailer in [&mailer_a, &mailer_b] {
        let (tx, failed_once, me) = (
            done_tx.clone(),
            failed_once.clone(),
            mailer.instance().to_string(),
        );
        let options = WorkOptions::default()
            .backoff(Duration::from_millis(100))
            .poll(Duration::from_millis(50));
        workers.push(mailer.work("mailer", &["mail.send"], options, move |job: Message| {
            let (tx, failed_once, me) = (tx.clone(), failed_once.clone(), me.clone());
            async move {
                let to = job.query.get_str("to").unwrap_or("?").to_string();
                if to == "carol@example.com" && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    tx.send(format!("   {me:<10} could not reach the mail server for {to} (attempt {}): will retry", job.attempts)).ok();
                    return Err("mail server unreachable");
                }
                tx.send(format!("   {me:<10} sent mail to {to} (attempt {})", job.attempts)).ok();
                Ok(())
            }
        })?);
    }
    for to in ["alice@example.com", "bob@example.com", "carol@example.com"] {
        billing
            .publish(
                Message::to_service("mailer", "mail.send")
                    .work()
                    .body(doc! { "to": to }),
            )
            .await?;
    }
    let mut sent = 0;
    while sent < 3 {
        match tokio::time::timeout(Duration::from_secs(10), done.recv()).await {
            Ok(Some(line)) => {
                if line.contains("sent mail") {
                    sent += 1;
                }
                out!("{line}");
            }
            _ => return Err(fail("the work queue did not finish", "report this")),
        }
    }
    billing.shutdown().await;
    out!("\ndone: each message was delivered as promised. Next: `intracom --help`, and the README for MongoDB.");
    Ok(())
}
