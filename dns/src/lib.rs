//! meshplane's embedded DNS without I/O (see `docs/dns-design.md`): the
//! cluster's names as one network's tasks see them ([`zone`], [`view`]),
//! and DNS messages parsed defensively and answered ([`wire`], with
//! hickory-proto for the messages). The sockets, the forwarder and the
//! thread live in the node (`src/node/dns.rs`, to come).

pub mod view;
pub mod wire;
pub mod zone;

/// Swarm's TTL of every record it answers (`respTTL`).
pub const TTL: u32 = 600;
