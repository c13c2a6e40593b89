//! Gossip over UDP on the management IP: membership and failure
//! detection (SWIM, `gossip`), sealed with the cluster's keys from the
//! state; members declared down leave this node's tables.

use super::Control;
use crate::gossip::{Gossip, GossipId, Keyring, MemberEvent, Output};
use crate::rpc::GossipStats;
use crate::state::{ClusterState, Command};
use core::net::{IpAddr, SocketAddr};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The timers gossip asked for, with when each is due.
type Timers = Vec<(Instant, foca::Timer<GossipId>)>;

impl Control {
    /// Gossip over UDP on the management IP: membership, failure
    /// detection, sealed with the cluster's key.
    pub(super) async fn gossip_loop(self: Arc<Self>) {
        let keys = self.gossip_keys_once_member().await;
        let addr = SocketAddr::new(self.cfg.advertise.ip(), self.cfg.gossip_port);
        let sock = match tokio::net::UdpSocket::bind(addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("gossip: binding {addr}: {e}");
                return;
            }
        };
        // The generation: later starts win over an identity declared down.
        let bump = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            & 0xffff) as u16;
        let mut key_ids: Vec<u8> = keys.iter().map(|(i, _)| *i).collect();
        let n = self.lock().state.nodes.len() as u32;
        let mut g = Gossip::new(GossipId { addr, bump }, keyring(&keys), n.max(3), u64::from(bump) ^ 0x9e37);
        let mut timers: Timers = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        let mut buf = vec![0u8; 65536];
        loop {
            let next = timers.iter().map(|(t, _)| *t).min();
            let out = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok((len, _)) => g.handle_packet(&buf[..len]),
                    Err(_) => continue,
                },
                () = sleep_until_opt(next) => due_timers(&mut g, &mut timers),
                _ = tick.tick() => self.gossip_tick(&mut g, &mut key_ids),
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

    /// Waits until this node is in a cluster with a gossip key: the keys.
    async fn gossip_keys_once_member(&self) -> Vec<(u8, [u8; 32])> {
        loop {
            let k = self.lock().state.gossip_keys.clone();
            if !k.is_empty() && self.lock().state.nodes.contains_key(&self.cfg.name) {
                return k;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Once a second: new keys from the state; announcements to nodes not
    /// (yet, or no longer) members; the summary for `stats`.
    fn gossip_tick(&self, g: &mut Gossip, key_ids: &mut Vec<u8>) -> Output {
        let (state_keys, targets) = {
            let inner = self.lock();
            let members: BTreeSet<IpAddr> = g.members().iter().map(|m| m.addr.ip()).collect();
            let t: Vec<SocketAddr> = inner
                .state
                .nodes
                .values()
                .filter(|n| n.id != self.cfg.name && !members.contains(&n.mgmt.ip()))
                .map(|n| SocketAddr::new(n.mgmt.ip(), self.cfg.gossip_port))
                .collect();
            (inner.state.gossip_keys.clone(), t)
        };
        let ids: Vec<u8> = state_keys.iter().map(|(i, _)| *i).collect();
        if !state_keys.is_empty() && ids != *key_ids {
            *g.keys_mut() = keyring(&state_keys);
            *key_ids = ids;
        }
        let mut out = Output::default();
        for t in targets {
            out.absorb(g.announce(GossipId { addr: t, bump: 0 }));
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
                let Some(name) = g.state.nodes.values().find(|n| n.mgmt.ip() == id.addr.ip()).map(|n| n.id.clone())
                else {
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
    GossipStats {
        members: g.members().iter().map(|m| m.addr.to_string()).collect(),
        sent: g.stats.sent,
        received: g.stats.received,
        rejected_short: g.stats.rejected[0],
        rejected_unknown_key: g.stats.rejected[1],
        rejected_bad_tag: g.stats.rejected[2],
        rejected_undecodable: g.stats.rejected[3],
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn keyring(keys: &[(u8, [u8; 32])]) -> Keyring {
    let mut it = keys.iter().rev();
    let Some((id, key)) = it.next() else { return Keyring::new(0, &[0; 32]) };
    let mut r = Keyring::new(*id, key);
    for (id, key) in it {
        r.rotate(*id, key);
    }
    r
}

/// A new gossip key (drawn here, so every manager applies the same).
pub(super) fn new_gossip_key(state: &ClusterState) -> Command {
    let id = state.gossip_keys.first().map_or(1, |(i, _)| i.wrapping_add(1));
    let mut key = [0u8; 32];
    rand::fill(&mut key);
    Command::RotateGossipKey { id, key }
}
