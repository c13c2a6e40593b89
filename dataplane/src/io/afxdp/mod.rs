//! AF_XDP ports (xsk-rs over libxdp), and the XDP steering program that
//! feeds them (libbpf, through libxdp-sys).
//!
//! One socket per (interface, queue), with its own UMEM: frames are
//! received into the UMEM and processed there in place; a frame sent back
//! out of the same port goes from the rx ring to the tx ring without a
//! copy; a frame for another port is copied into a free frame of that
//! port's UMEM. Fill and completion rings are kept full and reaped in
//! bulk; sockets bind with `XDP_USE_NEED_WAKEUP` (the kernel is kicked only
//! when it asks), zero-copy when the driver supports it, copy otherwise;
//! for a jumbo underlay, copy mode with multi-buffer (`XDP_USE_SG`): a
//! packet larger than one UMEM frame comes as a chain of descriptors, is
//! gathered into a buffer for the pipeline, and goes out as a chain.
//!
//! The steering program (`steer.bpf.c`, compiled by build.rs) is attached
//! to each interface directly (libxdp's multi-program dispatcher is not
//! used, so sockets are created with program loading inhibited): on the
//! uplink it redirects only dataplane traffic (VXLAN to the data-path
//! address, published ports and VIPs, replies to the tasks' egress
//! connections) and passes the rest to the kernel;
//! on a task port it redirects everything. It is detached when the port is
//! dropped.
//!
//! This is the only module with `unsafe` code besides one prefetch hint:
//! the UMEM is memory shared with the kernel, and libbpf is C. Every block
//! says why it is sound.
#![allow(unsafe_code)]

use super::{BurstFn, IoError, IoStats, Port};
use crate::packet::Frame;
use crate::tables::Tables;
use crate::wire::ipv4::protocol;
use core::net::Ipv4Addr;
use std::ffi::CString;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, TxQueue, Umem};

/// The compiled steering programs.
static STEER_OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));

/// Bytes of headroom in front of every received frame (the pipeline
/// encapsulates into it: VXLAN needs 50).
const HEADROOM: usize = 64;
/// UMEM frame size.
const FRAME_SIZE: u32 = 2048;
/// Bytes the kernel reserves in front of each UMEM frame (XDP_PACKET_HEADROOM).
const XDP_HEADROOM: usize = 256;
/// The largest IPv4 MTU of one UMEM frame after the kernel's and the
/// pipeline's headroom, less the Ethernet header (1714): what a port
/// bound without multi-buffer carries.
pub const MAX_MTU: u16 = (FRAME_SIZE as usize - XDP_HEADROOM - HEADROOM - crate::wire::ethernet::HEADER_LEN) as u16;
/// The largest IPv4 MTU an AF_XDP port bound for multi-buffer
/// (`XDP_USE_SG`, Linux 6.6) carries: a jumbo frame in several UMEM
/// frames, as a TAP uplink does.
pub const MAX_SG_MTU: u16 = super::MAX_TAP_MTU;
/// `XDP_PKT_CONTD` (if_xdp.h): more buffers of this packet follow.
const XDP_PKT_CONTD: u32 = 1;
/// Frames kept back from the fill ring for copies into this port.
const TX_RESERVE: usize = 512;
/// Transmit kicks per flush at most (each sends up to 32 frames in copy
/// mode).
const TX_KICKS: usize = 8;

/// How an AF_XDP port is set up.
#[derive(Debug, Clone)]
pub struct AfXdpConfig {
    /// UMEM frames (2 KiB each).
    pub frames: u32,
    /// Entries of each ring (fill, completion, rx, tx); a power of two.
    pub ring: u32,
    /// Attach the XDP program in generic (skb) mode rather than trying
    /// native mode first.
    pub generic: bool,
    /// Try a zero-copy bind first (falls back to copy).
    pub zero_copy: bool,
    /// Set the busy-poll socket options (SO_PREFER_BUSY_POLL,
    /// SO_BUSY_POLL, SO_BUSY_POLL_BUDGET).
    pub busy_poll: bool,
    /// Complete the TCP and UDP checksums of every received IPv4 frame: a
    /// task's port, whose veth leaves them partial with transmit offloads
    /// on (copy mode carries no flag saying which are).
    pub complete_checksums: bool,
    /// Carry frames larger than one UMEM frame ([`MAX_MTU`]), up to
    /// [`MAX_SG_MTU`], as chains of them: a multi-buffer (`XDP_USE_SG`,
    /// Linux 6.6) bind in copy mode (a zero-copy driver may take fewer
    /// buffers a packet than a jumbo frame needs) and a steering program
    /// that takes them. For an underlay MTU above [`MAX_MTU`].
    pub multi_buffer: bool,
}

impl Default for AfXdpConfig {
    fn default() -> Self {
        AfXdpConfig {
            frames: 8192,
            ring: 2048,
            generic: false,
            zero_copy: true,
            busy_poll: false,
            complete_checksums: false,
            multi_buffer: false,
        }
    }
}

/// What the uplink's steering program sends to the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steering {
    /// The data-path address (VXLAN and published ports arrive there).
    pub data_ip: Ipv4Addr,
    /// The VXLAN UDP port.
    pub vxlan_port: u16,
    /// (address, port, protocol) of every published port and VIP.
    pub services: Vec<(Ipv4Addr, u16, u8)>,
    /// The egress address and source ports, whose replies (TCP/UDP to a
    /// port in the range, ICMP echo replies and errors about them) are the
    /// dataplane's; `None`: egress off.
    pub egress: Option<EgressSteer>,
}

/// The replies the steering program takes for egress: to `ip`, ports (or
/// ICMP echo ids) `lo..=hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressSteer {
    /// The egress (SNAT) address.
    pub ip: Ipv4Addr,
    /// The first port of the range.
    pub lo: u16,
    /// The last port of the range.
    pub hi: u16,
}

impl Steering {
    /// The steering for `t`: its data-path address and VXLAN port, its
    /// published ports (on the data-path address), its VIPs and its egress
    /// address and range (`Tables.egress`).
    pub fn for_tables(t: &Tables) -> Steering {
        let mut services = Vec::new();
        for s in &t.services.list {
            for &(port, _) in &s.published {
                for &a in core::iter::once(&t.data_ip).chain(&t.mesh_addrs) {
                    services.push((a, port, s.proto));
                }
            }
            match s.vip {
                // An every-port VIP: port 0 of both protocols (the
                // program's second lookup).
                Some((ip, 0)) => services.extend([(ip, 0, protocol::TCP), (ip, 0, protocol::UDP)]),
                Some((ip, port)) => services.push((ip, port, s.proto)),
                None => {}
            }
        }
        services.sort_unstable();
        services.dedup();
        let egress = t.egress.as_ref().map(|e| EgressSteer { ip: e.addr, lo: e.ports.lo, hi: e.ports.hi });
        Steering { data_ip: t.data_ip, vxlan_port: t.vxlan_port, services, egress }
    }
}

