//! Gossip over UDP on the management IP: membership and failure
//! detection (SWIM, `gossip`), sealed with the cluster's keys from the
//! state; members declared down leave this node's tables.
//!
//! The gossip key's life: the Raft leader draws a new one every
//! [`Config::gossip_key_interval`](super::Config) (12 hours by default,
//! as Swarm's key manager) and retires the previous one [`key_grace`]
//! later (at most 5 minutes); the times travel in the commands, so the
//! state machine stays deterministic. Every member opens with every key
//! of the state at once, seals with the newest once it has held it for
//! [`key_stage`] (at most 2 seconds: the time for the state to reach every
//! member), and drops a key when the state does.

use super::{Control, raft_id};
use crate::gossip::{Gossip, GossipId, Keyring, MemberEvent, Output, Rejected};
use crate::rpc::GossipStats;
use crate::state::{ClusterState, Command, GossipKey};
use core::net::SocketAddr;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The timers gossip asked for, with when each is due.
type Timers = Vec<(Instant, foca::Timer<GossipId>)>;

/// How often the leader rotates the gossip key unless configured
/// otherwise: 12 hours, as Swarm's key manager.
pub const GOSSIP_KEY_INTERVAL: Duration = Duration::from_secs(12 * 3600);
/// The longest the previous key still opens after a rotation.
pub const GOSSIP_KEY_GRACE: Duration = Duration::from_secs(5 * 60);
/// The longest a member waits, holding a new key, before sealing with it.
pub const GOSSIP_KEY_STAGE: Duration = Duration::from_secs(2);

/// How long the previous key still opens after a rotation every
/// `interval`: [`GOSSIP_KEY_GRACE`], or half the interval if that is
/// shorter.
pub fn key_grace(interval: Duration) -> Duration {
    GOSSIP_KEY_GRACE.min(interval / 2)
}

/// How long a member holds a new key before sealing with it:
/// [`GOSSIP_KEY_STAGE`], or half the grace period if that is shorter (so
/// every member seals with the new key before the old one is retired).
pub fn key_stage(interval: Duration) -> Duration {
    GOSSIP_KEY_STAGE.min(key_grace(interval) / 2)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The wall clock, milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, millis)
}

/// What the leader writes next for the gossip key at `now_ms` (its wall
/// clock), with a rotation every `interval`: a new key once the current
/// one is `interval` old, the previous key's retirement once the current
/// one is [`key_grace`] old; nothing otherwise, or without keys (`cluster
/// init` draws the first).
pub fn key_schedule(state: &ClusterState, now_ms: u64, interval: Duration) -> Option<Command> {
    let current = state.gossip_keys.first()?;
    let age = now_ms.saturating_sub(current.added_ms);
    if age >= millis(interval) {
        return Some(gossip_key_at(state, now_ms));
    }
    let previous = state.gossip_keys.get(1)?;
    (age >= millis(key_grace(interval))).then_some(Command::RetireGossipKey { id: previous.id })
}

