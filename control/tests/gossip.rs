//! Gossip: sealed packets (tampered, foreign, replayed, re-keyed and
//! wrongly attributed ones dropped, each reason counted), nonces that never
//! repeat, sender restarts, the key's rotation and retirement (state,
//! leader's schedule, keyrings), and SWIM in a deterministic simulation
//! with message loss: members find each other, a dead member is declared
//! down everywhere, a live one nowhere.

use core::net::SocketAddr;
use meshplane_control::cluster::gossip_loop::{gossip_node, key_grace, key_schedule};
use meshplane_control::gossip::sim::{self, Sim};
use meshplane_control::gossip::{Gossip, GossipId, Keyring, MemberEvent, REPLAY_WINDOW, Rejected, SEAL_HEADER};
use meshplane_control::state::{ClusterState, Command, GossipKey, StateError};
use std::time::Duration;

fn id(addr: &str, epoch: u64) -> GossipId {
    GossipId { addr: addr.parse().unwrap(), epoch }
}

#[test]
fn seal_open_tamper_foreign_and_rotation() {
    let me = id("198.18.0.1:7946", 5);
    let mut k = Keyring::new(1, &[1; 32]);
    let p = k.seal(me, 1, b"membership update").unwrap();
    let (h, plain) = k.open(&p).unwrap();
    assert_eq!(plain, b"membership update");
    assert_eq!((h.key_id, h.sender, h.seq), (1, me, 1));
    // Every bit is covered: the header (associated data), nonce, text, tag.
    for i in 0..p.len() {
        let mut t = p.clone();
        t[i] ^= 0x01;
        assert!(k.open(&t).is_err(), "a flipped bit at {i} must not open");
    }
    let foreign = Keyring::new(1, &[2; 32]);
    assert_eq!(foreign.open(&p), Err(Rejected::BadTag), "another cluster's key");
    assert_eq!(k.open(&p[..20]), Err(Rejected::Short));
    assert_eq!(k.open(&p[..SEAL_HEADER + 15]), Err(Rejected::Short));
    // Rotation: the old key still opens until it is retired.
    k.rotate(2, &[3; 32]);
    assert_eq!(k.open(&p).unwrap().1, b"membership update");
    let q = k.seal(me, 2, b"new").unwrap();
    assert_eq!(k.open(&q).unwrap().0.key_id, 2, "sealed under the new key");
    assert!(!k.retire(2), "the sealing key is not retired");
    assert!(k.retire(1));
    assert_eq!(k.open(&p), Err(Rejected::RetiredKey));
    assert_eq!(k.open(&q).unwrap().1, b"new");
    // A key newer than any held: not (yet) known.
    let newer = Keyring::new(7, &[3; 32]).seal(me, 3, b"x").unwrap();
    assert_eq!(k.open(&newer), Err(Rejected::UnknownKey));
}

