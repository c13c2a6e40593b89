//! A TAP device as a port, with virtio-net headers: a task's kernel hands
//! meshplane 64 KiB TCP super-frames (TSO) with their checksums left
//! partial, and meshplane writes super-frames back with the header that
//! says so; one `read` or `write` a frame. For task ports, and as the
//! uplink where AF_XDP is not available (there, with the kernel's
//! UDP-tunnel offload where it has it, VXLAN super-frames both ways).
//! The TAP interface can be moved into another network namespace after
//! it is opened (a task's): the file descriptor keeps working.
//!
//! Received: a header that does not fit its frame is a counted drop
//! (`rx_bad_offload`); a single frame with a partial checksum gets it
//! completed at once (the pipeline then sees complete frames only, but
//! for super-frames); a super-frame must be TCP over IPv4, plain or in
//! VXLAN, and carries its [`Offload`] through the pipeline.

mod dev;

use super::{BurstFn, IoError, IoStats, Port, SUPER_ROOM, Slots};
use crate::packet::{Frame, HEADROOM, Offload};
use crate::wire::gro::{self, Seg};
use crate::wire::gso::Layout;
use crate::wire::virtio_net::{self, GsoKind, HEADER_LEN_TUNNEL, HEADER_LEN_V1, Tunnel, VirtioNetHdr, flags};
use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Frames the kernel may queue on a TAP for meshplane to read.
const TXQUEUELEN: i32 = 8192;

/// What a TAP port is for: what it asks the kernel to hand it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapRole {
    /// A task's port: partial checksums and TCP/IPv4 super-frames.
    Task,
    /// The uplink: as a task's, and VXLAN super-frames where the kernel
    /// offers the UDP-tunnel offload (`TUN_F_UDP_TUNNEL_GSO`, Linux 6.17).
    Uplink,
}

/// A TAP port.
pub struct TapPort {
    file: File,
    name: String,
    slots: Slots,
    stats: IoStats,
    /// Bytes of virtio-net header in front of every frame: 12, or 24 with
    /// the UDP-tunnel offload.
    vnet: usize,
    /// Where segments are coalesced (GRO); allocated at the first merge.
    gro: Vec<u8>,
    /// The last receive read until the device said "no more".
    drained: bool,
}

impl std::fmt::Debug for TapPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapPort")
            .field("name", &self.name)
            .field("vnet", &self.vnet)
            .field("stats", &self.stats)
            .finish()
    }
}

impl TapPort {
    /// Creates the TAP device `name` (or attaches to a persistent one of
    /// that name) as a task's port, and sets it up.
    pub fn open(name: &str) -> Result<TapPort, IoError> {
        let mut v = Self::open_queues(name, 1, TapRole::Task)?;
        v.pop().ok_or_else(|| IoError::Config { port: name.to_owned(), msg: "no TAP queue was created".into() })
    }

    /// Opens `queues` queues of the TAP device `name` (one per worker; more
    /// than one makes it a multi-queue device, and a persistent one must
    /// have been created `multi_queue`).
    pub fn open_queues(name: &str, queues: usize, role: TapRole) -> Result<Vec<TapPort>, IoError> {
        let setup =
            |what: &'static str| move |source: std::io::Error| IoError::Setup { port: name.to_owned(), what, source };
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(IoError::Config { port: name.to_owned(), msg: "a TAP name has 1 to 15 bytes, no '/'".into() });
        }
        let mut files = Vec::with_capacity(queues);
        let mut dev_name = name.to_owned();
        for _ in 0..queues.max(1) {
            let (f, n) = dev::open(name, queues > 1).map_err(setup("creating the TAP device"))?;
            dev_name = n;
            files.push(f);
        }
        let base = dev::offload::CSUM | dev::offload::TSO4 | dev::offload::TSO_ECN;
        let mut vnet = HEADER_LEN_V1;
        if role == TapRole::Uplink {
            let tunnel = files.iter().try_for_each(|f| {
                dev::set_header_len(f, HEADER_LEN_TUNNEL)?;
                dev::set_offload(f, base | dev::offload::UDP_TUNNEL_GSO)
            });
            match tunnel {
                Ok(()) => vnet = HEADER_LEN_TUNNEL,
                Err(e) => tracing::info!(
                    port = name,
                    "the kernel refuses VXLAN super-frames on TAP ({e}): the uplink cuts them into segments"
                ),
            }
        }
        if vnet == HEADER_LEN_V1 {
            for f in &files {
                dev::set_header_len(f, HEADER_LEN_V1).map_err(setup("setting the virtio-net header size"))?;
                dev::set_offload(f, base).map_err(setup("setting the TAP offloads"))?;
            }
        }
        dev::set_up(&dev_name).map_err(setup("setting the TAP device up"))?;
        // Best effort: a short queue only drops sooner (counted by the
        // kernel as the interface's tx_dropped).
        if let Err(e) = dev::set_txqueuelen(&dev_name, TXQUEUELEN) {
            tracing::info!(port = name, "keeping the TAP's transmit queue length: {e}");
        }
        Ok(files
            .into_iter()
            .map(|file| TapPort {
                file,
                name: dev_name.clone(),
                slots: Slots::new(SUPER_ROOM),
                stats: IoStats::default(),
                vnet,
                gro: Vec::new(),
                drained: false,
            })
            .collect())
    }

    /// Bytes of virtio-net header in front of every frame (12, or 24 with
    /// VXLAN super-frames).
    pub fn header_len(&self) -> usize {
        self.vnet
    }
}