impl Control {
    /// Gossip over UDP on the management IP: membership, failure
    /// detection, sealed with the cluster's key.
    pub(super) async fn gossip_loop(self: Arc<Self>) {
        tokio::spawn(self.clone().gossip_key_loop());
        let start = Instant::now();
        let stage = key_stage(self.cfg.gossip_key_interval);
        let keys = self.gossip_keys_once_member().await;
        let Some(ring) = Keyring::from_keys(&key_pairs(&keys), start.elapsed()) else { return };
        let addr = SocketAddr::new(self.cfg.advertise.ip(), self.cfg.gossip_port);
        let sock = match tokio::net::UdpSocket::bind(addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("gossip: binding {addr}: {e}");
                return;
            }
        };
        // A new epoch each start: peers take it as this node restarted.
        let n = self.lock().state.nodes.len() as u32;
        let mut g = Gossip::new(GossipId::starting_now(addr), ring, n.max(3));
        let mut timers: Timers = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1000).min(stage.max(Duration::from_millis(100))));
        let mut buf = vec![0u8; 65536];
        loop {
            let next = timers.iter().map(|(t, _)| *t).min();
            let out = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok((len, from)) => g.handle_packet(from, &buf[..len]),
                    Err(_) => continue,
                },
                () = sleep_until_opt(next) => due_timers(&mut g, &mut timers),
                _ = tick.tick() => self.gossip_tick(&mut g, start.elapsed(), stage),
            };
            for (to, p) in out.send {
                let _ = sock.send_to(&p, to).await;
            }
            let now = Instant::now();
            timers.extend(out.timers.into_iter().map(|(d, t)| (now + d, t)));
            if !out.events.is_empty() {
                self.member_events(&out.events);
            }
        }
    }

    /// On the Raft leader: the gossip key rotated every
    /// `gossip_key_interval`, the previous one retired after the grace
    /// period ([`key_schedule`]).
    async fn gossip_key_loop(self: Arc<Self>) {
        let interval = self.cfg.gossip_key_interval;
        let period = Duration::from_secs(1).min(key_grace(interval) / 4).max(Duration::from_millis(20));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The last command written: not written again while the state
        // this node sees has not applied it yet.
        let mut last: Option<Command> = None;
        loop {
            tick.tick().await;
            let Some(raft) = self.raft() else { continue };
            if raft.metrics().borrow().current_leader != Some(raft_id(&self.cfg.name)) {
                continue;
            }
            let Some(cmd) = key_schedule(&self.lock().state, now_ms(), interval) else { continue };
            if last.as_ref().is_some_and(|l| same_key_step(l, &cmd)) {
                continue;
            }
            match self.write(cmd.clone()).await {
                Ok(()) => {
                    if let Command::RotateGossipKey { id, .. } = &cmd {
                        tracing::info!("gossip: key {id} drawn; the previous key retires in {:?}", key_grace(interval));
                    }
                    last = Some(cmd);
                }
                Err(e) => tracing::warn!("gossip key rotation: {e}"),
            }
        }
    }

    /// Waits until this node is in a cluster with a gossip key: the keys.
    async fn gossip_keys_once_member(&self) -> Vec<GossipKey> {
        loop {
            let k = self.lock().state.gossip_keys.clone();
            if !k.is_empty() && self.lock().state.nodes.contains_key(&self.cfg.name) {
                return k;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Once a tick: the keys from the state (new ones open, the newest
    /// seals once held for `stage`, retired ones go); announcements to
    /// nodes not (yet, or no longer) members; the summary for `stats`.
    fn gossip_tick(&self, g: &mut Gossip, now: Duration, stage: Duration) -> Output {
        let (state_keys, targets) = {
            let inner = self.lock();
            let members: BTreeSet<SocketAddr> = g.members().iter().map(|m| canonical(m.addr)).collect();
            let t: Vec<SocketAddr> = inner
                .state
                .nodes
                .values()
                .filter(|n| n.id != self.cfg.name)
                .map(|n| canonical(SocketAddr::new(n.mgmt.ip(), self.cfg.gossip_port)))
                .filter(|a| !members.contains(a))
                .collect();
            (key_pairs(&inner.state.gossip_keys), t)
        };
        g.keys_mut().sync(&state_keys, now, stage);
        let mut out = Output::default();
        for t in targets {
            out.absorb(g.announce(GossipId { addr: t, epoch: 0 }));
        }
        self.lock().gossip = Some(summary(g));
        out
    }

    fn member_events(&self, events: &[MemberEvent]) {
        let mut changed = false;
        {
            let mut g = self.lock();
            for e in events {
                let (id, down) = match e {
                    MemberEvent::Up(id) => (id, false),
                    MemberEvent::Down(id) => (id, true),
                };
                let Some(name) = gossip_node(&g.state, self.cfg.gossip_port, id.addr).map(str::to_owned) else {
                    tracing::debug!(member = %id.addr, down, "gossip: a member that is no node of the state");
                    continue;
                };
                changed |= if down { g.down.insert(name.clone()) } else { g.down.remove(&name) };
                tracing::info!(node = %name, down, "gossip: node {name} is {}", if down { "down" } else { "up" });
            }
        }
        if changed {
            self.changed.notify_one();
        }
    }
}

/// The node of `state` whose gossip address is exactly `addr`: its
/// management IP and the cluster's gossip port. A member at a node's IP
/// on another port is not that node: any holder of the cluster key can
/// make such a member up and let it be declared down, and matching on
/// the IP alone took the node out of every balancer with it, for good
/// (the node itself never hears of it, so never refutes it).
pub fn gossip_node(state: &ClusterState, gossip_port: u16, addr: SocketAddr) -> Option<&str> {
    let addr = canonical(addr);
    state.nodes.values().find(|n| canonical(SocketAddr::new(n.mgmt.ip(), gossip_port)) == addr).map(|n| n.id.as_str())
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Whether two key commands are the same step (the same rotation or the
/// same retirement; a rotation's key is drawn anew each time).
fn same_key_step(a: &Command, b: &Command) -> bool {
    match (a, b) {
        (Command::RotateGossipKey { id: x, .. }, Command::RotateGossipKey { id: y, .. }) => x == y,
        (Command::RetireGossipKey { id: x }, Command::RetireGossipKey { id: y }) => x == y,
        _ => false,
    }
}

fn key_pairs(keys: &[GossipKey]) -> Vec<(u32, [u8; 32])> {
    keys.iter().map(|k| (k.id, k.key)).collect()
}

/// The timers that are due, handed to gossip: what it does next.
fn due_timers(g: &mut Gossip, timers: &mut Timers) -> Output {
    let now = Instant::now();
    let mut out = Output::default();
    let mut due = Vec::new();
    timers.retain(|(t, e)| {
        if *t <= now {
            due.push(e.clone());
            false
        } else {
            true
        }
    });
    for e in due {
        out.absorb(g.handle_timer(e));
    }
    out
}

fn summary(g: &Gossip) -> GossipStats {
    let r = |reason: Rejected| g.stats.rejected[reason as usize];
    GossipStats {
        members: g.members().iter().map(|m| m.addr.to_string()).collect(),
        sent: g.stats.sent,
        received: g.stats.received,
        rejected_short: r(Rejected::Short),
        rejected_unknown_key: r(Rejected::UnknownKey),
        rejected_bad_tag: r(Rejected::BadTag),
        rejected_undecodable: r(Rejected::Undecodable),
        rejected_retired_key: r(Rejected::RetiredKey),
        rejected_wrong_sender: r(Rejected::WrongSender),
        rejected_replayed: r(Rejected::Replayed),
        seal_failed: g.stats.seal_failed,
        key_ids: g.keys().ids(),
        sealing_key: g.keys().sealing(),
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A new gossip key drawn now from the OS's random source (drawn here, so
/// every manager applies the same).
pub(super) fn new_gossip_key(state: &ClusterState) -> Command {
    gossip_key_at(state, now_ms())
}

/// A new gossip key drawn at `at_ms`, its id one more than the current
/// key's.
fn gossip_key_at(state: &ClusterState, at_ms: u64) -> Command {
    let id = state.gossip_keys.first().map_or(1, |k| k.id.saturating_add(1));
    let mut key = [0u8; 32];
    if rand::TryRng::try_fill_bytes(&mut rand::rngs::SysRng, &mut key).is_err() {
        // The thread generator (seeded from the OS) if the OS gave nothing now.
        rand::fill(&mut key);
    }
    Command::RotateGossipKey { id, key, at_ms }
}