/// Two members that are the same in everything a seeded generator could
/// see — address, epoch (the same clock), foca's seed, key — seal
/// packets: no nonce is ever used twice, in a million seals each
/// (`MESHPLANE_NONCE_SEALS` for another count).
#[test]
fn no_nonce_repeats_across_two_members_with_the_same_clock_and_seed() {
    let seals: usize = std::env::var("MESHPLANE_NONCE_SEALS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let me = GossipId::starting_now("198.18.0.1:7946".parse().unwrap());
    let keys = Keyring::new(1, &[9; 32]);
    let mut a = Gossip::with_seed(me, keys.clone(), 3, 42);
    let mut b = Gossip::with_seed(me, keys, 3, 42);
    let mut nonces: Vec<[u8; 24]> = Vec::with_capacity(2 * seals);
    for m in [&mut a, &mut b] {
        for _ in 0..seals {
            let p = m.seal(b"").expect("the OS gives randomness");
            let mut n = [0u8; 24];
            n.copy_from_slice(&p[SEAL_HEADER - 24..SEAL_HEADER]);
            nonces.push(n);
        }
    }
    assert_eq!(a.stats.seal_failed + b.stats.seal_failed, 0);
    nonces.sort_unstable();
    nonces.dedup();
    assert_eq!(nonces.len(), 2 * seals, "a nonce repeated");
    eprintln!("{} seals, no nonce repeated", 2 * seals);
    // Members started by the production constructor at the same instant.
    let (x, y) = (GossipId::starting_now(me.addr), GossipId::starting_now(me.addr));
    let mut x = Gossip::new(x, Keyring::new(1, &[9; 32]), 3);
    let mut y = Gossip::new(y, Keyring::new(1, &[9; 32]), 3);
    let (p, q) = (x.seal(b"").unwrap(), y.seal(b"").unwrap());
    assert_ne!(p[SEAL_HEADER - 24..SEAL_HEADER], q[SEAL_HEADER - 24..SEAL_HEADER]);
}

/// A member's announcement's plaintext (foca's bytes), to seal again.
fn foca_bytes(m: &mut Gossip, to: GossipId) -> Vec<u8> {
    let out = m.announce(to);
    let (_, p) = out.send.into_iter().next().expect("an announcement");
    m.keys().open(&p).expect("it opens").1
}

fn counted(m: &Gossip, r: Rejected) -> u64 {
    m.stats.rejected[r as usize]
}

#[test]
fn replayed_rekeyed_and_wrongly_attributed_packets_are_rejected_and_counted() {
    let keys = Keyring::new(1, &[4; 32]);
    let (ida, idb, idc) = (id("198.18.0.1:7946", 100), id("198.18.0.2:7946", 200), id("198.18.0.3:7946", 300));
    let mut a = Gossip::with_seed(ida, keys.clone(), 3, 1);
    let mut b = Gossip::with_seed(idb, keys.clone(), 3, 2);
    let mut c = Gossip::with_seed(idc, keys.clone(), 3, 3);
    let text = foca_bytes(&mut a, idb);
    let seal = |a: &mut Gossip| a.seal(&text).unwrap();
    let (p1, p2, p3) = (seal(&mut a), seal(&mut a), seal(&mut a));

    // Accepted once, in any order (within the window); each again is a replay.
    for p in [&p3, &p1, &p2] {
        b.handle_packet(ida.addr, p);
    }
    assert_eq!(b.stats.received, 3, "{:?}", b.stats);
    for p in [&p1, &p2, &p3] {
        b.handle_packet(ida.addr, p);
    }
    assert_eq!(counted(&b, Rejected::Replayed), 3);
    assert_eq!(b.stats.received, 3);

    // Too far behind the newest: refused although never seen.
    let old = seal(&mut a);
    for _ in 0..REPLAY_WINDOW {
        seal(&mut a);
    }
    b.handle_packet(ida.addr, &seal(&mut a));
    b.handle_packet(ida.addr, &old);
    assert_eq!(counted(&b, Rejected::Replayed), 4);
    assert_eq!(b.stats.received, 4);

    // Wrongly attributed: a's packet arriving from c's address; a packet
    // c seals in a's name (it holds the key) but with its own foca header,
    // sent from a's address.
    b.handle_packet(idc.addr, &seal(&mut a));
    let forged = keys.seal(ida, 1 << 40, &foca_bytes(&mut c, idb)).unwrap();
    b.handle_packet(ida.addr, &forged);
    assert_eq!(counted(&b, Rejected::WrongSender), 2);
    assert_eq!(b.stats.received, 4);

    // Re-keyed: b moves to key 2 and, after the grace period, retires key 1.
    let held_back = seal(&mut a);
    b.keys_mut().rotate(2, &[5; 32]);
    b.handle_packet(ida.addr, &seal(&mut a));
    assert_eq!(b.stats.received, 5, "the previous key opens during the grace period");
    assert!(b.keys_mut().retire(1));
    b.handle_packet(ida.addr, &held_back);
    b.handle_packet(ida.addr, &seal(&mut a));
    assert_eq!(counted(&b, Rejected::RetiredKey), 2);
    assert_eq!(b.stats.received, 5);
    a.keys_mut().rotate(2, &[5; 32]);
    b.handle_packet(ida.addr, &seal(&mut a));
    assert_eq!(b.stats.received, 6, "under the new key");

    // a restarts: a new epoch, sequence numbers from 1 again: accepted; a
    // packet of its previous life never delivered is refused.
    let previous_life = seal(&mut a);
    let ida2 = GossipId { epoch: ida.epoch + 1, ..ida };
    let mut a2 = Gossip::with_seed(ida2, b.keys().clone(), 3, 1);
    let text2 = foca_bytes(&mut a2, idb);
    let first = a2.seal(&text2).unwrap();
    assert_eq!(b.keys().open(&first).unwrap().0.seq, 2, "the restarted member's second packet");
    b.handle_packet(ida.addr, &first);
    assert_eq!(b.stats.received, 7, "{:?}", b.stats);
    b.handle_packet(ida.addr, &previous_life);
    assert_eq!(counted(&b, Rejected::Replayed), 5);
    assert_eq!(b.stats.received, 7);
    // Nothing else was counted.
    for r in [Rejected::Short, Rejected::UnknownKey, Rejected::BadTag, Rejected::Undecodable] {
        assert_eq!(counted(&b, r), 0, "{r:?}");
    }
}

#[test]
fn a_keyring_follows_the_clusters_keys() {
    let s = Duration::from_secs;
    let stage = s(2);
    let me = id("198.18.0.1:7946", 1);
    let mut k = Keyring::from_keys(&[(1, [1; 32])], s(0)).unwrap();
    assert_eq!((k.ids(), k.sealing()), (vec![1], 1));
    let under1 = k.seal(me, 1, b"one").unwrap();
    // A new key: it opens at once, seals once held for the stage.
    k.sync(&[(2, [2; 32]), (1, [1; 32])], s(10), stage);
    assert_eq!((k.ids(), k.sealing()), (vec![1, 2], 1));
    let under2 = Keyring::new(2, &[2; 32]).seal(me, 2, b"two").unwrap();
    assert_eq!(k.open(&under2).unwrap().1, b"two");
    k.sync(&[(2, [2; 32]), (1, [1; 32])], s(11), stage);
    assert_eq!(k.sealing(), 1);
    k.sync(&[(2, [2; 32]), (1, [1; 32])], s(12), stage);
    assert_eq!(k.sealing(), 2);
    assert_eq!(k.open(&under1).unwrap().1, b"one", "the previous key opens during the grace period");
    // Retired by the cluster: gone here too, and refused.
    k.sync(&[(2, [2; 32])], s(300), stage);
    assert_eq!((k.ids(), k.sealing()), (vec![2], 2));
    assert_eq!(k.open(&under1), Err(Rejected::RetiredKey));
    // A member that starts mid-rotation seals with the previous key first.
    let k = Keyring::from_keys(&[(3, [3; 32]), (2, [2; 32])], s(0)).unwrap();
    assert_eq!((k.ids(), k.sealing()), (vec![2, 3], 2));
    // One that lags two rotations behind moves to the newest at once.
    let mut k = Keyring::from_keys(&[(1, [1; 32])], s(0)).unwrap();
    k.sync(&[(3, [3; 32]), (2, [2; 32])], s(1), stage);
    assert_eq!((k.ids(), k.sealing()), (vec![2, 3], 3));
}

fn rotate(id: u32, at_ms: u64) -> Command {
    Command::RotateGossipKey { id, key: [id as u8; 32], at_ms }
}

#[test]
fn gossip_keys_in_the_state_rotate_and_retire() {
    let mut st = ClusterState::new();
    st.apply(&rotate(1, 1000)).unwrap();
    st.apply(&rotate(2, 2000)).unwrap();
    let ids = |st: &ClusterState| st.gossip_keys.iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(ids(&st), vec![2, 1], "current first, then previous");
    assert_eq!(st.gossip_keys[0], GossipKey { id: 2, key: [2; 32], added_ms: 2000 });
    // Ids only grow: a stale or repeated rotation changes nothing.
    assert_eq!(st.apply(&rotate(2, 3000)), Err(StateError::StaleGossipKey { id: 2, current: 2 }));
    assert_eq!(st.apply(&rotate(1, 3000)), Err(StateError::StaleGossipKey { id: 1, current: 2 }));
    assert_eq!(st.apply(&Command::RetireGossipKey { id: 2 }), Err(StateError::RetiringCurrentGossipKey(2)));
    assert_eq!(ids(&st), vec![2, 1]);
    st.apply(&Command::RetireGossipKey { id: 1 }).unwrap();
    assert_eq!(ids(&st), vec![2]);
    st.apply(&Command::RetireGossipKey { id: 1 }).unwrap();
    assert_eq!(ids(&st), vec![2], "retiring a key gone already changes nothing");
    // At most the current and the previous key.
    st.apply(&rotate(3, 4000)).unwrap();
    st.apply(&rotate(4, 5000)).unwrap();
    assert_eq!(ids(&st), vec![4, 3]);
    // A state written before keys had times (and u8 ids) still reads.
    let mut v = serde_json::to_value(&st).unwrap();
    let (k1, k2, k0) = ([1u8; 32], [2u8; 32], [0u8; 32]);
    v["gossip_keys"] = serde_json::json!([[7, k1], [6, k2]]);
    let old: ClusterState = serde_json::from_value(v).unwrap();
    assert_eq!(old.gossip_keys[0], GossipKey { id: 7, key: [1; 32], added_ms: 0 });
    let cmd: Command = serde_json::from_value(serde_json::json!({ "RotateGossipKey": { "id": 8, "key": k0 } }))
        .expect("a rotation logged before it had a time");
    assert_eq!(cmd, Command::RotateGossipKey { id: 8, key: [0; 32], at_ms: 0 });
}

#[test]
fn the_leader_rotates_after_the_interval_and_retires_after_the_grace_period() {
    let interval = Duration::from_secs(60);
    let grace = key_grace(interval).as_millis() as u64;
    assert_eq!(grace, 30_000);
    assert_eq!(key_grace(Duration::from_secs(12 * 3600)), Duration::from_secs(300), "5 minutes in production");
    let mut st = ClusterState::new();
    assert_eq!(key_schedule(&st, 0, interval), None, "no key before `cluster init`");
    st.apply(&rotate(1, 1_000_000)).unwrap();
    assert_eq!(key_schedule(&st, 1_000_000 + 59_999, interval), None, "one key, not yet due");
    let Some(cmd @ Command::RotateGossipKey { id: 2, at_ms: 1_060_000, .. }) = key_schedule(&st, 1_060_000, interval)
    else {
        panic!("a rotation once the interval passed");
    };
    st.apply(&cmd).unwrap();
    assert_eq!(st.gossip_keys[0].id, 2, "the new key is current");
    assert_eq!(key_schedule(&st, 1_060_000 + grace - 1, interval), None, "the previous one kept during grace");
    let retire = key_schedule(&st, 1_060_000 + grace, interval);
    assert_eq!(retire, Some(Command::RetireGossipKey { id: 1 }));
    st.apply(&retire.unwrap()).unwrap();
    assert_eq!(st.gossip_keys.len(), 1);
    assert_eq!(key_schedule(&st, 1_060_000 + grace + 1, interval), None);
    assert!(matches!(key_schedule(&st, 1_120_000, interval), Some(Command::RotateGossipKey { id: 3, .. })));
    // A key from before keys had times is rotated at once.
    let mut legacy = ClusterState::new();
    legacy.apply(&rotate(9, 0)).unwrap();
    assert!(matches!(key_schedule(&legacy, 1_000_000, interval), Some(Command::RotateGossipKey { id: 10, .. })));
}

fn converged(sim: &Sim, n: usize) -> bool {
    sim.alive().all(|i| sim.members[i].as_ref().is_some_and(|m| m.members().len() == n - 1))
}

#[test]
fn a_dead_member_is_declared_down_everywhere_and_no_live_one_is() {
    let n = 40;
    let mut sim = Sim::new(n, 0.05, 42);
    let mut t = 0;
    while !converged(&sim, n) {
        t += 1_000_000;
        if t > 60_000_000 {
            let counts: Vec<usize> =
                sim.alive().map(|i| sim.members[i].as_ref().map_or(0, |m| m.members().len())).collect();
            let downs = sim.seen.iter().filter(|(_, _, e)| matches!(e, MemberEvent::Down(_))).count();
            let st: Vec<_> = sim
                .alive()
                .filter(|&i| sim.members[i].as_ref().is_some_and(|m| m.members().is_empty()))
                .map(|i| (i, sim.members[i].as_ref().unwrap().stats))
                .collect();
            panic!("40 members did not find each other in 60 s: {counts:?}, {downs} downs; isolated: {st:?}");
        }
        sim.run_until(t);
    }
    let before = sim.seen.len();
    let victim = 17;
    let killed_at = sim.now_us;
    sim.kill(victim);
    sim.run_until(killed_at + 30_000_000);
    let dead = sim.id(victim);
    let mut detect = Vec::new();
    for i in sim.alive() {
        let at =
            sim.seen[before..].iter().find(|(_, o, e)| *o == i && *e == MemberEvent::Down(dead)).map(|(at, _, _)| at);
        let at = at.unwrap_or_else(|| panic!("member {i} never declared {dead:?} down"));
        detect.push(at - killed_at);
    }
    let false_downs =
        sim.seen[before..].iter().filter(|(_, _, e)| matches!(e, MemberEvent::Down(id) if *id != dead)).count();
    assert_eq!(false_downs, 0, "live members declared down");
    let worst = detect.iter().max().copied().unwrap_or(0);
    assert!(worst < 5_000_000, "detection took {worst} us");
    eprintln!("detection of a dead member among {n}, 5% loss: worst {:.2} s", worst as f64 / 1e6);
    // It comes back (restarted: a new epoch, sequence numbers from 1
    // again) and is up again everywhere: no peer takes it for a replay.
    let mark = sim.seen.len();
    sim.revive(victim);
    let back = sim.id(victim);
    assert_eq!(back, GossipId { addr: dead.addr, epoch: dead.epoch + 1 });
    sim.run_until(sim.now_us + 15_000_000);
    for i in sim.alive().filter(|&i| i != victim) {
        assert!(
            sim.seen[mark..].iter().any(|(_, o, e)| *o == i && *e == MemberEvent::Up(back)),
            "member {i} did not see {back:?} come back"
        );
        let st = sim.members[i].as_ref().unwrap().stats;
        assert_eq!(st.rejected[Rejected::Replayed as usize], 0, "member {i}: {st:?}");
    }
}

/// `n` members losing nothing, once they all know each other (20 s).
fn lossless_and_converged(n: usize, seed: u64) -> Sim {
    let mut sim = Sim::new(n, 0.0, seed);
    sim.run_until(20_000_000);
    assert!(converged(&sim, n));
    sim
}

/// A member with the cluster key can announce a live member down, and
/// every member believes it (ARCHITECTURE, "what an audit left open").
/// The victim hears of it, rejoins under a new epoch and is up again
/// everywhere within a few gossip rounds: the false down does not last.
#[test]
fn a_forged_down_is_believed_and_outlived_by_the_victims_rejoin() {
    let n = 10;
    let mut sim = lossless_and_converged(n, 11);
    let (liar, victim) = (2, 5);
    let old = sim.id(victim);
    let mark = sim.seen.len();
    let forged_at = sim.now_us;
    sim.forge_down(liar, victim);
    sim.run_until(forged_at + 10_000_000);
    let renewed = sim.members[victim].as_ref().unwrap().id();
    assert_eq!(renewed.addr, old.addr);
    assert!(renewed.epoch > old.epoch, "the victim did not rejoin: {renewed:?}");
    let mut outage = Vec::new();
    for i in sim.alive().filter(|&i| i != victim && i != liar) {
        let seen = &sim.seen[mark..];
        let down = seen.iter().find(|(_, o, e)| *o == i && *e == MemberEvent::Down(old)).map(|(at, _, _)| *at);
        let down = down.unwrap_or_else(|| panic!("member {i} never believed the forged down"));
        let up = seen
            .iter()
            .find(|(at, o, e)| *o == i && *at >= down && matches!(e, MemberEvent::Up(id) if id.addr == old.addr))
            .map(|(at, _, _)| *at);
        let up = up.unwrap_or_else(|| panic!("member {i} never saw the victim up again"));
        outage.push(up - down);
    }
    let worst = outage.iter().max().copied().unwrap_or(0);
    assert!(worst < 3_000_000, "the forged down lasted {worst} us: {outage:?}");
    eprintln!("a forged down among {n}: believed everywhere, outlived in at most {:.2} s", worst as f64 / 1e6);
}

/// A member with the cluster key makes up a member at a live node's IP
/// on another port. Nothing answers there, so every member declares it
/// down; the node itself never hears of it and stays up. That down is no
/// node's: only a node's exact gossip address names it.
#[test]
fn a_made_up_member_at_a_nodes_ip_is_declared_down_but_is_not_that_node() {
    let n = 6;
    let mut sim = lossless_and_converged(n, 13);
    let (liar, victim) = (2, 4);
    let real = sim.id(victim).addr;
    let fake = SocketAddr::new(real.ip(), 9999);
    let mark = sim.seen.len();
    let at = sim.now_us;
    sim.forge_member(liar, fake);
    sim.run_until(at + 10_000_000);
    for i in sim.alive().filter(|&i| i != liar) {
        let seen = &sim.seen[mark..];
        if i != victim {
            assert!(
                seen.iter().any(|(_, o, e)| *o == i && matches!(e, MemberEvent::Down(id) if id.addr == fake)),
                "member {i} did not declare the made-up member down"
            );
        }
        assert!(
            !seen.iter().any(|(_, o, e)| *o == i && matches!(e, MemberEvent::Down(id) if id.addr == real)),
            "member {i} declared the real node down"
        );
    }
    let mut state = ClusterState::new();
    for i in 0..n {
        let node = meshplane_control::state::Node {
            id: format!("node{i}"),
            mgmt: SocketAddr::new(sim.id(i).addr.ip(), 2377),
            data_ip: std::net::Ipv4Addr::new(198, 18, 100, i as u8 + 1),
            data_mac: meshplane_dataplane::wire::MacAddr([2, 0, 0, 0, 0, i as u8 + 1]),
            role: meshplane_control::state::Role::Worker,
            availability: meshplane_control::state::Availability::Active,
            key_id: None,
            underlay_mtu: 1500,
        };
        state.apply(&Command::AddNode(node)).unwrap();
    }
    let port = real.port();
    assert_eq!(gossip_node(&state, port, real), Some("node4"));
    assert_eq!(gossip_node(&state, port, fake), None);
    let mapped = SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv4Addr::new(198, 18, 0, 5).to_ipv6_mapped()), port);
    assert_eq!(gossip_node(&state, port, mapped), Some("node4"), "an IPv4-mapped source is the node");
}

