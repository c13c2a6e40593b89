//! meshplane's dataplane: everything a packet touches.
//!
//! Packet logic here is sans-IO: pure functions over byte buffers and
//! tables. The modules grow with the pipeline (see ARCHITECTURE.md); today:
//!
//! - [`wire`]: header views, VXLAN, checksums and in-place rewrites.
//! - [`pcap`]: reading and writing classic pcap captures (tools and tests).

pub mod pcap;
pub mod wire;