/// What the `vnet`-byte virtio-net header `hdr` (12 or 24 bytes) read
/// in front of `frame` asks of it, as the frame's [`Offload`] (its
/// offsets from a buffer in which the frame starts at [`HEADROOM`]); a
/// single frame's partial checksum is completed here. `None` (a counted
/// drop) if the header does not fit the frame: an unknown or refused GSO
/// type, a segment size of 0, a checksum outside the frame, a super-frame
/// that is not TCP over IPv4 (plain or in VXLAN).
pub fn offload_of(vnet: usize, hdr: &[u8], frame: &mut [u8]) -> Option<Offload> {
    let (h, tunnel) = if vnet == HEADER_LEN_TUNNEL {
        VirtioNetHdr::parse_tunnel(hdr).ok()?
    } else {
        (VirtioNetHdr::parse(hdr).ok()?, None)
    };
    h.check(frame.len()).ok()?;
    let GsoKind::TcpV4 { ecn } = h.gso else {
        if h.gso != GsoKind::None {
            return None;
        }
        virtio_net::complete_checksum(frame, &h).ok()?;
        return Some(Offload::NONE);
    };
    let l = Layout::of(frame, usize::from(h.csum_start)).ok()?;
    let fits = match (tunnel, l.outer_ip) {
        (None, None) => true,
        (Some(t), Some(o)) => usize::from(t.inner_nh) == l.ip && usize::from(t.outer_th) > o,
        _ => false,
    };
    (fits && h.csum_offset == 16).then_some(Offload {
        gso_size: h.gso_size,
        v6: false,
        ecn,
        csum_at: (HEADROOM + usize::from(h.csum_start)) as u32,
        csum_offset: h.csum_offset,
    })
}

