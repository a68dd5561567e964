//! TLS for the MQTTS listener: load the configured certificate, or create a local CA and a
//! server certificate on first start (`data_dir/tls/ca.pem` is what clients trust).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM")]
    Empty { path: PathBuf, what: &'static str },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the generated files live under the data directory.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// Creates the local CA and a server certificate for localhost, 127.0.0.1, ::1 and
/// `hostname`, unless they exist already. Returns (certificate chain, key) paths.
pub fn ensure_generated(data_dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let (ca_path, cert_path, key_path) = generated_paths(data_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleethub local CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if !names.iter().any(|n| n == hostname) {
        names.push(hostname.to_string());
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, hostname);
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    std::fs::write(&ca_path, ca.pem()).map_err(io(&ca_path))?;
    // The chain served: leaf then CA.
    std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca.pem())).map_err(io(&cert_path))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    Ok((cert_path, key_path))
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(io(path))?;
    f.write_all(contents).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Builds the rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = {
        let f = std::fs::File::open(cert).map_err(io(cert))?;
        rustls_pemfile::certs(&mut BufReader::new(f))
            .collect::<Result<_, _>>()
            .map_err(io(cert))?
    };
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: cert.to_path_buf(),
            what: "certificate",
        });
    }
    let key: PrivateKeyDer<'static> = {
        let f = std::fs::File::open(key).map_err(io(key))?;
        rustls_pemfile::private_key(&mut BufReader::new(f))
            .map_err(io(key))?
            .ok_or(TlsError::Empty {
                path: key.to_path_buf(),
                what: "private key",
            })?
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Client certificates are asked for, never required: X.509 devices send one, SAS devices
    // none; which authenticates whom is decided at CONNECT (`x509`).
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(crate::x509::AnyClientCert::new(provider)))
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}
