//! The management plane over TCP with mutual TLS (rustls): Raft's RPCs
//! between managers, and joins.
//!
//! Every connection is TLS with a server certificate of the cluster CA.
//! Raft RPCs need a client certificate of the same CA (a node whose
//! certificate the CA did not sign fails the handshake); a joining node,
//! which has no certificate yet, may connect without one but can only ask
//! to join: it checks the server against the CA fingerprint in its token
//! (the server sends the CA certificate after its own), and the server
//! checks the token's secret before it issues the node a certificate.
//!
//! Framing: each request and response is a 4-byte length and a JSON body;
//! one request per connection.

use crate::pki::{ClusterCa, JoinRole, JoinToken, NodeIdentity, fingerprint};
use crate::raft::{NodeId, Raft, TypeConfig};
use openraft::BasicNode;
use openraft::error::RPCError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A management-plane request.
#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Raft: append entries (heartbeats included).
    Append(openraft::raft::AppendEntriesRequest<TypeConfig>),
    /// Raft: a vote.
    Vote(openraft::raft::VoteRequest<NodeId>),
    /// Raft: a snapshot chunk.
    Snapshot(openraft::raft::InstallSnapshotRequest<TypeConfig>),
    /// A node asks to join with a token, under a name.
    Join {
        /// The token.
        token: String,
        /// The node's name.
        name: String,
    },
    /// A member asks for a change to the cluster state (followers and
    /// workers forward their writes to the leader this way).
    Write(crate::state::Command),
    /// A member waits for the cluster state newer than `since` (a long
    /// poll: answered at once if there is one, else when there is one or
    /// after a few seconds with the same version).
    Watch {
        /// The version the member has.
        since: u64,
    },
    /// A manager that joined asks to become a Raft voter.
    AddManager {
        /// Its Raft id.
        id: NodeId,
        /// Its name (its certificate's).
        name: String,
        /// Its management address.
        addr: SocketAddr,
    },
    /// An admin API request from a member (the CLI on another node).
    Admin(crate::cluster::AdminRequest),
}

/// A management-plane response.
#[derive(Serialize, Deserialize)]
pub enum Response {
    /// To `Append`.
    Append(Result<openraft::raft::AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    /// To `Vote`.
    Vote(Result<openraft::raft::VoteResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    /// To `Snapshot`.
    Snapshot(
        Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
    ),
    /// To `Join`: the node's identity and role, or why not.
    Join(Result<(NodeIdentity, JoinRole), String>),
    /// To `Write` and `AddManager`: applied, or why not.
    Written(Result<(), String>),
    /// To `Watch`: the state (without secrets) and its version.
    State {
        /// The version (the last applied Raft log index).
        version: u64,
        /// The state.
        state: Box<crate::state::ClusterState>,
    },
    /// To `Admin`.
    Admin(crate::cluster::AdminResponse),
    /// A Raft RPC without a client certificate, or a request this server
    /// does not serve.
    Refused(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

pub(crate) async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, v: &T) -> std::io::Result<()> {
    let b = serde_json::to_vec(v).map_err(io)?;
    w.write_all(&(b.len() as u32).to_le_bytes()).await?;
    w.write_all(&b).await?;
    w.flush().await
}

pub(crate) async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(r: &mut R) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 << 20 {
        return Err(io("frame too large"));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).await?;
    serde_json::from_slice(&b).map_err(io)
}

fn roots(ca: &[u8]) -> std::io::Result<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    r.add(CertificateDer::from(ca.to_vec())).map_err(io)?;
    Ok(r)
}

/// The TLS server side of a node: its certificate (with the CA's after
/// it), client certificates of the CA verified when presented.
pub fn server_config(id: &NodeIdentity) -> std::io::Result<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&id.ca)?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(io)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(io)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(id.cert.clone()), CertificateDer::from(id.ca.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
        )
        .map_err(io)
}

