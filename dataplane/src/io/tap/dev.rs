//! The TAP device itself: `/dev/net/tun` opened as a TAP with the
//! virtio-net header (`IFF_VNET_HDR`), its header size and the offloads it
//! takes (`TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`), and the interface set up.
//! These are ioctls no maintained crate offers together for a TAP
//! (tokio-tun has no virtio-net header; tun-rs none for a layer-2 TAP with
//! UDP-tunnel offloads), so this is one of the few modules that may use
//! `unsafe`: four `ioctl` calls, each with its `SAFETY` note. Reads and
//! writes go through `std::fs::File`.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `TUNSETOFFLOAD` bits: what the device may hand us (and the kernel
/// then offers the stack above it).
pub(super) mod offload {
    /// Frames with a partial checksum.
    pub(crate) const CSUM: u32 = 0x01;
    /// TCP over IPv4 super-frames.
    pub(crate) const TSO4: u32 = 0x02;
    /// TCP super-frames with ECN.
    pub(crate) const TSO_ECN: u32 = 0x08;
    /// Super-frames inside a UDP tunnel (Linux 6.17 and later).
    pub(crate) const UDP_TUNNEL_GSO: u32 = 0x080;
}

/// `struct ifreq` with the flags member (40 bytes on Linux).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Opens a queue of the TAP device `name` (creating it, or attaching to
/// a persistent one), non-blocking, with a virtio-net header in front of
/// every frame. Returns the file and the device's name.
pub(super) fn open(name: &str, multi_queue: bool) -> io::Result<(File, String)> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | if multi_queue { IFF_MULTI_QUEUE } else { 0 };
    let mut req = IfReq::new(name, flags);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its
    // layout (name, then the flags member, padded to 40 bytes) and lives
    // across the call; the fd is open.
    check(unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) })?;
    Ok((f, req.name()))
}

/// Sets the virtio-net header's length on every queue of the device.
pub(super) fn set_header_len(f: &File, len: usize) -> io::Result<()> {
    let len = len as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
    // points at `len`, alive across the call.
    check(unsafe { libc::ioctl(f.as_raw_fd(), TUNSETVNETHDRSZ, &len as *const libc::c_int) })
}

/// Says which offloads the device takes (the [`offload`] bits); an
/// error if the kernel refuses one (an older kernel, for the tunnel bit).
pub(super) fn set_offload(f: &File, bits: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the bits as the argument value itself
    // and reads no memory.
    check(unsafe { libc::ioctl(f.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(bits)) })
}

/// `struct ifreq` with the `ifr_qlen` member.
#[repr(C)]
struct IfReqQlen {
    name: [u8; libc::IFNAMSIZ],
    qlen: libc::c_int,
    _pad: [u8; 20],
}

/// Sets the transmit queue length of the interface `name` (as `ip link
/// set NAME txqueuelen N`): frames the kernel holds for meshplane to read
/// before it drops them (1000 by default; a burst of new connections
/// overflows that).
pub(super) fn set_txqueuelen(name: &str, len: i32) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut req = IfReqQlen { name: IfReq::new(name, 0).name, qlen: len, _pad: [0; 20] };
    // SAFETY: SIOCSIFTXQLEN reads the `struct ifreq` (name, then the
    // `ifr_qlen` int, padded to 40 bytes) the pointer points at (`req`,
    // alive across the call).
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFTXQLEN, &mut req as *mut IfReqQlen) })
}

/// Sets the interface `name` up (as `ip link set NAME up`).
pub(super) fn set_up(name: &str) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut req = IfReq::new(name, 0);
    // SAFETY: SIOCGIFFLAGS writes the flags member of the `struct ifreq`
    // the pointer points at (`req`, alive across the call).
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) })?;
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the `struct ifreq` (`req`, alive).
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req as *const IfReq) })
}
