//! The cluster's certificate authority and join tokens, as Swarm has them.
//!
//! `cluster init` makes a CA (ECDSA P-256); every node's certificate is
//! issued by it, and the management plane (Raft, joins) is mutual TLS
//! between certificates of that CA. A join token is
//! `MPTKN-1-<sha256 of the CA certificate>-<secret>`: the fingerprint lets a
//! joining node check it talks to this cluster's managers before it has a
//! certificate; the secret (one for managers, one for workers) lets the
//! managers check the joining node may join, and as what.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

const CA_NAME: &str = "meshplane cluster CA";

/// Why PKI work failed or a token was refused (it crosses the wire in a
/// join's answer, typed).
#[derive(Debug, Clone, Error, PartialEq, Eq, Serialize, Deserialize)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Cert(String),
    /// A token that is not `MPTKN-1-<64 hex>-<secret>`.
    #[error("malformed join token (expected MPTKN-1-<fingerprint>-<secret>)")]
    MalformedToken,
    /// A token for another cluster (its CA fingerprint differs).
    #[error("join token is for another cluster (CA fingerprint differs)")]
    WrongCluster,
    /// A token whose secret is neither the manager's nor the worker's.
    #[error("invalid join token")]
    BadSecret,
}

fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}

/// A name every node's certificate carries besides its own: what a node
/// that knows only an address (a joiner, the CLI) checks the server
/// against (the CA pin or the CA itself is what makes that check mean
/// something).
pub const CLUSTER_NAME: &str = "meshplane";

/// What a token lets a node join as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinRole {
    /// A manager (Raft voter).
    Manager,
    /// A worker.
    Worker,
}

/// A node's certificate and key (DER), and the CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The node's name (the certificate's subject and DNS name).
    pub name: String,
    /// Its certificate (DER).
    pub cert: Vec<u8>,
    /// Its private key (PKCS#8 DER).
    pub key: Vec<u8>,
    /// The cluster CA's certificate (DER).
    pub ca: Vec<u8>,
}

/// The cluster CA: certificate, key and the two join secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    cert: Vec<u8>,
    key_pem: String,
    manager_secret: String,
    worker_secret: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("fingerprint", &self.fingerprint()).finish()
    }
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn secret() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The SHA-256 of a certificate, in hex.
pub fn fingerprint(cert_der: &[u8]) -> String {
    Sha256::digest(cert_der).iter().map(|x| format!("{x:02x}")).collect()
}

impl ClusterCa {
    /// A new CA with new join secrets (`cluster init`).
    pub fn init() -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = ca_params()?.self_signed(&key).map_err(cert_err)?;
        Ok(ClusterCa {
            cert: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            manager_secret: secret(),
            worker_secret: secret(),
        })
    }

    /// The CA certificate's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The join token for `role`.
    pub fn token(&self, role: JoinRole) -> String {
        let s = match role {
            JoinRole::Manager => &self.manager_secret,
            JoinRole::Worker => &self.worker_secret,
        };
        format!("MPTKN-1-{}-{s}", self.fingerprint())
    }

    /// A new secret for `role` (`cluster token --rotate`): old tokens stop working.
    pub fn rotate(&mut self, role: JoinRole) {
        match role {
            JoinRole::Manager => self.manager_secret = secret(),
            JoinRole::Worker => self.worker_secret = secret(),
        }
    }

    /// A copy with a new secret for `role` (what a rotation commits).
    pub fn rotated(&self, role: JoinRole) -> ClusterCa {
        let mut c = self.clone();
        c.rotate(role);
        c
    }

    /// What `token` lets its holder join as.
    pub fn check(&self, token: &str) -> Result<JoinRole, PkiError> {
        let t = JoinToken::parse(token)?;
        if t.fingerprint != self.fingerprint() {
            return Err(PkiError::WrongCluster);
        }
        // Compared in constant time.
        let eq = |a: &str, b: &str| {
            a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        };
        if eq(&t.secret, &self.manager_secret) {
            Ok(JoinRole::Manager)
        } else if eq(&t.secret, &self.worker_secret) {
            Ok(JoinRole::Worker)
        } else {
            Err(PkiError::BadSecret)
        }
    }

    /// A join's answer: the role `token` gives and a certificate for
    /// `name`, or why not.
    pub fn admit(&self, token: &str, name: &str) -> Result<(NodeIdentity, JoinRole), PkiError> {
        let role = self.check(token)?;
        Ok((self.issue(name)?, role))
    }

    /// A certificate for node `name`, issued by this CA, with a new key.
    pub fn issue(&self, name: &str) -> Result<NodeIdentity, PkiError> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut p = CertificateParams::new(vec![name.to_owned(), CLUSTER_NAME.to_owned()]).map_err(cert_err)?;
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &issuer).map_err(cert_err)?;
        Ok(NodeIdentity {
            name: name.to_owned(),
            cert: cert.der().to_vec(),
            key: key.serialize_der(),
            ca: self.cert.clone(),
        })
    }
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The CA certificate's fingerprint (hex SHA-256).
    pub fingerprint: String,
    /// The secret.
    pub secret: String,
}

impl JoinToken {
    /// Parses `MPTKN-1-<fingerprint>-<secret>`.
    pub fn parse(s: &str) -> Result<JoinToken, PkiError> {
        let rest = s.trim().strip_prefix("MPTKN-1-").ok_or(PkiError::MalformedToken)?;
        let (fp, secret) = rest.split_once('-').ok_or(PkiError::MalformedToken)?;
        let hex = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_hexdigit());
        if fp.len() != 64 || !hex(fp) || !hex(secret) {
            return Err(PkiError::MalformedToken);
        }
        Ok(JoinToken { fingerprint: fp.to_ascii_lowercase(), secret: secret.to_ascii_lowercase() })
    }
}
