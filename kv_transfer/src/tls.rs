//! Cluster identities for mutual TLS: a cluster CA (made here with rcgen for
//! local clusters, or an operator's own files) and per-node certificates it
//! signs. Every QUIC peer presents one and accepts only the cluster CA's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::TransferError;

/// ALPN protocol id of KV transfer connections.
pub const ALPN: &[u8] = b"tandem-kv/1";

/// ring's TLS 1.3 suites with AES-128-GCM first: bulk KV is encrypted
/// per packet, and AES-128 takes fewer rounds than AES-256 for the same
/// hardware path.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn tls(e: impl std::fmt::Display) -> TransferError {
    TransferError::Tls(e.to_string())
}

/// A cluster certificate authority that can issue node identities.
pub struct ClusterCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A fresh self-signed CA named `name`.
    pub fn generate(name: &str) -> Result<Self, TransferError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(tls)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(tls)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a node certificate valid for `names` (DNS names or IP
    /// addresses), usable as both client and server.
    pub fn issue(&self, names: &[&str]) -> Result<NodeIdentity, TransferError> {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(tls)?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(tls)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(tls)?;
        Ok(NodeIdentity {
            ca: vec![self.issuer.der().clone()],
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        })
    }
}

/// What a node needs for mutual TLS: the cluster CA to trust, and its own
/// certificate chain and key.
#[derive(Debug)]
pub struct NodeIdentity {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Where a node identity is kept on disk.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NodeIdentity {
    /// Reads PEM files: the CA certificate(s), this node's chain, its private key.
    pub fn from_files(files: &IdentityFiles) -> Result<Self, TransferError> {
        let read_certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, TransferError> {
            let certs = CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TransferError::Tls(format!("{}: {e}", p.display())))?;
            if certs.is_empty() {
                return Err(TransferError::Tls(format!(
                    "{}: no certificate",
                    p.display()
                )));
            }
            Ok(certs)
        };
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| TransferError::Tls(format!("{}: {e}", files.key.display())))?;
        Ok(Self {
            ca: read_certs(&files.ca)?,
            chain: read_certs(&files.cert)?,
            key,
        })
    }

    /// Writes `ca.pem`, `node.pem` and `node.key` into `dir`.
    pub fn write_files(&self, dir: &Path) -> Result<IdentityFiles, TransferError> {
        let pem = |label: &str, der: &[u8]| {
            let mut s = format!("-----BEGIN {label}-----\n");
            let b64 = base64(der);
            for line in b64.as_bytes().chunks(64) {
                s.push_str(&String::from_utf8_lossy(line));
                s.push('\n');
            }
            s.push_str(&format!("-----END {label}-----\n"));
            s
        };
        let files = IdentityFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        let certs =
            |v: &[CertificateDer<'_>]| v.iter().map(|c| pem("CERTIFICATE", c)).collect::<String>();
        let io = |e: std::io::Error| TransferError::Tls(format!("{}: {e}", dir.display()));
        std::fs::write(&files.ca, certs(&self.ca)).map_err(io)?;
        std::fs::write(&files.cert, certs(&self.chain)).map_err(io)?;
        std::fs::write(&files.key, pem("PRIVATE KEY", self.key.secret_der())).map_err(io)?;
        Ok(files)
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TransferError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(tls)?;
        }
        Ok(Arc::new(roots))
    }

    /// TLS 1.3 server configuration that requires a client certificate from the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TransferError> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(tls)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// TLS 1.3 client configuration that trusts only the cluster CA and presents this node's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TransferError> {
        let provider = provider();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// Standard base64 with padding (for PEM).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn identity_round_trips_through_files() {
        let ca = ClusterCa::generate("test CA").expect("CA");
        let id = ca.issue(&["node-a", "127.0.0.1"]).expect("node cert");
        let dir = std::env::temp_dir().join(format!("tandem-kvt-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let files = id.write_files(&dir).expect("write");
        let back = NodeIdentity::from_files(&files).expect("read");
        assert_eq!(back.ca, id.ca);
        assert_eq!(back.chain, id.chain);
        assert_eq!(back.key.secret_der(), id.key.secret_der());
        assert!(back.server_config().is_ok() && back.client_config().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
