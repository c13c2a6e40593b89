//! The L4 load balancer: consistent hashing, schedulers, connection
//! tracking. (Services and the routing mesh build on these; see
//! ARCHITECTURE.md.)

pub mod conntrack;
pub mod maglev;
pub mod sched;
