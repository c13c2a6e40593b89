//! The wire layer: zero-copy views of the headers meshplane reads, with
//! checked constructors, representations for building headers, and in-place
//! rewrites with incremental checksum updates.
//!
//! The pattern (after smoltcp's `wire`): `XxxPacket::new_checked(buf)`
//! validates every length the view relies on, so its accessors cannot go out
//! of bounds; `XxxRepr::parse`/`emit` convert between bytes and plain
//! values. Every parser returns a typed [`WireError`] on bad input, never
//! panics.

pub mod arp;
pub mod checksum;
mod error;
pub mod ethernet;
pub mod flow;
pub mod frame;
pub mod gro;
pub mod gso;
pub mod icmp_nat;
pub mod icmpv4;
pub mod ipv4;
pub mod ipv6;
pub mod parse;
pub mod rewrite;
pub mod tcp;
pub mod udp;
pub mod virtio_net;
pub mod vxlan;

pub use error::{Layer, WireError};
pub use ethernet::MacAddr;
pub use parse::{Parsed, parse_frame};

/// Prefetches the cache line holding `p` into L1: a hint that never faults
/// (not even on an invalid address) and changes nothing observable.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: PREFETCHT0 is a hint: it reads nothing architecturally, cannot
    // fault (not even on an invalid address) and has no effect other than
    // on caches; SSE, which it needs, is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
