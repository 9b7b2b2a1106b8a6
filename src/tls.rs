//! TLS for the clients intracom opens (MQTT, the HTTP medium, the external stores):
//! rustls with the ring provider, and the system's roots or a CA file.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The roots to trust: the certificates of the CA file named by `key`, or else (when
/// `system` says TLS will be used) the system's; `what` names the URL scheme in the
/// error when the system has none.
pub(crate) fn roots(
    key: &str,
    ca_file: Option<&Path>,
    system: bool,
    what: &str,
) -> Result<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::config(key, path.display().to_string(), e))?;
            for cert in certs {
                let cert = cert.map_err(|e| Error::config(key, path.display().to_string(), e))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::config(key, path.display().to_string(), e))?;
            }
        }
        None if system => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::config(
                    key,
                    "",
                    format!("no system CA certificates found for {what}: name a CA file"),
                ));
            }
        }
        None => {}
    }
    Ok(roots)
}

/// A client configuration trusting `roots`, with ring's provider; a failure names the
/// URL key and its value.
pub(crate) fn client_config(
    roots: rustls::RootCertStore,
    url_key: &str,
    url: impl Into<String>,
) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(url_key, url, e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
