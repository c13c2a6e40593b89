//! The cluster's certificate authority, node certificates and join
//! tokens, as Swarm has them.
//!
//! `cluster init` makes a CA (ECDSA P-256); every node's certificate is
//! issued by it, and the management plane (Raft, joins) is mutual TLS
//! between certificates of that CA. A node makes its own key and sends a
//! certificate signing request (the CA never sees the key); the CA
//! decides what the certificate says: the node's name (common name and
//! DNS name), its role (organisational unit `meshplane-manager` or
//! `meshplane-worker`, as Swarm's `swarm-manager`/`swarm-worker`) and its
//! validity (`cert_expiry`, 90 days by default, as Swarm's
//! `--cert-expiry`). [`Peer`] is what a server reads back from a client's
//! verified certificate, for authorization by role.
//!
//! A join token is `MPTKN-1-<sha256 of the CA certificate>-<secret>`: the
//! fingerprint lets a joining node check it talks to this cluster's
//! managers before it has a certificate; the secret (one for managers, one
//! for workers) lets the managers check the joining node may join, and as
//! what.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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
    /// A certificate signing request that does not parse or whose
    /// signature does not verify.
    #[error("bad certificate signing request: {0}")]
    BadCsr(String),
    /// A certificate that is not a node certificate of this cluster (no
    /// name, no role, does not parse).
    #[error("not a node certificate of this cluster: {0}")]
    NotANodeCertificate(String),
    /// A node name a certificate may not carry.
    #[error("bad node name {0:?} (1 to 15 letters, digits, '-', '_' or '.', not starting with '-' or '.')")]
    BadName(String),
}

fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}

/// A name every node's certificate carries besides its own: what a node
/// that knows only an address (a joiner, the CLI) checks the server
/// against (the CA pin or the CA itself is what makes that check mean
/// something).
pub const CLUSTER_NAME: &str = "meshplane";

/// What a token lets a node join as, and the role a certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinRole {
    /// A manager (Raft voter).
    Manager,
    /// A worker.
    Worker,
}

impl JoinRole {
    /// The organisational unit a certificate of this role carries.
    pub fn unit(self) -> &'static str {
        match self {
            JoinRole::Manager => "meshplane-manager",
            JoinRole::Worker => "meshplane-worker",
        }
    }

    fn of_unit(ou: &str) -> Option<JoinRole> {
        [JoinRole::Manager, JoinRole::Worker].into_iter().find(|r| r.unit() == ou)
    }
}

/// Whether `name` may name a node (and anything else in the state): 1 to
/// 15 bytes (an interface name's limit) of letters, digits, `-`, `_`,
/// `.`, not starting with `-` or `.` (it reaches command lines as an
/// argument).
pub fn valid_name(name: &str) -> bool {
    valid_name_up_to(name, MAX_NAME)
}

/// The longest name [`valid_name`] accepts.
pub const MAX_NAME: usize = 15;

/// [`valid_name`] with another length limit (a task id's is longer: see
/// `state::MAX_TASK_ID`).
pub fn valid_name_up_to(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && !name.starts_with(['-', '.'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// How long a node certificate is valid unless the cluster says otherwise
/// (Swarm's default `--cert-expiry`).
pub const DEFAULT_CERT_EXPIRY: Duration = Duration::from_secs(90 * 24 * 3600);

/// The shortest certificate validity a cluster accepts.
pub const MIN_CERT_EXPIRY: Duration = Duration::from_secs(60);
/// The longest certificate validity: ten years (`cluster init
/// --cert-expiry-hours` goes to 87 600). A CA's longer value (from the
/// admin socket, or a `SetCa` written by hand) is cut to it where used.
pub const MAX_CERT_EXPIRY: Duration = Duration::from_secs(87_600 * 3600);

fn default_expiry_secs() -> u64 {
    DEFAULT_CERT_EXPIRY.as_secs()
}

/// The id of a public key: the SHA-256 of its bits, in hex (what the
/// state records per node, so that a certificate of a removed or replaced
/// node is refused even if its name comes back).
pub fn key_id(public_key_bits: &[u8]) -> String {
    Sha256::digest(public_key_bits).iter().map(|x| format!("{x:02x}")).collect()
}

/// What a verified client certificate says of its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The node's name.
    pub name: String,
    /// Its role, as the certificate says.
    pub role: JoinRole,
    /// Its key's id ([`key_id`]).
    pub key_id: String,
    /// Valid from (seconds since the epoch).
    pub not_before: i64,
    /// Valid until (seconds since the epoch).
    pub not_after: i64,
}

impl Peer {
    /// Reads a node certificate (DER) of this cluster.
    pub fn from_cert(der: &[u8]) -> Result<Peer, PkiError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let bad = |e: &str| PkiError::NotANodeCertificate(e.to_owned());
        let (_, c) = X509Certificate::from_der(der).map_err(|e| bad(&e.to_string()))?;
        let subject = c.subject();
        let name = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).ok_or_else(|| bad("no name"))?;
        let role = subject
            .iter_organizational_unit()
            .filter_map(|a| a.as_str().ok())
            .find_map(JoinRole::of_unit)
            .ok_or_else(|| bad("no role"))?;
        Ok(Peer {
            name: name.to_owned(),
            role,
            key_id: key_id(&c.public_key().subject_public_key.data),
            not_before: c.validity().not_before.timestamp(),
            not_after: c.validity().not_after.timestamp(),
        })
    }

    /// Whether the certificate is past its end of validity at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64) > self.not_after
    }

    /// Whether at `now` a `fraction` of its validity is gone (renew it).
    pub fn renewal_due(&self, now: SystemTime, fraction: f64) -> bool {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        // Issued CLOCK_SLACK after the start of its validity (see sign).
        let slack = CLOCK_SLACK.as_secs() as i64;
        let issued = if self.not_after - self.not_before > slack { self.not_before + slack } else { self.not_before };
        let life = (self.not_after - issued).max(1) as f64;
        (now - issued) as f64 >= life * fraction
    }
}

