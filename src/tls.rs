//! Certificates and TLS: the development CA, role certificates, and the mutual-TLS
//! configurations of the QUIC endpoints.
//!
//! A peer's role is carried in its certificate as a SAN URI `sluice:role:<role>`
//! (`frontend`, `querier` or `scheduler`), signed by the CA every side trusts. The
//! scheduler reads it from the verified client certificate; a peer's `Hello` must claim
//! the same role.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
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
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {problem}")]
    BadFile { path: PathBuf, problem: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC refused the TLS configuration: {0}")]
    Quic(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate is unreadable: {0}")]
    BadPeerCertificate(String),
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
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files `generate_set` writes in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSet {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub scheduler: Identity,
    pub frontend: Identity,
    pub querier: Identity,
}

impl CertSet {
    /// The paths of a set in `dir` (whether or not the files exist).
    pub fn in_dir(dir: &Path) -> Self {
        let ca = dir.join("ca.pem");
        let id = |name: &str| Identity {
            ca: ca.clone(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        CertSet {
            dir: dir.to_path_buf(),
            ca_cert: ca.clone(),
            ca_key: dir.join("ca-key.pem"),
            scheduler: id("scheduler"),
            frontend: id("frontend"),
            querier: id("querier"),
        }
    }

    fn files(&self) -> [&Path; 8] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.scheduler.cert,
            &self.scheduler.key,
            &self.frontend.cert,
            &self.frontend.key,
            &self.querier.cert,
            &self.querier.key,
        ]
    }

    /// Whether every file of the set exists.
    pub fn is_complete(&self) -> bool {
        self.files().iter().all(|p| p.exists())
    }
}

/// Makes sure `dir` holds a complete development set (CA, scheduler, frontend and querier
/// certificates), generating one if any file is missing; returns its paths and whether it
/// was generated now. Development certificates name `localhost`, 127.0.0.1 and ::1.
pub fn ensure_dev_set(dir: &Path) -> Result<(CertSet, bool), TlsError> {
    let set = CertSet::in_dir(dir);
    if set.is_complete() {
        return Ok((set, false));
    }
    let names = vec!["localhost".to_string()];
    let ips: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    generate_set(dir, &names, &ips, Duration::from_secs(365 * 24 * 3600))?;
    Ok((set, true))
}

/// Writes a new CA and scheduler, frontend and querier certificates into `dir`. The
/// scheduler and frontend certificates (both run servers) are valid for `dns_names` and
/// `ips`. Keys are written readable by the owner only.
pub fn generate_set(dir: &Path, dns_names: &[String], ips: &[IpAddr], validity: Duration) -> Result<CertSet, TlsError> {
    let set = CertSet::in_dir(dir);
    create_private_dir(dir)?;
    let now = time::OffsetDateTime::now_utc();
    let until = now + validity;

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "Sluice CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now;
    ca_params.not_after = until;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_file(&set.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write_file(&set.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    for (role, id) in [
        (Role::Scheduler, &set.scheduler),
        (Role::Frontend, &set.frontend),
        (Role::Querier, &set.querier),
    ] {
        let (cert, key) = issue(&issuer, role, role_name(role), dns_names, ips, validity)?;
        write_file(&id.cert, cert.as_bytes(), false)?;
        write_file(&id.key, key.as_bytes(), true)?;
    }
    Ok(set)
}

/// Issues one role certificate signed by `issuer`; returns (certificate PEM, key PEM).
pub fn issue(
    issuer: &Issuer<'_, KeyPair>,
    role: Role,
    common_name: &str,
    dns_names: &[String],
    ips: &[IpAddr],
    validity: Duration,
) -> Result<(String, String), TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.not_before = now;
    params.not_after = now + validity;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    let uri = format!("{ROLE_URI_PREFIX}{}", role_name(role));
    params.subject_alt_names.push(SanType::URI(uri.as_str().try_into()?));
    for name in dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into()?));
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads a CA certificate and key written by [`generate_set`] as an issuer.
pub fn load_issuer(ca_cert: &Path, ca_key: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let cert_pem = read_text(ca_cert)?;
    let key_pem = read_text(ca_key)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(ca_key, e))?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(ca_cert, e))
}

fn bad(path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError::BadFile {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|error| TlsError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let io = |error| TlsError::Io {
        path: dir.to_path_buf(),
        error,
    };
    fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Writes `data` to `path`, created with mode 0600 when `private`.
pub fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), TlsError> {
    let io = |error| TlsError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = options.open(path).map_err(io)?;
    f.write_all(data).map_err(io)?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn dev_set_is_generated_once_then_reused() {
        let dir = temp_dir("reuse");
        let (set, created) = ensure_dev_set(&dir).unwrap();
        assert!(created && set.is_complete());
        let before = fs::read(&set.scheduler.cert).unwrap();
        let (_, created) = ensure_dev_set(&dir).unwrap();
        assert!(!created);
        assert_eq!(
            fs::read(&set.scheduler.cert).unwrap(),
            before,
            "reused, not regenerated"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("perms");
        let (set, _) = ensure_dev_set(&dir).unwrap();
        for key in [&set.ca_key, &set.scheduler.key, &set.frontend.key, &set.querier.key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_certificate_carries_its_role() {
        let dir = temp_dir("roles");
        let (set, _) = ensure_dev_set(&dir).unwrap();
        for (id, role) in [
            (&set.scheduler, Role::Scheduler),
            (&set.frontend, Role::Frontend),
            (&set.querier, Role::Querier),
        ] {
            let chain = load_certs(&id.cert).unwrap();
            assert_eq!(role_of_cert(&chain[0]).unwrap(), role);
        }
        // The CA names no role.
        let ca = load_certs(&set.ca_cert).unwrap();
        assert!(matches!(role_of_cert(&ca[0]), Err(TlsError::NoRole)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_role_certificate_can_be_issued_from_a_saved_ca() {
        let dir = temp_dir("issue");
        let (set, _) = ensure_dev_set(&dir).unwrap();
        let issuer = load_issuer(&set.ca_cert, &set.ca_key).unwrap();
        let (cert, _key) = issue(&issuer, Role::Querier, "querier-7", &[], &[], Duration::from_secs(3600)).unwrap();
        let path = dir.join("q7.pem");
        fs::write(&path, cert).unwrap();
        assert_eq!(role_of_cert(&load_certs(&path).unwrap()[0]).unwrap(), Role::Querier);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_garbage_files_name_the_path() {
        let dir = temp_dir("bad");
        fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        fs::write(&garbage, "not a certificate").unwrap();
        let err = load_certs(&garbage).unwrap_err().to_string();
        assert!(err.contains("garbage.pem"), "{err}");
        let err = load_key(&dir.join("absent.pem")).unwrap_err().to_string();
        assert!(err.contains("absent.pem"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