/// `config` map value (steer.bpf.c `struct config`).
#[repr(C)]
struct BpfConfig {
    data_ip: u32,
    vxlan_port: u16,
    pad: u16,
    egress_ip: u32,
    egress_lo: u16,
    egress_hi: u16,
}

impl BpfConfig {
    fn new(s: &Steering) -> Self {
        // Addresses and the VXLAN port in network order, as the program
        // compares them with the packet's; the range in host order.
        let (egress_ip, egress_lo, egress_hi) =
            s.egress.map_or((0, 0, 0), |e| (u32::from_ne_bytes(e.ip.octets()), e.lo, e.hi));
        BpfConfig {
            data_ip: u32::from_ne_bytes(s.data_ip.octets()),
            vxlan_port: s.vxlan_port.to_be(),
            pad: 0,
            egress_ip,
            egress_lo,
            egress_hi,
        }
    }
}

/// `services` map key (steer.bpf.c `struct service_key`).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct BpfServiceKey {
    ip: u32,
    port: u16,
    proto: u8,
    pad: u8,
}

impl BpfServiceKey {
    fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Self {
        // Network order in memory, as the program compares them.
        BpfServiceKey { ip: u32::from_ne_bytes(ip.octets()), port: port.to_be(), proto, pad: 0 }
    }
}

fn last_os_error(what: &'static str, port: &str) -> IoError {
    IoError::Setup { port: port.to_owned(), what, source: std::io::Error::last_os_error() }
}

fn neg_errno(what: &'static str, port: &str, rc: i32) -> IoError {
    IoError::Setup { port: port.to_owned(), what, source: std::io::Error::from_raw_os_error(-rc) }
}

/// A loaded and attached steering program.
struct XdpProgram {
    obj: *mut libxdp_sys::bpf_object,
    ifindex: i32,
    flags: u32,
    xsks: RawFd,
    config: RawFd,
    services: RawFd,
    stats: RawFd,
    generic: bool,
}

// SAFETY: the bpf_object is owned by this value alone (shared only behind
// an Arc, through `&self` methods that touch the kernel by map fds, which
// are plain file descriptors, never the object's memory) and libbpf objects
// are not tied to the thread that made them.
unsafe impl Send for XdpProgram {}
// SAFETY: as above: `&self` methods only pass map fds to system calls.
unsafe impl Sync for XdpProgram {}

/// XDP attach mode flags (linux/if_link.h).
const XDP_FLAGS_SKB_MODE: u32 = 2;
const XDP_FLAGS_DRV_MODE: u32 = 4;

impl XdpProgram {
    /// Loads the steering object and attaches `prog` to `iface`, natively
    /// unless `generic` (or native fails: then generic, logged).
    fn attach(iface: &str, prog: &str, generic: bool, frags: bool) -> Result<XdpProgram, IoError> {
        let (mut p, prog_fd) = Self::load(iface, prog, generic, frags)?;
        p.attach_fd(iface, prog_fd)?;
        Ok(p)
    }

    /// Loads the steering object (not attached: dropping it detaches
    /// nothing) and finds `prog` and the maps; `iface` names the interface
    /// in errors and is looked up.
    fn load(iface: &str, prog: &str, generic: bool, frags: bool) -> Result<(XdpProgram, RawFd), IoError> {
        let cname = CString::new(iface)
            .map_err(|_| IoError::Config { port: iface.to_owned(), msg: "interface name has a NUL byte".into() })?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(last_os_error("looking up the interface", iface));
        }
        // SAFETY: the buffer and its length describe a valid, immutable
        // static byte array; null options are allowed. libbpf copies what
        // it needs.
        let obj =
            unsafe { libxdp_sys::bpf_object__open_mem(STEER_OBJ.as_ptr().cast(), STEER_OBJ.len(), core::ptr::null()) };
        if obj.is_null() {
            return Err(last_os_error("opening the steering program", iface));
        }
        let mut p = XdpProgram {
            obj,
            ifindex: ifindex as i32,
            flags: 0,
            xsks: -1,
            config: -1,
            services: -1,
            stats: -1,
            generic,
        };
        if frags {
            p.set_frags(iface, prog)?;
        }
        // SAFETY: `obj` is a valid object from bpf_object__open_mem.
        let rc = unsafe { libxdp_sys::bpf_object__load(p.obj) };
        if rc != 0 {
            return Err(neg_errno("loading the steering program (is this root?)", iface, rc));
        }
        let prog_fd = p.program_fd(iface, prog)?;
        p.xsks = p.map_fd(iface, "xsks")?;
        p.config = p.map_fd(iface, "config")?;
        p.services = p.map_fd(iface, "services")?;
        p.stats = p.map_fd(iface, "stats")?;
        Ok((p, prog_fd))
    }

    /// Marks the object's program `prog`, before it is loaded, as one that
    /// takes multi-buffer frames (`BPF_F_XDP_HAS_FRAGS`, Linux 5.18: it
    /// reads only the first buffer's headers; a veth with a jumbo MTU
    /// accepts only such a program).
    fn set_frags(&self, iface: &str, prog: &str) -> Result<(), IoError> {
        const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;
        let prog_ptr = self.program(iface, prog)?;
        // SAFETY: `prog_ptr` is a program of the opened, not yet loaded,
        // object.
        let rc = unsafe { libxdp_sys::bpf_program__set_flags(prog_ptr, BPF_F_XDP_HAS_FRAGS) };
        if rc != 0 {
            return Err(neg_errno("marking the steering program multi-buffer", iface, rc));
        }
        Ok(())
    }

    /// The object's program `prog` (opened or loaded).
    fn program(&self, iface: &str, prog: &str) -> Result<*mut libxdp_sys::bpf_program, IoError> {
        let name = CString::new(prog)
            .map_err(|_| IoError::Config { port: iface.to_owned(), msg: "bad program name".into() })?;
        // SAFETY: `obj` is opened and `name` NUL-terminated.
        let prog_ptr = unsafe { libxdp_sys::bpf_object__find_program_by_name(self.obj, name.as_ptr()) };
        if prog_ptr.is_null() {
            return Err(IoError::Config {
                port: iface.to_owned(),
                msg: format!("no program {prog} in the steering object"),
            });
        }
        Ok(prog_ptr)
    }

    /// The descriptor of the loaded object's program `prog`.
    fn program_fd(&self, iface: &str, prog: &str) -> Result<RawFd, IoError> {
        let prog_ptr = self.program(iface, prog)?;
        // SAFETY: `prog_ptr` is a program of the loaded object.
        Ok(unsafe { libxdp_sys::bpf_program__fd(prog_ptr) })
    }

    /// The descriptor of the loaded object's map `n`.
    fn map_fd(&self, iface: &str, n: &str) -> Result<RawFd, IoError> {
        let c = CString::new(n).map_err(|_| IoError::Config { port: iface.to_owned(), msg: "bad map name".into() })?;
        // SAFETY: `obj` is loaded and `c` NUL-terminated.
        let fd = unsafe { libxdp_sys::bpf_object__find_map_fd_by_name(self.obj, c.as_ptr()) };
        if fd < 0 {
            return Err(IoError::Config { port: iface.to_owned(), msg: format!("no map {n} in the steering object") });
        }
        Ok(fd)
    }

    /// Attaches the program `prog_fd` to the interface: natively unless
    /// `generic` (or native fails: then generic, logged).
    fn attach_fd(&mut self, iface: &str, prog_fd: RawFd) -> Result<(), IoError> {
        let ifindex = self.ifindex;
        let try_attach = |flags: u32| {
            // SAFETY: a valid ifindex and program fd; null options.
            unsafe { libxdp_sys::bpf_xdp_attach(ifindex, prog_fd, flags, core::ptr::null()) }
        };
        if !self.generic {
            let rc = try_attach(XDP_FLAGS_DRV_MODE);
            if rc == 0 {
                self.flags = XDP_FLAGS_DRV_MODE;
                return Ok(());
            }
            tracing::warn!(
                "{iface}: native XDP unavailable ({}); using generic XDP",
                std::io::Error::from_raw_os_error(-rc)
            );
            self.generic = true;
        }
        let rc = try_attach(XDP_FLAGS_SKB_MODE);
        if rc != 0 {
            return Err(neg_errno("attaching the XDP program", iface, rc));
        }
        self.flags = XDP_FLAGS_SKB_MODE;
        Ok(())
    }

    fn update<K, V>(&self, fd: RawFd, key: &K, value: &V, what: &'static str, port: &str) -> Result<(), IoError> {
        // SAFETY: key and value point to live values of the map's key and
        // value sizes (the repr(C) mirrors of steer.bpf.c's types).
        let rc =
            unsafe { libxdp_sys::bpf_map_update_elem(fd, (key as *const K).cast(), (value as *const V).cast(), 0) };
        if rc != 0 { Err(neg_errno(what, port, rc)) } else { Ok(()) }
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        if self.flags != 0 {
            // SAFETY: detaches what `attach` attached, in the same mode.
            unsafe { libxdp_sys::bpf_xdp_detach(self.ifindex, self.flags, core::ptr::null()) };
        }
        // SAFETY: `obj` came from bpf_object__open_mem and is closed once.
        unsafe { libxdp_sys::bpf_object__close(self.obj) };
    }
}

