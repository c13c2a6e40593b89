//! The management plane's TLS (rustls): configurations, certificate
//! checks, connecting and serving, and Raft's network over it.
//!
//! Every connection is TLS with a server certificate of the cluster CA.
//! Raft RPCs need a client certificate of the same CA (a node whose
//! certificate the CA did not sign fails the handshake); a joining node,
//! which has no certificate yet, may connect without one but can only ask
//! to join: it checks the server against the CA fingerprint in its token
//! (the server sends the CA certificate after its own), and the server
//! checks the token's secret before it issues the node a certificate.
//!
//! Requests and answers are framed as `rpc` says. The server holds its
//! connections under [`Limits`] (caps at accept, deadlines for the
//! handshake, each request, idle connections and answers, a size limit
//! before and after authentication; `server`), and counts what it
//! refused or closed ([`ConnStats`]). A member keeps its connection for
//! many requests; Raft's network keeps one per peer (`pool`). Imports
//! `authz`, `raft`, `rpc` and `pki`.

mod limits;
mod pool;
mod server;

pub use limits::{ConnStats, Limits};

use crate::authz::authorize_role;
use crate::pki::{ClusterCa, JoinRole, JoinToken, NodeIdentity, Peer, PkiError, fingerprint};
use crate::raft::{Call, NodeId, Raft, RpcClient, TypeConfig, answer_if_running, network::parse_node_addr};
use crate::rpc::{ApiError, FrameError, Issued, MAX_FRAME, Refusal, Request, Response, read_frame, write_frame};
use crate::state::Node;
use openraft::BasicNode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

/// Making the TCP connection.
const CONNECT_DEADLINE: Duration = Duration::from_secs(2);
/// The TLS handshake, once connected.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Why a TLS set-up, a connection or a join failed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The node's certificate, key or CA is not usable by rustls.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate check cannot be built from the CA.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Not a name a certificate can carry.
    #[error("bad server name {0:?}")]
    ServerName(String),
    /// The TCP connection could not be made.
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    /// The TCP connection was not made within 2 s.
    #[error("connecting: no answer within 2 s")]
    ConnectTimeout,
    /// The TLS handshake failed (for example a certificate of another CA).
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The TLS handshake did not end within 5 s.
    #[error("TLS handshake: no answer within 5 s")]
    HandshakeTimeout,
    /// A request on a connection got no answer in time.
    #[error("no answer to the request within 10 s")]
    NoAnswer,
    /// Listening failed.
    #[error("listening: {0}")]
    Listen(std::io::Error),
    /// The request or its response could not be carried.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A token that is not one, before any connection.
    #[error(transparent)]
    Token(PkiError),
    /// The node's key or certificate request could not be made.
    #[error("making this node's key: {0}")]
    Key(PkiError),
    /// The manager refused the join (the token's secret, the name, ...).
    #[error(transparent)]
    JoinRefused(ApiError),
    /// The server refused the request.
    #[error(transparent)]
    Refused(Refusal),
    /// An answer that is not one to a join.
    #[error("unexpected answer to a join")]
    UnexpectedAnswer,
    /// The server's certificate is not a manager's.
    #[error("the server's certificate is not a manager's")]
    NotAManagerServer,
    /// A Raft member without a management address.
    #[error("node {0} has no management address")]
    NoAddress(NodeId),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut r = rustls::RootCertStore::empty();
    r.add(CertificateDer::from(ca.to_vec()))?;
    Ok(r)
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

/// The TLS server side of a node: its certificate (with the CA's after
/// it), client certificates of the CA verified when presented.
pub fn server_config(id: &NodeIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&id.ca)?), provider())
        .allow_unauthenticated()
        .build()?;
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(id.cert.clone()), CertificateDer::from(id.ca.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
        )?)
}

/// The TLS client side of a member: the CA as the only root, its own
/// certificate for client authentication.
pub fn client_config(id: &NodeIdentity) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&id.ca)?)
        .with_client_auth_cert(
            vec![CertificateDer::from(id.cert.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
        )?)
}

/// A joining node's server check: the last certificate the server sends
/// must hash to the token's fingerprint, and the server's own certificate
/// must be issued by it (then handshake signatures are checked as usual).
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates.last().ok_or(rustls::Error::General("the server sent no CA certificate".into()))?;
        if fingerprint(ca) != self.fingerprint {
            return Err(rustls::Error::General("the server's CA is not the token's".into()));
        }
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(ca).map_err(|e| rustls::Error::General(e.to_string()))?),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// One request to the node at `addr` (certificate name `name`) as member
/// `id` (mutual TLS): its response.
pub async fn request(addr: SocketAddr, name: &str, id: &NodeIdentity, req: &Request) -> Result<Response, TlsError> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(id)?));
    call(&connector, addr, name, req).await
}