#[test]
fn tampered_foreign_and_replayed_packets_are_dropped_and_counted() {
    let n = 10;
    let mut sim = Sim::new(n, 0.0, 7);
    sim.capture(3);
    sim.run_until(20_000_000);
    assert!(converged(&sim, n));
    // A packet sealed with another cluster's key, and garbage.
    let outside: SocketAddr = "198.18.9.9:7946".parse().unwrap();
    let foreign = Keyring::new(1, &[9; 32]).seal(GossipId { addr: outside, epoch: 1 }, 1, b"join me").unwrap();
    sim.inject(3, outside, foreign);
    let mut garbage = vec![1u8; 100];
    garbage[..4].copy_from_slice(&1u32.to_be_bytes());
    sim.inject(3, outside, garbage);
    sim.inject(3, outside, vec![0u8; 5]);
    sim.run_until(21_000_000);
    let st = sim.members[3].as_ref().unwrap().stats;
    assert_eq!(st.rejected[Rejected::BadTag as usize], 2, "{st:?}");
    assert_eq!(st.rejected[Rejected::Short as usize], 1, "{st:?}");
    // Everything member 3 was sent, sent again (from the right sources).
    let again = sim.captured().to_vec();
    assert!(again.len() > 50, "{} packets captured", again.len());
    for (from, p) in &again {
        sim.inject(3, *from, p.clone());
    }
    sim.run_until(22_000_000);
    let st2 = sim.members[3].as_ref().unwrap().stats;
    let replayed = st2.rejected[Rejected::Replayed as usize];
    assert!(replayed >= again.len() as u64, "{replayed} of {} replays refused: {st2:?}", again.len());
    assert!(st2.received - st.received < again.len() as u64 / 2, "replays taken: {st:?} -> {st2:?}");
    // From the wrong source: wrongly attributed.
    let (from, p) = again[0].clone();
    let other = sim::addr(if from == sim::addr(0) { 1 } else { 0 });
    sim.inject(3, other, p);
    sim.run_until(23_000_000);
    let st3 = sim.members[3].as_ref().unwrap().stats;
    assert_eq!(st3.rejected[Rejected::WrongSender as usize], 1, "{st3:?}");
    sim.run_until(40_000_000);
    assert!(converged(&sim, n), "membership unaffected");
    // A member outside the cluster (another key) cannot join.
    let mut outsider = Gossip::new(GossipId { addr: outside, epoch: 0 }, Keyring::new(1, &[9; 32]), 10);
    let out = outsider.announce(sim.id(0));
    for (_, p) in out.send {
        sim.inject(0, outside, p);
    }
    sim.run_until(60_000_000);
    assert!(sim.members[0].as_ref().unwrap().members().iter().all(|m| m.addr != outside));
}