/// Writes the uplink program's maps: the config and the service set
/// (stale entries deleted).
fn set_steering(p: &XdpProgram, s: &Steering, port: &str) -> Result<(), IoError> {
    let cfg = BpfConfig::new(s);
    p.update(p.config, &0u32, &cfg, "writing the steering config", port)?;
    let want: Vec<BpfServiceKey> = s.services.iter().map(|&(ip, pt, pr)| BpfServiceKey::new(ip, pt, pr)).collect();
    for k in &want {
        p.update(p.services, k, &1u8, "writing the steering services", port)?;
    }
    // Delete keys no longer wanted.
    let mut stale = Vec::new();
    let mut key = BpfServiceKey::default();
    let mut first = true;
    loop {
        let mut next = BpfServiceKey::default();
        let prev: *const BpfServiceKey = if first { core::ptr::null() } else { &key };
        // SAFETY: `prev` is null (first key) or a live key; `next` is a
        // writable key-sized value.
        let rc = unsafe {
            libxdp_sys::bpf_map_get_next_key(p.services, prev.cast(), (&mut next as *mut BpfServiceKey).cast())
        };
        if rc != 0 {
            break;
        }
        if !want.contains(&next) {
            stale.push(next);
        }
        key = next;
        first = false;
    }
    for k in stale {
        // SAFETY: `k` is a live key-sized value.
        unsafe { libxdp_sys::bpf_map_delete_elem(p.services, (&k as *const BpfServiceKey).cast()) };
    }
    Ok(())
}

/// The steering program's counters: frames redirected to the socket,
/// passed to the kernel, and chosen for the socket (redirected, or passed
/// for want of a socket in the queue's slot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteeringStats {
    /// Frames redirected to the dataplane.
    pub redirected: u64,
    /// Frames passed to the kernel.
    pub passed: u64,
    /// Frames the program chose for the socket.
    pub matched: u64,
}

/// A handle to update an uplink's steering maps from another thread while
/// the port runs (duplicated map descriptors, closed on drop).
#[derive(Debug)]
pub struct SteeringHandle {
    port: String,
    config: std::os::fd::OwnedFd,
    services: std::os::fd::OwnedFd,
    stats: std::os::fd::OwnedFd,
}

impl SteeringHandle {
    /// Rewrites the maps for `s` (when the tables change).
    pub fn set(&self, s: &Steering) -> Result<(), IoError> {
        // A program value that borrows the duplicated fds and owns nothing.
        let p = std::mem::ManuallyDrop::new(XdpProgram {
            obj: core::ptr::null_mut(),
            ifindex: 0,
            flags: 0,
            xsks: -1,
            config: self.config.as_raw_fd(),
            services: self.services.as_raw_fd(),
            stats: self.stats.as_raw_fd(),
            generic: false,
        });
        set_steering(&p, s, &self.port)
    }

    /// The program's counters.
    pub fn stats(&self) -> SteeringStats {
        let read = |i: u32| {
            let mut v = 0u64;
            // SAFETY: key and value point to live u32 and u64 values, the
            // map's key and value sizes.
            let rc = unsafe {
                libxdp_sys::bpf_map_lookup_elem(
                    self.stats.as_raw_fd(),
                    (&i as *const u32).cast(),
                    (&mut v as *mut u64).cast(),
                )
            };
            if rc == 0 { v } else { 0 }
        };
        SteeringStats { redirected: read(0), passed: read(1), matched: read(2) }
    }
}

fn dup(fd: RawFd, port: &str) -> Result<std::os::fd::OwnedFd, IoError> {
    // SAFETY: `fd` is an open descriptor owned by the program for the
    // duration of this call.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    b.try_clone_to_owned().map_err(|source| IoError::Setup {
        port: port.to_owned(),
        what: "duplicating a map fd",
        source,
    })
}

/// An AF_XDP port: one socket on one queue of an interface.
pub struct AfXdpPort {
    name: String,
    // Queues before the UMEM and program: dropped first.
    rx: RxQueue,
    tx: TxQueue,
    fq: FillQueue,
    cq: CompQueue,
    umem: Umem,
    /// Start of the UMEM region and its length.
    base: *mut u8,
    umem_len: usize,
    /// Frames owned by userspace and not in any ring.
    free: Vec<FrameDesc>,
    /// Frames queued for transmission (produced to the tx ring on flush).
    pending: Vec<FrameDesc>,
    /// Receive scratch.
    descs: Vec<FrameDesc>,
    /// Transmitted frames not yet completed.
    in_flight: usize,
    /// Entries of the tx ring.
    ring: usize,
    stats: IoStats,
    bind_mode: &'static str,
    prog: Arc<XdpProgram>,
    /// [`AfXdpConfig::complete_checksums`].
    complete_checksums: bool,
    /// The last receive emptied the rx ring (the socket's descriptor
    /// signals the next frame).
    drained: bool,
    /// [`AfXdpConfig::busy_poll`]: an empty rx ring drives the device's
    /// receive from this thread (`recvfrom` with `MSG_DONTWAIT`).
    busy_poll: bool,
    /// Bound with `XDP_USE_SG`: a packet larger than one UMEM frame comes
    /// and goes as a chain of them.
    multi_buffer: bool,
    /// The packet being gathered from a chain of buffers: its bytes so far
    /// (or [`OVERSIZE`]); it may continue into the next burst.
    carry: Option<usize>,
    /// Where it is gathered, after [`HEADROOM`].
    carry_buf: Vec<u8>,
    /// The gathered packets of the current burst, in order (buffers kept
    /// from burst to burst).
    gathered: Vec<Vec<u8>>,
}

