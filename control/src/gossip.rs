//! Membership and failure detection: SWIM (foca, sans-IO), every packet
//! sealed with an AEAD (XChaCha20-Poly1305) under a cluster key that Raft
//! distributes and rotates.
//!
//! A sealed packet is a header, bound into the AEAD as associated data —
//! the key id, the sender's identity (its gossip address and epoch) and
//! the sender's sequence number — then a 192-bit nonce drawn from the
//! operating system's random source for every packet, then the ciphertext
//! and its tag. A packet is dropped and counted, each reason on its own
//! counter ([`Rejected`]), when it is too short, sealed under a key this
//! member does not hold (a newer or foreign one) or no longer holds (a
//! retired one), does not verify, claims a sender other than the address
//! it came from (or than the sender in foca's own header), repeats or
//! precedes what that sender already delivered (a sliding window per
//! sender, IPsec's anti-replay bitmap, RFC 6479; a newer epoch — the
//! sender restarted — replaces the window, an older one is refused), or
//! opens but does not decode.
//!
//! [`Gossip`] is one member: feed it packets (with their source address)
//! and timer events, collect the packets to send, the timers to schedule
//! and the membership changes. [`sim`] runs many of them on a virtual
//! clock with message loss (deterministic for a seed): the tests and the
//! failure-detection bench.

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use core::net::{Ipv6Addr, SocketAddr};
use foca::{Codec, Foca, NoCustomBroadcast, Notification, PostcardCodec, Runtime, Timer};
use rand::rngs::{StdRng, SysRng};
use rand::{SeedableRng, TryRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// A member's identity: its gossip address and its epoch. The epoch
/// grows with every start ([`GossipId::starting_now`]: milliseconds since
/// the Unix epoch, shifted left 16 bits, and 16 random bits) and by one
/// each time the member rejoins after being declared down: the newer
/// identity wins, and peers replace their replay window for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GossipId {
    /// The member's gossip address (udp 7946): where its packets come from.
    pub addr: SocketAddr,
    /// Start time and rejoin generation.
    pub epoch: u64,
}

impl GossipId {
    /// The identity of a member at `addr` starting now: its epoch from the
    /// wall clock in milliseconds and 16 bits of the OS's randomness, so a
    /// restart (even within the same millisecond) gets a new epoch, larger
    /// than the last one unless the clock went back.
    pub fn starting_now(addr: SocketAddr) -> GossipId {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> 16));
        let mut low = [0u8; 2];
        if SysRng.try_fill_bytes(&mut low).is_err() {
            low = [0; 2];
        }
        GossipId { addr, epoch: (ms << 16) | u64::from(u16::from_le_bytes(low)) }
    }
}

impl foca::Identity for GossipId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(GossipId { addr: self.addr, epoch: self.epoch.saturating_add(1) })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        self.epoch > other.epoch
    }
}

/// Bytes of the associated data: key id (4), sender address (16: IPv6,
/// IPv4-mapped for IPv4, and 2 of port), sender epoch (8), sequence (8).
const AAD: usize = 4 + 16 + 2 + 8 + 8;
/// Bytes of the nonce (XChaCha20's 192 bits).
const NONCE: usize = 24;
/// Bytes in front of the ciphertext: the associated data and the nonce.
pub const SEAL_HEADER: usize = AAD + NONCE;
/// Bytes a seal adds to foca's packet: its header and Poly1305's tag.
pub const SEAL_OVERHEAD: usize = SEAL_HEADER + 16;
/// The largest datagram gossip sends: a 1500-byte MTU less IPv6's and
/// UDP's headers (IPv4 has 20 bytes to spare).
pub const MAX_DATAGRAM: usize = 1452;

/// The address as a packet carries it: IPv4-mapped IPv6 addresses as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A seal's header: what the receiver checks, authenticated by the AEAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealHeader {
    /// The key it is sealed under.
    pub key_id: u32,
    /// Who sealed it.
    pub sender: GossipId,
    /// The sender's sequence number (from 1, one more each packet).
    pub seq: u64,
}

