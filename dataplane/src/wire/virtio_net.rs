//! The virtio-net header (virtio 1.x, section 5.1.6; Linux
//! `include/uapi/linux/virtio_net.h`) that a TAP device opened with
//! `IFF_VNET_HDR` puts in front of every frame, and reads in front of every
//! frame written to it: whether the frame is a super-frame to be cut into
//! segments (GSO type and segment size) and whether a checksum is left
//! partial (where it starts and where it goes).
//!
//! The first brick of super-frames on TAP ports: [`VirtioNetHdr::parse`]
//! checks the header alone, [`VirtioNetHdr::check`] checks it against the
//! frame it describes (every offset inside the frame, a known GSO type, a
//! segment size for a super-frame), and [`complete_checksum`] finishes a
//! partial checksum in software, as the kernel's `skb_checksum_help` does.
//! Multi-byte fields are little-endian (virtio 1.x; a TAP on x86 uses its
//! native order, which is the same).

use super::checksum;
use super::error::{Layer, WireError};

/// Length of `struct virtio_net_hdr` (the TAP default, `TUNSETVNETHDRSZ`
/// not set).
pub const HEADER_LEN: usize = 10;
/// Length of `struct virtio_net_hdr_v1` (with `num_buffers`, as a TAP set
/// to 12 bytes with `TUNSETVNETHDRSZ` reads and writes it).
pub const HEADER_LEN_V1: usize = 12;

/// Length of `struct virtio_net_hdr_v1_hash_tunnel`: the 12-byte header,
/// the hash fields (unused by TAP) and the offsets of a UDP tunnel's
/// outer transport and inner network headers. A TAP set to this size
/// with `TUN_F_UDP_TUNNEL_GSO` reads and writes VXLAN super-frames.
pub const HEADER_LEN_TUNNEL: usize = 24;

/// `flags` bits.
pub mod flags {
    /// The checksum from `csum_start` to the end is partial: the sum of
    /// the pseudo-header is at `csum_start + csum_offset`, the rest is to
    /// be added.
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksums are known good (receive side only).
    pub const DATA_VALID: u8 = 2;
    /// Receive segment coalescing information (not used by TAP).
    pub const RSC_INFO: u8 = 4;
    /// The outer UDP checksum of a tunnel super-frame is partial too
    /// (`TUN_F_UDP_TUNNEL_GSO_CSUM`, which meshplane does not ask for).
    pub const UDP_TUNNEL_CSUM: u8 = 8;
}

/// `gso_type` values.
pub mod gso {
    /// Not a super-frame.
    pub const NONE: u8 = 0;
    /// TCP over IPv4, cut at `gso_size` bytes of payload (TSO4).
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload (obsolete; refused).
    pub const UDP: u8 = 3;
    /// TCP over IPv6 (TSO6).
    pub const TCPV6: u8 = 4;
    /// UDP segmentation offload (USO: one UDP header a segment).
    pub const UDP_L4: u8 = 5;
    /// Bit: the TCP segments carry ECN (CWR on the first only).
    pub const ECN: u8 = 0x80;
    /// Bit: the super-frame is inside a UDP tunnel over IPv4 (VXLAN).
    pub const UDP_TUNNEL_IPV4: u8 = 0x20;
    /// Bit: the super-frame is inside a UDP tunnel over IPv6.
    pub const UDP_TUNNEL_IPV6: u8 = 0x40;
}

/// Where the headers of a UDP-tunnel super-frame are (the tail of a
/// [`HEADER_LEN_TUNNEL`]-byte header), from the frame's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    /// The outer UDP header.
    pub outer_th: u16,
    /// The inner IP header.
    pub inner_nh: u16,
}

/// What a super-frame is made of, from its `gso_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GsoKind {
    /// A single frame.
    None,
    /// TCP over IPv4 (`ecn`: the ECN bit was set).
    TcpV4 {
        /// The ECN bit.
        ecn: bool,
    },
    /// TCP over IPv6.
    TcpV6 {
        /// The ECN bit.
        ecn: bool,
    },
    /// UDP segments (USO).
    UdpL4,
}

