//! The packet types every room of the dataplane shares: the [`Frame`] a
//! step works on, the [`Verdict`] it returns, why a frame was dropped
//! ([`DropReason`]) and the counters a worker keeps ([`Stats`]). At the
//! bottom of the crate: it imports only `wire` (the prefetch hint).

/// Index of a port in the tables' ports. Port 0 is always the uplink.
pub type PortId = u16;
/// The uplink port: the data-path NIC toward the underlay.
pub const UPLINK: PortId = 0;

/// Headroom a receive buffer should leave in front of a frame so that the
/// dataplane can encapsulate it in place (VXLAN needs 50 bytes).
pub const HEADROOM: usize = 256;

/// What a frame still asks of whoever transmits it, from the virtio-net
/// header a TAP port read in front of it: a TCP super-frame (TSO) to be
/// cut into segments of `gso_size` payload bytes, with its checksum left
/// partial (the pseudo-header's sum at the field, the rest to be added).
/// The default is a plain frame, complete. Offsets are from the start of
/// the buffer, not of the frame, so they stay true when the frame is
/// encapsulated or decapsulated in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    /// Payload bytes per segment (0: not a super-frame).
    pub gso_size: u16,
    /// TCP over IPv6 (else over IPv4).
    pub v6: bool,
    /// The ECN bit of the super-frame (CWR on its first segment only).
    pub ecn: bool,
    /// Where the partial checksum's coverage starts, in the buffer (the
    /// TCP header).
    pub csum_at: u32,
    /// Where the checksum field is, from `csum_at`.
    pub csum_offset: u16,
}

impl Offload {
    /// A plain frame.
    pub const NONE: Offload = Offload { gso_size: 0, v6: false, ecn: false, csum_at: 0, csum_offset: 0 };

    /// True for a super-frame.
    #[inline(always)]
    pub fn is_super(&self) -> bool {
        self.gso_size != 0
    }
}

/// A frame in a buffer, with headroom in front of it: `buf[start..start + len]`.
#[derive(Debug)]
pub struct Frame<'a> {
    buf: &'a mut [u8],
    start: usize,
    len: usize,
    offload: Offload,
}

impl<'a> Frame<'a> {
    /// Wraps `buf[start..start + len]`; `None` if that is out of bounds.
    #[inline]
    pub fn new(buf: &'a mut [u8], start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= buf.len()).then_some(Frame { buf, start, len, offload: Offload::NONE })
    }
    /// An empty frame in no buffer: a placeholder for unused slots.
    #[inline]
    pub fn detached() -> Self {
        Frame { buf: Default::default(), start: 0, len: 0, offload: Offload::NONE }
    }
    /// What the frame still asks of its transmitter.
    #[inline(always)]
    pub fn offload(&self) -> Offload {
        self.offload
    }
    /// True for a super-frame.
    #[inline(always)]
    pub fn is_super(&self) -> bool {
        self.offload.is_super()
    }
    /// The length of the longest frame this one stands for on the wire:
    /// its own, or for a super-frame its headers and one segment's
    /// payload (what MTU checks compare).
    #[inline]
    pub fn wire_len(&self) -> usize {
        if !self.is_super() {
            return self.len;
        }
        let tcp = self.offload.csum_at as usize;
        let hl = self.buf.get(tcp + 12).map_or(0, |b| usize::from(b >> 4) * 4);
        (tcp + hl + usize::from(self.offload.gso_size)).saturating_sub(self.start).min(self.len)
    }
    /// Sets what the frame asks of its transmitter (a port that read a
    /// virtio-net header; a step that replaced the frame with a reply of
    /// its own sets [`Offload::NONE`]).
    #[inline]
    pub fn set_offload(&mut self, o: Offload) {
        self.offload = o;
    }
    /// The frame bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    /// The frame bytes, writable.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
    /// Offset of the frame in the buffer.
    #[inline]
    pub fn start(&self) -> usize {
        self.start
    }
    /// Frame length.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty frame.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes free in front of the frame.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }
    /// Bytes free in the buffer from the frame's start.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.start
    }
    /// The whole buffer, for in-place encapsulation.
    #[inline]
    pub(crate) fn buf_mut(&mut self) -> &mut [u8] {
        self.buf
    }
    /// The buffer, the frame's start and its length, at once.
    #[inline(always)]
    pub(crate) fn parts(&mut self) -> (&mut [u8], usize, usize) {
        (self.buf, self.start, self.len)
    }
    /// Prefetches the frame's first cache line into L1 (a hint: it never
    /// faults and changes nothing observable).
    #[inline(always)]
    pub(crate) fn touch(&self) {
        crate::wire::prefetch(self.buf.as_ptr().wrapping_add(self.start));
    }
    /// Shortens the frame to `len` bytes if it is longer (trims padding
    /// after a packet).
    #[inline(always)]
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Moves the frame's window; the caller has checked the bounds.
    #[inline]
    pub(crate) fn set_window(&mut self, start: usize, len: usize) {
        debug_assert!(start + len <= self.buf.len());
        self.start = start;
        self.len = len;
    }
}

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (possibly rewritten) frame on this port.
    Tx(PortId),
    /// Drop it, for this reason.
    Drop(DropReason),
    /// Not the dataplane's (uplink traffic that is not overlay): hand it to
    /// the kernel.
    Pass,
}