impl SealHeader {
    fn encode(&self) -> [u8; AAD] {
        let mut b = [0u8; AAD];
        b[0..4].copy_from_slice(&self.key_id.to_be_bytes());
        let ip = match self.sender.addr.ip() {
            core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            core::net::IpAddr::V6(v6) => v6,
        };
        b[4..20].copy_from_slice(&ip.octets());
        b[20..22].copy_from_slice(&self.sender.addr.port().to_be_bytes());
        b[22..30].copy_from_slice(&self.sender.epoch.to_be_bytes());
        b[30..38].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    fn decode(b: &[u8; AAD]) -> SealHeader {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&b[4..20]);
        let addr = SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), u16::from_be_bytes([b[20], b[21]]));
        SealHeader { key_id: u32_at(0), sender: GossipId { addr, epoch: u64_at(22) }, seq: u64_at(30) }
    }
}

/// A key the keyring holds.
#[derive(Clone)]
struct Held {
    id: u32,
    cipher: XChaCha20Poly1305,
    /// When this member first held it (its own monotonic time).
    since: Duration,
}

/// The cluster's gossip keys as one member holds them: every held key
/// opens, one of them seals. Key ids only grow, so a packet under a key id
/// below the newest held one that is not held is under a retired key.
#[derive(Clone)]
pub struct Keyring {
    /// By ascending id.
    held: Vec<Held>,
    sealing: u32,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("held", &self.ids()).field("sealing", &self.sealing).finish()
    }
}

/// Why a packet was dropped: each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Shorter than the seal's header and tag.
    #[error("gossip packet shorter than its seal")]
    Short,
    /// Under a key id this member does not hold and never held: a newer
    /// key not yet here, or another cluster's.
    #[error("gossip packet sealed under a key this node does not hold (not yet, or another cluster's)")]
    UnknownKey,
    /// The tag does not verify: tampered with, or a foreign cluster's.
    #[error("gossip packet whose seal does not verify (tampered with, or another cluster's)")]
    BadTag,
    /// Opened, but foca could not decode it.
    #[error("gossip packet that opens but does not decode")]
    Undecodable,
    /// Under a key the cluster retired (older than the newest one held).
    #[error("gossip packet sealed under a retired key")]
    RetiredKey,
    /// Its sealed sender is not the address it came from (or not the
    /// sender of foca's header inside).
    #[error("gossip packet whose sealed sender is not where it came from")]
    WrongSender,
    /// A sequence number already accepted from its sender, too far behind
    /// the newest one, or from an earlier epoch of the sender.
    #[error("gossip packet replayed (sequence seen or too old, or an earlier epoch of its sender)")]
    Replayed,
}

/// Number of [`Rejected`] reasons (the counters' array length).
pub const REJECT_REASONS: usize = 7;

impl Keyring {
    /// A keyring holding key `id`, sealing with it.
    pub fn new(id: u32, key: &[u8; 32]) -> Keyring {
        let cipher = XChaCha20Poly1305::new(key.into());
        Keyring { held: vec![Held { id, cipher, since: Duration::ZERO }], sealing: id }
    }

    /// The keyring of a member that starts with the cluster's `keys` at
    /// (its own monotonic) time `now`: it opens with all of them and seals
    /// with the one before the newest if there is one (the newest may not
    /// have reached every member yet; [`Keyring::sync`] moves sealing to it
    /// later). `None` without keys.
    pub fn from_keys(keys: &[(u32, [u8; 32])], now: Duration) -> Option<Keyring> {
        let newest = keys.iter().max_by_key(|k| k.0)?;
        let seal = keys.iter().filter(|k| k.0 < newest.0).max_by_key(|k| k.0).unwrap_or(newest);
        let mut r = Keyring::new(seal.0, &seal.1);
        r.held[0].since = now;
        for (id, key) in keys {
            r.add(*id, key, now);
        }
        Some(r)
    }