/// A parsed virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// [`flags`] bits.
    pub flags: u8,
    /// What the frame is made of.
    pub gso: GsoKind,
    /// Length of the headers up to the payload (a hint; Linux ignores it
    /// for TAP writes and so does meshplane).
    pub hdr_len: u16,
    /// Payload bytes per segment of a super-frame.
    pub gso_size: u16,
    /// Where the partial checksum's coverage starts, from the frame's start.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// A header that says nothing: a single frame, checksums complete.
    pub const PLAIN: VirtioNetHdr =
        VirtioNetHdr { flags: 0, gso: GsoKind::None, hdr_len: 0, gso_size: 0, csum_start: 0, csum_offset: 0 };

    /// Parses the header at the start of `buf` (at least [`HEADER_LEN`]
    /// bytes; the frame follows the header, whose length the device
    /// decides). Refuses an unknown or obsolete GSO type and unknown flag
    /// bits.
    pub fn parse(buf: &[u8]) -> Result<VirtioNetHdr, WireError> {
        let h: &[u8; HEADER_LEN] = buf.first_chunk().ok_or(WireError::Truncated {
            layer: Layer::VirtioNet,
            need: HEADER_LEN,
            have: buf.len(),
        })?;
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let flags = h[0];
        if flags & !(flags::NEEDS_CSUM | flags::DATA_VALID | flags::RSC_INFO) != 0 {
            return Err(WireError::Unsupported { layer: Layer::VirtioNet, field: "flags", value: u32::from(flags) });
        }
        let ecn = h[1] & gso::ECN != 0;
        let gso = match h[1] & !gso::ECN {
            gso::NONE if !ecn => GsoKind::None,
            gso::TCPV4 => GsoKind::TcpV4 { ecn },
            gso::TCPV6 => GsoKind::TcpV6 { ecn },
            gso::UDP_L4 if !ecn => GsoKind::UdpL4,
            _ => {
                return Err(WireError::Unsupported {
                    layer: Layer::VirtioNet,
                    field: "gso_type",
                    value: u32::from(h[1]),
                });
            }
        };
        Ok(VirtioNetHdr { flags, gso, hdr_len: le(2), gso_size: le(4), csum_start: le(6), csum_offset: le(8) })
    }

    /// Parses a [`HEADER_LEN_TUNNEL`]-byte header: the plain header, and
    /// where the tunnel's headers are if the frame is a super-frame inside
    /// a UDP tunnel over IPv4 (an IPv6 tunnel, or an outer checksum left
    /// partial, is refused: meshplane's underlay is IPv4 and it never
    /// offers `TUN_F_UDP_TUNNEL_GSO_CSUM`).
    pub fn parse_tunnel(buf: &[u8]) -> Result<(VirtioNetHdr, Option<Tunnel>), WireError> {
        let h: &[u8; HEADER_LEN_TUNNEL] = buf.first_chunk().ok_or(WireError::Truncated {
            layer: Layer::VirtioNet,
            need: HEADER_LEN_TUNNEL,
            have: buf.len(),
        })?;
        let mut plain = [0u8; HEADER_LEN];
        plain.copy_from_slice(&h[..HEADER_LEN]);
        let tunnel = h[1] & (gso::UDP_TUNNEL_IPV4 | gso::UDP_TUNNEL_IPV6);
        plain[1] &= !tunnel;
        if tunnel & gso::UDP_TUNNEL_IPV6 != 0 || h[0] & flags::UDP_TUNNEL_CSUM != 0 {
            return Err(WireError::Unsupported { layer: Layer::VirtioNet, field: "gso_type", value: u32::from(h[1]) });
        }
        let hdr = VirtioNetHdr::parse(&plain)?;
        if tunnel == 0 {
            return Ok((hdr, None));
        }
        if hdr.gso == GsoKind::None {
            return Err(WireError::Unsupported { layer: Layer::VirtioNet, field: "gso_type", value: u32::from(h[1]) });
        }
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Ok((hdr, Some(Tunnel { outer_th: le(20), inner_nh: le(22) })))
    }

    /// Writes the header as a [`HEADER_LEN_TUNNEL`]-byte one, with the
    /// tunnel's offsets and its GSO bit if `tunnel` is given.
    pub fn emit_tunnel(&self, tunnel: Option<Tunnel>, out: &mut [u8; HEADER_LEN_TUNNEL]) {
        out.fill(0);
        if let Some((head, _)) = out.split_first_chunk_mut::<HEADER_LEN>() {
            self.emit(head);
        }
        if let Some(t) = tunnel {
            out[1] |= gso::UDP_TUNNEL_IPV4;
            out[20..22].copy_from_slice(&t.outer_th.to_le_bytes());
            out[22..24].copy_from_slice(&t.inner_nh.to_le_bytes());
        }
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out` (a
    /// 12-byte header's `num_buffers` is the caller's: 0 for TAP).
    pub fn emit(&self, out: &mut [u8; HEADER_LEN]) {
        let gso = match self.gso {
            GsoKind::None => gso::NONE,
            GsoKind::TcpV4 { ecn } => gso::TCPV4 | if ecn { gso::ECN } else { 0 },
            GsoKind::TcpV6 { ecn } => gso::TCPV6 | if ecn { gso::ECN } else { 0 },
            GsoKind::UdpL4 => gso::UDP_L4,
        };
        out[0] = self.flags;
        out[1] = gso;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// True if a checksum is left partial.
    pub fn needs_csum(&self) -> bool {
        self.flags & flags::NEEDS_CSUM != 0
    }

    /// Checks the header against the frame it describes, `frame_len`
    /// bytes long: a partial checksum's field lies inside the frame (its
    /// two bytes after `csum_start`, which is past the Ethernet header, at
    /// an even offset from it: every checksum's place is); a
    /// super-frame has a segment size, a partial checksum (a kernel never
    /// hands over a super-frame with a complete one) and is longer than
    /// one segment would be. Everything a step may then index is in the
    /// frame.
    pub fn check(&self, frame_len: usize) -> Result<(), WireError> {
        if self.needs_csum() {
            let start = usize::from(self.csum_start);
            let field = start + usize::from(self.csum_offset);
            if start < super::ethernet::HEADER_LEN {
                return Err(WireError::BadLength {
                    layer: Layer::VirtioNet,
                    value: start,
                    min: super::ethernet::HEADER_LEN,
                });
            }
            if !self.csum_offset.is_multiple_of(2) {
                return Err(WireError::Unsupported {
                    layer: Layer::VirtioNet,
                    field: "csum_offset",
                    value: u32::from(self.csum_offset),
                });
            }
            if field + 2 > frame_len {
                return Err(WireError::Truncated { layer: Layer::VirtioNet, need: field + 2, have: frame_len });
            }
        }
        if self.gso != GsoKind::None {
            if self.gso_size == 0 {
                return Err(WireError::BadLength { layer: Layer::VirtioNet, value: 0, min: 1 });
            }
            if !self.needs_csum() {
                return Err(WireError::Unsupported {
                    layer: Layer::VirtioNet,
                    field: "flags",
                    value: u32::from(self.flags),
                });
            }
        }
        Ok(())
    }
}

/// Finishes the partial checksum the header `h` describes in `frame`
/// (checked with [`VirtioNetHdr::check`]): the one's-complement sum of
/// the bytes from `csum_start` to the end, with the pseudo-header's sum
/// already at the field, folded and written back (RFC 1071), as the
/// kernel's `skb_checksum_help` does. A UDP checksum that comes out 0 is
/// sent as 0xffff (RFC 768). A header the frame fails
/// ([`VirtioNetHdr::check`]) is an error and changes nothing; with no
/// checksum partial, nothing changes.
pub fn complete_checksum(frame: &mut [u8], h: &VirtioNetHdr) -> Result<(), WireError> {
    h.check(frame.len())?;
    if !h.needs_csum() {
        return Ok(());
    }
    let start = usize::from(h.csum_start);
    let at = start + usize::from(h.csum_offset);
    let sum = checksum::finish(checksum::sum(&frame[start..], 0));
    // UDP's checksum field sits 6 bytes into its header; TCP's 16.
    let sum = if h.csum_offset == 6 && sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::pseudo_header_v4;
    use crate::wire::tcp::TcpPacket;
    use core::net::Ipv4Addr;

    /// A TCP frame as a task's kernel hands it to a TAP with checksum
    /// offload: the TCP checksum field holds the folded pseudo-header sum
    /// only (not complemented).
    fn partial_tcp_frame() -> (Vec<u8>, VirtioNetHdr) {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 19, 0, 1], [198, 19, 0, 2], 64)
            .tcp(40000, 80, 7, 1024)
            .ack(1);
        let mut f = Vec::new();
        b.write(&mut f, b"hello, world").expect("builds");
        let l4 = 34;
        let len = (f.len() - l4) as u16;
        let pseudo =
            checksum::fold(pseudo_header_v4(Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2), 6, len));
        f[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        let h =
            VirtioNetHdr { flags: flags::NEEDS_CSUM, csum_start: l4 as u16, csum_offset: 16, ..VirtioNetHdr::PLAIN };
        (f, h)
    }

    /// A TSO4 super-frame's header: 1448-byte segments, TCP checksum
    /// partial from byte 34.
    fn tso(ecn: bool) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso: GsoKind::TcpV4 { ecn },
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn a_header_round_trips() {
        let h = tso(true);
        let mut b = [0u8; HEADER_LEN];
        h.emit(&mut b);
        assert_eq!(b, [1, 0x81, 66, 0, 0xa8, 5, 34, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b), Ok(h));
        let mut plain = [0u8; HEADER_LEN_V1];
        VirtioNetHdr::PLAIN.emit(plain.first_chunk_mut().expect("10 bytes"));
        assert_eq!(VirtioNetHdr::parse(&plain), Ok(VirtioNetHdr::PLAIN));
    }

    #[test]
    fn bad_headers_are_refused() {
        let parse = |b: [u8; HEADER_LEN]| VirtioNetHdr::parse(&b);
        assert!(parse([0, gso::UDP, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "UFO is obsolete");
        assert!(parse([0, 9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "unknown GSO type");
        assert!(parse([0, gso::ECN, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "ECN without TCP");
        assert!(parse([8, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "unknown flag");
        assert!(VirtioNetHdr::parse(&[0; 9]).is_err(), "short");
        let tso = tso(false);
        assert_eq!(tso.check(54), Ok(()));
        assert!(VirtioNetHdr { gso_size: 0, ..tso }.check(54).is_err(), "a super-frame without a segment size");
        assert!(VirtioNetHdr { flags: 0, ..tso }.check(54).is_err(), "a super-frame with a complete checksum");
        assert!(tso.check(51).is_err(), "the checksum field past the frame");
        assert!(VirtioNetHdr { csum_start: 4, ..tso }.check(54).is_err(), "coverage inside the Ethernet header");
        assert!(VirtioNetHdr { csum_offset: u16::MAX - 1, ..tso }.check(54).is_err(), "offset out of the frame");
        assert!(VirtioNetHdr { csum_offset: 15, ..tso }.check(54).is_err(), "an odd offset");
    }

    #[test]
    fn a_partial_checksum_is_completed_as_a_full_one_would_be() {
        let (mut f, h) = partial_tcp_frame();
        let (s, d) = (Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2));
        assert!(!TcpPacket::new_checked(&f[34..]).expect("tcp").verify_checksum_v4(s, d));
        complete_checksum(&mut f, &h).expect("completes");
        assert!(TcpPacket::new_checked(&f[34..]).expect("tcp").verify_checksum_v4(s, d));
        // Nothing partial: nothing changes.
        let before = f.clone();
        complete_checksum(&mut f, &VirtioNetHdr::PLAIN).expect("plain");
        assert_eq!(f, before);
        // A header that does not fit the frame changes nothing either.
        let bad = VirtioNetHdr { csum_offset: 4000, ..h };
        assert!(complete_checksum(&mut f, &bad).is_err());
        assert_eq!(f, before);
    }
}
