//! Certificate generation: the development CA and role certificates (rcgen). Loading
//! certificates, the mutual-TLS configurations and role checks live in
//! [`sluice_client::tls`] (re-exported here), since frontends and queriers need them too.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use sluice_protocol::Role;
use thiserror::Error;

pub use sluice_client::tls::*;

/// Why certificates could not be generated or saved.
#[derive(Debug, Error)]
pub enum CertError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {problem}")]
    BadFile { path: PathBuf, problem: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
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
        CertSet {
            dir: dir.to_path_buf(),
            ca_cert: ca,
            ca_key: dir.join("ca-key.pem"),
            scheduler: Identity::in_dir(dir, Role::Scheduler),
            frontend: Identity::in_dir(dir, Role::Frontend),
            querier: Identity::in_dir(dir, Role::Querier),
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
pub fn ensure_dev_set(dir: &Path) -> Result<(CertSet, bool), CertError> {
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
pub fn generate_set(
    dir: &Path,
    dns_names: &[String],
    ips: &[IpAddr],
    validity: Duration,
) -> Result<CertSet, CertError> {
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
) -> Result<(String, String), CertError> {
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
pub fn load_issuer(ca_cert: &Path, ca_key: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let cert_pem = read_text(ca_cert)?;
    let key_pem = read_text(ca_key)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(ca_key, e))?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(ca_cert, e))
}

fn bad(path: &Path, problem: impl std::fmt::Display) -> CertError {
    CertError::BadFile {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|error| CertError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    let io = |error| CertError::Io {
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
pub fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), CertError> {
    let io = |error| CertError::Io {
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
