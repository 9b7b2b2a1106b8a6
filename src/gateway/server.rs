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
            .map_err(|e| bad("--tls-cert", &self.cert, e.to_string()))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad("--tls-cert", &self.cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad(
                "--tls-cert",
                &self.cert,
                "no certificate in the file".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| bad("--tls-key", &self.key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("--tls-cert", &self.cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                bad(
                    "--tls-key",
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

pub(crate) async fn serve(
    app: Router,
    stop: CancellationToken,
    listener: std::net::TcpListener,
    tls: Option<Tls>,
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
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("gateway stopping");
        stop.cancel();
        stopper.graceful_shutdown(Some(GRACE));
    });
    let service = app.into_make_service();
    let served = match config {
        Some(config) => {
            tracing::info!(%address, "gateway listening (https)");
            axum_server::from_tcp_rustls(listener, config)
                .map_err(|e| Error::io(format!("gateway: listening on {address}"), e))?
                .handle(handle)
                .serve(service)
                .await
        }
        None => {
            tracing::info!(%address, "gateway listening (http)");
            axum_server::from_tcp(listener)
                .map_err(|e| Error::io(format!("gateway: listening on {address}"), e))?
                .handle(handle)
                .serve(service)
                .await
        }
    };
    served.map_err(|e| Error::io(format!("gateway: serving on {address}"), e))
}