    /// Opens with key `id` too from `now` (sealing unchanged); nothing if
    /// it is held already.
    pub fn add(&mut self, id: u32, key: &[u8; 32], now: Duration) {
        if let Err(at) = self.held.binary_search_by_key(&id, |h| h.id) {
            self.held.insert(at, Held { id, cipher: XChaCha20Poly1305::new(key.into()), since: now });
        }
    }

    /// Seals with held key `id` from now on; false if it is not held.
    pub fn seal_with(&mut self, id: u32) -> bool {
        let held = self.held.iter().any(|h| h.id == id);
        if held {
            self.sealing = id;
        }
        held
    }

    /// Seals with key `id` (added) from now on; the keys held before still
    /// open until retired.
    pub fn rotate(&mut self, id: u32, key: &[u8; 32]) {
        self.add(id, key, Duration::ZERO);
        self.sealing = id;
    }

    /// Stops opening with key `id`: packets under it are refused as
    /// retired. False if it is not held or is the sealing key.
    pub fn retire(&mut self, id: u32) -> bool {
        let before = self.held.len();
        if id != self.sealing {
            self.held.retain(|h| h.id != id);
        }
        self.held.len() < before
    }

    /// The ids of the keys held, ascending.
    pub fn ids(&self) -> Vec<u32> {
        self.held.iter().map(|h| h.id).collect()
    }

    /// The id of the key that seals.
    pub fn sealing(&self) -> u32 {
        self.sealing
    }

    /// Follows the cluster's `keys` at time `now`: adds the new ones (they
    /// open at once), seals with the newest once this member has held it
    /// for `stage` (so that every member has it before anyone seals with
    /// it) or at once if the sealing key is no longer the cluster's, and
    /// retires every key the cluster no longer has. Nothing without keys.
    pub fn sync(&mut self, keys: &[(u32, [u8; 32])], now: Duration, stage: Duration) {
        let Some(newest) = keys.iter().map(|k| k.0).max() else { return };
        for (id, key) in keys {
            self.add(*id, key, now);
        }
        let since = self.held.iter().find(|h| h.id == newest).map_or(now, |h| h.since);
        let sealing_kept = keys.iter().any(|k| k.0 == self.sealing);
        if !sealing_kept || now.saturating_sub(since) >= stage {
            self.sealing = newest;
        }
        let sealing = self.sealing;
        self.held.retain(|h| h.id == sealing || keys.iter().any(|k| k.0 == h.id));
    }

    /// `plain` sealed under the sealing key by `sender` with sequence
    /// number `seq`: the header, a nonce of 192 bits from the OS's random
    /// source, the ciphertext and tag. `None` if the OS gave no randomness.
    pub fn seal(&self, sender: GossipId, seq: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let held = self.held.iter().find(|h| h.id == self.sealing)?;
        let aad = SealHeader { key_id: self.sealing, sender: GossipId { addr: canonical(sender.addr), ..sender }, seq }
            .encode();
        let mut nonce = [0u8; NONCE];
        SysRng.try_fill_bytes(&mut nonce).ok()?;
        let ct = held.cipher.encrypt((&nonce).into(), Payload { msg: plain, aad: &aad }).ok()?;
        let mut out = Vec::with_capacity(SEAL_HEADER + ct.len());
        out.extend_from_slice(&aad);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Some(out)
    }

    /// Opens a sealed packet: its verified header and plaintext.
    pub fn open(&self, packet: &[u8]) -> Result<(SealHeader, Vec<u8>), Rejected> {
        let (Some(aad), Some(nonce)) = (packet.first_chunk::<AAD>(), packet.get(AAD..SEAL_HEADER)) else {
            return Err(Rejected::Short);
        };
        if packet.len() < SEAL_OVERHEAD {
            return Err(Rejected::Short);
        }
        let h = SealHeader::decode(aad);
        let Some(held) = self.held.iter().find(|k| k.id == h.key_id) else {
            let older = self.held.iter().any(|k| k.id > h.key_id);
            return Err(if older { Rejected::RetiredKey } else { Rejected::UnknownKey });
        };
        let nonce: &[u8; NONCE] = nonce.try_into().map_err(|_| Rejected::Short)?;
        let plain = held
            .cipher
            .decrypt(nonce.into(), Payload { msg: &packet[SEAL_HEADER..], aad })
            .map_err(|_| Rejected::BadTag)?;
        Ok((h, plain))
    }
}

