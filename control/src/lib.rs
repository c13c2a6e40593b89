//! meshplane's control thread: cluster state (Raft), membership (SWIM
//! gossip), and the compilation of state into the dataplane's tables.
//!
//! Not built yet: the crate exists so the workspace has its final shape.
//! Issue 6 of the project tracker fills it in; see ARCHITECTURE.md.

/// The management-plane port (Raft, admin API, joins), as in Docker Swarm.
pub const MANAGEMENT_PORT: u16 = 2377;
/// The control-plane (gossip) port, as in Docker Swarm.
pub const GOSSIP_PORT: u16 = 7946;