/// [`AfXdpPort::carry`] of a packet larger than [`super::SEGMENT_ROOM`]:
/// its buffers are freed as they come and it is dropped.
const OVERSIZE: usize = usize::MAX;

/// A packet of a received burst: in one UMEM frame (the descriptor's
/// index), or gathered from several (its length; the burst's next
/// gathered buffer).
#[derive(Debug, Clone, Copy)]
enum Packet {
    One(usize),
    Gathered(usize),
}

// SAFETY: `base` points into the UMEM mapping this port owns (through
// `umem`), used only through `&mut self`; the xsk-rs queues and UMEM are
// Send; `XdpProgram` is Send (above).
unsafe impl Send for AfXdpPort {}

impl std::fmt::Debug for AfXdpPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfXdpPort").field("name", &self.name).field("bind", &self.bind_mode).finish()
    }
}

impl AfXdpPort {
    /// Opens `iface` queue `queue`: attaches the steering program (the
    /// uplink's with `steering`, else the task port's, which takes every
    /// frame), creates the UMEM and socket, and registers the socket in
    /// the program's map.
    pub fn open(iface: &str, queue: u32, cfg: &AfXdpConfig, steering: Option<Steering>) -> Result<AfXdpPort, IoError> {
        let mut v = Self::open_queues(iface, &[queue], cfg, steering)?;
        v.pop().ok_or_else(|| IoError::Config { port: iface.to_owned(), msg: "no queue".into() })
    }

    /// Opens one socket on each of `queues` of `iface` (one per worker),
    /// all fed by one steering program, which is detached when the last of
    /// them is dropped.
    pub fn open_queues(
        iface: &str,
        queues: &[u32],
        cfg: &AfXdpConfig,
        steering: Option<Steering>,
    ) -> Result<Vec<AfXdpPort>, IoError> {
        let prog = XdpProgram::attach(
            iface,
            if steering.is_some() { "steer_uplink" } else { "steer_all" },
            cfg.generic,
            cfg.multi_buffer,
        )?;
        if let Some(s) = &steering {
            set_steering(&prog, s, iface)?;
        }
        let prog = Arc::new(prog);
        queues.iter().map(|&q| Self::open_socket(iface, q, cfg, prog.clone())).collect()
    }