async fn call(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &str,
    req: &Request,
) -> Result<Response, TlsError> {
    let mut s = connect(connector, addr, name).await?;
    exchange(&mut s, req).await
}

/// A TLS connection to the node at `addr` (certificate name `name`),
/// each step within its deadline.
async fn connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> Result<TlsStream<TcpStream>, TlsError> {
    let name = server_name(name)?;
    let tcp = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(addr))
        .await
        .map_err(|_| TlsError::ConnectTimeout)?
        .map_err(TlsError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let s = tokio::time::timeout(HANDSHAKE_DEADLINE, connector.connect(name, tcp))
        .await
        .map_err(|_| TlsError::HandshakeTimeout)?
        .map_err(TlsError::Handshake)?;
    // Every client of the management plane talks to managers (joins,
    // Raft, forwarded writes, watches, renewals): a worker's certificate,
    // valid as it is, does not serve them (it could otherwise stand in for
    // a manager reached by address only).
    let server = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| Peer::from_cert(c).ok());
    match server {
        Some(p) if p.role == JoinRole::Manager => Ok(s),
        _ => Err(TlsError::NotAManagerServer),
    }
}

/// One request and its answer on a connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &Request) -> Result<Response, TlsError> {
    write_frame(s, req).await?;
    Ok(read_frame(s, MAX_FRAME).await?)
}

/// What a joining node sends besides its token: its name, a certificate
/// signing request for its key, and the node as the state will hold it.
#[derive(Debug, Clone)]
pub struct JoinAsk {
    /// The node's name.
    pub name: String,
    /// Its certificate signing request (DER).
    pub csr: Vec<u8>,
    /// Its addresses (none: a server without the state, in tests).
    pub node: Option<Node>,
}

/// Joins the cluster through the manager at `addr` (whose certificate is
/// for `manager_name`) with `token`: the certificate the manager issued.
pub async fn join(addr: SocketAddr, manager_name: &str, token: &str, ask: JoinAsk) -> Result<Issued, TlsError> {
    let t = JoinToken::parse(token).map_err(TlsError::Token)?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint: t.fingerprint }))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut s = connect(&connector, addr, manager_name).await?;
    let req = Request::Join { token: token.to_owned(), name: ask.name, csr: ask.csr, node: ask.node };
    match exchange(&mut s, &req).await? {
        Response::Join(r) => r.map_err(TlsError::JoinRefused),
        Response::Refused(why) => Err(TlsError::Refused(why)),
        _ => Err(TlsError::UnexpectedAnswer),
    }
}

/// Joins as [`join`] does with a new key made here: the node's identity
/// and role.
pub async fn join_new_key(
    addr: SocketAddr,
    manager_name: &str,
    token: &str,
    name: &str,
    node: Option<Node>,
) -> Result<(NodeIdentity, JoinRole), TlsError> {
    let key = crate::pki::new_key().map_err(TlsError::Key)?;
    let csr = crate::pki::csr(&key, name).map_err(TlsError::Key)?;
    let issued = join(addr, manager_name, token, JoinAsk { name: name.to_owned(), csr, node }).await?;
    Ok((NodeIdentity { name: name.to_owned(), cert: issued.cert, key, ca: issued.ca }, issued.role))
}

