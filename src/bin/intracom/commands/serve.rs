//! `intracom serve`: the HTTP gateway.

use std::path::PathBuf;

use clap::Args;
use intracom::{Config, Intracom};

use crate::output::{fail, Outcome};

#[cfg(feature = "gateway")]
#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        default_value = "127.0.0.1:8080",
        env = "INTRACOM_GATEWAY_LISTEN"
    )]
    listen: std::net::SocketAddr,
    /// The tokens file: one `<sha-256 hex> <roles>` line per token (see `intracom token new`).
    #[arg(long, value_name = "FILE", env = "INTRACOM_GATEWAY_TOKENS")]
    tokens: PathBuf,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        env = "INTRACOM_GATEWAY_TLS_CERT"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        env = "INTRACOM_GATEWAY_TLS_KEY"
    )]
    tls_key: Option<PathBuf>,
    /// Events read ahead for one SSE client.
    #[arg(long, default_value_t = 256)]
    sse_buffer: usize,
    /// Bytes of events read ahead for one SSE client (an event larger than this goes
    /// alone).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    sse_buffer_bytes: usize,
    /// How long an SSE client may leave its buffer full before it is told it fell
    /// behind and its stream ends (it resumes with Last-Event-ID).
    #[arg(long, default_value = "30s")]
    sse_stall: humantime::Duration,
    /// SSE streams open at once, all tokens together; another one gets 503 `busy`.
    #[arg(long, default_value_t = 1000)]
    max_sse_clients: usize,
    /// Of --max-sse-clients, the streams only admin tokens may take.
    #[arg(long, default_value_t = 10)]
    sse_admin_reserve: usize,
    /// SSE streams one token may hold open; one more gets 429.
    #[arg(long, default_value_t = 100)]
    max_sse_per_token: usize,
    /// Bytes queued for all SSE clients together; past it, a stream holding more than
    /// its share is told `lagged` and closed.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    sse_budget_bytes: usize,
    /// Requests one token may have in progress (SSE streams aside); one more gets 429.
    #[arg(long, default_value_t = 256)]
    max_requests_per_token: usize,
    /// Keys that sign SSE event ids, one per line (at least 32 bytes each; the first
    /// signs, all verify). Give every gateway of a bus the same file, so clients resume
    /// on any of them and after a restart. Without it: a random key per start.
    #[arg(long, value_name = "FILE", env = "INTRACOM_GATEWAY_EVENT_KEYS")]
    event_key_file: Option<PathBuf>,
    /// Time to read a request's headers (and a new connection's first request).
    #[arg(long, default_value = "10s")]
    header_read_timeout: humantime::Duration,
    /// Time to read a request's body once its headers are in; 408 after.
    #[arg(long, default_value = "30s")]
    body_read_timeout: humantime::Duration,
    /// How long a connection may stay idle (no request in progress) before it is closed.
    #[arg(long, default_value = "60s")]
    idle_timeout: humantime::Duration,
    /// Connections open at once; over it, the connection idle the longest is closed
    /// (none idle: the new one is). Keep it under the open-files limit (`ulimit -n`).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once.
    #[arg(long, default_value_t = 64)]
    max_h2_streams: u32,
    /// JSON values a request body may hold, counted before it is parsed.
    #[arg(long, default_value_t = 262_144)]
    max_json_values: usize,
    /// How deep a request body's JSON may nest.
    #[arg(long, default_value_t = 64)]
    max_json_depth: usize,
}

#[cfg(feature = "gateway")]
pub(crate) async fn serve(mut config: Config, args: ServeArgs) -> Outcome {
    use intracom::gateway::{Gateway, GatewayOptions, Tls, Tokens};
    config.set(
        "common.intracom.instance",
        &format!("intracom-gateway-{}", std::process::id()),
    )?;
    let tokens = Tokens::from_file(&args.tokens)?;
    if tokens.is_empty() {
        eprintln!(
            "warning: {} holds no token: every API call will be refused (`intracom token new`)",
            args.tokens.display()
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls::new(cert, key)),
        _ => None,
    };
    let listener = std::net::TcpListener::bind(args.listen).map_err(|e| {
        fail(
            format!("cannot listen on {}: {e}", args.listen),
            "choose another address with --listen",
        )
    })?;
    // Before the bus connects: its publish counters are taken then.
    Gateway::install_metrics();
    let bus = Intracom::connect(config.clone()).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let address = listener
        .local_addr()
        .map_err(|e| fail(e.to_string(), "report this"))?;
    eprintln!(
        "intracom gateway on {scheme}://{address} (medium {}, {} token(s)); console at {scheme}://{address}/, API at {scheme}://{address}/openapi.json",
        config.medium,
        tokens.len()
    );
    let mut options = GatewayOptions::default()
        .sse_buffer(args.sse_buffer)
        .sse_buffer_bytes(args.sse_buffer_bytes)
        .sse_stall(args.sse_stall.into())
        .max_sse_clients(args.max_sse_clients)
        .sse_admin_reserve(args.sse_admin_reserve)
        .max_sse_per_token(args.max_sse_per_token)
        .sse_budget_bytes(args.sse_budget_bytes)
        .max_requests_per_token(args.max_requests_per_token)
        .header_read_timeout(args.header_read_timeout.into())
        .body_read_timeout(args.body_read_timeout.into())
        .idle_timeout(args.idle_timeout.into())
        .max_connections(args.max_connections)
        .max_h2_streams(args.max_h2_streams)
        .max_json_values(args.max_json_values)
        .max_json_depth(args.max_json_depth);
    if let Some(file) = &args.event_key_file {
        options = options.event_keys(intracom::gateway::EventKeys::from_file(file)?);
    }
    let served = Gateway::new(bus.clone(), tokens)
        .options(options)
        .serve(listener, tls, stop_signal())
        .await;
    bus.shutdown().await;
    served?;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
#[cfg(feature = "gateway")]
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