    fn open_socket(iface: &str, queue: u32, cfg: &AfXdpConfig, prog: Arc<XdpProgram>) -> Result<AfXdpPort, IoError> {
        let cerr = |msg: String| IoError::Config { port: iface.to_owned(), msg };
        let ring = QueueSize::new(cfg.ring).map_err(|e| cerr(format!("ring size: {e}")))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| cerr(format!("frame size: {e}")))?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .frame_headroom(HEADROOM as u32)
            .build()
            .map_err(|e| cerr(format!("UMEM config: {e}")))?;
        let frames =
            NonZeroU32::new(cfg.frames.max(cfg.ring.saturating_mul(2))).ok_or_else(|| cerr("no UMEM frames".into()))?;
        let (umem, free) = Umem::new(umem_cfg, frames, false).map_err(|e| IoError::Setup {
            port: iface.to_owned(),
            what: "creating the UMEM",
            source: std::io::Error::other(e.to_string()),
        })?;
        let ifname: Interface = iface.parse().map_err(|_| cerr("bad interface name".into()))?;
        let mk = |zc: bool, sg: bool| {
            let copy = if zc { BindFlags::XDP_ZEROCOPY } else { BindFlags::XDP_COPY };
            let sg = if sg { BindFlags::XDP_USE_SG } else { BindFlags::empty() };
            let sc = SocketConfig::builder()
                .rx_queue_size(ring)
                .tx_queue_size(ring)
                .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP | copy | sg)
                .build();
            // SAFETY: the UMEM is fresh and used by this socket alone, so
            // no other socket shares its (interface, queue) binding.
            unsafe { xsk_rs::Socket::new(sc, &umem, &ifname, queue) }
        };
        // Multi-buffer: copy mode only. Otherwise zero-copy first.
        let modes: &[bool] = match (cfg.multi_buffer, cfg.zero_copy) {
            (true, _) | (false, false) => &[false],
            (false, true) => &[true, false],
        };
        let what = if cfg.multi_buffer {
            "creating the AF_XDP socket with multi-buffer (XDP_USE_SG: Linux 6.6; an underlay MTU above 1714 needs it)"
        } else {
            "creating the AF_XDP socket"
        };
        let mut created = Err(cerr("no bind mode to try".into()));
        for &zc in modes {
            created = mk(zc, cfg.multi_buffer).map(|q| (q, zc)).map_err(|e| IoError::Setup {
                port: iface.to_owned(),
                what,
                source: std::io::Error::other(e.to_string()),
            });
            if created.is_ok() {
                break;
            }
        }
        let ((tx, rx, fqcq), zc) = created?;
        let (bind_mode, multi_buffer) = (if zc { "zero-copy" } else { "copy" }, cfg.multi_buffer);
        let (fq, cq) = fqcq.ok_or_else(|| cerr("the UMEM came without fill and completion rings".into()))?;
        let fd = rx.fd().as_raw_fd();
        prog.update(prog.xsks, &queue, &fd, "registering the socket in the XSK map", iface)?;
        if cfg.busy_poll {
            set_busy_poll(fd, iface)?;
        }
        let tx_budget = set_tx_budget(fd, cfg.ring);
        // The UMEM's base address, from the first frame's data pointer
        // (data starts at the descriptor's address).
        let mut first = *free.first().ok_or_else(|| cerr("no UMEM frames".into()))?;
        // SAFETY: `first` describes a frame of this UMEM that no ring holds
        // yet; the borrow ends at once and only its address is kept.
        let p0 = unsafe { umem.data_mut(&mut first) }.contents_mut().as_mut_ptr();
        let base = p0.wrapping_sub(first.addr());
        let umem_len = frames.get() as usize * FRAME_SIZE as usize;
        let mut port = AfXdpPort {
            name: iface.to_owned(),
            rx,
            tx,
            fq,
            cq,
            umem,
            base,
            umem_len,
            pending: Vec::with_capacity(2 * cfg.ring as usize),
            descs: vec![FrameDesc::default(); super::BURST],
            free,
            in_flight: 0,
            ring: cfg.ring as usize,
            stats: IoStats::default(),
            bind_mode,
            prog,
            complete_checksums: cfg.complete_checksums,
            drained: false,
            busy_poll: cfg.busy_poll,
            multi_buffer,
            carry: None,
            carry_buf: Vec::new(),
            gathered: Vec::new(),
        };
        port.refill();
        tracing::info!(
            "{iface} queue {queue}: AF_XDP {bind_mode}{}, XDP {}, {} per send",
            if multi_buffer { " multi-buffer" } else { "" },
            if port.prog.generic { "generic" } else { "native" },
            if tx_budget { "the whole tx ring" } else { "32 frames (kernel before 6.17)" }
        );
        Ok(port)
    }

    /// A handle to this port's steering maps (for table changes).
    pub fn steering(&self) -> Result<SteeringHandle, IoError> {
        Ok(SteeringHandle {
            port: self.name.clone(),
            config: dup(self.prog.config, &self.name)?,
            services: dup(self.prog.services, &self.name)?,
            stats: dup(self.prog.stats, &self.name)?,
        })
    }

    /// Copy or zero-copy, as bound.
    pub fn bind_mode(&self) -> &'static str {
        self.bind_mode
    }

    /// Splits a received burst into packets: a packet in one frame stays
    /// where it is; the buffers of a chained one are copied, in order, into
    /// [`AfXdpPort::carry_buf`] and freed, and the whole packet becomes the
    /// burst's next gathered buffer. Returns the packets and their number.
    fn packets(&mut self, descs: &[FrameDesc]) -> ([Packet; super::BURST], usize) {
        let mut pkts = [Packet::One(0); super::BURST];
        let (mut np, mut ng) = (0, 0);
        for (k, d) in descs.iter().enumerate() {
            let more = d.options() & XDP_PKT_CONTD != 0;
            if self.carry.is_none() && !more {
                pkts[np] = Packet::One(k);
                np += 1;
                continue;
            }
            let so_far = self.carry.unwrap_or(0);
            let len = d.lengths().data();
            // SAFETY: `d` just came off the rx ring: a frame of this UMEM
            // in no ring, and no slice of it is alive (the burst's frames
            // are made after this pass).
            let src =
                unsafe { Self::buffer(self.base, self.umem_len, d) }.and_then(|b| b.get(HEADROOM..HEADROOM + len));
            self.carry = match src {
                Some(src) if so_far != OVERSIZE && so_far + len <= super::SEGMENT_ROOM => {
                    if self.carry_buf.len() < HEADROOM + super::SEGMENT_ROOM {
                        self.carry_buf.resize(HEADROOM + super::SEGMENT_ROOM, 0);
                    }
                    let to = HEADROOM + so_far;
                    self.carry_buf[to..to + len].copy_from_slice(src);
                    Some(so_far + len)
                }
                _ => Some(OVERSIZE),
            };
            self.free.push(*d);
            if more {
                continue;
            }
            match self.carry.take() {
                Some(l) if l != OVERSIZE => {
                    if self.gathered.len() <= ng {
                        self.gathered.push(Vec::new());
                    }
                    std::mem::swap(&mut self.gathered[ng], &mut self.carry_buf);
                    pkts[np] = Packet::Gathered(l);
                    np += 1;
                    ng += 1;
                }
                _ => self.stats.rx_oversize += 1,
            }
        }
        (pkts, np)
    }

    /// Frame room per UMEM frame: headroom plus data.
    fn room() -> usize {
        FRAME_SIZE as usize - XDP_HEADROOM
    }

    /// Gives free frames to the fill ring (keeping some back for copies).
    fn refill(&mut self) {
        let spare = self.free.len().saturating_sub(TX_RESERVE);
        if spare == 0 {
            return;
        }
        let want = self.fq.nb_free(spare as u32) as usize;
        let n = want.min(spare);
        if n == 0 {
            return;
        }
        let from = self.free.len() - n;
        // SAFETY: the frames are this UMEM's and in no ring (they are on
        // the free list, which they leave now).
        let done = unsafe { self.fq.produce(&self.free[from..]) };
        if done == n {
            self.free.truncate(from);
        }
    }

    /// Takes back completed transmissions.
    fn reclaim(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let mut done = [FrameDesc::default(); super::BURST];
        loop {
            // SAFETY: the completion ring returns frames of this UMEM the
            // kernel is done with; they go to the free list.
            let n = unsafe { self.cq.consume(&mut done) };
            self.free.extend_from_slice(&done[..n]);
            self.in_flight = self.in_flight.saturating_sub(n);
            if n < done.len() {
                break;
            }
        }
    }

    /// The frame buffer of descriptor `d`: its headroom and data room.
    ///
    /// # Safety
    /// `d` must be a frame of this UMEM that no ring holds and that no
    /// other live slice covers.
    unsafe fn buffer<'a>(base: *mut u8, umem_len: usize, d: &FrameDesc) -> Option<&'a mut [u8]> {
        let start = d.addr().checked_sub(HEADROOM)?;
        let len = Self::room();
        if start + len > umem_len {
            return None;
        }
        // SAFETY: [start, start + len) lies inside the UMEM mapping (checked
        // above) within one frame (the data starts HEADROOM bytes into the
        // frame's room), and by the caller's contract nothing else
        // accesses that frame while the slice lives.
        Some(unsafe { std::slice::from_raw_parts_mut(base.add(start), len) })
    }
}

/// `XDP_MAX_TX_SKB_BUDGET` (`SOL_XDP`, Linux 6.17): how many descriptors
/// one `sendto` hands the driver in copy mode (32 by default), raised to
/// the whole tx ring so that a burst goes out in one system call. False
/// on an older kernel: the flush then kicks until the ring is drained.
fn set_tx_budget(fd: RawFd, ring: u32) -> bool {
    const SOL_XDP: libc::c_int = 283;
    const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;
    let val: u32 = ring;
    // SAFETY: `fd` is an open AF_XDP socket with a tx ring; the value is a
    // live u32 of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            XDP_MAX_TX_SKB_BUDGET,
            (&val as *const u32).cast(),
            core::mem::size_of::<u32>() as u32,
        )
    };
    rc == 0
}

fn set_busy_poll(fd: RawFd, port: &str) -> Result<(), IoError> {
    // SO_PREFER_BUSY_POLL = 69, SO_BUSY_POLL = 46, SO_BUSY_POLL_BUDGET = 70.
    for (opt, val) in [(69, 1i32), (46, 20), (70, super::BURST as i32)] {
        // SAFETY: `fd` is an open socket; the value is a live i32 of the
        // given size.
        let rc = unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&val as *const i32).cast(), core::mem::size_of::<i32>() as u32)
        };
        if rc != 0 {
            return Err(last_os_error("setting busy-poll socket options", port));
        }
    }
    Ok(())
}

