//! Gossip: sealed packets (tampered and foreign ones dropped and counted,
//! keys rotated without a split), and SWIM in a deterministic simulation
//! with message loss: members find each other, a dead member is declared
//! down everywhere, a live one nowhere.

use meshplane_control::gossip::sim::Sim;
use meshplane_control::gossip::{Gossip, GossipId, Keyring, MemberEvent, Rejected};
use rand::SeedableRng;

#[test]
fn seal_open_tamper_foreign_and_rotation() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut k = Keyring::new(1, &[1; 32]);
    let p = k.seal(&mut rng, b"membership update");
    assert_eq!(k.open(&p).unwrap(), b"membership update");
    for i in 0..p.len() {
        let mut t = p.clone();
        t[i] ^= 0x01;
        assert!(k.open(&t).is_err(), "a flipped bit at {i} must not open");
    }
    let foreign = Keyring::new(1, &[2; 32]);
    assert_eq!(foreign.open(&p), Err(Rejected::BadTag), "another cluster's key");
    assert_eq!(k.open(&p[..20]), Err(Rejected::Short));
    // Rotation: the old key still opens until the next rotation.
    k.rotate(2, &[3; 32]);
    assert_eq!(k.open(&p).unwrap(), b"membership update");
    let q = k.seal(&mut rng, b"new");
    assert_eq!(q[0], 2, "sealed under the new key");
    k.rotate(3, &[4; 32]);
    assert_eq!(k.open(&p), Err(Rejected::UnknownKey));
    assert_eq!(k.open(&q).unwrap(), b"new");
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
    // It comes back (a new generation) and is up again everywhere.
    let mark = sim.seen.len();
    sim.revive(victim);
    let back = sim.id(victim);
    assert_eq!(back, GossipId { addr: dead.addr, bump: 1 });
    sim.run_until(sim.now_us + 15_000_000);
    for i in sim.alive().filter(|&i| i != victim) {
        assert!(
            sim.seen[mark..].iter().any(|(_, o, e)| *o == i && *e == MemberEvent::Up(back)),
            "member {i} did not see {back:?} come back"
        );
    }
}

#[test]
fn tampered_and_foreign_packets_are_dropped_and_counted() {
    let n = 10;
    let mut sim = Sim::new(n, 0.0, 7);
    sim.run_until(20_000_000);
    assert!(converged(&sim, n));
    // A packet sealed with another cluster's key, and garbage.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let foreign = Keyring::new(1, &[9; 32]).seal(&mut rng, b"join me");
    sim.inject(3, foreign);
    sim.inject(3, vec![1u8; 100]);
    sim.inject(3, vec![0u8; 5]);
    sim.run_until(21_000_000);
    let st = sim.members[3].as_ref().unwrap().stats;
    assert_eq!(st.rejected[Rejected::BadTag as usize], 2, "{st:?}");
    assert_eq!(st.rejected[Rejected::Short as usize], 1, "{st:?}");
    sim.run_until(40_000_000);
    assert!(converged(&sim, n), "membership unaffected");
    // A member outside the cluster (another key) cannot join.
    let mut outsider =
        Gossip::new(GossipId { addr: "198.18.9.9:7946".parse().unwrap(), bump: 0 }, Keyring::new(1, &[9; 32]), 10, 1);
    let out = outsider.announce(sim.id(0));
    for (_, p) in out.send {
        sim.inject(0, p);
    }
    sim.run_until(60_000_000);
    assert!(sim.members[0].as_ref().unwrap().members().iter().all(|m| m.addr.ip().to_string() != "198.18.9.9"));
}
