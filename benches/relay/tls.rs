//! The TLS scenario (`--tls`): what encryption costs, beside plaintext in the same run.
//!
//! The harness makes a CA and a certificate for `localhost` (under target/bench/tls/),
//! starts two release servers of its own, one plaintext and one with `--tls-cert` and
//! `--tls-key`, both with `--rate 0`, and measures them in turn: fan-out at each N with 8
//! messages in flight, then many idle clients at once (memory and threads per client).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::RootCertStore;

use crate::report::Report;
use crate::{fanout, scale, start_own};

pub fn run(pinned: bool, sizes: &[usize], duration: Duration, clients: usize, out: &mut Report) {
    let (ca, cert, key) = match certificates() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("relay: cannot make the certificates: {e}");
            std::process::exit(1);
        }
    };
    let options = [
        "--rate",
        "0",
        "--tls-cert",
        cert.to_str().expect("a UTF-8 path"),
        "--tls-key",
        key.to_str().expect("a UTF-8 path"),
    ];
    let (plain, plain_process) = start_own(pinned, &["--rate", "0"], "plaintext");
    let (mut tls, tls_process) = start_own(pinned, &options, "tls");
    tls.tls = Some(trusting(&ca));
    println!(
        "plaintext pid {}, tls pid {} (rustls, ring); server options --rate 0 (flood control off)",
        plain.pid, tls.pid
    );
    let mut at_100 = [0.0; 2];
    for &n in sizes {
        for (i, target) in [&plain, &tls].into_iter().enumerate() {
            match fanout::run(target, n, 8, duration) {
                Ok(result) => {
                    if n == 100 {
                        at_100[i] = result.server_us_per_delivery;
                    }
                    out.fanout(&target.label, &result);
                }
                Err(e) => out.failed(&format!("{} N={n}", target.label), &e),
            }
        }
    }
    if at_100.iter().all(|&us| us > 0.0) {
        println!(
            "server CPU per delivery at N=100: plaintext {:.2} µs, tls {:.2} µs: {:.2}×",
            at_100[0],
            at_100[1],
            at_100[1] / at_100[0]
        );
    }
    for target in [&plain, &tls] {
        match scale::connections(target, clients, 4) {
            Ok(result) => out.connections(&format!("{} clients", target.label), &result),
            Err(e) => out.failed(&format!("{} clients", target.label), &e),
        }
    }
    drop((plain_process, tls_process));
}

/// A CA, and a certificate for localhost it signed: the paths of the CA, the certificate
/// and its key.
fn certificates() -> Result<(PathBuf, PathBuf, PathBuf), Box<dyn std::error::Error>> {
    let dir = crate::report::target_dir().join("bench").join("tls");
    std::fs::create_dir_all(&dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "broadcast-chat bench CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &issuer)?;
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// A client configuration that trusts the CA in `ca`.
fn trusting(ca: &std::path::Path) -> crate::wire::Tls {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots.add(cert.expect("a CA certificate")).expect("a CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}