/// A certificate is valid from this long before it is signed, for peers
/// whose clocks are a little behind.
pub const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// A new key for a node (PKCS#8 DER): it never leaves the node.
pub fn new_key() -> Result<Vec<u8>, PkiError> {
    Ok(KeyPair::generate().map_err(cert_err)?.serialize_der())
}

/// A certificate signing request for the key `key` (PKCS#8 DER) of node
/// `name`, DER.
pub fn csr(key: &[u8], name: &str) -> Result<Vec<u8>, PkiError> {
    let key = KeyPair::try_from(key).map_err(cert_err)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    p.distinguished_name.push(DnType::CommonName, name);
    Ok(p.serialize_request(&key).map_err(cert_err)?.der().to_vec())
}

/// Parses a certificate signing request and checks its signature.
fn parse_csr(csr: &[u8]) -> Result<CertificateSigningRequestParams, PkiError> {
    CertificateSigningRequestParams::from_der(&csr.into()).map_err(|e| PkiError::BadCsr(e.to_string()))
}

/// The id of the key a certificate signing request is for ([`key_id`]).
pub fn csr_key_id(csr: &[u8]) -> Result<String, PkiError> {
    Ok(key_id(parse_csr(csr)?.public_key.der_bytes()))
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

impl NodeIdentity {
    /// What its certificate says (name, role, validity).
    pub fn peer(&self) -> Result<Peer, PkiError> {
        Peer::from_cert(&self.cert)
    }
}

/// The cluster CA: certificate, key and the two join secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    cert: Vec<u8>,
    key_pem: String,
    manager_secret: String,
    worker_secret: String,
    /// How long the node certificates it issues are valid.
    #[serde(default = "default_expiry_secs")]
    cert_expiry_secs: u64,
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
            cert_expiry_secs: default_expiry_secs(),
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

    /// How long the certificates it issues are valid.
    pub fn cert_expiry(&self) -> Duration {
        Duration::from_secs(self.cert_expiry_secs).clamp(MIN_CERT_EXPIRY, MAX_CERT_EXPIRY)
    }

    /// A copy issuing certificates valid for `d` (between
    /// [`MIN_CERT_EXPIRY`] and [`MAX_CERT_EXPIRY`]).
    pub fn with_cert_expiry(&self, d: Duration) -> ClusterCa {
        ClusterCa { cert_expiry_secs: d.clamp(MIN_CERT_EXPIRY, MAX_CERT_EXPIRY).as_secs(), ..self.clone() }
    }

    /// A join's answer: the role `token` gives and a certificate for
    /// `name` and the key of `csr`, or why not. (The cluster checks the
    /// name is free before it asks.)
    pub fn admit(&self, token: &str, name: &str, csr: &[u8]) -> Result<(Vec<u8>, JoinRole), PkiError> {
        let role = self.check(token)?;
        Ok((self.sign(csr, name, role)?, role))
    }

    /// A certificate for node `name` in `role` for the key of `csr`, valid
    /// from now for the cluster's certificate expiry.
    pub fn sign(&self, csr: &[u8], name: &str, role: JoinRole) -> Result<Vec<u8>, PkiError> {
        let now = SystemTime::now();
        self.sign_valid(csr, name, role, now - CLOCK_SLACK, now + self.cert_expiry())
    }

    /// As [`ClusterCa::sign`], valid from `not_before` to `not_after`.
    pub fn sign_valid(
        &self,
        csr: &[u8],
        name: &str,
        role: JoinRole,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<u8>, PkiError> {
        if !valid_name(name) {
            return Err(PkiError::BadName(name.to_owned()));
        }
        let req = parse_csr(csr)?;
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut p = CertificateParams::new(vec![name.to_owned(), CLUSTER_NAME.to_owned()]).map_err(cert_err)?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.distinguished_name.push(DnType::OrganizationalUnitName, role.unit());
        p.not_before = time::OffsetDateTime::from(not_before);
        p.not_after = time::OffsetDateTime::from(not_after);
        let mut serial = [0u8; 16];
        rand::fill(&mut serial);
        serial[0] &= 0x7f;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = CertificateSigningRequestParams { params: p, public_key: req.public_key }
            .signed_by(&issuer)
            .map_err(cert_err)?;
        Ok(cert.der().to_vec())
    }

    /// A new key and a certificate for it, for node `name` in `role` (the
    /// first manager at `cluster init`; tests).
    pub fn issue(&self, name: &str, role: JoinRole) -> Result<NodeIdentity, PkiError> {
        let key = new_key()?;
        let cert = self.sign(&csr(&key, name)?, name, role)?;
        Ok(NodeIdentity { name: name.to_owned(), cert, key, ca: self.cert.clone() })
    }

    /// The CA's certificate (DER).
    pub fn cert(&self) -> &[u8] {
        &self.cert
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
