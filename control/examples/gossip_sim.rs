//! Failure detection in a simulated cluster (deterministic for a seed):
//! N members on a virtual clock losing a share of all packets; once every
//! member knows every other, members are killed one at a time, and for
//! each the time until every live member declared it down is measured;
//! any live member declared down is a false positive.
//!
//!   cargo run --release -p meshplane-control --example gossip_sim -- [NODES] [LOSS] [KILLS] [SEED]
//!   (defaults: 1000 0.05 5 1)

use meshplane_control::gossip::MemberEvent;
use meshplane_control::gossip::sim::Sim;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|a| a.parse::<f64>().ok()).unwrap_or(d);
    let (n, loss, kills, seed) = (arg(0, 1000.0) as usize, arg(1, 0.05), arg(2, 5.0) as usize, arg(3, 1.0) as u64);
    let wall = Instant::now();
    let mut sim = Sim::new(n, loss, seed);
    // Until every member knows every other (bounded: 10 virtual minutes).
    let mut t = 0;
    loop {
        t += 1_000_000;
        sim.run_until(t);
        let full = sim.alive().filter(|&i| sim.members[i].as_ref().is_some_and(|m| m.members().len() == n - 1)).count();
        if full == n || t >= 600_000_000 {
            println!("{full}/{n} members know all others after {} s (virtual)", t / 1_000_000);
            break;
        }
    }
    let mut worst_all = Vec::new();
    let mut false_downs = 0usize;
    let mut observations = 0usize;
    for k in 0..kills {
        let victim = 1 + (k * 7919) % (n - 1);
        let mark = sim.seen.len();
        let at = sim.now_us;
        sim.kill(victim);
        sim.run_until(at + 20_000_000);
        let dead = sim.id(victim);
        let mut times: Vec<u64> = Vec::new();
        let mut missing = 0;
        for i in sim.alive() {
            match sim.seen[mark..].iter().find(|(_, o, e)| *o == i && *e == MemberEvent::Down(dead)) {
                Some((when, _, _)) => times.push(when - at),
                None => missing += 1,
            }
        }
        times.sort_unstable();
        let p =
            |q: f64| times.get(((times.len() as f64 - 1.0) * q).round() as usize).map_or(f64::NAN, |v| *v as f64 / 1e6);
        let fd = sim.seen[mark..].iter().filter(|(_, _, e)| matches!(e, MemberEvent::Down(id) if *id != dead)).count();
        false_downs += fd;
        observations += sim.alive().count() * (n - 1 - k);
        println!(
            "kill {victim}: declared down by {}/{} live members; p50 {:.2} s, p99 {:.2} s, all {:.2} s; {missing} never; {fd} false downs",
            times.len(),
            times.len() + missing,
            p(0.5),
            p(0.99),
            p(1.0)
        );
        worst_all.push(p(1.0));
    }
    let worst = worst_all.iter().copied().fold(0.0f64, f64::max);
    println!(
        "summary: {n} members, {:.0}% loss: every live member knew within {worst:.2} s (worst of {kills}); false positives {false_downs} of {observations} member observations ({:.4}%); {:.1} s of wall time",
        loss * 100.0,
        false_downs as f64 * 100.0 / observations.max(1) as f64,
        wall.elapsed().as_secs_f64()
    );
}