impl TapPort {
    /// Coalesces the longest chain of in-order segments of one flow at the
    /// start of `frames` into one super-frame and sends it; the number of
    /// frames it took (fewer than 2: nothing was sent).
    fn coalesce(&mut self, frames: &[Frame<'_>]) -> usize {
        const MAX: usize = 64;
        let Some((first, rest)) = frames.split_first() else { return 0 };
        let Some(s0) = (!first.is_super()).then(|| gro::segment_of(first.data())).flatten() else { return 0 };
        let mut segs: [(&[u8], Seg); MAX] = [(&[], s0); MAX];
        segs[0] = (first.data(), s0);
        let (mut n, mut total) = (1, first.len());
        for f in rest.iter().take(MAX - 1) {
            let Some(s) = (!f.is_super()).then(|| gro::segment_of(f.data())).flatten() else { break };
            let (prev, ps) = segs[n - 1];
            if total + s.payload > SUPER_ROOM || !gro::continues(prev, &ps, f.data(), &s, s0.payload) {
                break;
            }
            segs[n] = (f.data(), s);
            total += s.payload;
            n += 1;
            if s.payload < s0.payload || s.psh {
                break;
            }
        }
        if n < 2 {
            return 0;
        }
        if self.gro.is_empty() {
            self.gro = vec![0u8; HEADROOM + SUPER_ROOM];
        }
        let mut buf = std::mem::take(&mut self.gro);
        let Some((len, gso_size)) = gro::merge(&segs[..n], &mut buf[HEADROOM..]) else {
            self.gro = buf;
            return 0;
        };
        if let Some(mut f) = Frame::new(&mut buf, HEADROOM, len) {
            let tcp = HEADROOM + 34;
            f.set_offload(Offload { gso_size, v6: false, ecn: false, csum_at: tcp as u32, csum_offset: 16 });
            self.stats.tx_coalesced += n as u64;
            self.send(&f);
        }
        self.gro = buf;
        n
    }

    /// The header for transmitting `f` as it is, if this port takes it:
    /// a plain frame, or a super-frame (inside VXLAN only with the
    /// tunnel offload).
    fn header_for(&self, f: &Frame<'_>) -> Option<[u8; HEADER_LEN_TUNNEL]> {
        let mut out = [0u8; HEADER_LEN_TUNNEL];
        let o = f.offload();
        if !o.is_super() {
            return Some(out);
        }
        let d = f.data();
        let tcp = (o.csum_at as usize).checked_sub(f.start())?;
        let l = Layout::of(d, tcp).ok()?;
        let tunnel = match l.outer_ip {
            None => None,
            Some(_) if self.vnet < HEADER_LEN_TUNNEL => return None,
            Some(ip) => Some(Tunnel { outer_th: (ip + usize::from(d[ip] & 0xf) * 4) as u16, inner_nh: l.ip as u16 }),
        };
        let h = VirtioNetHdr {
            flags: flags::NEEDS_CSUM,
            gso: GsoKind::TcpV4 { ecn: o.ecn },
            hdr_len: l.headers(d) as u16,
            gso_size: o.gso_size,
            csum_start: tcp as u16,
            csum_offset: o.csum_offset,
        };
        h.emit_tunnel(tunnel, &mut out);
        Some(out)
    }

    /// Writes a header and a frame; true if written.
    fn write(&mut self, hdr: &[u8], frame: &[u8]) -> bool {
        match (&self.file).write_vectored(&[IoSlice::new(&hdr[..self.vnet]), IoSlice::new(frame)]) {
            Ok(_) => {
                self.stats.tx += 1;
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.stats.tx_full += 1;
                false
            }
            // EIO while the interface is down (not yet configured in its
            // namespace): dropped, counted.
            Err(_) => {
                self.stats.errors += 1;
                false
            }
        }
    }

    fn send(&mut self, f: &Frame<'_>) -> bool {
        if let Some(h) = self.header_for(f) {
            return self.write(&h, f.data());
        }
        let plain = [0u8; HEADER_LEN_TUNNEL];
        let sent = super::tx_segments(f, |d| self.write(&plain, d));
        self.stats.count(sent)
    }
}

impl Port for TapPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn rx_burst(&mut self, f: &mut BurstFn<'_>) -> usize {
        let mut n = 0;
        let vnet = self.vnet;
        self.drained = false;
        while n < super::BURST {
            let slot = self.slots.slot(n);
            let into = &mut slot[HEADROOM - vnet..];
            let cap = into.len();
            match (&self.file).read(into) {
                // A frame that filled the room may have been cut short.
                Ok(len) if len >= cap => self.stats.rx_oversize += 1,
                Ok(len) if len < vnet + 14 => self.stats.errors += 1,
                Ok(len) => {
                    let (hdr, frame) = into.split_at_mut(vnet);
                    match offload_of(vnet, hdr, &mut frame[..len - vnet]) {
                        Some(o) => {
                            self.slots.set(n, len - vnet, o);
                            n += 1;
                        }
                        None => self.stats.rx_bad_offload += 1,
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.drained = true;
                    break;
                }
                Err(_) => {
                    self.stats.errors += 1;
                    break;
                }
            }
        }
        if n == 0 {
            return 0;
        }
        self.stats.rx += n as u64;
        let mut slots = std::mem::replace(&mut self.slots, Slots::empty());
        slots.lend(n, f, |fr| {
            self.send(fr);
        });
        self.slots = slots;
        n
    }

    fn tx_copy(&mut self, frame: &[u8]) -> bool {
        self.write(&[0u8; HEADER_LEN_TUNNEL], frame)
    }

    fn tx_frame(&mut self, f: &Frame<'_>) -> bool {
        self.send(f)
    }

    fn tx_run(&mut self, frames: &[Frame<'_>]) {
        let mut j = 0;
        while j < frames.len() {
            let n = self.coalesce(&frames[j..]);
            if n < 2 {
                self.send(&frames[j]);
                j += 1;
            } else {
                j += n;
            }
        }
    }

    fn drained(&self) -> bool {
        self.drained
    }

    fn flush(&mut self) {}

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn stats(&self) -> IoStats {
        self.stats
    }
}
