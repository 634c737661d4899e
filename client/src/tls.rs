//! TLS for Sluice peers: identities (CA + certificate + key files), mutual TLS 1.3
//! configurations for quinn, and the role a peer's certificate names.
//!
//! A peer's role is carried in its certificate as a SAN URI `sluice:role:<role>`
//! (`frontend`, `querier` or `scheduler`), signed by the CA every side trusts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sluice_protocol::Role;
use thiserror::Error;

/// ALPN protocol id of every Sluice QUIC connection.
pub const ALPN: &[u8] = b"sluice/1";

/// Prefix of the SAN URI that names a certificate's role.
pub const ROLE_URI_PREFIX: &str = "sluice:role:";

/// What went wrong with certificates or TLS settings; names the file where one is involved.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {problem}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the configuration (for example a key that does not match).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (for example an empty CA).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the TLS configuration.
    #[error("QUIC refused the TLS configuration: {0}")]
    Quic(String),
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate could not be parsed.
    #[error("peer certificate is unreadable: {0}")]
    BadPeerCertificate(String),
    /// The peer's certificate has no `sluice:role:` SAN URI.
    #[error("peer certificate names no role (expected a SAN URI {ROLE_URI_PREFIX}<frontend|querier|scheduler>)")]
    NoRole,
}

/// Role names as they appear in certificates.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Frontend => "frontend",
        Role::Querier => "querier",
        Role::Scheduler => "scheduler",
    }
}

fn role_from_name(name: &str) -> Option<Role> {
    match name {
        "frontend" => Some(Role::Frontend),
        "querier" => Some(Role::Querier),
        "scheduler" => Some(Role::Scheduler),
        _ => None,
    }
}

/// The files of one identity: a certificate chain and its private key, plus the CA that
/// every peer is verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The CA certificate (PEM) every peer is verified against.
    pub ca: PathBuf,
    /// This side's certificate chain (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM).
    pub key: PathBuf,
}

impl Identity {
    /// The identity of `role` in a directory written by `sluice serve` or
    /// `sluice certs init`: `ca.pem`, `<role>.pem`, `<role>-key.pem`.
    pub fn in_dir(dir: impl AsRef<Path>, role: Role) -> Identity {
        let dir = dir.as_ref();
        Identity {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{}.pem", role_name(role))),
            key: dir.join(format!("{}-key.pem", role_name(role))),
        }
    }
}

fn bad(path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError::BadFile {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

/// Reads a certificate chain (PEM) from `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no certificate in file"));
    }
    Ok(certs)
}

/// Reads a private key (PEM) from `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(path, e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| bad(ca, e))?;
    }
    Ok(Arc::new(roots))
}

/// TLS 1.3 server settings that require a client certificate signed by `id.ca`.
pub fn server_tls(id: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.ca)?, provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&id.cert)?, load_key(&id.key)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// TLS 1.3 client settings presenting `id`'s certificate and trusting `id.ca`.
pub fn client_tls(id: &Identity) -> Result<rustls::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&id.ca)?)
        .with_client_auth_cert(load_certs(&id.cert)?, load_key(&id.key)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// A QUIC client configuration for `id`.
pub fn quic_client(id: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(id)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The role named in a verified peer's leaf certificate.
pub fn peer_role(conn: &quinn::Connection) -> Result<Role, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
    role_of_cert(leaf)
}

/// Checks that the peer of an outgoing connection holds a certificate of `expected` role
/// (a frontend certificate cannot pose as a scheduler, nor a querier as a frontend);
/// closes the connection and says why otherwise.
pub(crate) fn expect_peer_role(conn: &quinn::Connection, expected: Role) -> Result<(), String> {
    match peer_role(conn) {
        Ok(role) if role == expected => Ok(()),
        other => {
            conn.close(
                sluice_protocol::close_code::ROLE_NOT_ALLOWED.into(),
                b"unexpected peer role",
            );
            Err(format!(
                "the peer is not a {expected:?}: its certificate says {other:?}"
            ))
        }
    }
}

/// The role named by a certificate's `sluice:role:` SAN URI.
pub fn role_of_cert(der: &CertificateDer<'_>) -> Result<Role, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?
        .ok_or(TlsError::NoRole)?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(ROLE_URI_PREFIX).and_then(role_from_name),
            _ => None,
        })
        .ok_or(TlsError::NoRole)
}

/// A QUIC server configuration for `id` that requires client certificates from `id.ca`.
pub fn quic_server(id: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(id)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}
