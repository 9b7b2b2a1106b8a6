//! Listening: plain HTTP or HTTPS (rustls, from certificate and key files), and a
//! graceful stop.
//!
//! Why it exists: the channels must be able to use TLS. `axum-server` accepts TLS
//! connections with rustls in front of the same router; the crypto provider is `ring`,
//! chosen explicitly so that the process's other TLS users (the MongoDB driver) cannot
//! make the choice ambiguous.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use super::connections::{Tracker, TrackingAcceptor};

use crate::error::{Error, Result};

/// The certificate chain and private key of an HTTPS gateway, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tls {
    /// The certificate chain (leaf first), PEM.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key: PathBuf,
}

impl Tls {
    /// TLS from a certificate chain file and a key file.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Tls {
            cert: cert.into(),
            key: key.into(),
        }
    }

    fn config(&self) -> Result<RustlsConfig> {
        let bad = |what: &str, path: &PathBuf, reason: String| {
            Error::config(what, path.display().to_string(), reason)
        };
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| bad("Tls::cert", &self.cert, e.to_string()))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad("Tls::cert", &self.cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad(
                "Tls::cert",
                &self.cert,
                "no certificate in the file".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| bad("Tls::key", &self.key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("Tls::cert", &self.cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                bad(
                    "Tls::key",
                    &self.key,
                    format!("does not go with the certificate: {e}"),
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(RustlsConfig::from_config(Arc::new(config)))
    }
}

/// How long open connections get to finish once the gateway stops.
const GRACE: Duration = Duration::from_secs(10);

/// How the gateway holds its connections (from [`super::GatewayOptions`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_h2_streams: u32,
}

pub(crate) async fn serve(
    app: Router,
    stop: CancellationToken,
    tracker: Arc<Tracker>,
    listener: std::net::TcpListener,
    tls: Option<Tls>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let config = tls.as_ref().map(Tls::config).transpose()?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("gateway: listening", e))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("gateway: listening", e))?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    let reaper_stop = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("gateway stopping");
        stop.cancel();
        stopper.graceful_shutdown(Some(GRACE));
    });
    tokio::spawn(Arc::clone(&tracker).reap(reaper_stop));
    let acceptor = TrackingAcceptor { tracker };
    let service = app.into_make_service();
    let served = match config {
        Some(config) => {
            tracing::info!(%address, "gateway listening (https)");
            let mut server = axum_server::from_tcp_rustls(listener, config)
                .map_err(|e| Error::io(format!("gateway: listening on {address}"), e))?
                .map(|tls| tls.acceptor(acceptor));
            configure(server.http_builder(), &limits);
            server
                .first_request_timeout(limits.header_read_timeout)
                .accept_error_handler(refused)
                .handle(handle)
                .serve(service)
                .await
        }
        None => {
            tracing::info!(%address, "gateway listening (http)");
            let mut server = axum_server::from_tcp(listener)
                .map_err(|e| Error::io(format!("gateway: listening on {address}"), e))?
                .acceptor(acceptor);
            configure(server.http_builder(), &limits);
            server
                .first_request_timeout(limits.header_read_timeout)
                .accept_error_handler(refused)
                .handle(handle)
                .serve(service)
                .await
        }
    };
    served.map_err(|e| Error::io(format!("gateway: serving on {address}"), e))
}

/// hyper's limits: the time to read a request's headers (HTTP/1; hyper's default is
/// 30 s) and the streams one HTTP/2 connection may open at once (its default, 200).
fn configure(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    limits: &Limits,
) {
    builder
        .http1()
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .max_concurrent_streams(limits.max_h2_streams);
}

/// A connection that could not be taken (refused at the cap, or a failed TLS
/// handshake): logged at debug, counted by the tracker.
fn refused<A: std::fmt::Debug>(peer: Option<&A>, error: &std::io::Error) {
    tracing::debug!(?peer, %error, "gateway: connection not taken");
}