impl Port for AfXdpPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn rx_burst(&mut self, f: &mut BurstFn<'_>) -> usize {
        self.reclaim();
        self.refill();
        // SAFETY: `descs` is scratch space; the rx ring hands over frames
        // of this UMEM that are now ours.
        let n = unsafe { self.rx.consume(&mut self.descs) };
        self.drained = n < super::BURST;
        if n == 0 && self.busy_poll {
            // With SO_PREFER_BUSY_POLL set, a non-blocking receive runs
            // the device's NAPI poll here (up to SO_BUSY_POLL_BUDGET
            // frames) instead of waiting for its interrupt.
            // SAFETY: `fd` is this open socket; a null buffer of length 0
            // is allowed for an AF_XDP socket, which copies nothing.
            let _ = unsafe {
                libc::recvfrom(
                    self.rx.fd().as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
        if n == 0 {
            if self.fq.needs_wakeup() {
                let _ = self.fq.wakeup(self.rx.fd_mut(), 0);
            }
            return 0;
        }
        // The scratch out of `self` for the burst (put back at the end).
        let descs = std::mem::take(&mut self.descs);
        let (pkts, np) = self.packets(&descs[..n]);
        self.stats.rx += np as u64;
        let (base, umem_len, complete) = (self.base, self.umem_len, self.complete_checksums);
        let mut marks = [false; super::BURST];
        let mut windows = [(0usize, 0usize); super::BURST];
        let mut chained = [false; super::BURST];
        // The gathered packets' buffers, out of `self` while frames
        // borrow them.
        let mut gathered = std::mem::take(&mut self.gathered);
        {
            let mut bufs = gathered.iter_mut();
            let mut frames: [Frame<'_>; super::BURST] = core::array::from_fn(|i| {
                if i >= np {
                    return Frame::detached();
                }
                let mut fr = match pkts[i] {
                    Packet::One(k) => {
                        let d = &descs[k];
                        // SAFETY: the n descriptors just came off the rx
                        // ring: each is a distinct frame of this UMEM, in
                        // no ring, so the slices do not overlap and nothing
                        // else touches them until they are dropped at the
                        // end of this block.
                        match unsafe { Self::buffer(base, umem_len, d) } {
                            Some(b) => Frame::new(b, HEADROOM, d.lengths().data()).unwrap_or_else(Frame::detached),
                            None => Frame::detached(),
                        }
                    }
                    // Gathered packets take the buffers in order.
                    Packet::Gathered(len) => match bufs.next() {
                        Some(b) => Frame::new(b, HEADROOM, len).unwrap_or_else(Frame::detached),
                        None => Frame::detached(),
                    },
                };
                if complete {
                    crate::wire::rewrite::complete_frame_checksums(fr.data_mut());
                }
                fr
            });
            f(&mut frames[..np], &mut marks);
            for (i, fr) in frames[..np].iter_mut().enumerate() {
                if !marks[i] {
                    continue;
                }
                let (s, l) = (fr.start(), fr.len());
                if let Packet::Gathered(_) = pkts[i] {
                    // Sent back by copying from the gathered buffer below.
                    windows[i] = (s, l);
                    continue;
                }
                // The descriptor's data starts at HEADROOM: a frame that
                // moved (encapsulated into the headroom, decapsulated)
                // moves back, within its own buffer.
                if s != HEADROOM {
                    let buf = fr.buf_mut();
                    if HEADROOM + l > buf.len() {
                        // Grown past its UMEM frame (encapsulated on a
                        // jumbo underlay): sent as a chain of copies.
                        if self.multi_buffer {
                            windows[i] = (s, l);
                            chained[i] = true;
                        } else {
                            marks[i] = false;
                            self.stats.tx_full += 1;
                        }
                        continue;
                    }
                    buf.copy_within(s..s + l, HEADROOM);
                }
                windows[i] = (HEADROOM, l);
            }
        }
        // Out in the order received: a one-buffer frame's own descriptor,
        // a gathered one copied into free frames; unsent descriptors back
        // to the free list.
        let mut g = 0;
        for i in 0..np {
            match pkts[i] {
                Packet::One(k) if marks[i] && chained[i] => {
                    let d = descs[k];
                    let (s, l) = windows[i];
                    // SAFETY: `d` is still ours (in no ring) and no slice
                    // of it is alive any more; `tx_copy` writes only into
                    // frames of the free list, which `d` is not on yet.
                    if let Some(b) = unsafe { Self::buffer(self.base, self.umem_len, &d) }.and_then(|b| b.get(s..s + l))
                    {
                        self.tx_copy(b);
                    }
                    self.free.push(d);
                }
                Packet::One(k) => {
                    let mut d = descs[k];
                    if marks[i] {
                        d.set_options(0);
                        // SAFETY: `d` is still ours (in no ring) and no
                        // slice of it is alive any more.
                        unsafe { self.umem.data_mut(&mut d) }.cursor().set_pos(windows[i].1);
                        self.pending.push(d);
                    } else {
                        self.free.push(d);
                    }
                }
                Packet::Gathered(_) => {
                    if marks[i] {
                        let (s, l) = windows[i];
                        if let Some(b) = gathered.get(g).and_then(|b| b.get(s..s + l)) {
                            self.tx_copy(b);
                        }
                    }
                    g += 1;
                }
            }
        }
        self.gathered = gathered;
        self.descs = descs;
        // Something was received, if only the first buffers of a packet.
        np.max(1)
    }

    fn tx_copy(&mut self, frame: &[u8]) -> bool {
        // One UMEM frame's room, or several chained (multi-buffer).
        let room = Self::room() - HEADROOM;
        let parts = frame.len().div_ceil(room);
        if parts == 0 || (parts > 1 && (!self.multi_buffer || frame.len() > super::SEGMENT_ROOM)) {
            self.stats.errors += 1;
            return false;
        }
        if self.free.len() < parts {
            self.reclaim();
        }
        if self.free.len() < parts {
            self.stats.tx_full += 1;
            return false;
        }
        let first = self.pending.len();
        for (k, piece) in frame.chunks(room).enumerate() {
            let Some(mut d) = self.free.pop() else { break };
            // SAFETY: `d` came off the free list: a frame of this UMEM in
            // no ring, with no other slice of it alive.
            match unsafe { Self::buffer(self.base, self.umem_len, &d) } {
                Some(b) => b[HEADROOM..HEADROOM + piece.len()].copy_from_slice(piece),
                None => {
                    // Undo the packet's parts queued so far.
                    let mut undone = self.pending.split_off(first);
                    undone.push(d);
                    undone.iter_mut().for_each(|d| d.set_options(0));
                    self.free.append(&mut undone);
                    self.stats.errors += 1;
                    return false;
                }
            }
            d.set_options(if k + 1 < parts { XDP_PKT_CONTD } else { 0 });
            // SAFETY: as above; the slice is gone.
            unsafe { self.umem.data_mut(&mut d) }.cursor().set_pos(piece.len());
            self.pending.push(d);
        }
        true
    }

    fn tx_frame(&mut self, f: &crate::packet::Frame<'_>) -> bool {
        let sent = super::tx_segments(f, |d| self.tx_copy(d));
        self.stats.count(sent)
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let room = self.tx.nb_free(self.pending.len() as u32) as usize;
            let mut k = room.min(self.pending.len());
            // Whole packets only: a multi-buffer packet's parts go
            // together or not at all.
            while k > 0 && self.pending[k - 1].options() & XDP_PKT_CONTD != 0 {
                k -= 1;
            }
            // SAFETY: the pending frames are this UMEM's, in no ring, and
            // their lengths are set; produce takes all k or none.
            let done = if k > 0 { unsafe { self.tx.produce(&self.pending[..k]) } } else { 0 };
            let packets = |d: &[FrameDesc]| d.iter().filter(|d| d.options() & XDP_PKT_CONTD == 0).count() as u64;
            self.stats.tx += packets(&self.pending[..done]);
            self.stats.tx_full += packets(&self.pending[done..]);
            self.in_flight += done;
            self.free.extend(self.pending.drain(..).skip(done));
        }
        // A kick sends at most 32 frames in copy mode (the kernel's
        // TX_BATCH_SIZE): kick until the ring is drained, within reason.
        let mut kicks = 0;
        while self.tx.needs_wakeup() && kicks < TX_KICKS {
            let queued = self.ring.saturating_sub(self.tx.nb_free_exact() as usize);
            if queued == 0 {
                break;
            }
            if self.tx.wakeup().is_err() {
                break;
            }
            kicks += 1;
        }
        self.reclaim();
    }

    fn drained(&self) -> bool {
        self.drained
    }

    fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    fn stats(&self) -> IoStats {
        let mut s = self.stats;
        s.rx_kernel_dropped = kernel_drops(self.rx.fd().as_raw_fd());
        s
    }
}