/// Blocks of 64 sequence numbers in a replay window (RFC 6479's ring).
const WINDOW_BLOCKS: usize = 16;
/// How far behind a sender's newest accepted sequence number a packet may
/// be and still be accepted (once): reordering tolerated.
pub const REPLAY_WINDOW: u64 = (WINDOW_BLOCKS as u64 - 1) * 64;

/// The sequence numbers accepted from one sender epoch: the newest, and a
/// bitmap of the ones below it (RFC 6479: a ring of 64-bit blocks, whole
/// blocks cleared as the window moves).
#[derive(Debug, Clone, Default)]
struct ReplayWindow {
    top: u64,
    bits: [u64; WINDOW_BLOCKS],
}

impl ReplayWindow {
    fn slot(seq: u64) -> (usize, u64) {
        (((seq / 64) % WINDOW_BLOCKS as u64) as usize, 1u64 << (seq % 64))
    }

    /// Whether `seq` would be accepted: never seen and not too old.
    fn fresh(&self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.top {
            return true;
        }
        if self.top - seq >= REPLAY_WINDOW {
            return false;
        }
        let (b, m) = Self::slot(seq);
        self.bits[b] & m == 0
    }

    /// Records `seq` as accepted (after the packet verified).
    fn mark(&mut self, seq: u64) {
        if seq > self.top {
            let (cur, new) = (self.top / 64, seq / 64);
            for i in 1..=(new - cur).min(WINDOW_BLOCKS as u64) {
                self.bits[((cur + i) % WINDOW_BLOCKS as u64) as usize] = 0;
            }
            self.top = seq;
        }
        let (b, m) = Self::slot(seq);
        self.bits[b] |= m;
    }
}

/// Senders whose sequence numbers a member tracks; beyond this many, the
/// one heard from least recently is forgotten (only senders holding the
/// cluster key get here).
const MAX_SENDERS: usize = 4096;

/// What a member knows of one sender.
#[derive(Debug, Clone)]
struct Sender {
    epoch: u64,
    window: ReplayWindow,
    /// When a packet of it was last accepted (the member's count).
    last: u64,
}

/// Counters of one member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipStats {
    /// Packets sent.
    pub sent: u64,
    /// Packets received and accepted.
    pub received: u64,
    /// Packets dropped, by [`Rejected`] reason (indexed by `reason as usize`).
    pub rejected: [u64; REJECT_REASONS],
    /// Packets not sent: the OS's random source gave no nonce.
    pub seal_failed: u64,
}

/// A membership change this member observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member is up (joined, or came back).
    Up(GossipId),
    /// A member was declared down.
    Down(GossipId),
}

/// What foca asked for while handling one input.
#[derive(Default)]
struct Collect {
    send: Vec<(GossipId, Vec<u8>)>,
    timers: Vec<(Duration, Timer<GossipId>)>,
    events: Vec<MemberEvent>,
}

