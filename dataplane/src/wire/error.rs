//! Errors of the wire layer.

use thiserror::Error;

/// Which header a [`WireError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Ethernet II, with or without 802.1Q tags.
    Ethernet,
    /// ARP for IPv4 over Ethernet.
    Arp,
    /// IPv4.
    Ipv4,
    /// IPv6 and its extension headers.
    Ipv6,
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// ICMPv4.
    Icmpv4,
    /// VXLAN.
    Vxlan,
    /// The virtio-net header of a TAP with `IFF_VNET_HDR`.
    VirtioNet,
}

impl core::fmt::Display for Layer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Layer::Ethernet => "ethernet",
            Layer::Arp => "arp",
            Layer::Ipv4 => "ipv4",
            Layer::Ipv6 => "ipv6",
            Layer::Udp => "udp",
            Layer::Tcp => "tcp",
            Layer::Icmpv4 => "icmpv4",
            Layer::Vxlan => "vxlan",
            Layer::VirtioNet => "virtio-net",
        })
    }
}

/// Why bytes could not be read (or written) as a header.
///
/// Every checked constructor returns one of these instead of panicking, so a
/// worker can turn it into a counted drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// The buffer ends before the header (or the length it declares) does.
    #[error("{layer}: truncated: need {need} bytes, have {have}")]
    Truncated {
        /// The header being read.
        layer: Layer,
        /// Bytes the header needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A length field is smaller than the fixed header it describes.
    #[error("{layer}: length field {value} is below the minimum {min}")]
    BadLength {
        /// The header being read.
        layer: Layer,
        /// The value in the packet.
        value: usize,
        /// The smallest legal value.
        min: usize,
    },
    /// The IP version nibble is not the one expected.
    #[error("{layer}: version {version} not supported")]
    BadVersion {
        /// The header being read.
        layer: Layer,
        /// The version found.
        version: u8,
    },
    /// A field has a value this implementation does not handle (for example
    /// ARP for a hardware type other than Ethernet).
    #[error("{layer}: unsupported {field} {value:#x}")]
    Unsupported {
        /// The header being read.
        layer: Layer,
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u32,
    },
    /// VXLAN header without the I flag (RFC 7348 section 5: it must be set).
    #[error("vxlan: I flag not set (flags {0:#04x})")]
    VxlanNoIFlag(u8),
    /// A header checksum that does not verify.
    #[error("{0}: bad header checksum")]
    BadChecksum(Layer),
    /// More IPv6 extension headers than the parser walks.
    #[error("ipv6: more than {0} extension headers")]
    TooManyExtensions(usize),
    /// The datagram is a non-first fragment: the transport header is elsewhere.
    #[error("{0}: non-first fragment has no transport header")]
    Fragment(Layer),
    /// Not enough room in front of a frame to write a header into.
    #[error("need {need} bytes of headroom, have {have}")]
    NoHeadroom {
        /// Bytes the header needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

/// Returns `Truncated` unless `have >= need`.
#[inline]
pub(crate) fn need(layer: Layer, need: usize, have: usize) -> Result<(), WireError> {
    if have < need { Err(WireError::Truncated { layer, need, have }) } else { Ok(()) }
}