/// `struct xdp_statistics` (Linux 5.9 and later).
#[repr(C)]
#[derive(Default)]
struct XdpStatistics {
    rx_dropped: u64,
    rx_invalid_descs: u64,
    tx_invalid_descs: u64,
    rx_ring_full: u64,
    rx_fill_ring_empty_descs: u64,
    tx_ring_empty_descs: u64,
}

/// Frames the kernel dropped on their way into this socket
/// (`XDP_STATISTICS`: no room in the rx ring, no fill buffer, other
/// drops); 0 if the kernel does not say.
fn kernel_drops(fd: RawFd) -> u64 {
    const SOL_XDP: libc::c_int = 283;
    const XDP_STATISTICS: libc::c_int = 7;
    let mut st = XdpStatistics::default();
    let mut len = core::mem::size_of::<XdpStatistics>() as libc::socklen_t;
    // SAFETY: `fd` is an open AF_XDP socket; the kernel writes at most
    // `len` bytes into `st`, a live struct of that size, and `len` back.
    let rc = unsafe { libc::getsockopt(fd, SOL_XDP, XDP_STATISTICS, (&mut st as *mut XdpStatistics).cast(), &mut len) };
    if rc != 0 {
        return 0;
    }
    st.rx_dropped + st.rx_ring_full + st.rx_fill_ring_empty_descs
}

#[cfg(test)]
mod tests {
    //! `steer_uplink` run by the kernel on frames (`BPF_PROG_TEST_RUN`,
    //! root; skipped otherwise): no socket is bound, so every frame is
    //! passed, and the program's choice is read from the `matched` slot.
    use super::*;
    use etherparse::PacketBuilder;