impl Runtime<GossipId> for Collect {
    fn notify(&mut self, n: Notification<'_, GossipId>) {
        match n {
            Notification::MemberUp(id) => self.events.push(MemberEvent::Up(*id)),
            Notification::MemberDown(id) => self.events.push(MemberEvent::Down(*id)),
            _ => {}
        }
    }
    fn send_to(&mut self, to: GossipId, data: &[u8]) {
        self.send.push((to, data.to_vec()));
    }
    fn submit_after(&mut self, event: Timer<GossipId>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// Outputs of a [`Gossip`] step.
#[derive(Debug, Default)]
pub struct Output {
    /// Sealed packets to send, by destination address.
    pub send: Vec<(SocketAddr, Vec<u8>)>,
    /// Timer events to hand back after the given delay.
    pub timers: Vec<(Duration, Timer<GossipId>)>,
    /// Membership changes.
    pub events: Vec<MemberEvent>,
}

impl Output {
    /// Adds `other`'s packets, timers and events to these.
    pub fn absorb(&mut self, other: Output) {
        self.send.extend(other.send);
        self.timers.extend(other.timers);
        self.events.extend(other.events);
    }
}

/// meshplane's SWIM settings: memberlist's LAN defaults (foca's
/// `new_lan`, scaled to the cluster size) made faster for a datacenter
/// fabric, so that a dead node leaves every balancer within seconds: a
/// probe every 500 ms answered within 200 ms (3 indirect probes otherwise),
/// a suspect declared down after 1.5 s unless it refutes, updates gossiped
/// to 3 members every 100 ms; foca's packets small enough that sealed they
/// fit [`MAX_DATAGRAM`].
pub fn swim_config(cluster_size: u32) -> foca::Config {
    let n = core::num::NonZeroU32::new(cluster_size.max(1)).unwrap_or(core::num::NonZeroU32::MIN);
    let mut c = foca::Config::new_lan(n);
    c.probe_period = Duration::from_millis(500);
    c.probe_rtt = Duration::from_millis(200);
    c.suspect_to_down_after = Duration::from_millis(1500);
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(100),
        num_members: core::num::NonZeroUsize::new(3).unwrap_or(core::num::NonZeroUsize::MIN),
    });
    if let Some(max) = core::num::NonZeroUsize::new(MAX_DATAGRAM - SEAL_OVERHEAD) {
        c.max_packet_size = max;
    }
    c
}

/// A generator seeded from the OS's random source (foca's: whom to probe,
/// whom to tell); if the OS gives nothing, from the clock and the identity
/// (foca's choices are not secrets, nonces never come from here).
fn os_seeded(id: &GossipId) -> StdRng {
    StdRng::try_from_rng(&mut SysRng).unwrap_or_else(|_| {
        let ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let h = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), (id, ns));
        StdRng::seed_from_u64(h)
    })
}

/// One gossip member.
pub struct Gossip {
    foca: Foca<GossipId, PostcardCodec, StdRng, NoCustomBroadcast>,
    keys: Keyring,
    /// The last sequence number sealed.
    seq: u64,
    /// Replay state by sender address.
    senders: HashMap<SocketAddr, Sender>,
    /// Packets accepted so far (the senders' recency).
    accepted: u64,
    /// Counters.
    pub stats: GossipStats,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip").field("id", self.foca.identity()).field("stats", &self.stats).finish()
    }
}

impl Gossip {
    /// A member `id` of a cluster of about `cluster_size` members (SWIM's
    /// LAN settings scaled to it), foca's generator seeded from the OS.
    pub fn new(id: GossipId, keys: Keyring, cluster_size: u32) -> Gossip {
        let rng = os_seeded(&id);
        Gossip::with_rng(id, keys, cluster_size, rng)
    }

    /// As [`Gossip::new`], foca's generator seeded with `seed` (the
    /// simulator's, so that membership is deterministic for a seed; nonces
    /// still come from the OS).
    pub fn with_seed(id: GossipId, keys: Keyring, cluster_size: u32, seed: u64) -> Gossip {
        Gossip::with_rng(id, keys, cluster_size, StdRng::seed_from_u64(seed))
    }

    fn with_rng(id: GossipId, keys: Keyring, cluster_size: u32, rng: StdRng) -> Gossip {
        let id = GossipId { addr: canonical(id.addr), ..id };
        let foca = Foca::new(id, swim_config(cluster_size), rng, PostcardCodec);
        Gossip { foca, keys, seq: 0, senders: HashMap::new(), accepted: 0, stats: GossipStats::default() }
    }

    /// This member's identity now (its epoch grows if it rejoins).
    pub fn id(&self) -> GossipId {
        *self.foca.identity()
    }

    /// The keyring.
    pub fn keys(&self) -> &Keyring {
        &self.keys
    }

    /// The keyring (to follow the cluster's keys).
    pub fn keys_mut(&mut self) -> &mut Keyring {
        &mut self.keys
    }