/// The TLS client side of a member: the CA as the only root, its own
/// certificate for client authentication.
pub fn client_config(id: &NodeIdentity) -> std::io::Result<rustls::ClientConfig> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(io)?
        .with_root_certificates(roots(&id.ca)?)
        .with_client_auth_cert(
            vec![CertificateDer::from(id.cert.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
        )
        .map_err(io)
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
pub async fn request(addr: SocketAddr, name: &str, id: &NodeIdentity, req: &Request) -> std::io::Result<Response> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(id)?));
    call(&connector, addr, name, req).await
}

async fn call(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &str,
    req: &Request,
) -> std::io::Result<Response> {
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(2), TcpStream::connect(addr)).await.map_err(io)??;
    let _ = tcp.set_nodelay(true);
    let sn = ServerName::try_from(name.to_owned()).map_err(io)?;
    let mut s = connector.connect(sn, tcp).await?;
    write_frame(&mut s, req).await?;
    read_frame(&mut s).await
}

/// Joins the cluster through the manager at `addr` (whose certificate is
/// for `manager_name`) with `token`, as node `name`: the node's identity.
pub async fn join(
    addr: SocketAddr,
    manager_name: &str,
    token: &str,
    name: &str,
) -> std::io::Result<(NodeIdentity, JoinRole)> {
    let t = JoinToken::parse(token).map_err(io)?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(io)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint: t.fingerprint }))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let sn = ServerName::try_from(manager_name.to_owned()).map_err(io)?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(sn, tcp).await?;
    write_frame(&mut s, &Request::Join { token: token.to_owned(), name: name.to_owned() }).await?;
    match read_frame(&mut s).await? {
        Response::Join(r) => r.map_err(io),
        Response::Refused(why) => Err(io(why)),
        _ => Err(io("unexpected answer to a join")),
    }
}

/// A manager's management-plane server: Raft RPCs for members, joins
/// checked against the CA (if this manager holds it).
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
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

/// What a server does with one request: `member` is true if the client
/// presented a certificate of the cluster CA.
pub type Handler =
    Arc<dyn Fn(Request, bool) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> + Send + Sync>;

/// Serves on `listener` as `id`, answering Raft RPCs with `raft` (set once
/// the node runs Raft) and joins with `ca`.
pub fn serve(
    listener: TcpListener,
    id: &NodeIdentity,
    raft: Arc<Mutex<Option<Raft>>>,
    ca: Option<Arc<Mutex<ClusterCa>>>,
) -> std::io::Result<Server> {
    let handler: Handler = Arc::new(move |req, member| {
        let (raft, ca) = (raft.clone(), ca.clone());
        Box::pin(async move {
            let r = raft.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            match (req, r) {
                (Request::Join { token, name }, _) => match &ca {
                    Some(ca) => {
                        let ca = ca.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                        Response::Join(admit(&ca, &token, &name))
                    }
                    None => Response::Refused("this manager does not hold the CA".into()),
                },
                (_, _) if !member => Response::Refused("Raft needs a certificate of the cluster CA".into()),
                (_, None) => Response::Refused("Raft is not running here yet".into()),
                (req, Some(r)) => answer(&r, req).await,
            }
        })
    });
    serve_with(listener, id, handler)
}

/// A join's answer from the CA: the token's role and a certificate for
/// `name`, or why not.
pub fn admit(ca: &ClusterCa, token: &str, name: &str) -> Result<(NodeIdentity, JoinRole), String> {
    ca.check(token)
        .map_err(|e| e.to_string())
        .and_then(|role| ca.issue(name).map(|id| (id, role)).map_err(|e| e.to_string()))
}

/// Serves on `listener` as `id`: every request goes to `handler`.
pub fn serve_with(listener: TcpListener, id: &NodeIdentity, handler: Handler) -> std::io::Result<Server> {
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(id)?));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                // A failed handshake (a certificate the CA did not sign)
                // ends here.
                let Ok(mut s) = acceptor.accept(tcp).await else { return };
                let member = s.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                let Ok(req) = read_frame::<_, Request>(&mut s).await else { return };
                let resp = handler(req, member).await;
                let _ = write_frame(&mut s, &resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(Server { addr, task })
}