    const EGRESS: [u8; 4] = [198, 18, 0, 1];
    const OTHER: [u8; 4] = [198, 18, 0, 2];
    const OUTSIDE: [u8; 4] = [198, 18, 3, 10];
    const ROUTER: [u8; 4] = [198, 18, 0, 254];
    const MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 0xfe], [2, 0, 0, 0, 0, 1]);

    fn is_root() -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) == 0
    }

    fn eth() -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
        PacketBuilder::ethernet2(MACS.0, MACS.1)
    }

    fn tcp(dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        eth().ipv4(OUTSIDE, dst, 60).tcp(sport, dport, 1, 1000).syn().ack(1).write(&mut v, &[]).expect("tcp");
        v
    }

    fn udp(dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        eth().ipv4(OUTSIDE, dst, 60).udp(sport, dport).write(&mut v, b"reply").expect("udp");
        v
    }

    fn echo(reply: bool, dst: [u8; 4], id: u16) -> Vec<u8> {
        let mut v = Vec::new();
        let b = eth().ipv4(OUTSIDE, dst, 60);
        let b = if reply { b.icmpv4_echo_reply(id, 7) } else { b.icmpv4_echo_request(id, 7) };
        b.write(&mut v, b"ping").expect("echo");
        v
    }

    /// An ICMP error of `kind` from the router to `dst`, quoting `quoted`
    /// (an IPv4 packet, cut to `cut` bytes).
    fn error(kind: u8, code: u8, dst: [u8; 4], quoted: &[u8], cut: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let q = &quoted[..cut.min(quoted.len())];
        eth().ipv4(ROUTER, dst, 60).icmpv4_raw(kind, code, [0, 0, 5, 20]).write(&mut v, q).expect("error");
        v
    }

    /// The packet `src` sent (no Ethernet header) with `opts` 4-byte words
    /// of IPv4 options: UDP or TCP from port `sport`, or (ICMP) an echo
    /// request (`sport` its id; 0: an echo reply with id 61040).
    fn quoted(src: [u8; 4], proto: u8, sport: u16, opts: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let mut h = etherparse::Ipv4Header::new(0, 63, etherparse::IpNumber(proto), src, OUTSIDE).expect("ip");
        if opts > 0 {
            h.options = etherparse::Ipv4Options::try_from(&[1u8; 40][..opts * 4]).expect("options");
        }
        let l4: Vec<u8> = match proto {
            17 => {
                let u = etherparse::UdpHeader { source_port: sport, destination_port: 53, length: 12, checksum: 9 };
                let mut b = u.to_bytes().to_vec();
                b.extend_from_slice(b"dns?");
                b
            }
            6 => etherparse::TcpHeader::new(sport, 443, 5, 1000).to_bytes().to_vec(),
            _ => {
                // Type, code, checksum, id, sequence.
                let (kind, id) = if sport == 0 { (0, 61040) } else { (8, sport) };
                let mut b = vec![kind, 0, 0, 0];
                b.extend_from_slice(&u16::to_be_bytes(id));
                b.extend_from_slice(&[0, 1]);
                b
            }
        };
        h.set_payload_len(l4.len()).expect("length");
        h.write(&mut v).expect("header");
        v.extend_from_slice(&l4);
        v
    }

    /// An ICMP error (`kind`, `code`) to the egress address quoting
    /// `quoted(src, proto, sport, opts)` cut to `cut` bytes.
    fn err_about(kind: u8, code: u8, src: [u8; 4], proto: u8, sport: u16, opts: usize, cut: usize) -> Vec<u8> {
        error(kind, code, EGRESS, &quoted(src, proto, sport, opts), cut)
    }

    struct Loaded {
        p: XdpProgram,
        prog: RawFd,
    }

    impl Loaded {
        fn matched(&self) -> u64 {
            let (i, mut v) = (2u32, 0u64);
            // SAFETY: key and value point to live u32 and u64 values, the
            // map's key and value sizes.
            let rc = unsafe {
                libxdp_sys::bpf_map_lookup_elem(self.p.stats, (&i as *const u32).cast(), (&mut v as *mut u64).cast())
            };
            assert_eq!(rc, 0, "reading stats[2]");
            v
        }

        /// True if the program chose the socket for `f` (it returns
        /// XDP_PASS either way: no socket is bound).
        fn steers(&self, f: &[u8]) -> bool {
            let before = self.matched();
            let mut out = vec![0u8; f.len() + 256];
            // SAFETY: all-zero is a valid value of this plain C struct.
            let mut o: libxdp_sys::bpf_test_run_opts = unsafe { core::mem::zeroed() };
            o.sz = core::mem::size_of::<libxdp_sys::bpf_test_run_opts>();
            o.data_in = f.as_ptr().cast();
            o.data_size_in = f.len() as u32;
            o.data_out = out.as_mut_ptr().cast();
            o.data_size_out = out.len() as u32;
            o.repeat = 1;
            // SAFETY: `o` describes live buffers of the given sizes, and
            // `prog` is a loaded XDP program.
            let rc = unsafe { libxdp_sys::bpf_prog_test_run_opts(self.prog, &mut o) };
            assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
            assert_eq!(o.retval, 2, "without a socket every frame is XDP_PASS");
            match self.matched() - before {
                0 => false,
                1 => true,
                n => panic!("matched counted {n} times for one frame"),
            }
        }
    }

    fn steering(egress: bool) -> Steering {
        Steering {
            data_ip: Ipv4Addr::from(EGRESS),
            vxlan_port: 4789,
            services: vec![(Ipv4Addr::from(EGRESS), 30080, 6)],
            egress: egress.then_some(EgressSteer { ip: Ipv4Addr::from(EGRESS), lo: 61000, hi: 61099 }),
        }
    }

    #[test]
    fn egress_replies_reach_the_socket_and_the_rest_the_kernel() {
        if !is_root() {
            eprintln!("skipped: needs root (loads an XDP program)");
            return;
        }
        let (p, prog) = XdpProgram::load("lo", "steer_uplink", false, false).expect("the steering program loads");
        let l = Loaded { p, prog };
        set_steering(&l.p, &steering(true), "lo").expect("config written");
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("TCP to the range's first port", tcp(EGRESS, 443, 61000), true),
            ("TCP to the range's last port", tcp(EGRESS, 443, 61099), true),
            ("TCP below the range", tcp(EGRESS, 443, 60999), false),
            ("TCP above the range", tcp(EGRESS, 443, 61100), false),
            ("UDP in the range", udp(EGRESS, 53, 61050), true),
            ("UDP in the range to another address", udp(OTHER, 53, 61050), false),
            ("TCP in the range to another address", tcp(OTHER, 443, 61000), false),
            ("a published port (as before)", tcp(EGRESS, 5555, 30080), true),
            ("VXLAN (as before)", udp(EGRESS, 5555, 4789), true),
            ("SSH to the data address", tcp(EGRESS, 5555, 22), false),
            ("echo reply, id in the range", echo(true, EGRESS, 61010), true),
            ("echo reply, id outside", echo(true, EGRESS, 100), false),
            ("echo reply, id in the range, to another address", echo(true, OTHER, 61010), false),
            ("echo request to the egress address (the kernel answers)", echo(false, EGRESS, 61010), false),
            ("frag-needed quoting egress UDP", err_about(3, 4, EGRESS, 17, 61020, 0, 28), true),
            ("port unreachable quoting egress UDP, whole", err_about(3, 3, EGRESS, 17, 61020, 0, 999), true),
            ("frag-needed quoting the kernel's UDP", err_about(3, 4, EGRESS, 17, 5000, 0, 28), false),
            ("frag-needed quoting another source", err_about(3, 4, OTHER, 17, 61020, 0, 28), false),
            ("time exceeded quoting TCP with options", err_about(11, 0, EGRESS, 6, 61030, 3, 40), true),
            ("time exceeded quoting TCP, 15-word header", err_about(11, 0, EGRESS, 6, 61030, 10, 68), true),
            ("time exceeded, options, quote cut short", err_about(11, 0, EGRESS, 6, 61030, 3, 39), false),
            ("parameter problem quoting an echo request", err_about(12, 0, EGRESS, 1, 61040, 0, 28), true),
            ("parameter problem quoting an echo reply", err_about(12, 0, EGRESS, 1, 0, 0, 28), false),
            ("a redirect (not an error we take)", err_about(5, 1, EGRESS, 17, 61020, 0, 28), false),
            ("an error to another address", error(3, 4, OTHER, &quoted(EGRESS, 17, 61020, 0), 28), false),
            ("an error with 4 quoted L4 bytes", err_about(3, 4, EGRESS, 17, 61020, 0, 24), false),
        ];
        for (what, f, want) in &cases {
            assert_eq!(l.steers(f), *want, "{what}");
        }
        // A quoted header that claims ihl < 5.
        let mut bad = err_about(3, 4, EGRESS, 17, 61020, 0, 28);
        bad[14 + 20 + 8] = 0x44;
        assert!(!l.steers(&bad), "a quote with ihl 4");
        // A later fragment carries no ports.
        let mut frag = tcp(EGRESS, 443, 61000);
        frag[14 + 6] = 0x00;
        frag[14 + 7] = 0x10;
        assert!(!l.steers(&frag), "a later fragment");

        // Egress off: all of it is the kernel's; the rest as before.
        set_steering(&l.p, &steering(false), "lo").expect("config written");
        for (what, f, want) in &cases {
            let vxlan_or_published = what.contains("as before");
            assert_eq!(l.steers(f), *want && vxlan_or_published, "egress off: {what}");
        }
    }

    #[test]
    fn steering_follows_the_tables_egress() {
        let spec: crate::tables::TablesSpec = toml::from_str(
            "[node]\ndata_ip = \"198.18.0.1\"\ndata_mac = \"02:00:00:00:00:aa\"\n[node.egress]\naddr = \"198.18.0.7\"\nports = \"61000-61099\"\n",
        )
        .expect("spec");
        let t = Tables::compile(&spec).expect("tables");
        let s = Steering::for_tables(&t);
        assert_eq!(s.egress, Some(EgressSteer { ip: Ipv4Addr::new(198, 18, 0, 7), lo: 61000, hi: 61099 }));
        let c = BpfConfig::new(&s);
        assert_eq!((c.egress_ip.to_ne_bytes(), c.egress_lo, c.egress_hi), ([198, 18, 0, 7], 61000, 61099));
        let mut spec = spec;
        spec.node.egress = None;
        let s = Steering::for_tables(&Tables::compile(&spec).expect("tables"));
        assert_eq!((s.egress, BpfConfig::new(&s).egress_ip), (None, 0));
    }
}