    /// Members this one believes are up (itself excluded).
    pub fn members(&self) -> Vec<GossipId> {
        self.foca.iter_members().map(|m| *m.id()).collect()
    }

    /// `plain` sealed as this member sends it: its identity, its next
    /// sequence number. `None` (counted) if the OS gave no nonce.
    pub fn seal(&mut self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seq += 1;
        let sealed = self.keys.seal(self.id(), self.seq, plain);
        if sealed.is_none() {
            self.stats.seal_failed += 1;
        }
        sealed
    }

    fn finish(&mut self, c: Collect) -> Output {
        let mut out = Output { timers: c.timers, events: c.events, send: Vec::with_capacity(c.send.len()) };
        for (to, data) in c.send {
            if let Some(p) = self.seal(&data) {
                out.send.push((to.addr, p));
                self.stats.sent += 1;
            }
        }
        out
    }

    /// Joins through `peer`.
    pub fn announce(&mut self, peer: GossipId) -> Output {
        let mut c = Collect::default();
        let _ = self.foca.announce(peer, &mut c);
        self.finish(c)
    }

    /// Whether a packet with header `h` would be new from its sender.
    fn fresh(&self, h: &SealHeader) -> bool {
        match self.senders.get(&h.sender.addr) {
            Some(s) if h.sender.epoch == s.epoch => s.window.fresh(h.seq),
            Some(s) if h.sender.epoch < s.epoch => false,
            _ => h.seq != 0,
        }
    }

    /// Records the packet with header `h` as accepted: a newer epoch of
    /// its sender replaces the window.
    fn mark(&mut self, h: &SealHeader) {
        self.accepted += 1;
        let addr = h.sender.addr;
        if !self.senders.contains_key(&addr)
            && self.senders.len() >= MAX_SENDERS
            && let Some(oldest) = self.senders.iter().min_by_key(|(_, s)| s.last).map(|(a, _)| *a)
        {
            self.senders.remove(&oldest);
        }
        let s = self.senders.entry(addr).or_insert(Sender {
            epoch: h.sender.epoch,
            window: ReplayWindow::default(),
            last: 0,
        });
        if h.sender.epoch > s.epoch {
            *s = Sender { epoch: h.sender.epoch, window: ReplayWindow::default(), last: 0 };
        }
        s.window.mark(h.seq);
        s.last = self.accepted;
    }

    /// The checks of a packet from `from`: its plaintext if it is to be
    /// handed to foca.
    fn accept(&mut self, from: SocketAddr, packet: &[u8]) -> Result<Vec<u8>, Rejected> {
        let (h, plain) = self.keys.open(packet)?;
        if h.sender.addr != canonical(from) {
            return Err(Rejected::WrongSender);
        }
        if !self.fresh(&h) {
            return Err(Rejected::Replayed);
        }
        let inner: foca::Header<GossipId> =
            PostcardCodec.decode_header(plain.as_slice()).map_err(|_| Rejected::Undecodable)?;
        if canonical(inner.src.addr) != h.sender.addr {
            return Err(Rejected::WrongSender);
        }
        self.mark(&h);
        Ok(plain)
    }

    /// A packet from the network, from UDP source `from`.
    pub fn handle_packet(&mut self, from: SocketAddr, packet: &[u8]) -> Output {
        let plain = match self.accept(from, packet) {
            Ok(p) => p,
            Err(r) => {
                self.stats.rejected[r as usize] += 1;
                return Output::default();
            }
        };
        let mut c = Collect::default();
        if self.foca.handle_data(&plain, &mut c).is_err() {
            self.stats.rejected[Rejected::Undecodable as usize] += 1;
        } else {
            self.stats.received += 1;
        }
        self.finish(c)
    }

    /// A timer event whose delay has passed.
    pub fn handle_timer(&mut self, t: Timer<GossipId>) -> Output {
        let mut c = Collect::default();
        let _ = self.foca.handle_timer(t, &mut c);
        self.finish(c)
    }
}

pub mod sim {
    //! Many members on a virtual clock, with message loss and delay:
    //! deterministic for a seed.

