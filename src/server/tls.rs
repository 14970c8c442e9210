//! The server's TLS: its certificate and key, replaced on request for new connections, and
//! the start of each TLS connection in its connection thread.
//!
//! Certificates are renewed every few weeks, so the files can be read again while the
//! server runs ([`ServerTls::reload`], on `SIGHUP` in the binary). rustls asks for the
//! certificate at every handshake; the answer is whatever was loaded last, so connections
//! already open keep their session, and a file that does not load leaves the old one in
//! place.

use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::handshake::Response;
use crate::config::TlsFiles;
use crate::error::{Error, Result, time_left, timed_out};
use crate::tls::{Tls, certificates, pem_error};

/// The first byte of every TLS handshake record (a ClientHello included).
pub(crate) const HANDSHAKE_RECORD: u8 = 0x16;

/// The server's TLS configuration, shared by every connection thread.
#[derive(Debug)]
pub(crate) struct ServerTls {
    files: TlsFiles,
    config: Arc<rustls::ServerConfig>,
    current: Arc<Current>,
}

/// The certificate and key that new handshakes present.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read()))
    }
}

/// Why a connection to the TLS port did not become a TLS connection.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// It spoke plain HTTP; it was answered with a 400 that says to use TLS.
    Plaintext,
    /// The handshake failed, timed out, or the client left.
    Failed(io::Error),
}

impl ServerTls {
    /// Read the certificate and key.
    ///
    /// # Errors
    /// [`Error::Certificate`] naming the file and what is wrong with it.
    pub(crate) fn load(files: TlsFiles) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = certified_key(&files, &provider)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(key))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Certificate {
                path: files.cert.clone(),
                reason: format!("TLS cannot be set up: {e}"),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            files,
            config: Arc::new(config),
            current,
        })
    }

    /// Read the certificate and key again; new connections present them from now on. If
    /// they do not load, the ones in use stay.
    ///
    /// # Errors
    /// [`Error::Certificate`], as for [`load`](Self::load).
    pub(crate) fn reload(&self) -> Result<()> {
        let key = certified_key(&self.files, self.config.crypto_provider())?;
        *self.current.0.write() = Arc::new(key);
        Ok(())
    }

    /// Start TLS on a new connection, all before `deadline`. A client that speaks plain
    /// HTTP is told in plain HTTP to use `https://` or `wss://`.
    ///
    /// Never inlined, and the state comes back boxed: rustls's connection state is over a
    /// kilobyte, and in the caller's frame it would cost every connection thread,
    /// plaintext ones too, a stack page that stays resident.
    ///
    /// # Errors
    /// [`Refusal`], saying what happened.
    #[inline(never)]
    pub(crate) fn accept(
        &self,
        sock: &TcpStream,
        deadline: Instant,
    ) -> std::result::Result<Box<Tls>, Refusal> {
        let mut first = [0u8; 1];
        let peeked = time_left(deadline)
            .and_then(|left| sock.set_read_timeout(Some(left)))
            .and_then(|()| sock.peek(&mut first))
            .map_err(|e| Refusal::Failed(timed_out(e)))?;
        if peeked == 0 {
            return Err(Refusal::Failed(io::ErrorKind::UnexpectedEof.into()));
        }
        if first[0] != HANDSHAKE_RECORD {
            let answer = Response::error(
                400,
                "this port speaks TLS only: use https:// or wss://".to_string(),
            );
            let mut writer = sock;
            let _ = time_left(deadline)
                .and_then(|left| sock.set_write_timeout(Some(left)))
                .and_then(|()| io::Write::write_all(&mut writer, &answer.to_bytes()));
            return Err(Refusal::Plaintext);
        }
        let conn = rustls::ServerConnection::new(Arc::clone(&self.config))
            .map_err(|e| Refusal::Failed(io::Error::other(e)))?;
        let tls = Box::new(Tls::new(conn));
        tls.handshake(sock, deadline).map_err(Refusal::Failed)?;
        Ok(tls)
    }
}

/// The certificate chain and key in `files`, checked to belong together.
fn certified_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey> {
    let chain = certificates(&files.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error(&files.key, &e, "private key"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => "it is not the key of".to_string(),
            other => format!("it cannot be used ({other}) with"),
        };
        Error::Certificate {
            path: files.key.clone(),
            reason: format!(
                "{why} the certificate in {}; pass the key that was made with it",
                files.cert.display()
            ),
        }
    })
}