/// Answers a Raft request with `raft` (the server side of both networks;
/// a join is not Raft's and is refused here).
pub async fn answer(raft: &Raft, req: Request) -> Response {
    match req {
        Request::Append(rpc) => Response::Append(raft.append_entries(rpc).await),
        Request::Vote(rpc) => Response::Vote(raft.vote(rpc).await),
        Request::Snapshot(rpc) => Response::Snapshot(raft.install_snapshot(rpc).await),
        Request::Join { .. } => Response::Refused("joins go to a manager holding the CA".into()),
        _ => Response::Refused("not a Raft request".into()),
    }
}

/// A way to send one request to one node: the TLS connection, or the
/// in-process router.
pub trait Call: Send + Sync + 'static {
    /// The node the requests go to.
    fn target(&self) -> NodeId;
    /// Sends `req`; the response.
    fn call(&self, req: Request) -> impl std::future::Future<Output = std::io::Result<Response>> + Send;
}

/// Raft's network over any [`Call`]: one implementation of openraft's
/// client side for both networks.
pub struct RpcClient<T>(pub T);

fn unreachable<E: std::error::Error>(to: NodeId, e: impl std::fmt::Display) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(openraft::error::Unreachable::new(&io(format!("node {to}: {e}"))))
}

impl<T: Call> RpcClient<T> {
    /// Sends `req` and takes the expected response out with `pick`; errors
    /// as openraft wants them.
    async fn rpc<R, E: std::error::Error>(
        &self,
        req: Request,
        pick: impl FnOnce(Response) -> Option<Result<R, E>>,
    ) -> Result<R, RPCError<NodeId, BasicNode, E>> {
        let to = self.0.target();
        match self.0.call(req).await {
            Ok(resp) => match pick(resp) {
                Some(r) => r.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(to, e))),
                None => Err(unreachable(to, "refused")),
            },
            Err(e) => Err(unreachable(to, e)),
        }
    }
}

type RaftErr<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;

impl<T: Call> openraft::RaftNetwork<TypeConfig> for RpcClient<T> {
    async fn append_entries(
        &mut self,
        rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftErr>> {
        self.rpc(Request::Append(rpc), |r| match r {
            Response::Append(x) => Some(x),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: openraft::raft::InstallSnapshotRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftErr<openraft::error::InstallSnapshotError>>,
    > {
        self.rpc(Request::Snapshot(rpc), |r| match r {
            Response::Snapshot(x) => Some(x),
            _ => None,
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: openraft::raft::VoteRequest<NodeId>,
        _option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftErr>> {
        self.rpc(Request::Vote(rpc), |r| match r {
            Response::Vote(x) => Some(x),
            _ => None,
        })
        .await
    }
}

/// Raft's network over the management plane: node id → (address, name),
/// from the Raft membership's nodes (`BasicNode.addr` is `name@ip:port`).
#[derive(Clone)]
pub struct TlsNetwork {
    connector: tokio_rustls::TlsConnector,
}

impl TlsNetwork {
    /// The network of member `id`.
    pub fn new(id: &NodeIdentity) -> std::io::Result<TlsNetwork> {
        Ok(TlsNetwork { connector: tokio_rustls::TlsConnector::from(Arc::new(client_config(id)?)) })
    }
}

/// The address to put in a member's `BasicNode`: `name@ip:port`.
pub fn node_addr(name: &str, addr: SocketAddr) -> BasicNode {
    BasicNode::new(format!("{name}@{addr}"))
}

/// A connection target over TLS.
pub struct TlsConn {
    connector: tokio_rustls::TlsConnector,
    target: NodeId,
    name: String,
    addr: Option<SocketAddr>,
}

impl openraft::RaftNetworkFactory<TypeConfig> for TlsNetwork {
    type Network = RpcClient<TlsConn>;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let (name, addr) = node.addr.split_once('@').unwrap_or(("", ""));
        RpcClient(TlsConn { connector: self.connector.clone(), target, name: name.to_owned(), addr: addr.parse().ok() })
    }
}

impl Call for TlsConn {
    fn target(&self) -> NodeId {
        self.target
    }
    async fn call(&self, req: Request) -> std::io::Result<Response> {
        let addr = self.addr.ok_or_else(|| io("no address"))?;
        call(&self.connector, addr, &self.name, &req).await
    }
}