    use super::*;
    use rand::RngExt;
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};

    /// Packets with their sources.
    type Captured = Vec<(SocketAddr, Vec<u8>)>;

    enum Event {
        Packet(usize, SocketAddr, Vec<u8>),
        Timer(usize, Timer<GossipId>),
    }

    /// The simulated cluster.
    pub struct Sim {
        /// Members (`None` once killed).
        pub members: Vec<Option<Gossip>>,
        ids: Vec<GossipId>,
        by_addr: HashMap<SocketAddr, usize>,
        queue: BinaryHeap<Reverse<(u64, u64)>>,
        events: HashMap<u64, Event>,
        seq: u64,
        /// Virtual time, microseconds.
        pub now_us: u64,
        rng: StdRng,
        loss: f64,
        /// Every membership change seen: (time µs, observer, event).
        pub seen: Vec<(u64, usize, MemberEvent)>,
        next_rejoin_us: u64,
        /// The member whose incoming packets are kept, and them.
        capture: Option<(usize, Captured)>,
    }

    impl std::fmt::Debug for Sim {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Sim").field("members", &self.members.len()).field("now_us", &self.now_us).finish()
        }
    }

    /// Member `i`'s address: 198.18.x.y:7946.
    pub fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([198, 18, (i / 250) as u8, (i % 250) as u8 + 1], 7946))
    }

    impl Sim {
        /// `n` members under one key, losing `loss` of all packets; every
        /// member announces itself to member 0 at start.
        pub fn new(n: usize, loss: f64, seed: u64) -> Sim {
            let keys = Keyring::new(1, &[7; 32]);
            let ids: Vec<GossipId> = (0..n).map(|i| GossipId { addr: addr(i), epoch: 0 }).collect();
            let members = ids
                .iter()
                .enumerate()
                .map(|(i, id)| Some(Gossip::with_seed(*id, keys.clone(), n as u32, seed ^ (i as u64) << 20)))
                .collect();
            let by_addr = ids.iter().enumerate().map(|(i, id)| (id.addr, i)).collect();
            let mut sim = Sim {
                members,
                ids,
                by_addr,
                queue: BinaryHeap::new(),
                events: HashMap::new(),
                seq: 0,
                now_us: 0,
                rng: StdRng::seed_from_u64(seed),
                loss,
                seen: Vec::new(),
                next_rejoin_us: 1_000_000,
                capture: None,
            };
            for i in 1..n {
                let first = sim.ids[0];
                if let Some(Some(m)) = sim.members.get_mut(i) {
                    let out = m.announce(first);
                    sim.take(i, out);
                }
            }
            sim
        }

        fn push(&mut self, at: u64, e: Event) {
            self.seq += 1;
            self.events.insert(self.seq, e);
            self.queue.push(Reverse((at, self.seq)));
        }

        fn take(&mut self, from: usize, out: Output) {
            for (after, t) in out.timers {
                self.push(self.now_us + after.as_micros() as u64, Event::Timer(from, t));
            }
            let source = self.ids[from].addr;
            for (to, pkt) in out.send {
                if self.rng.random::<f64>() < self.loss {
                    continue;
                }
                if let Some(&j) = self.by_addr.get(&to) {
                    let delay = self.rng.random_range(200..3000u64);
                    if let Some((c, kept)) = &mut self.capture
                        && *c == j
                    {
                        kept.push((source, pkt.clone()));
                    }
                    self.push(self.now_us + delay, Event::Packet(j, source, pkt));
                }
            }
            for e in out.events {
                self.seen.push((self.now_us, from, e));
            }
        }

        /// Members that know nobody announce themselves to member 0 again,
        /// as a joining node's join loop does until it is admitted (an
        /// announce can be lost like any packet).
        fn rejoin_isolated(&mut self) {
            let first = self.ids[0];
            for i in 1..self.members.len() {
                if let Some(Some(m)) = self.members.get_mut(i)
                    && m.members().is_empty()
                {
                    let out = m.announce(first);
                    self.take(i, out);
                }
            }
        }

        /// Runs until virtual time `until_us`.
        pub fn run_until(&mut self, until_us: u64) {
            while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
                if at > until_us {
                    break;
                }
                // Once a second of virtual time: the join loop.
                if at >= self.next_rejoin_us {
                    self.now_us = self.next_rejoin_us;
                    self.next_rejoin_us += 1_000_000;
                    self.rejoin_isolated();
                    continue;
                }
                self.queue.pop();
                self.now_us = at;
                let Some(e) = self.events.remove(&seq) else { continue };
                let (i, out) = match e {
                    Event::Packet(i, from, p) => match self.members.get_mut(i) {
                        Some(Some(m)) => (i, m.handle_packet(from, &p)),
                        _ => continue,
                    },
                    Event::Timer(i, t) => match self.members.get_mut(i) {
                        Some(Some(m)) => (i, m.handle_timer(t)),
                        _ => continue,
                    },
                };
                self.take(i, out);
            }
            self.now_us = until_us;
        }

        /// Member `i` stops (crashes): it sends and answers nothing more.
        pub fn kill(&mut self, i: usize) {
            if let Some(m) = self.members.get_mut(i) {
                *m = None;
            }
        }

        /// Member `i` comes back (restarted: a new epoch, its sequence
        /// numbers from 1 again) and joins through member 0.
        pub fn revive(&mut self, i: usize) {
            let Some(old) = self.ids.get(i).copied() else { return };
            let id = GossipId { addr: old.addr, epoch: old.epoch + 1 };
            self.ids[i] = id;
            let n = self.members.len() as u32;
            let mut m = Gossip::with_seed(id, Keyring::new(1, &[7; 32]), n, self.rng.random());
            let out = m.announce(self.ids[0]);
            self.members[i] = Some(m);
            self.take(i, out);
        }

        /// Delivers a raw packet from UDP source `from` to member `i` now
        /// (a forged, foreign or replayed one).
        pub fn inject(&mut self, i: usize, from: SocketAddr, packet: Vec<u8>) {
            self.push(self.now_us, Event::Packet(i, from, packet));
        }

        /// Member `by`, holding the cluster key, tells the cluster that
        /// member `victim` is down while it is not (what any member can
        /// do: updates are not tied to their sender).
        pub fn forge_down(&mut self, by: usize, victim: usize) {
            let victim = self.ids[victim];
            let Some(Some(m)) = self.members.get_mut(by) else { return };
            let mut c = Collect::default();
            let update = foca::Member::new(victim, 0, foca::State::Down);
            let _ = m.foca.apply_many(std::iter::once(update), true, &mut c);
            let out = m.finish(c);
            self.take(by, out);
        }

        /// Member `by` tells the cluster of a member at `addr` that does
        /// not exist (nothing answers there).
        pub fn forge_member(&mut self, by: usize, addr: SocketAddr) {
            let Some(Some(m)) = self.members.get_mut(by) else { return };
            let mut c = Collect::default();
            let update = foca::Member::new(GossipId { addr, epoch: 1 }, 0, foca::State::Alive);
            let _ = m.foca.apply_many(std::iter::once(update), true, &mut c);
            let out = m.finish(c);
            self.take(by, out);
        }

        /// Every packet member `i` is sent from now on is also kept (a
        /// capture, to replay): see [`Sim::captured`].
        pub fn capture(&mut self, i: usize) {
            self.capture = Some((i, Vec::new()));
        }

        /// The packets captured so far, with their sources.
        pub fn captured(&self) -> &[(SocketAddr, Vec<u8>)] {
            self.capture.as_ref().map_or(&[], |(_, c)| c.as_slice())
        }

        /// Members alive.
        pub fn alive(&self) -> impl Iterator<Item = usize> + '_ {
            self.members.iter().enumerate().filter(|(_, m)| m.is_some()).map(|(i, _)| i)
        }

        /// Member `i`'s identity.
        pub fn id(&self, i: usize) -> GossipId {
            self.ids[i]
        }
    }
}