macro_rules! drop_reasons {
    ($($(#[doc = $doc:literal])* $name:ident = $s:literal,)*) => {
        /// Why a frame was dropped. Each reason indexes a per-worker counter.
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $($(#[doc = $doc])* $name,)*
        }
        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();
            /// The reason's stable snake_case name (logs, metrics, `trace -v`).
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$name => $s,)* }
            }
        }
    };
}

drop_reasons! {
    /// The input port, or the port a verdict named, is not in the tables
    /// or beyond the ports the worker counts.
    UnknownPort = "unknown_port",
    /// Shorter than an Ethernet header, or a header (up to the transport
    /// header) that does not parse: nothing malformed is forwarded.
    Malformed = "malformed",
    /// A VLAN-tagged frame from a task port (tasks send untagged frames).
    VlanTagged = "vlan_tagged",
    /// A task sent from a MAC that is not the endpoint on its port.
    SrcMacSpoofed = "src_mac_spoofed",
    /// A task sent IPv4 from an address that is not its endpoint's.
    SrcIpSpoofed = "src_ip_spoofed",
    /// Broadcast or multicast other than an ARP request: no flooding.
    BroadcastNotFlooded = "broadcast_not_flooded",
    /// Unicast to a MAC not in the network's forwarding table.
    UnknownUnicast = "unknown_unicast",
    /// Unicast back to the port it came from.
    Hairpin = "hairpin",
    /// An ARP packet that is not Ethernet/IPv4 ARP.
    ArpMalformed = "arp_malformed",
    /// An ARP reply or other non-request from a task (answers come from state).
    ArpNotRequest = "arp_not_request",
    /// A gratuitous ARP or an ARP for the sender's own address.
    ArpGratuitous = "arp_gratuitous",
    /// An ARP request whose sender address is not the sending endpoint's.
    ArpSenderSpoofed = "arp_sender_spoofed",
    /// An ARP request for an address not in cluster state.
    ArpUnknownTarget = "arp_unknown_target",
    /// To the gateway MAC, but not something the gateway answers (routing
    /// beyond the network comes with the load balancer).
    NoRoute = "no_route",
    /// From a task of an internal network (`network create --internal`)
    /// to an address outside every cluster network: no egress.
    EgressInternal = "egress_internal",
    /// An IPv4 packet larger than the network MTU that is not answered with
    /// fragmentation-needed: no DF (the fast path does not fragment), or
    /// RFC 1122 forbids the ICMP error (ICMP error, later fragment, source
    /// not one host, destination a group).
    MtuExceeded = "mtu_exceeded",
    /// An IPv4 packet larger than the network MTU, with DF, from a
    /// routing-mesh client, whose fragmentation-needed answer the worker's
    /// ICMP rate limit refused (`lb::ICMP_PER_SEC`, burst `lb::ICMP_BURST`).
    IcmpRateLimited = "icmp_rate_limited",
    /// A non-IPv4 frame larger than the network MTU allows.
    Oversize = "oversize",
    /// Not enough headroom in the buffer to encapsulate.
    NoHeadroom = "no_headroom",
    /// VXLAN for us without the I flag.
    VxlanNoIFlag = "vxlan_no_i_flag",
    /// VXLAN for us that is truncated or has a bad length.
    VxlanMalformed = "vxlan_malformed",
    /// VXLAN for us whose outer IPv4 header checksum is wrong.
    VxlanBadChecksum = "vxlan_bad_checksum",
    /// A fragmented IPv4 datagram to our VXLAN address (never reassembled).
    VxlanFragment = "vxlan_fragment",
    /// VXLAN with a VNI no network has.
    UnknownVni = "unknown_vni",
    /// VXLAN from an outer source that is not a known VTEP (spoofed).
    UnknownVtep = "unknown_vtep",
    /// An inner frame whose headers do not parse.
    InnerMalformed = "inner_malformed",
    /// An inner frame with a VLAN tag (RFC 7348 section 6.1).
    InnerVlanTagged = "inner_vlan_tagged",
    /// An inner ARP packet whose sender is not what cluster state says
    /// (ARP is answered from state, never learned from the overlay).
    InnerArpSpoofed = "inner_arp_spoofed",
    /// An inner frame to a broadcast or multicast MAC (no flooding).
    InnerBroadcast = "inner_broadcast",
    /// An inner frame to a MAC that is not local in the frame's network
    /// (unknown, remote, or another network's).
    InnerDstNotLocal = "inner_dst_not_local",
    /// An inner frame whose source MAC is not an endpoint behind the VTEP
    /// that sent it.
    InnerSrcSpoofed = "inner_src_spoofed",
    /// To a service VIP whose backends all have weight 0 (or none), and
    /// the connection is not tracked.
    NoBackend = "no_backend",
    /// A routing-mesh connection in `nat` mode found no free source port
    /// on this node's address toward its backend.
    NatPortsExhausted = "nat_ports_exhausted",
    /// A routing-mesh connection in `nat` mode from a client address that
    /// already holds its share of source ports toward the backend (half
    /// the backend's pool: `lb::NAT_PORTS_PER_CLIENT`).
    NatClientLimit = "nat_client_limit",
    /// A new connection above the flood guard's rate
    /// (`--max-new-conns-per-sec`; pickups of unconfirmed connections: a
    /// quarter of it): not tracked, not balanced.
    NewConnRateLimited = "new_conn_rate_limited",
    /// A TCP segment without SYN of a connection the table does not know,
    /// whose bucket holds only confirmed connections (an unconfirmed pickup
    /// never evicts one): not tracked, not balanced.
    UnconfirmedNoRoom = "unconfirmed_no_room",
    /// A frame to this node's own address in a network (the routing mesh's
    /// reply direction) that belongs to no tracked connection.
    NoConnection = "no_connection",
    /// To a service VIP, but the worker's balancer state was not sized for
    /// these tables (`WorkerState::sync` not called: an I/O layer bug).
    LbNotSynced = "lb_not_synced",
    /// Egress: no free source port on the egress address toward the
    /// destination (every candidate held by a confirmed connection).
    EgressPortsExhausted = "egress_ports_exhausted",
    /// Egress: the task already holds half the egress ports toward this
    /// destination address.
    EgressTaskLimit = "egress_task_limit",
    /// Egress: the node's FIB has no route (or the next hop no MAC yet)
    /// toward the destination.
    EgressNoNextHop = "egress_no_next_hop",
    /// Egress: a packet to the egress address (or a host-link reply) of
    /// no tracked connection.
    EgressNoConnection = "egress_no_connection",
    /// Egress: a packet egress does not translate (a fragment, another
    /// protocol than TCP, UDP and ICMP echo, an ICMP error about nothing
    /// tracked).
    EgressUnsupported = "egress_unsupported",
    /// Egress: VXLAN to a peer's data-path address from a task (it would
    /// reach the peer as VXLAN from a known VTEP).
    EgressToVtep = "egress_to_vtep",
    /// Egress: to this node's own published port, neither TCP nor UDP
    /// (TCP and UDP take the routing mesh).
    EgressHairpin = "egress_hairpin",
    /// A backend refused a new connection (a reset answering its SYN): the
    /// reset is held back and the client's next SYN goes to another
    /// backend, which this worker prefers for a while (passive health).
    BackendRefused = "backend_refused",
    /// A packet whose TTL ran out at the gateway that gets no
    /// time-exceeded (an ICMP error about an ICMP error, the rate limit).
    TtlExceeded = "ttl_exceeded",
    /// Egress: a task addressing a network's DNS listener on the host link
    /// directly (its own network's DNS is its gateway's port 53; another
    /// network's would leak that network's names and take its share).
    EgressToDns = "egress_to_dns",
}

/// Packet and byte counters of one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames transmitted.
    pub tx_packets: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
}

/// A worker's counters. Sized when the worker starts; never grows.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Drops by [`DropReason`] (index = `reason as usize`).
    pub drops: [u64; DropReason::COUNT],
    /// Frames handed to the kernel.
    pub passed: u64,
    /// Per-port counters, by [`PortId`].
    pub ports: Vec<PortCounters>,
}

impl Stats {
    /// Drops for one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// A step of the packet path: go on with `T`, or leave the path with this
/// verdict (`Err` is an exit, a drop or a transmit, not only a failure).
pub(crate) type Step<T> = Result<T, Verdict>;