/// A manager's management-plane server (stops when dropped).
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    gate: Arc<limits::Gate>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Its connection counters now.
    pub fn stats(&self) -> ConnStats {
        self.gate.stats()
    }

    /// Its limits.
    pub fn limits(&self) -> &Limits {
        &self.gate.limits
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a server does with one request: `peer` is what the client's
/// certificate of the cluster CA says (none: it presented none).
pub type Handler = Arc<
    dyn Fn(Request, Option<Peer>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>
        + Send
        + Sync,
>;

/// Serves on `listener` as `id`, answering Raft RPCs with `raft` (set once
/// the node runs Raft) and joins with `ca` (a server of Raft and joins
/// only; a node's control plane serves with its own handler).
pub fn serve(
    listener: TcpListener,
    id: &NodeIdentity,
    raft: Arc<Mutex<Option<Raft>>>,
    ca: Option<Arc<Mutex<ClusterCa>>>,
) -> Result<Server, TlsError> {
    serve_with(listener, Creds::new(id)?, raft_handler(raft, ca))
}

/// The handler of [`serve`]: Raft RPCs answered with `raft`, joins with
/// `ca`, each authorized by the role in the client's certificate.
pub fn raft_handler(raft: Arc<Mutex<Option<Raft>>>, ca: Option<Arc<Mutex<ClusterCa>>>) -> Handler {
    Arc::new(move |req, peer| {
        let (raft, ca) = (raft.clone(), ca.clone());
        Box::pin(async move {
            if let Err(why) = authorize_role(&req, peer.as_ref()) {
                return Response::Refused(why);
            }
            match req {
                Request::Join { token, name, csr, .. } => {
                    let ca = ca.map(|ca| ca.lock().unwrap_or_else(PoisonError::into_inner).clone());
                    answer_join(ca.as_ref(), &token, &name, &csr)
                }
                req => {
                    let raft = raft.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    answer_if_running(raft, req).await
                }
            }
        })
    })
}

/// The answer to a join from a server without the state: a certificate
/// from `ca` if this node holds the CA and the token is good (the
/// cluster's own joins also check the name is free and record the node).
pub fn answer_join(ca: Option<&ClusterCa>, token: &str, name: &str, csr: &[u8]) -> Response {
    match ca {
        Some(ca) => Response::Join(
            ca.admit(token, name, csr)
                .map(|(cert, role)| Issued { cert, ca: ca.cert().to_vec(), role })
                .map_err(ApiError::Pki),
        ),
        None => Response::Refused(Refusal::NoCa),
    }
}

/// A node's TLS credentials, replaceable while it runs (a renewed
/// certificate): servers and Raft's network take the current ones for
/// each new connection.
pub struct Creds {
    inner: RwLock<(NodeIdentity, tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector)>,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds").field("name", &self.identity().name).finish()
    }
}

impl Creds {
    /// Credentials of `id`.
    pub fn new(id: &NodeIdentity) -> Result<Arc<Creds>, TlsError> {
        Ok(Arc::new(Creds { inner: RwLock::new(Creds::build(id)?) }))
    }

    fn build(
        id: &NodeIdentity,
    ) -> Result<(NodeIdentity, tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector), TlsError> {
        Ok((
            id.clone(),
            tokio_rustls::TlsAcceptor::from(Arc::new(server_config(id)?)),
            tokio_rustls::TlsConnector::from(Arc::new(client_config(id)?)),
        ))
    }

    /// Uses `id` from now on.
    pub fn set(&self, id: &NodeIdentity) -> Result<(), TlsError> {
        let next = Creds::build(id)?;
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    /// The current identity.
    pub fn identity(&self) -> NodeIdentity {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).1.clone()
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).2.clone()
    }
}

/// Serves on `listener` with the credentials `creds` (the current ones
/// for each new connection) under the default [`Limits`]: every request
/// goes to `handler`.
pub fn serve_with(listener: TcpListener, creds: Arc<Creds>, handler: Handler) -> Result<Server, TlsError> {
    serve_with_limits(listener, creds, handler, Limits::default())
}

/// Serves on `listener` with the credentials `creds` under `limits`:
/// every request goes to `handler`.
pub fn serve_with_limits(
    listener: TcpListener,
    creds: Arc<Creds>,
    handler: Handler,
    limits: Limits,
) -> Result<Server, TlsError> {
    let addr = listener.local_addr().map_err(TlsError::Listen)?;
    let gate = limits::Gate::new(limits);
    let task = tokio::spawn(server::accept_loop(listener, creds, handler, gate.clone()));
    Ok(Server { addr, gate, task })
}

/// Raft's network over the management plane: node id → (address, name),
/// from the Raft membership's nodes (`BasicNode.addr` is `name@ip:port`).
/// Connections to the peers are kept and shared by its clients.
#[derive(Clone)]
pub struct TlsNetwork {
    creds: Arc<Creds>,
    pool: Arc<pool::Pool>,
}

impl TlsNetwork {
    /// The network of member `id`.
    pub fn new(id: &NodeIdentity) -> Result<TlsNetwork, TlsError> {
        Ok(TlsNetwork::with_creds(Creds::new(id)?))
    }

    /// The network of a member with the credentials `creds` (renewed in
    /// place).
    pub fn with_creds(creds: Arc<Creds>) -> TlsNetwork {
        TlsNetwork { creds, pool: Arc::default() }
    }
}

/// A connection target over TLS (on the network's kept connections).
pub struct TlsConn {
    creds: Arc<Creds>,
    pool: Arc<pool::Pool>,
    target: NodeId,
    name: String,
    addr: Option<SocketAddr>,
}

impl openraft::RaftNetworkFactory<TypeConfig> for TlsNetwork {
    type Network = RpcClient<TlsConn>;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let (name, addr) = parse_node_addr(node).map_or((String::new(), None), |(n, a)| (n.to_owned(), Some(a)));
        RpcClient(TlsConn { creds: self.creds.clone(), pool: self.pool.clone(), target, name, addr })
    }
}

impl Call for TlsConn {
    type Error = TlsError;
    fn target(&self) -> NodeId {
        self.target
    }
    async fn call(&self, req: Request) -> Result<Response, TlsError> {
        let addr = self.addr.ok_or(TlsError::NoAddress(self.target))?;
        self.pool.call(self.creds.connector(), addr, &self.name, &req).await
    }
}
