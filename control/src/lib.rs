//! meshplane's control thread: cluster state (Raft), membership (SWIM
//! gossip), and the compilation of state into the dataplane's tables.
//!
//! Built so far: the state model with its commands, allocators and
//! validation ([`state`]), and the compilation of state and membership into
//! one node's tables ([`compile`]). Raft, gossip and the admin API come
//! next (issue 6); see ARCHITECTURE.md.

pub mod cluster;
pub mod compile;
pub mod gossip;
pub mod pki;
pub mod raft;
pub mod state;
pub mod transport;

/// The management-plane port (Raft, admin API, joins), as in Docker Swarm.
pub const MANAGEMENT_PORT: u16 = 2377;
/// The control-plane (gossip) port, as in Docker Swarm.
pub const GOSSIP_PORT: u16 = 7946;
