//! meshplane's control thread: cluster state (Raft), membership (SWIM
//! gossip), the management plane (mutual TLS), the admin API, and the
//! compilation of state into the dataplane's tables.
//!
//! Modules, bottom to top (each imports only modules below it):
//! - leaves: [`state`] (the cluster state, its commands and validation),
//!   [`pki`] (the CA, certificates, join tokens), [`gossip`] (SWIM with
//!   sealed packets), [`compile`] (state and liveness → a node's tables;
//!   imports `state`), [`snapshot_data`] (a Raft snapshot's bytes, bounded);
//! - [`rpc`]: the management plane's messages, their typed errors and
//!   framing (imports `state`, `pki`);
//! - [`raft`]: the Raft log, state machine and network (imports `rpc`,
//!   `state`);
//! - [`tls`]: TLS set-up, certificate checks, connect and serve helpers,
//!   Raft's network over TLS (imports `raft`, `rpc`, `pki`);
//! - [`cluster`]: a node's control plane: the admin API, joins, the gossip
//!   loop, compiling and publishing tables (imports everything below).

pub mod authz;
pub mod cluster;
pub mod compile;
pub mod gossip;
pub mod pki;
pub mod raft;
pub mod rpc;
pub mod snapshot_data;
pub mod state;
pub mod tls;

/// The management-plane port (Raft, admin API, joins), as in Docker Swarm.
pub const MANAGEMENT_PORT: u16 = 2377;
/// The control-plane (gossip) port, as in Docker Swarm.
pub const GOSSIP_PORT: u16 = 7946;
