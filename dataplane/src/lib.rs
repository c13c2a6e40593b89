//! meshplane's dataplane: everything a packet touches.
//!
//! Packet logic here is sans-IO: pure functions over byte buffers and
//! tables. The modules grow with the pipeline (see ARCHITECTURE.md); today:
//!
//! - [`wire`]: header views, VXLAN, checksums and in-place rewrites.
//! - [`pcap`]: reading and writing classic pcap captures (tools and tests).
//! - [`tables`]: the published snapshot the packet path reads (TOML for now).
//! - [`pipeline`]: `process(frame, in_port, now, &tables, &mut state) -> Verdict`.
//! - [`overlay`]: the overlay switch: forwarding, VXLAN, proxy ARP, gateway ICMP.
//! - [`lb`]: the load balancer's parts: Maglev, schedulers, connection tracking.

pub mod io;
pub mod lb;
pub mod overlay;
pub mod packet;
pub mod pcap;
pub mod pipeline;
pub mod report;
pub mod tables;
pub mod wire;
pub mod worker;
