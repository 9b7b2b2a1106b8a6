//! The HTTP gateway in one process on the memory medium, with a `billing` service that
//! answers `invoice.get`: what the Node.js example (`examples/node/`) and the web
//! console talk to.
//!
//! ```sh
//! cargo run --features gateway --example gateway      # prints two tokens, serves on :8080
//! INTRACOM_TOKEN=<billing token> node examples/node/example.mjs
//! # and open http://127.0.0.1:8080/ with the admin token
//! ```
//!
//! `INTRACOM_GATEWAY_LISTEN` changes the address. Ctrl-C stops it.

use intracom::bson::{doc, Bson, Document};
use intracom::gateway::{Gateway, Identity, Tokens};
use intracom::{Config, Intracom};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::builder()
        .service("gateway")
        .sender("billing", ["reload", "invoice.get"])
        .sender("users", ["user.deleted"])
        .build()?;
    let bus = Intracom::connect(config).await?;

    // billing answers invoice.get (in this process here; any process on the same medium
    // would do).
    let billing = bus.as_service("billing", None)?;
    let _worker = billing.serve("billing", "invoice.get", |q: Document| async move {
        let invoice = q.get("invoice").cloned().unwrap_or(Bson::Null);
        Ok::<_, String>(doc! { "invoice": invoice, "total": 99.5 })
    })?;

    let (service_token, admin_token) = (Tokens::generate()?, Tokens::generate()?);
    let tokens = Tokens::new()
        .with_token(&service_token, Identity::service("billing"))
        .with_token(&admin_token, Identity::admin());
    let address =
        std::env::var("INTRACOM_GATEWAY_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let listener = std::net::TcpListener::bind(&address)?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("gateway on {base} (memory medium)");
    println!("billing token: {service_token}");
    println!("admin token:   {admin_token}");
    println!(
        "try: INTRACOM_URL={base} INTRACOM_TOKEN={service_token} node examples/node/example.mjs"
    );
    println!("console: {base}/ (paste the admin token)");

    Gateway::new(bus.clone(), tokens)
        .serve(listener, None, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    bus.shutdown().await;
    Ok(())
}
