//! The client's TLS: whom it trusts, and what it says when it cannot trust a server.
//!
//! By default the public roots that browsers trust (Mozilla's list, built in, so the
//! client behaves the same on every machine); `--ca FILE` trusts that file's CAs instead,
//! as curl's `--cacert` does; `--insecure` checks nothing but the handshake's signatures,
//! and says so every time it connects.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use log::warn;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::tls::{Tls, certificates};

/// How to start TLS with a server: the rustls configuration, built once per run.
#[derive(Debug)]
pub(crate) struct Connector {
    config: Arc<rustls::ClientConfig>,
    /// The `--ca` file, to name in errors.
    ca: Option<Box<Path>>,
    insecure: bool,
}

impl Connector {
    /// The trust that `config` asks for.
    ///
    /// # Errors
    /// [`Error::Certificate`] when the `--ca` file cannot be read or holds no certificate.
    pub(crate) fn new(config: &ClientConfig) -> Result<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Handshake {
                url: config.url.clone(),
                reason: format!("TLS cannot be set up: {e}"),
            })?;
        let mut tls = if config.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
                .with_no_client_auth()
        } else {
            let roots = match &config.ca {
                Some(path) => roots_in(path)?,
                None => RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                },
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Connector {
            config: Arc::new(tls),
            ca: config.ca.as_deref().map(Box::from),
            insecure: config.insecure,
        })
    }

    /// Run the TLS handshake with `host` on `sock`, before `deadline`.
    ///
    /// # Errors
    /// What went wrong, as one line that says what to do.
    pub(crate) fn start(
        &self,
        host: &str,
        sock: &TcpStream,
        deadline: Instant,
    ) -> std::result::Result<Tls, String> {
        if self.insecure {
            warn!(
                "--insecure: the certificate of {host} is not checked; anyone between you \
                 and the server can read and change this chat"
            );
        }
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))?;
        let conn = rustls::ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| format!("TLS cannot start: {e}"))?;
        let tls = Tls::new(conn);
        tls.handshake(sock, deadline)
            .map_err(|e| self.explain(&e, host))?;
        Ok(tls)
    }

    /// What a failed handshake means, and what to do about it.
    fn explain(&self, e: &io::Error, host: &str) -> String {
        let not_tls = "the server does not speak TLS there; if it is a plaintext server, use \
                       ws:// instead of wss://";
        match e.kind() {
            io::ErrorKind::TimedOut => {
                return "the server did not complete the TLS handshake in time".to_string();
            }
            io::ErrorKind::UnexpectedEof => {
                return format!("the server hung up during the TLS handshake; {not_tls}");
            }
            _ => {}
        }
        let Some(tls_error) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return format!("the TLS handshake failed: {e}");
        };
        match tls_error {
            rustls::Error::InvalidCertificate(problem) => self.refused(problem, host),
            rustls::Error::InvalidMessage(_) => {
                format!("the answer was not TLS; {not_tls}")
            }
            rustls::Error::AlertReceived(alert) => {
                format!("the server refused the TLS handshake ({alert:?}); {not_tls}")
            }
            other => format!("the TLS handshake failed: {other}"),
        }
    }

    /// Why the server's certificate was refused.
    fn refused(&self, problem: &CertificateError, host: &str) -> String {
        match problem {
            CertificateError::UnknownIssuer => match &self.ca {
                Some(ca) => format!(
                    "certificate for '{host}' is not signed by a CA in {}; pass the CA that \
                     issued it",
                    ca.display()
                ),
                None => format!(
                    "certificate for '{host}' is not trusted; pass --ca FILE if it comes \
                     from your own CA"
                ),
            },
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the certificate is not for '{host}'; connect with a name it was issued \
                     for"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the certificate for '{host}' has expired; the server must renew it")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the certificate for '{host}' is not valid yet; check both clocks")
            }
            CertificateError::Other(other)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                format!(
                    "the certificate for '{host}' is marked as a CA (basicConstraints CA:TRUE, \
                     which `openssl req -x509` sets by default), and TLS refuses a CA's \
                     certificate as a server's own; make it with -addext \
                     basicConstraints=critical,CA:FALSE, or sign a server certificate with that CA"
                )
            }
            other => format!("the certificate for '{host}' was refused: {other}"),
        }
    }
}

/// The CA certificates in a PEM file.
fn roots_in(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(path, "CA certificate")?);
    if added == 0 {
        return Err(Error::Certificate {
            path: path.to_path_buf(),
            reason: "it holds no CA certificate that can be used".to_string(),
        });
    }
    Ok(roots)
}

/// `--insecure`: any certificate is taken, though the handshake's signatures are still
/// checked (which keeps out nothing but broken servers).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
